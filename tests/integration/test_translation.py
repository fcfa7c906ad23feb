"""Calls translated between OpenAI chat completions and Anthropic messages, through
the real Envoy with the official SDKs, against upstreams that speak only one API (they
refuse the other's paths as the provider would): JSON, streams, tools, errors, a group
mixing both kinds 50/50, the charge read from the provider's usage; under ext_authz,
which cannot rewrite a body, no call is translated."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall, ParsedFunctionToolCall

from tests.integration.stack import POLICIES, Stack, post, start_stack

KEY = "sk-tr-all"
HI: list[Any] = [{"role": "user", "content": "what is the weather in Paris?"}]
WEATHER_OPENAI: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]
WEATHER_ANTHROPIC: list[Any] = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
    }
]


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stack]]:
    policy = POLICIES / "translate.yaml"
    with (
        start_stack(tmp_path_factory.mktemp("tp"), policy=policy) as ext_proc,
        start_stack(tmp_path_factory.mktemp("ta"), mode="ext_authz", policy=policy) as authz,
    ):
        yield {"ext_proc": ext_proc, "ext_authz": authz}
        logs = ext_proc.server_log() + authz.server_log()
    assert "Traceback" not in logs, logs


@pytest.fixture
def stack(stacks: dict[str, Stack]) -> Stack:
    stacks["ext_proc"].mocks.clear()
    return stacks["ext_proc"]


def key_spend(stack: Stack) -> Decimal:
    with urllib.request.urlopen(f"{stack.admin_url}/budgets", timeout=5) as resp:  # noqa: S310
        budgets = json.load(resp)["budgets"]
    return sum((Decimal(str(b["spend"])) for b in budgets if b["kind"] == "key"), Decimal(0))


def gpt(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0)


def claude(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=KEY, max_retries=0)


def test_the_openai_sdk_talks_to_an_anthropic_only_upstream(stack: Stack) -> None:
    before = key_spend(stack)
    with gpt(stack) as client:
        reply = client.chat.completions.create(model="claude-only", messages=HI)
        assert reply.object == "chat.completion"
        assert reply.choices[0].finish_reason == "stop"
        assert reply.choices[0].message.content
        assert reply.usage is not None
        usage = reply.usage
        # the charge is the provider's usage at the deployment's prices
        spent = key_spend(stack) - before
        cost = (
            Decimal("0.000003") * usage.prompt_tokens
            + Decimal("0.000015") * usage.completion_tokens
        )
        assert spent == cost
        stream = client.chat.completions.create(
            model="claude-only", messages=HI, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens > 0
    seen = stack.mocks.seen("mock_anthropic_only")
    assert [s["path"] for s in seen] == ["/v1/messages", "/v1/messages"]
    assert {s["headers"]["anthropic-version"] for s in seen} == {"2023-06-01"}
    assert {s["headers"]["x-api-key"] for s in seen} == {"sk-test-c"}
    assert "authorization" not in {k.lower() for s in seen for k in s["headers"]}
    assert json.loads(seen[0]["body"])["model"] == "up-claude"


def test_openai_tools_through_an_anthropic_upstream(stack: Stack) -> None:
    with gpt(stack) as client:
        first = client.chat.completions.create(
            model="claude-only", messages=HI, tools=WEATHER_OPENAI
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls or []
        assert isinstance(call, ChatCompletionMessageFunctionToolCall)
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"query": "mock"}
        followed: list[Any] = [
            *HI,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
        ]
        answer = client.chat.completions.create(
            model="claude-only", tools=WEATHER_OPENAI, messages=followed
        )
        assert "sunny, 21 C" in (answer.choices[0].message.content or "")
        # streamed: the SDK rebuilds the call from the translated chunks
        with client.chat.completions.stream(
            model="claude-only", messages=HI, tools=WEATHER_OPENAI
        ) as stream:
            final = stream.get_final_completion()
        (streamed,) = final.choices[0].message.tool_calls or []
        assert isinstance(streamed, ParsedFunctionToolCall)
        assert json.loads(streamed.function.arguments) == {"query": "mock"}
        assert final.choices[0].finish_reason == "tool_calls"


def test_the_anthropic_sdk_talks_to_an_openai_only_upstream(stack: Stack) -> None:
    with claude(stack) as client:
        message = client.messages.create(model="gpt-only", max_tokens=64, messages=HI)
        assert message.type == "message"
        assert message.stop_reason == "end_turn"
        assert message.content[0].type == "text"
        assert message.usage.output_tokens > 0
        with client.messages.stream(model="gpt-only", max_tokens=64, messages=HI) as stream:
            final = stream.get_final_message()
        assert final.content[0].type == "text"
        assert final.usage.output_tokens > 0
        used = client.messages.create(
            model="gpt-only", max_tokens=64, messages=HI, tools=WEATHER_ANTHROPIC
        )
        assert used.stop_reason == "tool_use"
        tool = next(b for b in used.content if b.type == "tool_use")
        assert (tool.name, tool.input) == ("get_weather", {"query": "mock"})
        conversation: list[Any] = [
            *HI,
            {"role": "assistant", "content": [b.model_dump() for b in used.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool.id, "content": "rainy"}],
            },
        ]
        answered = client.messages.create(
            model="gpt-only", max_tokens=64, tools=WEATHER_ANTHROPIC, messages=conversation
        )
        assert answered.content[0].type == "text"
        assert "rainy" in answered.content[0].text
    seen = stack.mocks.seen("mock_openai_only")
    assert {s["path"] for s in seen} == {"/v1/chat/completions"}
    assert {s["headers"]["Authorization"] for s in seen} == {"Bearer sk-test-a"}


def test_errors_come_in_the_clients_shape(stack: Stack) -> None:
    with gpt(stack) as client, pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(
            model="claude-only",
            messages=HI,
            extra_headers={"x-mock-fail": "mock_anthropic_only=429"},
        )
    body = limited.value.body
    assert isinstance(body, dict)
    assert body["type"] == "rate_limit_error"  # the SDK hands over the error object
    assert limited.value.response.headers["content-type"] == "application/json"
    with claude(stack) as other, pytest.raises(anthropic.InternalServerError) as failed:
        other.messages.create(
            model="gpt-only",
            max_tokens=16,
            messages=HI,
            extra_headers={"x-mock-fail": "mock_openai_only=500"},
        )
    error = failed.value.body
    assert isinstance(error, dict)
    assert error["type"] == "error"
    assert error["error"]["type"] == "api_error"


def test_a_group_mixing_both_apis_serves_both_sdks(stack: Stack) -> None:
    with gpt(stack) as client, claude(stack) as other:
        for _ in range(30):
            assert client.chat.completions.create(model="both", messages=HI).choices
            assert other.messages.create(model="both", max_tokens=16, messages=HI).content
    used = Counter(
        {site: len(stack.mocks.seen(site)) for site in ("mock_anthropic_only", "mock_openai_only")}
    )
    assert used["mock_anthropic_only"] + used["mock_openai_only"] == 60
    assert min(used.values()) >= 15  # about half each (weights 1:1)


def test_ext_authz_translates_nothing(stacks: dict[str, Stack]) -> None:
    stack = stacks["ext_authz"]
    stack.mocks.clear()
    with gpt(stack) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="claude-only", messages=HI)
        assert refused.value.code == "unsupported_endpoint"
        for _ in range(10):  # the mixed group: only its OpenAI deployment
            assert client.chat.completions.create(model="both", messages=HI).choices
    assert len(stack.mocks.seen("mock_openai_only")) == 10
    assert stack.mocks.seen("mock_anthropic_only") == []


def test_a_call_only_its_own_api_can_express_is_never_refused_by_the_draw(stack: Stack) -> None:
    with gpt(stack) as client:
        for _ in range(12):
            reply = client.chat.completions.create(model="both", messages=HI, n=2)
            assert len(reply.choices) == 2
    assert stack.mocks.seen("mock_anthropic_only") == []
    assert len(stack.mocks.seen("mock_openai_only")) == 12


def test_a_retry_answer_names_the_deployment_that_served(stack: Stack) -> None:
    with gpt(stack) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="claude-ha",
            messages=HI,
            extra_headers={"x-mock-fail": "mock_anthropic_only=529"},
        )
        assert raw.headers["x-litellm-model-id"] == "cha-2"
        assert raw.parse().model == "up-claude-2"


def test_a_fallback_of_the_other_api_serves_a_failed_call(stack: Stack) -> None:
    """LiteLLM's cross-provider fallback: an OpenAI group falling back to an Anthropic
    one (and the reverse); Envoy's retry goes to the other API, its attempt filter
    translates the body and the answer is translated back."""
    fail_openai = {"x-mock-fail": "mock_openai_only=500"}
    with gpt(stack) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-fb", messages=HI, extra_headers=fail_openai
        )
        assert raw.headers["x-litellm-model-id"] == "claude-a"
        assert raw.headers["x-litellm-attempted-fallbacks"] == "1"
        reply = raw.parse()
        assert reply.object == "chat.completion"
        assert reply.choices[0].message.content
        stream = client.chat.completions.create(
            model="gpt-fb",
            messages=HI,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=fail_openai,
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage is not None
    retried = stack.mocks.seen("mock_anthropic_only")
    assert [s["path"] for s in retried] == ["/v1/messages", "/v1/messages"]
    assert {json.loads(s["body"])["model"] for s in retried} == {"up-claude"}
    assert {s["headers"]["anthropic-version"] for s in retried} == {"2023-06-01"}
    stack.mocks.clear()
    before = key_spend(stack)
    with claude(stack) as other:
        message = other.messages.create(
            model="claude-fb",
            max_tokens=32,
            messages=HI,
            extra_headers={"x-mock-fail": "mock_anthropic_only=529"},
        )
        assert message.type == "message"
        assert message.content[0].type == "text"
    # charged as the deployment that served: its usage at its prices
    usage = message.usage
    cost = Decimal("0.000001") * usage.input_tokens + Decimal("0.000002") * usage.output_tokens
    assert key_spend(stack) - before == cost
    (served,) = stack.mocks.seen("mock_openai_only")
    assert served["path"] == "/v1/chat/completions"
    assert json.loads(served["body"])["model"] == "up-gpt"


FAIL_BOTH = {"x-mock-fail": "mock_openai_only=500,mock_anthropic_only=500"}


def test_a_third_attempt_gets_its_own_apis_endpoint(stack: Stack) -> None:
    """OpenAI, then Anthropic, then OpenAI again (and the reverse): Envoy keeps the
    second attempt's path and headers for the third; the third still gets its API's
    endpoint, body and headers (mock_c answers either API, so a wrong one would pass
    unnoticed but for what it saw)."""
    with gpt(stack) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="o-first", messages=HI, extra_headers=FAIL_BOTH
        )
        assert raw.headers["x-litellm-model-id"] == "o2"
        assert raw.parse().object == "chat.completion"
    (third,) = stack.mocks.seen("mock_c")
    assert third["path"] == "/v1/chat/completions"
    assert json.loads(third["body"])["model"] == "up-o2"
    assert "messages" in json.loads(third["body"])
    stack.mocks.clear()
    beta = {**FAIL_BOTH, "anthropic-beta": "tools-2024-04-04"}
    with claude(stack) as other:
        message = other.messages.create(
            model="c-first", max_tokens=16, messages=HI, extra_headers=beta
        )
        assert message.type == "message"
    (again,) = stack.mocks.seen("mock_c")
    assert again["path"] == "/v1/messages"
    assert again["headers"]["anthropic-version"]  # the client's, kept
    assert again["headers"]["anthropic-beta"] == "tools-2024-04-04"
    assert "max_tokens" in json.loads(again["body"])


def test_a_call_that_cannot_go_both_ways_is_not_failed_over_across(stack: Stack) -> None:
    """A whitespace stop goes from Anthropic to OpenAI but not back: the retry could
    not be sent, so the call is not failed over across the APIs and the client gets
    the first deployment's answer (in its own shape), never a gateway 503."""
    body = {
        "model": "o-first",
        "max_tokens": 16,
        "stop_sequences": ["\n"],
        "messages": HI,
    }
    headers = {
        "x-api-key": KEY,
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
    }
    status, _, payload = post(
        f"{stack.url}/v1/messages",
        json.dumps(body).encode(),
        {**headers, "x-mock-fail": "mock_openai_only=500"},
    )
    assert status == 500
    error = json.loads(payload)
    assert error["type"] == "error"
    assert stack.mocks.seen("mock_anthropic_only") == []
