"""Choosing a deployment of a model group.

Weighted random for now: a deployment's share of traffic is its weight over the
group's total. ``rng`` is injected so tests can pin the draw.
"""

from __future__ import annotations

from collections.abc import Callable

from extproc.policy import CompiledDeployment, CompiledGroup

__all__ = ["pick_deployment"]


def pick_deployment(group: CompiledGroup, rng: Callable[[], float]) -> CompiledDeployment:
    """Pick one deployment of ``group``, weighted by ``weight``."""
    if len(group.deployments) == 1:
        return group.deployments[0]
    return group.pick_weighted(rng())
