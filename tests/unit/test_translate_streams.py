"""Streamed responses between OpenAI Chat Completions and Anthropic Messages, checked
with each SDK's own decoder, event types and accumulation."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import pytest

from extproc.core.translate import ChatToMessagesStream, MessagesToChatStream
from extproc.core.usage import MAX_EVENT_BYTES
from tests.unit.translate_support import (
    DOCUMENTED,
    RECORDED,
    SYNTHETIC,
    accumulate_completion,
    accumulate_message,
    anthropic_events,
    anthropic_sse,
    openai_chunks,
    openai_sse,
    response_body,
    run,
)

SPLITS = [("whole", 0), ("bytes", 0), ("random", 1), ("random", 2), ("random", 3)]
IDS = [f"{how}-{seed}" for how, seed in SPLITS]


def to_anthropic(data: bytes, how: str = "whole", seed: int = 0) -> bytes:
    return run(ChatToMessagesStream("claude-sonnet-4-5"), data, how, seed)


def to_openai(
    data: bytes, how: str = "whole", seed: int = 0, *, include_usage: bool = True
) -> bytes:
    stream = MessagesToChatStream("gpt-4.1", created=1_755_137_933, include_usage=include_usage)
    return run(stream, data, how, seed)


def chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {
        "id": "chatcmpl-7",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4.1",
        "choices": choices,
        **extra,
    }


def recorded_text() -> str:
    texts = []
    for line in response_body(RECORDED, "chat-streaming").split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                texts.append(choice["delta"].get("content") or "")
    return "".join(texts)


def with_usage(body: bytes) -> bytes:
    usage = {
        "prompt_tokens": 8,
        "completion_tokens": 90,
        "total_tokens": 98,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    head, done, _ = body.rpartition(b"data: [DONE]")
    assert done
    return head + openai_sse(chunk(usage=usage))


# ---- OpenAI upstream, Anthropic client ----


@pytest.mark.parametrize(("how", "seed"), SPLITS, ids=IDS)
def test_recorded_text_stream(how: str, seed: int) -> None:
    raw = to_anthropic(response_body(RECORDED, "chat-streaming"), how, seed)
    assert raw == to_anthropic(response_body(RECORDED, "chat-streaming"))  # however it is cut
    kinds = [e["type"] for e in anthropic_events(raw)]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    message = accumulate_message(raw)
    assert message.id == "msg_chatcmpl-C4HqHBe4xca0k0EzsCnf1t6V3YFXp"
    assert message.model == "claude-sonnet-4-5"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == recorded_text()  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (0, 0)  # none was sent


def test_crlf_line_ends() -> None:
    body = response_body(RECORDED, "chat-streaming")
    assert to_anthropic(body.replace(b"\n", b"\r\n"), "bytes") == to_anthropic(body)


@pytest.mark.parametrize(("how", "seed"), SPLITS, ids=IDS)
def test_usage_chunk_after_the_finish(how: str, seed: int) -> None:
    message = accumulate_message(
        to_anthropic(with_usage(response_body(RECORDED, "chat-streaming")), how, seed)
    )
    assert message.usage.input_tokens == 5
    assert message.usage.cache_read_input_tokens == 3
    assert message.usage.output_tokens == 90


def test_message_delta_waits_for_the_usage_chunk() -> None:
    stream = ChatToMessagesStream("c")
    first = stream.feed(
        openai_sse(chunk({"role": "assistant", "content": "Hi"}), chunk({}, "stop"), done=False)
    )
    assert b"message_delta" not in first
    usage = {"prompt_tokens": 4, "completion_tokens": 2}
    last = stream.feed(openai_sse(chunk(usage=usage), done=False))
    assert [e["type"] for e in anthropic_events(last)] == [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert stream.feed(b"data: [DONE]\n\n") + stream.finish() == b""
    assert accumulate_message(first + last).usage.input_tokens == 4


@pytest.mark.parametrize(("how", "seed"), SPLITS, ids=IDS)
def test_synthetic_parallel_tool_calls(how: str, seed: int) -> None:
    raw = to_anthropic(response_body(SYNTHETIC, "openai-streaming-tools"), how, seed)
    message = accumulate_message(raw)
    assert [(b.type, b.id, b.name, b.input) for b in message.content] == [  # type: ignore[union-attr]
        (
            "tool_use",
            "call_DdmO9pD3xa9XTPNJ32zg2hcA",
            "get_current_weather",
            {"location": "Boston, MA"},
        ),
        (
            "tool_use",
            "call_ABaB6J5dG0RZm8yuy8RwNRqr",
            "get_current_weather",
            {"location": "Tokyo", "unit": "celsius"},
        ),
    ]
    assert message.stop_reason == "tool_use"
    assert message.usage.input_tokens == 82 - 64
    assert message.usage.cache_read_input_tokens == 64
    assert message.usage.output_tokens == 52
    starts = [e for e in anthropic_events(raw) if e["type"] == "content_block_start"]
    assert [e["index"] for e in starts] == [0, 1]


def test_text_then_a_tool_call_and_a_finish_with_usage_in_one_chunk() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 3}
    call = {
        "index": 0,
        "id": "call 1",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a"'},
    }
    data = openai_sse(
        chunk({"role": "assistant", "content": "Let me "}),
        chunk({"content": "check.", "tool_calls": [call]}),
        chunk(
            {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
            "tool_calls",
            usage=usage,
        ),
    )
    raw = to_anthropic(data, "bytes")
    message = accumulate_message(raw)
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Let me check."  # type: ignore[union-attr]
    assert (message.content[1].id, message.content[1].input) == ("call_1", {"a": 1})  # type: ignore[union-attr]
    assert (message.stop_reason, message.usage.input_tokens) == ("tool_use", 10)
    assert anthropic_events(raw)[-1] == {"type": "message_stop"}


def test_a_tool_call_fragment_after_the_next_block_keeps_its_index() -> None:
    def call(index: int, arguments: str, name: str | None = None) -> dict[str, Any]:
        fn = {"arguments": arguments} | ({"name": name} if name else {})
        return {
            "index": index,
            **({"id": f"c{index}", "type": "function"} if name else {}),
            "function": fn,
        }

    data = openai_sse(
        chunk({"tool_calls": [call(0, '{"x":', "f")]}),
        chunk({"tool_calls": [call(1, '{"y": 2}', "g")]}),
        chunk({"tool_calls": [call(0, " 1}")]}),
        chunk({}, "tool_calls"),
    )
    message = accumulate_message(to_anthropic(data))
    assert [b.input for b in message.content] == [{"x": 1}, {"y": 2}]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("delta", "finish", "stop"),
    [
        ({"refusal": "I can't help with that."}, "stop", "refusal"),
        ({"content": "x"}, "content_filter", "refusal"),
        ({"content": "x"}, "length", "max_tokens"),
    ],
)
def test_stop_reasons(delta: dict[str, Any], finish: str, stop: str) -> None:
    message = accumulate_message(to_anthropic(openai_sse(chunk(delta), chunk({}, finish))))
    assert message.stop_reason == stop


def test_an_openai_error_mid_stream() -> None:
    error = {"error": {"message": "The server had an error", "type": "server_error", "code": None}}
    data = (
        openai_sse(chunk({"content": "Hel"}), done=False) + b"data: " + json.dumps(error).encode()
    )
    data += b"\n\n" + openai_sse(chunk({"content": "lo"}))
    events = anthropic_events(to_anthropic(data, "bytes"))
    assert events[-1] == {
        "type": "error",
        "error": {"type": "api_error", "message": "The server had an error"},
    }
    assert [e["type"] for e in events].count("error") == 1


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"data: [DONE]\n\n",
        openai_sse(chunk({"content": "cut short"}), done=False),
        b": keep-alive\n\n" + openai_sse(chunk(usage={"prompt_tokens": 1}), done=False),
    ],
)
def test_an_upstream_that_ends_early_ends_in_an_error(data: bytes) -> None:
    events = anthropic_events(to_anthropic(data))
    assert events[-1]["type"] == "error"
    assert "ended before" in events[-1]["error"]["message"]


def test_done_without_a_finish_reason_closes_the_message() -> None:
    message = accumulate_message(to_anthropic(openai_sse(chunk({"content": "ok"}))))
    assert message.stop_reason == "end_turn"


def test_noise_is_skipped() -> None:
    data = (
        b": comment\n\nevent: ping\n\ndata: not json\n\ndata: [1, 2]\n\ndata: \xff\xfe\n\n"
        + openai_sse(chunk({"content": "ok"}), chunk({}, "stop"))
    )
    assert accumulate_message(to_anthropic(data)).content[0].text == "ok"  # type: ignore[union-attr]


def test_a_lone_surrogate_is_written_escaped() -> None:
    data = b'data: {"choices": [{"index": 0, "delta": {"content": "a\\ud800b"}}]}\n\n' + openai_sse(
        chunk({}, "stop")
    )
    raw = to_anthropic(data)
    raw.decode("utf-8")  # valid UTF-8
    assert b"a\\ud800b" in raw


@pytest.mark.parametrize("translator", ["openai", "anthropic"])
def test_an_event_too_large_stops_the_stream(translator: str) -> None:
    stream: ChatToMessagesStream | MessagesToChatStream
    if translator == "openai":
        stream = ChatToMessagesStream("c")
        head = openai_sse(chunk({"content": "ok"}), done=False)
    else:
        stream = MessagesToChatStream("g", created=1, include_usage=True)
        head = anthropic_sse({"type": "message_start", "message": {"id": "msg_1", "usage": {}}})
    out = stream.feed(head)
    piece = b"data: " + b"x" * 65536
    for _ in range((MAX_EVENT_BYTES // len(piece)) + 2):
        out += stream.feed(piece)
    assert len(stream._buffer.pending) == 0  # nothing held after the overflow
    assert stream.feed(b"\n\n" + head) + stream.finish() == b""
    assert b"larger than 1048576 bytes" in out
    # and one complete event that large, in one piece
    again = (
        ChatToMessagesStream("c")
        if translator == "openai"
        else MessagesToChatStream("g", created=1, include_usage=False)
    )
    assert b"larger than" in again.feed(b"data: " + b"y" * (MAX_EVENT_BYTES + 1) + b"\n\n")


def sdk_stream(raw: bytes, content_type: str = "text/event-stream") -> httpx.Client:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": content_type}, content=raw)

    return httpx.Client(transport=httpx.MockTransport(answer))


def test_the_anthropic_sdk_streams_the_translation() -> None:
    raw = to_anthropic(response_body(SYNTHETIC, "openai-streaming-tools"), "random", 7)
    client = anthropic.Anthropic(
        api_key="k", base_url="http://upstream", http_client=sdk_stream(raw)
    )
    with client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        message = stream.get_final_message()
    assert [b.input for b in message.content] == [  # type: ignore[union-attr]
        {"location": "Boston, MA"},
        {"location": "Tokyo", "unit": "celsius"},
    ]
    assert message.stop_reason == "tool_use"


# ---- Anthropic upstream, OpenAI client ----


@pytest.mark.parametrize(("how", "seed"), SPLITS, ids=IDS)
def test_documented_text_stream(how: str, seed: int) -> None:
    raw = to_openai(response_body(DOCUMENTED, "messages-streaming"), how, seed)
    assert raw == to_openai(response_body(DOCUMENTED, "messages-streaming"))
    chunks = openai_chunks(raw)
    first = chunks[0]
    assert isinstance(first, dict)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk = chunks[-2]
    assert isinstance(usage_chunk, dict)
    assert usage_chunk["choices"] == []
    completion = accumulate_completion(raw)
    assert completion.id == "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"
    assert (completion.model, completion.created) == ("gpt-4.1", 1_755_137_933)
    assert completion.choices[0].message.content == "Hello! How can I help?"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (33, 15)
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 8


@pytest.mark.parametrize(("how", "seed"), SPLITS, ids=IDS)
def test_documented_tool_stream(how: str, seed: int) -> None:
    body = response_body(DOCUMENTED, "messages-streaming-tools")
    completion = accumulate_completion(to_openai(body.replace(b"\n", b"\r\n"), how, seed))
    message = completion.choices[0].message
    assert message.content == "Okay, let's check the weather for San Francisco, CA:"  # no thinking
    assert message.tool_calls is not None
    [call] = message.tool_calls
    assert call.id == "toolu_01T1x1fJ34qAmk2tNTrN7Up6"
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "San Francisco, CA"}
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage is not None
    # message_delta's cumulative input counts overwrite message_start's
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (512, 89)


def test_tool_call_chunks_name_the_call_first() -> None:
    chunks = openai_chunks(to_openai(response_body(DOCUMENTED, "messages-streaming-tools")))
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if isinstance(c, dict) and c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert calls[0] == {
        "index": 0,
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert all(set(c) == {"index", "function"} for c in calls[1:])


def test_without_include_usage_there_is_no_usage_chunk() -> None:
    raw = to_openai(response_body(DOCUMENTED, "messages-streaming"), include_usage=False)
    assert all(c == "[DONE]" or c["choices"] for c in openai_chunks(raw))  # type: ignore[index]
    assert accumulate_completion(raw).usage is None


def test_an_anthropic_error_event() -> None:
    raw = to_openai(response_body(DOCUMENTED, "messages-streaming-error"), "bytes")
    chunks = openai_chunks(raw)
    assert chunks[-1] == {
        "error": {
            "message": "Overloaded",
            "type": "server_error",
            "param": None,
            "code": "overloaded",
        }
    }
    assert "[DONE]" not in chunks
    client = openai.OpenAI(api_key="k", base_url="http://upstream", http_client=sdk_stream(raw))
    stream = client.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    texts: list[str] = []

    def drain() -> None:
        for part in stream:
            texts.append(part.choices[0].delta.content or "" if part.choices else "")

    with pytest.raises(openai.APIError, match="Overloaded"):
        drain()
    assert "".join(texts) == "Once upon"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        anthropic_sse({"type": "message_start", "message": {"id": "msg_1", "usage": {}}}),
        anthropic_sse({"type": "ping"}),
    ],
)
def test_an_anthropic_stream_that_ends_early(data: bytes) -> None:
    chunks = openai_chunks(to_openai(data))
    last = chunks[-1]
    assert isinstance(last, dict)
    assert "ended before" in last["error"]["message"]


def test_message_delta_without_message_stop_still_finishes() -> None:
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {"id": "msg_1", "usage": {"input_tokens": 3, "output_tokens": 0}},
        },
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens"},
            "usage": {"output_tokens": 2},
        },
    ]
    completion = accumulate_completion(to_openai(anthropic_sse(*events)))
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 5


def test_the_openai_sdk_streams_the_translation() -> None:
    raw = to_openai(response_body(DOCUMENTED, "messages-streaming-tools"), "random", 5)
    client = openai.OpenAI(api_key="k", base_url="http://upstream", http_client=sdk_stream(raw))
    with client.chat.completions.stream(
        model="gpt-4.1", messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        completion = stream.get_final_completion()
    assert completion.choices[0].message.tool_calls is not None
    assert (
        completion.choices[0].message.tool_calls[0].function.arguments
        == '{"location": "San Francisco, CA"}'
    )


# ---- round trips ----


def calls(completion: openai.types.chat.ChatCompletion) -> list[tuple[str, str, Any]]:
    dumped = completion.choices[0].message.model_dump()
    return [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in dumped["tool_calls"] or []
    ]


@pytest.mark.parametrize(
    "body",
    [
        with_usage(response_body(RECORDED, "chat-streaming")),
        response_body(SYNTHETIC, "openai-streaming-tools"),
    ],
    ids=["text", "tools"],
)
def test_openai_stream_round_trip(body: bytes) -> None:
    original = accumulate_completion(body)
    back = accumulate_completion(to_openai(to_anthropic(body, "random", 3), "random", 4))
    # the first chunk opens with content "" (as OpenAI's text streams do)
    assert (back.choices[0].message.content or None) == original.choices[0].message.content
    assert back.choices[0].finish_reason == original.choices[0].finish_reason
    assert calls(back) == calls(original)
    assert original.usage is not None
    assert back.usage is not None
    assert (back.usage.prompt_tokens, back.usage.completion_tokens) == (
        original.usage.prompt_tokens,
        original.usage.completion_tokens,
    )


@pytest.mark.parametrize("name", ["messages-streaming", "messages-streaming-tools"])
def test_anthropic_stream_round_trip(name: str) -> None:
    body = response_body(DOCUMENTED, name)
    original = accumulate_message(body)
    back = accumulate_message(to_anthropic(to_openai(body, "bytes"), "bytes"))
    keep = [b for b in original.content if b.type != "thinking"]
    assert [b.model_dump() for b in back.content] == [b.model_dump() for b in keep]
    assert back.stop_reason == original.stop_reason
    assert back.usage.output_tokens == original.usage.output_tokens
    assert back.usage.cache_read_input_tokens == (original.usage.cache_read_input_tokens or 0)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ({"error": "a bare string"}, "a bare string"),
        ({"error": {"type": "server_error"}}, "Upstream error"),
        ({"object": "error", "message": "bad input", "type": "BadRequestError"}, "bad input"),
    ],
)
def test_other_error_chunks(error: dict[str, Any], message: str) -> None:
    events = anthropic_events(to_anthropic(openai_sse(chunk({"content": "x"}), error)))
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["message"] == message
