"""Upstream error bodies normalized to OpenAI's codes, whatever the provider's words.

Context-window overflows (the seed's patterns) become a 400 with code
``context_length_exceeded``; content-policy refusals a 400 with code
``content_policy_violation``. Other errors pass through untouched.
"""

from __future__ import annotations

import json
import re
from typing import Any

from extproc.core.errors import error_body

__all__ = ["normalize_error"]

_CONTEXT_OVERFLOW = re.compile(
    r"(input tokens exceed|context.{0,20}(length|window|limit)|maximum context length|"
    r"token.{0,20}(limit|exceed)|too many tokens|reduce the length|prompt is too long)",
    re.IGNORECASE,
)
_CONTENT_POLICY = re.compile(
    r"(content[_ ]policy|content management policy|content[_ ]filter|safety system|"
    r"responsible ai policy)",
    re.IGNORECASE,
)
#: Upstream error bodies larger than this are passed on unread.
MAX_ERROR_BYTES = 64 * 1024


def _message(body: bytes) -> str:
    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError):
        return body.decode("utf-8", "replace")[:2000]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:2000]
    if isinstance(error, str):
        return error[:2000]
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])[:2000]
    return body.decode("utf-8", "replace")[:2000]


def normalize_error(status: int, body: bytes) -> bytes | None:
    """The normalized body for an upstream 4xx, or None to pass it on as it is."""
    if not 400 <= status < 500 or len(body) > MAX_ERROR_BYTES:
        return None
    message = _message(body)
    if _CONTEXT_OVERFLOW.search(message):
        return error_body(message, "invalid_request_error", "context_length_exceeded", "messages")
    if _CONTENT_POLICY.search(message):
        return error_body(message, "invalid_request_error", "content_policy_violation", None)
    return None
