"""What a request asks for, checked and bounded, and the estimate made from it."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
import yaml

from extproc.core.decision import GatewayConfig
from extproc.core.errors import GatewayError
from extproc.core.pricing import (
    CONTEXT_WINDOW_BOUND,
    MAX_CHOICES,
    MAX_OUTPUT_TOKENS_BOUND,
    OutputAsk,
    Prices,
    bundled_max_output_tokens,
    cost_micros,
    estimate_call,
    requested_output,
)
from extproc.core.request import RequestHead
from extproc.core.usage import Usage
from extproc.policy import CompiledPolicy, compile_policy, parse_policy
from extproc.store.base import MAX_AMOUNT_MICROS
from tests.helpers import decide_request
from tests.unit.test_budgets import NOW

BAD = [1.5, -1, "100", True, [1], {"n": 1}, 1e30]


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        ("chat_completions", "max_tokens"),
        ("chat_completions", "max_completion_tokens"),
        ("completions", "max_tokens"),
        ("responses", "max_output_tokens"),
        ("messages", "max_tokens"),
    ],
)
@pytest.mark.parametrize("value", BAD, ids=[repr(v) for v in BAD])
def test_bad_token_counts_are_400s_naming_the_parameter(
    endpoint: str, field: str, value: object
) -> None:
    with pytest.raises(GatewayError) as info:
        requested_output(endpoint, {field: value})
    assert (info.value.status, info.value.code, info.value.param) == (
        400,
        "invalid_parameter",
        field,
    )


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [("chat_completions", "n"), ("completions", "n"), ("completions", "best_of")],
)
@pytest.mark.parametrize("value", [0, -2, MAX_CHOICES + 1, 2.0, "2", False, None])
def test_bad_choices_are_400s(endpoint: str, field: str, value: object) -> None:
    if value is None:
        assert requested_output(endpoint, {field: value}).choices == 1  # null: not given
        return
    with pytest.raises(GatewayError) as info:
        requested_output(endpoint, {field: value})
    assert (info.value.status, info.value.code, info.value.param) == (
        400,
        "invalid_parameter",
        field,
    )


@pytest.mark.parametrize(
    ("endpoint", "body", "ask"),
    [
        ("chat_completions", {}, OutputAsk()),
        ("chat_completions", {"max_tokens": None}, OutputAsk()),  # null: not given
        ("chat_completions", {"max_tokens": 0}, OutputAsk()),  # 0: the default applies
        ("chat_completions", {"max_tokens": 10**30}, OutputAsk(max_tokens=10**30)),
        # both fields: the larger one counts
        ("chat_completions", {"max_completion_tokens": 50, "max_tokens": 70}, OutputAsk(70)),
        ("chat_completions", {"n": 128}, OutputAsk(choices=128)),
        # the provider bills the larger of n and best_of
        ("completions", {"n": 2, "best_of": 5}, OutputAsk(choices=5)),
        ("completions", {"prompt": ["a", "b", "c"]}, OutputAsk(batch=3)),
        ("completions", {"prompt": [1, 2, 3]}, OutputAsk(token_ids=3)),
        (
            "completions",
            {"prompt": [[1, 2], [3]], "n": 2},
            OutputAsk(choices=2, batch=2, token_ids=3),
        ),
        # a field the endpoint does not read is not checked (OpenAI ignores it there)
        ("responses", {"max_tokens": "x", "n": 0}, OutputAsk()),
        ("embeddings", {"input": ["x", "y"]}, OutputAsk(batch=2, output=False)),
        (
            "embeddings",
            {"input": [[1] * 10, [2] * 5]},
            OutputAsk(batch=2, token_ids=15, output=False),
        ),
        ("embeddings", {"input": "x", "max_tokens": 5}, OutputAsk(output=False)),
    ],
)
def test_requested_output(endpoint: str, body: dict[str, Any], ask: OutputAsk) -> None:
    assert requested_output(endpoint, body) == ask


RAW = b'{"model": "m", "messages": []}'  # 31 bytes: 8 prompt tokens


@pytest.mark.parametrize(
    ("ask", "max_out", "window", "prompt", "output", "cap"),
    [
        (OutputAsk(), None, None, 8, 4096, CONTEXT_WINDOW_BOUND + MAX_OUTPUT_TOKENS_BOUND),
        # clamped to the deployment's maximum output
        (OutputAsk(max_tokens=10**30), 16_384, 128_000, 8, 16_384, 128_000 + 16_384),
        (OutputAsk(max_tokens=10**30), None, None, 8, MAX_OUTPUT_TOKENS_BOUND, None),
        # every choice of every prompt of the batch
        (OutputAsk(max_tokens=100, choices=3, batch=2), 1000, 500, 8, 600, 2 * (500 + 3000)),
        # embeddings: no output; token ids counted one by one
        (OutputAsk(batch=4, token_ids=900, output=False), None, 8191, 900, 0, 4 * 8191),
    ],
)
def test_estimate_call(
    ask: OutputAsk,
    max_out: int | None,
    window: int | None,
    prompt: int,
    output: int,
    cap: int | None,
) -> None:
    est = estimate_call(
        ask, RAW, default_max_tokens=4096, max_output_tokens=max_out, context_window=window
    )
    assert (est.prompt_tokens, est.output_tokens) == (prompt, output)
    if cap is not None:
        assert est.usage_cap == cap
    assert est.usage_cap >= est.prompt_tokens + est.output_tokens


def test_cost_never_leaves_the_store_range() -> None:
    absurd = Prices(input_cost_per_token=Decimal(1000), output_cost_per_token=Decimal(1000))
    assert cost_micros(absurd, Usage(input_tokens=10**9, output_tokens=10**12)) == MAX_AMOUNT_MICROS
    assert cost_micros(absurd, Usage(input_tokens=1)) == 1000 * 1_000_000


def test_bundled_table_has_max_output_tokens() -> None:
    assert bundled_max_output_tokens("gpt-4o-2024-08-06") == 16_384
    assert bundled_max_output_tokens("anthropic/claude-sonnet-4-20250514") == 64_000
    assert bundled_max_output_tokens("text-embedding-3-small") is None
    assert bundled_max_output_tokens("unknown-model") is None


POLICY = """
model_groups:
  - name: table
    deployments: [{id: d-table, cluster: c, model: gpt-4o}]
  - name: own
    deployments:
      - {id: d-own, cluster: c, model: gpt-4o, max_output_tokens: 1000, context_window: 9000}
  - name: unknown
    deployments: [{id: d-unknown, cluster: c, model: in-house}]
