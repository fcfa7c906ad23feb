"""Fallbacks at admission through a real Envoy: a group whose only deployment cools
down sends the next calls to its fallback group; ``disable_fallbacks`` gets the 429."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

import pytest

from tests.integration.stack import POLICIES, Stack, post, start_stack

POLICY = POLICIES / "routing.yaml"


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    mode: Literal["ext_proc", "ext_authz"] = request.param
    with start_stack(tmp_path_factory.mktemp(mode), mode=mode, policy=POLICY) as running:
        yield running


def test_a_cooling_group_is_served_by_its_fallback(stack: Stack) -> None:
    import openai  # noqa: PLC0415

    body = json.dumps({"model": "solo", "messages": [{"role": "user", "content": "hi"}]})
    # a 401 cools solo's only deployment at once (Envoy fails that call over to backup)
    status, failed_over, _ = post(
        f"{stack.url}/v1/chat/completions", body.encode(), {"x-mock-fail": "mock_a=401"}
    )
    assert status == 200
    # served by Envoy's second attempt, in another group: one retry, one fallback hop
    assert failed_over["x-litellm-model-id"] == "backup-b"
    assert failed_over["x-litellm-attempted-retries"] == "1"
    assert failed_over["x-litellm-attempted-fallbacks"] == "1"
    stack.mocks.clear()
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    if stack.mode == "ext_authz":
        # the body cannot be rewritten: backup's upstream would get "solo", not
        # "backup-model", so the walk does not go there and solo's 429 stands
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(
                model="solo", messages=[{"role": "user", "content": "hi"}]
            )
        assert refused.value.code == "deployments_cooling_down"
        assert not stack.mocks.seen("mock_a")
        assert not stack.mocks.seen("mock_b")
    else:
        raw = client.chat.completions.with_raw_response.create(
            model="solo", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-mock-upstream"] == "mock_b"
        assert raw.headers["x-litellm-model-id"] == "backup-b"
        assert raw.headers["x-litellm-attempted-fallbacks"] == "1"
        assert raw.headers["x-litellm-attempted-retries"] == "0"
        assert not stack.mocks.seen("mock_a")  # sent to the fallback before any attempt
        assert raw.parse().model == "backup-model"
    # fallbacks off: LiteLLM's 429, retry-after the cooldown left (cooldown_time 5 s)
    off = json.dumps(
        {
            "model": "solo",
            "messages": [{"role": "user", "content": "hi"}],
            "disable_fallbacks": True,
        }
    )
    status, headers, payload = post(f"{stack.url}/v1/chat/completions", off.encode(), {})
    assert status == 429
    error = json.loads(payload)["error"]
    assert error["code"] == "deployments_cooling_down"
    assert error["message"].startswith("No deployments available for selected model")
    assert 1 <= int(headers["retry-after"]) <= 5
