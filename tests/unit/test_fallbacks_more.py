"""More fallback-walk cases: budgets and session caps of a call sent to a fallback group."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pytest

from extproc.core.access import hash_key
from extproc.core.decision import decide, prepare
from extproc.core.health import DeploymentState, cooldown_key
from extproc.core.request import RequestHead
from extproc.core.selection import RoutingView
from extproc.policy import compile_policy, load_policy, parse_policy
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore
from tests.helpers import StoppedClock
from tests.unit.test_fallbacks import CONFIG, FACTS, IDS, NOW, _dep

KEY = "sk-more-fallbacks"
FREE = {"input_cost_per_token": 0, "output_cost_per_token": 0}


def test_a_free_groups_fallback_to_a_paid_group_holds_the_keys_budget() -> None:
    """A zero-cost group's call skips budgets; once it falls back to a priced group
    the key's budget must be held like any call of that group."""
    data: dict[str, Any] = {
        "model_groups": [
            {
                "name": "free",
                "deployments": [{"id": "f1", "cluster": "cf", "model": "m", "prices": FREE}],
                "fallbacks": ["paid"],
            },
            {"name": "paid", "deployments": [_dep("p1")]},
        ],
        "keys": [{"hash": hash_key(KEY), "alias": "k", "max_budget": 1}],
    }
    policy = compile_policy(parse_policy(data), env={})
    head = RequestHead("POST", "/v1/chat/completions", {"authorization": f"Bearer {KEY}"})
    raw = json.dumps({"model": "free", "messages": [{"role": "user", "content": "hi"}]}).encode()
    prepared = prepare(head, raw, policy, CONFIG, now=NOW)
    direct = prepare(
        head, raw.replace(b'"free"', b'"paid"'), policy, CONFIG, now=NOW
    )  # the same call asking for the paid group
    view = RoutingView.of({"f1": DeploymentState(cooling_s=3.0)}, {}, {})
    decision = decide(prepared, policy, CONFIG, view, lambda: 0.5, now=NOW, ids=IDS, facts=FACTS)
    assert decision.charge.deployment == "p1"
    asked_paid = decide(direct, policy, CONFIG, view, lambda: 0.5, now=NOW, ids=IDS, facts=FACTS)
    assert set(decision.charge.keys) == set(asked_paid.charge.keys)


SESSIONS = """
model_groups:
  - name: main
    deployments: [{id: m1, cluster: c1, model: m}]
    fallbacks: [capped]
  - name: capped
    max_iterations: 2
    deployments: [{id: c1, cluster: c2, model: m}]
"""


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_a_fallback_groups_session_cap_is_counted_in_the_store(
    tmp_path: Path, mode: Literal["closed", "open"]
) -> None:
    """The call asks for a group without a session cap and falls back to one with
    max_iterations: the store is up, so the cap is counted there and the call is
    admitted (fail mode closed must not answer 503)."""
    path = tmp_path / "policy.yaml"
    path.write_text(SESSIONS)
    policy = load_policy(path)
    clock = StoppedClock(datetime(2026, 11, 23, 12, 0, 20, tzinfo=UTC))
    store = MemoryStore()
    gateway = Gateway(Settings(policy_path=path, fail_mode=mode), policy, store, clock=clock)
    await store.set_flag(cooldown_key("m1"), 30.0)
    head = RequestHead("POST", "/v1/chat/completions", {"x-litellm-session-id": "s1"})
    raw = json.dumps({"model": "main", "messages": []}).encode()
    decision, admission = await gateway.route_and_admit(head, raw, policy)
    assert decision.deployment.id == "c1"
    assert admission.iterations is not None
    # counted in the store, not only in this process
    assert gateway.metrics.fail_mode_used.labels(mode)._value.get() == 0
    assert gateway.metrics.iterations_fallback._value.get() == 0  # not counted in process
    await gateway.drain()


WINDOWS = """
model_groups:
  - name: small
    deployments: [{id: s1, cluster: c1, model: m, context_window: 8}]
    fallbacks: [big]
  - name: big
    deployments: [{id: b1, cluster: c2, model: m}]
"""


async def test_a_call_too_large_for_its_group_goes_to_its_fallbacks(tmp_path: Path) -> None:
    """The core's walk takes a group too small for the call as one that cannot serve
    (context_length_exceeded is a reason to fall back); the gateway must route it the
    same way instead of refusing before the walk."""
    path = tmp_path / "policy.yaml"
    path.write_text(WINDOWS)
    policy = load_policy(path)
    gateway = Gateway(Settings(policy_path=path), policy, MemoryStore())
    head = RequestHead("POST", "/v1/chat/completions", {})
    raw = json.dumps(
        {"model": "small", "messages": [{"role": "user", "content": "word " * 400}]}
    ).encode()
    prepared = prepare(head, raw, policy, CONFIG, now=NOW)
    core = decide(
        prepared,
        policy,
        CONFIG,
        RoutingView.of({}, {}, {}),
        lambda: 0.5,
        now=NOW,
        ids=IDS,
        facts=FACTS,
    )
    assert core.route.deployment.id == "b1"
    assert (await gateway.route(head, raw, policy)).deployment.id == "b1"
    await gateway.drain()


