"""A real gateway stack for integration tests: mock upstreams, server, Envoy."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from extproc.core.failover import FailoverRoute, failover_plan
from extproc.envoy.config import Upstream, render_envoy_config
from extproc.policy import parse_policy
from tests.helpers import (
    Proc,
    envoy_argv,
    extproc_argv,
    free_port,
    http_ok,
    port_open,
    running,
)

POLICIES = Path(__file__).resolve().parent.parent / "policies"
VALID_POLICY = POLICIES / "valid.yaml"
RECORDED = POLICIES.parent / "fixtures" / "openai-recorded"
DEAD_CLUSTER = "mock_dead"
KEYS = {"TEST_KEY_A": "sk-test-a", "TEST_KEY_B": "sk-test-b", "TEST_KEY_C": "sk-test-c"}
# cluster -> env var holding the key the mock demands (None: any key)
MOCKS: dict[str, str | None] = {
    "mock_a": "TEST_KEY_A",
    "mock_b": "TEST_KEY_B",
    "mock_c": None,
    "mock_openai_only": None,
    "mock_anthropic_only": None,
}
# cluster -> the one API its mock speaks (refusing the other's paths, as a provider does)
ONLY: dict[str, str] = {"mock_openai_only": "openai", "mock_anthropic_only": "anthropic"}


def post(
    url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """POST and return (status, lower-cased headers, body), errors included.

    Envoy may answer (413) before it has read the whole body and close the
    connection; the response is still read when sending breaks off.
    """
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=15)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request(
                "POST",
                parts.path + (f"?{parts.query}" if parts.query else ""),
                body,
                {"content-type": "application/json", **(headers or {})},
            )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@dataclass
class Mocks:
    ports: dict[str, int]
    proc: Proc

    def seen(self, cluster: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.ports[cluster]}/_mock/requests"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return list(json.load(resp))

    def clear(self) -> None:
        for port in self.ports.values():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/_mock/requests", method="DELETE")
            urllib.request.urlopen(req, timeout=5).close()  # noqa: S310


@dataclass
class Stack:
    url: str
    mocks: Mocks
    envoy: Proc
    server: Proc | None
    admin_url: str
    envoy_admin_url: str
    procs: list[Proc] = field(default_factory=list)
    mode: Literal["ext_proc", "ext_authz"] = "ext_proc"

    def server_log(self) -> str:
        return self.server.log() if self.server else ""


def failover_for(policy: Path) -> dict[str, FailoverRoute]:
    """The failover plan of a policy file, as ``extproc envoy-config`` derives it."""
    parsed = parse_policy(yaml.safe_load(policy.read_text()), str(policy))
    return failover_plan(parsed.failover_groups(), parsed.router_settings.default_fallbacks)


#: Tries to start a process whose freshly picked port was taken meanwhile (another
#: process's listener or outgoing connection got it between the pick and the bind).
BIND_TRIES = 3


def bind_failed(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return "address already in use" in text or "already in use" in text


@contextlib.contextmanager
def start_mocks(workdir: Path) -> Iterator[Mocks]:
    with contextlib.ExitStack() as stack:
        for attempt in range(BIND_TRIES):
            ports = {name: free_port() for name in MOCKS}
            args: list[str] = []
            for name, key_var in MOCKS.items():
                spec = f"{name}=127.0.0.1:{ports[name]}" + (f":{key_var}" if key_var else "")
                args += ["--upstream", spec]
            for name, api in ONLY.items():
                args += ["--only", f"{name}={api}"]
            replay = os.pathsep.join(str(d) for d in (RECORDED, RECORDED.parent / "synthetic"))
            env = {**KEYS, "EXTPROC_MOCK_REPLAY_DIR": replay}
            proc = Proc("mock", extproc_argv("mock", *args), workdir / "mock.log", env=env)

            def ready(proc: Proc = proc, ports: dict[str, int] = ports) -> bool:
                # its own line, not only open ports: a port may be another's
                return "extproc mock: serving" in proc.log() and all(
                    port_open(p) for p in ports.values()
                )

            try:
                stack.enter_context(running(proc, ready))
                break
            except RuntimeError as exc:
                if attempt + 1 == BIND_TRIES or not bind_failed(exc):
                    raise
        yield Mocks(ports, proc)


@contextlib.contextmanager
def start_server(
    workdir: Path, policy: Path = VALID_POLICY, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[Proc, int, int]]:
    grpc_port, admin_port = free_port(), free_port()
    env = {
        **KEYS,
        "EXTPROC_POLICY_PATH": str(policy),
        # Rule: tests never write outside their own directories.
        "EXTPROC_SPEND_JOURNAL": str(workdir / "spend.jsonl"),
        "EXTPROC_GRPC_PORT": str(grpc_port),
        "EXTPROC_ADMIN_PORT": str(admin_port),
        "EXTPROC_LOG_LEVEL": "INFO",
        # A stack stops its Envoy before its server: the drain's wait for Envoy to
        # see NOT_SERVING would only run out (the restart tests set their own)
        "EXTPROC_SHUTDOWN_NOTICE_S": "0",
        **(extra_env or {}),
    }
    proc = Proc("server", extproc_argv("serve"), workdir / "server.log", env=env)
    with running(proc, lambda: http_ok(f"http://127.0.0.1:{admin_port}/healthz")):
        yield proc, grpc_port, admin_port


@contextlib.contextmanager
def start_envoy(
    workdir: Path,
    mocks: Mocks,
    grpc_port: int,
    *,
    mode: Literal["ext_proc", "ext_authz"] = "ext_proc",
    failure_mode_allow: bool = False,
    name: str = "envoy",
    extra_grpc_ports: tuple[int, ...] = (),
    policy: Path = VALID_POLICY,
) -> Iterator[tuple[Proc, str, str]]:
    dead = free_port()  # a deployment nobody listens for: connections are refused
    with contextlib.ExitStack() as stack:
        for attempt in range(BIND_TRIES):
            port, admin = free_port(), free_port()
            config = workdir / f"{name}.yaml"
            config.write_text(
                render_envoy_config(
                    {
                        **{c: Upstream("127.0.0.1", p) for c, p in mocks.ports.items()},
                        DEAD_CLUSTER: Upstream("127.0.0.1", dead),
                    },
                    mode=mode,
                    listen=Upstream("127.0.0.1", port),
                    server=Upstream("127.0.0.1", grpc_port),
                    extra_servers=[Upstream("127.0.0.1", p) for p in extra_grpc_ports],
                    admin=Upstream("127.0.0.1", admin),
                    failure_mode_allow=failure_mode_allow,
                    access_log_path=str(workdir / f"{name}-access.log"),
                    failover=failover_for(policy),
                )
            )
            proc = Proc(name, envoy_argv(config), workdir / f"{name}.log")
            admin_url = f"http://127.0.0.1:{admin}"
            ready = functools.partial(http_ok, f"{admin_url}/ready")
            try:
                stack.enter_context(running(proc, ready))
                break
            except RuntimeError as exc:
                if attempt + 1 == BIND_TRIES or not bind_failed(exc):
                    raise
        yield proc, f"http://127.0.0.1:{port}", admin_url


@contextlib.contextmanager
def start_stack(
    workdir: Path,
    *,
    mode: Literal["ext_proc", "ext_authz"] = "ext_proc",
    policy: Path = VALID_POLICY,
    server_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    with (
        start_mocks(workdir) as mocks,
        start_server(workdir, policy, server_env) as (server, grpc_port, admin_port),
        start_envoy(workdir, mocks, grpc_port, mode=mode, policy=policy) as (
            envoy,
            url,
            envoy_admin,
        ),
    ):
        wait_for_extproc_healthy(envoy_admin)
        yield Stack(
            url=url,
            mocks=mocks,
            envoy=envoy,
            server=server,
            admin_url=f"http://127.0.0.1:{admin_port}",
            envoy_admin_url=envoy_admin,
            mode=mode,
        )


def wait_for_extproc_healthy(envoy_admin: str) -> None:
    """Envoy's active health check has seen the server (no panic-mode routing)."""
    from tests.helpers import wait_until  # noqa: PLC0415

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{envoy_admin}/clusters", timeout=2) as resp:  # noqa: S310
                text = resp.read().decode()
        except OSError:
            return False
        flags = [
            line
            for line in text.splitlines()
            if line.startswith("extproc::") and "::health_flags::" in line
        ]
        return bool(flags) and all(line.endswith("::healthy") for line in flags)

    wait_until(healthy, 20, "Envoy to see the server healthy")


