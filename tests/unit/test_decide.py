"""The one decision: :func:`extproc.core.decision.decide` called directly, on a
hand-built view, fixed ids, store facts and ``now``, returns the route, the edits, the
charge and the exact store effects that admit the call; the runtime commits that plan
as it is."""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from extproc.core.access import hash_key
from extproc.core.admission import CallIds, StoreFacts
from extproc.core.decision import (
    Decision,
    GatewayConfig,
    Prepared,
    decide,
    prepare,
)
from extproc.core.errors import GatewayError
from extproc.core.health import DeploymentState, inflight_key
from extproc.core.leases import parallel_key
from extproc.core.limits import rpm_key, tpm_key
from extproc.core.request import RequestHead
from extproc.core.selection import RoutingView
from extproc.policy import CompiledPolicy, compile_policy, parse_policy
from extproc.state import runtime
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore
from extproc.store.base import Admission, Admitted, Budget, Ceiling, Count, Gauge, Take
from extproc.store.keys import marker_key

KEY = "sk-whole"
PRICES = {"input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002}
POLICY: dict[str, Any] = {
    "model_groups": [
        {
            "name": "g",
            "routing_strategy": "least-busy",
            "max_iterations": 3,
            "deployments": [
                {
                    "id": "a",
                    "cluster": "ca",
                    "model": "up-a",
                    "max_budget": 5,
                    "credential": {"env": "UP_KEY"},
                    "prices": PRICES,
                },
                {"id": "b", "cluster": "cb", "model": "up-b", "prices": PRICES},
            ],
        },
        {
            "name": "shuffled",
            "deployments": [
                {"id": "s1", "cluster": "c1", "model": "up-s1", "prices": PRICES},
                {"id": "s2", "cluster": "c2", "model": "up-s2", "prices": PRICES},
            ],
        },
    ],
    "general_settings": {"max_budget": 100},
    "keys": [
        {
            "hash": hash_key(KEY),
            "alias": "k",
            "max_budget": 10,
            "rpm_limit": 60,
            "tpm_limit": 1000,
            "max_parallel_requests": 2,
        }
    ],
}
NOW = datetime(2026, 11, 23, 12, 0, 30, tzinfo=UTC)
CONFIG = GatewayConfig()
IDS = CallIds("r" * 32, "n" * 16)
OWNER = "o" * 16
FACTS = StoreFacts(
    owner=OWNER,
    dead_owners=("d" * 16,),
    hold_s=660.0,
    lease_ttl_s=600.0,
    session_ttl_s=3600.0,
    marker_s=60.0,
)
#: a is idle, b busy: least-busy sends the call to a
VIEW = RoutingView.of({"a": DeploymentState(inflight=0), "b": DeploymentState(inflight=4)}, {}, {})


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return compile_policy(parse_policy(POLICY), env={"UP_KEY": "sk-up"})


def _prepared(policy: CompiledPolicy, model: str = "g") -> Prepared:
    head = RequestHead(
        "POST",
        "/v1/chat/completions",
        {"authorization": f"Bearer {KEY}", "x-litellm-session-id": "s1"},
    )
    raw = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    ).encode()
    return prepare(head, raw, policy, CONFIG, now=NOW)


def _decide(
    policy: CompiledPolicy, facts: StoreFacts = FACTS, **kwargs: Any
) -> tuple[Prepared, Decision]:
    prepared = _prepared(policy)
    decision = decide(
        prepared, policy, CONFIG, VIEW, lambda: 0.5, now=NOW, ids=IDS, facts=facts, **kwargs
    )
    return prepared, decision


def test_one_call_returns_the_route_the_edits_the_charge_and_every_store_effect(
    policy: CompiledPolicy,
) -> None:
    prepared, decision = _decide(policy)
    route, charge, plan = decision.route, decision.charge, decision.plan
    assert prepared.caller is not None
    key = prepared.caller.key
    body = b'{"model": "up-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}'
    assert route.deployment.id == "a"
    assert route.body == body
    assert route.set_headers == (
        ("x-extproc-cluster", "ca"),
        ("authorization", "Bearer sk-up"),
        ("content-length", str(len(body))),
    )
    assert route.remove_headers == (
        "x-api-key",
        "api-key",
        "accept-encoding",
        "x-extproc-deployment",
    )
    # 21 prompt tokens (85 bytes at 4 a token) at 1 µ$, 100 output tokens at 2 µ$
    assert (charge.rid, charge.deployment, charge.estimate) == ("r" * 32, "a", 221)
    assert charge.started == NOW.timestamp()
    assert charge.tpm_key == tpm_key(key)
    # the key's, the gateway's, and the chosen deployment's budget
    assert [ref.label for ref in plan.refs] == ["API key k", "the gateway", "deployment a"]
    assert plan.admission.budgets == (
        Budget(plan.refs[0].store_key, 10_000_000, None),
        Budget("{spend}:global:all", 100_000_000, None),
        Budget("{spend}:deployment:a", 5_000_000, None),
    )
    assert charge.keys == tuple(b.key for b in plan.admission.budgets)
    cap = decision.cap
    assert cap is not None
    assert (cap.session_id, cap.cap) == ("s1", 3)
    member = OWNER + "n" * 16
    assert plan.admission.steps == (
        Count(
            cap.store_key,
            1,
            3600.0,
            limit=3,
            marker=marker_key(cap.store_key, "r" * 32),
            keep_s=60.0,
        ),
        Ceiling(tpm_key(key), 1000),
        Count(rpm_key(key), 1, 60.0, limit=60),
        Take(parallel_key(key), member, 2, 600.0),
        Gauge(inflight_key("a"), 1, 660.0),
    )
    assert (plan.session, plan.tpm, plan.rpm, plan.slot, plan.load) == (0, 1, 2, 3, 4)
    assert plan.lease is not None
    assert (plan.lease.store_key, plan.lease.member) == (parallel_key(key), member)
    admission = plan.admission
    assert (admission.rid, admission.owner, admission.amount) == ("r" * 32, OWNER, 221)
    assert (admission.hold_s, admission.keep_s) == (660.0, 60.0)
    # a slot is taken: the dead peers' slots go first
    assert admission.dead_owners == ("d" * 16,)


