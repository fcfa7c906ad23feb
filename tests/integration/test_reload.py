"""Policy hot reload through a real Envoy: file watch and SIGHUP."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from pathlib import Path

import openai

from tests.helpers import wait_until
from tests.integration.stack import VALID_POLICY, post, start_envoy, start_mocks, start_server

NEW_GROUP = """
  - name: added-later
    deployments:
      - id: dep-later
        cluster: mock_b
        model: up-later
        credential: {env: TEST_KEY_B}
"""
BODY = json.dumps({"model": "added-later", "messages": [{"role": "user", "content": "hi"}]})


def _copy_policy(tmp_path: Path) -> Path:
    """An editable copy of the test policy, with the secret file it references."""
    policy = tmp_path / "policy.yaml"
    shutil.copy(VALID_POLICY, policy)
    (tmp_path / "secrets").mkdir()
    shutil.copy(VALID_POLICY.parent / "secrets" / "azure.key", tmp_path / "secrets")
    return policy


def _status(url: str) -> int:
    return post(f"{url}/v1/chat/completions", BODY.encode())[0]


async def test_file_edit_applies_within_2s_and_bad_file_keeps_old(tmp_path: Path) -> None:
    policy = _copy_policy(tmp_path)
    with (
        start_mocks(tmp_path) as mocks,
        start_server(tmp_path, policy) as (server, grpc_port, _),
        start_envoy(tmp_path, mocks, grpc_port) as (_envoy, url, _admin),
    ):
        assert _status(url) == 404
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-client")

        async def load() -> list[int]:
            async def one() -> int:
                raw = await client.chat.completions.with_raw_response.create(
                    model="auto", messages=[{"role": "user", "content": "hi"}]
                )
                return int(raw.status_code)

            codes: list[int] = []
            for _ in range(10):
                codes += await asyncio.gather(*(one() for _ in range(10)))
            return codes

        traffic = asyncio.create_task(load())
        policy.write_text(policy.read_text() + NEW_GROUP)
        edited = time.monotonic()
        await asyncio.to_thread(wait_until, lambda: _status(url) == 200, 5, "reload")
        assert time.monotonic() - edited < 2.0
        codes = await traffic
        await client.close()
        # requests in flight across the reload all succeed
        assert codes == [200] * 100

        policy.write_text("model_groups: [{name: broken, deployments: [{id: x, model: m}]}]")
        await asyncio.to_thread(
            wait_until, lambda: "policy reload rejected" in server.log(), 5, "rejection"
        )
        assert "model_groups[0].deployments[0].cluster: Field required" in server.log()
        assert _status(url) == 200  # the old policy still serves


def test_sighup_reloads(tmp_path: Path) -> None:
    policy = _copy_policy(tmp_path)
    with (
        start_mocks(tmp_path) as mocks,
        start_server(tmp_path, policy, {"EXTPROC_POLICY_POLL_S": "0"}) as (server, port, _),
        start_envoy(tmp_path, mocks, port) as (_envoy, url, _admin),
    ):
        policy.write_text(policy.read_text() + NEW_GROUP)
        time.sleep(1.0)  # watching is off: nothing may change without the signal
        assert _status(url) == 404
        assert server.popen is not None
        server.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: _status(url) == 200, 5, "SIGHUP reload")
