"""The admission and finishing primitives (``Store.admit``, ``Store.finish``) and the
reservation books per hash slot, held to one contract on the memory store, a single
Redis and a 3-node Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from extproc.store import MemoryStore, StoreFaultError, StoreTools, open_store
from extproc.store.base import (
    Admission,
    Admitted,
    Budget,
    Cancel,
    Ceiling,
    Count,
    Finish,
    Gauge,
    Release,
    Step,
    Take,
    book_tag,
    books_key,
    resv_hash,
)
from extproc.store.keys import marker_key

ALICE, BOB = "a" * 16, "b" * 16
#: Three tenants' budgets: on the cluster in three different slots (and nodes).
TAGS = ("{t:team-0}", "{t:team-1}", "{t:team-2}")
#: The steps' slot: one tenant's counters, beside its budget.
STEP_TAG = TAGS[0]


@dataclass
class Backend:
    """A store under test and, for Redis, a client per primary (one for a single Redis)."""

    store: StoreTools
    kind: str
    nodes: list[aioredis.Redis]
    url: str = ""
    #: A client of the whole store (a cluster client on the cluster).
    raw: aioredis.Redis | RedisCluster | None = None

    async def eval_calls(self) -> int:
        """EVALSHA and EVAL calls served so far, summed over the primaries."""
        total = 0
        for node in self.nodes:
            stats = await node.info("commandstats")
            for name in ("cmdstat_evalsha", "cmdstat_eval"):
                total += int(stats.get(name, {}).get("calls", 0))
        return total

    async def node_of(self, key: str) -> int:
        """The index of the primary holding ``key``, asked of each primary."""
        slot = await self.nodes[0].execute_command("CLUSTER", "KEYSLOT", key)  # type: ignore[no-untyped-call]
        for index, node in enumerate(self.nodes):
            # a primary counts only the keys it holds (and would redirect an EXISTS)
            held = await node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)  # type: ignore[no-untyped-call]
            if held and await node.exists(key):
                return index
        raise KeyError(key)


async def _primaries(cluster: RedisCluster) -> list[aioredis.Redis]:
    await cluster.initialize()
    return [aioredis.Redis(host=n.host, port=int(n.port)) for n in cluster.get_primaries()]


@pytest.fixture(params=["memory", "redis", "cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Each store, every Redis primary emptied first."""
    if request.param == "memory":
        yield Backend(MemoryStore(), "memory", [])
        return
    raw: aioredis.Redis | RedisCluster
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        raw = aioredis.from_url(url)
        nodes = [raw]
    else:
        url = request.getfixturevalue("redis_cluster_url")
        raw = RedisCluster.from_url("redis://" + url.removeprefix("redis+cluster://"))
        nodes = await _primaries(raw)
    for node in nodes:
        await node.flushall()
    store = open_store(url)
    yield Backend(store, request.param, nodes, url, raw)
    await store.close()
    for node in nodes:
        await node.aclose()
    if request.param == "cluster":
        await raw.aclose()


def _by_slot(tags: Sequence[str]) -> list[str]:
    """``tags`` in the order the cluster store visits their slots (by slot number)."""
    return sorted(tags, key=lambda t: key_slot(t.encode()))


def _budgets(
    limits: Sequence[int | None] = (None, None, None), tags: Sequence[str] = TAGS
) -> tuple[Budget, ...]:
    return tuple(
        Budget(f"{tag}:budget", limit, None) for tag, limit in zip(tags, limits, strict=True)
    )


def _admission(
    rid: str, budgets: tuple[Budget, ...], steps: tuple[Step, ...] = (), amount: int = 10
) -> Admission:
    return Admission(rid, ALICE, amount, 60, budgets, steps)


def _keys(budgets: Sequence[Budget]) -> list[str]:
    return [b.key for b in budgets]


def _sessions(tag: str = STEP_TAG) -> str:
    return f"{tag}:session"


async def _book_entries(backend: Backend, rid: str, keys: Sequence[str]) -> int:
    """Open entries of ``rid`` in the books of ``keys`` (Redis only; 0 for memory)."""
    if backend.raw is None:
        return 0
    return sum(
        [int(await backend.raw.hexists(resv_hash(t), rid)) for t in {book_tag(k) for k in keys}]
    )