def test_a_session_counted_in_process_is_not_in_the_batch_and_owed_counts_lower_the_cap(
    policy: CompiledPolicy,
) -> None:
    down = dataclasses.replace(FACTS, sessions_in_store=False)
    _, decision = _decide(policy, down)
    assert decision.cap is not None  # still counted: by the runtime, in process
    assert decision.plan.session is None
    assert [type(s) for s in decision.plan.admission.steps] == [Ceiling, Count, Take, Gauge]
    assert decision.cap is not None
    owing = dataclasses.replace(FACTS, owed_sessions={decision.cap.store_key: 2})
    _, decision = _decide(policy, owing)
    first = decision.plan.admission.steps[0]
    assert isinstance(first, Count)
    assert (first.limit, decision.plan.owed) == (1, 2)


def test_a_reservation_alone_plans_the_budget_holds_only(policy: CompiledPolicy) -> None:
    _, decision = _decide(policy, limits=False, count=False)
    assert decision.cap is None
    assert decision.plan.admission.steps == ()
    assert decision.plan.lease is None
    assert decision.plan.admission.dead_owners == ()
    assert len(decision.plan.admission.budgets) == 3


def test_a_refusal_is_raised_before_any_effect(policy: CompiledPolicy) -> None:
    cooling = RoutingView.of(
        {"a": DeploymentState(cooling_s=5.0), "b": DeploymentState(cooling_s=9.0)}, {}, {}
    )
    with pytest.raises(GatewayError) as info:
        decide(
            _prepared(policy), policy, CONFIG, cooling, lambda: 0.5, now=NOW, ids=IDS, facts=FACTS
        )
    assert (info.value.status, info.value.code) == (429, "deployments_cooling_down")


def test_the_same_inputs_and_rng_give_the_same_decision(policy: CompiledPolicy) -> None:
    """Nothing but ``rng`` draws: the same seed decides the same, field for field."""
    prepared = _prepared(policy, "shuffled")

    def run(seed: int) -> Decision:
        rng = random.Random(seed).random
        return decide(prepared, policy, CONFIG, VIEW, rng, now=NOW, ids=IDS, facts=FACTS)

    for seed in range(8):
        assert run(seed) == run(seed)
    # and the draw is what picks: some seeds send the call to each deployment
    assert {run(seed).route.deployment.id for seed in range(32)} == {"s1", "s2"}


class _RecordingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[Admission] = []

    async def admit(self, admission: Admission) -> Admitted:
        self.batches.append(admission)
        return await super().admit(admission)


async def test_the_runtime_commits_the_one_decisions_plan_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``route_and_admit`` takes the one decision (ids drawn by the runtime) and
    sends its batch to the store unchanged: nothing is added to the plan between the
    two."""
    decisions: list[Decision] = []

    def recording(*args: Any, **kwargs: Any) -> Decision:
        decision = decide(*args, **kwargs)
        decisions.append(decision)
        return decision

    monkeypatch.setattr(runtime, "decide", recording)
    path = tmp_path / "policy.yaml"
    path.write_text("{}")
    store = _RecordingStore()
    policy = compile_policy(parse_policy(POLICY), env={"UP_KEY": "sk-up"})
    gateway = Gateway(Settings(policy_path=path), policy, store, rng=lambda: 0.5)
    prepared = _prepared(policy)
    route, admission = await gateway.route_and_admit(prepared.head, prepared.raw, policy)
    (decision,) = decisions
    assert store.batches == [decision.plan.admission]
    assert store.batches[0] is decision.plan.admission
    assert route is decision.route
    assert admission.charge is decision.charge
    assert admission.lease == decision.plan.lease
    assert admission.iterations is not None
    assert (admission.iterations.limit, admission.iterations.remaining) == (3, 2)
    # the runtime drew the ids: a 32-digit reservation id, the process's lease member
    assert len(decision.charge.rid) == 32
    assert decision.plan.lease is not None
    assert decision.plan.lease.member.startswith(gateway.liveness.owner)
    await gateway.close()


def test_an_untranslated_streams_token_keeps_the_previous_releases_shape(
    policy: CompiledPolicy,
) -> None:
    """A stream asking for its usage chunk, to a deployment of its own API: the charge
    carries no translation fields, so a process not yet upgraded reads its token."""
    from dataclasses import fields  # noqa: PLC0415

    from extproc.core.charges import Charge  # noqa: PLC0415

    head = RequestHead("POST", "/v1/chat/completions", {"authorization": f"Bearer {KEY}"})
    body = {
        "model": "g",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    prepared = prepare(head, json.dumps(body).encode(), policy, CONFIG, now=NOW)
    decision = decide(prepared, policy, CONFIG, VIEW, lambda: 0.5, now=NOW, ids=IDS, facts=FACTS)
    charge = decision.charge
    assert (charge.client_api, charge.client_usage) == (None, False)
    assert len(json.loads(charge.token())) <= len(fields(Charge)) - 2
