"""A dynamic failover route's attempts (fallbacks by error class), one filter stream
at a time: what a refused attempt records and what a retry through the hop picks."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.adapters.attempts import Attempt
from extproc.core.decision import GatewayConfig
from extproc.core.failover import (
    ATTEMPT_CLUSTER_HEADER,
    ATTEMPT_COUNT_HEADER,
    ATTEMPT_NUMBER_HEADER,
    CALL_HEADER,
    HOP_CLUSTER,
    HOP_DEPLOYMENT,
    deployment_cluster_name,
    next_attempt,
)
from extproc.core.request import RequestHead
from extproc.envoy.check import check_envoy_config
from extproc.envoy.config import Upstream, render_envoy_config
from extproc.policy import CompiledPolicy, compile_policy, parse_policy
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore, StoreUnavailableError
from tests.helpers import decide_request, headers_msg

REFUSAL = b'{"error": {"message": "blocked by the content management policy"}}'


def policy(**group: Any) -> CompiledPolicy:
    return compile_policy(
        parse_policy(
            {
                "model_groups": [
                    {
                        "name": "g",
                        "fallbacks": ["spare"],
                        "content_policy_fallbacks": ["lenient"],
                        "deployments": [{"id": "g1", "cluster": "cg", "model": "m"}],
                        **group,
                    },
                    {"name": "spare", "deployments": [{"id": "s1", "cluster": "cs", "model": "m"}]},
                    {
                        "name": "lenient",
                        "deployments": [
                            {"id": "l1", "cluster": "cl", "model": "m", "context_window": 10}
                        ],
                    },
                ]
            }
        )
    )


def gateway(compiled: CompiledPolicy, store: MemoryStore | None = None) -> Gateway:
    settings = Settings(policy_path=Path("policy.yaml"))
    return Gateway(settings, compiled, store or MemoryStore(), rng=lambda: 0.0)


def request(headers: dict[str, str]) -> pb.HttpHeaders:
    return headers_msg(list(headers.items()), end_of_stream=False).request_headers


def set_headers(reply: pb.ProcessingResponse) -> dict[str, str]:
    mutation = reply.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


async def refuse_first_attempt(gw: Gateway, composite: str) -> pb.ProcessingResponse:
    first = Attempt(gw, "g1")
    await first.on_request_headers(
        request({"x-extproc-cluster": composite, CALL_HEADER: "call-1", ":path": "/v1/x"})
    )
    status = headers_msg([(":status", "400")], end_of_stream=False).request_headers
    await first.on_response_headers(status)
    return await first.on_response_body(pb.HttpBody(body=REFUSAL, end_of_stream=True))


async def test_a_refusal_is_recorded_and_its_retry_takes_the_class_list() -> None:
    compiled = policy()
    gw = gateway(compiled)
    composite = compiled.failover["g1"].composite
    reply = await refuse_first_attempt(gw, composite)
    mutation = reply.response_body.response.header_mutation
    assert {h.header.key: h.header.raw_value for h in mutation.set_headers}[":status"] == b"503"
    hop = Attempt(gw, HOP_DEPLOYMENT)
    picked = await hop.on_request_headers(
        request({"x-extproc-cluster": composite, CALL_HEADER: "call-1", ATTEMPT_COUNT_HEADER: "2"})
    )
    assert set_headers(picked)[ATTEMPT_CLUSTER_HEADER] == deployment_cluster_name("l1")
    assert set_headers(picked)[ATTEMPT_NUMBER_HEADER] == "2"


async def test_a_retry_whose_record_cannot_be_read_is_refused_not_guessed() -> None:
    class Unreadable(MemoryStore):
        async def snapshot(self, *args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailableError("read timed out")

    compiled = policy()
    gw = gateway(compiled, Unreadable())
    composite = compiled.failover["g1"].composite
    await refuse_first_attempt(gw, composite)  # recorded: writes still work
    hop = Attempt(gw, HOP_DEPLOYMENT)
    reply = await hop.on_request_headers(
        request({"x-extproc-cluster": composite, CALL_HEADER: "call-1", ATTEMPT_COUNT_HEADER: "2"})
    )
    assert reply.immediate_response.status.code == 503  # never the generic fallback s1
    body = json.loads(reply.immediate_response.body)
    assert "store could not be read" in body["error"]["message"]


def test_a_refusal_of_one_class_may_follow_another() -> None:
    compiled = policy(context_window_fallbacks=["spare"])
    route = compiled.failover["g1"]
    assert route.slots == 4  # g1 and s1 (generic), then one per class list
    # g1 refuses on content (l1), l1 finds the call too long: the context-window list
    found = next_attempt(route, {1: "content_policy", 2: "context_window"}, 3)
    assert found is not None
    assert found[0] == "s1"
    # the other way round: s1 refuses on content, the content-policy list
    found = next_attempt(route, {1: "context_window", 2: "content_policy"}, 3)
    assert found is not None
    assert found[0] == "l1"


def test_a_call_too_large_for_a_class_fallback_is_not_failed_over() -> None:
    compiled = policy()
    raw = json.dumps({"model": "g", "messages": [{"role": "user", "content": "x" * 400}]})
    head = RequestHead("POST", "/v1/chat/completions", {})
    now = datetime(2026, 12, 1, tzinfo=UTC)
    decision = decide_request(head, raw.encode(), compiled, GatewayConfig(), lambda: 0.0, now=now)
    # l1's window is 10 tokens: no composite, the call goes straight to g1
    assert dict(decision.set_headers)["x-extproc-cluster"] == "cg"
    assert decision.attempts == ()


@pytest.mark.parametrize("stale", ["static", "dynamic"])
def test_check_finds_a_config_made_for_another_failover_plan(stale: str) -> None:
    dynamic, static = policy(), policy(content_policy_fallbacks=[])
    made_for = static if stale == "static" else dynamic
    checked = dynamic if stale == "static" else static
    clusters = {c: Upstream("127.0.0.1", 1) for c in ("cg", "cs", "cl")}
    text = render_envoy_config(clusters, failover=made_for.failover)
    assert check_envoy_config(text, made_for, Settings()).ok
    report = check_envoy_config(text, checked, Settings())
    assert any("list other attempts" in e for e in report.errors), report.errors
    if stale == "static":
        assert any(HOP_CLUSTER in e for e in report.errors)