async def test_an_admission_returns_every_step_result(backend: Backend) -> None:
    store = backend.store
    budgets = _budgets()
    sessions = _sessions()
    steps: tuple[Step, ...] = (
        Count(sessions, 1, 60),
        Count(f"{STEP_TAG}:rpm", 1, 60, limit=5, marker=marker_key(f"{STEP_TAG}:rpm", "r1")),
        Ceiling(f"{STEP_TAG}:tpm", 100),
        Take(f"{STEP_TAG}:leases", ALICE + "0" * 16, 2, 60),
        Gauge(f"{STEP_TAG}:in-flight", 1, 60),
    )
    out = await store.admit(_admission("r1", budgets, steps))
    assert out.admitted
    assert (out.refused_budget, out.refused_step, out.spends) == (None, None, (0, 0, 0))
    count, rpm, tpm, take, gauge = out.results
    assert isinstance(count, tuple)
    assert isinstance(rpm, tuple)
    assert (count[0], count[2], rpm[0], rpm[2]) == (1, True, 1, True)
    assert (tpm, take, gauge) == (0, (True, 1, 0), 1)
    assert type(count[1]) is float
    assert type(rpm[1]) is float
    assert 59 < count[1] <= 60
    assert await store.get_many(_keys(budgets)) == [10, 10, 10]
    second = await store.admit(_admission("r2", budgets, steps[:1]))
    assert second.spends == (10, 10, 10)
    assert second.results[0][0] == 2  # type: ignore[index]


async def test_no_budgets_holds_nothing(backend: Backend) -> None:
    out = await backend.store.admit(_admission("n1", (), (Count(_sessions(), 1, 60),)))
    assert out == Admitted(None, None, (), ((1, out.results[0][1], True),))  # type: ignore[index]


async def test_a_spent_budget_refuses_and_writes_nothing(backend: Backend) -> None:
    store = backend.store
    budgets = _budgets((None, 10, None))
    assert (await store.admit(_admission("s1", budgets))).admitted
    take = Take(f"{STEP_TAG}:leases", ALICE + "1" * 16, 5, 60)
    out = await store.admit(_admission("s2", budgets, (Count(_sessions(), 1, 60), take)))
    assert (out.refused_budget, out.refused_step, out.results) == (1, None, ())
    assert await store.get_many([*_keys(budgets), _sessions()]) == [10, 10, 10, None]
    assert await store.acquire_lease(take.key, ALICE + "2" * 16, 1, 60) == (True, 1, 0)


async def test_the_last_slot_refusing_hands_back_the_others(backend: Backend) -> None:
    """Budgets in three slots, the one visited last spent: the first two give back."""
    store = backend.store
    order = _by_slot(TAGS)
    spent = _budgets((5,), (order[-1],))
    assert (await store.admit(_admission("p1", spent, amount=5))).admitted
    budgets = _budgets((100, 100, 5), order)
    out = await store.admit(_admission("p2", budgets, (Count(_sessions(), 1, 60),)))
    assert out.refused_budget == 2
    assert out.spends[2] == 5
    assert [v or 0 for v in await store.get_many(_keys(budgets))] == [0, 0, 5]
    assert await store.get_many([_sessions()]) == [None]
    assert await _book_entries(backend, "p2", _keys(budgets)) == 0
    await store.cancel("p2", _keys(budgets))  # what the caller may still send: harmless
    assert (await store.get_many(_keys(budgets)))[2] == 5


async def test_a_refusing_step_gives_the_hold_and_lease_back(backend: Backend) -> None:
    store = backend.store
    budgets = _budgets()
    leases = f"{STEP_TAG}:leases"
    await store.incr(f"{STEP_TAG}:tpm", 100, 60)
    steps: tuple[Step, ...] = (
        Count(_sessions(), 1, 60),
        Take(leases, ALICE + "3" * 16, 5, 60),
        Ceiling(f"{STEP_TAG}:tpm", 100),
        Gauge(f"{STEP_TAG}:in-flight", 1, 60),
    )
    out = await store.admit(_admission("q1", budgets, steps))
    assert (out.refused_budget, out.refused_step) == (None, 2)
    assert out.results[1:] == ((True, 1, 0), 100)
    assert await store.get_many(_keys(budgets)) == [0, 0, 0]
    # the count stays (every attempt counts), the lease is back, the gauge never ran
    assert await store.get_many([_sessions(), f"{STEP_TAG}:in-flight"]) == [1, None]
    assert await store.acquire_lease(leases, ALICE + "4" * 16, 1, 60) == (True, 1, 0)
    assert await _book_entries(backend, "q1", _keys(budgets)) == 0
    with pytest.raises(StoreFaultError):  # the id has ended: a late admission of it
        await store.admit(_admission("q1", budgets))
    assert await store.get_many(_keys(budgets)) == [0, 0, 0]


