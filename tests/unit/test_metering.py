"""The response meter's billing rule: the same response costs the same however the
client reads it."""

from __future__ import annotations

import json

import pytest

from extproc.core.charges import Charge
from extproc.core.metering import ResponseMeter
from extproc.core.usage import Usage

CHAT = Charge(
    "a" * 32,
    "openai",
    "chat_completions",
    "g",
    "d",
    True,
    False,
    10_000,
    (),
    (),
    prompt_tokens=50,
    max_output_tokens=4096,
)
MESSAGES = Charge(
    "b" * 32, "anthropic", "messages", "g", "d", True, False, 10_000, (), (), prompt_tokens=50
)
JSON_BODY = json.dumps(
    {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}}
).encode()
SSE = "text/event-stream"
USAGE_LESS = [b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'] * 4 + [b"data: [DONE]\n\n"]


def feed_all(meter: ResponseMeter, pieces: list[bytes], *, end: bool) -> None:
    for i, piece in enumerate(pieces):
        meter.feed(piece, end=end and i == len(pieces) - 1)


def test_json_is_complete_once_its_content_length_has_passed() -> None:
    meter = ResponseMeter(
        CHAT, content_type="application/json", encoding="", content_length=str(len(JSON_BODY))
    )
    meter.feed(JSON_BODY[:10], end=False)
    assert not meter.complete
    assert meter.billable(CHAT) is None  # left mid-body: the estimate
    meter.feed(JSON_BODY[10:], end=False)  # Envoy's end-of-stream never came
    assert meter.complete
    assert meter.billable(CHAT) == Usage(input_tokens=12, output_tokens=3)


def test_json_without_length_is_complete_once_it_is_whole() -> None:
    meter = ResponseMeter(CHAT, content_type="application/json", encoding="")
    meter.feed(JSON_BODY[:-1], end=False)
    assert not meter.complete
    assert meter.billable(CHAT) is None  # cut off: the estimate
    meter.feed(JSON_BODY[-1:], end=False)  # a chunked body's last byte, no end seen
    assert meter.complete
    assert meter.billable(CHAT) == Usage(input_tokens=12, output_tokens=3)


def test_anthropic_stream_left_after_its_text_pays_for_the_text() -> None:
    """message_start reports one output token before any text: a client leaving
    before message_delta still pays a token per streamed event."""
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}}
    delta = b'event: content_block_delta\ndata: {"type": "content_block_delta"}\n\n'
    meter = ResponseMeter(MESSAGES, content_type=SSE, encoding="")
    feed_all(
        meter, [b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n"], end=False
    )
    feed_all(meter, [delta] * 500, end=False)
    assert meter.billable(MESSAGES) == Usage(input_tokens=9, output_tokens=501)


@pytest.mark.parametrize(
    ("event", "terminal"),
    [
        (b"data: [DONE]", True),
        (b"data:[DONE]", True),
        (b'event: message_stop\ndata: {"type": "message_stop"}', True),
        (b"event: response.completed\ndata: {}", True),
        (b"event: response.incomplete\ndata: {}", True),
        (b'data: {"choices": [{"delta": {"content": "data: [DONE]"}}]}', False),
        (b"event: content_block_delta\ndata: {}", False),
    ],
)
def test_terminal_events(event: bytes, terminal: bool) -> None:
    meter = ResponseMeter(CHAT, content_type=SSE, encoding="")
    meter.feed(event + b"\n\n", end=False)
    assert meter.complete is terminal


def test_usage_less_stream_costs_the_same_ended_or_left_after_done() -> None:
    ended = ResponseMeter(CHAT, content_type=SSE, encoding="")
    feed_all(ended, [*USAGE_LESS, b""], end=True)
    left = ResponseMeter(CHAT, content_type=SSE, encoding="")
    feed_all(left, USAGE_LESS, end=False)
    assert left.complete
    expected = Usage(input_tokens=50, output_tokens=5)
    assert ended.billable(CHAT) == left.billable(CHAT) == expected
    assert ended.usage() is None  # not reported: the settlement counts it as missing


def test_stream_left_midway_pays_for_what_streamed() -> None:
    meter = ResponseMeter(CHAT, content_type=SSE, encoding="")
    feed_all(meter, USAGE_LESS[:2], end=False)
    assert not meter.complete
    assert meter.billable(CHAT) == Usage(input_tokens=50, output_tokens=2)


def test_reported_usage_wins_once_complete() -> None:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 9}}}
    delta = {"type": "message_delta", "usage": {"output_tokens": 30}}
    events = [
        b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n",
        b'event: content_block_delta\ndata: {"type": "content_block_delta"}\n\n',
        b"event: message_delta\ndata: " + json.dumps(delta).encode() + b"\n\n",
        b'event: message_stop\ndata: {"type": "message_stop"}\n\n',
    ]
    partial = ResponseMeter(MESSAGES, content_type=SSE, encoding="")
    feed_all(partial, events[:2], end=False)
    # input reported, no output yet: the output is counted from the stream
    assert partial.billable(MESSAGES) == Usage(input_tokens=9, output_tokens=2)
    whole = ResponseMeter(MESSAGES, content_type=SSE, encoding="")
    feed_all(whole, events, end=False)
    assert whole.complete
    assert whole.billable(MESSAGES) == Usage(input_tokens=9, output_tokens=30)


def test_an_openai_stream_left_after_its_usage_chunk_pays_its_usage() -> None:
    """The usage chunk is the last billable event (only [DONE] follows): a client that
    hangs up after it (a translated Anthropic client reading message_stop) pays the
    reported usage, not one token per event."""
    usage = {"prompt_tokens": 15, "completion_tokens": 6, "total_tokens": 21}
    chunk = b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
    meter = ResponseMeter(CHAT, content_type=SSE, encoding="")
    feed_all(meter, [*USAGE_LESS[:-1], *USAGE_LESS[:-1], chunk], end=False)
    assert meter.complete
    assert meter.billable(CHAT) == Usage(input_tokens=15, output_tokens=6)
