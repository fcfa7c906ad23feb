"""The official SDKs through a real Envoy and the server."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.integration.stack import KEYS, Stack


def test_openai_chat_routes_rewrites_and_injects(stack: Stack) -> None:
    stack.mocks.clear()
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-client-virtual-key")
    raw = client.chat.completions.with_raw_response.create(
        model="only-a", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert raw.headers["x-mock-upstream"] == "mock_a"
    assert completion.model == "up-model-a"  # the upstream saw the deployment's name
    assert completion.choices[0].message.content == "Hello from the mock upstream."
    assert completion.usage is not None
    assert completion.usage.total_tokens > 0
    (seen,) = stack.mocks.seen("mock_a")
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["authorization"] == f"Bearer {KEYS['TEST_KEY_A']}"
    assert "sk-client-virtual-key" not in str(seen)
    assert int(headers["content-length"]) == len(seen["body"].encode())


def test_openai_streaming(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-client")
    stream = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, models = "", None, set()
    for chunk in stream:
        models.add(chunk.model)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert text == "Hello from the mock upstream."
    assert usage is not None
    assert usage.completion_tokens == 6
    assert models <= {"up-model-a", "up-model-b"}


def test_openai_other_endpoints(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-client")
    emb = client.embeddings.create(model="only-a", input=["a", "b"])
    assert len(emb.data) == 2
    assert emb.model == "up-model-a"
    comp = client.completions.create(model="only-a", prompt="hi")
    assert comp.choices[0].text
    resp = client.responses.create(model="only-a", input="hi")
    assert resp.output_text == "Hello from the mock upstream."
    events = [e.type for e in client.responses.create(model="only-a", input="hi", stream=True)]
    assert events[0] == "response.created"
    assert events[-1] == "response.completed"


def test_anthropic_messages(stack: Stack) -> None:
    stack.mocks.clear()
    client = anthropic.Anthropic(base_url=stack.url, api_key="sk-ant-client")
    message = client.messages.create(
        model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.model == "up-claude"
    assert message.content[0].type == "text"
    (seen,) = stack.mocks.seen("mock_c")
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-api-key"] == KEYS["TEST_KEY_C"]
    assert "sk-ant-client" not in str(seen)


def test_anthropic_streaming(stack: Stack) -> None:
    client = anthropic.Anthropic(base_url=stack.url, api_key="sk-ant-client")
    with client.messages.stream(
        model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the mock upstream."
    assert final.usage.output_tokens == 6


def test_openai_sdk_sees_gateway_errors_as_api_errors(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-client", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-group", messages=[])
    assert info.value.code == "model_not_found"
    assert info.value.status_code == 404
