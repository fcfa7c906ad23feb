"""Reading and writing the JSON values both APIs carry.

Two kinds of reader, one per side of a call:

- a client's request is checked: :class:`Checked` reads a member of the right JSON
  type or raises :class:`~extproc.core.errors.InvalidParameterError` naming it (null
  counts as absent, as both APIs treat it);
- an upstream's response is read leniently (:func:`text`, :func:`count`, ...): a value
  of the wrong type reads as the neutral one, never an exception, since the client has
  already paid for the answer.

Rule: JSON is written compact and UTF-8; a string holding a lone surrogate (which
``json.loads`` accepts from ``"\\ud800"``) is written escaped, never as invalid UTF-8.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from extproc.core.errors import InvalidParameterError, MissingParameterError

__all__ = [
    "GATEWAY_MEMBERS",
    "Checked",
    "as_dict",
    "as_list",
    "count",
    "dumps",
    "encode",
    "json_type",
    "loads",
    "refuse_unknown",
    "request_object",
    "text",
    "tool_id",
]


def json_type(value: Any) -> str:
    """The JSON type name of a decoded value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def wrong_type(param: str, expected: str, value: Any) -> InvalidParameterError:
    return InvalidParameterError(
        f"Invalid type for '{param}': expected {expected}, but got {json_type(value)}.",
        param=param,
    )


@dataclass(frozen=True, slots=True)
class Checked:
    """A request object whose members are read with their types checked.

    ``path`` is the object's own parameter path (``""`` for the body); ``sep`` joins a
    member to it the way the client's API spells paths (OpenAI ``messages.[0].content``,
    Anthropic ``messages.0.content``).
    """

    obj: dict[str, Any]
    path: str = ""
    openai: bool = True

    @classmethod
    def of(cls, value: Any, path: str, *, openai: bool) -> Checked:
        if not isinstance(value, dict):
            raise wrong_type(path, "an object", value)
        return cls(value, path, openai)

    def param(self, key: str | int) -> str:
        if isinstance(key, int):
            step = f"[{key}]" if self.openai else str(key)
            return f"{self.path}.{step}" if self.path else step
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def string(self, key: str) -> str | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise wrong_type(self.param(key), "a string", value)
        return value

    def need(self, key: str) -> str:
        """A required string member."""
        value = self.string(key)
        if value is None:
            raise MissingParameterError(
                f"Missing required parameter: '{self.param(key)}'.", param=self.param(key)
            )
        return value

    def integer(self, key: str, *, minimum: int | None = None) -> int | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong_type(self.param(key), "an integer", value)
        if minimum is not None and value < minimum:
            raise InvalidParameterError(
                f"Invalid '{self.param(key)}': integer below minimum value. Expected a value "
                f">= {minimum}, but got {value} instead.",
                param=self.param(key),
            )
        return value

    def number(self, key: str, low: float, high: float) -> float | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise wrong_type(self.param(key), "a number", value)
        if not low <= value <= high:  # NaN fails both comparisons
            raise InvalidParameterError(
                f"Invalid '{self.param(key)}': expected a number from {low:g} to {high:g}, "
                f"but got {value} instead.",
                param=self.param(key),
            )
        return float(value)

    def boolean(self, key: str) -> bool | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise wrong_type(self.param(key), "a boolean", value)
        return value

    def array(self, key: str) -> list[Any] | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            raise wrong_type(self.param(key), "an array", value)
        return value

    def object(self, key: str) -> dict[str, Any] | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise wrong_type(self.param(key), "an object", value)
        return value

    def child(self, key: str) -> Checked | None:
        value = self.object(key)
        return None if value is None else Checked(value, self.param(key), self.openai)

    def items(self, key: str) -> list[Checked]:
        """The members of an array of objects, each :class:`Checked`."""
        values = self.array(key) or []
        inner = Checked({}, self.param(key), self.openai)
        return [
            Checked.of(value, inner.param(i), openai=self.openai) for i, value in enumerate(values)
        ]

    def content(self, key: str = "content") -> str | list[Checked]:
        """A message's content: a string, or an array of parts (blocks), each
        :class:`Checked`."""
        value = self.obj.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return self.items(key)
        raise wrong_type(self.param(key), "a string or an array of objects", value)

    def invalid(self, key: str | int, message: str) -> InvalidParameterError:
        return InvalidParameterError(message, param=self.param(key))


#: Members the gateway itself reads and strips (LiteLLM's extensions): never refused,
#: never sent on.
GATEWAY_MEMBERS = frozenset({"disable_fallbacks", "litellm_metadata"})


def request_object(body: Any, *, openai: bool) -> Checked:
    if not isinstance(body, dict):
        raise InvalidParameterError("The request body must be a JSON object.")
    return Checked(body, "", openai)


def refuse_unknown(body: dict[str, Any], known: frozenset[str]) -> None:
    """A 400 for a member the API does not define, as both APIs answer one themselves.

    Rule: refused, not dropped: an unknown member may change the answer, and silently
    ignoring it would hide that."""
    for key in body:
        if key not in known and key not in GATEWAY_MEMBERS:
            raise InvalidParameterError(
                f"Unrecognized request argument supplied: {key[:64]}", param=key[:64]
            )


# ---- lenient readers, for upstream responses ----


def text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def count(value: Any) -> int:
    """A token count: a non-negative integer, else 0."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return 0
    return value


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


_TOOL_ID_BAD = re.compile(r"[^A-Za-z0-9_-]")


def tool_id(raw: Any, fallback: str) -> str:
    """A tool-call id Anthropic accepts (``^[A-Za-z0-9_-]+$``): other characters become
    ``_``. Rule: the same function maps a call's id and its result's id, so the pair
    still matches after the mapping."""
    if not isinstance(raw, str) or not raw:
        return fallback
    return _TOOL_ID_BAD.sub("_", raw)


# ---- JSON in and out ----


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(raw: bytes | str) -> Any:
    """Strict JSON (UTF-8, no NaN/Infinity); raises ValueError or RecursionError."""
    return json.loads(raw, parse_constant=_reject_constant)


def dumps(value: Any) -> str:
    """Compact JSON; raises ValueError (NaN) or RecursionError like :func:`json.dumps`."""
    out = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        out.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escape it
        out = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return out


def encode(value: Any) -> bytes:
    return dumps(value).encode("utf-8")
