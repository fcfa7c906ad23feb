"""Owed store writes: kept, journaled and retried until they land, each exactly once."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

import extproc.state.owed as owed_module
from extproc.core.request import RequestHead
from extproc.core.usage import Usage
from extproc.policy import load_policy
from extproc.state.metrics import Metrics
from extproc.state.owed import OwedCancel, OwedCount, OwedSettle, OwedUncount, OwedWrites, read_owed
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore, StoreFaultError, StoreUnavailableError
from extproc.store.base import Admission, Admitted, Finish
from extproc.store.keys import marker_key

T = TypeVar("T")
A, B = "{spend}:key:a", "{spend}:global:all"
COUNTER = "{session_iterations:team:t:s}:count"
OWNER_1, OWNER_2 = "1" * 16, "2" * 16


class LossyStore(MemoryStore):
    """Fails the next ``fail`` settlements, cancels and counts as unavailable. With
    ``lost``, each of those failed calls has been applied first: its answer was lost
    (a script the client gave up on, that ran anyway)."""

    def __init__(self, fail: int = 0, *, lost: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.lost = lost
        self.calls = 0

    async def _call(self, work: Coroutine[Any, Any, T]) -> T:
        self.calls += 1
        if self.fail > 0:
            self.fail -= 1
            if self.lost:
                await work
            else:
                work.close()
            raise StoreUnavailableError("redis settle failed: TimeoutError")
        return await work

    async def cancel(self, rid: str, keys: Sequence[str], *, keep_s: float = 900) -> None:
        await self._call(super().cancel(rid, keys, keep_s=keep_s))

    async def incr_once(
        self, key: str, amount: int, ttl_s: float, *, marker: str, keep_s: float = 900
    ) -> tuple[int, float, bool]:
        return await self._call(super().incr_once(key, amount, ttl_s, marker=marker, keep_s=keep_s))

    # settle and reserve are finish and admit in this store: one failure each
    async def admit(self, admission: Admission) -> Admitted:
        return await self._call(super().admit(admission))

    async def finish(self, finish: Finish) -> list[int]:
        return await self._call(super().finish(finish))


def owed_writes(store: MemoryStore, directory: Path | None = None, **kwargs: Any) -> OwedWrites:
    return OwedWrites(
        store,
        Metrics(),
        owner=kwargs.pop("owner", OWNER_1),
        directory=directory,
        min_backoff_s=0.001,
        max_backoff_s=0.01,
        **kwargs,
    )


def retries(owed: OwedWrites, kind: str, result: str) -> float:
    metric = owed._metrics.settlement_retries.labels(kind, result)
    return float(metric._value.get())


def pending(owed: OwedWrites, kind: str) -> float:
    return float(owed._metrics.settlements_pending.labels(kind)._value.get())


async def held(store: MemoryStore, keys: Sequence[str]) -> list[int]:
    """What open holds add to each key (its value less its settled part)."""
    values = await MemoryStore.get_many(store, keys)
    return [(v or 0) - store._settled(k, store._clock()) for k, v in zip(keys, values, strict=True)]


@pytest.mark.parametrize("lost", [False, True])
async def test_a_settlement_is_retried_until_it_lands_and_charges_once(
    tmp_path: Path, lost: bool
) -> None:
    store = LossyStore()
    await store.reserve("r1", [A, B], limits=[None, None], amount=40, ttls_s=[None, 60], hold_s=60)
    await store.reserve("r2", [A], limits=[None], amount=25, ttls_s=[None], hold_s=60)
    store.fail, store.lost = 3, lost
    owed = owed_writes(store, tmp_path)
    owed.add(OwedSettle("r1", (A, B), 10, (None, 60)))
    owed.add(OwedSettle("r1", (A, B), 10, (None, 60)))  # the same write: kept once
    assert pending(owed, "settle") == 1
    await owed.drain(5)
    assert len(owed) == 0
    assert await store.get_many([A, B]) == [35, 10]  # 10 each, r2's 25 still held
    assert await held(store, [A, B]) == [25, 0]
    assert (retries(owed, "settle", "unavailable"), retries(owed, "settle", "landed")) == (3, 1)
    assert pending(owed, "settle") == 0
    await owed.close()
    assert os.listdir(tmp_path) == []  # nothing owed: no file left behind


@pytest.mark.parametrize("lost", [False, True])
async def test_a_cancel_is_retried_and_gives_back_once(lost: bool) -> None:
    store = LossyStore()
    await store.reserve("c1", [A], limits=[None], amount=70, ttls_s=[None], hold_s=60)
    await store.reserve("c2", [A], limits=[None], amount=5, ttls_s=[None], hold_s=60)
    store.fail, store.lost = 2, lost
    owed = owed_writes(store)
    owed.add(OwedCancel("c1"))
    await owed.drain(5)
    assert await store.get_many([A]) == [5]
    assert await held(store, [A]) == [5]
    await owed.close()


async def test_a_cancel_of_a_reserve_that_lands_later_leaves_no_hold() -> None:
    store = LossyStore()
    owed = owed_writes(store)
    owed.add(OwedCancel("u1"))  # its reserve's answer timed out
    await owed.drain(5)
    with pytest.raises(StoreFaultError):  # the reserve script runs after all
        await MemoryStore.reserve(
            store, "u1", [A], limits=[None], amount=30, ttls_s=[None], hold_s=60
        )
    assert await store.get_many([A]) == [None]
    assert store._reservations == {}
    await owed.close()


@pytest.mark.parametrize("lost", [False, True])
async def test_a_count_is_added_once(lost: bool) -> None:
    store = LossyStore(fail=3, lost=lost)
    owed = owed_writes(store)
    until = owed._wall() + 60
    for op in ("a", "b"):
        owed.add(OwedCount(COUNTER, 1, marker_key(COUNTER, op), until))
    assert owed.pending_count(COUNTER) == 2
    await owed.drain(5)
    assert await store.get_many([COUNTER]) == [2]
    assert owed.pending_count(COUNTER) == 0
    value, left = (await store.get_many_with_ttl([COUNTER]))[0]
    assert value == 2
    assert left is not None
    assert 55 < left <= 60  # the window the counts were made in
    await owed.close()


async def test_a_count_whose_window_ended_is_not_added() -> None:
    now = [1000.0]
    store = LossyStore(fail=1)
    owed = owed_writes(store, wall=lambda: now[0])
    owed.add(OwedCount(COUNTER, 1, marker_key(COUNTER, "x"), 1001.0))
    now[0] = 1002.0
    await owed.drain(5)
    assert await store.get_many([COUNTER]) == [None]
    assert retries(owed, "count", "expired") == 1
    await owed.close()


async def test_a_fault_is_retried_too(tmp_path: Path) -> None:
    store = LossyStore()
    await store.set_flag("x", 60)
    owed = owed_writes(store)
    broken = [True]

    async def finish(finish: Finish) -> list[int]:
        if broken[0]:
            raise StoreFaultError("budget counter 1 is not an integer")
        return await MemoryStore.finish(store, finish)

    store.finish = finish  # type: ignore[method-assign]
    owed.add(OwedSettle("f1", (A,), 3, (None,)))
    await owed.drain(0.05)
    assert len(owed) == 1  # kept: an operator may fix the key
    assert retries(owed, "settle", "fault") >= 1
    broken[0] = False
    await owed.drain(5)
    assert await store.get_many([A]) == [3]
    await owed.close()


async def test_what_is_owed_survives_a_restart(tmp_path: Path) -> None:
    down = LossyStore(fail=10**9)
    first = owed_writes(down, tmp_path, owner=OWNER_1)
    first.add(OwedSettle("s1", (A, B), 12, (None, 60)))
    first.add(OwedCancel("c1"))
    first.add(OwedCount(COUNTER, 1, marker_key(COUNTER, "n1"), first._wall() + 60))
    first.add(OwedSettle("s2", (A,), 1, (None,)))
    down.fail = 0
    await first.drain(5)  # everything lands ...
    down.fail = 10**9
    first.add(OwedSettle("s3", (A,), 7, (None,)))  # ... but this one, before the stop
    await first.drain(0.01)
    await first.close()
    journal = tmp_path / f"owed-{OWNER_1}.jsonl"
    assert set(read_owed(journal)) == {"settle:s3"}

    up = LossyStore()
    second = owed_writes(up, tmp_path, owner=OWNER_2)
    await second.start()  # adopts the stopped process's journal
    assert not journal.exists()
    await second.drain(5)
    assert await up.get_many([A]) == [7]
    await second.close()
    assert os.listdir(tmp_path) == []


async def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    journal = tmp_path / f"owed-{OWNER_1}.jsonl"
    line = {"op": "settle", "rid": "t1", "keys": [A], "cost": 4, "ttls": [None]}
    journal.write_text(json.dumps(line) + '\n{"op": "sett')
    store = LossyStore()
    owed = owed_writes(store, tmp_path, owner=OWNER_2)
    await owed.start()
    await owed.drain(5)
    assert await store.get_many([A]) == [4]
    await owed.close()


async def test_a_live_processes_journal_is_not_adopted(tmp_path: Path) -> None:
    down = LossyStore(fail=10**9)
    live = owed_writes(down, tmp_path, owner=OWNER_1)
    live.add(OwedCancel("c1"))
    other = owed_writes(LossyStore(), tmp_path, owner=OWNER_2)
    await other.start()
    assert len(other) == 0
    assert len(live) == 1
    await other.close()
    await live.close()


# --- through the gateway ---------------------------------------------------------------


def _gateway(tmp_path: Path, store: MemoryStore, **settings: Any) -> Gateway:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "model_groups: [{name: g, deployments: [{id: a, cluster: c, model: m,"
        " prices: {input_cost_per_token: 0.001}}]}]\n"
        "general_settings: {max_budget: 100}\n"
    )
    return Gateway(Settings(policy_path=path, **settings), load_policy(path), store)


async def _admit(gateway: Gateway) -> Any:
    raw = json.dumps({"model": "g", "messages": [], "max_tokens": 1}).encode()
    decision = await gateway.route(RequestHead("POST", "/v1/chat/completions", {}), raw,
                                   gateway.policy)  # fmt: skip
    return await gateway.admit(decision, gateway.policy)


async def test_gateway_keeps_a_settlement_the_store_did_not_acknowledge(tmp_path: Path) -> None:
    store = LossyStore()
    gateway = _gateway(tmp_path, store)
    admission = await _admit(gateway)
    store.fail, store.lost = 2, True
    cost = await gateway.settle(admission.charge, Usage(input_tokens=1000))
    assert gateway.metrics.settlements.labels("failed")._value.get() == 1
    await gateway.owed.drain(5)
    assert await store.get_many(list(admission.charge.keys)) == [cost]
    assert await held(store, admission.charge.keys) == [0]
    await gateway.close()


async def test_gateway_closed_mode_cancels_a_reserve_whose_answer_was_lost(
    tmp_path: Path,
) -> None:
    store = LossyStore(fail=1, lost=True)  # the reserve ran, its answer was lost
    gateway = _gateway(tmp_path, store, fail_mode="closed")
    with pytest.raises(Exception, match="cannot check its limits"):
        await _admit(gateway)
    assert len(gateway.owed) == 1
    await gateway.owed.drain(5)
    assert store._reservations == {}
    key = "{spend}:global:all"
    assert await store.get_many([key]) == [0]  # given back
    assert await held(store, [key]) == [0]
    await gateway.close()


async def test_gateway_open_mode_settles_a_reserve_that_ran_late(tmp_path: Path) -> None:
    store = LossyStore(fail=1, lost=True)  # admitted unreserved: the hold exists anyway
    gateway = _gateway(tmp_path, store)
    admission = await _admit(gateway)
    cost = await gateway.settle(admission.charge, Usage(input_tokens=10))
    # the call goes on under a fresh id, settled in full; the hold the lost batch took
    # under the old one is owed back
    await gateway.owed.drain(5)
    assert await store.get_many(list(admission.charge.keys)) == [cost]
    assert store._reservations == {}
    await gateway.close()


# --- what a second reader found ------------------------------------------------------


class _FaultyFor(LossyStore):
    """Settlements touching ``bad`` are answered with an error, for ever."""

    bad = "{spend}:key:bad"

    async def finish(self, finish: Finish) -> list[int]:
        if self.bad in finish.keys:
            raise StoreFaultError("budget counter 1 is not an integer")
        return await super().finish(finish)


async def test_writes_the_store_refuses_do_not_hold_back_the_others() -> None:
    store = _FaultyFor()
    owed = owed_writes(store)
    for i in range(40):
        owed.add(OwedSettle(f"bad{i}", (_FaultyFor.bad,), 1, (None,)))
    owed.add(OwedSettle("good", (A,), 7, (None,)))
    await owed.drain(1.0)
    assert await store.get_many([A]) == [7]
    assert len(owed) == 40
    await owed.close()


async def test_the_journal_stays_small_behind_a_write_that_never_lands(tmp_path: Path) -> None:
    store = _FaultyFor()
    owed = owed_writes(store, tmp_path)
    owed.add(OwedSettle("bad", (_FaultyFor.bad,), 1, (None,)))
    path = tmp_path / f"owed-{OWNER_1}.jsonl"
    for blip in range(4):
        for i in range(1000):
            owed.add(OwedSettle(f"g{blip}-{i}", (A,), 1, (None,)))
        await owed.drain(0.01)
        wait_until_true = 0
        while len(owed) > 1 and wait_until_true < 500:
            await asyncio.sleep(0.01)
            wait_until_true += 1
    assert len(owed) == 1
    assert path.stat().st_size < 300_000  # compacted: not 4,000 adds and dones
    assert set(read_owed(path)) == {"settle:bad"}
    await owed.close()


async def test_a_journal_that_failed_once_is_written_whole_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owed = owed_writes(LossyStore(fail=10**9), tmp_path)
    real = owed_module._Journal.write
    fails = [1]

    def flaky(self: Any, lines: Any) -> None:
        if fails[0]:
            fails[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, lines)

    monkeypatch.setattr(owed_module._Journal, "write", flaky)
    owed.add(OwedSettle("s1", (A,), 1, (None,)))  # the disk is full for a moment
    owed.add(OwedSettle("s2", (A,), 2, (None,)))
    assert set(read_owed(tmp_path / f"owed-{OWNER_1}.jsonl")) == {"settle:s1", "settle:s2"}
    await owed.close()


async def test_adoption_keeps_the_dead_journal_while_its_own_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = tmp_path / f"owed-{OWNER_1}.jsonl"
    line = {"op": "settle", "rid": "s1", "keys": [A], "cost": 5, "ttls": [None], "t": 0}
    dead.write_text(json.dumps(line) + "\n")

    def enospc(self: Any, lines: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(owed_module._Journal, "write", enospc)
    adopter = owed_writes(LossyStore(fail=10**9), tmp_path, owner=OWNER_2)
    await adopter.start()
    assert len(adopter) == 1
    assert set(read_owed(dead)) == {"settle:s1"}  # still the one durable copy
    await adopter.close()


async def test_an_owed_settlement_older_than_its_marker_is_not_sent_again(
    tmp_path: Path,
) -> None:
    """Its first attempt may have landed and the marker that made a retry harmless is
    gone: sending it again could charge twice. It is dropped and counted."""
    now = [1000.0]
    store = LossyStore()
    await store.reserve("r1", [A], limits=[None], amount=50, ttls_s=[None], hold_s=60)
    store.fail, store.lost = 10**9, True  # every settle runs, its answer is lost
    first = owed_writes(store, tmp_path, owner=OWNER_1, keep_s=900, wall=lambda: now[0])
    first.add(OwedSettle("r1", (A,), 10, (None,)))
    await first.drain(0.05)
    await first.close()
    assert await store.get_many([A]) == [10]
    now[0] += 1200  # the next start, twenty minutes later
    store.fail = 0
    second = owed_writes(store, tmp_path, owner=OWNER_2, keep_s=900, wall=lambda: now[0])
    await second.start()
    await second.drain(5)
    assert await store.get_many([A]) == [10]
    assert len(second) == 0
    await second.close()


async def test_a_lost_count_that_landed_is_not_counted_twice_by_the_next_call(
    tmp_path: Path,
) -> None:
    """The first call's store count ran but its answer was lost: counted in process and
    owed. The next call lands what is owed first, so the cap sees 2 calls, not 3."""
    from extproc.core.sessions import SessionCap  # noqa: PLC0415

    path = tmp_path / "p.yaml"
    path.write_text("model_groups: [{name: g, deployments: [{id: a, cluster: c, model: m}]}]\n")
    store = LossyStore(fail=1, lost=True)
    gateway = Gateway(Settings(policy_path=path, store_retry_s=0), load_policy(path), store)
    cap = SessionCap("s", 2, COUNTER)
    first = await gateway.count_iteration(cap, op="call1")
    assert first is not None
    assert first.remaining == 1
    second = await gateway.count_iteration(cap, op="call2")  # no false 429
    assert second is not None
    assert second.remaining == 0
    await gateway.owed.drain(5)
    assert await MemoryStore.get_many(store, [COUNTER]) == [2]
    await gateway.close()


def test_a_cancel_line_names_the_slots_it_gives_back_in(tmp_path: Path) -> None:
    """A cancel is journaled with its keys; a line written before cancels had keys
    still reads, as a cancel in the ``{spend}`` book."""
    journal = tmp_path / "owed.jsonl"
    keys = ("{t:team-1}:budget", "{spend}:global")
    lines = [
        owed_module._line(OwedCancel("k1", keys, 5.0)),
        {"op": "cancel", "rid": "old", "t": 6.0},
    ]
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_owed(journal) == {
        "cancel:k1": OwedCancel("k1", keys, 5.0),
        "cancel:old": OwedCancel("old", (), 6.0),
    }


async def test_an_owed_cancel_gives_back_in_every_slot() -> None:
    store = LossyStore()
    keys = ("{t:team-1}:budget", "{t:team-2}:budget")
    await store.reserve("m1", keys, limits=[None, None], amount=9, ttls_s=[None, None], hold_s=60)
    store.fail = 1
    owed = owed_writes(store)
    owed.add(OwedCancel("m1", keys))
    await owed.drain(5)
    assert await store.get_many(list(keys)) == [0, 0]
    await owed.close()


def test_journal_lines_of_every_kind_read_back() -> None:
    """A journal written before a restart reads back what was owed, lease and
    take-backs included."""
    from extproc.state.owed import Owed, _line, _parse  # noqa: PLC0415

    items: list[Owed] = [
        OwedCancel("c1", (A,), 5.0, "{t:key:x}:key:x:parallel|" + "a" * 32),
        OwedCancel("c2", (), 6.0),
        OwedUncount(COUNTER, 1, "m1", 99.0),
        OwedCount(COUNTER, 2, "m2", 98.0),
        OwedSettle("s1", (A, B), 7, (None, 60.0), 1.0),
    ]
    assert [_parse(_line(item)) for item in items] == items


async def test_an_owed_uncount_takes_back_a_count_once_and_blocks_a_late_one() -> None:
    store = MemoryStore()
    await store.incr_once(COUNTER, 1, 60, marker="m-ran")
    owed = owed_writes(store)
    owed.add(OwedUncount(COUNTER, 1, "m-ran", time.time() + 60))
    owed.add(OwedUncount(COUNTER, 1, "m-late", time.time() + 60))
    await owed.drain(5)
    assert await store.get_many([COUNTER]) == [0]  # the count that ran, taken back
    await store.incr_once(COUNTER, 1, 60, marker="m-late")  # the late one adds nothing
    assert await store.get_many([COUNTER]) == [0]
    await owed.close()