@pytest.mark.parametrize(
    ("big_window", "disable"), [(8, False), (None, True)], ids=["none-fits", "disabled"]
)
async def test_a_call_no_group_fits_is_refused_with_the_asked_groups_400(
    tmp_path: Path, big_window: int | None, disable: bool
) -> None:
    """When the fallback is too small as well, or the call turns fallbacks off, the
    walk finds nothing and the client gets the asked group's 400."""
    from extproc.core.errors import GatewayError  # noqa: PLC0415

    text = WINDOWS
    if big_window is not None:
        text = text.replace("model: m}]\n", f"model: m, context_window: {big_window}}}]\n")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    policy = load_policy(path)
    gateway = Gateway(Settings(policy_path=path), policy, MemoryStore())
    body: dict[str, Any] = {"model": "small", "messages": [{"role": "user", "content": "w " * 400}]}
    if disable:
        body["disable_fallbacks"] = True
    head = RequestHead("POST", "/v1/chat/completions", {})
    with pytest.raises(GatewayError) as refused:
        await gateway.route(head, json.dumps(body).encode(), policy)
    assert (refused.value.status, refused.value.code) == (400, "context_length_exceeded")
    assert "'small'" in refused.value.message
    await gateway.drain()


FAILOVER_TPM = """
model_groups:
  - name: g
    num_retries: 1
    deployments:
      - {id: first, cluster: c1, model: m, weight: 1,
         prices: {input_cost_per_token: 0.000001, output_cost_per_token: 0.000002}}
      - {id: limited, cluster: c2, model: m, weight: 0, tpm: 1000,
         prices: {input_cost_per_token: 0.000001, output_cost_per_token: 0.000002}}
"""