async def test_a_full_lease_set_refuses_after_the_count(backend: Backend) -> None:
    store = backend.store
    leases = f"{STEP_TAG}:leases"
    assert (await store.acquire_lease(leases, ALICE + "5" * 16, 1, 60))[0]
    steps: tuple[Step, ...] = (Count(_sessions(), 1, 60), Take(leases, ALICE + "6" * 16, 1, 60))
    out = await store.admit(_admission("l1", _budgets(), steps))
    assert out.refused_step == 1
    assert out.results[1] == (False, 1, 0)
    assert await store.get_many([_sessions(), *_keys(_budgets())]) == [1, 0, 0, 0]


async def test_a_count_over_its_limit_refuses_and_stays(backend: Backend) -> None:
    store = backend.store
    rpm = f"{STEP_TAG}:rpm"
    for i in range(2):
        assert (await store.admit(_admission(f"c{i}", (), (Count(rpm, 1, 60, limit=2),)))).admitted
    out = await store.admit(_admission("c2", _budgets(), (Count(rpm, 1, 60, limit=2),)))
    assert out.refused_step == 0
    assert out.results[0][0] == 3  # type: ignore[index]
    assert await store.get_many([rpm, *_keys(_budgets())]) == [3, 0, 0, 0]


async def test_a_count_with_a_marker_adds_once(backend: Backend) -> None:
    store = backend.store
    key = f"{STEP_TAG}:tpm"
    step = Count(key, 40, 60, marker=marker_key(key, "call-1"))
    first = await store.admit(_admission("m1", (), (step,)))
    retry = await store.admit(_admission("m2", (), (step,)))
    assert (first.results[0][0], first.results[0][2]) == (40, True)  # type: ignore[index]
    assert (retry.results[0][0], retry.results[0][2]) == (40, False)  # type: ignore[index]
    assert await store.get_many([key]) == [40]


async def test_a_late_admission_of_an_ended_id_is_refused(backend: Backend) -> None:
    store = backend.store
    budgets = _budgets()
    await store.cancel("e1", _keys(budgets))  # its answer was lost: cancelled first
    with pytest.raises(StoreFaultError):
        await store.admit(_admission("e1", budgets, (Count(_sessions(), 1, 60),)))
    assert await store.get_many([*_keys(budgets), _sessions()]) == [None, None, None, None]


async def test_cancel_and_settle_end_each_slot_on_its_own(backend: Backend) -> None:
    store = backend.store
    budgets = _budgets()
    keys = _keys(budgets)
    assert (await store.admit(_admission("x1", budgets))).admitted
    await store.cancel("x1", keys[:1])
    await store.cancel("x1", keys[:1])  # harmless
    assert await store.get_many(keys) == [0, 10, 10]
    assert await store.settle("x1", keys, 4, [None] * 3) == [0, 4, 4]  # slot 0 has ended
    assert await store.settle("x1", keys, 4, [None] * 3) == [0, 4, 4]  # a retry
    assert await store.get_many(keys) == [0, 4, 4]
    await store.cancel("x1", keys)  # ended everywhere: nothing changes
    assert await store.get_many(keys) == [0, 4, 4]


async def test_reaping_finds_every_slot_an_owner_held_in(backend: Backend) -> None:
    store = backend.store
    budgets = _budgets()
    for i in range(3):
        assert (await store.admit(_admission(f"d{i}", budgets))).admitted
    assert await store.get_many(_keys(budgets)) == [30, 30, 30]
    assert await store.reap_holds(ALICE) == 9  # three holds in each of three books
    assert await store.get_many(_keys(budgets)) == [0, 0, 0]
    assert await store.reap_holds(ALICE) == 0


async def test_tenant_budgets_spread_over_the_cluster(backend: Backend) -> None:
    """30 teams' spend on all three primaries; a budget that spans them stays exact."""
    if backend.kind != "cluster":
        pytest.skip("a cluster property")
    store = backend.store
    total = "{spend}:global"
    for i in range(30):
        budgets = (Budget(f"{{t:team-{i}}}:budget", None, None), Budget(total, 300, None))
        assert (await store.admit(_admission(f"t{i}", budgets, amount=10))).admitted
    nodes = {await backend.node_of(f"{{t:team-{i}}}:budget") for i in range(30)}
    assert nodes == {0, 1, 2}
    assert await store.get_many([total]) == [300]
    budgets = (Budget("{t:team-0}:budget", None, None), Budget(total, 300, None))
    refused = await store.admit(_admission("t30", budgets))
    assert (refused.refused_budget, refused.spends[1]) == (1, 300)
    assert await store.get_many(["{t:team-0}:budget", total]) == [10, 300]


