"""Deployments that name their provider (api_base): parsing, clusters, paths."""

from __future__ import annotations

import pytest

from extproc.cli.up import mock_plan, provider_upstreams
from extproc.core.upstreams import endpoint_suffix, parse_api_base, upstream_path
from extproc.policy import PolicyError, parse_policy


@pytest.mark.parametrize(
    ("base", "provider", "path", "expected"),
    [
        ("https://api.openai.com/v1", "openai", "/v1/chat/completions", "/v1/chat/completions"),
        ("https://api.openai.com/v1/", "openai", "/embeddings?x=1", "/v1/embeddings?x=1"),
        (
            "https://api.groq.com/openai/v1",
            "groq",
            "/v1/chat/completions",
            "/openai/v1/chat/completions",
        ),
        ("http://vllm:8000", "vllm", "/v1/completions", "/v1/completions"),  # no path: /v1
        ("https://api.anthropic.com", "anthropic", "/v1/messages", "/v1/messages"),
        ("https://api.anthropic.com/v1", "anthropic", "/messages", "/v1/messages"),
        (
            "https://gw.example/claude",
            "anthropic",
            "/v1/messages/count_tokens",
            "/claude/v1/messages/count_tokens",
        ),
        (
            "https://r.openai.azure.com",
            "azure",
            "/v1/chat/completions?api-version=1&keep=y",
            "/openai/deployments/prod%2F4o/chat/completions?keep=y&api-version=2024-10-21",
        ),
        (
            "https://r.openai.azure.com/openai",
            "azure",
            "/v1/embeddings",
            "/openai/deployments/prod%2F4o/embeddings?api-version=2024-10-21",
        ),
        (
            "https://r.openai.azure.com",
            "azure",
            "/v1/responses",
            "/openai/responses?api-version=2024-10-21",
        ),
        # Azure's v1 API is addressed like OpenAI's
        ("https://r.openai.azure.com/openai/v1", "azure", "/v1/responses", "/openai/v1/responses"),
    ],
)
def test_each_provider_gets_its_path(base: str, provider: str, path: str, expected: str) -> None:
    model = "azure/prod/4o" if provider == "azure" else "m"
    assert upstream_path(parse_api_base(base), provider, model, "2024-10-21", path) == expected


def test_a_retry_rebuilds_the_path_from_the_endpoint() -> None:
    azure = "/openai/deployments/x/chat/completions?api-version=2024-10-21"
    assert endpoint_suffix(azure) == ("/chat/completions", "api-version=2024-10-21")
    openai = parse_api_base("https://api.openai.com/v1")
    assert upstream_path(openai, "openai", "m", None, azure).startswith("/v1/chat/completions")
    assert upstream_path(None, "openai", "m", None, "/openai/v1/embeddings") == "/v1/embeddings"
    assert endpoint_suffix("/v1/messages/count_tokens") == ("/messages/count_tokens", "")
    assert endpoint_suffix("/v1/models") is None
    # an Azure deployment named like an endpoint is not read as one
    named = "/openai/deployments/chat/completions?api-version=1"
    assert endpoint_suffix(named) == ("/completions", "api-version=1")


@pytest.mark.parametrize(
    "bad",
    [
        "ftp://api.openai.com",
        "https://user:secret@api.openai.com/v1",
        "https://api.openai.com/v1?key=x",
        "https://api.openai.com/v1#x",
        "https://api.openai.com/../v1",
        "https://-bad-.example",
        "https://api.openai.com:99999",
        "https://api.openai.com/v1 x",
        "https://\u00e9.example",
        "https://" + "a" * 600,
        "https:///v1",
        "https://api.openai.com:0/v1",
        "https://api.openai.com/%2e%2e/v1",
        "https://[fe80::1%25eth0]/v1",
    ],
)
def test_bad_api_bases_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message says which rule
        parse_api_base(bad)
    with pytest.raises(PolicyError):
        parse_policy({"model_groups": [{"name": "g", "deployments": [dep("a", api_base=bad)]}]})


def dep(dep_id: str, **more: object) -> dict[str, object]:
    return {"id": dep_id, "model": "m", **more}


def test_deployments_of_one_host_share_a_cluster_the_gateway_makes() -> None:
    policy = parse_policy(
        {
            "model_groups": [
                {
                    "name": "g",
                    "deployments": [
                        dep("a", api_base="https://api.openai.com/v1"),
                        dep("b", api_base="https://api.openai.com/v1/"),
                        dep("c", api_base="http://10.0.0.5:8000/v1", provider="vllm"),
                        dep("d", cluster="mock_x"),
                    ],
                }
            ]
        }
    )
    a, b, c, d = policy.model_groups[0].deployments
    assert a.cluster == b.cluster != c.cluster
    upstreams = provider_upstreams(policy, "/ca.pem")
    assert upstreams[a.cluster].host == "api.openai.com"
    assert (upstreams[a.cluster].port, upstreams[a.cluster].tls) == (443, True)
    assert (upstreams[c.cluster].port, upstreams[c.cluster].tls) == (8000, False)
    assert upstreams[a.cluster].ca_file == "/ca.pem"
    # only the deployment without a provider is mocked by `extproc up`
    assert [cluster for cluster, _, _ in mock_plan(policy, 18001)] == [d.cluster]


def test_a_cluster_is_at_one_address() -> None:
    with pytest.raises(PolicyError, match="another api_base"):
        parse_policy(
            {
                "model_groups": [
                    {
                        "name": "g",
                        "deployments": [
                            dep("a", cluster="c", api_base="https://x.example"),
                            dep("b", cluster="c", api_base="https://y.example"),
                        ],
                    }
                ]
            }
        )
    with pytest.raises(PolicyError):
        parse_policy({"model_groups": [{"name": "g", "deployments": [dep("a")]}]})  # no cluster


def test_api_version_is_checked() -> None:
    with pytest.raises(PolicyError, match="api_version"):
        parse_policy(
            {
                "model_groups": [
                    {"name": "g", "deployments": [dep("a", cluster="c", api_version="1&x=2")]}
                ]
            }
        )
