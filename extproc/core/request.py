"""The request snapshot the decision core works on, parsed from headers and body.

Parsing is strict where a wrong value would change a decision (the model, the
session id, tags, ``stream``) and answers each problem with a 400 naming the
parameter, never a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from extproc.core.endpoints import EndpointSpec, lookup_endpoint
from extproc.core.errors import (
    InvalidJSONError,
    InvalidParameterError,
    MissingParameterError,
)
from extproc.core.jsonbody import DuplicateKeyError, ParsedJson, parse_json

__all__ = ["POLICY_MEMBERS", "LLMRequest", "RequestHead", "parse_request"]

MAX_SESSION_ID_BYTES = 256
MAX_TAGS = 64
MAX_TAG_CHARS = 128

#: Top-level members some decision reads (routing, keys, budgets, pricing, session
#: caps, the context-window check, the tools allowlist, the usage opt-in).
#: Rule: a body that names one of them twice is refused. The policy would read the
#: last (as json.loads does) while an upstream's parser may take the first, so what
#: was checked and paid for would not be what is served.
POLICY_MEMBERS = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "user",
        "metadata",
        "litellm_metadata",
        "tools",
        "functions",
        "mcp_servers",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "best_of",
        "input",
        "messages",
        "prompt",
        "system",
        "instructions",
        "disable_fallbacks",
    }
)


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the headers phase tells us: method, path and lower-cased headers."""

    method: str
    path: str
    headers: Mapping[str, str]

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> RequestHead:
        """Build from (name, value) pairs; pseudo-headers give method and path.

        Repeated headers are joined with ``,`` as HTTP allows.
        """
        headers: dict[str, str] = {}
        for name, value in pairs:
            key = name.lower()
            headers[key] = f"{headers[key]},{value}" if key in headers else value
        return cls(
            method=headers.get(":method", ""),
            path=headers.get(":path", ""),
            headers=headers,
        )

    @property
    def endpoint(self) -> EndpointSpec | None:
        if self.method != "POST":
            return None
        return lookup_endpoint(self.path)

    def caller_key(self) -> str | None:
        """The credential the caller presented (virtual key), if any."""
        auth = self.headers.get("authorization")
        if auth:
            scheme, _, token = auth.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        for name in ("x-api-key", "api-key"):
            value = self.headers.get(name, "").strip()
            if value:
                return value
        return None


@dataclass(frozen=True, slots=True)
class LLMRequest:
    """One LLM call as the core sees it."""

    head: RequestHead
    endpoint: EndpointSpec
    model: str
    #: Byte span of the ``model`` value in ``raw_body``, for the rewrite.
    model_span: tuple[int, int]
    #: Byte span of the ``stream_options`` value, if the body has one.
    stream_options_span: tuple[int, int] | None
    raw_body: bytes
    body: dict[str, Any]
    stream: bool
    user: str | None
    session_id: str | None
    tags: tuple[str, ...]
    api_key: str | None
    #: The one parse of ``raw_body``.
    parsed: ParsedJson
    #: ``disable_fallbacks: true`` (only the JSON literal counts, as in LiteLLM): the
    #: call is not sent to fallback groups.
    disable_fallbacks: bool = False

    def strict_member(self, name: str) -> Any:
        """Top-level member ``name`` read again with no duplicate key at any depth, for
        members whose nested keys a decision reads (a tool's name): a 400 otherwise.
        """
        try:
            return self.parsed.unique(name)
        except DuplicateKeyError as err:
            raise InvalidJSONError(
                f"'{name}' holds an object that names '{err.key[:64]}' more than once.",
                param=name,
            ) from None


#: The longest end-user id accepted (it names a budget and a store key).
MAX_USER_BYTES = 256


def _check_user(value: str | None, param: str) -> str | None:
    """An end-user id is printable text: it becomes part of store keys and messages."""
    if not value:
        return None  # "user": "" names no one
    if not value.isprintable() or len(value.encode("utf-8")) > MAX_USER_BYTES:
        raise InvalidParameterError(
            f"'{param}' must be 1-{MAX_USER_BYTES} bytes of printable text",
            code="invalid_user",
            param=param,
        )
    return value


def _check_session_id(value: str, source: str) -> str:
    # Rule: isprintable() first; it also refuses lone surrogates, which cannot be encoded.
    if not value or not value.isprintable() or len(value.encode("utf-8")) > MAX_SESSION_ID_BYTES:
        raise InvalidParameterError(
            f"session id from {source} must be 1-{MAX_SESSION_ID_BYTES} bytes of printable text",
            code="invalid_session_id",
            param=source,
        )
    return value


