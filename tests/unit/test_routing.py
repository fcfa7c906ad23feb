"""The store side of routing: the view it reads (and caches by the injected clock),
and the health samples the core decides on."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from extproc.core.health import HealthSample, cooldown_key
from extproc.policy import compile_policy, parse_policy
from extproc.state.metrics import Metrics
from extproc.state.routing import Router
from extproc.store import MemoryStore, StoreError
from tests.helpers import StoppedClock

POLICY = compile_policy(
    parse_policy(
        {
            "model_groups": [
                {
                    "name": "g",
                    "deployments": [
                        {"id": "a", "cluster": "ca", "model": "m"},
                        {"id": "b", "cluster": "cb", "model": "m"},
                    ],
                }
            ]
        }
    )
)
NOW = datetime(2026, 11, 23, 12, 0, 20, tzinfo=UTC)


class _CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.snapshots = 0

    async def snapshot(
        self, keys: Sequence[str], lists: Sequence[str]
    ) -> tuple[list[tuple[int | None, float | None]], list[list[float]]]:
        self.snapshots += 1
        return await super().snapshot(keys, lists)


def _router(store: MemoryStore, clock: StoppedClock, errors: list[StoreError]) -> Router:
    return Router(
        store,
        Metrics(),
        clock,
        on_read_error=errors.append,
        on_write_error=errors.append,
        cache_s=1.0,
    )


async def test_the_view_is_cached_for_cache_s_of_the_injected_clock() -> None:
    store, clock = _CountingStore(), StoppedClock(NOW)
    errors: list[StoreError] = []
    router = _router(store, clock, errors)
    group = POLICY.groups["g"]
    first = await router.view(group, group.deployments, POLICY, NOW)
    again = await router.view(group, group.deployments, POLICY, NOW)
    assert (again is first, store.snapshots) == (True, 1)
    clock.mono += 1.5  # past cache_s: read fresh
    await router.view(group, group.deployments, POLICY, NOW)
    assert store.snapshots == 2
    assert errors == []


async def test_a_recorded_failure_cools_and_shows_in_the_next_view() -> None:
    store, clock = MemoryStore(), StoppedClock(NOW)
    errors: list[StoreError] = []
    router = _router(store, clock, errors)
    group = POLICY.groups["g"]
    await router.view(group, group.deployments, POLICY, NOW)  # cached, healthy
    await router.record(HealthSample("a", 429), POLICY)
    assert (await store.get_many([cooldown_key("a")]))[0] is not None
    view = await router.view(group, group.deployments, POLICY, NOW)
    assert view.states["a"].cooling_s is not None  # the failure dropped the cached view
    assert view.states["b"].cooling_s is None
    # a deployment the policy no longer has is not recorded
    await router.record(HealthSample("gone", 500), POLICY)
    assert errors == []
