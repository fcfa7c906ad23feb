"""The ``extproc`` command line: serve, up, check, envoy-config, mock."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from extproc.envoy.config import Upstream
    from extproc.state.settings import Settings

__all__ = ["main"]

# Rule: this module imports only the standard library at import time, so a Ctrl-C
# while the command starts lands in main()'s handler (a quiet exit), not in an import.


def _settings(args: argparse.Namespace) -> Settings:
    from extproc.state.settings import Settings  # noqa: PLC0415

    overrides: dict[str, object] = {}
    for name in ("policy_path", "grpc_port", "admin_port", "store_url"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)  # type: ignore[arg-type]


def _cmd_serve(args: argparse.Namespace) -> int:
    from extproc.adapters.server import run  # noqa: PLC0415
    from extproc.policy import PolicyError  # noqa: PLC0415 - keep `--help` fast
    from extproc.store.journal import JournalError  # noqa: PLC0415

    try:
        run(_settings(args))
    except PolicyError as exc:
        print(f"invalid policy {exc.source}:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    except JournalError as exc:
        print(f"extproc serve: {exc} (EXTPROC_SPEND_JOURNAL)", file=sys.stderr)
        return 2
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from extproc.cli.up import UpOptions, run_up  # noqa: PLC0415
    from extproc.state.settings import DEFAULT_POLICY  # noqa: PLC0415

    return run_up(
        UpOptions(
            policy_path=args.policy_path or DEFAULT_POLICY,
            state_dir=args.state_dir,
            listen_port=args.port,
            grpc_port=args.grpc_port or 50051,
            admin_port=args.admin_port or 9190,
            envoy_admin_port=args.envoy_admin_port,
            mock_base_port=args.mock_base_port,
            store_url=args.store_url or "memory://",
            mode=args.mode,
            upstream_ca=args.upstream_ca,
        )
    )


def _cmd_check(args: argparse.Namespace) -> int:
    from extproc.envoy.check import check_envoy_config, policy_warnings  # noqa: PLC0415
    from extproc.policy import PolicyError, load_policy  # noqa: PLC0415

    settings = _settings(args)
    env = dict(os.environ)
    if args.no_credentials:
        # Validate the shape without the secrets being present on this machine.
        env = _placeholder_env(settings.policy_path, env)
    try:
        policy = load_policy(
            settings.policy_path,
            env=env,
            allow_inline_credentials=settings.allow_inline_credentials,
        )
    except PolicyError as exc:
        print(f"invalid policy {exc.source}:")
        for line in exc.errors:
            print(f"  {line}")
        return 1
    print(
        f"policy {settings.policy_path}: OK ({len(policy.groups)} model groups, "
        f"{len(policy.deployments())} deployments)"
    )
    for line in policy_warnings(policy):
        print(f"warning: {line}")
    if args.envoy is None:
        return 0
    report = check_envoy_config(args.envoy.read_text(encoding="utf-8"), policy, settings)
    for line in report.warnings:
        print(f"warning: {line}")
    for line in report.errors:
        print(f"error: {line}")
    if report.ok:
        print(f"envoy config {args.envoy}: OK")
    return 0 if report.ok else 1


def _placeholder_env(policy_path: Path, env: dict[str, str]) -> dict[str, str]:
    import yaml  # noqa: PLC0415

    data = yaml.safe_load(policy_path.read_text(encoding="utf-8"))
    for group in (data or {}).get("model_groups") or []:
        for dep in group.get("deployments") or []:
            ref = dep.get("credential") if isinstance(dep, dict) else None
            if isinstance(ref, dict) and isinstance(ref.get("env"), str):
                env.setdefault(ref["env"], "placeholder")
    return env


def _parse_upstream(value: str) -> tuple[str, Upstream, str | None]:
    """``name=host:port[:ENVVAR]`` or ``name=host:port[:tls]``."""
    from extproc.envoy.config import Upstream  # noqa: PLC0415

    name, sep, rest = value.partition("=")
    parts = rest.split(":")
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT[:EXTRA], got {value!r}")
    extra = parts[2] if len(parts) > 2 else None
    tls = extra == "tls"
    return name, Upstream(parts[0], int(parts[1]), tls), None if tls else extra


def _parse_only(value: str) -> tuple[str, str]:
    """``name=api``: the mock site ``name`` speaks only ``api``."""
    from extproc.dev.mock_upstream import APIS  # noqa: PLC0415

    name, sep, api = value.partition("=")
    if not sep or not name or api not in APIS:
        raise argparse.ArgumentTypeError(
            f"expected NAME=API with API one of {', '.join(sorted(APIS))}, got {value!r}"
        )
    return name, api


def _cmd_envoy_config(args: argparse.Namespace) -> int:
    import yaml  # noqa: PLC0415

    from extproc.cli.up import mock_plan, provider_upstreams  # noqa: PLC0415
    from extproc.core.failover import failover_plan  # noqa: PLC0415
    from extproc.envoy.config import Upstream, render_envoy_config  # noqa: PLC0415
    from extproc.policy import parse_policy  # noqa: PLC0415

    settings = _settings(args)
    policy = parse_policy(yaml.safe_load(settings.policy_path.read_text(encoding="utf-8")))
    clusters = {c: up for c, up, _ in mock_plan(policy, args.mock_base_port, args.mock_host)}
    clusters.update(provider_upstreams(policy, args.upstream_ca))
    clusters.update({name: up for name, up, _ in args.upstream})
    if args.upstream_ca:
        clusters = {
            name: dataclasses.replace(up, ca_file=args.upstream_ca) if up.tls else up
            for name, up in clusters.items()
        }
    text = render_envoy_config(
        clusters,
        mode=args.mode,
        listen=Upstream(args.listen_host, args.port),
        server=Upstream(args.server_host, settings.grpc_port),
        extra_servers=[Upstream(args.server_host, port) for port in args.extra_server_port],
        admin=Upstream("127.0.0.1", args.envoy_admin_port),
        cluster_header=settings.cluster_header,
        failure_mode_allow=args.failure_mode_allow,
        failover=failover_plan(policy.failover_groups(), policy.router_settings.default_fallbacks),
    )
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_mock(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from extproc.dev.mock_upstream import MockSite, run_mock  # noqa: PLC0415

    only = dict(args.only)
    unknown = sorted(set(only) - {name for name, _, _ in args.upstream})
    if unknown:
        print(f"mock: --only names no --upstream: {', '.join(unknown)}", file=sys.stderr)
        return 2
    sites = []
    for name, up, key_var in args.upstream:
        key = os.environ.get(key_var) if key_var else None
        if key_var and not key:
            print(f"mock: environment variable {key_var} is not set", file=sys.stderr)
            return 2
        tls = (args.tls_cert, args.tls_key) if args.tls_cert and args.tls_key else None
        sites.append(MockSite(name, up.host, up.port, key, tls, only.get(name)))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_mock(sites))
    return 0


def new_key() -> str:
    """A fresh random virtual key (``sk-`` + 192 bits)."""
    return "sk-" + secrets.token_urlsafe(24)


def _cmd_keys(args: argparse.Namespace) -> int:
    from extproc.core.access import hash_key  # noqa: PLC0415

    if args.action == "new":
        key = new_key()
        print(f"key: {key}\nhash: {hash_key(key)}")
        print("Give the key to the caller; put only the hash in the policy's keys list.")
        return 0
    plaintext = args.key if args.key is not None else sys.stdin.readline().strip()
    if not plaintext:
        print("keys hash: no key given (argument or standard input)", file=sys.stderr)
        return 2
    print(hash_key(plaintext))
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--policy",
            dest="policy_path",
            type=Path,
            default=None,
            help="policy file (EXTPROC_POLICY_PATH)",
        )
        p.add_argument("--grpc-port", type=int, default=None, help="EXTPROC_GRPC_PORT")
        p.add_argument("--admin-port", type=int, default=None, help="EXTPROC_ADMIN_PORT")
        p.add_argument("--store", dest="store_url", default=None, help="EXTPROC_STORE_URL")

    def upstream_ca(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--upstream-ca",
            default=None,
            help="CA bundle that TLS upstreams' certificates are checked against "
            "(default: the system's)",
        )

    p = sub.add_parser("serve", help="run the gRPC server (for your own Envoy)")
    common(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("up", help="run server + embedded Envoy + mock upstreams")
    common(p)
    p.add_argument("--port", type=int, default=10000, help="Envoy listener port")
    p.add_argument("--envoy-admin-port", type=int, default=9901)
    p.add_argument("--mock-base-port", type=int, default=18001)
    p.add_argument("--mode", choices=("ext_proc", "ext_authz"), default="ext_proc")
    upstream_ca(p)
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where this gateway keeps its spend journal (default: one directory per "
        "policy file under ~/.local/state/extproc/up)",
    )
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("check", help="validate a policy, and cross-check an Envoy config")
    common(p)
    p.add_argument("--envoy", type=Path, default=None, help="Envoy YAML to cross-check")
    p.add_argument(
        "--no-credentials",
        action="store_true",
        help="do not require the credential environment variables to be set",
    )
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("envoy-config", help="render an Envoy config for a policy")
    common(p)
    p.add_argument("--mode", choices=("ext_proc", "ext_authz"), default="ext_proc")
    p.add_argument("--port", type=int, default=10000)
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument("--server-host", default="127.0.0.1")
    p.add_argument(
        "--extra-server-port",
        type=int,
        action="append",
        default=[],
        help="one more server process on --server-host (repeat; one per core)",
    )
    p.add_argument("--envoy-admin-port", type=int, default=9901)
    p.add_argument("--mock-base-port", type=int, default=18001)
    p.add_argument("--mock-host", default="127.0.0.1")
    p.add_argument(
        "--upstream",
        type=_parse_upstream,
        action="append",
        default=[],
        help="CLUSTER=HOST:PORT[:tls], overriding the mock address",
    )
    upstream_ca(p)
    p.add_argument("--failure-mode-allow", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=_cmd_envoy_config)

    p = sub.add_parser("keys", help="make virtual keys and their policy hashes")
    p.add_argument("action", choices=("new", "hash"))
    p.add_argument(
        "key", nargs="?", default=None, help="for `hash`: the key (else read from standard input)"
    )
    p.set_defaults(func=_cmd_keys)

    _add_mock_parser(sub)
    return parser


def _add_mock_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("mock", help="run mock OpenAI/Anthropic upstreams")
    p.add_argument(
        "--upstream",
        type=_parse_upstream,
        action="append",
        required=True,
        help="NAME=HOST:PORT[:ENVVAR] (ENVVAR holds the API key to require)",
    )
    p.add_argument("--tls-cert", default=None, help="serve HTTPS with this certificate chain")
    p.add_argument("--tls-key", default=None, help="... and this private key")
    p.add_argument(
        "--only",
        type=_parse_only,
        action="append",
        default=[],
        metavar="NAME=API",
        help="site NAME speaks one API (openai or anthropic), refusing the other's paths",
    )
    p.set_defaults(func=_cmd_mock)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before a command's own signal handling is in place (while it starts)
        return 130
    except Exception as exc:
        if interrupted(exc):
            return 130
        raise


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ctrl-C in disguise. Rule: a KeyboardInterrupt raised while a
    module is imported can come back wrapped (a class body's ``__set_name__`` turns it
    into a RuntimeError whose cause is the interrupt); it is still a Ctrl-C."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _main(argv: list[str] | None) -> int:
    from pydantic import ValidationError  # noqa: PLC0415

    args = _build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValidationError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
