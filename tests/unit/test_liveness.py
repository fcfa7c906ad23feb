"""A process that dies frees its slots fast: two gateways on one store, one goes silent."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from extproc.core.leases import LEASE_NAMESPACE, Lease
from extproc.policy import load_policy
from extproc.state.liveness import Liveness
from extproc.state.metrics import Metrics
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore, StoreUnavailableError
from tests.unit.test_budgets import ENV, POLICY, route
from tests.unit.test_budgets import SAM as SAM_HASH
from tests.unit.test_parallel import ext_proc_lease
from tests.unit.test_store import FakeClock

SAM = f"{{t:key:{SAM_HASH}}}:key:{SAM_HASH}"


def two_processes(clock: FakeClock) -> tuple[MemoryStore, Gateway, Gateway]:
    """Two gateways sharing one store, as two server processes share one Redis."""
    store = MemoryStore(clock)
    gateways = [
        Gateway(Settings(policy_path=POLICY), load_policy(POLICY, env=ENV), store, rng=lambda: 0.1)
        for _ in range(2)
    ]
    return store, gateways[0], gateways[1]


def admitted(reply: Any) -> bool:
    return LEASE_NAMESPACE in reply.dynamic_metadata.fields


def count(gateway: Gateway, metric: str, label: str) -> float:
    value: float = getattr(gateway.metrics, metric).labels(label)._value.get()
    return value


async def test_each_process_start_has_its_own_id() -> None:
    _, one, two = two_processes(FakeClock())
    assert one.liveness.owner != two.liveness.owner
    reply = await ext_proc_lease(one)
    token = reply.dynamic_metadata.fields[LEASE_NAMESPACE].struct_value.fields["lease"]
    lease = Lease.parse(token.string_value)
    assert lease is not None
    assert lease.member.startswith(one.liveness.owner)


async def test_a_dead_process_frees_its_slots_for_its_peer() -> None:
    clock = FakeClock()
    _, dying, peer = two_processes(clock)
    await dying.liveness.tick()
    await peer.liveness.tick()
    assert admitted(await ext_proc_lease(dying))
    assert admitted(await ext_proc_lease(dying))  # zed's two slots, both never released
    assert not admitted(await ext_proc_lease(peer))
    clock.now += 2.9  # the dying process's last beat has not run out yet
    await peer.liveness.tick()
    assert not admitted(await ext_proc_lease(peer))
    clock.now += 0.1
    await peer.liveness.tick()
    assert peer.liveness.dead == (dying.liveness.owner,)
    assert admitted(await ext_proc_lease(peer))
    assert admitted(await ext_proc_lease(peer))
    assert not admitted(await ext_proc_lease(peer))  # the limit still holds
    assert count(peer, "leases", "reaped") == 2


async def test_a_dead_process_holds_are_given_back_once() -> None:
    clock = FakeClock()
    store, dying, peer = two_processes(clock)
    policy = dying.policy
    await dying.liveness.tick()
    await peer.liveness.tick()
    held = await dying.reserve(route(policy, "sk-sam-budget"), policy)
    kept = await peer.reserve(route(policy, "sk-sam-budget"), policy)
    assert held.estimate > 0
    assert await store.get_many([SAM]) == [held.estimate + kept.estimate]
    clock.now += 3
    await peer.liveness.tick()
    assert await store.get_many([SAM]) == [kept.estimate]  # the dead one's hold only
    # one hold per slot: the key's tenant's and the global budget's ({spend})
    assert count(peer, "settlements", "reaped") == 2
    await peer.liveness.tick()  # seen dead again: nothing more to give back
    assert count(peer, "settlements", "reaped") == 2
    await peer.settle(kept, None)
    assert await store.get_many([SAM]) == [kept.estimate]


async def test_a_clean_stop_is_seen_at_once_and_gives_back_what_it_held() -> None:
    clock = FakeClock()
    store, stopping, peer = two_processes(clock)
    await stopping.liveness.start(60)
    await peer.liveness.tick()
    policy = stopping.policy
    await stopping.reserve(route(policy, "sk-sam-budget"), policy)  # a cancel that failed
    await stopping.liveness.stop()
    assert await store.get_many([SAM]) == [0]
    assert count(stopping, "settlements", "reaped") == 2  # its tenant's slot and {spend}
    clock.now += 0.01
    await peer.liveness.tick()
    assert peer.liveness.dead == (stopping.liveness.owner,)
    await stopping.liveness.stop()  # twice is harmless


class StrayStore(MemoryStore):
    async def heartbeat(self, owner: str, ttl_s: float, keep_s: float) -> list[str]:
        return ["not-an-id", "b" * 16, owner]


async def test_only_other_process_ids_count_as_dead() -> None:
    liveness = Liveness(
        StrayStore(), Metrics(), ttl_s=3, keep_s=60, owner="a" * 16, clock=FakeClock()
    )
    await liveness.tick()
    assert liveness.dead == ("b" * 16,)
    assert liveness._metrics.heartbeats.labels("ok")._value.get() == 1


class SilentStore(MemoryStore):
    async def heartbeat(self, owner: str, ttl_s: float, keep_s: float) -> list[str]:
        raise StoreUnavailableError("down")


async def test_a_failed_heartbeat_is_counted_not_raised() -> None:
    metrics = Metrics()
    liveness = Liveness(SilentStore(), metrics, ttl_s=3, keep_s=60, clock=FakeClock())
    await liveness.tick()
    await liveness.tick()
    assert metrics.heartbeats.labels("failed")._value.get() == 2
    assert liveness.dead == ()


def test_a_heartbeat_beats_before_it_runs_out() -> None:
    with pytest.raises(ValidationError, match="shorter"):
        Settings(heartbeat_ttl_s=1, heartbeat_interval_s=1)


class _OutageStore(MemoryStore):
    """A shared store that can be made unreachable."""

    down = False

    async def heartbeat(self, owner: str, ttl_s: float, keep_s: float) -> list[str]:
        if self.down:
            raise StoreUnavailableError("redis heartbeat failed: ConnectionError")
        return await super().heartbeat(owner, ttl_s, keep_s)


async def test_a_store_outage_does_not_make_live_peers_dead() -> None:
    """While the store is down nobody beats; when it is back, every peer's beat has run
    out. A process believes that only after beating again for a whole TTL."""
    clock = FakeClock()
    store = _OutageStore(clock)
    metrics = Metrics()
    one = Liveness(store, metrics, ttl_s=3, keep_s=60, clock=clock)
    two = Liveness(store, metrics, ttl_s=3, keep_s=60, clock=clock)
    await one.tick()
    await two.tick()
    store.down = True
    clock.now += 5
    await one.tick()  # fails: the store is down
    store.down = False
    await one.tick()  # back first: two's beat ran out during the outage
    assert one.dead == ()
    clock.now += 2
    await one.tick()
    assert one.dead == ()  # not believed yet: two may not have beaten since
    await two.tick()  # two beats again (every second, in a real process)
    clock.now += 2
    await one.tick()
    assert not one.dead  # believed now, and two is alive
    clock.now += 10  # now two really stops beating
    await one.tick()
    assert list(one.dead) == [two.owner]