async def test_a_failover_calls_tokens_count_on_the_deployment_that_served(
    tmp_path: Path,
) -> None:
    """Envoy's failover served the call on 'limited' (tpm 1000): its usage counts in
    that deployment's minute, which routing reads, not in the one first chosen."""
    import dataclasses  # noqa: PLC0415

    from extproc.core.health import minute_key  # noqa: PLC0415
    from extproc.core.usage import Usage  # noqa: PLC0415

    path = tmp_path / "policy.yaml"
    path.write_text(FAILOVER_TPM)
    policy = load_policy(path)
    clock = StoppedClock(datetime(2026, 11, 23, 12, 0, 20, tzinfo=UTC))
    store = MemoryStore()
    gateway = Gateway(Settings(policy_path=path), policy, store, clock=clock)
    head = RequestHead("POST", "/v1/chat/completions", {})
    raw = json.dumps({"model": "g", "messages": []}).encode()
    _, admission = await gateway.route_and_admit(head, raw, policy)
    assert admission.charge is not None
    assert admission.charge.deployment == "first"
    assert admission.charge.failover
    charge = dataclasses.replace(admission.charge, served="limited")
    await gateway.settle(charge, Usage(input_tokens=600, output_tokens=400))
    minute = int(clock.wall() // 60)
    assert await store.get_many([minute_key("limited", minute, "tpm")]) == [1000]
    await gateway.drain()


def test_a_failover_settlement_takes_in_flight_off_the_admitted_and_tokens_on_the_served() -> None:
    """Least-busy counted the call in flight on the deployment admission chose; a
    failover served it elsewhere: the gauge comes down where it went up, and the
    tokens count in the serving deployment's minute (usage-based: every deployment)."""
    import dataclasses  # noqa: PLC0415

    from extproc.core.admission import plan_finish  # noqa: PLC0415
    from extproc.core.charges import Charge  # noqa: PLC0415
    from extproc.core.health import inflight_key, minute_key  # noqa: PLC0415
    from extproc.store.base import Count, Gauge  # noqa: PLC0415

    data: dict[str, Any] = {
        "model_groups": [
            {
                "name": "busy",
                "routing_strategy": "least-busy",
                "num_retries": 1,
                "deployments": [_dep("a"), _dep("b")],
                "fallbacks": ["usage"],
            },
            {
                "name": "usage",
                "routing_strategy": "usage-based-routing",
                "deployments": [_dep("u")],
            },
        ]
    }
    policy = compile_policy(parse_policy(data), env={})
    admitted = policy.deployment("a")
    served = policy.deployment("u")
    assert admitted is not None
    assert served is not None
    charge = dataclasses.replace(
        Charge.new(
            rid=IDS.rid,
            api="openai",
            endpoint="chat_completions",
            dep=admitted,
            stream=False,
            strip_usage=False,
            estimate=10,
            refs=(),
            now=NOW,
            failover=True,
        ),
        served="u",
    )
    finish = plan_finish(
        charge,
        5,
        policy.groups["busy"],
        tokens=70,
        hold_s=60.0,
        marker_s=60.0,
        minute=7,
        served=served,
        served_group=policy.groups["usage"],
    )
    gauges = [(s.key, s.amount) for s in finish.steps if isinstance(s, Gauge)]
    counts = [(s.key, s.amount) for s in finish.steps if isinstance(s, Count)]
    assert gauges == [(inflight_key("a"), -1)]
    assert counts == [(minute_key("u", 7, "tpm"), 70)]


STALE = """
model_groups:
  - name: small
    deployments: [{id: s1, cluster: c1, model: m, context_window: 8}]
    context_window_fallbacks: [large]
    fallbacks: [backup]
  - name: large
    deployments: [{id: l1, cluster: c2, model: m}]
  - name: backup
    deployments:
      - {id: b1, cluster: c3, model: m, max_budget: 0.001,
         prices: {input_cost_per_token: 0.001, output_cost_per_token: 0.001}}
      - {id: b2, cluster: c4, model: m,
         prices: {input_cost_per_token: 0.000001, output_cost_per_token: 0.000001}}
"""


@pytest.mark.parametrize("model", ["small", "large"])
async def test_a_stale_fallback_view_is_forgotten_and_the_call_routed_again(
    tmp_path: Path, model: str
) -> None:
    """A call sent to 'large' by its context window (asked as 'small', whose fallback
    is 'backup') finds 'large' cooling and walks to 'backup'. Once b1's budget is
    spent behind the cached view, the reservation refuses b1 and the gateway must
    forget the view it walked ('backup', small's fallback) and route to b2."""
    from extproc.core.usage import Usage  # noqa: PLC0415

    text = (
        STALE
        if model == "small"
        else STALE.replace("  - name: large\n", "  - name: large\n    fallbacks: [backup]\n")
    )
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    policy = load_policy(path)
    clock = StoppedClock(datetime(2026, 11, 23, 12, 0, 20, tzinfo=UTC))
    store = MemoryStore()
    gateway = Gateway(
        Settings(policy_path=path, routing_cache_s=30.0),
        policy,
        store,
        clock=clock,
        rng=lambda: 0.0,
    )
    await store.set_flag(cooldown_key("l1"), 30.0)
    head = RequestHead("POST", "/v1/chat/completions", {})
    raw = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "word " * 40}], "max_tokens": 1}
    ).encode()
    _, first = await gateway.route_and_admit(head, raw, policy)
    assert first.charge is not None
    assert first.charge.deployment == "b1"
    await gateway.settle(first.charge, Usage(input_tokens=1000, output_tokens=1000))
    second, _ = await gateway.route_and_admit(head, raw, policy)
    assert second.deployment.id == "b2"
    await gateway.drain()


def test_a_paid_groups_fallback_to_a_free_group_skips_budgets_like_a_direct_call() -> None:
    """The reverse: served by a zero-cost group, the call holds no budget (a key over
    its budget may use a free model), as a call asking for that group directly."""
    data: dict[str, Any] = {
        "model_groups": [
            {"name": "paid", "deployments": [_dep("p1")], "fallbacks": ["free"]},
            {
                "name": "free",
                "deployments": [{"id": "f1", "cluster": "cf", "model": "m", "prices": FREE}],
            },
        ],
        "keys": [{"hash": hash_key(KEY), "alias": "k", "max_budget": 1}],
    }
    policy = compile_policy(parse_policy(data), env={})
    head = RequestHead("POST", "/v1/chat/completions", {"authorization": f"Bearer {KEY}"})
    raw = json.dumps({"model": "paid", "messages": [{"role": "user", "content": "hi"}]}).encode()
    view = RoutingView.of({"p1": DeploymentState(cooling_s=3.0)}, {}, {})
    fell_back = decide(
        prepare(head, raw, policy, CONFIG, now=NOW),
        policy,
        CONFIG,
        view,
        lambda: 0.5,
        now=NOW,
        ids=IDS,
        facts=FACTS,
    )
    direct = decide(
        prepare(head, raw.replace(b'"paid"', b'"free"'), policy, CONFIG, now=NOW),
        policy,
        CONFIG,
        view,
        lambda: 0.5,
        now=NOW,
        ids=IDS,
        facts=FACTS,
    )
    assert fell_back.charge.deployment == "f1"
    assert set(direct.charge.keys) == set()  # a free group holds nothing
    assert set(fell_back.charge.keys) == set(direct.charge.keys)


