"""What a call may cost beyond its own body: failover attempts and provider-side input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from extproc.gateway import Gateway
from extproc.policy import load_policy
from extproc.pricing import CONTEXT_WINDOW_BOUND, OutputAsk, estimate_call, requested_output
from extproc.request import RequestHead
from extproc.settings import Settings
from extproc.store import MemoryStore
from extproc.usage import Usage

FAILOVER = """
model_groups:
  - name: g
    num_retries: 1
    deployments:
      - {id: a, cluster: ca, model: m, weight: 1000, context_window: 1000, max_output_tokens: 100,
         prices: {input_cost_per_token: 0.000001, output_cost_per_token: 0.00001}}
      - {id: b, cluster: cb, model: m2, weight: 1, context_window: 100000, max_output_tokens: 50000,
         prices: {input_cost_per_token: 0.000001, output_cost_per_token: 0.00002}}
general_settings: {max_budget: 100}
"""


async def test_a_call_that_fails_over_is_bounded_and_held_by_where_it_may_land(
    tmp_path: Path,
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(FAILOVER)
    policy = load_policy(path)
    gateway = Gateway(Settings(policy_path=path), policy, MemoryStore(), rng=lambda: 0.0)
    raw = json.dumps({"model": "g", "max_tokens": 40000, "messages": []}).encode()
    decision = await gateway.route(RequestHead("POST", "/v1/chat/completions", {}), raw, policy)
    assert decision.deployment.id == "a"
    admission = await gateway.admit(decision, policy)
    assert admission.charge is not None
    # held for b's 40,000 answer at b's price, not a's 100 tokens
    assert admission.charge.estimate >= 40000 * 20
    # a failed, b served and answered 40,000 tokens: charged in full, not clamped to a
    served = dataclasses.replace(admission.charge, served="b")
    cost = await gateway.settle(served, Usage(input_tokens=20, output_tokens=40000), policy)
    assert cost == 20 + 40000 * 20
    assert gateway.metrics.usage_clamped.labels("chat_completions")._value.get() == 0


@pytest.mark.parametrize(
    ("endpoint", "body", "remote"),
    [
        ("responses", {"input": "more", "previous_response_id": "resp_1"}, True),
        ("responses", {"input": "more", "conversation": "conv_1"}, True),
        ("responses", {"input": [{"type": "input_file", "file_id": "file-1"}]}, True),
        ("responses", {"input": "hi", "tools": [{"type": "web_search_preview"}]}, True),
        (
            "messages",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {"type": "url", "url": "https://x/a.pdf"},
                            }
                        ],
                    }
                ]
            },
            True,
        ),
        ("chat_completions", {"messages": [{"role": "user", "content": "hi"}]}, False),
        # the user's own words: escaped quotes inside a string never match
        ("chat_completions", {"messages": [{"role": "user", "content": 'say "file_id"'}]}, False),
        ("embeddings", {"input": "file_id"}, False),
    ],
)
def test_input_the_provider_adds_is_reserved_at_the_window(
    endpoint: str, body: dict[str, Any], remote: bool
) -> None:
    raw = json.dumps({"model": "m", **body}).encode()
    ask: OutputAsk = requested_output(endpoint, {"model": "m", **body})
    est = estimate_call(
        ask, raw, default_max_tokens=10, max_output_tokens=None, context_window=50_000
    )
    assert (est.prompt_tokens == 50_000) is remote
    unknown = estimate_call(
        ask, raw, default_max_tokens=10, max_output_tokens=None, context_window=None
    )
    assert (unknown.prompt_tokens == CONTEXT_WINDOW_BOUND) is remote
