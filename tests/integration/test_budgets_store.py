"""Budgets read from a real Redis, through both Envoys; Redis killed → fail mode."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Literal

import pytest
import redis

from extproc.core.access import hash_key
from extproc.core.budgets import MICRO, spend_key
from tests.helpers import Proc, port_open, redis_proc, running
from tests.integration.stack import POLICIES, post, start_stack

BODY = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()


def _redis(tmp_path: Path) -> tuple[Proc, int]:
    local = redis_proc(tmp_path)
    if local is None:
        pytest.skip("redis-server is not installed")
    return local


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz"])
@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_budget_from_redis_and_fail_mode(
    tmp_path: Path, mode: Literal["ext_proc", "ext_authz"], fail_mode: str
) -> None:
    proc, port = _redis(tmp_path)
    with running(proc, lambda: port_open(port)) as redis_proc:
        client = redis.Redis(port=port)
        env = {"EXTPROC_STORE_URL": f"redis://127.0.0.1:{port}/0", "EXTPROC_FAIL_MODE": fail_mode}
        with start_stack(
            tmp_path, mode=mode, policy=POLICIES / "budgets.yaml", server_env=env
        ) as stack:
            sam = {"authorization": "Bearer sk-sam-budget"}
            assert post(f"{stack.url}/v1/chat/completions", BODY, sam)[0] == 200
            client.set(spend_key("key", hash_key("sk-sam-budget")), int(10 * MICRO))
            status, _, payload = post(f"{stack.url}/v1/chat/completions", BODY, sam)
            assert status == 429
            error = json.loads(payload)["error"]
            assert error["code"] == "key_budget_exceeded"
            assert "sk-sam-budget" not in payload.decode()
            client.close()
            redis_proc.stop(signal.SIGKILL)
            status, headers, payload = post(f"{stack.url}/v1/chat/completions", BODY, sam)
            if fail_mode == "open":
                assert status == 200
            else:
                assert status == 503
                assert set(json.loads(payload)["error"]) == {"message", "type", "param", "code"}
                assert headers["x-extproc-error"] == "store_unavailable"
            log = stack.server_log()
        assert "Traceback" not in log
        assert "store unavailable" in log