async def test_a_callers_budget_refusal_keeps_the_cached_views(tmp_path: Path) -> None:
    """Only a deployment's or provider's budget can be stale in a cached view: a key's
    budget refusal is the caller's, and another call's cached view is kept."""
    from extproc.core.errors import BudgetExceededError  # noqa: PLC0415
    from extproc.core.usage import Usage  # noqa: PLC0415

    text = f"""
model_groups:
  - name: g
    deployments:
      - {{id: d1, cluster: c1, model: m,
         prices: {{input_cost_per_token: 0.001, output_cost_per_token: 0.001}}}}
keys:
  - {{hash: "{hash_key(KEY)}", alias: k, max_budget: 0.01}}
"""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    policy = load_policy(path)
    clock = StoppedClock(datetime(2026, 11, 23, 12, 0, 20, tzinfo=UTC))
    gateway = Gateway(
        Settings(policy_path=path, routing_cache_s=30.0), policy, MemoryStore(), clock=clock
    )
    head = RequestHead("POST", "/v1/chat/completions", {"authorization": f"Bearer {KEY}"})
    raw = json.dumps({"model": "g", "messages": [], "max_tokens": 1}).encode()
    _, first = await gateway.route_and_admit(head, raw, policy)
    assert first.charge is not None
    await gateway.settle(first.charge, Usage(input_tokens=100, output_tokens=100))
    with pytest.raises(BudgetExceededError) as refused:
        await gateway.route_and_admit(head, raw, policy)
    assert refused.value.code == "key_budget_exceeded"
    assert gateway.router.forget("g")  # the view was still cached
    await gateway.drain()


@pytest.mark.parametrize(
    ("fallback_model", "rewrite_body", "served"),
    [
        ("other-model", True, "o1"),  # ext_proc rewrites the model name
        ("other-model", False, None),  # ext_authz cannot: the walk stops, the 429 stands
        ("main", False, "o1"),  # the fallback's upstream takes the name the client sent
    ],
)
def test_where_the_body_cannot_change_the_walk_skips_groups_needing_another_model_name(
    fallback_model: str, rewrite_body: bool, served: str | None
) -> None:
    """Under ext_authz the upstream gets the client's body: a fallback group whose
    deployments expect another model name would be sent a model it does not serve."""
    from extproc.core.errors import GatewayError  # noqa: PLC0415

    data: dict[str, Any] = {
        "model_groups": [
            {"name": "main", "deployments": [_dep("m1")], "fallbacks": ["other"]},
            {
                "name": "other",
                "deployments": [{"id": "o1", "cluster": "co", "model": fallback_model}],
            },
        ]
    }
    policy = compile_policy(parse_policy(data), env={})
    head = RequestHead("POST", "/v1/chat/completions", {})
    raw = json.dumps({"model": "main", "messages": []}).encode()
    prepared = prepare(head, raw, policy, CONFIG, now=NOW)
    view = RoutingView.of({"m1": DeploymentState(cooling_s=3.0)}, {}, {})

    def run() -> str:
        return decide(
            prepared,
            policy,
            CONFIG,
            view,
            lambda: 0.5,
            now=NOW,
            ids=IDS,
            facts=FACTS,
            rewrite_body=rewrite_body,
        ).route.deployment.id

    if served is None:
        with pytest.raises(GatewayError) as refused:
            run()
        assert (refused.value.status, refused.value.code) == (429, "deployments_cooling_down")
    else:
        assert run() == served


async def test_behind_ext_authz_the_gateway_reads_no_group_it_cannot_walk_to(
    tmp_path: Path,
) -> None:
    """The same rule through the gateway: the call is refused with the asked group's
    429 and the fallback group's state is not read for it."""
    from extproc.core.errors import GatewayError  # noqa: PLC0415

    path = tmp_path / "policy.yaml"
    path.write_text(
        """
model_groups:
  - name: main
    deployments: [{id: m1, cluster: c1, model: main}]
    fallbacks: [other]
  - name: other
    deployments: [{id: o1, cluster: c2, model: other-model}]
"""
    )
    policy = load_policy(path)
    store = MemoryStore()
    gateway = Gateway(Settings(policy_path=path, routing_cache_s=30.0), policy, store)
    await store.set_flag(cooldown_key("m1"), 30.0)
    head = RequestHead("POST", "/v1/chat/completions", {})
    raw = json.dumps({"model": "main", "messages": []}).encode()
    with pytest.raises(GatewayError) as refused:
        await gateway.route_and_admit(head, raw, policy, rewrite_body=False)
    assert refused.value.code == "deployments_cooling_down"
    assert not gateway.router.forget("other")  # never read (nor cached)
    decision, _ = await gateway.route_and_admit(head, raw, policy)
    assert decision.deployment.id == "o1"  # ext_proc rewrites the name: it walks
    await gateway.drain()
