"""Who owns a lease or a hold, in both stores: heartbeats, and what a dead process
leaves behind given back (leases dropped when a set is full, holds reaped)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from extproc.store import MemoryStore, StoreFaultError, StoreTools, open_store
from extproc.store.base import HEARTBEATS, HELD_PREFIX, RESV_HASH, lease_owner, resv_owner_key
from tests.unit.test_store import FakeClock

ALICE, BOB, CAROL = "a" * 16, "b" * 16, "c" * 16
SLOTS = "{key:owners}:parallel"


def lease(owner: str, n: int) -> str:
    return f"{owner}{n:016x}"


async def poll(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (at most about 5 s) for ``check`` to hold."""
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(what)


def test_a_lease_member_names_its_owner() -> None:
    assert lease_owner(lease(ALICE, 7)) == ALICE


@pytest.mark.parametrize("bad", ["", "A" * 16, "a" * 15, "a" * 17, "g" * 16, "a" * 15 + ":"])
async def test_owner_ids_are_checked(store: StoreTools, bad: str) -> None:
    with pytest.raises(StoreFaultError):
        await store.heartbeat(bad, 3, 60)
    with pytest.raises(StoreFaultError):
        await store.reap_holds(bad)
    with pytest.raises(StoreFaultError):
        await store.reserve(
            "r", ["{spend}:key:o"], limits=[None], amount=1, ttls_s=[None], hold_s=60, owner=bad
        )
    assert await store.get_many(["{spend}:key:o"]) == [None]


async def test_memory_heartbeats_run_out_and_are_forgotten() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    assert await store.heartbeat(ALICE, 3, 60) == []
    assert await store.heartbeat(BOB, 3, 60) == []
    clock.now += 2.9
    assert await store.heartbeat(BOB, 3, 60) == []  # alice's beat has not run out yet
    clock.now += 0.1
    assert await store.heartbeat(BOB, 3, 60) == [ALICE]
    assert await store.heartbeat(ALICE, 3, 60) == []  # a stalled process that beats again
    clock.now += 3
    assert await store.heartbeat(BOB, 3, 60) == [ALICE]
    clock.now += 60
    assert await store.heartbeat(BOB, 3, 60) == []  # dead for longer than keep: forgotten


async def test_redis_heartbeats_run_out_and_are_forgotten(redis_url: str) -> None:
    store = open_store(redis_url)
    client = aioredis.from_url(redis_url)
    await client.delete(HEARTBEATS)
    assert await store.heartbeat(ALICE, 0.05, 60) == []
    assert await store.heartbeat(BOB, 30, 60) == []

    async def alice_dead() -> bool:
        return await store.heartbeat(BOB, 30, 60) == [ALICE]

    await poll(alice_dead, "alice's heartbeat to run out")
    assert await store.heartbeat(ALICE, 30, 60) == []
    assert 0 < await client.pttl(HEARTBEATS) <= 90_000  # goes when every process has
    await store.heartbeat(CAROL, 0.001, 0.05)
    assert CAROL.encode() in await client.zrange(HEARTBEATS, 0, -1)

    async def carol_forgotten() -> bool:
        await store.heartbeat(BOB, 30, 0.05)
        return CAROL.encode() not in await client.zrange(HEARTBEATS, 0, -1)

    await poll(carol_forgotten, "carol to be forgotten")
    assert await client.pttl(HEARTBEATS) > 1000  # her short keep did not shorten the set's
    await client.aclose()
    await store.close()


async def test_a_full_set_drops_the_leases_of_dead_owners(store: StoreTools) -> None:
    assert await store.acquire_lease(SLOTS, lease(ALICE, 1), 2, 60) == (True, 1, 0)
    assert await store.acquire_lease(SLOTS, lease(BOB, 1), 2, 60) == (True, 2, 0)
    assert await store.acquire_lease(SLOTS, lease(BOB, 2), 2, 60) == (False, 2, 0)
    # carol is dead but owns nothing here: nothing is dropped
    assert await store.acquire_lease(SLOTS, lease(BOB, 2), 2, 60, dead_owners=[CAROL]) == (
        False,
        2,
        0,
    )
    assert await store.acquire_lease(SLOTS, lease(BOB, 2), 2, 60, dead_owners=[CAROL, ALICE]) == (
        True,
        2,
        1,
    )
    # alice's lease is gone (a late release is harmless), bob's two are kept
    await store.release_lease(SLOTS, lease(ALICE, 1))
    assert await store.acquire_lease(SLOTS, lease(CAROL, 1), 2, 60, dead_owners=[ALICE]) == (
        False,
        2,
        0,
    )
    await store.release_lease(SLOTS, lease(BOB, 1))
    assert await store.acquire_lease(SLOTS, lease(CAROL, 1), 2, 60) == (True, 2, 0)


async def test_concurrent_acquires_drop_a_dead_lease_once(store: StoreTools) -> None:
    assert (await store.acquire_lease(SLOTS, lease(ALICE, 1), 3, 60))[0]
    assert (await store.acquire_lease(SLOTS, lease(ALICE, 2), 3, 60))[0]
    assert (await store.acquire_lease(SLOTS, lease(BOB, 0), 3, 60))[0]
    results = await asyncio.gather(
        *(
            store.acquire_lease(SLOTS, lease(BOB, i), 3, 60, dead_owners=[ALICE])
            for i in range(1, 21)
        )
    )
    assert sum(ok for ok, _, _ in results) == 2  # alice's two slots, no more
    assert sum(reaped for _, _, reaped in results) == 2


