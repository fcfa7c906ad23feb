"""What a call may cost beyond its own body: failover attempts and provider-side input."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from extproc.core.pricing import CONTEXT_WINDOW_BOUND, OutputAsk, estimate_call, requested_output
from extproc.core.provider_input import IMAGE_URL_TOKENS
from extproc.core.request import RequestHead
from extproc.core.usage import Usage
from extproc.policy import load_policy
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore

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


FN_WEB_SEARCH = {"type": "function", "function": {"name": "web_search", "parameters": {}}}
FN_FILE_ID = {
    "type": "function",
    "function": {"name": "get", "parameters": {"properties": {"file_id": {"type": "string"}}}},
}
DOC_URL = {"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}}
IMAGE = {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}
INLINE_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


# (id, endpoint, raw body without "model", what the provider adds: "window", images, or 0)
CASES: list[tuple[str, str, bytes, object]] = [
    ("stored response", "responses", b'"input": "more", "previous_response_id": "r"', "window"),
    ("conversation", "responses", b'"input": "more", "conversation": "c"', "window"),
    ("stored prompt", "responses", b'"prompt": {"id": "pmpt_1"}, "input": "x"', "window"),
    ("file by id", "responses", b'"input": [{"type": "input_file", "file_id": "f"}]', "window"),
    ("escaped file_id", "responses", b'"input": [{"type": "x", "\\u0066ile_id": "f"}]', "window"),
    (
        "server tool",
        "responses",
        b'"input": "hi", "tools": [{"type": "web_search_preview"}]',
        "window",
    ),
    ("escaped mcp", "responses", b'"input": "hi", "tools": [{"type": "\\u006dcp"}]', "window"),
    (
        "code interpreter",
        "responses",
        b'"input": "x", "tools": [{"type": "code_interpreter"}]',
        "window",
    ),
    (
        "anthropic web fetch",
        "messages",
        b'"messages": [], "tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]',
        "window",
    ),
    (
        "anthropic mcp servers",
        "messages",
        b'"messages": [], "mcp_servers": [{"type": "url", "url": "https://m", "name": "m"}]',
        "window",
    ),
    (
        "anthropic document by url",
        "messages",
        b'"messages": [{"role": "user", "content": [%s]}]' % json.dumps(DOC_URL).encode(),
        "window",
    ),
    ("chat web search", "chat_completions", b'"messages": [], "web_search_options": {}', "window"),
    (
        "50 images by url",
        "chat_completions",
        b'"messages": [{"role": "user", "content": [%s]}]'
        % b", ".join([json.dumps(IMAGE).encode()] * 50),
        50,
    ),
    (
        "inline image",
        "chat_completions",
        b'"messages": [{"role": "user", "content": [%s]}]' % json.dumps(INLINE_IMAGE).encode(),
        0,
    ),
    # a client-run function called web_search, or taking a file_id, is not the provider's
    (
        "function named web_search",
        "chat_completions",
        b'"messages": [], "tools": [%s]' % json.dumps(FN_WEB_SEARCH).encode(),
        0,
    ),
    (
        "function taking file_id",
        "chat_completions",
        b'"messages": [], "tools": [%s]' % json.dumps(FN_FILE_ID).encode(),
        0,
    ),
    ("user says mcp", "chat_completions", b'"messages": [{"role": "user", "content": "mcp"}]', 0),
    (
        "user says file_id",
        "chat_completions",
        b'"messages": [{"role": "user", "content": "\\"file_id\\""}]',
        0,
    ),
    ("embeddings", "embeddings", b'"input": "file_id"', 0),
]


@pytest.mark.parametrize(
    ("endpoint", "members", "adds"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_input_the_provider_adds_is_reserved(endpoint: str, members: bytes, adds: object) -> None:
    raw = b'{"model": "m", ' + members + b"}"
    body: dict[str, Any] = json.loads(raw)
    ask: OutputAsk = requested_output(endpoint, body, raw)
    est = estimate_call(
        ask, raw, default_max_tokens=10, max_output_tokens=None, context_window=500_000
    )
    from_body = max(1, -(-len(raw) // 4))
    if adds == "window":
        assert est.prompt_tokens == 500_000
        unknown = estimate_call(
            ask, raw, default_max_tokens=10, max_output_tokens=None, context_window=None
        )
        assert unknown.prompt_tokens == CONTEXT_WINDOW_BOUND
    else:
        assert isinstance(adds, int)
        assert est.prompt_tokens == from_body + adds * IMAGE_URL_TOKENS


CROSS = """
model_groups:
  - name: g
    num_retries: 1
    deployments:
      - {id: cheap, cluster: ca, model: m, weight: 1000, context_window: 1000000,
         max_output_tokens: 64000,
         prices: {input_cost_per_token: 0.0000001, output_cost_per_token: 0.0000004}}
      - {id: dear, cluster: cb, model: m2, weight: 1, context_window: 200000,
         max_output_tokens: 8000,
         prices: {input_cost_per_token: 0.000015, output_cost_per_token: 0.000075}}
general_settings: {max_budget: 1000}
"""


async def test_a_failover_hold_is_the_dearest_single_deployment(tmp_path: Path) -> None:
    """Each deployment priced for what it can produce, the largest of those held: not
    the cheap one's 64,000-token answer at the dear one's price."""
    path = tmp_path / "p.yaml"
    path.write_text(CROSS)
    policy = load_policy(path)
    gateway = Gateway(Settings(policy_path=path), policy, MemoryStore(), rng=lambda: 0.0)
    raw = json.dumps({"model": "g", "max_tokens": 64000, "messages": []}).encode()
    decision = await gateway.route(RequestHead("POST", "/v1/chat/completions", {}), raw, policy)
    prompt = decision.prompt_tokens
    cheap = prompt * 0.1 + 64000 * 0.4  # micro-dollars
    dear = prompt * 15 + 8000 * 75
    assert decision.hold == math.ceil(max(cheap, dear))
