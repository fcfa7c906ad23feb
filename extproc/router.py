"""Choosing a deployment of a model group.

Weighted random for now: a deployment's share of traffic is its weight over the
group's total. ``rng`` is injected so tests can pin the draw.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Collection

from extproc.policy import CompiledDeployment, CompiledGroup

__all__ = ["pick_deployment"]


def pick_deployment(
    group: CompiledGroup, rng: Callable[[], float], exclude: Collection[str] = ()
) -> CompiledDeployment:
    """Pick one deployment of ``group``, weighted by ``weight``, skipping the ids in
    ``exclude`` (the caller leaves at least one)."""
    if not exclude:
        if len(group.deployments) == 1:
            return group.deployments[0]
        return group.pick_weighted(rng())
    left = [d for d in group.deployments if d.id not in exclude]
    if len(left) == 1:
        return left[0]
    cumulative = list(itertools.accumulate(d.weight for d in left))
    index = bisect.bisect_right(cumulative, rng() * cumulative[-1])
    return left[min(index, len(left) - 1)]