@pytest.mark.parametrize("where", ["first-slot", "last-slot", "step"])
async def test_a_wrong_type_writes_nothing_in_any_slot(backend: Backend, where: str) -> None:
    if backend.kind == "memory":
        pytest.skip("the memory store keeps every kind of value apart")
    store = backend.store
    order = _by_slot(TAGS)
    budgets = _budgets(tags=order)
    bad = {"first-slot": budgets[0].key, "last-slot": budgets[2].key, "step": _sessions()}[where]
    assert backend.raw is not None
    await backend.raw.rpush(bad, "x")
    with pytest.raises(StoreFaultError):
        await store.admit(_admission("w1", budgets, (Count(_sessions(), 1, 60),)))
    good = [k for k in [*_keys(budgets), _sessions()] if k != bad]
    assert all(v in {None, 0} for v in await store.get_many(good))
    assert await _book_entries(backend, "w1", _keys(budgets)) == 0


async def test_one_script_per_slot(backend: Backend) -> None:
    """Budgets in three tags and four steps: one EVALSHA on a single Redis, at most
    one per slot touched on the cluster."""
    if backend.kind == "memory":
        pytest.skip("no round trips")
    store = backend.store
    steps: tuple[Step, ...] = (
        Count(_sessions(), 1, 60),
        Ceiling(f"{STEP_TAG}:tpm", 100),
        Take(f"{STEP_TAG}:leases", ALICE + "7" * 16, 5, 60),
        Gauge(f"{STEP_TAG}:in-flight", 1, 60),
    )
    assert (await store.admit(_admission("o1", _budgets(), steps))).admitted  # scripts loaded
    before = await backend.eval_calls()
    assert (await store.admit(_admission("o2", _budgets(), steps))).admitted
    calls = await backend.eval_calls() - before
    if backend.kind == "redis":
        assert calls == 1
    else:
        assert calls <= len({key_slot(t.encode()) for t in TAGS})


async def test_amounts_are_checked_before_anything_is_sent(backend: Backend) -> None:
    store = backend.store
    with pytest.raises(StoreFaultError):
        await store.admit(_admission("v1", _budgets(), (Count(_sessions(), 1, 60),), -1))
    with pytest.raises(StoreFaultError):
        await store.admit(_admission("v2", _budgets((-5, None, None))))
    with pytest.raises(StoreFaultError):
        await store.admit(Admission("v3", "not-an-owner", 1, 60, _budgets(), ()))
    assert await store.get_many([*_keys(_budgets()), _sessions()]) == [None] * 4


async def test_finish_settles_and_runs_its_steps_once(backend: Backend) -> None:
    store = backend.store
    budgets = _budgets()
    keys = _keys(budgets)
    leases, gauge, tpm = f"{STEP_TAG}:leases", f"{STEP_TAG}:in-flight", f"{STEP_TAG}:tpm"
    member = ALICE + "8" * 16
    steps: tuple[Step, ...] = (Take(leases, member, 1, 60), Gauge(gauge, 1, 60))
    assert (await store.admit(_admission("f1", budgets, steps, amount=50))).admitted
    finish = Finish(
        "f1",
        tuple(keys),
        7,
        (None, None, None),
        900,
        (
            Count(tpm, 33, 60, marker=marker_key(tpm, "f1")),
            Release(leases, member),
            Gauge(gauge, -1, 60, marker=marker_key(gauge, "f1")),
        ),
    )
    assert await store.finish(finish) == [7, 7, 7]
    assert await store.finish(finish) == [7, 7, 7]  # a retry changes nothing
    assert await store.get_many([*keys, tpm, gauge]) == [7, 7, 7, 33, 0]
    assert await store.acquire_lease(leases, ALICE + "9" * 16, 1, 60) == (True, 1, 0)


