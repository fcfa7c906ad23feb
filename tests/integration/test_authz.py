"""The ext_authz variant: same decision core, headers only."""

from __future__ import annotations

import json

import openai

from tests.integration.stack import KEYS, Stack, post


def test_authz_routes_and_injects_credentials(authz_stack: Stack) -> None:
    authz_stack.mocks.clear()
    client = openai.OpenAI(base_url=f"{authz_stack.url}/v1", api_key="sk-client-virtual")
    raw = client.chat.completions.with_raw_response.create(
        model="only-a", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-mock-upstream"] == "mock_a"
    # ext_authz cannot rewrite the body: the upstream sees the group's name.
    assert raw.parse().model == "only-a"
    (seen,) = authz_stack.mocks.seen("mock_a")
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["authorization"] == f"Bearer {KEYS['TEST_KEY_A']}"
    assert "sk-client-virtual" not in str(seen)


def test_authz_ignores_client_routing_header(authz_stack: Stack) -> None:
    authz_stack.mocks.clear()
    body = json.dumps({"model": "only-a", "messages": []}).encode()
    status, headers, _ = post(
        f"{authz_stack.url}/v1/chat/completions", body, {"x-extproc-cluster": "mock_b"}
    )
    assert (status, headers["x-mock-upstream"]) == (200, "mock_a")
    assert authz_stack.mocks.seen("mock_b") == []
