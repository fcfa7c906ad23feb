"""Request bodies between OpenAI Chat Completions and Anthropic Messages."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.core.errors import BadRequestError, MissingParameterError
from extproc.core.translate import chat_to_messages, messages_to_chat
from tests.unit.translate_support import (
    DOCUMENTED,
    RECORDED,
    SYNTHETIC,
    check_chat_request,
    check_messages_request,
    request_body,
)

PNG = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA"
    "60e6kgAAAABJRU5ErkJggg=="
)


def to_messages(body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    out = chat_to_messages(
        {"model": "gpt-4.1", **body, **extra}, "claude-sonnet-4-5", default_max_tokens=4096
    )
    check_messages_request(out)
    return out


def to_chat(body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    base = {"model": "claude-sonnet-4-5", "max_tokens": 512}
    out = messages_to_chat({**base, **body, **extra}, "gpt-4.1")
    check_chat_request(out)
    return out


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


# ---- OpenAI → Anthropic ----


@pytest.mark.parametrize(
    "name", ["chat-basic", "chat-streaming", "chat-tools", "chat-unknown-model"]
)
def test_recorded_openai_requests(name: str) -> None:
    body = request_body(RECORDED, name)
    out = to_messages(body)
    assert out["model"] == "claude-sonnet-4-5"
    assert out["max_tokens"] == 4096
    assert out["messages"][0]["role"] == "user"
    assert out.get("stream", False) == body.get("stream", False)


def test_recorded_tools_request() -> None:
    out = to_messages(request_body(RECORDED, "chat-tools"))
    tool = request_body(RECORDED, "chat-tools")["tools"][0]["function"]
    assert out["tools"] == [
        {
            "name": "get_current_weather",
            "description": tool["description"],
            "input_schema": tool["parameters"],
        }
    ]
    assert out["tool_choice"] == {"type": "auto"}


def test_recorded_bad_request_is_refused() -> None:
    # max_tokens 0 (and a null content): the client's error, named
    with pytest.raises(BadRequestError) as caught:
        to_messages(request_body(RECORDED, "chat-bad-request"))
    assert caught.value.param in ("max_tokens", "messages.[0].content")


def test_synthetic_stream_request_drops_stream_options() -> None:
    out = to_messages(request_body(SYNTHETIC, "openai-streaming-tools"))
    assert out["stream"] is True
    assert "stream_options" not in out


CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture, and the weather?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        ],
    },
    {
        "role": "assistant",
        "content": "A cat. Checking the weather.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "call.2", "type": "function", "function": {"name": "time", "arguments": ""}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call.2", "content": [{"type": "text", "text": "noon"}]},
    {"role": "user", "content": "Thanks!"},
    {"role": "user", "content": "And tomorrow?"},
]
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "time"}},
]


def test_conversation() -> None:
    out = to_messages({"messages": CONVERSATION, "tools": TOOLS})
    assert out["system"] == [
        {"type": "text", "text": "Be brief."},
        {"type": "text", "text": "Use metric units."},
    ]
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    first, calls, results = (m["content"] for m in out["messages"])
    assert first == [
        {"type": "text", "text": "What is in this picture, and the weather?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    assert calls == [
        {"type": "text", "text": "A cat. Checking the weather."},
        {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "time", "input": {}},
    ]
    # consecutive tool results and user messages are one user turn, results first
    assert results == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "18 C"},
        {
            "type": "tool_result",
            "tool_use_id": "call_2",
            "content": [{"type": "text", "text": "noon"}],
        },
        {"type": "text", "text": "Thanks!"},
        {"type": "text", "text": "And tomorrow?"},
    ]
    assert out["tools"][1] == {"name": "time", "input_schema": {"type": "object"}}


CHAT_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "one system string",
        {"messages": [{"role": "system", "content": "S"}, user("u")]},
        {"system": "S"},
    ),
    (
        "max_completion_tokens wins",
        {"max_tokens": 5, "max_completion_tokens": 7},
        {"max_tokens": 7},
    ),
    ("max_tokens", {"max_tokens": 5}, {"max_tokens": 5}),
    ("stop string", {"stop": "END"}, {"stop_sequences": ["END"]}),
    ("stop list", {"stop": ["a", "b"]}, {"stop_sequences": ["a", "b"]}),
    ("temperature", {"temperature": 0.3, "top_p": 0.9}, {"temperature": 0.3, "top_p": 0.9}),
    ("temperature clamped", {"temperature": 1.7}, {"temperature": 1.0}),
    ("stream", {"stream": True, "stream_options": {"include_usage": True}}, {"stream": True}),
    ("user", {"user": "user-123"}, {"metadata": {"user_id": "user-123"}}),
    ("safety_identifier", {"safety_identifier": "h-1"}, {"metadata": {"user_id": "h-1"}}),
    ("e-mail user dropped", {"user": "a@example.com"}, {"metadata": None}),
    ("openai metadata dropped", {"metadata": {"k": "v"}, "store": True}, {"metadata": None}),
    (
        "harmless dropped",
        {
            "seed": 1,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "service_tier": "auto",
            "prediction": {"type": "content", "content": "x"},
            "reasoning_effort": "low",
            "logit_bias": {},
            "n": 1,
            "logprobs": False,
            "response_format": {"type": "text"},
            "modalities": ["text"],
            "disable_fallbacks": True,
        },
        {"seed": None, "logit_bias": None, "n": None, "response_format": None},
    ),
    ("required", {"tools": TOOLS, "tool_choice": "required"}, {"tool_choice": {"type": "any"}}),
    ("none", {"tools": TOOLS, "tool_choice": "none"}, {"tool_choice": {"type": "none"}}),
    (
        "named tool",
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "time"}}},
        {"tool_choice": {"type": "tool", "name": "time"}},
    ),
    (
        "no parallel calls",
        {"tools": TOOLS, "parallel_tool_calls": False},
        {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
    ),
    (
        "no parallel calls, required",
        {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
        {"tool_choice": {"type": "any", "disable_parallel_tool_use": True}},
    ),
    (
        "no parallel calls, none",
        {"tools": TOOLS, "tool_choice": "none", "parallel_tool_calls": False},
        {"tool_choice": {"type": "none"}},
    ),
    ("tool_choice auto without tools", {"tool_choice": "auto"}, {"tool_choice": None}),
    (
        "empty parameters get a type",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tools": [{"name": "f", "input_schema": {"type": "object"}}]},
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES]
)
def test_chat_params(body: dict[str, Any], expected: dict[str, Any]) -> None:
    out = to_messages({"messages": [user("hi")], **body})
    for key, value in expected.items():
        assert out.get(key) == value, key


MESSAGE_CASES: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = [
    (
        "empty text dropped, roles merged",
        [user("a"), {"role": "assistant", "content": ""}, user("b")],
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ],
    ),
    (
        "final assistant loses trailing whitespace",
        [user("a"), {"role": "assistant", "content": "The answer is (  \n"}],
        [
            {"role": "user", "content": [{"type": "text", "text": "a"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The answer is ("}]},
        ],
    ),
    (
        "assistant refusal kept as text",
        [user("a"), {"role": "assistant", "content": None, "refusal": "No."}, user("b")],
        [
            {"role": "user", "content": [{"type": "text", "text": "a"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
            {"role": "user", "content": [{"type": "text", "text": "b"}]},
        ],
    ),
    (
        "pdf data url and file part are documents",
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:application/pdf;base64,JVBE"}},
                    {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBF"}},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {
                        "type": "document",
                        "source": {
                            "type": "base64",
                            "media_type": "application/pdf",
                            "data": "JVBE",
                        },
                    },
                    {
                        "type": "document",
                        "source": {
                            "type": "base64",
                            "media_type": "application/pdf",
                            "data": "JVBF",
                        },
                    },
                ],
            }
        ],
    ),
    (
        "cache_control passes (LiteLLM's extension)",
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "doc", "cache_control": {"type": "ephemeral"}}
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "doc", "cache_control": {"type": "ephemeral"}}
                ],
            }
        ],
    ),
    (
        "a user message before its tool result is put after it",
        [
            user("q"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            user("meanwhile"),
            {"role": "tool", "tool_call_id": "c", "content": ""},
        ],
        [
            {"role": "user", "content": [{"type": "text", "text": "q"}]},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "c", "name": "f", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "c"},
                    {"type": "text", "text": "meanwhile"},
                ],
            },
        ],
    ),
]


@pytest.mark.parametrize(
    ("messages", "expected"), [c[1:] for c in MESSAGE_CASES], ids=[c[0] for c in MESSAGE_CASES]
)
def test_chat_messages(messages: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert to_messages({"messages": messages, "tools": tools})["messages"] == expected


def test_default_max_tokens_and_input_untouched() -> None:
    body = {"model": "m", "messages": [user("hi  ")]}
    before = json.dumps(body)
    out = chat_to_messages(body, "c", default_max_tokens=99)
    assert out["max_tokens"] == 99
    assert json.dumps(body) == before


CHAT_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"n": 2}, "n"),
    ({"n": "2"}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"stop": "\n"}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": True}, "max_completion_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"stream": "yes"}, "stream"),
    ({"user": 5}, "user"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.[0].type"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools.[0].function.name"),
    ({"tools": [{"type": "function"}]}, "tools.[0].function"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages.[0].role"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.[0].role"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages.[0].role"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
        "messages.[0].content.[0].type",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
        "messages.[0].content.[0].type",
    ),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages.[0].content.[0].type"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}],
                }
            ]
        },
        "messages.[0].content.[0].image_url.url",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png,xx"}}],
                }
            ]
        },
        "messages.[0].content.[0].image_url.url",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:text/html;base64,xx"}}
                    ],
                }
            ]
        },
        "messages.[0].content.[0].image_url.url",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]},
        "messages.[0].content.[0].file",
    ),
    (
        {"messages": [{"role": "system", "content": [{"type": "image_url"}]}, user("x")]},
        "messages.[0].content.[0].type",
    ),
    (
        {
            "messages": [
                user("x"),
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "a",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{bad"},
                        }
                    ],
                },
            ]
        },
        "messages.[1].tool_calls.[0].function.arguments",
    ),
    (
        {
            "messages": [
                user("x"),
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "a",
                            "type": "function",
                            "function": {"name": "f", "arguments": "[1]"},
                        }
                    ],
                },
            ]
        },
        "messages.[1].tool_calls.[0].function.arguments",
    ),
    (
        {
            "messages": [
                user("x"),
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": "f"}}],
                },
            ]
        },
        "messages.[1].tool_calls.[0].id",
    ),
    (
        {"messages": [user("x"), {"role": "assistant", "function_call": {"name": "f"}}]},
        "messages.[1].function_call",
    ),
    ({"messages": [user("x"), {"role": "tool", "content": "r"}]}, "messages.[1].tool_call_id"),
]


@pytest.mark.parametrize(("body", "param"), CHAT_REFUSALS)
def test_chat_refusals(body: dict[str, Any], param: str) -> None:
    full = {"model": "m", "messages": [user("hi")], **body}
    with pytest.raises(BadRequestError) as caught:
        chat_to_messages(full, "c", default_max_tokens=10)
    assert caught.value.param == param
    assert caught.value.status == 400
    assert json.loads(caught.value.body())["error"]["param"] == param


def test_chat_missing_messages_and_not_an_object() -> None:
    with pytest.raises(MissingParameterError):
        chat_to_messages({"model": "m"}, "c", default_max_tokens=10)
    with pytest.raises(BadRequestError):
        chat_to_messages([], "c", default_max_tokens=10)  # type: ignore[arg-type]


# ---- Anthropic → OpenAI ----


def test_documented_basic_request() -> None:
    out = to_chat(request_body(DOCUMENTED, "messages-basic"))
    assert out == {
        "model": "gpt-4.1",
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Hello, Claude"},
        ],
        "max_completion_tokens": 1024,
    }


def test_documented_tools_request() -> None:
    body = request_body(DOCUMENTED, "messages-tools")
    out = to_chat(body)
    assert out["messages"] == [
        {"role": "user", "content": "What is the weather like in San Francisco?"},
        {
            "role": "assistant",
            "content": "I'll check the weather.",  # the thinking block is dropped
            "tool_calls": [
                {
                    "id": "toolu_01A09q90qw90lq917835lq9",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"location":"San Francisco, CA"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"},
        {"role": "user", "content": "And in Celsius?"},
    ]
    tool = body["tools"][0]
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": tool["input_schema"],
                "description": tool["description"],
            },
        }
    ]
    assert out["tool_choice"] == "auto"
    assert out["parallel_tool_calls"] is False


def test_documented_stream_request_asks_usage_and_drops_thinking() -> None:
    out = to_chat(request_body(DOCUMENTED, "messages-streaming-tools"))
    assert out["stream"] is True
    assert out["stream_options"] == {"include_usage": True}
    assert "thinking" not in out
    assert "reasoning_effort" not in out


ANTHROPIC_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("max_tokens by another name", {}, {"max_completion_tokens": 512}),
    ("stop_sequences", {"stop_sequences": ["END"]}, {"stop": ["END"]}),
    (
        "sampling",
        {"temperature": 0.2, "top_p": 0.5, "top_k": 5},
        {"temperature": 0.2, "top_p": 0.5, "top_k": None},
    ),
    ("user id", {"metadata": {"user_id": "u-1"}}, {"user": "u-1", "metadata": None}),
    (
        "system blocks",
        {
            "system": [
                {"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "B"},
            ]
        },
        {
            "messages": [
                {
                    "role": "system",
                    "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
                },
                {"role": "user", "content": "hi"},
            ]
        },
    ),
    (
        "service tier dropped",
        {"service_tier": "auto", "thinking": {"type": "disabled"}},
        {"service_tier": None},
    ),
    ("effort dropped", {"output_config": {"effort": "low"}}, {"output_config": None}),
    (
        "tool choice any",
        {
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
        },
        {"tool_choice": "required", "parallel_tool_calls": None},
    ),
    (
        "tool choice tool",
        {
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "f"},
        },
        {"tool_choice": {"type": "function", "function": {"name": "f"}}},
    ),
    (
        "tool choice none",
        {
            "tools": [{"name": "f", "type": "custom", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "none"},
        },
        {"tool_choice": "none"},
    ),
    ("tool choice auto without tools", {"tool_choice": {"type": "auto"}}, {"tool_choice": None}),
]


@pytest.mark.parametrize(
    ("body", "expected"), [c[1:] for c in ANTHROPIC_CASES], ids=[c[0] for c in ANTHROPIC_CASES]
)
def test_anthropic_params(body: dict[str, Any], expected: dict[str, Any]) -> None:
    out = to_chat({"messages": [user("hi")], **body})
    for key, value in expected.items():
        assert out.get(key) == value, key


def test_anthropic_max_tokens_name() -> None:
    body = {"model": "c", "max_tokens": 9, "messages": [user("hi")]}
    assert messages_to_chat(body, "g", max_tokens_param="max_tokens")["max_tokens"] == 9


def test_anthropic_content_blocks() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
                },
                {
                    "type": "document",
                    "source": {"type": "text", "media_type": "text/plain", "data": "notes"},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "is_error": True,
                    "content": [
                        {"type": "text", "text": "partial"},
                        {
                            "type": "image",
                            "source": {"type": "url", "url": "https://example.com/s.png"},
                        },
                    ],
                },
                {"type": "text", "text": "see?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "xx"}]},
    ]
    out = to_chat(
        {"messages": messages, "tools": [{"name": "shot", "input_schema": {"type": "object"}}]}
    )
    assert out["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {
                    "type": "file",
                    "file": {
                        "file_data": "data:application/pdf;base64,JVBE",
                        "filename": "document.pdf",
                    },
                },
                {"type": "text", "text": "notes"},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "shot", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "Error: partial"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/s.png"}},
                {"type": "text", "text": "see?"},
            ],
        },
    ]


ANTHROPIC_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"stop_sequences": "END"}, "stop_sequences"),
    ({"stop_sequences": [1]}, "stop_sequences"),
    ({"metadata": "u"}, "metadata"),
    ({"thinking": "on"}, "thinking"),
    ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
    ({"container": "c"}, "container"),
    ({"context_management": {}}, "context_management"),
    ({"output_format": {"type": "json_schema", "schema": {}}}, "output_format"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools.0.type"),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({"tool_choice": {"type": "any"}}, "tool_choice.type"),
    (
        {"tool_choice": {"type": "sometimes"}, "tools": [{"name": "f", "input_schema": {}}]},
        "tool_choice.type",
    ),
    ({"system": [{"type": "image"}]}, "system.0.type"),
    ({"system": 5}, "system"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "search_result"}]}]},
        "messages.0.content.0.type",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                }
            ]
        },
        "messages.0.content.0.source.type",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
        "messages.0.content.0.source",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "document", "source": {"type": "url", "url": "u"}}],
                }
            ]
        },
        "messages.0.content.0.source.type",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
        "messages.0.content.0.tool_use_id",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "document"}],
                        }
                    ],
                }
            ]
        },
        "messages.0.content.0.content.0.type",
    ),
    (
        {"messages": [{"role": "assistant", "content": [{"type": "server_tool_use"}]}]},
        "messages.0.content.0.type",
    ),
    (
        {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f"}]}]},
        "messages.0.content.0.id",
    ),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "a", "name": "f", "input": [1]}],
                }
            ]
        },
        "messages.0.content.0.input",
    ),
]


@pytest.mark.parametrize(("body", "param"), ANTHROPIC_REFUSALS)
def test_anthropic_refusals(body: dict[str, Any], param: str) -> None:
    full = {"model": "c", "max_tokens": 10, "messages": [user("hi")], **body}
    with pytest.raises(BadRequestError) as caught:
        messages_to_chat(full, "g")
    assert caught.value.param == param


# ---- round trips ----


def test_openai_round_trip_keeps_the_meaning() -> None:
    body = {
        "model": "gpt-4.1",
        "messages": CONVERSATION,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "parallel_tool_calls": False,
        "max_completion_tokens": 300,
        "temperature": 0.5,
        "stop": ["END"],
        "stream": True,
        "user": "u-9",
    }
    there = to_messages(body)
    back = to_chat(there)
    assert back["messages"][0] == {
        "role": "system",
        "content": [
            {"type": "text", "text": "Be brief."},
            {"type": "text", "text": "Use metric units."},
        ],
    }
    assert back["messages"][1]["content"][1:] == CONVERSATION[2]["content"][1:]
    calls = back["messages"][2]["tool_calls"]
    assert [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
    ] == [
        ("call_1", "weather", {"city": "Paris"}),
        ("call_2", "time", {}),
    ]
    assert back["messages"][3:5] == [
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
    ]
    assert back["messages"][5] == {
        "role": "user",
        "content": [{"type": "text", "text": "Thanks!"}, {"type": "text", "text": "And tomorrow?"}],
    }
    assert [t["function"]["name"] for t in back["tools"]] == ["weather", "time"]
    assert back["tools"][0]["function"]["parameters"] == TOOLS[0]["function"]["parameters"]
    assert back["tool_choice"] == body["tool_choice"]
    assert back["parallel_tool_calls"] is False
    assert back["max_completion_tokens"] == 300
    assert (back["temperature"], back["stop"], back["stream"], back["user"]) == (
        0.5,
        ["END"],
        True,
        "u-9",
    )


@pytest.mark.parametrize("name", ["messages-basic", "messages-tools", "messages-streaming-tools"])
def test_anthropic_round_trip_keeps_the_meaning(name: str) -> None:
    body = request_body(DOCUMENTED, name)
    back = to_messages(to_chat(body))
    assert back["max_tokens"] == body["max_tokens"]
    assert back.get("stream", False) == body.get("stream", False)
    assert back.get("system") == body.get("system")
    assert [t["name"] for t in back.get("tools", [])] == [t["name"] for t in body.get("tools", [])]
    assert back.get("tool_choice") == body.get("tool_choice")

    def meaning(messages: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        out: list[tuple[str, str, str]] = []
        for m in messages:
            blocks = (
                m["content"]
                if isinstance(m["content"], list)
                else [{"type": "text", "text": m["content"]}]
            )
            for b in blocks:
                if b["type"] == "thinking":
                    continue
                content = b.get("content")
                if isinstance(content, list):
                    content = "".join(c["text"] for c in content)
                value = b.get("text") or json.dumps(b.get("input")) or str(content)
                out.append(
                    (m["role"], b["type"], value if b["type"] != "tool_result" else str(content))
                )
        return out

    assert meaning(back["messages"]) == meaning(body["messages"])
