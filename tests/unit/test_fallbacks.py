"""Fallbacks at admission: a group none of whose deployments can take a call sends it
to its fallback groups (:mod:`extproc.core.fallbacks`), walked by the one
:func:`~extproc.core.decision.decide` on a hand-built view."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from extproc.core.access import hash_key
from extproc.core.admission import CallIds, StoreFacts
from extproc.core.charges import deployment_budgets
from extproc.core.decision import Decision, GatewayConfig, Prepared, decide, fallback_scope, prepare
from extproc.core.errors import GatewayError
from extproc.core.health import DeploymentState
from extproc.core.request import RequestHead
from extproc.core.selection import NO_DEPLOYMENTS, RoutingView
from extproc.policy import CompiledPolicy, compile_policy, parse_policy

KEY = "sk-fallbacks"
PRICES = {"input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002}
NOW = datetime(2026, 11, 23, 12, 0, 30, tzinfo=UTC)
CONFIG = GatewayConfig()
IDS = CallIds("r" * 32, "n" * 16)
FACTS = StoreFacts(
    owner="o" * 16,
    dead_owners=(),
    hold_s=660.0,
    lease_ttl_s=600.0,
    session_ttl_s=3600.0,
    marker_s=60.0,
)
COOL = DeploymentState(cooling_s=7.2)


def _dep(dep_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": dep_id,
        "cluster": f"c_{dep_id}",
        "model": f"up-{dep_id}",
        "prices": PRICES,
        **extra,
    }


def _policy(enforce: bool = True, models: tuple[str, ...] = ()) -> CompiledPolicy:
    chain = [
        {"name": f"chain{i}", "deployments": [_dep(f"h{i}")], "fallbacks": [f"chain{i + 1}"]}
        for i in range(6)
    ]
    chain.append({"name": "chain6", "deployments": [_dep("h6")]})
    data: dict[str, Any] = {
        "model_groups": [
            {"name": "main", "deployments": [_dep("m1"), _dep("m2")], "fallbacks": ["backup"]},
            # loops back to main
            {"name": "backup", "deployments": [_dep("b1", max_budget=3)], "fallbacks": ["main"]},
            {
                "name": "capped",
                "routing_strategy": "usage-based-routing",
                "deployments": [_dep("c1", rpm=10)],
                "fallbacks": ["backup"],
            },
            {"name": "alone", "deployments": [_dep("a1")]},
            {"name": "guarded", "deployments": [_dep("g1")], "fallbacks": ["secret", "backup"]},
            {"name": "secret", "deployments": [_dep("s1")]},
            *chain,
        ],
        "general_settings": {"enforce_fallback_model_access": enforce},
        "keys": [{"hash": hash_key(KEY), "alias": "k", "models": list(models)}],
    }
    return compile_policy(parse_policy(data), env={})


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return _policy()


def _prepared(policy: CompiledPolicy, model: str, **fields: Any) -> Prepared:
    head = RequestHead("POST", "/v1/chat/completions", {"authorization": f"Bearer {KEY}"})
    raw = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    ).encode()
    return prepare(head, raw, policy, CONFIG, now=NOW)


def _decide(
    policy: CompiledPolicy, model: str, states: dict[str, DeploymentState], **fields: Any
) -> Decision:
    view = RoutingView.of(states, {}, {})
    return decide(
        _prepared(policy, model, **fields),
        policy,
        CONFIG,
        view,
        lambda: 0.5,
        now=NOW,
        ids=IDS,
        facts=FACTS,
    )


def _refusal(
    policy: CompiledPolicy, model: str, states: dict[str, DeploymentState], **fields: Any
) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        _decide(policy, model, states, **fields)
    return caught.value


def test_a_cooling_group_sends_the_call_to_its_fallback(policy: CompiledPolicy) -> None:
    decision = _decide(policy, "main", {"m1": COOL, "m2": COOL})
    route = decision.route
    assert (route.deployment.id, route.fallbacks) == ("b1", 1)
    assert route.group is not None
    assert route.group.name == "backup"
    assert json.loads(route.body)["model"] == "up-b1"
    # priced and budgeted as the fallback's deployment
    assert decision.charge.deployment == "b1"
    b1 = policy.deployment("b1")
    assert b1 is not None
    expected = {r.store_key for r in deployment_budgets(b1, policy, NOW)}
    assert expected
    assert expected <= set(decision.charge.keys)


def test_a_group_that_serves_takes_no_fallback(policy: CompiledPolicy) -> None:
    route = _decide(policy, "main", {"m1": COOL}).route
    assert (route.deployment.id, route.fallbacks) == ("m2", 0)


def test_a_group_at_capacity_falls_back(policy: CompiledPolicy) -> None:
    route = _decide(policy, "capped", {"c1": DeploymentState(rpm=10)}).route
    assert (route.deployment.id, route.fallbacks) == ("b1", 1)


def test_a_loop_of_fallbacks_ends_in_the_asked_groups_429(policy: CompiledPolicy) -> None:
    err = _refusal(policy, "main", {"m1": COOL, "m2": DeploymentState(cooling_s=3.4), "b1": COOL})
    assert (err.status, err.code) == (429, "deployments_cooling_down")
    assert NO_DEPLOYMENTS in err.message
    assert "'main'" in err.message
    assert err.headers["retry-after"] == "4"  # the first cooldown of main to end


@pytest.mark.parametrize(
    ("free", "served"),
    [("h5", ("h5", 5)), ("h6", None), ("h1", ("h1", 1))],
)
def test_at_most_five_fallbacks(
    policy: CompiledPolicy, free: str, served: tuple[str, int] | None
) -> None:
    states = {f"h{i}": COOL for i in range(7) if f"h{i}" != free}
    if served is None:
        err = _refusal(policy, "chain0", states)
        assert err.code == "deployments_cooling_down"
        return
    route = _decide(policy, "chain0", states).route
    assert (route.deployment.id, route.fallbacks) == served


def test_max_fallbacks_is_the_policys() -> None:
    data = {
        "model_groups": [
            {"name": "x", "deployments": [_dep("x1")], "fallbacks": ["y"]},
            {"name": "y", "deployments": [_dep("y1")]},
        ],
        "router_settings": {"max_fallbacks": 0},
    }
    policy = compile_policy(parse_policy(data), env={})
    head = RequestHead("POST", "/v1/chat/completions", {})
    raw = b'{"model": "x", "messages": []}'
    prepared = prepare(head, raw, policy, CONFIG, now=NOW)
    view = RoutingView.of({"x1": COOL}, {}, {})
    with pytest.raises(GatewayError):
        decide(prepared, policy, CONFIG, view, lambda: 0.5, now=NOW, ids=IDS, facts=FACTS)


@pytest.mark.parametrize(("enforce", "served"), [(True, "b1"), (False, "s1")])
def test_model_access_applies_to_fallbacks_as_the_setting_says(enforce: bool, served: str) -> None:
    policy = _policy(enforce=enforce, models=("guarded", "backup"))
    route = _decide(policy, "guarded", {"g1": COOL}).route
    assert route.deployment.id == served


def test_a_fallback_the_key_may_not_use_is_never_tried() -> None:
    policy = _policy(models=("main",))
    err = _refusal(policy, "main", {"m1": COOL, "m2": COOL})
    assert err.code == "deployments_cooling_down"


def test_disable_fallbacks_gets_the_429_with_litellms_phrase(policy: CompiledPolicy) -> None:
    err = _refusal(
        policy,
        "main",
        {"m1": COOL, "m2": DeploymentState(cooling_s=12.5)},
        disable_fallbacks=True,
    )
    assert (err.status, err.code) == (429, "deployments_cooling_down")
    assert err.message.startswith(f"{NO_DEPLOYMENTS}, Try again in 8 seconds")
    assert err.headers["retry-after"] == "8"


def test_only_the_literal_true_disables_fallbacks(policy: CompiledPolicy) -> None:
    route = _decide(policy, "main", {"m1": COOL, "m2": COOL}, disable_fallbacks="yes").route
    assert route.deployment.id == "b1"


def test_disable_fallbacks_never_reaches_the_upstream(policy: CompiledPolicy) -> None:
    route = _decide(policy, "main", {}, disable_fallbacks=True).route
    assert json.loads(route.body) == {
        "model": route.deployment.model,
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_a_fallbacks_own_fallbacks_are_walked(policy: CompiledPolicy) -> None:
    route = _decide(policy, "capped", {"c1": DeploymentState(rpm=10), "b1": COOL}).route
    assert route.group is not None
    assert route.group.name == "main"
    assert route.fallbacks == 2


def test_at_capacity_429_carries_the_phrase(policy: CompiledPolicy) -> None:
    states = {"c1": DeploymentState(rpm=10), "b1": COOL, "m1": COOL, "m2": COOL}
    err = _refusal(policy, "capped", states)
    assert err.code == "deployments_at_capacity"
    assert err.message.startswith(NO_DEPLOYMENTS)
    assert err.headers["retry-after"] == "30"  # the rest of the minute


def test_fallback_scope_reads_more_only_when_the_group_cannot_serve(
    policy: CompiledPolicy,
) -> None:
    def scope(model: str, states: dict[str, DeploymentState], **fields: Any) -> list[str]:
        prepared = _prepared(policy, model, **fields)
        view = RoutingView.of(states, {}, {})
        return [g.name for g, _ in fallback_scope(prepared, policy, view, now=NOW)]

    assert scope("main", {}) == []
    assert scope("alone", {"a1": COOL}) == []  # no fallbacks: nothing more to read
    assert scope("main", {"m1": COOL, "m2": COOL}) == ["backup"]
    assert scope("main", {"m1": COOL, "m2": COOL}, disable_fallbacks=True) == []
    assert scope("chain0", {"h0": COOL}) == [f"chain{i}" for i in range(1, 6)]
