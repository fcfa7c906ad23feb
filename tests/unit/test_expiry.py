"""Background eviction in the embedded store: the expiry index and the sweeper."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from extproc.adapters.admin import make_admin_app
from extproc.policy import load_policy
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore
from extproc.store.expiry import SHRINK_FROM, ExpiryIndex, shrunk
from tests.unit.test_iterations import ENV, POLICY, FlakyStore, route
from tests.unit.test_store import FakeClock

SPEND = "{spend}:key:a"


async def wait_for(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    """Poll ``predicate`` on the loop until it holds, or fail."""
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_index_one_heap_entry_per_key_whatever_the_writes() -> None:
    index = ExpiryIndex(2)
    for step in range(1000):  # a hot key whose TTL is refreshed on every write
        index.schedule(0, "hot", 10.0 + step)
    assert len(index) == 1
    assert index.pop_due(9.0, 100) == ([], False)
    assert index.pop_due(10.0, 100) == ([(0, "hot")], False)  # popped early: caller re-checks
    assert len(index) == 0
    index.schedule(0, "hot", 1009.0)  # scheduled again at its real expiry
    index.schedule(1, "hot", 5.0)  # the same name in another kind is another entry
    assert index.pop_due(2000.0, 100) == ([(1, "hot"), (0, "hot")], False)
    assert index.schedule(0, "never", float("inf")) is False
    assert len(index) == 0


def test_index_earlier_expiry_leaves_a_stale_entry_that_is_skipped() -> None:
    index = ExpiryIndex(1)
    index.schedule(0, "k", 10.0)
    assert index.schedule(0, "k", 5.0) is True  # moved earlier: pushed again
    assert index.schedule(0, "k", 7.0) is False  # later than the due time: nothing to do
    assert index.pop_due(6.0, 100) == ([(0, "k")], False)
    assert index.pop_due(11.0, 100) == ([], False)  # the entry at 10 was stale
    assert len(index) == 0


def test_index_bounded_pops_report_the_rest() -> None:
    index = ExpiryIndex(1)
    for n in range(25):
        index.schedule(0, f"k{n}", float(n))
    due, more = index.pop_due(100.0, 10)
    assert len(due) == 10
    assert more
    assert index.pop_due(100.0, 10)[1] is True
    assert index.pop_due(100.0, 10) == ([(0, f"k{n}") for n in range(20, 25)], False)


def test_shrunk_copies_a_table_far_below_its_peak() -> None:
    table = {str(n): n for n in range(SHRINK_FROM)}
    same, peak = shrunk(table, 0)
    assert same is table
    assert peak == SHRINK_FROM
    for n in range(SHRINK_FROM - 10):
        del table[str(n)]
    copy, peak = shrunk(table, peak)
    assert copy is not table
    assert copy == table
    assert peak == 10


async def test_sweeper_evicts_every_kind_without_a_read() -> None:
    """Nothing here reads an expired key: only the background sweep can evict them."""
    clock = FakeClock()
    store = MemoryStore(clock, sweep_interval_s=0.01)
    for n in range(500):
        await store.incr_window(f"{{session_iterations:k:s{n}}}:count", 1, ttl_s=1)
    await store.set_flag("cooldown:a", ttl_s=1)
    await store.incr_many([("inflight:a", 1)], ttl_s=1, refresh_ttl=True)
    await store.push_sample("latency:a", 0.5, keep=10, ttl_s=1)
    assert (await store.acquire_lease("parallel:k", "m1", 5, ttl_s=1))[0]
    # a hold of 1 s on a budget whose window lasts 3 s: given back by the sweep
    assert (await store.reserve("r1", [SPEND], limits=[None], amount=70, ttls_s=[3], hold_s=1))[
        0
    ] is None
    assert store.entry_count() == 500 + 4 + 2  # counters, flag, in-flight, list, lease set
    clock.now += 1.5
    await wait_for(lambda: store.entry_count() == 1)  # only the budget window is left
    assert await store.get_many([SPEND]) == [0]  # the expired hold went back
    clock.now += 2
    await wait_for(lambda: store.entry_count() == 0)
    await store.close()


async def test_sweeper_keeps_live_entries_and_follows_refreshed_ttls() -> None:
    clock = FakeClock()
    store = MemoryStore(clock, sweep_interval_s=0.01)
    await store.incr_many([("inflight:a", 1)], ttl_s=2, refresh_ttl=True)
    await store.incr_window("short", 1, ttl_s=1)
    clock.now += 1.5
    await store.incr_many([("inflight:a", 1)], ttl_s=2, refresh_ttl=True)  # now until +3.5
    await wait_for(lambda: store.entry_count() == 1)  # "short" is gone, the refreshed one not
    await store.set_flag("marker", ttl_s=0.5)
    assert store.entry_count() == 2
    clock.now += 1  # past the first TTL, not the refreshed one
    await wait_for(lambda: store.entry_count() == 1)  # a sweep ran: the marker is gone
    assert await store.get_many(["inflight:a"]) == [2]
    clock.now += 1.5
    await wait_for(lambda: store.entry_count() == 0)
    await store.close()


async def test_sweep_does_a_bounded_batch_per_loop_iteration() -> None:
    clock = FakeClock()
    store = MemoryStore(clock, sweep_interval_s=0.01, sweep_batch=10)
    for n in range(100):
        await store.set_flag(f"f{n}", ttl_s=1)
    clock.now += 2
    await wait_for(lambda: store.entry_count() < 100)
    seen = [store.entry_count()]
    while seen[-1]:
        await asyncio.sleep(0)  # one loop iteration: at most one batch
        seen.append(store.entry_count())
    steps = {a - b for a, b in itertools.pairwise(seen)}
    assert max(steps) <= 10
    await store.close()


async def test_spend_without_expiry_is_never_swept() -> None:
    clock = FakeClock()
    store = MemoryStore(clock, sweep_interval_s=0.01)
    await store.reserve("r1", [SPEND], limits=[None], amount=5, ttls_s=[None], hold_s=1)
    await store.settle("r1", [SPEND], 3, [None])
    await store.set_flag("gone", ttl_s=1)
    clock.now += 10**6
    await wait_for(lambda: store.entry_count() == 1)
    assert await store.get_many([SPEND]) == [3]
    await store.close()


async def test_journal_restore_and_compaction_unchanged_by_the_sweep(tmp_path: Path) -> None:
    journal = tmp_path / "spend.jsonl"
    clock = FakeClock()
    store = MemoryStore(clock, journal, sweep_interval_s=0.01)
    await store.reserve("r1", [SPEND, "{spend}:tag:t:1h"], limits=[None, None], amount=9,
                        ttls_s=[None, 1], hold_s=60)  # fmt: skip
    await store.settle("r1", [SPEND, "{spend}:tag:t:1h"], 4, [None, 1], keep_s=1)
    clock.now += 2  # the tag window ends, and the id's ended marker
    await wait_for(lambda: store.entry_count() == 1)
    await store.close()
    assert len(journal.read_text().splitlines()) == 1  # compacted to the live key
    reopened = MemoryStore(journal=journal)
    assert await reopened.get_many([SPEND]) == [4]
    await reopened.close()


async def test_close_stops_the_sweeper() -> None:
    store = MemoryStore(sweep_interval_s=0.01)
    await store.set_flag("f", ttl_s=60)
    await store.close()
    assert store.entry_count() == 0
    await store.set_flag("g", ttl_s=60)  # a store used after close arms a new sweeper
    await store.close()


async def test_gateway_fallback_counts_are_swept_too() -> None:
    """The in-process session counts kept while the store is down expire in the
    background, not only when the same session calls again."""
    policy = load_policy(POLICY, env=ENV)
    settings = Settings(policy_path=POLICY, store_retry_s=0, max_iterations_ttl=0.05)
    gateway = Gateway(settings, policy, FlakyStore())
    for n in range(20):
        await gateway.count_iteration(route(policy, "sk-iter-agent", session=f"s{n}").iterations)
    assert gateway.memory_entries()["session_fallback"] == 20
    await wait_for(lambda: gateway.memory_entries()["session_fallback"] == 0)
    await gateway.close()


async def test_metrics_gauge_counts_entries() -> None:
    policy = load_policy(POLICY, env=ENV)
    gateway = Gateway(Settings(policy_path=POLICY), policy, MemoryStore())
    await gateway.store.set_flag("cooldown:a", ttl_s=60)
    async with (
        TestServer(make_admin_app(gateway), host="127.0.0.1") as server,
        ClientSession() as session,
        session.get(server.make_url("/metrics")) as resp,
    ):
        text = await resp.text()
    assert 'extproc_memory_store_entries{store="embedded"} 1.0' in text
    assert 'extproc_memory_store_entries{store="session_fallback"} 0.0' in text
    await gateway.close()


async def test_settled_reservations_leave_nothing_in_the_expiry_index() -> None:
    """A settled or cancelled reservation is unscheduled: the index does not keep it
    for the rest of its hold (660 s of every call, otherwise); only its ended marker
    stays, for as long as it was asked to."""
    store = MemoryStore()
    key = "{spend}:key:abc"
    for i in range(5000):
        rid = f"{i:032x}"
        await store.reserve(rid, [key], limits=[None], amount=5, ttls_s=[None], hold_s=660)
        if i % 2:
            await store.settle(rid, [key], 5, [None])
        else:
            await store.cancel(rid, [key])
    assert store.entry_count() == 1 + 5000  # the budget key, one marker per id
    assert len(store._expiry) <= 2 * store.entry_count()  # rebuilt once leftovers dominate
    await store.close()


async def test_compaction_keeps_spend_of_a_window_that_rolled_over(tmp_path: Path) -> None:
    now = [1000.0]
    journal = tmp_path / "spend.jsonl"
    store = MemoryStore(clock=lambda: now[0], journal=journal)
    key = "{spend}:key:abc:1h"
    assert (
        await store.reserve("r1", [key], limits=[None], amount=500, ttls_s=[3600], hold_s=7200)
    )[0] is None
    now[0] += 3601  # window 1 rolls over while r1 is still open
    await store.reserve("r2", [key], limits=[None], amount=100, ttls_s=[3600], hold_s=7200)
    assert await store.settle("r2", [key], 100, [3600]) == [100]
    await store.close()  # compaction: r1's hold belongs to the old window
    again = MemoryStore(clock=lambda: now[0], journal=journal)
    assert await again.get_many([key]) == [100]
    await again.close()
