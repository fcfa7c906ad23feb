"""The ruler: the same load against Envoy alone, a do-nothing ext_proc server, this
server with a full policy, and the LiteLLM proxy, in one run on one machine.

    python bench/bench.py [--duration 15] [--connections 16] [--skip-litellm]

Rows, each against the same mock upstream (one process serving three ports, one per
deployment) and the same load:

  a  Envoy alone -> mock (weighted clusters over the three ports, credential added by
     the route);
  b  Envoy + a do-nothing grpc.aio ext_proc server (bench/noop_extproc.py) behind the
     same generated Envoy config as c, answering the same phases with empty replies:
     the framework floor;
  c  Envoy + this server, full policy (bench/policy.yaml): virtual key, session cap,
     key rpm/tpm/parallel limits, key + team + tag + provider budgets with reservation
     and settlement, weighted routing over three deployments, usage accounting, on a
     private Redis;
  c0 Envoy + this server with bench/policy-routing.yaml: the same deployments and
     prices, no key, cap or budget, so no store call (what the adapters and routing
     cost over the floor);
  t  as c0, but the deployments speak Anthropic's API (bench/policy-translate.yaml):
     every call of the load is translated (request, answer, stream) by the server;
     t beside c0 is the cost of a translated call beside an untranslated one;
  c' the same server and policy through the ext_authz variant (--skip-authz drops it);
  d  the LiteLLM proxy (pinned version, installed on first run into
     bench/.litellm-venv), one worker, no database: three deployments with weights,
     simple-shuffle, a master key.

The load alternates a JSON call and an SSE call (``stream: true`` with
``stream_options.include_usage``) on every connection: half and half. Each row
reports req/s, p50, p99, non-2xx, the CPU time of the server's process tree (and of
Envoy and Redis) per request served, and the server's RSS; the run is written as a
markdown file under bench/results/ (``--output``). Compare rows of one run, not runs
of different days.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_sync
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc.cli.up import envoy_binary  # noqa: E402
from extproc.envoy.config import Upstream, render_envoy_config  # noqa: E402
from tests.helpers import (  # noqa: E402
    PYTHON,
    Proc,
    envoy_argv,
    extproc_argv,
    free_port,
    http_ok,
    port_open,
    redis_proc,
    running,
    wait_until,
)

#: The LiteLLM release row d runs (the newest whose ``[proxy]`` extra resolves).
LITELLM_VERSION = "1.108.7"
LITELLM_VENV = ROOT / "bench" / ".litellm-venv"

#: The client's key: a virtual key of the policy, LiteLLM's master key.
CLIENT_KEY = "sk-bench-client"
PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello in one word."}]
JSON_BODY = {"model": "bench", "messages": MESSAGES}
SSE_BODY = {**JSON_BODY, "stream": True, "stream_options": {"include_usage": True}}
BODIES = (JSON_BODY, SSE_BODY)
HEADERS = {
    "content-type": "application/json",
    "authorization": f"Bearer {CLIENT_KEY}",
    # one session, capped far above any run (counted in the store on every call)
    "x-litellm-session-id": "bench-session",
    "x-litellm-tags": "bench",
}


@dataclass(frozen=True)
class Dep:
    """One of bench/policy.yaml's deployments."""

    id: str
    cluster: str
    key_env: str
    key: str
    weight: int


DEPLOYMENTS = (
    Dep("bench-a", "bench_a", "BENCH_KEY_A", "sk-upstream-a", 3),
    Dep("bench-b", "bench_b", "BENCH_KEY_B", "sk-upstream-b", 2),
    Dep("bench-c", "bench_c", "BENCH_KEY_C", "sk-upstream-c", 1),
)
KEY_ENV = {d.key_env: d.key for d in DEPLOYMENTS}