"""


def load_policy_text(text: str) -> CompiledPolicy:
    return compile_policy(parse_policy(yaml.safe_load(text)))


@pytest.mark.parametrize(
    ("group", "output", "cap"),
    [
        ("table", 16_384 * 100, 128_000 + 16_384 * 100),
        ("own", 1000 * 100, 9000 + 1000 * 100),
        (
            "unknown",
            MAX_OUTPUT_TOKENS_BOUND * 100,
            CONTEXT_WINDOW_BOUND + MAX_OUTPUT_TOKENS_BOUND * 100,
        ),
    ],
)
def test_decision_clamps_to_the_deployment(group: str, output: int, cap: int) -> None:
    policy = load_policy_text(POLICY)
    raw = json.dumps({"model": group, "messages": [], "max_tokens": 10**30, "n": 100}).encode()
    decision = decide_request(
        RequestHead("POST", "/v1/chat/completions", {}),
        raw,
        policy,
        GatewayConfig(),
        lambda: 0.1,
        now=NOW,
    )
    assert (decision.max_output_tokens, decision.usage_cap) == (output, cap)


def test_embeddings_reserve_every_input_and_no_output() -> None:
    policy = load_policy_text(POLICY)
    ids = [[7] * 3000, [8] * 3000]  # short JSON per token id
    raw = json.dumps({"model": "table", "input": ids}).encode()
    decision = decide_request(
        RequestHead("POST", "/v1/embeddings", {}),
        raw,
        policy,
        GatewayConfig(),
        lambda: 0.1,
        now=NOW,
    )
    assert decision.prompt_tokens == 6000
    assert decision.max_output_tokens == 0
