"""Choosing a deployment of a model group: LiteLLM's routing strategies.

Pure functions: the gateway reads each deployment's :class:`DeploymentState` from the
store, removes the ones that cannot serve (cooling down, out of budget, too small a
context window, over their rpm/tpm for usage-based routing), and the group's strategy
picks among the rest. ``rng`` is injected so tests can pin every draw.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Collection, Mapping, Sequence

from extproc.health import DeploymentState
from extproc.policy import CompiledDeployment, CompiledGroup

__all__ = ["STATEFUL", "choose", "over_usage_limits", "pick_deployment"]

Rng = Callable[[], float]
#: Strategies that need the deployments' load from the store.
STATEFUL = frozenset({"least-busy", "usage-based-routing", "latency-based-routing"})


def _weighted(
    candidates: Sequence[CompiledDeployment], weights: Sequence[float], rng: Rng
) -> CompiledDeployment:
    if len(candidates) == 1:
        return candidates[0]
    cumulative = list(itertools.accumulate(weights))
    if cumulative[-1] <= 0:
        return candidates[min(int(rng() * len(candidates)), len(candidates) - 1)]
    index = bisect.bisect_right(cumulative, rng() * cumulative[-1])
    return candidates[min(index, len(candidates) - 1)]


def _uniform(candidates: Sequence[CompiledDeployment], rng: Rng) -> CompiledDeployment:
    return candidates[min(int(rng() * len(candidates)), len(candidates) - 1)]


def pick_deployment(
    group: CompiledGroup, rng: Rng, exclude: Collection[str] = ()
) -> CompiledDeployment:
    """Weighted random over ``group`` minus ``exclude`` (the caller leaves one)."""
    if not exclude:
        if len(group.deployments) == 1:
            return group.deployments[0]
        return group.pick_weighted(rng())
    left = [d for d in group.deployments if d.id not in exclude]
    return _weighted(left, [d.weight for d in left], rng)


def simple_shuffle(candidates: Sequence[CompiledDeployment], rng: Rng) -> CompiledDeployment:
    """LiteLLM's default: by weight, else by rpm, else by tpm, else uniform."""
    if len({d.weight for d in candidates}) > 1:
        return _weighted(candidates, [d.weight for d in candidates], rng)
    if any(d.rpm for d in candidates):
        return _weighted(candidates, [float(d.rpm or 0) for d in candidates], rng)
    if any(d.tpm for d in candidates):
        return _weighted(candidates, [float(d.tpm or 0) for d in candidates], rng)
    return _uniform(candidates, rng)


def _lowest(
    candidates: Sequence[CompiledDeployment], score: Callable[[CompiledDeployment], float], rng: Rng
) -> CompiledDeployment:
    best = min(score(d) for d in candidates)
    return _uniform([d for d in candidates if score(d) == best], rng)


def over_usage_limits(dep: CompiledDeployment, state: DeploymentState, tokens: int) -> bool:
    """usage-based routing skips a deployment whose minute is used up."""
    if dep.rpm is not None and state.rpm >= dep.rpm:
        return True
    return dep.tpm is not None and state.tpm + tokens > dep.tpm


def choose(
    group: CompiledGroup,
    candidates: Sequence[CompiledDeployment],
    states: Mapping[str, DeploymentState],
    rng: Rng,
    *,
    stream: bool = False,
) -> CompiledDeployment:
    """The group's strategy over ``candidates`` (at least one)."""
    if len(candidates) == 1:
        return candidates[0]
    strategy = group.strategy
    empty = DeploymentState()

    def state(dep: CompiledDeployment) -> DeploymentState:
        return states.get(dep.id, empty)

    if strategy == "least-busy":
        return _lowest(candidates, lambda d: float(state(d).inflight), rng)
    if strategy == "usage-based-routing":
        return _lowest(candidates, lambda d: float(state(d).tpm), rng)
    if strategy == "cost-based-routing":

        def cost(dep: CompiledDeployment) -> float:
            prices = dep.prices
            if prices is None:
                return float("inf")
            return float(prices.input_cost_per_token + prices.output_cost_per_token)

        return _lowest(candidates, cost, rng)
    if strategy == "priority":
        first = min(d.order if d.order is not None else 1 << 30 for d in candidates)
        tier = [d for d in candidates if (d.order if d.order is not None else 1 << 30) == first]
        return _weighted(tier, [d.weight for d in tier], rng)
    if strategy == "latency-based-routing":
        means = {d.id: state(d).mean_latency(stream=stream) for d in candidates}
        unmeasured = [d for d in candidates if means[d.id] is None]
        if unmeasured:
            return _uniform(unmeasured, rng)  # measure every deployment first
        fastest = min(m for m in means.values() if m is not None)
        limit = fastest * (1 + group.lowest_latency_buffer)
        return _uniform([d for d in candidates if (means[d.id] or 0) <= limit], rng)
    return simple_shuffle(candidates, rng)
