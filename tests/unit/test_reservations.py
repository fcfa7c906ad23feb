"""Budget reservations in both stores: atomic reserve, settle, cancel, expiry, journal."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from extproc.store import MemoryStore, StoreFaultError, StoreTools, open_store
from extproc.store.keys import marker_key, split_key
from extproc.store.redis import RedisStore
from tests.unit.test_store import FakeClock

A, B = "{spend}:key:a", "{spend}:global:all"


async def values(store: StoreTools) -> list[int | None]:
    return await store.get_many([A, B])


async def test_reserve_settle_cancel(store: StoreTools) -> None:
    ok, _ = await store.reserve(
        "r1", [A, B], limits=[100, None], amount=30, ttls_s=[None, 60], hold_s=60
    )
    assert ok is None
    assert await values(store) == [30, 30]
    await store.settle("r1", [A, B], 12, [None, 60])  # the real cost replaces the hold
    assert await values(store) == [12, 12]
    await store.settle("r1", [A, B], 12, [None, 60])  # a retry: charged once
    assert await values(store) == [12, 12]
    assert (
        await store.reserve(
            "r2", [A, B], limits=[100, None], amount=50, ttls_s=[None, 60], hold_s=60
        )
    )[0] is None
    await store.cancel("r2", [A, B])
    await store.cancel("r2", [A, B])  # harmless
    assert await values(store) == [12, 12]


async def test_refused_when_a_budget_is_reached(store: StoreTools) -> None:
    await store.reserve("r1", [A, B], limits=[50, 1000], amount=50, ttls_s=[None, None], hold_s=60)
    index, spends = await store.reserve(
        "r2", [B, A], limits=[1000, 50], amount=1, ttls_s=[None, None], hold_s=60
    )
    assert (index, spends) == (1, [50, 50])
    assert await values(store) == [50, 50]  # nothing changed


async def test_concurrent_reservations_never_pass_the_budget(
    store: StoreTools, request: pytest.FixtureRequest
) -> None:
    limit, cost = 1000, 7
    # What is tested is atomicity, not the client's timeouts: 400 concurrent first
    # calls open the pool's 64 connections at once, and on a loaded machine (or with a
    # full garbage collection of this test process landing in the burst) that takes
    # longer than the default 0.25 s connect timeout.
    own = None
    if isinstance(store, RedisStore):
        store = own = RedisStore.from_url(request.getfixturevalue("redis_url"), timeout_s=5.0)
    gc.collect()
    try:
        results = await asyncio.gather(
            *(
                store.reserve(f"r{i}", [A], limits=[limit], amount=cost, ttls_s=[None], hold_s=60)
                for i in range(400)
            )
        )
        admitted = sum(index is None for index, _ in results)
        # admitted while spend < limit: at most one request past the limit
        assert admitted == -(-limit // cost), sorted({str(index) for index, _ in results})
        assert (await store.get_many([A]))[0] == admitted * cost
    finally:
        if own is not None:
            await own.close()


async def test_memory_reservation_expires() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    await store.reserve("r1", [A], limits=[10], amount=10, ttls_s=[None], hold_s=5)
    assert (await store.reserve("r2", [A], limits=[10], amount=1, ttls_s=[None], hold_s=5))[0] == 0
    clock.now += 5  # the holder never settled: its hold is given back
    assert (await store.reserve("r2", [A], limits=[10], amount=1, ttls_s=[None], hold_s=5))[
        0
    ] is None
    assert await store.get_many([A]) == [1]
    await store.settle("r1", [A], 4, [None])  # late settle of an expired hold: full cost
    assert await store.get_many([A]) == [5]


async def test_redis_reservation_expires(redis_url: str) -> None:
    store = open_store(redis_url)
    client = aioredis.from_url(redis_url)
    await client.delete(A)
    await store.reserve("x1", [A], limits=[10], amount=10, ttls_s=[None], hold_s=0.05)
    await asyncio.sleep(0.1)
    assert (await store.reserve("x2", [A], limits=[10], amount=1, ttls_s=[None], hold_s=5))[
        0
    ] is None
    assert await store.get_many([A]) == [1]
    await client.script_flush()  # reloaded transparently
    await store.settle("x2", [A], 3, [None])
    assert await store.get_many([A]) == [3]
    await client.aclose()
    await store.close()


async def test_window_ttl_set_when_created(redis_url: str) -> None:
    store = open_store(redis_url)
    client = aioredis.from_url(redis_url)
    await client.delete(A)
    await store.reserve("t1", [A], limits=[None], amount=1, ttls_s=[30], hold_s=5)
    assert 0 < await client.pttl(A) <= 30_000
    await client.aclose()
    await store.close()


async def test_redis_cluster_reservations(redis_cluster_url: str) -> None:
    store = open_store(redis_cluster_url)
    keys = ["{spend}:key:c1", "{spend}:team:c1", "{spend}:global:c1"]
    assert (
        await store.reserve("c1", keys, limits=[5, 5, 5], amount=5, ttls_s=[None] * 3, hold_s=5)
    )[0] is None
    assert (
        await store.reserve("c2", keys, limits=[5, 5, 5], amount=1, ttls_s=[None] * 3, hold_s=5)
    )[0] == 0
    await store.settle("c1", keys, 2, [None] * 3)
    assert await store.get_many(keys) == [2, 2, 2]
    await store.close()


async def test_journal_survives_restart(tmp_path: Path) -> None:
    journal = tmp_path / "spend.jsonl"
    store = MemoryStore(journal=journal)
    await store.reserve(
        "r1", [A, B], limits=[None, None], amount=50, ttls_s=[None, 3600], hold_s=60
    )
    await store.settle("r1", [A, B], 20, [None, 3600])
    await store.reserve("r2", [A], limits=[None], amount=99, ttls_s=[None], hold_s=60)  # in flight
    await store.close()  # clean: compacted, the in-flight hold is not spend
    reopened = MemoryStore(journal=journal)
    assert await reopened.get_many([A, B]) == [20, 20]
    assert len(journal.read_text().splitlines()) == 2


async def test_journal_keeps_the_spend_of_any_tag(tmp_path: Path) -> None:
    """Tenant-tagged budgets are journaled and compacted like ``{spend}`` ones."""
    journal = tmp_path / "spend.jsonl"
    store = MemoryStore(journal=journal)
    team = "{t:team-7}:budget"
    await store.reserve(
        "j1", [team, A], limits=[None, None], amount=50, ttls_s=[None, None], hold_s=60
    )
    await store.settle("j1", [team, A], 20, [None, None])
    await store.close()
    reopened = MemoryStore(journal=journal)
    assert await reopened.get_many([team, A]) == [20, 20]
    await reopened.close()


_CRASH = """
import asyncio, sys, time
from pathlib import Path
from extproc.store import MemoryStore

