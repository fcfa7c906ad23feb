"""max_parallel_requests through real Envoys: a slot per request in flight, given back
when Envoy logs the end of the stream (completed, or the client went away), or soon
after the process that took it was killed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Literal, cast

import pytest
import redis

from extproc.core.access import hash_key
from extproc.core.budgets import spend_key
from tests.helpers import holds_open, wait_until
from tests.integration.stack import POLICIES, ServerProc, post, start_server_pair, start_stack

POLICY = POLICIES / "budgets.yaml"
BODY = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()
ZED = {"authorization": "Bearer sk-zed-parallel"}


def slow(ms: int) -> dict[str, str]:
    return {**ZED, "x-mock-delay-ms": str(ms)}


async def burst(urls: list[str], n: int, headers: dict[str, str]) -> list[tuple[int, str]]:
    async def one(i: int) -> tuple[int, str]:
        status, _, body = await asyncio.to_thread(
            post, f"{urls[i % len(urls)]}/v1/chat/completions", BODY, headers
        )
        code = json.loads(body)["error"]["code"] if status != 200 else ""
        return status, code

    return await asyncio.gather(*(one(i) for i in range(n)))


def lease_events(admin_url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    pattern = r'^extproc_parallel_leases_total\{event="(\w+)"\} ([0-9.e+]+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


def log_entries(admin_url: str) -> float:
    """Lease entries of Envoy's access-log stream the server got."""
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    found = re.search(r'^extproc_access_log_entries_total\{kind="lease"\} ([0-9.e+]+)$', text, re.M)
    return float(found[1]) if found else 0.0


def all_released(admin_url: str) -> bool:
    events = lease_events(admin_url)
    return events.get("acquired", 0) > 0 and events.get("released") == events["acquired"]