async def test_an_owner_files_its_book_tags_once(backend: Backend) -> None:
    """Before its first hold in a slot a process files the tag under its id (what a
    reaper goes through); on the cluster that costs one round trip once per tag."""
    if backend.raw is None:
        pytest.skip("the memory store finds an owner's holds in its own table")
    store, raw = backend.store, backend.raw
    registry = books_key(ALICE)
    other = Admission("g0", BOB, 1, 60, _budgets(), ())
    assert (await store.admit(other)).admitted  # the scripts are loaded
    before = await backend.eval_calls()
    assert (await store.admit(_admission("g1", _budgets()))).admitted
    first = await backend.eval_calls() - before
    assert (await store.admit(_admission("g2", _budgets()))).admitted
    second = await backend.eval_calls() - before - first
    slots = 1 if backend.kind == "redis" else len(TAGS)
    assert (first, second) == ((slots, slots) if backend.kind == "redis" else (slots + 1, slots))
    listed = await raw.smembers(registry)
    assert {t.decode() if isinstance(t, bytes) else t for t in listed} == set(TAGS)
    assert await raw.pttl(registry) >= 60_000
    await raw.pexpire(registry, 1000)
    await store.heartbeat(ALICE, 30, 3600)  # a live process's registry is kept
    assert await raw.pttl(registry) > 3_000_000
    peer = open_store(backend.url)  # a peer reaps what the registry lists
    assert await peer.reap_holds(ALICE) == 6
    await peer.close()
    assert await store.get_many(_keys(_budgets())) == [1, 1, 1]  # bob's hold stays


async def test_steps_in_two_slots_still_give_back_on_a_refusal(backend: Backend) -> None:
    """Unusual (a call's steps share its tenant's slot), but kept right: a lease taken
    in one slot is released when a step in another refuses."""
    store = backend.store
    leases, tpm = f"{TAGS[1]}:leases", f"{TAGS[2]}:tpm"
    await store.incr(tpm, 100, 60)
    steps: tuple[Step, ...] = (Take(leases, ALICE + "a" * 16, 1, 60), Ceiling(tpm, 100))
    out = await store.admit(_admission("z1", _budgets(), steps))
    assert (out.refused_step, out.results) == (1, ((True, 1, 0), 100))
    assert await store.get_many(_keys(_budgets())) == [0, 0, 0]
    assert await store.acquire_lease(leases, ALICE + "b" * 16, 1, 60) == (True, 1, 0)


async def test_writes_of_several_calls_apply_each_on_its_own(backend: Backend) -> None:
    store = backend.store
    budgets = _budgets()
    keys = _keys(budgets)
    await store.admit(_admission("r1", budgets))
    await store.admit(_admission("r2", budgets))
    take = Take(f"{STEP_TAG}:leases", ALICE + "m", 5, 60)
    await store.admit(_admission("r3", (), (take,)))
    ttls = (None, None, None)
    outcomes = await store.write_many(
        [
            Finish("r1", tuple(keys), 4, ttls, 60),
            Finish("r9", tuple(keys), -1, ttls, 60),  # refused before it is sent
            Cancel("r2", tuple(keys), 60),
            Release(take.key, take.member),
        ]
    )
    assert outcomes[0] == [4, 4, 4]
    assert isinstance(outcomes[1], StoreFaultError)
    assert outcomes[2:] == [None, None]
    assert await store.get_many(keys) == [4, 4, 4]
    assert [await _book_entries(backend, rid, keys) for rid in ("r1", "r2")] == [0, 0]
    assert not (await store.acquire_lease(take.key, BOB + "m", 1, 60))[1] > 1


async def _client_writes(backend: Backend) -> list[int]:
    """Client writes each primary has read so far (a pipeline's commands are one)."""
    return [int((await node.info("stats"))["total_reads_processed"]) for node in backend.nodes]


async def test_a_batch_of_writes_is_pipelined_per_node(backend: Backend) -> None:
    """Settlements of many calls of three tenants (three slots; three nodes on the
    cluster) go out pipelined, one write per node (Redis may read a pipeline in a few
    reads, never one per command), also after the script cache was emptied."""
    if backend.kind == "memory":
        pytest.skip("no round trips")
    store = backend.store
    budgets = _budgets()
    keys = _keys(budgets)
    rids = [f"r{i}" for i in range(30)]
    for rid in rids:
        await store.admit(_admission(rid, budgets))
    ttls = (None, None, None)
    before = await _client_writes(backend)
    outcomes = await store.write_many([Finish(rid, tuple(keys), 1, ttls, 60) for rid in rids])
    after = await _client_writes(backend)
    # 30 scripts per node when sent alone; each INFO is one read more
    assert all(a - b - 1 <= 5 for a, b in zip(after, before, strict=True)), (before, after)
    assert sorted(o[0] for o in outcomes if isinstance(o, list)) == list(range(1, 31))
    # a Redis that lost its scripts: loaded again, the batch lands whole
    more = [f"s{i}" for i in range(4)]
    for rid in more:
        await store.admit(_admission(rid, budgets))
    for node in backend.nodes:
        await node.script_flush()
    again = await store.write_many([Finish(rid, tuple(keys), 5, ttls, 60) for rid in more])
    assert all(isinstance(o, list) for o in again), again
    assert await store.get_many(keys) == [50, 50, 50]
