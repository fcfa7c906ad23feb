from __future__ import annotations

import json

import pytest

from extproc.core.jsonbody import (
    DuplicateKeyError,
    loads_object,
    member_span,
    parse_json,
    replace_member,
    splice,
)

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


SAME_AS_JSON_LOADS = [
    b"{}",
    b" { } ",
    b'{"a":1}',
    b'\t{\r\n"a" : [1, {"b": {"a": 2}}] ,\n"c":"}" }\n',
    b'{"a": 1, "a": 2}',
    b'{"\\u006dodel": "x", "model": "y"}',
    b'{"caf\xc3\xa9": "\xe2\x82\xac", "k": 1e400}',
    b"[1, 2]",
    b'"text"',
    b"null",
    b" 5 ",
]


@pytest.mark.parametrize("raw", SAME_AS_JSON_LOADS)
def test_parse_json_gives_what_json_loads_gives(raw: bytes) -> None:
    assert parse_json(raw).value == json.loads(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": 1,}',
        b"{,}",
        b'{"a" 1}',
        b'{"a": 1 "b": 2}',
        b"{1: 2}",
        b'{"a": 1} x',
        b'{"a": 1}}',
        b'{"a": }',
        b'{"a": 1',
        b'{"a": NaN}',
        b"\xef\xbb\xbf{}",
        b'{"a": "\x01"}',
        b"",
    ],
)
def test_parse_json_rejects_what_json_loads_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any ValueError is a 400
        loads_object(raw)
    with pytest.raises(ValueError):  # noqa: PT011
        parse_json(raw)


def test_parse_json_agrees_with_json_loads_on_mutated_bodies() -> None:
    import random  # noqa: PLC0415

    rng = random.Random(7)
    seed = b'{"model": "m", "a": [1, {"b": "x\\"}], "c": {"d": null}, "e": "\xc3\xa9"}'
    alphabet = b'{}[]:," \\abe1.-\xc3'
    for _ in range(3000):
        raw = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(raw) + 1)
            if rng.random() < 0.5 and raw:
                del raw[min(pos, len(raw) - 1)]
            else:
                raw.insert(pos, rng.choice(alphabet))
        try:
            expected = loads_object(bytes(raw))
        except (ValueError, RecursionError):
            with pytest.raises((ValueError, RecursionError)):
                parse_json(bytes(raw))
            continue
        parsed = parse_json(bytes(raw))
        assert parsed.value == expected
        for name, _, _ in parsed.members:
            span = parsed.span(name)
            assert span is not None
            assert json.loads(bytes(raw)[span[0] : span[1]]) == expected[name]


def test_parse_json_members_and_duplicates() -> None:
    raw = b'{"model": "a", "x": 1, "\\u006dodel": "b", "y": [1], "x": 2}'
    parsed = parse_json(raw)
    assert [m[0] for m in parsed.members] == ["model", "x", "model", "y", "x"]
    assert parsed.duplicates == {"model", "x"}
    assert parsed.value == {"model": "b", "x": 2, "y": [1]}
    span = parsed.span("model")
    assert span is not None
    assert raw[span[0] : span[1]] == b'"b"'  # the last one, the value json.loads keeps


def test_spans_are_bytes_after_multibyte_text() -> None:
    raw = '{"s": "\u20ac\u00e9 \U0001f600", "model": "m", "t": "\u00e9"}'.encode()
    parsed = parse_json(raw)
    for name, value in (("model", b'"m"'), ("t", '"\u00e9"'.encode())):
        span = parsed.span(name)
        assert span is not None
        assert raw[span[0] : span[1]] == value


def test_splice_edits_several_spans_of_one_parse() -> None:
    raw = b'{"stream_options": {"a": 1}, "model": "auto", "k": 1e400}'
    parsed = parse_json(raw)
    model, options = parsed.span("model"), parsed.span("stream_options")
    assert model is not None
    assert options is not None
    out = splice(raw, [(model, "gpt-4o"), (options, {"a": 1, "include_usage": True})])
    assert (
        out == b'{"stream_options": {"a": 1, "include_usage": true}, "model": "gpt-4o", "k": 1e400}'
    )


def test_unique_refuses_a_nested_duplicate_key() -> None:
    parsed = parse_json(
        b'{"tools": [{"f": {"name": "a", "n\\u0061me": "b"}}], "x": {"k": 1, "k": 2}}'
    )
    with pytest.raises(DuplicateKeyError) as info:
        parsed.unique("tools")
    assert info.value.key == "name"
    assert parsed.value["tools"] == [{"f": {"name": "b"}}]  # the first parse keeps the last
    assert parsed.unique("absent") is None
    ok = parse_json(b'{"tools": [{"name": "a"}, {"name": "b"}]}')
    assert ok.unique("tools") == [{"name": "a"}, {"name": "b"}]


@pytest.mark.parametrize(
    ("raw", "left"),
    [
        (b'{"a":1,"x":true,"b":2}', b'{"a":1,"b":2}'),
        (b'{"a":1, "x" : true }', b'{"a":1 }'),
        (b'{"x":true}', b"{}"),
        (b'{"x":true, "m":"\xc3\xa9"}', b'{"m":"\xc3\xa9"}'),
        (b'{"m":"\xc3\xa9","x":false}', b'{"m":"\xc3\xa9"}'),
    ],
)
def test_a_member_is_taken_out_whole(raw: bytes, left: bytes) -> None:
    parsed = parse_json(raw)
    extent = parsed.member_extent("x")
    assert extent is not None
    assert splice(raw, [(extent, b"")]) == left
    assert parse_json(raw).member_extent("absent") is None
