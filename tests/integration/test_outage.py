"""A Redis that stalls (SIGSTOP) for 5 s under a trickle of calls through a real
Envoy, in both fail modes: once it runs again and the owed writes have landed, the
spend is exactly the admitted calls' cost, no hold is left, and the session count
is every call counted."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import pytest
import redis

from tests.helpers import holds_open, port_open, redis_proc, running, wait_until
from tests.integration.stack import POLICIES, post, start_stack

POLICY = POLICIES / "outage.yaml"
OUTAGE = "770f3c8c19d442db6683bbec14eb956ec02c313706f6f99aef4542472307f2a0"
KEY_BUDGET = f"{{t:key:{OUTAGE}}}:key:{OUTAGE}"
GLOBAL_BUDGET = "{spend}:global:all"
SESSION = f"{{t:key:{OUTAGE}}}:session_iterations:s-outage:count"
HEADERS = {"authorization": "Bearer sk-outage", "x-litellm-session-id": "s-outage"}
BODY = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()
#: Calls per second, and for how long; Redis stalls in the middle of it.
RATE, RUN_S, STOP_AT_S, STOP_FOR_S = 4, 10.0, 2.5, 5.0


def metrics(admin_url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def pending(admin_url: str) -> float:
    return sum(
        v for k, v in metrics(admin_url).items() if k.startswith("extproc_settlements_pending")
    )


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_redis_stalled_under_traffic_loses_nothing(
    tmp_path: Path, fail_mode: Literal["open", "closed"]
) -> None:
    local = redis_proc(tmp_path)
    if local is None:
        pytest.skip("redis-server is not installed")
    proc, port = local
    env = {
        "EXTPROC_STORE_URL": f"redis://127.0.0.1:{port}/0",
        "EXTPROC_FAIL_MODE": fail_mode,
        "EXTPROC_STORE_RETRY_S": "0.2",
    }
    with (
        running(proc, lambda: port_open(port)) as redis_server,
        start_stack(tmp_path, policy=POLICY, server_env=env) as stack,
    ):
        client = redis.Redis(port=port)
        url = stack.url + "/v1/chat/completions"
        # one call first: what a call costs (the mock's usage, the policy's prices)
        assert post(url, BODY, HEADERS)[0] == 200
        wait_until(lambda: holds_open(client) == 0, 10, "the first settlement")
        one_call = int(client.get(KEY_BUDGET) or 0)
        assert one_call > 0

        stopped = threading.Event()
        stopped_at = 0.0
        assert redis_server.popen is not None
        pid = redis_server.popen.pid
        statuses: list[Future[tuple[int, dict[str, str], bytes]]] = []
        try:
            with ThreadPoolExecutor(max_workers=32) as pool:
                start = time.monotonic()
                for n in range(int(RATE * RUN_S)):
                    at = start + n / RATE
                    time.sleep(max(0.0, at - time.monotonic()))
                    elapsed = time.monotonic() - start
                    if not stopped.is_set() and elapsed >= STOP_AT_S:
                        redis_server.popen.send_signal(signal.SIGSTOP)
                        stopped.set()
                        stopped_at = time.monotonic()
                    if stopped.is_set() and time.monotonic() - stopped_at >= STOP_FOR_S:
                        redis_server.popen.send_signal(signal.SIGCONT)
                    statuses.append(pool.submit(post, url, BODY, HEADERS))
                codes = [f.result()[0] for f in statuses]
        finally:
            redis_server.popen.send_signal(signal.SIGCONT)
        assert pid == redis_server.popen.pid
        ok = codes.count(200)
        # during the stall: admitted unreserved (open), or refused with a 503 (closed)
        refused = codes.count(503)
        assert ok + refused == len(codes), sorted(set(codes))
        if fail_mode == "open":
            assert refused == 0
        else:
            assert refused > 0
        assert ok > 0

        # after the stall: every owed write lands, no hold is left
        wait_until(lambda: pending(stack.admin_url) == 0, 30, "owed writes to land")
        wait_until(lambda: holds_open(client) == 0, 30, "holds to end")
        m = metrics(stack.admin_url)
        log = stack.server_log()
        spent = int(client.get(KEY_BUDGET) or 0)
        spent_global = int(client.get(GLOBAL_BUDGET) or 0)
        held = {k: int(client.get(k) or 0) for k in client.scan_iter(match="{*}#held|*")}
        count = int(client.get(SESSION) or 0)
        client.close()

    failed = m.get('extproc_settlements_total{outcome="failed"}', 0)
    landed = {k: v for k, v in m.items() if k.startswith("extproc_settlement_retries_total") and v}
    print(  # the figures, for the record (pytest -s)
        f"fail mode {fail_mode}: {len(codes)} calls, {ok} admitted, {refused} refused; "
        f"spend {spent} = {ok + 1} x {one_call}; session count {count}; "
        f"settlements or cancels kept {failed:.0f}; retries {landed}"
    )
    assert spent == (ok + 1) * one_call  # every admitted call charged exactly once
    assert spent_global == spent
    assert all(v == 0 for v in held.values()), held
    assert count == ok + 1  # every admitted call counted once, none that was refused
    if fail_mode == "open":
        # the stall was felt: writes were kept, and landed later (closed refuses the
        # calls instead, so it owes something only when a call was mid-reservation)
        assert any('result="landed"' in k for k in landed), landed
    assert "Traceback" not in log
    assert " ERROR " not in log, log
