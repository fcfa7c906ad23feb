"""Side-by-side throughput: Envoy alone vs Envoy + this server, same load, one run.

    python bench/bench.py [--duration 10] [--connections 16]

Starts a mock upstream, the server and three Envoys on free loopback ports:
Envoy alone -> mock; Envoy + ext_proc -> mock; Envoy + ext_authz -> mock. Each gets
the same chat-completion POST load from wrk (if installed; `apt-get install wrk`)
or from a built-in aiohttp load generator, and the script prints req/s, p50, p99
and the ratio to Envoy alone. Timings are noisy on small machines: compare rows of
one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc.envoy_config import Upstream, render_envoy_config  # noqa: E402
from tests.helpers import (  # noqa: E402
    Proc,
    envoy_argv,
    extproc_argv,
    free_port,
    http_ok,
    port_open,
    redis_proc,
    running,
)

BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say hello in one word."}]}
#: A call of a capped session: the server counts it in the store (one round trip).
CAPPED = {**BODY, "model": "bench-capped"}
SESSION = {"x-litellm-session-id": "bench-session"}
KEY = "sk-bench-upstream"


def plain_envoy_config(listen: int, admin: int, upstream: int) -> str:
    """Envoy alone: every request to the mock, no filter but the router."""
    full = yaml.safe_load(
        render_envoy_config(
            {"bench_upstream": Upstream("127.0.0.1", upstream)},
            listen=Upstream("127.0.0.1", listen),
            admin=Upstream("127.0.0.1", admin),
            access_log_path="/dev/null",
        )
    )
    hcm = full["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    typed = hcm["typed_config"]
    typed["http_filters"] = [f for f in typed["http_filters"] if f["name"].endswith("router")]
    typed.pop("early_header_mutation_extensions")
    typed["route_config"]["virtual_hosts"][0]["routes"] = [
        {
            "match": {"prefix": "/"},
            "route": {"cluster": "bench_upstream"},
            # the credential the server would inject, so the mock answers 200 here too
            "request_headers_to_add": [
                {
                    "header": {"key": "authorization", "value": f"Bearer {KEY}"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }
    ]
    full["static_resources"]["clusters"] = full["static_resources"]["clusters"][1:]
    return str(yaml.safe_dump(full, sort_keys=False))


def run_wrk(
    url: str,
    duration: int,
    connections: int,
    workdir: Path,
    *,
    body: dict[str, Any],
    headers: dict[str, str],
) -> dict[str, float]:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        'wrk.headers["Authorization"] = "Bearer sk-client"\n'
        + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    )
    out = subprocess.run(
        [
            shutil.which("wrk") or "wrk",
            "-t",
            "2",
            "-c",
            str(connections),
            "-d",
            f"{duration}s",
            "--latency",
            "-s",
            str(script),
            f"{url}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if not match:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        return float(match.group(1)) * scale

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(rps.group(1)) if rps else float("nan"),
        "p50": latency("50"),
        "p99": latency("99"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
    }


async def _loadgen(
    url: str, duration: int, connections: int, body_json: str, extra_json: str
) -> dict[str, float]:
    import aiohttp  # noqa: PLC0415

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration
    body = body_json.encode()
    headers = {
        "content-type": "application/json",
        "authorization": "Bearer sk-client",
        **json.loads(extra_json),
    }

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append((time.perf_counter() - start) * 1000)

    async with aiohttp.ClientSession() as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))]

    return {
        "rps": len(latencies) / elapsed,
        "p50": pct(0.5),
        "p99": pct(0.99),
        "errors": float(errors),
    }


def run_python_loadgen(
    url: str, duration: int, connections: int, body: dict[str, Any], headers: dict[str, str]
) -> dict[str, float]:
    """The aiohttp load generator in its own process, so it has its own core."""
    code = (
        "import asyncio, json, sys; sys.path.insert(0, sys.argv[1]);"
        "from bench.bench import _loadgen;"
        "print(json.dumps(asyncio.run(_loadgen(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),"
        " sys.argv[5], sys.argv[6]))))"
    )
    argv = [str(ROOT), url, str(duration), str(connections), json.dumps(body), json.dumps(headers)]
    out = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


@contextlib.contextmanager
def envoy(workdir: Path, name: str, config: str, admin: int) -> Iterator[None]:
    path = workdir / f"{name}.yaml"
    path.write_text(config)
    with running(
        Proc(name, envoy_argv(path), workdir / f"{name}.log"),
        lambda: http_ok(f"http://127.0.0.1:{admin}/ready"),
    ):
        yield


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--store",
        choices=("redis", "memory"),
        default="redis" if shutil.which("redis-server") else "memory",
        help="the server's store: a private redis-server (default when installed) or memory",
    )
    args = parser.parse_args()
    use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and shutil.which("wrk"))
    workdir = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    mock_port, grpc_port, admin_port = free_port(), free_port(), free_port()
    env = {"BENCH_UPSTREAM_KEY": KEY}
    mock = Proc(
        "mock",
        extproc_argv(
            "mock", "--upstream", f"bench_upstream=127.0.0.1:{mock_port}:BENCH_UPSTREAM_KEY"
        ),
        workdir / "mock.log",
        env=env,
    )
    redis_port = free_port()
    redis_server = redis_proc(workdir, redis_port) if args.store == "redis" else None
    store_url = f"redis://127.0.0.1:{redis_port}/0" if redis_server else "memory://"
    server = Proc(
        "server",
        extproc_argv("serve"),
        workdir / "server.log",
        env={
            **env,
            "EXTPROC_STORE_URL": store_url,
            "EXTPROC_POLICY_PATH": str(ROOT / "bench" / "policy.yaml"),
            "EXTPROC_SPEND_JOURNAL": str(workdir / "spend.jsonl"),
            "EXTPROC_GRPC_PORT": str(grpc_port),
            "EXTPROC_ADMIN_PORT": str(admin_port),
            "EXTPROC_LOG_LEVEL": "WARNING",
        },
    )
    setups: list[tuple[str, str, int, int, dict[str, Any], dict[str, str]]] = []
    for label, mode, body, headers in (
        ("Envoy alone", None, BODY, {}),
        ("Envoy + ext_proc", "ext_proc", BODY, {}),
        ("ext_proc, capped session", "ext_proc", CAPPED, SESSION),
        ("Envoy + ext_authz", "ext_authz", BODY, {}),
        ("ext_authz, capped session", "ext_authz", CAPPED, SESSION),
    ):
        listen, admin = free_port(), free_port()
        if mode is None:
            config = plain_envoy_config(listen, admin, mock_port)
        else:
            config = render_envoy_config(
                {"bench_upstream": Upstream("127.0.0.1", mock_port)},
                mode=mode,  # type: ignore[arg-type]
                listen=Upstream("127.0.0.1", listen),
                server=Upstream("127.0.0.1", grpc_port),
                admin=Upstream("127.0.0.1", admin),
                access_log_path="/dev/null",
            )
        setups.append((label, config, listen, admin, body, headers))

    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if redis_server is not None:
            stack.enter_context(running(redis_server[0], lambda: port_open(redis_port)))
        stack.enter_context(running(mock, lambda: port_open(mock_port)))
        stack.enter_context(
            running(server, lambda: http_ok(f"http://127.0.0.1:{admin_port}/healthz"))
        )
        for i, (label, config, listen, admin, body, headers) in enumerate(setups):
            with envoy(workdir, f"envoy{i}", config, admin):
                url = f"http://127.0.0.1:{listen}"
                time.sleep(2.5)  # the ext_proc cluster's first health check
                warm = 2
                if use_wrk:
                    run_wrk(url, warm, args.connections, workdir, body=body, headers=headers)
                    result = run_wrk(
                        url, args.duration, args.connections, workdir, body=body, headers=headers
                    )
                else:
                    run_python_loadgen(url, warm, args.connections, body, headers)
                    result = run_python_loadgen(url, args.duration, args.connections, body, headers)
                rows.append({"setup": label, **result})
    base = rows[0]["rps"]
    tool = "wrk -t2" if use_wrk else "aiohttp load generator"
    print(
        f"\n{tool}, {args.connections} connections, {args.duration}s per setup, "
        f"small chat-completion POST, loopback, store {args.store}\n"
    )
    print(
        f"| {'setup':<26} | {'req/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | {'non-2xx':>7} | "
        f"{'vs Envoy alone':>14} |"
    )
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 16}|")
    for row in rows:
        print(
            f"| {row['setup']:<26} | {row['rps']:>9.0f} | {row['p50']:>7.2f} | "
            f"{row['p99']:>7.2f} | {row['errors']:>7.0f} | {row['rps'] / base:>13.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
