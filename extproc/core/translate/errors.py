"""Error bodies between OpenAI's shape and Anthropic's.

OpenAI: ``{"error": {"message", "type", "param", "code"}}``; Anthropic:
``{"type": "error", "error": {"type", "message"}}``. The HTTP status stays what the
upstream (or the gateway) answered; only the body is translated, its type chosen by
the status first and by the other side's type where the status says little (a plain
400, or no status at all for an error inside a stream):

====== ========================= ==============================================
status Anthropic type            OpenAI type / code
====== ========================= ==============================================
400    invalid_request_error     invalid_request_error / invalid_request
401    authentication_error      authentication_error / invalid_api_key
402    billing_error             insufficient_quota / insufficient_quota
403    permission_error          permission_error / permission_denied
404    not_found_error           invalid_request_error / not_found
413    request_too_large         invalid_request_error / payload_too_large
429    rate_limit_error          rate_limit_error / rate_limit_exceeded
500    api_error                 server_error / internal_error
503    overloaded_error          server_error / overloaded
504    timeout_error             server_error / timeout
529    overloaded_error          server_error / overloaded
====== ========================= ==============================================

OpenAI's ``insufficient_quota`` (a 429) is Anthropic's ``billing_error``: retrying does
not help. A translated OpenAI error then passes :func:`normalize_error`, so a prompt
that is too long reads ``context_length_exceeded`` whichever API said it.

Rule: a body that is not JSON, or not either shape, keeps its text as the message
(cut to :data:`MAX_MESSAGE_CHARS`); nothing here raises.
"""

from __future__ import annotations

from typing import Any

from extproc.core.errors import error_body
from extproc.core.translate._values import as_dict, encode, loads, text
from extproc.core.upstream_errors import MAX_ERROR_BYTES, normalize_error

__all__ = [
    "MAX_MESSAGE_CHARS",
    "anthropic_error",
    "anthropic_error_to_openai",
    "openai_error",
    "openai_error_to_anthropic",
]

MAX_MESSAGE_CHARS = 2000

_ANTHROPIC_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
#: OpenAI's types (and the gateway's own) where they say more than the status.
_ANTHROPIC_BY_OPENAI_TYPE = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "rate_limit_error": "rate_limit_error",
    "requests": "rate_limit_error",
    "tokens": "rate_limit_error",
    "server_error": "api_error",
    "api_error": "api_error",
    "service_unavailable_error": "overloaded_error",
}
_CLIENT_TYPES = frozenset({"authentication_error", "permission_error", "rate_limit_error"})
_OPENAI_BY_ANTHROPIC_TYPE = {
    "invalid_request_error": ("invalid_request_error", "invalid_request"),
    "authentication_error": ("authentication_error", "invalid_api_key"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "permission_error": ("permission_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "conflict_error": ("invalid_request_error", "conflict"),
    "request_too_large": ("invalid_request_error", "payload_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "api_error": ("server_error", "internal_error"),
    "timeout_error": ("server_error", "timeout"),
    "overloaded_error": ("server_error", "overloaded"),
}


def _by_status(status: int | None) -> str | None:
    if status is None:
        return None
    if status in _ANTHROPIC_BY_STATUS:
        return _ANTHROPIC_BY_STATUS[status]
    if 400 <= status < 500:
        return "invalid_request_error"
    return "api_error" if status >= 500 else None


def _cut(message: str) -> str:
    return message[:MAX_MESSAGE_CHARS]


def _message(status: int | None, error: Any, message: str | None) -> str:
    """The message given, else the error's own (a bare string is one), else a default."""
    if message is None:
        message = error if isinstance(error, str) else text(as_dict(error).get("message"))
    if message:
        return _cut(message)
    return "Upstream error" + (f" (HTTP {status})" if status is not None else "")


def _parse(body: bytes) -> tuple[dict[str, Any], str]:
    """The error object of either shape and its message (the body's text when it has
    none)."""
    data: Any = None
    if len(body) <= MAX_ERROR_BYTES:
        try:
            data = loads(body)
        except (ValueError, RecursionError):
            data = None
    error = as_dict(data).get("error")
    if isinstance(error, str):
        return {}, _cut(error)
    obj = as_dict(error)
    message = text(obj.get("message")) or text(as_dict(data).get("message"))
    if not message:
        message = body[: MAX_MESSAGE_CHARS * 4].decode("utf-8", "replace").strip()
    return obj, _cut(message)


def anthropic_error(status: int | None, error: Any, message: str | None = None) -> dict[str, Any]:
    """Anthropic's error object for an OpenAI error object (``status`` None inside a
    stream)."""
    obj = as_dict(error)
    openai_type, code = text(obj.get("type")), text(obj.get("code"))
    kind = _by_status(status)
    by_type = _ANTHROPIC_BY_OPENAI_TYPE.get(openai_type)
    if "insufficient_quota" in (openai_type, code):
        kind = "billing_error"
    elif kind is None:
        kind = by_type or "api_error"
    elif kind == "invalid_request_error" and by_type in _CLIENT_TYPES:
        kind = by_type  # a plain 4xx whose type says more
    elif kind == "api_error" and by_type == "overloaded_error":
        kind = by_type
    return {"type": kind, "message": _message(status, error, message)}


def openai_error(status: int | None, error: Any, message: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for an Anthropic error object (``status`` None inside a
    stream)."""
    obj = as_dict(error)
    kind = text(obj.get("type"))
    if kind not in _OPENAI_BY_ANTHROPIC_TYPE or (
        kind == "invalid_request_error" and status is not None and status != 400
    ):
        kind = _by_status(status) or kind
    err_type, code = _OPENAI_BY_ANTHROPIC_TYPE.get(kind, ("server_error", "internal_error"))
    return {
        "message": _message(status, error, message),
        "type": err_type,
        "param": None,
        "code": code,
    }


def openai_error_to_anthropic(status: int, body: bytes) -> bytes:
    """An OpenAI-shaped error body (an upstream's, or the gateway's own) in Anthropic's
    shape, for a client that speaks Anthropic."""
    error, message = _parse(body)
    return encode({"type": "error", "error": anthropic_error(status, error, message)})


def anthropic_error_to_openai(status: int, body: bytes) -> bytes:
    """An Anthropic error body in OpenAI's shape, for a client that speaks OpenAI."""
    error, message = _parse(body)
    obj = openai_error(status, error, message)
    out = error_body(obj["message"], obj["type"], obj["code"], obj["param"])
    return normalize_error(status, out) or out