async def test_reaping_gives_back_what_a_cancel_would(store: StoreTools) -> None:
    """Two runs of one story, on keys of their own: alice's holds cancelled one by one,
    or reaped because she died. Values, held counters (what settle nets out) and
    window rollover come out the same."""
    outcomes = []
    for how in ("cancel", "reap"):
        window, total = f"{{spend}}:deployment:{how}:1m", f"{{spend}}:global:{how}"
        keys, ttls = [window, total], [0.2, None]
        await store.reserve(
            f"{how}-1", keys, limits=[None, None], amount=500, ttls_s=ttls, hold_s=600, owner=ALICE
        )

        async def rolled(key: str = window) -> bool:
            return await store.get_many([key]) == [None]

        await poll(rolled, "the window to end")  # alice's first hold is in the old one
        await store.reserve(
            f"{how}-2", keys, limits=[None, None], amount=40, ttls_s=ttls, hold_s=600, owner=BOB
        )
        await store.reserve(
            f"{how}-3", keys, limits=[None, None], amount=7, ttls_s=ttls, hold_s=600, owner=ALICE
        )
        await store.reserve(
            f"{how}-4", [total], limits=[None], amount=1000, ttls_s=[None], hold_s=600
        )  # nobody owns it: it only expires
        if how == "cancel":
            await store.cancel(f"{how}-1", keys)
            await store.cancel(f"{how}-3", keys)
        else:
            assert await store.reap_holds(ALICE) == 2
        before = await store.get_many(keys)
        settled = await store.settle(f"{how}-2", keys, 30, ttls)
        await store.cancel(f"{how}-4", [total])
        outcomes.append((before, settled, await store.get_many(keys)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[1] == ([40, 1040], [30, 30], [30, 30])


async def test_reaping_is_idempotent_and_safe_when_concurrent(store: StoreTools) -> None:
    key = "{spend}:key:reaped"
    for i in range(600):  # more than one batch
        await store.reserve(
            f"h{i}",
            [key],
            limits=[None],
            amount=3,
            ttls_s=[None],
            hold_s=600,
            owner=ALICE if i % 3 else BOB,
        )
    await store.settle("h1", [key], 2, [None])  # settled before she died: kept
    assert sum(await asyncio.gather(*(store.reap_holds(ALICE) for _ in range(4)))) == 399
    assert await store.reap_holds(ALICE) == 0
    assert await store.get_many([key]) == [200 * 3 + 2]  # bob's holds and one settled call
    await store.settle("h2", [key], 5, [None])  # reaped meanwhile: charged in full
    assert await store.get_many([key]) == [600 + 2 + 5]
    assert await store.reap_holds(BOB) == 200
    assert await store.get_many([key]) == [7]


async def test_redis_leaves_no_owner_bookkeeping_behind(redis_url: str) -> None:
    store = open_store(redis_url)
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    key = "{spend}:key:tidy"
    for rid in ("t1", "t2", "t3", "t4"):
        await store.reserve(
            rid, [key], limits=[None], amount=9, ttls_s=[None], hold_s=600, owner=ALICE
        )
    assert 0 < await client.pttl(resv_owner_key(ALICE)) <= 600_000
    await store.settle("t1", [key], 4, [None])
    await store.cancel("t2", [key])
    await store.reserve(
        "t5", [key], limits=[None], amount=9, ttls_s=[None], hold_s=0.001, owner=ALICE
    )
    assert await store.reap_holds(ALICE) == 3  # t3, t4 and t5 (expired, not yet dropped)
    assert await client.exists(resv_owner_key(ALICE)) == 0
    assert await client.hlen(RESV_HASH) == 0
    assert await store.get_many([key]) == [4]
    assert int(await client.get(HELD_PREFIX + key) or 0) == 0
    await client.aclose()
    await store.close()


async def test_redis_cluster_owners(redis_cluster_url: str) -> None:
    """Heartbeats, a lease set and the reservation book live in three slots."""
    store = open_store(redis_cluster_url)
    await store.heartbeat(ALICE, 0.001, 60)

    async def alice_dead() -> bool:
        return ALICE in await store.heartbeat(BOB, 30, 60)

    await poll(alice_dead, "alice's heartbeat to run out")
    slots = "{key:cluster-owners}:parallel"
    await store.release_lease(slots, lease(ALICE, 1))
    assert (await store.acquire_lease(slots, lease(ALICE, 1), 1, 60))[0]
    assert await store.acquire_lease(slots, lease(BOB, 1), 1, 60, dead_owners=[ALICE]) == (
        True,
        1,
        1,
    )
    await store.release_lease(slots, lease(BOB, 1))
    key = "{spend}:key:cluster-owners"
    before = (await store.get_many([key]))[0] or 0
    await store.reserve(
        "co1", [key], limits=[None], amount=11, ttls_s=[None], hold_s=60, owner=ALICE
    )
    assert await store.reap_holds(ALICE) == 1
    assert await store.get_many([key]) == [before]
    await store.close()
