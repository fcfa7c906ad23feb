"""Endpoints only some deployments serve, through the real Envoy in both modes with
the official SDKs: Anthropic's token counter goes to an Anthropic deployment and is
never charged or counted; the Responses API to a group that only has chat
completions is a 400, not an upstream's 404."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.integration.stack import POLICIES, Stack, post, start_stack

MODES = ["ext_proc", "ext_authz"]
MESSAGES: list[Any] = [{"role": "user", "content": "how many tokens is this?"}]


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stack]]:
    policy = POLICIES / "endpoints.yaml"
    with (
        start_stack(tmp_path_factory.mktemp("ep"), policy=policy) as ext_proc,
        start_stack(tmp_path_factory.mktemp("ea"), mode="ext_authz", policy=policy) as authz,
    ):
        yield {"ext_proc": ext_proc, "ext_authz": authz}
        logs = ext_proc.server_log() + authz.server_log()
    assert "Traceback" not in logs, logs
    assert " ERROR " not in logs, logs


def claude(stack: Stack, key: str = "sk-ends-all") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=key, max_retries=0)


def key_spend(stack: Stack) -> float:
    with urllib.request.urlopen(f"{stack.admin_url}/budgets", timeout=5) as resp:  # noqa: S310
        budgets = json.load(resp)["budgets"]
    return sum(float(b["spend"]) for b in budgets if b["kind"] == "key")


@pytest.mark.parametrize("mode", MODES)
def test_count_tokens_goes_to_an_anthropic_deployment_and_costs_nothing(
    stacks: dict[str, Stack], mode: str
) -> None:
    stack = stacks[mode]
    stack.mocks.clear()
    session = {"x-litellm-session-id": f"count-{mode}"}
    with claude(stack) as client:
        for model in ["mixed"] * 6 + ["claude"] * 3:
            counted = client.messages.count_tokens(
                model=model, messages=MESSAGES, extra_headers=session
            )
            assert counted.input_tokens > 0
        seen = stack.mocks.seen("mock_c")
        assert [s["path"] for s in seen] == ["/v1/messages/count_tokens"] * 9
        if mode == "ext_proc":  # ext_authz cannot rewrite the body
            assert {json.loads(s["body"])["model"] for s in seen} == {"up-claude"}
        assert all(s["headers"].get("x-api-key") == "sk-test-c" for s in seen)
        assert stack.mocks.seen("mock_a") == []  # never the OpenAI deployment of mixed
        assert key_spend(stack) == 0
        # claude caps a session at one call: the counts did not use it up
        client.messages.create(
            model="claude", max_tokens=16, messages=MESSAGES, extra_headers=session
        )
        with pytest.raises(anthropic.RateLimitError):
            client.messages.create(
                model="claude", max_tokens=16, messages=MESSAGES, extra_headers=session
            )
    assert key_spend(stack) > 0  # the call that was made is charged


@pytest.mark.parametrize("mode", MODES)
def test_count_tokens_checks_access_and_needs_an_anthropic_deployment(
    stacks: dict[str, Stack], mode: str
) -> None:
    stack = stacks[mode]
    stack.mocks.clear()
    with claude(stack, "sk-ends-gpt") as limited, pytest.raises(anthropic.APIStatusError) as denied:
        limited.messages.count_tokens(model="claude", messages=MESSAGES)
    assert denied.value.status_code in (401, 403)
    with claude(stack, "sk-nobody") as nobody, pytest.raises(anthropic.AuthenticationError):
        nobody.messages.count_tokens(model="claude", messages=MESSAGES)
    with claude(stack) as client, pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.count_tokens(model="gpt", messages=MESSAGES)
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["error"]["code"] == "unsupported_endpoint"
    assert "Anthropic" in error["error"]["message"]
    for cluster in ("mock_a", "mock_b", "mock_c"):
        assert stack.mocks.seen(cluster) == []


@pytest.mark.parametrize("mode", MODES)
def test_the_responses_api_needs_a_deployment_that_has_it(
    stacks: dict[str, Stack], mode: str
) -> None:
    stack = stacks[mode]
    stack.mocks.clear()
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-ends-all", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="chat-only", input="hi")
        assert refused.value.code == "unsupported_endpoint"
        assert "/v1/chat/completions" in refused.value.message
        assert stack.mocks.seen("mock_a") == []
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model="claude", input="hi")
        # OpenAI's own, and a compatible host that says it has the API
        assert client.responses.create(model="gpt", input="hi").output_text
        assert client.responses.create(model="compat-responses", input="hi").output_text
        # the same groups still serve chat completions
        chat = client.chat.completions.create(
            model="chat-only", messages=[{"role": "user", "content": "hi"}]
        )
        assert chat.choices[0].message.content


@pytest.mark.parametrize("mode", MODES)
def test_count_tokens_answers_are_redacted_and_never_leave_the_anthropic_group(
    stacks: dict[str, Stack], mode: str
) -> None:
    stack = stacks[mode]
    stack.mocks.clear()
    body = json.dumps({"model": "claude", "messages": MESSAGES}).encode()
    headers = {"x-api-key": "sk-ends-all", "content-type": "application/json"}
    status, got, payload = post(
        f"{stack.url}/v1/messages/count_tokens", body, {**headers, "x-mock-echo-key": "error"}
    )
    assert status == 500
    assert b"sk-test-c" not in payload
    status, got, _ = post(
        f"{stack.url}/v1/messages/count_tokens", body, {**headers, "x-mock-echo-key": "header"}
    )
    assert status == 200
    assert "sk-test-c" not in got.get("x-mock-saw-key", "")
    assert not [k for k in got if k.startswith("x-extproc-served")]
    # a prompt larger than the group's window: counted by its Anthropic deployment,
    # never sent to the context-window fallback (an OpenAI deployment)
    stack.mocks.clear()
    long: list[Any] = [{"role": "user", "content": "word " * 400}]
    with claude(stack) as client:
        assert client.messages.count_tokens(model="tiny-claude", messages=long).input_tokens > 20
    assert len(stack.mocks.seen("mock_c")) == 1
    assert stack.mocks.seen("mock_b") == []
