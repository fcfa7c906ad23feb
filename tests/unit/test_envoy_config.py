"""The committed Envoy configs: generated, valid for the real binary, and checked."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.cli.main import main
from extproc.cli.up import envoy_binary
from extproc.envoy.check import check_envoy_config
from extproc.envoy.config import Upstream, render_envoy_config
from extproc.policy import load_policy
from extproc.state.settings import DEFAULT_POLICY, Settings
from tests.helpers import ROOT

ENVOY_DIR = ROOT / "envoy"
POLICIES = ROOT / "tests" / "policies"
MOCK_ENV = {
    "EXTPROC_MOCK_KEY_A": "a",
    "EXTPROC_MOCK_KEY_B": "b",
    "EXTPROC_MOCK_KEY_ANTHROPIC": "c",
}
GENERATED = {
    "envoy.yaml": [],
    "envoy-ext-authz.yaml": ["--mode", "ext_authz"],
    "envoy.compose.yaml": [
        "--listen-host",
        "0.0.0.0",
        "--server-host",
        "extproc",
        "--mock-host",
        "mock",
    ],
}


#: envoy/examples: a policy per provider and the config rendered from it. The CA
#: bundle is named, so the output does not depend on the machine that renders it.
EXAMPLES = ("openai", "anthropic", "azure", "openai-compatible")
EXAMPLE_CA = "/etc/ssl/certs/ca-certificates.crt"
_EXAMPLE_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AZURE_API_KEY", "GROQ_API_KEY")
for example in EXAMPLES:
    GENERATED[f"examples/{example}.envoy.yaml"] = [
        "--policy",
        str(ENVOY_DIR / "examples" / f"{example}.policy.yaml"),
        "--upstream-ca",
        EXAMPLE_CA,
    ]


@pytest.mark.parametrize(("name", "args"), GENERATED.items())
def test_committed_config_is_generated_output(name: str, args: list[str], tmp_path: Path) -> None:
    out = tmp_path / name.replace("/", "_")
    assert main(["envoy-config", *args, "--out", str(out)]) == 0
    assert (ENVOY_DIR / name).read_text() == out.read_text(), (
        f"envoy/{name} is stale: regenerate it with `extproc envoy-config {' '.join(args)}`"
    )


@pytest.mark.parametrize("name", GENERATED)
def test_committed_config_validates_in_envoy(name: str, tmp_path: Path) -> None:
    config = ENVOY_DIR / name
    if not Path(EXAMPLE_CA).is_file() and EXAMPLE_CA in config.read_text():
        # a machine without that bundle: Envoy reads the file, so give it one
        import certifi  # noqa: PLC0415 - a test dependency (the SDKs')

        config = tmp_path / "envoy.yaml"
        config.write_text((ENVOY_DIR / name).read_text().replace(EXAMPLE_CA, certifi.where()))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", GENERATED)
def test_committed_config_passes_check(name: str) -> None:
    args = GENERATED[name]
    source = Path(args[args.index("--policy") + 1]) if "--policy" in args else DEFAULT_POLICY
    # the examples' credentials are the providers' keys (placeholders here)
    env = {**MOCK_ENV, **dict.fromkeys(_EXAMPLE_KEYS, "sk-placeholder")}
    policy = load_policy(source, env=env)
    report = check_envoy_config((ENVOY_DIR / name).read_text(), policy, Settings())
    assert report.ok, report.errors


def test_check_finds_missing_cluster_and_wrong_port() -> None:
    policy = load_policy(DEFAULT_POLICY, env=MOCK_ENV)
    text = render_envoy_config(
        {"mock_a": Upstream("127.0.0.1", 1)}, server=Upstream("127.0.0.1", 1234)
    )
    report = check_envoy_config(text, policy, Settings())
    joined = "\n".join(report.errors)
    assert "cluster 'mock_b'" in joined
    assert "cluster 'mock_anthropic'" in joined
    assert "port 50051" in joined


def test_check_requires_buffered_body_and_header_strip() -> None:
    policy = load_policy(DEFAULT_POLICY, env=MOCK_ENV)
    text = (ENVOY_DIR / "envoy.yaml").read_text()
    text = text.replace("request_body_mode: BUFFERED", "request_body_mode: STREAMED")
    text = text.replace("- remove: x-extproc-cluster", "- remove: x-other")
    report = check_envoy_config(text, policy, Settings())
    joined = "\n".join(report.errors)
    assert "BUFFERED" in joined
    assert "early_header_mutation_extensions" in joined


@pytest.mark.parametrize("text", ["{", "- a list", "static_resources: {}"])
def test_check_bad_yaml(text: str) -> None:
    policy = load_policy(DEFAULT_POLICY, env=MOCK_ENV)
    assert not check_envoy_config(text, policy, Settings()).ok


def test_check_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--no-credentials", "--envoy", str(ENVOY_DIR / "envoy.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_groups: [{name: a, deployments: [{id: x, model: m}]}]")
    assert main(["check", "--policy", str(bad)]) == 1
    assert "model_groups[0].deployments[0].cluster: Field required" in capsys.readouterr().out


def test_reserved_cluster_name() -> None:
    with pytest.raises(ValueError, match="reserved"):
        render_envoy_config({"extproc": Upstream("127.0.0.1", 1)})


def test_compose_mock_ports_match_compose_envoy_config() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    envoy_cfg = yaml.safe_load((ENVOY_DIR / "envoy.compose.yaml").read_text())
    served = {}
    for arg in compose["services"]["mock"]["command"]:
        if arg.startswith("--upstream="):
            name, _, rest = arg.removeprefix("--upstream=").partition("=")
            served[name] = int(rest.split(":")[1])
    wanted = {}
    for cluster in envoy_cfg["static_resources"]["clusters"]:
        # the server, and failover's composite clusters and per-deployment copies
        if cluster["name"] == "extproc" or cluster["name"].startswith(("fo.", "dep.")):
            continue
        sock = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
            "socket_address"
        ]
        assert sock["address"] == "mock"
        wanted[cluster["name"]] = sock["port_value"]
    assert served == wanted


def test_check_requires_the_lease_log_for_parallel_limits() -> None:
    policy = load_policy(POLICIES / "budgets.yaml", env={"TEST_KEY_A": "a"})
    text = render_envoy_config({"mock_a": Upstream("127.0.0.1", 1)})
    assert check_envoy_config(text, policy, Settings()).ok
    without = text.replace("envoy.access_loggers.http_grpc", "envoy.access_loggers.stdout")
    without = without.replace("grpc.v3.HttpGrpcAccessLogConfig", "stream.v3.StdoutAccessLog")
    report = check_envoy_config(without, policy, Settings())
    assert any("max_parallel_requests" in e for e in report.errors)


def test_routes_add_the_v1_prefix_and_check_warns_without_it() -> None:
    policy = load_policy(DEFAULT_POLICY, env=MOCK_ENV)
    text = (ENVOY_DIR / "envoy.yaml").read_text()
    routes = yaml.safe_load(text)["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"
    ][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    routed = [r["route"] for r in routes if "route" in r]
    assert routed
    rewrite = {
        "pattern": {
            "regex": r"^/(chat/completions|completions|embeddings|responses|messages"
            r"|messages/count_tokens)/?$"
        },
        "substitution": r"/v1/\1",
    }
    assert all(r["regex_rewrite"] == rewrite for r in routed)
    assert not any(
        "regex_rewrite" in w for w in check_envoy_config(text, policy, Settings()).warnings
    )
    without = "\n".join(
        line
        for line in text.splitlines()
        if "regex_rewrite" not in line
        and "pattern:" not in line
        and "regex: ^/(chat" not in line
        and "substitution:" not in line
    )
    report = check_envoy_config(without, policy, Settings())
    assert report.ok
    assert any("regex_rewrite" in w for w in report.warnings)


def test_failover_routes_carry_timeouts_and_envoy_accepts_them(tmp_path: Path) -> None:
    """``timeout`` is each attempt's per_try_timeout; a stream (marked by the server)
    takes the route whose per-try and idle timeouts are ``stream_timeout``; 401, 403
    and 404 are retried like 429 and 5xx; the real binary validates the result."""
    from extproc.core.failover import STREAM_HEADER  # noqa: PLC0415

    policy = load_policy(POLICIES / "timeouts.yaml", env={"TEST_KEY_A": "a", "TEST_KEY_B": "b"})
    clusters = {name: Upstream("127.0.0.1", 1) for name in ("mock_a", "mock_b", "mock_c")}
    text = render_envoy_config(clusters, failover=policy.failover)
    config = yaml.safe_load(text)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]

    def routes_of(dep_id: str) -> list[dict[str, Any]]:
        composite = policy.failover[dep_id].composite
        return [
            r
            for r in routes
            if any(
                h.get("string_match", {}).get("exact") == composite
                for h in r["match"].get("headers", [])
            )
        ]

    stream, plain = routes_of("hs-a")
    assert [h["name"] for h in stream["match"]["headers"]] == ["x-extproc-cluster", STREAM_HEADER]
    assert stream["route"]["retry_policy"]["per_try_timeout"] == "2s"
    assert stream["route"]["retry_policy"]["per_try_idle_timeout"] == "2s"
    # a call that is not a stream waits router_settings.timeout for its answer
    assert plain["route"]["retry_policy"]["per_try_timeout"] == "30s"
    assert "per_try_idle_timeout" not in plain["route"]["retry_policy"]
    assert plain["route"]["retry_policy"]["retriable_status_codes"] == [429, 401, 403, 404]
    # a stream of the "hang" group (timeout 2 s, no stream_timeout) waits the same
    stream, plain = routes_of("hang-a")
    assert stream["route"]["retry_policy"]["per_try_idle_timeout"] == "2s"
    assert plain["route"]["retry_policy"]["per_try_timeout"] == "2s"
    # the client can never pick the stream route: its header goes with the cluster's
    mutations = hcm["typed_config"]["early_header_mutation_extensions"][0]["typed_config"]
    assert {"remove": STREAM_HEADER} in mutations["mutations"]
    # a timed-out or stalled attempt is logged for its deployment's health
    router = hcm["typed_config"]["http_filters"][-1]["typed_config"]
    flags = router["upstream_log"][0]["filter"]["response_flag_filter"]["flags"]
    assert {"UT", "SI"} <= set(flags)
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_failover_routes_without_timeouts_have_no_per_try_limit() -> None:
    policy = load_policy(POLICIES / "routing.yaml", env={"TEST_KEY_A": "a", "TEST_KEY_B": "b"})
    clusters = {
        name: Upstream("127.0.0.1", 1) for name in ("mock_a", "mock_b", "mock_c", "mock_dead")
    }
    config = yaml.safe_load(render_envoy_config(clusters, failover=policy.failover))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    untimed = {
        r.composite
        for r in policy.failover.values()
        if r.timeouts.timeout is None and r.timeouts.stream is None
    }
    retrying = [
        r
        for r in routes
        if "retry_policy" in r.get("route", {})
        and r["match"]["headers"][0]["string_match"]["exact"] in untimed
    ]
    assert retrying
    assert len(retrying) == len(untimed)  # one route each: no stream route
    assert all("per_try_timeout" not in r["route"]["retry_policy"] for r in retrying)
