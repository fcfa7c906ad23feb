"""Whole responses between OpenAI Chat Completions and Anthropic Messages."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.core.translate import chat_response_to_message, message_to_chat_response
from tests.unit.translate_support import (
    DOCUMENTED,
    RECORDED,
    check_completion,
    check_message,
    response_body,
)


def to_message(resp: dict[str, Any]) -> dict[str, Any]:
    out = chat_response_to_message(resp, "claude-sonnet-4-5")
    check_message(out)
    return out


def to_completion(resp: dict[str, Any]) -> dict[str, Any]:
    out = message_to_chat_response(resp, "gpt-4.1", created=1_755_133_833)
    check_completion(out)
    return out


def completion(message: dict[str, Any], finish: Any = "stop", usage: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4.1",
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def test_recorded_basic() -> None:
    resp = json.loads(response_body(RECORDED, "chat-basic"))
    out = to_message(resp)
    assert out["id"] == "msg_chatcmpl-C4Gm9xikLXbgE8He0BHWeoM03aa72"
    assert out["model"] == "claude-sonnet-4-5"
    assert out["content"] == [{"type": "text", "text": resp["choices"][0]["message"]["content"]}]
    assert out["stop_reason"] == "end_turn"
    assert out["stop_sequence"] is None
    assert out["usage"] == {
        "input_tokens": 8,
        "output_tokens": 377,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    }


def test_recorded_tools() -> None:
    out = to_message(json.loads(response_body(RECORDED, "chat-tools")))
    assert out["content"] == [
        {
            "type": "tool_use",
            "id": "call_8fxy20OEu9ulvvaa5b5CzVA4",
            "name": "get_current_weather",
            "input": {"location": "Boston, MA", "unit": "fahrenheit"},
        }
    ]
    assert out["stop_reason"] == "tool_use"
    assert out["usage"]["input_tokens"] == 162


def test_cached_tokens_are_cache_reads() -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 60},
    }
    out = to_message(completion({"content": "x"}, usage=usage))
    assert out["usage"] == {
        "input_tokens": 40,
        "output_tokens": 5,
        "cache_read_input_tokens": 60,
        "cache_creation_input_tokens": 0,
    }


@pytest.mark.parametrize(
    ("finish", "message", "stop"),
    [
        ("stop", {"content": "x"}, "end_turn"),
        ("length", {"content": "x"}, "max_tokens"),
        ("tool_calls", {"content": None}, "tool_use"),
        ("function_call", {"content": None}, "tool_use"),
        ("content_filter", {"content": "x"}, "refusal"),
        ("stop", {"content": None, "refusal": "I can't help with that."}, "refusal"),
        (None, {"content": "x"}, "end_turn"),
        ("made_up", {"content": "x"}, "end_turn"),
        (
            "stop",
            {
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ]
            },
            "tool_use",
        ),
    ],
)
def test_stop_reasons(finish: Any, message: dict[str, Any], stop: str) -> None:
    assert to_message(completion(message, finish))["stop_reason"] == stop


def test_unparseable_arguments_and_odd_ids() -> None:
    calls = [
        {
            "id": "functions.Bash:0",
            "type": "function",
            "function": {"name": "a", "arguments": "{not json"},
        },
        {"id": "", "type": "function", "function": {"name": "b", "arguments": "[1, 2]"}},
        {"type": "function", "function": {"name": "c", "arguments": '{"deep": ' * 5000}},
    ]
    out = to_message(completion({"content": "Calling.", "tool_calls": calls}, "tool_calls"))
    assert out["content"] == [
        {"type": "text", "text": "Calling."},
        {"type": "tool_use", "id": "functions_Bash_0", "name": "a", "input": {}},
        {"type": "tool_use", "id": "toolu_1", "name": "b", "input": {}},
        {"type": "tool_use", "id": "toolu_2", "name": "c", "input": {}},
    ]


@pytest.mark.parametrize(
    "resp",
    [
        {},
        {"choices": None, "usage": "lots"},
        {"id": 5, "choices": [{"message": None}]},
        {
            "choices": [
                {"index": 0, "message": {"content": 7, "tool_calls": "x"}, "finish_reason": 3}
            ]
        },
        {"choices": [{"message": {"content": [{"type": "text", "text": "part"}]}}]},
        {"usage": {"prompt_tokens": -1, "completion_tokens": 2.5}},
    ],
)
def test_malformed_chat_responses_still_make_a_message(resp: dict[str, Any]) -> None:
    out = to_message(resp)
    assert out["type"] == "message"
    assert out["id"].startswith("msg_")


def test_documented_basic() -> None:
    resp = json.loads(response_body(DOCUMENTED, "messages-basic"))
    out = to_completion(resp)
    assert out == {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "object": "chat.completion",
        "created": 1_755_133_833,
        "model": "gpt-4.1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi! How can I help?", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 9,
            "total_tokens": 21,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


def test_documented_tools() -> None:
    out = to_completion(json.loads(response_body(DOCUMENTED, "messages-tools")))
    message = out["choices"][0]["message"]
    assert message["content"] == "Let me convert that for you."
    assert message["tool_calls"] == [
        {
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "type": "function",
            "function": {
                "name": "get_weather",
                "arguments": '{"location":"San Francisco, CA","unit":"celsius"}',
            },
        }
    ]
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    # prompt = input + cache reads + cache writes; cached = the reads
    assert out["usage"] == {
        "prompt_tokens": 600,
        "completion_tokens": 71,
        "total_tokens": 671,
        "prompt_tokens_details": {"cached_tokens": 100},
    }


def message(content: list[dict[str, Any]], stop: Any = "end_turn") -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": content,
        "stop_reason": stop,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        (None, "stop"),
        ("new_reason", "stop"),
    ],
)
def test_finish_reasons(stop: Any, finish: str) -> None:
    out = to_completion(message([{"type": "text", "text": "x"}], stop))
    assert out["choices"][0]["finish_reason"] == finish


def test_only_tool_use_has_no_content_and_thinking_is_dropped() -> None:
    blocks: list[dict[str, Any]] = [
        {"type": "thinking", "thinking": "hmm", "signature": "s"},
        {"type": "redacted_thinking", "data": "x"},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, {"b": None}]}},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
    ]
    out = to_completion(message(blocks, "tool_use"))["choices"][0]["message"]
    assert out["content"] is None
    assert [json.loads(c["function"]["arguments"]) for c in out["tool_calls"]] == [
        {"a": [1, {"b": None}]}
    ]


def test_texts_are_joined() -> None:
    blocks = [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]
    assert to_completion(message(blocks))["choices"][0]["message"]["content"] == "one two"
    assert to_completion(message([]))["choices"][0]["message"]["content"] == ""


@pytest.mark.parametrize(
    "resp",
    [
        {},
        {"content": "text", "usage": None},
        {"content": [None, 5, {"type": "tool_use", "input": "x"}, {"type": "text", "text": 3}]},
        {"content": [{"type": "tool_use", "id": 1, "name": None, "input": {"x": float("nan")}}]},
        {"usage": {"input_tokens": "1", "output_tokens": True}},
    ],
)
def test_malformed_messages_still_make_a_completion(resp: dict[str, Any]) -> None:
    out = to_completion(resp)
    assert out["object"] == "chat.completion"


@pytest.mark.parametrize("name", ["chat-basic", "chat-tools"])
def test_round_trip_openai_response(name: str) -> None:
    resp = json.loads(response_body(RECORDED, name))
    back = to_completion(to_message(resp))
    original, returned = resp["choices"][0], back["choices"][0]
    assert returned["finish_reason"] == original["finish_reason"]
    assert returned["message"]["content"] == original["message"]["content"]
    assert [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in returned["message"].get("tool_calls", [])
    ] == [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in original["message"].get("tool_calls", [])
    ]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert back["usage"][key] == resp["usage"][key]


@pytest.mark.parametrize("name", ["messages-basic", "messages-tools"])
def test_round_trip_anthropic_response(name: str) -> None:
    resp = json.loads(response_body(DOCUMENTED, name))
    back = to_message(to_completion(resp))
    assert back["id"] == resp["id"]
    assert back["stop_reason"] == resp["stop_reason"]
    assert back["content"] == resp["content"]
    # cache writes have no OpenAI field: they come back as plain input
    usage = resp["usage"]
    assert back["usage"]["cache_read_input_tokens"] == usage["cache_read_input_tokens"]
    assert (
        back["usage"]["input_tokens"]
        == usage["input_tokens"] + usage["cache_creation_input_tokens"]
    )
    assert back["usage"]["output_tokens"] == usage["output_tokens"]