def abandon_stream(url: str) -> None:
    """Start a slow streamed request, read the first bytes, then vanish (RST)."""
    parts = urllib.parse.urlsplit(url)
    body = json.dumps(
        {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer sk-zed-parallel\r\nx-mock-chunk-delay-ms: 2000\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz"])
async def test_parallel_limit_and_release(
    tmp_path: Path, mode: Literal["ext_proc", "ext_authz"]
) -> None:
    with start_stack(tmp_path, mode=mode, policy=POLICY) as stack:
        # six at once, each held 1.5 s by the upstream: two get through
        results = await burst([stack.url], 6, slow(1500))
        assert Counter(results) == {
            (200, ""): 2,
            (429, "parallel_request_limit_exceeded"): 4,
        }
        # both slots come back when the streams end ...
        wait_until(lambda: all_released(stack.admin_url), 5, "leases released")
        assert Counter(await burst([stack.url], 2, slow(300))) == {(200, ""): 2}
        wait_until(lambda: all_released(stack.admin_url), 5, "leases released")
        # (ext_proc: by the server with the response's last piece, each once; Envoy
        # logs no completed call back. ext_authz: Envoy logs every one back)
        assert lease_events(stack.admin_url)["released"] == 4
        await asyncio.sleep(0.5)  # the access logger flushes every 0.1 s
        assert log_entries(stack.admin_url) == (0 if mode == "ext_proc" else 4)
        # ... and when the client goes away mid-stream
        wait_until(lambda: all_released(stack.admin_url), 5, "leases released")
        await asyncio.gather(
            asyncio.to_thread(abandon_stream, stack.url),
            asyncio.to_thread(abandon_stream, stack.url),
        )
        wait_until(lambda: all_released(stack.admin_url), 5, "abandoned leases released")
        # an abandoned stream is logged back on either path
        assert log_entries(stack.admin_url) == (2 if mode == "ext_proc" else 6)
        assert Counter(await burst([stack.url], 3, slow(300))) == {
            (200, ""): 2,
            (429, "parallel_request_limit_exceeded"): 1,
        }
        events = lease_events(stack.admin_url)
        assert events.get("unknown", 0) == 0
        assert "Traceback" not in stack.server_log()


async def test_parallel_limit_shared_across_processes(tmp_path: Path, redis_url: str) -> None:
    env = {"EXTPROC_STORE_URL": redis_url}
    with contextlib.ExitStack() as stacks:
        started = []
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
            started.append(
                stacks.enter_context(start_stack(tmp_path / name, policy=POLICY, server_env=env))
            )
        urls = [s.url for s in started]
        results = await burst(urls, 10, slow(1500))
        assert Counter(results) == {
            (200, ""): 2,
            (429, "parallel_request_limit_exceeded"): 8,
        }

        def released_everywhere() -> bool:
            events = [lease_events(s.admin_url) for s in started]
            acquired = sum(e.get("acquired", 0) for e in events)
            return acquired == 2 and sum(e.get("released", 0) for e in events) == acquired

        wait_until(released_everywhere, 5, "leases released")
        assert Counter(await burst(urls, 2, slow(300))) == {(200, ""): 2}


ONE = {"authorization": "Bearer sk-crash-one"}
ONE_SPEND = spend_key("key", hash_key("sk-crash-one"))
ONE_SLOTS = f"{{t:key:{hash_key('sk-crash-one')}}}:key:{hash_key('sk-crash-one')}:parallel"


def stream_until_cut(url: str) -> None:
    """A slow streamed call (a chunk every 2 s), read until the connection ends."""
    parts = urllib.parse.urlsplit(url)
    body = json.dumps(
        {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer sk-crash-one\r\nx-mock-chunk-delay-ms: 2000\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request)
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass


def acquired(server: ServerProc) -> float:
    return lease_events(server.admin_url).get("acquired", 0)


def test_a_killed_process_frees_its_slot_and_its_hold(tmp_path: Path, redis_url: str) -> None:
    """max_parallel_requests: 1, a slow stream in flight on one of two processes, that
    process SIGKILLed: within 5 s a call through the other one gets its slot, and the
    killed call's hold is given back (the spend shows only settled calls)."""
    client = redis.Redis.from_url(redis_url)
    client.delete(ONE_SPEND, ONE_SLOTS)
    env = {"EXTPROC_STORE_URL": redis_url}
    with start_server_pair(tmp_path, POLICIES / "crash.yaml", env) as (url, servers):
        chat = f"{url}/v1/chat/completions"
        assert post(chat, BODY, ONE)[0] == 200
        wait_until(lambda: holds_open(client) == 0, 5, "the first call settled")
        wait_until(lambda: client.zcard(ONE_SLOTS) == 0, 5, "the first call's slot released")
        per_call = int(client.get(ONE_SPEND) or 0)
        assert per_call > 0
        before = [acquired(server) for server in servers]
        streaming = threading.Thread(target=stream_until_cut, args=(url,), daemon=True)
        streaming.start()
        wait_until(
            lambda: [acquired(s) for s in servers] != before, 10, "the stream to be admitted"
        )
        victim, survivor = servers if acquired(servers[0]) > before[0] else (servers[1], servers[0])
        assert holds_open(client) == 1  # the stream's hold
        (member,) = cast("list[bytes]", client.zrange(ONE_SLOTS, 0, -1))
        # Envoy logs the killed stream's end, and the survivor may release its lease
        # from that; a second stream of the victim's whose log line is lost (Envoy
        # leaves it nowhere else) can only be freed by the victim being seen dead.
        seconds, micros = client.time()
        lost = member[:16] + b"0" * 16
        client.zadd(ONE_SLOTS, {lost: seconds * 1000 + micros // 1000 + 600_000})
        victim.proc.stop(signal.SIGKILL)
        killed = time.monotonic()

        statuses: list[int] = []

        def slot_free() -> bool:
            statuses.append(post(chat, BODY, ONE)[0])
            return statuses[-1] == 200

        wait_until(slot_free, 5, "a call to get the killed one's slot")
        print(f"slot back after {time.monotonic() - killed:.1f}s: {Counter(statuses)}")
        assert set(statuses) <= {200, 429, 500, 503}, statuses
        # the killed call's hold is given back: every hold is gone, the spend is the
        # two settled calls
        wait_until(lambda: holds_open(client) == 0, 5, "the killed call's hold given back")
        assert int(client.get(ONE_SPEND) or 0) == 2 * per_call
        assert lost not in client.zrange(ONE_SLOTS, 0, -1)
        events = lease_events(survivor.admin_url)
        assert events.get("reaped", 0) >= 1
        assert events.get("unknown", 0) == 0
        streaming.join(30)
        log = survivor.proc.log()
    client.close()
    assert "Traceback" not in log
    assert " ERROR " not in log
