"""Weighted routing and routing-header safety through a real Envoy."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path

import openai
import pytest

from tests.integration.stack import Stack, post, start_envoy, start_mocks, start_server

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


async def test_weights_3_to_1_over_400_requests(stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="sk-client")
    limit = asyncio.Semaphore(16)

    async def one() -> str:
        async with limit:
            raw = await client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": "hi"}]
            )
            return str(raw.headers["x-mock-upstream"])

    counts = Counter(await asyncio.gather(*(one() for _ in range(400))))
    await client.close()
    share_a = counts["mock_a"] / 400
    assert counts["mock_a"] + counts["mock_b"] == 400
    assert 0.68 <= share_a <= 0.82, counts


def test_client_routing_header_is_ignored(stack: Stack) -> None:
    stack.mocks.clear()
    body = json.dumps({**CHAT, "model": "only-a"}).encode()
    for _ in range(20):
        status, headers, _ = post(
            f"{stack.url}/v1/chat/completions", body, {"x-extproc-cluster": "mock_b"}
        )
        assert status == 200
        assert headers["x-mock-upstream"] == "mock_a"
    assert stack.mocks.seen("mock_b") == []


@pytest.mark.parametrize("failure_mode_allow", [False, True], ids=["fail-closed", "fail-open"])
def test_server_down_client_cannot_pick_cluster(tmp_path: Path, failure_mode_allow: bool) -> None:
    body = json.dumps({**CHAT, "model": "only-a"}).encode()
    with (
        start_mocks(tmp_path) as mocks,
        start_server(tmp_path) as (server, grpc_port, _),
        start_envoy(tmp_path, mocks, grpc_port, failure_mode_allow=failure_mode_allow) as (
            _envoy,
            url,
            _admin,
        ),
    ):
        status, headers, _ = post(f"{url}/v1/chat/completions", body)
        assert (status, headers["x-mock-upstream"]) == (200, "mock_a")
        server.stop(signal.SIGKILL)
        mocks.clear()
        smuggle = {
            "x-extproc-cluster": "mock_b",
            "authorization": "Bearer sk-client-smuggled",
        }
        for path in ("/v1/chat/completions", "/v1/models", "/anything"):
            status, headers, payload = post(f"{url}{path}", body, smuggle)
            assert status in (404, 503), (path, status, payload)
            error = json.loads(payload)["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert "x-mock-upstream" not in headers
        assert mocks.seen("mock_a") == []
        assert mocks.seen("mock_b") == []