async def main() -> None:
    store = MemoryStore(journal=Path(sys.argv[1]))
    for i in range(5):
        key = ["{spend}:key:a"]
        await store.reserve(f"r{i}", key, limits=[None], amount=9, ttls_s=[None], hold_s=60)
        await store.settle(f"r{i}", key, 10, [None])
    print("settled", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_journal_loses_at_most_a_second_on_kill(tmp_path: Path) -> None:
    journal = tmp_path / "spend.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH, str(journal)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "settled"
    time.sleep(1.5)  # past the flush interval
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    store = MemoryStore(journal=journal)
    assert asyncio.run(store.get_many([A])) == [50]
    assert all(json.loads(line)["v"] == 10 for line in journal.read_text().splitlines())


async def test_hold_never_leaves_the_window_it_was_taken_from(store: StoreTools) -> None:
    """A rolling window that rolls over while a call runs: the old hold is neither
    taken back from nor settled into the new window."""
    key = "{spend}:deployment:roll:1m"
    first = "a" * 32
    await store.reserve(first, [key], limits=[None], amount=1_000_000, ttls_s=[0.2], hold_s=600)
    await asyncio.sleep(0.3)  # the window ends while the call streams
    await store.reserve("b" * 32, [key], limits=[None], amount=300_000, ttls_s=[0.2], hold_s=600)
    await store.settle("b" * 32, [key], 300_000, [0.2])
    await store.settle(first, [key], 100_000, [0.2])  # charged in full to the new window
    assert await store.get_many([key]) == [400_000]
    await store.reserve("c" * 32, [key], limits=[None], amount=50_000, ttls_s=[0.2], hold_s=600)
    await asyncio.sleep(0.3)
    await store.reserve("d" * 32, [key], limits=[None], amount=10, ttls_s=[0.2], hold_s=600)
    await store.cancel("c" * 32, [key])  # nothing to take back from the new window
    assert await store.get_many([key]) == [10]


async def test_key_names_are_data_not_structure(store: StoreTools) -> None:
    """A budget key with a line break cannot make a hold name other keys."""
    victim = "{spend}:key:victim"
    odd = f"{{spend}}:end_user:x\n{victim}"
    await store.reserve("v" * 32, [victim], limits=[None], amount=500, ttls_s=[None], hold_s=60)
    await store.settle("v" * 32, [victim], 500, [None])
    await store.reserve("o" * 32, [odd], limits=[None], amount=200, ttls_s=[None], hold_s=60)
    await store.cancel("o" * 32, [odd])
    assert await store.get_many([victim, odd]) == [500, 0]


async def test_settle_returns_settled_spend_net_of_open_holds(store: StoreTools) -> None:
    """What alerts compare: a budget's spend without the holds of calls in flight."""
    await store.reserve(
        "s1", [A, B], limits=[None, None], amount=1000, ttls_s=[None, 60], hold_s=60
    )
    await store.reserve("s2", [A], limits=[None], amount=50, ttls_s=[None], hold_s=60)
    assert await store.settle("s2", [A], 30, [None]) == [30]  # s1's 1000 still held
    assert await values(store) == [1030, 1000]
    assert await store.settle("s1", [A, B], 400, [None, 60]) == [430, 400]
    assert await store.settle("s1", [A, B], 5, [None, 60]) == [430, 400]  # a retry: no-op
    await store.reserve("s3", [A], limits=[None], amount=70, ttls_s=[None], hold_s=60)
    await store.cancel("s3", [A])
    assert await store.settle("s4", [A], 0, [None]) == [430]  # nothing held any more
    assert await values(store) == [430, 400]


async def test_settled_spend_after_a_hold_expired(store: StoreTools) -> None:
    await store.reserve("x1", [A], limits=[None], amount=900, ttls_s=[None], hold_s=0.05)
    await asyncio.sleep(0.1)  # the hold runs out; the next reservation gives it back
    await store.reserve("x2", [A], limits=[None], amount=20, ttls_s=[None], hold_s=60)
    assert await store.settle("x1", [A], 10, [None]) == [10]  # late: charged in full
    assert await store.settle("x2", [A], 20, [None]) == [30]


async def test_settled_spend_in_a_new_window(store: StoreTools) -> None:
    key = "{spend}:deployment:settled-roll:1m"
    await store.reserve("w" * 32, [key], limits=[None], amount=500, ttls_s=[0.2], hold_s=600)
    await asyncio.sleep(0.3)  # the window ends while the call runs
    await store.reserve("v" * 32, [key], limits=[None], amount=40, ttls_s=[0.2], hold_s=600)
    assert await store.settle("w" * 32, [key], 100, [0.2]) == [100]  # not the old hold
    assert await store.settle("v" * 32, [key], 40, [0.2]) == [140]


# --- retries: every end of a reservation is idempotent by its id ---------------------


async def held_sums(store: StoreTools) -> list[int]:
    """The sums of open holds beside A and B (what alerts subtract)."""
    settled = await store.settle("probe" + "0" * 27, [A, B], 0, [None, 60])
    return [(v or 0) - s for v, s in zip(await values(store), settled, strict=True)]


async def test_a_settlement_retried_charges_once_and_keeps_held_sums(store: StoreTools) -> None:
    await store.reserve("h1", [A, B], limits=[None, None], amount=40, ttls_s=[None, 60], hold_s=60)
    await store.reserve("h2", [A], limits=[None], amount=25, ttls_s=[None], hold_s=60)
    for _ in range(3):  # the first answer was lost: the same settlement twice more
        assert await store.settle("h1", [A, B], 10, [None, 60]) == [10, 10]
    assert await values(store) == [35, 10]  # h2's 25 still held
    assert await held_sums(store) == [25, 0]
    await store.cancel("h2", [A])
    await store.cancel("h2", [A])
    assert await values(store) == [10, 10]
    assert await held_sums(store) == [0, 0]


async def test_a_reserve_that_runs_after_its_cancel_changes_nothing(store: StoreTools) -> None:
    await store.cancel("late", [A])  # the reserve's answer timed out: it is cancelled ...
    with pytest.raises(StoreFaultError, match="already used"):  # ... and runs late
        await store.reserve("late", [A], limits=[None], amount=30, ttls_s=[None], hold_s=60)
    assert await values(store) == [None, None]
    assert await held_sums(store) == [0, 0]


async def test_a_reserve_that_runs_after_its_settlement_changes_nothing(store: StoreTools) -> None:
    # admitted unreserved (fail mode open), settled, then the reserve script runs
    assert await store.settle("late2", [A], 12, [None]) == [12]
    with pytest.raises(StoreFaultError, match="already used"):
        await store.reserve("late2", [A], limits=[None], amount=30, ttls_s=[None], hold_s=60)
    assert await values(store) == [12, None]
    assert await held_sums(store) == [0, 0]


async def test_a_reserve_sent_twice_holds_once(store: StoreTools) -> None:
    await store.reserve("dup", [A], limits=[None], amount=30, ttls_s=[None], hold_s=60)
    with pytest.raises(StoreFaultError, match="already used"):
        await store.reserve("dup", [A], limits=[None], amount=30, ttls_s=[None], hold_s=60)
    assert await values(store) == [30, None]
    await store.cancel("dup", [A])
    assert await values(store) == [0, None]
    assert await held_sums(store) == [0, 0]


async def test_a_cancel_of_a_landed_reserve_gives_it_back_once(store: StoreTools) -> None:
    await store.reserve("u1", [A, B], limits=[None, None], amount=70, ttls_s=[None, 60], hold_s=60)
    await store.cancel("u1", [A, B])
    await store.cancel("u1", [A, B])
    await store.settle("u1", [A, B], 9, [None, 60])  # ended: a settle after it is a no-op
    assert await values(store) == [0, 0]
    assert await held_sums(store) == [0, 0]


async def test_increment_once(store: StoreTools) -> None:
    counter = "{session_iterations:team:t:s}:count"
    marker = marker_key(counter, "op1")
    assert split_key(marker) is not None
    assert marker.startswith("{session_iterations:team:t:s}:")  # the counter's slot
    value, left, added = await store.incr_once(counter, 3, 60, marker=marker)
    assert (value, added) == (3, True)
    assert 59 < left <= 60
    value, left, added = await store.incr_once(counter, 3, 60, marker=marker)
    assert (value, added) == (3, False)
    assert 0 < left <= 60
    value, _, added = await store.incr_once(counter, 1, 60, marker=marker_key(counter, "op2"))
    assert (value, added) == (4, True)


async def test_ended_marker_lasts_as_long_as_asked() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    await store.settle("m1", [A], 5, [None], keep_s=10)
    clock.now += 9
    await store.settle("m1", [A], 5, [None], keep_s=10)
    assert await store.get_many([A]) == [5]
    clock.now += 2  # past the retry horizon the id is forgotten
    await store.settle("m1", [A], 5, [None], keep_s=10)
    assert await store.get_many([A]) == [10]
    await store.close()