def _session_id(head: RequestHead, body: dict[str, Any], header_names: Iterable[str]) -> str | None:
    for name in header_names:
        value = head.headers.get(name)
        if value is not None:
            return _check_session_id(value.strip(), name)
    for container in ("metadata", "litellm_metadata"):
        meta = body.get(container)
        if not isinstance(meta, dict):
            continue
        value = meta.get("session_id")
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidParameterError(
                f"'{container}.session_id' must be a string",
                code="invalid_session_id",
                param=f"{container}.session_id",
            )
        return _check_session_id(value, f"{container}.session_id")
    return None


def _check_tag(tag: str, param: str) -> str:
    if not tag or len(tag) > MAX_TAG_CHARS or not tag.isprintable():
        raise InvalidParameterError(
            f"tags must be 1-{MAX_TAG_CHARS} printable characters", param=param
        )
    return tag


def _tags(head: RequestHead, body: dict[str, Any], tags_header: str) -> tuple[str, ...]:
    found: list[str] = []
    meta = body.get("metadata")
    if isinstance(meta, dict) and meta.get("tags") is not None:
        raw = meta["tags"]
        if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
            raise InvalidParameterError(
                "'metadata.tags' must be a list of strings", param="metadata.tags"
            )
        found.extend(_check_tag(t, "metadata.tags") for t in raw)
    header = head.headers.get(tags_header)
    if header:
        found.extend(_check_tag(t.strip(), tags_header) for t in header.split(",") if t.strip())
    unique = tuple(dict.fromkeys(found))
    if len(unique) > MAX_TAGS:
        raise InvalidParameterError(f"at most {MAX_TAGS} tags", param="metadata.tags")
    return unique


def parse_request(
    head: RequestHead,
    endpoint: EndpointSpec,
    raw_body: bytes,
    *,
    session_headers: Iterable[str] = ("x-litellm-session-id",),
    tags_header: str = "x-litellm-tags",
) -> LLMRequest:
    """Parse a buffered body into an :class:`LLMRequest` or raise a 400."""
    if not raw_body.strip():
        raise MissingParameterError(
            "The request body is empty; expected a JSON object.", code="missing_body"
        )
    try:
        parsed = parse_json(raw_body)
    except (ValueError, RecursionError) as exc:
        reason = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"
        raise InvalidJSONError(f"The request body is {reason}.") from None
    body = parsed.value
    if not isinstance(body, dict):
        raise InvalidJSONError(
            f"The request body must be a JSON object, not a JSON {type(body).__name__}."
        )
    if parsed.duplicates & POLICY_MEMBERS:
        name = next(m for m, _, _ in parsed.members if m in parsed.duplicates & POLICY_MEMBERS)
        raise InvalidJSONError(
            f"The request body names '{name}' more than once (escaped spellings count).",
            param=name,
        )
    for name, _, _ in parsed.members:
        # Rule: some upstream parsers (Go's encoding/json) match member names without
        # regard to case, so "MODEL" could be what they serve.
        folded = name.casefold()  # Unicode folding: a long s (U+017F) is an "s" to Go
        if name not in POLICY_MEMBERS and folded in POLICY_MEMBERS:
            raise InvalidJSONError(
                f"The request body names '{name[:64]}': spell '{folded}' in lower case.",
                param=folded,
            )
    if "model" not in body or body["model"] is None:
        raise MissingParameterError("You must provide a model parameter.", param="model")
    model = body["model"]
    if not isinstance(model, str):
        raise InvalidParameterError("'model' must be a string.", param="model")
    if not model.strip():
        raise InvalidParameterError("'model' must not be empty.", param="model")
    span = parsed.span("model")
    assert span is not None  # a parsed object with the member has a span
    request = LLMRequest(
        head=head,
        endpoint=endpoint,
        model=model,
        model_span=span,
        stream_options_span=parsed.span("stream_options"),
        raw_body=raw_body,
        body=body,
        stream=endpoint.stream(body),
        user=_check_user(endpoint.user(body), endpoint.user_param),
        session_id=_session_id(head, body, session_headers),
        tags=_tags(head, body, tags_header),
        api_key=head.caller_key(),
        parsed=parsed,
        disable_fallbacks=body.get("disable_fallbacks") is True,
    )
    for name in _NESTED_READ:
        if isinstance(body.get(name), dict):
            request.strict_member(name)  # the session id, user id and tags inside count
    return request


#: Objects whose members a decision reads (session id, end-user id, tags, usage
#: opt-in): a duplicate key inside them is refused like one at the top level.
_NESTED_READ = ("metadata", "litellm_metadata", "stream_options")
