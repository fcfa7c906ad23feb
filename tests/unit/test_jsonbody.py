from __future__ import annotations

import json

import pytest

from extproc.jsonbody import loads_object, member_span, replace_member

SPAN_CASES = [
    (b'{"model":"auto"}', b'"auto"'),
    (b'  {  "model"  :  "auto"  ,  "x": 1 }  ', b'"auto"'),
    (b'{"a": {"model": "nested"}, "model": "top"}', b'"top"'),
    (b'{"messages": [{"content": "\\"model\\": \\"fake\\""}], "model": "m"}', b'"m"'),
    (b'{"model": "first", "model": "second"}', b'"second"'),  # last wins, as json.loads
    (b'{"mod\\u0065l": "escaped-key"}', b'"escaped-key"'),
    (b'{"x": "a\\\\", "model": "after-escaped-backslash"}', b'"after-escaped-backslash"'),
    (b'{"model": "caf\xc3\xa9 \\u00e9"}', b'"caf\xc3\xa9 \\u00e9"'),
    (b'{"model": 5}', b"5"),
    (b'{"model": null}', b"null"),
    (b'{"model": {"a": [1, 2]}}', b'{"a": [1, 2]}'),
    (b'{"model":"m"\n}', b'"m"'),
]


@pytest.mark.parametrize(("raw", "value"), SPAN_CASES)
def test_member_span(raw: bytes, value: bytes) -> None:
    span = member_span(raw, "model")
    assert span is not None
    assert raw[span[0] : span[1]] == value


@pytest.mark.parametrize("raw", [b"{}", b'{"a": {"model": "x"}}', b'{"models": "x"}'])
def test_member_span_absent(raw: bytes) -> None:
    assert member_span(raw, "model") is None


def test_replace_keeps_every_other_byte() -> None:
    raw = b'{"temperature": 1e400, "n": 1.50, "model": "auto", "s": "\\ud800", "k": 1, "k": 2}'
    span = member_span(raw, "model")
    assert span is not None
    out = replace_member(raw, span, "gpt-4o")
    assert out == raw.replace(b'"auto"', b'"gpt-4o"')


def test_replace_escapes_value() -> None:
    raw = b'{"model": "a"}'
    out = replace_member(raw, (10, 13), 'we"ird\nname')
    assert json.loads(out)["model"] == 'we"ird\nname'


@pytest.mark.parametrize(
    "raw", [b"\xff\xfe{}", b'{"a": NaN}', b'{"a": Infinity}', b"{", b"\xef\xbb\xbf{}"]
)
def test_loads_object_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any ValueError is a 400
        loads_object(raw)
