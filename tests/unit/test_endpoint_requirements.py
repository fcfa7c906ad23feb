"""Endpoints only some deployments serve: which deployments a group keeps for them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from extproc.core.decision import GatewayConfig, prepare
from extproc.core.endpoints import lookup_endpoint
from extproc.core.errors import InvalidParameterError
from extproc.core.request import RequestHead
from extproc.policy import compile_policy, parse_policy

POLICY = compile_policy(
    parse_policy(
        {
            "model_groups": [
                {
                    "name": "mixed",
                    "deployments": [
                        {"id": "o", "cluster": "c", "model": "gpt", "weight": 1},
                        {"id": "a", "provider": "anthropic", "cluster": "c", "model": "claude"},
                        {"id": "g", "provider": "groq", "cluster": "c", "model": "llama"},
                        {
                            "id": "v",
                            "provider": "vllm",
                            "cluster": "c",
                            "model": "llama",
                            "responses_api": True,
                        },
                        {"id": "z", "provider": "azure", "cluster": "c", "model": "gpt"},
                    ],
                },
                {
                    "name": "groq",
                    "deployments": [{"id": "g2", "provider": "groq", "cluster": "c", "model": "l"}],
                },
            ]
        }
    )
)
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def prepared_ids(path: str, model: str) -> list[str]:
    head = RequestHead("POST", path, {})
    if path.endswith("responses"):
        raw = json.dumps({"model": model, "input": "hi"}).encode()
    else:
        raw = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    prepared = prepare(head, raw, POLICY, GatewayConfig(), now=NOW)
    return [d.id for d in prepared.group.deployments]


def test_each_endpoint_keeps_the_deployments_that_serve_it() -> None:
    assert prepared_ids("/v1/chat/completions", "mixed") == ["o", "a", "g", "v", "z"]
    assert prepared_ids("/v1/messages/count_tokens", "mixed") == ["a"]
    assert prepared_ids("/v1/responses", "mixed") == ["o", "v", "z"]
    group = POLICY.groups["mixed"].serving("responses")
    assert group.cumulative_weights == (1.0, 1.0, 1.0)  # recomputed for the kept ones
    assert POLICY.groups["mixed"].serving("") is POLICY.groups["mixed"]


@pytest.mark.parametrize(
    ("path", "needs"),
    [("/v1/messages/count_tokens", "Anthropic"), ("/responses", "Responses API")],
)
def test_a_group_with_none_is_a_400_naming_what_it_lacks(path: str, needs: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        prepared_ids(path, "groq")
    assert info.value.code == "unsupported_endpoint"
    assert info.value.param == "model"
    assert needs in info.value.message


def test_the_token_counter_is_not_metered() -> None:
    counter = lookup_endpoint("/v1/messages/count_tokens")
    assert counter is not None
    assert (counter.api, counter.metered, counter.requires) == ("anthropic", False, "anthropic")
    messages = lookup_endpoint("/v1/messages")
    assert messages is not None
    assert messages.metered


def test_a_call_the_other_api_cannot_express_stays_with_its_own() -> None:
    """In a group of both APIs, a call only its own API can express never draws a
    deployment of the other (and so is never refused by the draw)."""
    head = RequestHead("POST", "/v1/chat/completions", {})
    body = {"model": "mixed", "messages": [{"role": "user", "content": "hi"}], "n": 2}
    prepared = prepare(head, json.dumps(body).encode(), POLICY, GatewayConfig(), now=NOW)
    assert "a" not in [d.id for d in prepared.group.deployments]