# --- process CPU and memory, from /proc ----------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def tree(root: int) -> list[int]:
    """``root`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_by_pid(roots: list[int]) -> dict[int, float]:
    out = {}
    for root in roots:
        for pid in tree(root):
            stat = _stat(pid)
            if stat is not None:
                out[pid] = stat[1]
    return out


def cpu_since(roots: list[int], before: dict[int, float]) -> float:
    """CPU seconds the process trees used since ``before`` (new processes count whole)."""
    return sum(now - before.get(pid, 0.0) for pid, now in cpu_by_pid(roots).items())


def rss_mib(roots: list[int]) -> float:
    total = 0
    for root in roots:
        for pid in tree(root):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
    return total / 1024


# --- load -----------------------------------------------------------------------------


@dataclass
class Load:
    duration: int
    connections: int
    threads: int
    use_wrk: bool
    workdir: Path


def _wrk_script(workdir: Path) -> Path:
    """Alternate the JSON and the SSE call on every connection."""
    path = workdir / "mix.lua"
    headers = ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in HEADERS.items())
    bodies = ", ".join(json.dumps(json.dumps(b)) for b in BODIES)
    path.write_text(
        f"local bodies = {{{bodies}}}\n"
        "local requests = {}\n"
        "local n = 0\n"
        "function init(args)\n"
        "  for i, body in ipairs(bodies) do\n"
        f"    requests[i] = wrk.format('POST', {json.dumps(PATH)}, {{{headers}}}, body)\n"
        "  end\n"
        "end\n"
        "function request()\n"
        "  n = n + 1\n"
        "  return requests[n % #requests + 1]\n"
        "end\n"
    )
    return path


def run_wrk(url: str, seconds: int, load: Load) -> dict[str, float]:
    out = subprocess.run(
        [
            shutil.which("wrk") or "wrk",
            "-t",
            str(load.threads),
            "-c",
            str(load.connections),
            "-d",
            f"{seconds}s",
            "--latency",
            "-s",
            str(_wrk_script(load.workdir)),
            url + PATH,
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
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(rps.group(1)) if rps else float("nan"),
        "requests": float(total.group(1)) if total else 0.0,
        "p50": latency("50"),
        "p99": latency("99"),
        "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "socket_errors": float(sum(int(g) for g in errors.groups())) if errors else 0.0,
    }


async def _loadgen(url: str, duration: int, connections: int) -> dict[str, float]:
    import aiohttp  # noqa: PLC0415

    latencies: list[float] = []
    non2xx = errors = 0
    stop_at = time.perf_counter() + duration
    bodies = [json.dumps(b).encode() for b in BODIES]

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal non2xx, errors
        n = 0
        while time.perf_counter() < stop_at:
            n += 1
            start = time.perf_counter()
            try:
                async with session.post(
                    url + PATH, data=bodies[n % len(bodies)], headers=HEADERS
                ) as r:
                    await r.read()
                    if not 200 <= r.status < 400:
                        non2xx += 1
            except aiohttp.ClientError:
                errors += 1
                continue
            latencies.append((time.perf_counter() - start) * 1000)

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))]

    return {
        "rps": len(latencies) / elapsed,
        "requests": float(len(latencies)),
        "p50": pct(0.5),
        "p99": pct(0.99),
        "non2xx": float(non2xx),
        "socket_errors": float(errors),
    }


def run_python_loadgen(url: str, seconds: int, load: Load) -> dict[str, float]:
    """The aiohttp load generator in its own process, so it has its own core."""
    code = (
        "import asyncio, json, sys; sys.path.insert(0, sys.argv[1]);"
        "from bench.bench import _loadgen;"
        "print(json.dumps(asyncio.run(_loadgen(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))))"
    )
    argv = [str(ROOT), url, str(seconds), str(load.connections)]
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def run_load(url: str, seconds: int, load: Load) -> dict[str, float]:
    return (run_wrk if load.use_wrk else run_python_loadgen)(url, seconds, load)


# --- one row --------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    result: dict[str, float]
    server_cpu_us: float | None
    server_rss_mib: float | None
    envoy_cpu_us: float | None
    redis_cpu_us: float | None
    notes: list[str] = field(default_factory=list)


def _mock_requests(port: int, method: str = "GET") -> list[dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/_mock/requests", method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
        data = json.loads(resp.read())
    return data if isinstance(data, list) else []


def upstream_seen(mock_ports: dict[str, int]) -> str:
    """Which deployments the row's calls reached and how many were streams, from what
    the mock kept (its last 10,000 requests per port)."""
    counts, streamed = {}, 0
    for cluster, port in mock_ports.items():
        seen = _mock_requests(port)
        counts[cluster] = len(seen)
        streamed += sum(1 for r in seen if json.loads(r["body"] or "{}").get("stream") is True)
    total = sum(counts.values())
    split = ", ".join(f"{c} {n}" for c, n in counts.items())
    share = f"{100 * streamed / total:.0f}%" if total else "-"
    return f"upstream saw {split} (weights 3/2/1; at most 10,000 kept per port), {share} streams"


def measure(
    key: str,
    label: str,
    url: str,
    load: Load,
    warmup: int,
    *,
    server: list[int],
    envoy: int | None,
    redis: int | None,
    mock_ports: dict[str, int],
    redis_port: int | None = None,
) -> Row:
    run_load(url, warmup, load)
    for port in mock_ports.values():
        _mock_requests(port, "DELETE")
    envoy_roots = [envoy] if envoy else []
    redis_roots = [redis] if redis else []
    if redis_port is not None:
        redis_commands(redis_port, reset=True)
    before = {
        "server": cpu_by_pid(server),
        "envoy": cpu_by_pid(envoy_roots),
        "redis": cpu_by_pid(redis_roots),
    }
    result = run_load(url, load.duration, load)
    served = result["requests"] or float("nan")

    def per_request(roots: list[int], name: str) -> float | None:
        return cpu_since(roots, before[name]) / served * 1e6 if roots else None

    row = Row(
        key,
        label,
        result,
        server_cpu_us=per_request(server, "server"),
        server_rss_mib=rss_mib(server) if server else None,
        envoy_cpu_us=per_request(envoy_roots, "envoy"),
        redis_cpu_us=per_request(redis_roots, "redis"),
        notes=[upstream_seen(mock_ports)],
    )
    if redis_port is not None:
        row.notes.append(commands_note(redis_commands(redis_port), result["requests"]))
        row.notes.append(sample_round_trips(redis_port, url, load))
    print(
        f"  {key:<3} {label}: {result['rps']:.0f} req/s, p50 {result['p50']:.2f} ms, "
        f"non-2xx {result['non2xx']:.0f}",
        flush=True,
    )
    return row


def redis_commands(port: int, *, reset: bool = False) -> dict[str, int]:
    """Redis's count of calls per command since its last reset (``INFO commandstats``);
    ``reset`` starts the count again."""
    client = redis_sync.Redis(host="127.0.0.1", port=port)
    try:
        if reset:
            client.config_resetstat()
            return {}
        stats = client.info("commandstats")
    finally:
        client.close()
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if isinstance(value, dict) and name not in ("cmdstat_config", "cmdstat_info")
    }


_MONITOR_LINE = re.compile(r'^[0-9.]+ \[\d+ ([^\]]+)\] "([^"]+)"')
#: Reads a client sends as one pipeline (the routing snapshot): a run of them on one
#: connection is one round trip.
_PIPELINED = frozenset({"get", "pttl", "lrange", "lpush", "ltrim", "pexpire"})


def round_trips(monitor_log: str) -> tuple[int, dict[str, int]]:
    """(round trips, client commands by name) in a ``MONITOR`` log: every command a
    client sent (commands run by scripts, ``[0 lua]``, are not trips), a run of
    pipelined reads on one connection counted once."""
    trips, by_name = 0, dict[str, int]()
    last: dict[str, str] = {}
    for line in monitor_log.splitlines():
        match = _MONITOR_LINE.match(line)
        if match is None or match.group(1) == "lua":
            continue
        client, name = match.group(1), match.group(2).lower()
        if name in ("monitor", "config", "info"):
            continue
        by_name[name] = by_name.get(name, 0) + 1
        if not (name in _PIPELINED and last.get(client) in _PIPELINED):
            trips += 1
        last[client] = name
    return trips, by_name


def sample_round_trips(port: int, url: str, load: Load, seconds: int = 5) -> str:
    """Store round trips per call under the same load, from Redis's ``MONITOR`` over a
    short extra run (after the measured one: MONITOR slows Redis down)."""
    log = load.workdir / f"monitor-{port}.log"
    cli = shutil.which("redis-cli")
    if cli is None:
        return "round trips: redis-cli not found"
    with log.open("w") as out:
        monitor = subprocess.Popen([cli, "-h", "127.0.0.1", "-p", str(port), "monitor"], stdout=out)
        try:
            time.sleep(0.3)
            reads = _reads(port)
            result = run_load(url, seconds, load)
            time.sleep(0.3)
            reads = _reads(port) - reads - 1  # the second INFO is a read too
        finally:
            monitor.terminate()
            monitor.wait(timeout=10)
    trips, by_name = round_trips(log.read_text(errors="replace"))
    calls = result["requests"] or float("nan")
    parts = ", ".join(
        f"{n} {c / calls:.2f}" for n, c in sorted(by_name.items(), key=lambda i: -i[1])
    )
    return (
        f"store round trips per call: {trips / calls:.2f} over {calls:.0f} calls "
        f"(client commands per call: {parts}; Redis MONITOR, background work included; "
        f"socket reads per call: {reads / calls:.2f}, INFO total_reads_processed: a "
        "pipeline of several calls' writes is one)"
    )


def _reads(port: int) -> int:
    """Client writes Redis has read so far (one per round trip, a pipeline's included)."""
    client = redis_sync.Redis(host="127.0.0.1", port=port)
    try:
        return int(client.info("stats")["total_reads_processed"])
    finally:
        client.close()


def commands_note(calls: dict[str, int], requests: float) -> str:
    """Store round trips per call: every command Redis served over the measured run
    (the row's requests, background work included), divided by the requests."""
    if not requests:
        return "redis commands: no requests"
    total = sum(calls.values())
    top = sorted(calls.items(), key=lambda item: -item[1])
    parts = ", ".join(f"{name} {count / requests:.2f}" for name, count in top)
    return (
        "redis commands executed per call (scripts' own included): "
        f"{total / requests:.2f} ({parts}; INFO commandstats)"
    )


def _pid(proc: Proc) -> int:
    assert proc.popen is not None
    return int(proc.popen.pid)


# --- Envoy ----------------------------------------------------------------------------


def _clusters(mock_ports: dict[str, int]) -> dict[str, Upstream]:
    return {d.cluster: Upstream("127.0.0.1", mock_ports[d.cluster]) for d in DEPLOYMENTS}


def plain_envoy_config(listen: int, admin: int, mock_ports: dict[str, int]) -> str:
    """Envoy alone: the generated config without the server, routing by weight over the
    three deployments with their credentials added by the route."""
    full = yaml.safe_load(
        render_envoy_config(
            _clusters(mock_ports),
            listen=Upstream("127.0.0.1", listen),
            admin=Upstream("127.0.0.1", admin),
            access_log_path="/dev/null",
        )
    )
    typed = full["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    typed["http_filters"] = [f for f in typed["http_filters"] if f["name"].endswith("router")]
    typed["access_log"] = [a for a in typed["access_log"] if a["name"].endswith(".file")]
    typed.pop("early_header_mutation_extensions")
    host = typed["route_config"]["virtual_hosts"][0]
    host.pop("response_headers_to_add", None)
    host["routes"] = [
        {
            "match": {"prefix": "/"},
            "route": {
                "timeout": "600s",
                "weighted_clusters": {
                    "clusters": [
                        {
                            "name": d.cluster,
                            "weight": d.weight,
                            # the credential the server would inject
                            "request_headers_to_add": [
                                {
                                    "header": {"key": "authorization", "value": f"Bearer {d.key}"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                }
                            ],
                        }
                        for d in DEPLOYMENTS
                    ]
                },
            },
        }
    ]
    full["static_resources"]["clusters"] = [
        c for c in full["static_resources"]["clusters"] if c["name"] != "extproc"
    ]
    return str(yaml.safe_dump(full, sort_keys=False))


def server_envoy_config(
    mode: str, listen: int, admin: int, grpc_port: int, mock_ports: dict[str, int]
) -> str:
    return render_envoy_config(
        _clusters(mock_ports),
        mode=mode,  # type: ignore[arg-type]
        listen=Upstream("127.0.0.1", listen),
        server=Upstream("127.0.0.1", grpc_port),
        admin=Upstream("127.0.0.1", admin),
        access_log_path="/dev/null",
    )


def _extproc_healthy(admin: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters", timeout=1) as resp:
            text = resp.read().decode()
    except OSError:
        return False
    return bool(re.search(r"^extproc::[\d.:]+::health_flags::healthy$", text, re.MULTILINE))


@contextlib.contextmanager
def envoy(workdir: Path, name: str, config: str, admin: int, *, gated: bool) -> Iterator[Proc]:
    path = workdir / f"{name}.yaml"
    path.write_text(config)
    with running(
        Proc(name, envoy_argv(path), workdir / f"{name}.log"),
        lambda: http_ok(f"http://127.0.0.1:{admin}/ready"),
    ) as proc:
        if gated:
            # the first active health check of the server must pass before load
            wait_until(lambda: _extproc_healthy(admin), 20, f"{name}: ext_proc cluster healthy")
        yield proc


# --- LiteLLM --------------------------------------------------------------------------


def litellm_installed() -> str | None:
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


def ensure_litellm(version: str) -> str:
    """The LiteLLM proxy in its own virtualenv: created on first run, reused after."""
    installed = litellm_installed()
    if installed == version:
        return installed
    print(f"installing litellm[proxy]=={version} into {LITELLM_VENV} (once) ...", flush=True)
    if not (LITELLM_VENV / "bin" / "python").exists():
        subprocess.run([PYTHON, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run(
        [
            str(LITELLM_VENV / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            f"litellm[proxy]=={version}",
        ],
        check=True,
    )
    return litellm_installed() or "?"


def litellm_config(mock_ports: dict[str, int]) -> dict[str, Any]:
    """What LiteLLM can run of bench/policy.yaml without a database."""
    return {
        "model_list": [
            {
                "model_name": "bench",
                "litellm_params": {
                    "model": "openai/bench-upstream-model",
                    "api_base": f"http://127.0.0.1:{mock_ports[d.cluster]}/v1",
                    "api_key": d.key,
                    "weight": d.weight,
                    # the policy's prices: LiteLLM prices every call too
                    "input_cost_per_token": 0.0000025,
                    "output_cost_per_token": 0.00001,
                },
                "model_info": {"id": d.id},
            }
            for d in DEPLOYMENTS
        ],
        "router_settings": {"routing_strategy": "simple-shuffle"},
        "general_settings": {"master_key": CLIENT_KEY},
        "litellm_settings": {"set_verbose": False},
    }


#: Row d's environment: the bundled price map (never a download at start), quiet logs.
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}


def litellm_proc(workdir: Path, port: int, mock_ports: dict[str, int]) -> Proc:
    config = workdir / "litellm.yaml"
    config.write_text(yaml.safe_dump(litellm_config(mock_ports), sort_keys=False))
    return Proc(
        "litellm",
        [
            str(LITELLM_VENV / "bin" / "litellm"),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        workdir / "litellm.log",
        env=LITELLM_ENV,
    )


#: What row d leaves out, said in the output and the README.
LITELLM_GAPS = (
    "LiteLLM without a database enforces no virtual keys (only the master key is "
    "checked), no key/team/tag budgets and no session caps; row d routes (weighted "
    "simple-shuffle over the three deployments), prices each call and proxies the "
    "bytes, in Python."
)


# --- machine and report ---------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine(load: Load, litellm: str | None, store: str) -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    envoy_version = _first_line([envoy_binary(), "--version"])
    match = re.search(r"/(\d+\.\d+\.\d+)/", envoy_version)
    wrk = re.search(r"wrk [^ ]*?(\d+\.\d+\.\d+)", _first_line(["wrk", "-v"]))
    tool = (
        f"wrk {wrk.group(1) if wrk else '?'} -t{load.threads}"
        if load.use_wrk
        else "built-in aiohttp load generator"
    )
    sha = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": sha + (" (with uncommitted changes)" if dirty not in ("", "?") else ""),
        "cores": str(os.cpu_count()),
        "CPU": model,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "Envoy": match.group(1) if match else envoy_version,
        "LiteLLM": litellm or "not run",
        "grpcio": importlib.metadata.version("grpcio"),
        "load": f"{tool}, {load.connections} connections, {load.duration} s per row",
        "store": store,
    }


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}x"


def table(rows: list[Row]) -> str:
    head = (
        "| row | setup | req/s | p50 ms | p99 ms | non-2xx | server CPU µs/req "
        "| server RSS MiB | Envoy CPU µs/req | Redis CPU µs/req |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = []
    for r in rows:
        bad = r.result["non2xx"] + r.result.get("socket_errors", 0.0)
        lines.append(
            f"| {r.key} | {r.label} | {_fmt(r.result['rps'])} | {_fmt(r.result['p50'], 2)} "
            f"| {_fmt(r.result['p99'], 2)} | {_fmt(bad)} | {_fmt(r.server_cpu_us)} "
            f"| {_fmt(r.server_rss_mib, 1)} | {_fmt(r.envoy_cpu_us)} | {_fmt(r.redis_cpu_us)} |"
        )
    return head + "\n".join(lines) + "\n"


def ratios(rows: list[Row]) -> str:
    by = {r.key: r for r in rows}

    def rps(key: str) -> float | None:
        return by[key].result["rps"] if key in by else None

    def p50(key: str) -> float | None:
        return by[key].result["p50"] if key in by else None

    def cpu(key: str) -> float | None:
        return by[key].server_cpu_us if key in by else None

    return (
        "| ratio | value |\n| --- | ---: |\n"
        f"| throughput c/a (this server vs Envoy alone) | {_ratio(rps('c'), rps('a'))} |\n"
        f"| throughput c/b (vs the do-nothing ext_proc floor) | {_ratio(rps('c'), rps('b'))} |\n"
        f"| throughput c/d (vs LiteLLM) | {_ratio(rps('c'), rps('d'))} |\n"
        f"| p50 c/d (this server's p50 as a share of LiteLLM's) | {_ratio(p50('c'), p50('d'))} |\n"
        f"| server CPU per request c/d | {_ratio(cpu('c'), cpu('d'))} |\n"
        f"| server CPU per request c/b | {_ratio(cpu('c'), cpu('b'))} |\n"
        f"| throughput c0/b (routing only vs the floor) | {_ratio(rps('c0'), rps('b'))} |\n"
        f"| server CPU per request c0/b | {_ratio(cpu('c0'), cpu('b'))} |\n"
        f"| server CPU per request t/c0 (translated vs not) | {_ratio(cpu('t'), cpu('c0'))} |\n"
        f"| throughput t/c0 | {_ratio(rps('t'), rps('c0'))} |\n"
    )


ROW_NOTES = {
    "a": "Envoy alone → mock: the generated listener without the server, weighted "
    "clusters over the three deployment ports, credential added by the route.",
    "b": "Envoy + bench/noop_extproc.py, the same generated ext_proc config as c: request "
    "headers, buffered body (replied with the routing header + credential of the next "
    "deployment in a fixed 3/2/1 rotation), response headers (a 2xx switches the response "
    "body to STREAMED, as the server does), response body pieces; empty replies otherwise.",
    "c": "Envoy + this server, bench/policy.yaml: virtual key, session cap, the key's "
    "rpm, tpm and parallel-request limits, key + team + "
    "tag + provider budgets (reserved at admission, settled from the response's usage), "
    "simple-shuffle by weight 3/2/1 over three deployments, on a private redis-server.",
    "c0": "Envoy + this server, bench/policy-routing.yaml: the same three deployments, "
    "weights and prices, no virtual key, session cap or budget (so no store call): "
    "request parsing, weighted routing, the body rewrite, usage metering and pricing.",
    "t": "as c0 with bench/policy-translate.yaml: the three deployments speak "
    "Anthropic's API, so every OpenAI chat call is translated into an Anthropic messages "
    "call and its answer (JSON, or the stream event by event) back into OpenAI's.",
    "c'": "the same server and policy through Envoy's ext_authz (unary Check with the "
    "body) plus the response-only ext_proc filter that settles the charge.",
    "d": "LiteLLM proxy, one worker, no database: the three deployments with weights "
    "3/2/1, routing_strategy simple-shuffle, master_key. " + LITELLM_GAPS,
}


def report(
    rows: list[Row],
    info: dict[str, str],
    checks: list[str],
    *,
    smoke: bool,
    cmdline: str,
    litellm_yaml: str | None,
) -> str:
    title = "Benchmark run" + (" — SMOKE RUN, not a measurement" if smoke else "")
    parts = [f"# {title}\n\n"]
    if smoke:
        parts.append(
            "A short run to prove the script works end to end, on a shared machine; "
            "its numbers say nothing about performance.\n\n"
        )
    parts.append(f"Command: `{cmdline}`\n\n")
    parts.append("| machine | |\n| --- | --- |\n")
    parts.append("".join(f"| {k} | {v} |\n" for k, v in info.items()))
    parts.append(
        "\nLoad: every connection alternates a JSON chat completion and an SSE one "
        "(`stream: true`, `stream_options.include_usage`): half and half. Same mock "
        "upstream (one process, three ports), same key, session and tag headers for "
        "every row. CPU is the process tree's user + system time over the measured "
        "run divided by the requests served; RSS at the end of the run. Everything "
        "shares the machine's cores, load generator included.\n\n"
    )
    parts.append(table(rows))
    parts.append("\n" + ratios(rows))
    parts.append("\n## Rows\n\n")
    parts.append("".join(f"- **{r.key}** {ROW_NOTES[r.key]}\n" for r in rows))
    parts.append("\n## Checks\n\n")
    parts.append("".join(f"- {r.key}: {note}\n" for r in rows for note in r.notes))
    parts.append("".join(f"- {c}\n" for c in checks))
    if litellm_yaml:
        parts.append(
            "\n## Row d's LiteLLM config\n\n"
            f"Started as `litellm --config litellm.yaml --host 127.0.0.1 --port PORT "
            f"--num_workers 1` with {', '.join(f'`{k}={v}`' for k, v in LITELLM_ENV.items())}."
            f"\n\n```yaml\n{litellm_yaml}```\n"
        )
    return "".join(parts)


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def _text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
        return str(resp.read().decode())


def server_checks(admin_port: int) -> list[str]:
    """Proof that rows c and c' ran the policy: spend on every budget, settlements."""
    out = []
    spend = {
        b["name"]: b["spend"] for b in _json(f"http://127.0.0.1:{admin_port}/budgets")["budgets"]
    }
    out.append(
        "server rows: spend charged to each budget (holds in flight included): "
        + ", ".join(f"{k} ${v:.4f}" for k, v in sorted(spend.items()))
    )
    metrics = _text(f"http://127.0.0.1:{admin_port}/metrics")
    settled = re.findall(
        r'^extproc_settlements_total\{outcome="([^"]+)"\} ([\d.e+]+)$', metrics, re.MULTILINE
    )
    out.append(
        "server rows: settlements by outcome (warm-ups included): "
        + (", ".join(f"{k} {float(v):.0f}" for k, v in settled) or "none")
    )
    leases = re.findall(
        r'^extproc_parallel_leases_total\{event="([^"]+)"\} ([\d.e+]+)$', metrics, re.MULTILINE
    )
    out.append(
        "server rows: parallel-request leases by outcome (warm-ups included): "
        + (", ".join(f"{k} {float(v):.0f}" for k, v in leases) or "none")
    )
    return out


# --- main -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=int, default=15, help="seconds measured per row")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--store",
        choices=("redis", "memory"),
        default="redis" if shutil.which("redis-server") else "memory",
        help="the server's store: a private redis-server (default when installed) or memory",
    )
    parser.add_argument("--skip-litellm", action="store_true", help="no row d (no network)")
    parser.add_argument("--skip-authz", action="store_true", help="no ext_authz row")
    parser.add_argument("--litellm-version", default=LITELLM_VERSION)
    parser.add_argument("--smoke", action="store_true", help="mark the result file as a smoke run")
    parser.add_argument(
        "--output",
        type=Path,
        help="the markdown result file (default bench/results/<date>-<short sha>[-smoke].md)",
    )
    return parser


def _default_output(smoke: bool) -> Path:
    sha = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    return ROOT / "bench" / "results" / f"{day}-{sha}{'-smoke' if smoke else ''}.md"


class Bench:
    """The processes of one run and the rows they give, one row at a time."""

    def __init__(self, args: argparse.Namespace, load: Load) -> None:
        self.args = args
        self.load = load
        self.workdir = workdir = load.workdir
        self.rows: list[Row] = []
        self.checks: list[str] = []
        self.mock_ports = {d.cluster: free_port() for d in DEPLOYMENTS}
        sites = [
            f"{d.cluster}=127.0.0.1:{self.mock_ports[d.cluster]}:{d.key_env}" for d in DEPLOYMENTS
        ]
        self.mock = Proc(
            "mock",
            extproc_argv("mock", *(a for site in sites for a in ("--upstream", site))),
            workdir / "mock.log",
            env=KEY_ENV,
        )
        self.redis_port = free_port()
        self.redis = redis_proc(workdir, self.redis_port) if args.store == "redis" else None
        self.redis_pid: int | None = None

    def measure(
        self,
        key: str,
        label: str,
        port: int,
        server: list[int],
        envoy_pid: int | None,
        *,
        redis: bool = False,
    ) -> None:
        self.rows.append(
            measure(
                key,
                label,
                f"http://127.0.0.1:{port}",
                self.load,
                self.args.warmup,
                server=server,
                envoy=envoy_pid,
                redis=self.redis_pid if redis else None,
                mock_ports=self.mock_ports,
                redis_port=self.redis_port if redis and self.redis is not None else None,
            )
        )

    def run(self, litellm: str | None) -> None:
        with contextlib.ExitStack() as stack:
            if self.redis is not None:
                port = self.redis_port
                stack.enter_context(running(self.redis[0], lambda: port_open(port)))
                self.redis_pid = _pid(self.redis[0])
            ports = self.mock_ports.values()
            stack.enter_context(running(self.mock, lambda: all(port_open(p) for p in ports)))
            self.envoy_alone()
            self.noop()
            self.routing_only()
            self.translated()
            self.server()
            if litellm is not None:
                self.litellm(litellm)
            else:
                self.checks.append("row d skipped (--skip-litellm)")

    def envoy_alone(self) -> None:
        listen, admin = free_port(), free_port()
        config = plain_envoy_config(listen, admin, self.mock_ports)
        with envoy(self.workdir, "envoy-a", config, admin, gated=False) as proxy:
            self.measure("a", "Envoy alone", listen, [], _pid(proxy))

    def noop(self) -> None:
        listen, admin, grpc_port = free_port(), free_port(), free_port()
        noop = Proc(
            "noop",
            [
                PYTHON,
                str(ROOT / "bench" / "noop_extproc.py"),
                "--port",
                str(grpc_port),
                # weighted by repetition: a a a b b c, in turn
                *(
                    a
                    for d in DEPLOYMENTS
                    for _ in range(d.weight)
                    for a in ("--route", f"{d.cluster}={d.key}")
                ),
            ],
            self.workdir / "noop.log",
        )
        config = server_envoy_config("ext_proc", listen, admin, grpc_port, self.mock_ports)
        with (
            running(noop, lambda: port_open(grpc_port)),
            envoy(self.workdir, "envoy-b", config, admin, gated=True) as proxy,
        ):
            self.measure("b", "Envoy + do-nothing ext_proc", listen, [_pid(noop)], _pid(proxy))

    def _server(self, name: str, policy: str, store: str, grpc_port: int, admin_port: int) -> Proc:
        return Proc(
            name,
            extproc_argv("serve"),
            self.workdir / f"{name}.log",
            env={
                **KEY_ENV,
                "EXTPROC_STORE_URL": store,
                "EXTPROC_POLICY_PATH": str(ROOT / "bench" / policy),
                "EXTPROC_SPEND_JOURNAL": str(self.workdir / f"{name}-spend.jsonl"),
                "EXTPROC_GRPC_PORT": str(grpc_port),
                "EXTPROC_ADMIN_PORT": str(admin_port),
                "EXTPROC_LOG_LEVEL": "WARNING",
            },
        )

    def routing_only(self) -> None:
        """Row c0: the server with no key, cap or budget (it makes no store call): what
        the adapters, parsing, routing and usage metering cost over the floor."""
        self._storeless("c0", "policy-routing.yaml", "routing only")

    def translated(self) -> None:
        """Row t: row c0 with deployments of the other API, every call translated."""
        self._storeless("t", "policy-translate.yaml", "routing only, translated")

    def _storeless(self, key: str, policy: str, what: str) -> None:
        grpc_port, admin_port = free_port(), free_port()
        server = self._server(f"server-{key}", policy, "memory://", grpc_port, admin_port)
        with running(server, lambda: http_ok(f"http://127.0.0.1:{admin_port}/healthz")):
            listen, admin = free_port(), free_port()
            config = server_envoy_config("ext_proc", listen, admin, grpc_port, self.mock_ports)
            with envoy(self.workdir, f"envoy-{key}", config, admin, gated=True) as proxy:
                label = f"Envoy + this server (ext_proc), {what}"
                self.measure(key, label, listen, [_pid(server)], _pid(proxy))

    def server(self) -> None:
        grpc_port, admin_port = free_port(), free_port()
        store = f"redis://127.0.0.1:{self.redis_port}/0" if self.redis else "memory://"
        server = self._server("server", "policy.yaml", store, grpc_port, admin_port)
        modes = [("c", "ext_proc"), *([] if self.args.skip_authz else [("c'", "ext_authz")])]
        with running(server, lambda: http_ok(f"http://127.0.0.1:{admin_port}/healthz")):
            for key, mode in modes:
                listen, admin = free_port(), free_port()
                config = server_envoy_config(mode, listen, admin, grpc_port, self.mock_ports)
                with envoy(self.workdir, f"envoy-{mode}", config, admin, gated=True) as proxy:
                    label = f"Envoy + this server ({mode}), full policy"
                    self.measure(key, label, listen, [_pid(server)], _pid(proxy), redis=True)
            self.checks += server_checks(admin_port)

    def litellm(self, version: str) -> None:
        port = free_port()
        proc = litellm_proc(self.workdir, port, self.mock_ports)
        ready = f"http://127.0.0.1:{port}/health/liveliness"
        with running(proc, lambda: http_ok(ready), timeout=180):
            label = f"LiteLLM proxy {version}, 1 worker, no DB"
            self.measure("d", label, port, [_pid(proc)], None)


def main() -> int:
    args = _parser().parse_args()
    use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and bool(shutil.which("wrk")))
    try:
        litellm = None if args.skip_litellm else ensure_litellm(args.litellm_version)
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"bench: could not install LiteLLM ({err}); --skip-litellm runs without it")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    print(f"bench: work files in {workdir}", flush=True)
    load = Load(args.duration, args.connections, args.threads, use_wrk, workdir)
    bench = Bench(args, load)
    bench.run(litellm)
    rows, checks = bench.rows, bench.checks
    info = machine(load, litellm, args.store)
    cmdline = " ".join(["python", "bench/bench.py", *sys.argv[1:]])
    litellm_yaml = workdir / "litellm.yaml"
    smoke = args.smoke or args.duration < 10
    text = report(
        rows,
        info,
        checks,
        smoke=smoke,
        cmdline=cmdline,
        litellm_yaml=litellm_yaml.read_text() if litellm_yaml.exists() else None,
    )
    output = args.output or _default_output(smoke)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print("\n" + table(rows) + "\n" + ratios(rows))
    for check in [*(f"{r.key}: {n}" for r in rows for n in r.notes), *checks]:
        print(f"- {check}")
    if litellm is not None:
        print(f"- d: {LITELLM_GAPS}")
    print(f"\nwritten: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
