"""The committed Envoy configs: generated, valid for the real binary, and checked."""

from __future__ import annotations

import subprocess
from pathlib import Path

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


@pytest.mark.parametrize(("name", "args"), GENERATED.items())
def test_committed_config_is_generated_output(name: str, args: list[str], tmp_path: Path) -> None:
    out = tmp_path / name
    assert main(["envoy-config", *args, "--out", str(out)]) == 0
    assert (ENVOY_DIR / name).read_text() == out.read_text(), (
        f"envoy/{name} is stale: regenerate it with `extproc envoy-config {' '.join(args)}`"
    )


@pytest.mark.parametrize("name", GENERATED)
def test_committed_config_validates_in_envoy(name: str) -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(ENVOY_DIR / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", GENERATED)
def test_committed_config_passes_check(name: str) -> None:
    policy = load_policy(DEFAULT_POLICY, env=MOCK_ENV)
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
        "pattern": {"regex": r"^/(chat/completions|completions|embeddings|responses|messages)/?$"},
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
