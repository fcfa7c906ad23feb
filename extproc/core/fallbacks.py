"""Fallbacks at admission: where a call goes when its group cannot take it.

Pure functions. When no deployment of a group can serve (all cooling down, at their
rpm/tpm, out of budget, too small for the call), LiteLLM sends the call to the group's
``fallbacks`` (else ``router_settings.default_fallbacks``), and a fallback group that
cannot serve either goes on to its own. :func:`serve` walks that chain the way
LiteLLM's ``run_async_fallback`` does:

- depth first, in list order; each group tried counts one hop, and the hop count
  carries on across a level's siblings (``attempted_fallbacks``);
- a level whose hop count has reached ``max_fallbacks`` (default 5) tries nothing;
- a group already tried in this call is skipped, so a loop ends;
- with ``enforce_fallback_model_access`` (on by default) a group the caller could not
  ask for by name is skipped;
- ``disable_fallbacks: true`` in the body turns the walk off.

When the walk finds nothing the refusal of the group the client asked for stands (it
names that model, and its ``retry-after`` says when that group serves again).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from extproc.core.errors import GatewayError
from extproc.core.selection import Keep, Rng, RoutingView, fitting_group, select
from extproc.policy import CompiledDeployment, CompiledGroup, CompiledPolicy

__all__ = ["UNSERVED", "Served", "reachable", "serve", "unserved"]

#: The refusals that mean "no deployment of this group can take the call": the
#: reasons to fall back.
UNSERVED = frozenset(
    {
        "deployments_cooling_down",
        "deployments_at_capacity",
        "deployment_budgets_exhausted",
        "context_length_exceeded",
    }
)

#: Whether the caller may be sent to a fallback group.
Allowed = Callable[[CompiledGroup], bool]


@dataclass(frozen=True, slots=True)
class Served:
    """Where the walk sent the call."""

    group: CompiledGroup
    deployment: CompiledDeployment
    #: LiteLLM's ``attempted_fallbacks``: the hop count of the group that served
    #: (0: the group the client asked for).
    fallbacks: int = 0


def unserved(err: GatewayError) -> bool:
    """Whether ``err`` says the group had no deployment for the call."""
    return err.code in UNSERVED


def _next_groups(
    group: CompiledGroup, policy: CompiledPolicy, allowed: Allowed, tried: set[str]
) -> list[CompiledGroup]:
    out = []
    for name in group.fallbacks:
        fallback = policy.groups.get(name)
        if fallback is None or name in tried or name == group.name or not allowed(fallback):
            continue
        out.append(fallback)
    return out


def serve(
    group: CompiledGroup,
    policy: CompiledPolicy,
    view: RoutingView,
    rng: Rng,
    *,
    now: float,
    tokens: int,
    stream: bool = False,
    allowed: Allowed = lambda _: True,
    enabled: bool = True,
    keep: Keep = lambda g: g,
) -> Served:
    """The group and deployment a call asking for ``group`` goes to: ``group``'s own
    :func:`~extproc.core.selection.select`, else the fallback walk; the asked group's
    refusal when nothing can serve. ``view`` must cover every group :func:`reachable`
    names (a deployment it does not know is taken as free)."""
    try:
        found_group, dep = select(
            group, policy, view, rng, now=now, tokens=tokens, stream=stream, keep=keep
        )
        return Served(found_group, dep)
    except GatewayError as err:
        if not enabled or not unserved(err):
            raise
        first = err
    tried = {group.name}

    def walk(current: CompiledGroup, depth: int) -> Served | None:
        if depth >= policy.max_fallbacks:
            return None
        for fallback in _next_groups(current, policy, allowed, tried):
            if fallback.name in tried:  # a deeper level tried it meanwhile
                continue
            tried.add(fallback.name)
            depth += 1
            try:
                found_group, dep = select(
                    fallback, policy, view, rng, now=now, tokens=tokens, stream=stream, keep=keep
                )
                return Served(found_group, dep, depth)
            except GatewayError as err:
                if not unserved(err):
                    raise
            deeper = walk(fallback, depth)
            if deeper is not None:
                return deeper
        return None

    served = walk(group, 0)
    if served is None:
        raise first
    return served


def reachable(
    group: CompiledGroup,
    policy: CompiledPolicy,
    *,
    tokens: int,
    allowed: Allowed = lambda _: True,
    keep: Keep = lambda g: g,
) -> list[tuple[CompiledGroup, list[CompiledDeployment]]]:
    """Every fallback group :func:`serve` may try for a call asking for ``group``
    (without ``group`` itself), each with the deployments whose state it reads (a
    context-window fallback of it when none fits), in walk order: what the runtime
    reads into the view when ``group`` cannot serve. A group no deployment of which
    fits the call is left out (it needs no state to be refused)."""
    out: list[tuple[CompiledGroup, list[CompiledDeployment]]] = []
    tried = {group.name}

    def walk(current: CompiledGroup, depth: int) -> None:
        if depth >= policy.max_fallbacks:
            return
        for fallback in _next_groups(current, policy, allowed, tried):
            if fallback.name in tried:
                continue
            tried.add(fallback.name)
            depth += 1
            with contextlib.suppress(GatewayError):
                out.append(fitting_group(fallback, policy, tokens, keep))
            walk(fallback, depth)

    walk(group, 0)
    return out
