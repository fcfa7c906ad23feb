"""Restarts without errors, through a real Envoy: a server process told to stop (SIGTERM)
turns NOT_SERVING, keeps serving until Envoy's health check has taken it out of load
balancing, then finishes what it has and exits, an idle access-log stream open on it
or not."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tests.helpers import wait_until
from tests.integration.stack import (
    POLICIES,
    ServerProc,
    post,
    start_server,
    start_server_pair,
    start_stack,
    wait_for_extproc_healthy,
)

POLICY = POLICIES / "restart.yaml"
BODY = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()
PLAIN = {"authorization": "Bearer sk-restart-plain"}  # no lease: not access-logged
LEASE = {"authorization": "Bearer sk-restart-lease"}  # a lease: its end is access-logged
#: Far longer than any test waits: a process that exits did not sit out its grace.
#: The production notice (the stacks of other tests turn it off) and a long grace.
LONG_GRACE = {"EXTPROC_SHUTDOWN_GRACE_S": "300", "EXTPROC_SHUTDOWN_NOTICE_S": "3"}


@dataclass
class Call:
    started: float  # wall time
    ended: float
    status: int  # 0: no HTTP answer at all
    body: bytes


@dataclass
class Traffic:
    """One client calling back to back in a thread until stopped."""

    url: str
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.time()
            try:
                status, _, body = post(f"{self.url}/v1/chat/completions", BODY, PLAIN)
            except OSError as exc:
                status, body = 0, repr(exc).encode()
            self.calls.append(Call(started, time.time(), status, body))

    def more(self, count: int) -> None:
        """Wait until ``count`` more calls have ended."""
        target = len(self.calls) + count
        wait_until(lambda: len(self.calls) >= target, 60, f"{count} more calls")


def released(server: ServerProc) -> float:
    with urllib.request.urlopen(f"{server.admin_url}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    found = re.search(r'^extproc_parallel_leases_total\{event="released"\} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


def logged_at(log: str, message: str) -> float:
    """The wall time of the server's log line holding ``message``."""
    for line in log.splitlines():
        if message in line:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no {message!r} in the log:\n{log}")


def assert_clean(log: str) -> None:
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log
    assert "stopped" in log, log


def test_restarting_one_of_two_processes_gives_no_client_error(
    tmp_path: Path, redis_url: str
) -> None:
    """Two processes behind one Envoy under steady traffic; the one holding Envoy's
    access-log stream (idle by then) gets SIGTERM: no call fails, it exits long before
    its grace, and the next access-logged call's lease is given back by the other."""
    env = {"EXTPROC_STORE_URL": redis_url, **LONG_GRACE}
    with start_server_pair(tmp_path, POLICY, env) as (url, servers):
        # open Envoy's access-log stream(s) on the servers: a leased call logs its end
        for _ in range(20):
            assert post(f"{url}/v1/chat/completions", BODY, LEASE)[0] == 200
            if any(released(s) > 0 for s in servers):
                break
        wait_until(lambda: any(released(s) > 0 for s in servers), 10, "a lease released")
        victim, survivor = servers if released(servers[0]) > 0 else servers[::-1]
        assert victim.proc.popen is not None
        with Traffic(url) as traffic:
            traffic.more(10)
            victim.proc.popen.send_signal(signal.SIGTERM)
            # an idle access-log stream would hold it for the whole 300 s grace
            assert victim.proc.popen.wait(60) == 0
            traffic.more(10)
        failed = [c for c in traffic.calls if c.status != 200]
        assert not failed, failed[:5]
        log = victim.proc.log()
        assert_clean(log)
        assert "did not health-check" not in log, log
        # Envoy reopened its access-log stream on the survivor
        before = released(survivor)
        assert post(f"{url}/v1/chat/completions", BODY, LEASE)[0] == 200
        wait_until(lambda: released(survivor) > before, 10, "the survivor to release the lease")
        print(f"{len(traffic.calls)} calls, none failed")


def test_restarting_the_only_process_fails_calls_only_while_it_is_down(tmp_path: Path) -> None:
    """One process under steady traffic gets SIGTERM and a new one starts on its port:
    the calls that ended before the old one stopped taking streams all succeeded, the
    calls begun once Envoy sees the new one healthy all succeed, and those in between
    that failed got an OpenAI-style 503."""
    (tmp_path / "old").mkdir()
    with start_stack(tmp_path / "old", policy=POLICY, server_env=LONG_GRACE) as stack:
        assert stack.server is not None
        assert stack.server.popen is not None
        grpc_port = stack.server.env["EXTPROC_GRPC_PORT"]
        with contextlib.ExitStack() as later, Traffic(stack.url) as traffic:
            traffic.more(10)
            stack.server.popen.send_signal(signal.SIGTERM)
            assert stack.server.popen.wait(60) == 0
            old_log = stack.server.log()
            (tmp_path / "new").mkdir()
            env = {"EXTPROC_GRPC_PORT": grpc_port, **LONG_GRACE}
            new, _, _ = later.enter_context(start_server(tmp_path / "new", POLICY, env))
            wait_for_extproc_healthy(stack.envoy_admin_url)
            healthy = time.time()
            traffic.more(10)
            # the traffic stops before the new process does
        new_log = new.log()
        assert_clean(old_log)
        assert "Traceback" not in new_log, new_log
        stopped_taking = logged_at(old_log, "letting in-flight streams finish")
        before = [c for c in traffic.calls if c.ended < stopped_taking]
        after = [c for c in traffic.calls if c.started > healthy]
        assert before
        assert after
        assert all(c.status == 200 for c in before), [c for c in before if c.status != 200]
        assert all(c.status == 200 for c in after), [c for c in after if c.status != 200]
        for call in traffic.calls:
            if call.status != 200:
                assert call.status == 503, call
                assert json.loads(call.body)["error"]["code"], call
        down = [c for c in traffic.calls if c.status != 200]
        print(f"{len(traffic.calls)} calls, {len(down)} failed while no process served")
