"""`extproc check`'s warnings: a policy that probably says what its author did not
mean, and an Envoy config that would send a provider the gateway's own Host or not
verify its certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.cli.main import main
from extproc.envoy.check import check_envoy_config, policy_warnings
from extproc.envoy.config import Upstream, render_envoy_config
from extproc.policy import compile_policy, parse_policy
from extproc.state.settings import Settings


def compiled(*deployments: dict[str, Any]) -> Any:
    return compile_policy(
        parse_policy({"model_groups": [{"name": "g", "deployments": list(deployments)}]})
    )


def dep(dep_id: str, **more: Any) -> dict[str, Any]:
    return {"id": dep_id, "cluster": f"c_{dep_id}", "model": "m", **more}


@pytest.mark.parametrize(
    ("deployment", "warned"),
    [
        (dep("a", model="azure/gpt-4o"), "names provider 'azure'"),
        (dep("a", model="anthropic/claude-3", provider="openai"), "names provider 'anthropic'"),
        (dep("a", model="bedrock/claude", provider="anthropic"), "names provider 'bedrock'"),
        (dep("a", provider="acme"), "provider 'acme' is not one the gateway knows"),
        (dep("a", model="azure/gpt-4o", provider="azure"), None),
        (dep("a", model="openai/llama", provider="vllm"), None),  # an OpenAI-compatible host
        (dep("a", model="meta-llama/Llama-3-8b", provider="vllm"), None),  # an org, not a provider
        (dep("a", provider="groq"), None),
    ],
)
def test_model_and_provider_disagreeing_is_warned(
    deployment: dict[str, Any], warned: str | None
) -> None:
    warnings = policy_warnings(compiled(deployment))
    if warned is None:
        assert warnings == []
    else:
        assert any(warned in w for w in warnings), warnings


def test_a_group_mixing_the_two_apis_is_warned() -> None:
    warnings = policy_warnings(compiled(dep("a"), dep("b", provider="anthropic")))
    (mixed,) = warnings
    assert "mixes Anthropic and OpenAI" in mixed
    assert "translated for a deployment of the other API under ext_proc" in mixed
    assert "embeddings" in mixed  # not translatable


def test_check_prints_policy_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        yaml.safe_dump(
            {"model_groups": [{"name": "g", "deployments": [dep("a", model="azure/x")]}]}
        )
    )
    assert main(["check", "--policy", str(path)]) == 0  # a warning, not an error
    assert (
        "warning: deployment 'a': model 'azure/x' names provider 'azure'" in capsys.readouterr().out
    )


def test_a_dns_upstream_without_host_rewrite_is_warned() -> None:
    policy = compiled(dep("a", cluster="provider"))
    text = render_envoy_config(
        {"provider": Upstream("api.example.com", 443, tls=True, ca_file="/ca")}
    )
    assert check_envoy_config(text, policy, Settings()).warnings == []
    hand_written = text.replace("auto_host_rewrite: true", "timeout: 600s")
    warnings = check_envoy_config(hand_written, policy, Settings()).warnings
    assert any("gateway's own Host" in w for w in warnings), warnings
    unverified = yaml.safe_load(text)
    for cluster in unverified["static_resources"]["clusters"]:
        if cluster["name"] == "provider":
            del cluster["transport_socket"]["typed_config"]["common_tls_context"]
    warnings = check_envoy_config(yaml.safe_dump(unverified), policy, Settings()).warnings
    assert any("does not verify" in w for w in warnings), warnings


def test_a_cluster_elsewhere_than_its_api_base_is_warned() -> None:
    policy = compiled(dep("a", cluster=None, api_base="https://api.example.com/v1"))
    cluster = policy.deployments()[0].cluster
    right = render_envoy_config({cluster: Upstream("api.example.com", 443, tls=True, ca_file="/c")})
    assert not any("api_base" in w for w in check_envoy_config(right, policy, Settings()).warnings)
    plain = render_envoy_config({cluster: Upstream("api.example.com", 443)})
    warnings = check_envoy_config(plain, policy, Settings()).warnings
    assert any("without TLS" in w for w in warnings), warnings


def test_composites_with_envoys_retry_breaker_are_warned() -> None:
    policy = compile_policy(
        parse_policy(
            {
                "model_groups": [
                    {
                        "name": "g",
                        "num_retries": 1,
                        "deployments": [dep("a"), dep("b")],
                    }
                ]
            }
        )
    )
    clusters = {c: Upstream("127.0.0.1", 1) for c in ("c_a", "c_b")}
    text = render_envoy_config(clusters, failover=policy.failover)
    assert not any(
        "circuit breaker" in w for w in check_envoy_config(text, policy, Settings()).warnings
    )
    config = yaml.safe_load(text)
    for cluster in config["static_resources"]["clusters"]:
        cluster.pop("circuit_breakers", None)
    warnings = check_envoy_config(yaml.safe_dump(config), policy, Settings()).warnings
    assert any("circuit breaker" in w for w in warnings), warnings