@dataclass
class ServerProc:
    """One server process of a pair: its process and admin port."""

    proc: Proc
    admin_port: int

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@contextlib.contextmanager
def start_server_pair(
    workdir: Path, policy: Path, server_env: dict[str, str]
) -> Iterator[tuple[str, list[ServerProc]]]:
    """Two server processes (sharing the store in ``server_env``) behind one Envoy.

    Yields the Envoy URL and the servers.
    """
    (workdir / "s1").mkdir()
    (workdir / "s2").mkdir()
    with (
        start_mocks(workdir) as mocks,
        start_server(workdir / "s1", policy, server_env) as (proc_1, port_1, admin_1),
        start_server(workdir / "s2", policy, server_env) as (proc_2, port_2, admin_2),
        start_envoy(workdir, mocks, port_1, extra_grpc_ports=(port_2,), policy=policy) as (
            _,
            url,
            admin,
        ),
    ):
        wait_for_extproc_healthy(admin)
        yield url, [ServerProc(proc_1, admin_1), ServerProc(proc_2, admin_2)]


@contextlib.contextmanager
def start_two_servers(
    workdir: Path, policy: Path, server_env: dict[str, str]
) -> Iterator[tuple[str, list[int]]]:
    """:func:`start_server_pair`, yielding the Envoy URL and the servers' admin ports."""
    with start_server_pair(workdir, policy, server_env) as (url, servers):
        yield url, [server.admin_port for server in servers]
