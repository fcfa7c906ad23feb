"""Shared test helpers: free ports, child processes, proto builders."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.cli.up import envoy_binary
from extproc.core.decision import GatewayConfig, RouteDecision, decide_route, prepare
from extproc.core.request import RequestHead
from extproc.core.selection import EMPTY_VIEW, RoutingView
from extproc.policy import CompiledPolicy

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(count: int) -> int:
    """The first of ``count`` consecutive ports that are all free right now."""
    for _ in range(200):
        first = free_port()
        if first + count < 65_536 and all(_bindable(first + i) for i in range(1, count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def holds_open(client: Any) -> int:
    """Open budget holds in a Redis, over every slot's reservation book."""
    return sum(int(client.hlen(key)) for key in client.scan_iter(match="{*}:reservations"))


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Poll ``predicate`` until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what or predicate}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def port_open(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Proc:
    """A child process whose output goes to a log file we can read."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        env = {**os.environ, **self.env}
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return int(self.popen.returncode)


@contextlib.contextmanager
def running(proc: Proc, ready: Callable[[], bool], timeout: float = 30.0) -> Iterator[Proc]:
    """Start ``proc``, wait for ``ready``, and always stop it afterwards."""
    proc.start()
    try:
        wait_until(lambda: ready() or not proc.alive, timeout, f"{proc.name} to start")
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log()}")
        yield proc
    finally:
        proc.stop()


def cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10_000 < 65_536 and not port_open(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def redis_proc(workdir: Path, port: int | None = None, *extra: str) -> tuple[Proc, int] | None:
    """A local redis-server on a free port that keeps nothing on disk (None if absent)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = port or free_port()
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        *extra,
    ]
    return Proc(f"redis-{port}", argv, workdir / f"redis-{port}.log"), port


def extproc_argv(*args: str) -> list[str]:
    return [PYTHON, "-m", "extproc", *args]


def envoy_argv(config: Path) -> list[str]:
    return [envoy_binary(), "-c", str(config), "--log-level", "warn", "--disable-hot-restart"]


# --- proto builders for adapter tests ----------------------------------------------


def headers_msg(
    pairs: Iterable[tuple[str, str]], *, end_of_stream: bool = False
) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
            ),
            end_of_stream=end_of_stream,
        )
    )


def body_msg(body: bytes, *, end_of_stream: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def post_headers(path: str = "/v1/chat/completions", **extra: str) -> list[tuple[str, str]]:
    pairs = [
        (":method", "POST"),
        (":path", path),
        (":authority", "gw"),
        ("content-type", "application/json"),
    ]
    pairs += [(k.replace("_", "-"), v) for k, v in extra.items()]
    return pairs


def mutation_dict(mutation: pb.HeaderMutation) -> dict[str, Any]:
    return {
        "set": {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers},
        "remove": list(mutation.remove_headers),
    }


def decide_request(
    head: RequestHead,
    raw: bytes,
    policy: CompiledPolicy,
    config: GatewayConfig,
    rng: Callable[[], float],
    *,
    now: datetime,
    view: RoutingView = EMPTY_VIEW,
    rewrite_body: bool = True,
) -> RouteDecision:
    """The core's routing decision for one request, taken as the gateway takes it
    (:func:`prepare`, then :func:`decide_route`), on a hand-built view instead of the store."""
    prepared = prepare(head, raw, policy, config, now=now, translate=rewrite_body)
    return decide_route(prepared, policy, config, view, rng, now=now, rewrite_body=rewrite_body)


class StoppedClock:
    """A :class:`~extproc.state.clock.Clock` that shows ``at`` until a test moves it."""

    def __init__(self, at: datetime, monotonic: float = 1000.0) -> None:
        self.at = at
        self.mono = monotonic

    def wall(self) -> float:
        return self.at.timestamp()

    def monotonic(self) -> float:
        return self.mono

    def now(self) -> datetime:
        return self.at
