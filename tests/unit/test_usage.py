"""Usage parsing against recorded OpenAI traffic and the Anthropic/Responses shapes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.core.usage import ResponseReader, SSEBuffer, Usage

RECORDED = Path(__file__).resolve().parent.parent / "fixtures" / "openai-recorded"


def recorded(name: str) -> tuple[dict[str, Any], bytes]:
    data = yaml.safe_load((RECORDED / f"{name}.yaml").read_text())
    response = data["interactions"][0]["response"]
    return response, response["body"].encode()


def read(api: Any, body: bytes, *, sse: bool, piece: int = 0, encoding: str = "") -> Usage | None:
    reader = ResponseReader(api, sse=sse, encoding=encoding)
    step = piece or len(body) or 1
    for i in range(0, len(body), step):
        reader.feed(body[i : i + step])
    return reader.finish()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chat-basic", Usage(input_tokens=8, output_tokens=377, reasoning_tokens=320)),
        ("chat-tools", Usage(input_tokens=162, output_tokens=287, reasoning_tokens=256)),
        ("completion-basic", Usage(input_tokens=31, output_tokens=25)),
        ("embeddings-basic", Usage(input_tokens=7)),
    ],
)
@pytest.mark.parametrize("piece", [0, 1, 7, 100])
def test_recorded_json(name: str, expected: Usage, piece: int) -> None:
    _, body = recorded(name)
    assert read("openai", body, sse=False, piece=piece) == expected


@pytest.mark.parametrize("name", ["chat-streaming", "completion-streaming"])
def test_recorded_streams_without_include_usage_report_none(name: str) -> None:
    _, body = recorded(name)
    assert read("openai", body, sse=True, piece=13) is None


def with_usage_chunk(body: bytes) -> bytes:
    """The recorded stream as it looks with stream_options.include_usage: one last chunk
    with empty choices and the usage, before [DONE]."""
    usage = {
        "prompt_tokens": 8,
        "completion_tokens": 90,
        "total_tokens": 98,
        "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 64},
    }
    chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "choices": [], "usage": usage}
    head, done, _ = body.rpartition(b"data: [DONE]")
    assert done
    return head + b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"


@pytest.mark.parametrize("piece", [1, 5, 64, 4096])
def test_recorded_stream_with_usage_chunk(piece: int) -> None:
    _, body = recorded("chat-streaming")
    usage = read("openai", with_usage_chunk(body), sse=True, piece=piece)
    assert usage == Usage(
        input_tokens=5, output_tokens=90, cached_input_tokens=3, reasoning_tokens=64
    )


def sse(*events: tuple[str | None, dict[str, Any]]) -> bytes:
    out = b""
    for name, data in events:
        head = f"event: {name}\n" if name else ""
        out += f"{head}data: {json.dumps(data)}\n\n".encode()
    return out


def test_responses_api_json_and_stream() -> None:
    usage = {
        "input_tokens": 120,
        "input_tokens_details": {"cached_tokens": 100},
        "output_tokens": 50,
        "output_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 170,
    }
    expected = Usage(
        input_tokens=20, output_tokens=50, cached_input_tokens=100, reasoning_tokens=20
    )
    body = json.dumps({"object": "response", "usage": usage}).encode()
    assert read("openai", body, sse=False) == expected
    stream = sse(
        ("response.created", {"type": "response.created", "response": {"usage": None}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "hi"}),
        ("response.completed", {"type": "response.completed", "response": {"usage": usage}}),
    )
    assert read("openai", stream, sse=True, piece=9) == expected


def test_anthropic_json_and_stream() -> None:
    usage = {
        "input_tokens": 12,
        "output_tokens": 40,
        "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 200,
    }
    expected = Usage(
        input_tokens=12, output_tokens=40, cached_input_tokens=1000, cache_creation_tokens=200
    )
    assert (
        read("anthropic", json.dumps({"type": "message", "usage": usage}).encode(), sse=False)
        == expected
    )
    start = {**usage, "output_tokens": 1}
    stream = sse(
        ("message_start", {"type": "message_start", "message": {"usage": start}}),
        ("content_block_delta", {"type": "content_block_delta", "delta": {"text": "usage"}}),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 25}}),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 40}}),
        ("message_stop", {"type": "message_stop"}),
    )
    for piece in (1, 3, 50, 10_000):
        assert read("anthropic", stream, sse=True, piece=piece) == expected


def test_gzip_body_is_inflated() -> None:
    _, body = recorded("chat-basic")
    assert read("openai", gzip.compress(body), sse=False, piece=50, encoding="gzip") == Usage(
        input_tokens=8, output_tokens=377, reasoning_tokens=320
    )


def test_a_decompression_bomb_is_not_inflated_past_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import extproc.core.usage as usage_module  # noqa: PLC0415

    monkeypatch.setattr(usage_module, "MAX_INFLATED_BYTES", 1 << 20)
    bomb = gzip.compress(
        b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "x": "' + b"0" * (8 << 20)
    )
    assert len(bomb) < 64 * 1024  # 8 MiB of zeros squeezed small
    reader = ResponseReader("openai", sse=False, encoding="gzip")
    for at in range(0, len(bomb), 4096):
        assert reader.feed(bomb[at : at + 4096]) == []
    assert not reader.is_whole_json()
    assert reader.finish() is None  # unreadable: charged the estimate
    sse = ResponseReader("openai", sse=True, encoding="gzip")
    assert sse.feed(gzip.compress(b"data: " + b"0" * (4 << 20) + b"\n\n")) == []
    assert sse.finish() is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"usage": "lots"}',
        b'{"usage": {"prompt_tokens": "8", "completion_tokens": -1}}',
        b'{"usage": {"prompt_tokens": true}}',
        b"[1, 2]",
        b'{"error": {"message": "x"}}',
    ],
)
def test_junk_reports_no_or_zero_usage(body: bytes) -> None:
    usage = read("openai", body, sse=False)
    assert usage is None or usage == Usage()


def test_sse_buffer_keeps_partial_events_and_crlf() -> None:
    buf = SSEBuffer()
    assert buf.feed(b"data: 1\r\n\r\ndata: ") == [b"data: 1"]
    assert buf.pending == b"data: "
    assert buf.feed(b"2\n\n") == [b"data: 2"]
    assert buf.feed(b"data: 3") == []
    assert buf.flush() == [b"data: 3"]


def test_sse_buffer_bare_cr_and_split_crlf() -> None:
    buf = SSEBuffer()
    # a trailing CR may be half of a CRLF: it is decided by the next piece
    assert buf.feed(b"data: 1\r\r") == []
    assert buf.feed(b"data: 2\r") == [b"data: 1"]  # CR line ends are SSE too
    assert buf.feed(b"\n\r") == []  # "\r\n" split across pieces is one line end
    assert buf.feed(b"\ndata: 3\n\n") == [b"data: 2", b"data: 3"]


def test_sse_buffer_overflow_hands_the_bytes_back() -> None:
    buf = SSEBuffer(limit=100)
    assert buf.feed(b"data: ok\n\n" + b"x" * 60) == [b"data: ok"]
    assert not buf.overflowed
    assert buf.feed(b"y" * 60) == []
    assert buf.overflowed
    assert buf.take_pending() == b"x" * 60 + b"y" * 60
    assert buf.feed(b"data: later\n\n") == []  # passed through untouched from now on


def test_meter_stops_rewriting_a_stream_it_cannot_split() -> None:
    from extproc.core.charges import Charge  # noqa: PLC0415
    from extproc.core.metering import ResponseMeter  # noqa: PLC0415
    from extproc.core.usage import MAX_EVENT_BYTES  # noqa: PLC0415

    charge = Charge("a" * 32, "openai", "chat_completions", "g", "d", True, True, 1, (), ())
    meter = ResponseMeter(charge, content_type="text/event-stream", encoding="")
    assert meter.feed(b'data: {"choices": [], "usage": {}}\n\ndata: {"a"', end=False) == b""
    blob = b"z" * (MAX_EVENT_BYTES + 1)
    out = meter.feed(blob, end=False)
    assert out == b'data: {"a"' + blob  # what was held, then nothing is held any more
    assert meter.feed(b"more", end=True) is None  # untouched


def test_big_json_usage_found_in_the_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    import extproc.core.usage as usage_module  # noqa: PLC0415

    monkeypatch.setattr(usage_module, "MAX_JSON_BYTES", 1000)
    _, body = recorded("embeddings-basic")
    assert len(body) > 1000
    assert read("openai", body, sse=False, piece=100) == Usage(input_tokens=7)


def test_deeply_nested_bodies_are_not_a_crash() -> None:
    from extproc.core.upstream_errors import normalize_error  # noqa: PLC0415

    deep = b"[" * 60_000 + b"]" * 60_000
    assert read("openai", deep, sse=False) is None
    assert read("openai", b"data: " + deep + b"\n\n", sse=True) is None
    assert normalize_error(400, deep[:60_000]) is None


# --- usage an upstream should never send: no usage at all (charged the estimate) ------

HOSTILE = [-1, 1.5, "12", True, False, [3], {"n": 1}, float("inf"), float("nan")]


def _sse_events(*events: Any) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


def _openai_json(usage: Any) -> bytes:
    return json.dumps({"choices": [], "usage": usage}).encode()


def _openai_stream(usage: Any) -> bytes:
    return _sse_events({"choices": [{"delta": {"content": "x"}}]}, {"choices": [], "usage": usage})


def _responses(usage: Any, sse: bool) -> bytes:
    final = {"type": "response.completed", "response": {"status": "completed", "usage": usage}}
    return _sse_events(final) if sse else json.dumps(final["response"]).encode()


def _anthropic_json(usage: Any) -> bytes:
    return json.dumps({"type": "message", "usage": usage}).encode()


def _anthropic_stream(start: Any, delta: Any) -> bytes:
    return _sse_events(
        {"type": "message_start", "message": {"usage": start}},
        {"type": "message_delta", "usage": delta},
    )


@pytest.mark.parametrize("value", HOSTILE, ids=[repr(v) for v in HOSTILE])
@pytest.mark.parametrize(
    ("api", "sse", "build"),
    [
        ("openai", False, lambda v: _openai_json({"prompt_tokens": 10, "completion_tokens": v})),
        ("openai", False, lambda v: _openai_json({"prompt_tokens": v, "completion_tokens": 5})),
        (
            "openai",
            False,
            lambda v: _openai_json(
                {
                    "prompt_tokens": 10,
                    "completion_tokens": 5,
                    "prompt_tokens_details": {"cached_tokens": v},
                }
            ),
        ),
        ("openai", True, lambda v: _openai_stream({"prompt_tokens": 10, "completion_tokens": v})),
        ("openai", False, lambda v: _responses({"input_tokens": v, "output_tokens": 5}, False)),
        ("openai", True, lambda v: _responses({"input_tokens": 10, "output_tokens": v}, True)),
        ("anthropic", False, lambda v: _anthropic_json({"input_tokens": 10, "output_tokens": v})),
        (
            "anthropic",
            True,
            lambda v: _anthropic_stream(
                {"input_tokens": v, "output_tokens": 1}, {"output_tokens": 9}
            ),
        ),
        (
            "anthropic",
            True,
            lambda v: _anthropic_stream(
                {"input_tokens": 10, "output_tokens": 1}, {"output_tokens": v}
            ),
        ),
    ],
    ids=[
        "chat-json-output",
        "chat-json-input",
        "chat-json-cached",
        "chat-sse",
        "responses-json",
        "responses-sse",
        "anthropic-json",
        "anthropic-sse-start",
        "anthropic-sse-delta",
    ],
)
def test_unbelievable_counts_are_no_usage(api: Any, sse: bool, build: Any, value: Any) -> None:
    assert read(api, build(value), sse=sse, piece=5) is None


def test_null_is_an_absent_count() -> None:
    body = _openai_json({"prompt_tokens": 10, "completion_tokens": None, "total_tokens": None})
    assert read("openai", body, sse=False) == Usage(input_tokens=10)
    # but a stream's last word on output that says nothing: no usage
    stream = _anthropic_stream({"input_tokens": 10, "output_tokens": 1}, {"output_tokens": None})
    assert read("anthropic", stream, sse=True) is None


@pytest.mark.parametrize(
    ("api", "usage"),
    [
        ("openai", {}),
        ("openai", {"total_tokens": 9}),
        ("openai", {"prompt_tokens": None, "completion_tokens": None}),
        ("anthropic", {"cache_read_input_tokens": 5}),
        ("openai", "lots"),
    ],
)
def test_usage_naming_no_counts_is_no_usage(api: Any, usage: Any) -> None:
    assert read(api, json.dumps({"usage": usage}).encode(), sse=False) is None


def test_integral_floats_and_huge_counts_are_counts() -> None:
    body = _openai_json({"prompt_tokens": 10.0, "completion_tokens": 10**30})
    assert read("openai", body, sse=False) == Usage(input_tokens=10, output_tokens=10**30)


def test_a_later_good_event_does_not_undo_a_bad_one() -> None:
    """Anthropic's input comes first: a bad message_start must not make it free."""
    body = _anthropic_stream({"input_tokens": -100, "output_tokens": 1}, {"output_tokens": 9})
    body += _sse_events({"type": "message_delta", "usage": {"output_tokens": 10}})
    assert read("anthropic", body, sse=True) is None
