"""Routing strategies and the whole pure routing decision on hand-built views
(LiteLLM's cooldown rules: test_health.py)."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace
from decimal import Decimal

import pytest

from extproc.core.budgets import BudgetRef
from extproc.core.errors import GatewayError
from extproc.core.health import DeploymentState
from extproc.core.pricing import Prices
from extproc.core.selection import (
    EMPTY_VIEW,
    RoutingView,
    choose,
    context_tokens,
    fitting_group,
    over_usage_limits,
    select,
)
from extproc.policy import CompiledDeployment, CompiledGroup, CompiledPolicy


def dep(name: str, **fields: object) -> CompiledDeployment:
    base = CompiledDeployment(
        id=name,
        group="g",
        provider="openai",
        cluster=f"c_{name}",
        model="m",
        weight=None,
        auth_header="authorization",
        auth_value=None,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def group(strategy: str, *deps: CompiledDeployment, buffer: float = 0.0) -> CompiledGroup:
    weights = tuple(itertools.accumulate(d.weight or 0.0 for d in deps))
    return CompiledGroup("g", deps, weights, strategy=strategy, lowest_latency_buffer=buffer)


def spread(g: CompiledGroup, states: dict[str, DeploymentState], n: int = 1000) -> Counter[str]:
    draws = (i / n for i in range(n))  # evenly spaced "random" numbers
    return Counter(choose(g, g.deployments, states, lambda: next(draws)).id for _ in range(n))


def test_simple_shuffle_weight_then_rpm_then_tpm_then_uniform() -> None:
    weighted = group("simple-shuffle", dep("a", weight=3.0), dep("b", weight=1.0))
    assert spread(weighted, {}) == {"a": 750, "b": 250}
    by_rpm = group("simple-shuffle", dep("a", rpm=100), dep("b", rpm=300))
    assert spread(by_rpm, {}) == {"a": 250, "b": 750}
    by_tpm = group("simple-shuffle", dep("a", tpm=1000), dep("b", tpm=1000))
    assert spread(by_tpm, {}) == {"a": 500, "b": 500}
    uniform = group("simple-shuffle", dep("a"), dep("b"), dep("c"))
    assert set(spread(uniform, {}).values()) == {333, 334}


def test_a_deployment_without_weight_next_to_weighted_ones_gets_nothing() -> None:
    """LiteLLM reads a missing weight as 0 once any deployment of the group has one;
    weights also win over rpm, and equal weights still split evenly."""
    g = group("simple-shuffle", dep("a", weight=2.0), dep("b"), dep("c", weight=1.0, rpm=900))
    assert spread(g, {}, 300) == {"a": 200, "c": 100}
    even = group("simple-shuffle", dep("a", weight=1.0), dep("b", weight=1.0, rpm=10))
    assert spread(even, {}) == {"a": 500, "b": 500}
    # priority: the lowest order first, then simple-shuffle within it
    p = group("priority", dep("a", order=1), dep("b", order=1, weight=1.0), dep("c", order=0))
    assert spread(p, {}, 10) == {"c": 10}
    assert choose(p, p.deployments[:2], {}, lambda: 0.0).id == "b"


@pytest.mark.parametrize(
    "strategy",
    [
        "simple-shuffle",
        "least-busy",
        "usage-based-routing",
        "latency-based-routing",
        "cost-based-routing",
        "priority",
    ],
)
def test_rpm_or_tpm_zero_takes_a_deployment_out_of_every_strategy(strategy: str) -> None:
    g = named("g", strategy, dep("a", rpm=0, order=0), dep("b", tpm=0), dep("c", order=5))
    for draw in (0.0, 0.5, 0.99):
        rng = itertools.repeat(draw).__next__
        assert select(g, policy_of(g), EMPTY_VIEW, rng, now=NOW, tokens=1)[1].id == "c"
    full = named("g", strategy, dep("a", rpm=0), dep("b", tpm=0))
    with pytest.raises(GatewayError) as info:
        select(full, policy_of(full), EMPTY_VIEW, lambda: 0.0, now=NOW, tokens=1)
    assert info.value.code == "deployments_at_capacity"


def test_least_busy() -> None:
    g = group("least-busy", dep("a"), dep("b"), dep("c"))
    states = {"a": DeploymentState(inflight=4), "b": DeploymentState(inflight=1)}
    assert spread(g, states, 10) == {"c": 10}  # nothing in flight at c


def test_usage_based_skips_full_deployments_and_prefers_the_least_used() -> None:
    a, b = dep("a", rpm=10, tpm=10_000), dep("b", rpm=10, tpm=10_000)
    assert over_usage_limits(a, DeploymentState(rpm=10), 5)
    assert over_usage_limits(a, DeploymentState(tpm=9_990), 20)
    assert not over_usage_limits(a, DeploymentState(rpm=9, tpm=9_000), 20)
    g = group("usage-based-routing", a, b)
    assert spread(g, {"a": DeploymentState(tpm=500), "b": DeploymentState(tpm=100)}, 10) == {
        "b": 10
    }


def test_latency_based_prefers_the_fast_within_the_buffer() -> None:
    g = group("latency-based-routing", dep("a"), dep("b"), dep("c"), buffer=0.5)
    states = {
        "a": DeploymentState(latency=(0.010, 0.012)),
        "b": DeploymentState(latency=(0.014,)),  # within 50% of the fastest
        "c": DeploymentState(latency=(0.100,)),
    }
    assert set(spread(g, states, 100)) == {"a", "b"}
    # a deployment never measured is tried first
    assert spread(g, {"a": states["a"], "b": states["b"]}, 10) == {"c": 10}
    # streams compare time to first token
    ttft = {
        d: DeploymentState(latency=(0.01,), ttft=(t,))
        for d, t in zip("abc", (0.9, 0.2, 0.5), strict=True)
    }
    assert choose(g, g.deployments, ttft, lambda: 0.0, stream=True).id == "b"


def test_cost_based_and_priority() -> None:
    cheap = Prices(input_cost_per_token=Decimal("0.000001"), output_cost_per_token=Decimal(0))
    dear = Prices(input_cost_per_token=Decimal("0.00001"), output_cost_per_token=Decimal(0))
    g = group("cost-based-routing", dep("a", prices=dear), dep("b", prices=cheap), dep("c"))
    assert spread(g, {}, 10) == {"b": 10}
    p = group("priority", dep("a", order=2), dep("b", order=1), dep("c"))
    assert spread(p, {}, 10) == {"b": 10}
    assert choose(p, [p.deployments[0], p.deployments[2]], {}, lambda: 0.5).id == "a"


# --- the whole routing decision on hand-built views (no store) ----------------------

#: 12:00:20 UTC: 40 seconds of the minute left.
NOW = 1_795_000_000.0 - 1_795_000_000.0 % 60 + 20


def policy_of(*groups: CompiledGroup) -> CompiledPolicy:
    return CompiledPolicy(groups={g.name: g for g in groups})


def named(name: str, strategy: str, *deps: CompiledDeployment, **fields: object) -> CompiledGroup:
    g = group(strategy, *(replace(d, group=name) for d in deps))
    return replace(g, name=name, **fields)  # type: ignore[arg-type]


def budget(dep_id: str, limit: str = "1") -> BudgetRef:
    return BudgetRef("deployment", dep_id, f"deployment {dep_id}", Decimal(limit))


SELECT_CASES: list[tuple[str, str, RoutingView, str]] = [
    # (case, strategy, view, the deployment or 'status code retry-after')
    ("nothing known: the strategy alone", "least-busy", EMPTY_VIEW, "a"),
    (
        "a cooling deployment is skipped",
        "simple-shuffle",
        RoutingView.of({"a": DeploymentState(cooling_s=3.0)}, {}, {}),
        "b",
    ),
    (
        "every deployment cooling: 429 with the shortest wait",
        "simple-shuffle",
        RoutingView.of(
            {"a": DeploymentState(cooling_s=3.2), "b": DeploymentState(cooling_s=9.0)}, {}, {}
        ),
        "429 deployments_cooling_down 4",
    ),
    (
        "a deployment out of budget is skipped",
        "simple-shuffle",
        RoutingView.of({}, {budget("a").store_key: 1_000_000}, {"a": (budget("a"),)}),
        "b",
    ),
    (
        "every deployment out of budget",
        "simple-shuffle",
        RoutingView.of(
            {},
            {budget("a").store_key: 1_000_000, budget("b").store_key: 2_000_000},
            {"a": (budget("a"),), "b": (budget("b"),)},
        ),
        "429 deployment_budgets_exhausted",
    ),
    (
        "least-busy reads the in-flight counts",
        "least-busy",
        RoutingView.of({"a": DeploymentState(inflight=2)}, {}, {}),
        "b",
    ),
    (
        "usage-based skips a full minute",
        "usage-based-routing",
        RoutingView.of({"a": DeploymentState(rpm=10)}, {}, {}),
        "b",
    ),
    (
        "usage-based: every minute used up is a 429 until the minute ends",
        "usage-based-routing",
        RoutingView.of({"a": DeploymentState(rpm=10), "b": DeploymentState(tpm=10_000)}, {}, {}),
        "429 deployments_at_capacity 40",
    ),
]


@pytest.mark.parametrize(
    ("case", "strategy", "view", "expected"), SELECT_CASES, ids=[c[0] for c in SELECT_CASES]
)
def test_select(case: str, strategy: str, view: RoutingView, expected: str) -> None:
    g = named("g", strategy, dep("a", rpm=10, tpm=10_000), dep("b", rpm=10, tpm=10_000))
    try:
        outcome = select(g, policy_of(g), view, lambda: 0.0, now=NOW, tokens=10)[1].id
    except GatewayError as err:
        outcome = f"{err.status} {err.code} {err.headers.get('retry-after', '')}".strip()
    assert outcome == expected, case


def test_select_reads_only_its_arguments() -> None:
    """The same view and draws give the same answer, however often it is asked."""
    g = named("g", "latency-based-routing", dep("a"), dep("b"), dep("c"))
    view = RoutingView.of(
        {
            "a": DeploymentState(latency=(0.5,)),
            "b": DeploymentState(latency=(0.1,)),
            "c": DeploymentState(latency=(0.2,)),
        },
        {},
        {},
    )
    answers = {
        select(g, policy_of(g), view, lambda: 0.7, now=NOW, tokens=1)[1].id for _ in range(20)
    }
    assert answers == {"b"}


def test_context_window_fallbacks() -> None:
    small = named(
        "small", "simple-shuffle", dep("s", context_window=100), context_window_fallbacks=("mid",)
    )
    mid = named(
        "mid", "simple-shuffle", dep("m", context_window=1_000), context_window_fallbacks=("big",)
    )
    big = named("big", "simple-shuffle", dep("b", context_window=10_000))
    policy = policy_of(small, mid, big)
    assert fitting_group(small, policy, 50) == (small, [small.deployments[0]])
    chosen_group, chosen = select(small, policy, EMPTY_VIEW, lambda: 0.0, now=NOW, tokens=5_000)
    assert (chosen_group.name, chosen.id) == ("big", "b")
    # the view of the fallback group is the one consulted
    cooling = RoutingView.of({"b": DeploymentState(cooling_s=1.0)}, {}, {})
    with pytest.raises(GatewayError) as info:
        select(small, policy, cooling, lambda: 0.0, now=NOW, tokens=5_000)
    assert info.value.code == "deployments_cooling_down"
    with pytest.raises(GatewayError) as too_big:
        select(small, policy, EMPTY_VIEW, lambda: 0.0, now=NOW, tokens=50_000)
    assert (too_big.value.status, too_big.value.code) == (400, "context_length_exceeded")
    assert "'small', 'mid', 'big' (largest 10000)" in too_big.value.message


def test_view_is_read_only() -> None:
    states = {"a": DeploymentState(cooling_s=1.0)}
    view = RoutingView.of(states, {}, {})
    states.clear()  # the view holds its own copy
    assert "a" in view.states
    with pytest.raises(TypeError):
        view.states["b"] = DeploymentState()  # type: ignore[index]


def test_context_tokens() -> None:
    assert context_tokens({}) == 1
    assert context_tokens({"messages": "x" * 40, "system": "y" * 4}) == 11


def test_usage_limits_filter_only_what_the_view_knows() -> None:
    """A store that could not be read (fail mode open) knows no load: usage-based
    routing then picks by its strategy alone, even for a call above every tpm, as
    without a store; a deployment the view does know to be full is still skipped."""
    g = named("g", "usage-based-routing", dep("a", tpm=50), dep("b", tpm=50))
    assert select(g, policy_of(g), EMPTY_VIEW, lambda: 0.0, now=NOW, tokens=110)[1].id == "a"
    known = RoutingView.of({"a": DeploymentState(tpm=50)}, {}, {})
    assert select(g, policy_of(g), known, lambda: 0.0, now=NOW, tokens=10)[1].id == "b"


def _favouring_a(strategy: str) -> tuple[CompiledGroup, dict[str, DeploymentState]]:
    """A group whose strategy takes ``a`` when nothing is used (cheaper, faster,
    heavier or less busy), and the states that make it so; ``a`` has rpm 3."""
    cheap = Prices(input_cost_per_token=Decimal("0.000001"), output_cost_per_token=Decimal(0))
    dear = Prices(input_cost_per_token=Decimal("0.00001"), output_cost_per_token=Decimal(0))
    a = dep("a", rpm=3, prices=cheap, weight=1.0)
    b = dep("b", prices=dear, weight=0.0)
    states = {
        "cost-based-routing": {},
        "latency-based-routing": {
            "a": DeploymentState(latency=(0.1,)),
            "b": DeploymentState(latency=(0.9,)),
        },
        "simple-shuffle": {},
        "least-busy": {"b": DeploymentState(inflight=5)},
    }[strategy]
    return named("g", strategy, a, b), states


STRATEGIES = ["cost-based-routing", "latency-based-routing", "simple-shuffle", "least-busy"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_skips_a_deployment_at_its_rpm_for_the_minute(strategy: str) -> None:
    """LiteLLM's cost- and latency-based routing skip a deployment whose calls this
    minute reached its rpm; here every strategy does (usage-based: SELECT_CASES)."""
    g, states = _favouring_a(strategy)

    def pick(used: int) -> str:
        seen = dict(states)
        seen["a"] = replace(seen.get("a", DeploymentState()), rpm=used)
        view = RoutingView.of(seen, {}, {})
        return select(g, policy_of(g), view, lambda: 0.0, now=NOW, tokens=10)[1].id

    assert [pick(used) for used in (0, 2, 3, 4)] == ["a", "a", "b", "b"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_skips_a_deployment_whose_tpm_this_call_would_pass(strategy: str) -> None:
    g, states = _favouring_a(strategy)
    g = replace(g, deployments=(replace(g.deployments[0], rpm=None, tpm=100), g.deployments[1]))
    seen = dict(states)
    seen["a"] = replace(seen.get("a", DeploymentState()), tpm=95)
    view = RoutingView.of(seen, {}, {})
    assert select(g, policy_of(g), view, lambda: 0.0, now=NOW, tokens=5)[1].id == "a"
    assert select(g, policy_of(g), view, lambda: 0.0, now=NOW, tokens=6)[1].id == "b"


def test_every_deployment_at_its_rpm_is_a_429_whatever_the_strategy() -> None:
    g = named("g", "cost-based-routing", dep("a", rpm=3), dep("b", rpm=1))
    view = RoutingView.of({"a": DeploymentState(rpm=3), "b": DeploymentState(rpm=1)}, {}, {})
    with pytest.raises(GatewayError) as info:
        select(g, policy_of(g), view, lambda: 0.0, now=NOW, tokens=1)
    assert (info.value.status, info.value.code) == (429, "deployments_at_capacity")
