"""Byte-exact edits of a JSON request body.

The gateway rewrites one top-level member (``model``) and must not change anything
else: re-serialising would turn ``1e400`` into ``Infinity``, merge duplicate keys and
re-encode strings. So the body is parsed once (:func:`parse_json`: the values by the
C scanner of :mod:`json`, the top-level members and their byte spans on the way) and
then edited in place, splicing new values over old values' byte spans.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DuplicateKeyError",
    "ParsedJson",
    "add_member",
    "loads_object",
    "member_span",
    "parse_json",
    "replace_member",
    "set_member",
    "splice",
]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_object(raw: bytes) -> Any:
    """Parse strict JSON (UTF-8, no NaN/Infinity); raises ValueError when invalid."""
    text = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    return json.loads(text, parse_constant=_reject_constant)


class DuplicateKeyError(ValueError):
    """An object names ``key`` twice."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key[:64]!r}")
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return obj


_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_UNIQUE_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_pairs)


@dataclass(frozen=True, slots=True)
class ParsedJson:
    """A body parsed once: its value and, for an object, where each top-level member
    sits (so the gateway can splice without scanning again)."""

    value: Any
    #: Top-level members in order: (name, start, end) in characters of ``_text``;
    #: names are decoded (``"\u006dodel"`` is ``model``).
    members: tuple[tuple[str, int, int], ...]
    #: Names that occur more than once at the top level (the value holds the last).
    duplicates: frozenset[str]
    _text: str
    #: The body's length in bytes.
    _size: int
    #: Where each member of ``members`` starts (its name's opening quote), in characters.
    _starts: tuple[int, ...] = ()

    def span(self, name: str) -> tuple[int, int] | None:
        """Byte span of the value of top-level member ``name`` (its last occurrence,
        the one ``value`` holds)."""
        for member, start, end in reversed(self.members):
            if member == name:
                if self._size == len(self._text):  # ASCII: characters are bytes
                    return start, end
                # Spans are bytes: count them over the shorter side of the value.
                text = self._text
                width = len(text[start:end].encode("utf-8"))
                if start <= len(text) - end:
                    first = len(text[:start].encode("utf-8"))
                    return first, first + width
                last = self._size - len(text[end:].encode("utf-8"))
                return last - width, last
        return None

    def _bytes_at(self, pos: int) -> int:
        if self._size == len(self._text):
            return pos
        return len(self._text[:pos].encode("utf-8"))

    def member_extent(self, name: str) -> tuple[int, int] | None:
        """Byte span of the whole last top-level member ``name`` (its name, value and
        one comma beside it), for taking it out with :func:`splice` and ``b""``; None
        if absent. The rest of the body keeps its bytes."""
        for index in range(len(self.members) - 1, -1, -1):
            member, _, end = self.members[index]
            if member != name:
                continue
            start = self._starts[index]
            if index + 1 < len(self.members):
                end = self._starts[index + 1]  # through the comma after it
            elif index > 0:
                start = self.members[index - 1][2]  # from the comma before it
            return self._bytes_at(start), self._bytes_at(end)
        return None

    def unique(self, name: str) -> Any:
        """The value of top-level member ``name`` decoded again, refusing an object at
        any depth that names a key twice (:class:`DuplicateKeyError`); None if absent.

        For the few members whose nested keys a decision reads (tools): it costs a
        second decode of that member only.
        """
        for member, start, end in reversed(self.members):
            if member == name:
                return _UNIQUE_DECODER.decode(self._text[start:end])
        return None


def _skip_ws(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    return match.end() if match else pos


def parse_json(raw: bytes) -> ParsedJson:
    """Parse strict JSON like :func:`loads_object`, in one pass that also records the
    top-level members of an object and their value spans.

    Values are decoded by the C scanner of :mod:`json`; only the top-level commas and
    colons are stepped over here. Raises ValueError (or RecursionError) when invalid.
    """
    text = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    pos = _skip_ws(text, 0)
    if not text.startswith("{", pos):
        return ParsedJson(_DECODER.decode(text), (), frozenset(), text, len(raw))
    value: dict[str, Any] = {}
    members: list[tuple[str, int, int]] = []
    starts: list[int] = []
    duplicates: set[str] = set()
    pos = _skip_ws(text, pos + 1)
    if text.startswith("}", pos):
        pos += 1
    else:
        while True:
            if not text.startswith('"', pos):
                raise ValueError(f"expected a member name at {pos}")
            starts.append(pos)
            name, pos = json.decoder.scanstring(text, pos + 1, True)  # type: ignore[attr-defined]
            pos = _skip_ws(text, pos)
            if not text.startswith(":", pos):
                raise ValueError(f"expected ':' at {pos}")
            start = _skip_ws(text, pos + 1)
            item, pos = _DECODER.raw_decode(text, start)
            if name in value:
                duplicates.add(name)
            value[name] = item
            members.append((name, start, pos))
            pos = _skip_ws(text, pos)
            if text.startswith(",", pos):
                pos = _skip_ws(text, pos + 1)
            elif text.startswith("}", pos):
                pos += 1
                break
            else:
                raise ValueError(f"expected ',' or '}}' at {pos}")
    if _skip_ws(text, pos) != len(text):
        raise ValueError(f"extra data at {pos}")
    return ParsedJson(value, tuple(members), frozenset(duplicates), text, len(raw), tuple(starts))


def member_span(raw: bytes, name: str) -> tuple[int, int] | None:
    """Byte span of the value of top-level member ``name`` in a valid JSON object.

    With duplicate keys the last one wins, as in :func:`json.loads`.
    """
    return parse_json(raw).span(name)


def replace_member(raw: bytes, span: tuple[int, int], value: Any) -> bytes:
    """``raw`` with the bytes at ``span`` replaced by ``value`` as JSON."""
    encoded = json.dumps(value, ensure_ascii=False).encode("utf-8")
    return raw[: span[0]] + encoded + raw[span[1] :]


def splice(raw: bytes, edits: list[tuple[tuple[int, int], Any]]) -> bytes:
    """``raw`` with each (span, value) replaced by ``value`` as JSON, or by ``value``
    itself when it is bytes (``b""`` takes a :meth:`ParsedJson.member_extent` out);
    the spans (from one :func:`parse_json`) must not overlap."""
    out = raw
    # Rule: from the last span back, so earlier spans keep their offsets.
    for (start, end), value in sorted(edits, key=lambda edit: edit[0][0], reverse=True):
        if isinstance(value, bytes):
            out = out[:start] + value + out[end:]
        else:
            out = replace_member(out, (start, end), value)
    return out


def add_member(raw: bytes, name: str, value: Any) -> bytes:
    """``raw`` (a valid JSON object with at least one member) with ``name: value``
    appended before its closing brace."""
    end = raw.rindex(b"}")
    member = json.dumps({name: value}, ensure_ascii=False).encode("utf-8")[1:-1]
    return raw[:end] + b"," + member + raw[end:]


def set_member(raw: bytes, name: str, value: Any) -> bytes:
    """``raw`` with top-level member ``name`` set to ``value`` (replaced or appended)."""
    span = member_span(raw, name)
    return add_member(raw, name, value) if span is None else replace_member(raw, span, value)
