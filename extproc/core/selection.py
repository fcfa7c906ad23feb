"""Choosing a deployment of a model group: LiteLLM's routing strategies.

Pure functions. :func:`select` is the whole routing decision: context windows first
(when no deployment of the group is large enough, the call goes to the group's
``context_window_fallbacks``, at most five deep, else a 400
``context_length_exceeded``), then the deployments that cannot serve are removed
(cooling down, out of budget, at their rpm/tpm for the minute) and the
group's strategy picks among the rest. What the store knows arrives as a read-only
:class:`RoutingView` (``routing.Router`` reads it); ``rng`` and ``now`` are injected
so tests can pin every draw and every clock minute.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from extproc.core.budgets import BudgetRef
from extproc.core.charges import exhausted_deployments, no_deployment_left
from extproc.core.errors import BadRequestError, RateLimitError
from extproc.core.health import DeploymentState
from extproc.policy import CompiledDeployment, CompiledGroup, CompiledPolicy

__all__ = [
    "EMPTY_VIEW",
    "MAX_FALLBACKS",
    "NO_DEPLOYMENTS",
    "STATEFUL",
    "Keep",
    "RoutingView",
    "choose",
    "context_tokens",
    "fitting_group",
    "over_usage_limits",
    "select",
]

Rng = Callable[[], float]
#: Strategies that need the deployments' load from the store.
STATEFUL = frozenset({"least-busy", "usage-based-routing", "latency-based-routing"})
#: How deep context-window fallbacks go.
MAX_FALLBACKS = 5
#: LiteLLM's words for a group none of whose deployments can take a call (clients
#: and tests match on them).
NO_DEPLOYMENTS = "No deployments available for selected model"


def _frozen() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RoutingView:
    """What the store says about the deployments one call may go to, read once.

    Rule: read-only; a deployment missing from ``states`` is one nothing is known
    about (not cooling, no load), so an empty view routes by the strategy alone (the
    fail-open answer when the store cannot be read).
    """

    #: Deployment id → its cooldown and load.
    states: Mapping[str, DeploymentState] = field(default_factory=_frozen)
    #: Budget store key → micro-dollars spent (None: nothing spent yet).
    spends: Mapping[str, int | None] = field(default_factory=_frozen)
    #: Deployment id → the provider and deployment budgets of the budget filter.
    budgets: Mapping[str, tuple[BudgetRef, ...]] = field(default_factory=_frozen)

    @classmethod
    def of(
        cls,
        states: Mapping[str, DeploymentState],
        spends: Mapping[str, int | None],
        budgets: Mapping[str, tuple[BudgetRef, ...]],
    ) -> RoutingView:
        """A view over copies of the given mappings (later changes do not leak in)."""
        return cls(
            MappingProxyType(dict(states)),
            MappingProxyType(dict(spends)),
            MappingProxyType(dict(budgets)),
        )

    def merged(self, *others: RoutingView) -> RoutingView:
        """One view over this one and ``others`` (views of other groups: a fallback
        chain's)."""
        if not others:
            return self
        views = (self, *others)
        return RoutingView(
            MappingProxyType({k: v for view in views for k, v in view.states.items()}),
            MappingProxyType({k: v for view in views for k, v in view.spends.items()}),
            MappingProxyType({k: v for view in views for k, v in view.budgets.items()}),
        )


#: Nothing known: every deployment may serve.
EMPTY_VIEW = RoutingView()


def context_tokens(body: Mapping[str, Any]) -> int:
    """Input tokens for the context-window check: the text the model reads (messages,
    input, prompt, system) at a token per 4 characters."""
    chars = 0
    for name in ("messages", "input", "prompt", "system", "instructions"):
        value = body.get(name)
        if value is not None:
            chars += len(str(value))
    return max(1, math.ceil(chars / 4))


def _whole(group: CompiledGroup) -> CompiledGroup:
    return group


#: The deployments of a group that can serve the call's endpoint (``CompiledGroup.serving``).
Keep = Callable[[CompiledGroup], CompiledGroup]


def fitting_group(
    group: CompiledGroup, policy: CompiledPolicy, tokens: int, keep: Keep = _whole
) -> tuple[CompiledGroup, list[CompiledDeployment]]:
    """The group that serves a call of ``tokens`` input tokens (``group`` or one of its
    context-window fallbacks, of which only the deployments ``keep`` keeps) and its
    deployments large enough for it; a 400 ``context_length_exceeded`` when there is
    none.

    Rule: the router reads the view of exactly this group, and :func:`select` finds
    the same one again (both from the policy alone)."""
    tried = [group.name]
    for _ in range(MAX_FALLBACKS + 1):
        fits = [
            d for d in group.deployments if d.context_window is None or tokens <= d.context_window
        ]
        if fits:
            return group, fits
        nxt = None
        for name in group.context_window_fallbacks:
            if name in tried:
                continue
            tried.append(name)
            kept = keep(policy.groups[name])
            if kept.deployments:  # else none of it can serve this endpoint: the next
                nxt = kept
                break
        if nxt is None:
            break
        group = nxt
    largest = max((d.context_window or 0) for d in group.deployments)
    raise BadRequestError(
        f"This request (about {tokens} input tokens) exceeds the context window of every "
        f"deployment of {', '.join(repr(t[:128]) for t in tried)} (largest {largest}).",
        code="context_length_exceeded",
        param="messages",
    )


def select(
    group: CompiledGroup,
    policy: CompiledPolicy,
    view: RoutingView,
    rng: Rng,
    *,
    now: float,
    tokens: int,
    stream: bool = False,
    keep: Keep = _whole,
) -> tuple[CompiledGroup, CompiledDeployment]:
    """The group (``group`` or a context-window fallback) and deployment a call goes
    to, or a refusal: 400 ``context_length_exceeded``, 429
    ``deployments_at_capacity`` (every deployment's rpm/tpm used up this minute), 429
    ``deployments_cooling_down``, or the budget filter's ``no_deployment_left``.

    ``now``: Unix time (the retry-after of a full minute); ``tokens``: the call's
    :func:`context_tokens`; ``stream``: latency-based routing compares time to first
    token; ``keep``: :func:`fitting_group`'s."""
    group, fits = fitting_group(group, policy, tokens, keep)
    exhausted = exhausted_deployments(group, view.budgets, view.spends)
    empty = DeploymentState()
    states = {d.id: view.states.get(d.id, empty) for d in fits}
    cooling = {d.id: s.cooling_s for d in fits if (s := states[d.id]).cooling_s}
    left = [d for d in fits if d.id not in exhausted and d.id not in cooling]
    # Rule: rpm or tpm 0 takes a deployment out of every strategy
    zero = [d for d in left if d.rpm == 0 or d.tpm == 0]
    left = [d for d in left if d not in zero]
    # Rule: every strategy skips a deployment at its rpm/tpm for the minute; only load
    # the view knows of filters (a store that could not be read, fail mode open,
    # knows none: the strategy alone decides, as without a store)
    within = [
        d for d in left if d.id not in view.states or not over_usage_limits(d, states[d.id], tokens)
    ]
    if left and not within:
        zero = left
    left = within
    if zero and not left:
        raise RateLimitError(
            f"{NO_DEPLOYMENTS}: every deployment of {group.name[:256]!r} is at its "
            "rpm/tpm limit for this minute.",
            code="deployments_at_capacity",
            headers={"retry-after": str(max(1, 60 - int(now) % 60))},
        )
    if left:
        return group, choose(group, left, states, rng, stream=stream)
    if cooling:
        # Rule: the seconds until the first cooldown ends (LiteLLM gives the shortest
        # cooldown length instead, which overstates the wait of one that began earlier)
        wait = max(1, math.ceil(min(s for s in cooling.values() if s is not None)))
        raise RateLimitError(
            f"{NO_DEPLOYMENTS}, Try again in {wait} seconds: every deployment of "
            f"{group.name[:256]!r} is cooling down after failures.",
            code="deployments_cooling_down",
            headers={"retry-after": str(wait)},
        )
    raise no_deployment_left(group, exhausted)


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


def simple_shuffle(candidates: Sequence[CompiledDeployment], rng: Rng) -> CompiledDeployment:
    """LiteLLM's default: by ``weight`` when any candidate has one (one without gets
    none of the traffic), else by rpm, else by tpm, else uniformly."""
    for weights in (
        [d.weight or 0.0 for d in candidates],
        [float(d.rpm or 0) for d in candidates],
        [float(d.tpm or 0) for d in candidates],
    ):
        if max(weights) > 0:
            return _weighted(candidates, weights, rng)
    return _uniform(candidates, rng)


def _lowest(
    candidates: Sequence[CompiledDeployment], score: Callable[[CompiledDeployment], float], rng: Rng
) -> CompiledDeployment:
    best = min(score(d) for d in candidates)
    return _uniform([d for d in candidates if score(d) == best], rng)


def over_usage_limits(dep: CompiledDeployment, state: DeploymentState, tokens: int) -> bool:
    """Every strategy skips a deployment whose minute is used up: its calls reached
    its rpm, or its tokens plus this call's would pass its tpm (LiteLLM's rule)."""
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
        return simple_shuffle(tier, rng)
    if strategy == "latency-based-routing":
        means = {d.id: state(d).mean_latency(stream=stream) for d in candidates}
        unmeasured = [d for d in candidates if means[d.id] is None]
        if unmeasured:
            return _uniform(unmeasured, rng)  # measure every deployment first
        fastest = min(m for m in means.values() if m is not None)
        limit = fastest * (1 + group.lowest_latency_buffer)
        return _uniform([d for d in candidates if (means[d.id] or 0) <= limit], rng)
    return simple_shuffle(candidates, rng)
