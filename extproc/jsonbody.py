"""Byte-exact edits of a JSON request body.

The gateway rewrites one top-level member (``model``) and must not change anything
else: re-serialising would turn ``1e400`` into ``Infinity``, merge duplicate keys and
re-encode strings. So the body is validated with :func:`json.loads` and then edited
in place, splicing the new value over the old value's byte span.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["add_member", "loads_object", "member_span", "replace_member", "set_member"]

_STRUCTURAL = re.compile(rb'["{}\[\],:]')
_NOT_WS = re.compile(rb"[^ \t\r\n]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_object(raw: bytes) -> Any:
    """Parse strict JSON (UTF-8, no NaN/Infinity); raises ValueError when invalid."""
    text = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    return json.loads(text, parse_constant=_reject_constant)


def _string_end(raw: bytes, start: int) -> int:
    """Index of the quote closing the string that opens at ``start``."""
    pos = start + 1
    while True:
        quote = raw.index(b'"', pos)
        back = quote - 1
        while raw[back] == 0x5C:  # backslash
            back -= 1
        if (quote - 1 - back) % 2 == 0:
            return quote
        pos = quote + 1


def member_span(raw: bytes, name: str) -> tuple[int, int] | None:
    """Byte span of the value of top-level member ``name`` in a valid JSON object.

    With duplicate keys the last one wins, as in :func:`json.loads`.
    """
    depth = 0
    expect_key = False
    key: str | None = None
    value_start = -1
    found: tuple[int, int] | None = None
    pos = 0

    def close(end: int) -> None:
        nonlocal found, key, value_start
        if key == name and value_start >= 0:
            stop = end
            while raw[stop - 1] in b" \t\r\n":
                stop -= 1
            found = (value_start, stop)
        key = None
        value_start = -1

    while True:
        match = _STRUCTURAL.search(raw, pos)
        if match is None:
            return found
        at = match.start()
        char = raw[at]
        if char == 0x22:  # "
            end = _string_end(raw, at)
            if depth == 1 and expect_key:
                key = json.loads(raw[at : end + 1])
                expect_key = False
            pos = end + 1
            continue
        if char in b"{[":
            depth += 1
            if depth == 1:
                expect_key = char == 0x7B
        elif char in b"}]":
            if depth == 1:
                close(at)
            depth -= 1
        elif depth == 1 and char == 0x3A:  # :
            nxt = _NOT_WS.search(raw, at + 1)
            value_start = nxt.start() if nxt else -1
        elif depth == 1 and char == 0x2C:  # ,
            close(at)
            expect_key = True
        pos = at + 1


def replace_member(raw: bytes, span: tuple[int, int], value: Any) -> bytes:
    """``raw`` with the bytes at ``span`` replaced by ``value`` as JSON."""
    encoded = json.dumps(value, ensure_ascii=False).encode("utf-8")
    return raw[: span[0]] + encoded + raw[span[1] :]


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
