"""Session iteration caps through real Envoys with the openai SDK, and exactness across
two server processes behind one Envoy sharing one Redis (and a Redis Cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Literal

import openai
import pytest
import redis

from tests.integration.stack import (
    POLICIES,
    post,
    start_two_servers,
)

POLICY = POLICIES / "iterations.yaml"
LIMIT, REMAINING = "x-session-iterations-limit", "x-session-iterations-remaining"


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz"])
def test_cap_through_envoy_with_the_openai_sdk(
    tmp_path: Path, mode: Literal["ext_proc", "ext_authz"]
) -> None:
    from tests.integration.stack import start_stack  # noqa: PLC0415

    with start_stack(tmp_path, mode=mode, policy=POLICY) as stack:
        agent = client(stack.url, "sk-iter-agent")  # the agent's cap: 3
        session = {"x-litellm-session-id": "task-1"}
        seen = []
        for _ in range(3):
            raw = agent.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": "hi"}], extra_headers=session
            )
            raw.parse()
            seen.append((raw.headers[LIMIT], raw.headers[REMAINING]))
        assert seen == [("3", "2"), ("3", "1"), ("3", "0")]
        with pytest.raises(openai.RateLimitError) as info:
            agent.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "hi"}], extra_headers=session
            )
        err = info.value
        assert err.code == "max_iterations_exceeded"
        assert "session task-1. Current count: 4, max_iterations: 3" in err.message
        assert 3500 <= int(err.response.headers["retry-after"]) <= 3600
        assert (err.response.headers[LIMIT], err.response.headers[REMAINING]) == ("3", "0")
        # another session, and calls without one, are not capped by it
        raw = agent.chat.completions.with_raw_response.create(
            model="auto",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"metadata": {"session_id": "task-2"}},
        )
        assert raw.headers[REMAINING] == "2"
        plain = agent.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "hi"}]
        )
        assert LIMIT not in plain.headers
        # a streamed call of a capped session carries the headers too
        stream = agent.chat.completions.with_raw_response.create(
            model="auto",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-litellm-session-id": "task-3"},
        )
        assert stream.headers[REMAINING] == "2"
        assert "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
        # a session id that is not printable is a 400, never a store key
        status, _, body = post(
            f"{stack.url}/v1/chat/completions",
            json.dumps({"model": "auto", "messages": []}).encode(),
            {"authorization": "Bearer sk-iter-agent", "x-litellm-session-id": "a" * 300},
        )
        assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_session_id")


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz"])
def test_ids_with_colons_do_not_share_a_counter(
    tmp_path: Path, mode: Literal["ext_proc", "ext_authz"]
) -> None:
    """Team t's session u:s and team t:u's session s are different sessions: store keys
    are built with every id escaped, so they cannot alias (cap 2 on group capped)."""
    from tests.integration.stack import start_stack  # noqa: PLC0415

    body = json.dumps({"model": "capped", "messages": []}).encode()

    def call(key: str, session: str) -> tuple[int, dict[str, str]]:
        headers = {"authorization": f"Bearer {key}", "x-litellm-session-id": session}
        status, resp_headers, _ = post(f"{stack.url}/v1/chat/completions", body, headers)
        return status, resp_headers

    with start_stack(tmp_path, mode=mode, policy=POLICY) as stack:
        for left in ("1", "0"):
            status, headers = call("sk-iter-t", "u:s")
            assert (status, headers[REMAINING]) == (200, left)
        status, headers = call("sk-iter-tu", "s")
        assert (status, headers[REMAINING]) == (200, "1")  # its own, fresh counter
        assert call("sk-iter-t", "u:s")[0] == 429  # team t's session is spent


def routed_metrics(admin_url: str) -> str:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as resp:  # noqa: S310
        return str(resp.read().decode())


def routed(admin_port: int) -> float:
    text = routed_metrics(f"http://127.0.0.1:{admin_port}")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("extproc_routed_total{")
    )


def two_servers_one_envoy(
    tmp_path: Path, store_url: str
) -> contextlib.AbstractContextManager[tuple[str, list[int]]]:
    return start_two_servers(tmp_path, POLICY, {"EXTPROC_STORE_URL": store_url})


async def exact_run(url: str, calls: int = 200) -> Counter[tuple[int, str]]:
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "x"}]}).encode()
    headers = {
        "authorization": "Bearer sk-iter-team-a1",  # wide-agent: cap 50
        "x-litellm-session-id": f"exact-{uuid.uuid4().hex}",
    }
    gate = asyncio.Semaphore(64)

    async def one() -> tuple[int, str]:
        async with gate:
            status, _, raw = await asyncio.to_thread(
                post, f"{url}/v1/chat/completions", body, headers
            )
        return status, json.loads(raw)["error"]["code"] if status != 200 else ""

    return Counter(await asyncio.gather(*(one() for _ in range(calls))))


async def test_exact_across_two_processes_on_redis(tmp_path: Path, redis_url: str) -> None:
    with two_servers_one_envoy(tmp_path, redis_url) as (url, admins):
        counts = await exact_run(url)
        assert all(routed(port) > 0 for port in admins)  # both processes admitted calls
    assert counts == {(200, ""): 50, (429, "max_iterations_exceeded"): 150}


async def test_exact_across_two_processes_on_redis_cluster(
    tmp_path: Path, redis_cluster_url: str
) -> None:
    with two_servers_one_envoy(tmp_path, redis_cluster_url) as (url, admins):
        counts = await exact_run(url)
        assert all(routed(port) > 0 for port in admins)
    assert counts == {(200, ""): 50, (429, "max_iterations_exceeded"): 150}


def test_redis_killed_mid_run_falls_back_then_returns(tmp_path: Path) -> None:
    from tests.helpers import port_open, redis_proc, running, wait_until  # noqa: PLC0415
    from tests.integration.stack import start_stack  # noqa: PLC0415

    local = redis_proc(tmp_path)
    if local is None:
        pytest.skip("redis-server is not installed")
    proc, port = local
    env = {"EXTPROC_STORE_URL": f"redis://127.0.0.1:{port}/0", "EXTPROC_STORE_RETRY_S": "0.2"}
    headers = {"authorization": "Bearer sk-iter-team-a1", "x-litellm-session-id": "survivor"}
    url_path = "/v1/chat/completions"
    body = json.dumps({"model": "auto", "messages": []}).encode()
    counter = "{t:team:team-a}:session_iterations:survivor:count"
    with (
        running(proc, lambda: port_open(port)) as redis_server,
        start_stack(tmp_path, policy=POLICY, server_env=env) as stack,
    ):
        statuses = [post(stack.url + url_path, body, headers)[0] for _ in range(5)]
        assert redis.Redis(port=port).get(counter) == b"5"
        redis_server.stop(signal.SIGKILL)
        statuses += [post(stack.url + url_path, body, headers)[0] for _ in range(10)]
        assert statuses == [200] * 15  # no 5xx: counted in process meanwhile
        restarted = redis_proc(tmp_path, port)
        assert restarted is not None
        with running(restarted[0], lambda: port_open(port)):

            def back() -> bool:
                post(stack.url + url_path, body, headers)
                return redis.Redis(port=port).get(counter) is not None

            wait_until(back, 10, "counting to go back to Redis")
        metrics = routed_metrics(stack.admin_url)
        log = stack.server_log()
    fallback = [
        line
        for line in metrics.splitlines()
        if line.startswith("extproc_iterations_fallback_total ")
    ]
    assert float(fallback[0].split()[1]) >= 10
    assert "Traceback" not in log
    assert log.count("store unavailable") <= 2  # at most once per 10 s interval
