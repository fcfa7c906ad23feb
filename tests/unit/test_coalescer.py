"""Settlements, cancels and lease releases of concurrent calls share a store round trip
(:mod:`extproc.state.coalescer`), each with its own outcome, none lost or applied twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from extproc.core.request import RequestHead
from extproc.core.usage import Usage
from extproc.policy import load_policy
from extproc.state.coalescer import Coalescer
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore, StoreError, StoreFaultError, StoreUnavailableError
from extproc.store.base import Cancel, Finish, Release, Write, resv_hash
from extproc.store.redis import RedisStore

N = 20
GLOBAL = "{spend}:global:all"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


async def _server_stats(client: aioredis.Redis) -> tuple[int, int]:
    """(socket reads Redis has processed: one per round trip a client makes, EVALSHA
    calls served). Each INFO is one read of its own."""
    stats = await client.info("stats")
    commands = await client.info("commandstats")
    evalsha = int(commands.get("cmdstat_evalsha", {}).get("calls", 0))
    return int(stats["total_reads_processed"]), evalsha


async def _reserve(store: RedisStore | MemoryStore, rid: str, key: str, amount: int) -> None:
    await store.reserve(rid, [key], limits=[None], amount=amount, ttls_s=[None], hold_s=60)


async def test_concurrent_settlements_share_one_round_trip(
    redis_url: str, redis: aioredis.Redis
) -> None:
    store = RedisStore.from_url(redis_url)
    coalescer = Coalescer(store)
    keys = [f"{{spend}}:key:k{i}" for i in range(N)]
    for i, key in enumerate(keys):
        await _reserve(store, f"r{i}", key, 100)
    # the script is loaded and the pool's connection open before counting
    await store.finish(Finish("warm", (GLOBAL,), 0, (None,), 60))
    reads, evals = await _server_stats(redis)
    settled = await asyncio.gather(
        *(
            coalescer.finish(Finish(f"r{i}", (key,), i + 1, (None,), 60))
            for i, key in enumerate(keys)
        )
    )
    after_reads, after_evals = await _server_stats(redis)
    assert settled == [[i + 1] for i in range(N)]  # each caller its own totals
    assert (coalescer.batches, coalescer.writes) == (1, N)
    assert after_evals - evals == N  # every settlement ran
    # one read for the batch (a few if Redis reads it in parts), two for the INFOs
    assert after_reads - reads - 2 <= 3 < N
    assert [int(v or 0) for v in await redis.mget(keys)] == [i + 1 for i in range(N)]
    await store.close()


async def test_a_lone_write_goes_out_at_once(redis_url: str, redis: aioredis.Redis) -> None:
    store = RedisStore.from_url(redis_url)
    coalescer = Coalescer(store)
    await _reserve(store, "r1", GLOBAL, 50)
    # nothing else to batch: sent in the loop's next turn, no timer to wait for
    task = asyncio.ensure_future(coalescer.finish(Finish("r1", (GLOBAL,), 5, (None,), 60)))
    for _ in range(50):
        if task.done():
            break
        await asyncio.sleep(0)
    assert coalescer.batches == 1
    assert await asyncio.wait_for(task, 5) == [5]
    await store.close()


async def test_one_bad_write_leaves_the_others_applied(
    redis_url: str, redis: aioredis.Redis
) -> None:
    store = RedisStore.from_url(redis_url)
    coalescer = Coalescer(store)
    good, bad, lease = "{spend}:key:good", "{spend}:key:bad", "{lease:k}:leases"
    await _reserve(store, "r1", good, 30)
    await redis.hset(bad, "not", "a counter")  # the settle script refuses this key
    await redis.zadd(lease, {"m1": 1e15})
    await redis.script_flush()  # the scripts are loaded again, the lost ones re-sent
    writes: list[Write] = [
        Finish("r1", (good,), 7, (None,), 60),
        Finish("r2", (bad,), 7, (None,), 60),
        Finish("r3", (good,), -1, (None,), 60),  # refused before anything is sent
        Cancel("r4", (good,), 60),
        Release(lease, "m1"),
    ]
    outcomes = await store.write_many(writes)
    assert outcomes[0] == [7]
    assert isinstance(outcomes[1], StoreFaultError)
    assert isinstance(outcomes[2], StoreFaultError)
    assert outcomes[3:] == [None, None]
    assert int(await redis.get(good) or 0) == 7
    assert await redis.zcard(lease) == 0
    assert await redis.exists("{spend}:ended:r4") == 1
    # through the coalescer: each caller its own outcome
    results = await asyncio.gather(
        coalescer.finish(Finish("r5", (good,), 3, (None,), 60)),
        coalescer.finish(Finish("r6", (bad,), 3, (None,), 60)),
        return_exceptions=True,
    )
    assert results[0] == [10]
    assert isinstance(results[1], StoreFaultError)
    assert coalescer.batches == 1
    await store.close()


class _LostAnswers(RedisStore):
    """The next ``lose`` pipelines run in Redis, and then their answer is lost."""

    lose = 0

    async def _pipelined(
        self, commands: Sequence[tuple[str | None, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        replies = await super()._pipelined(commands)
        if self.lose:
            self.lose -= 1
            raise RedisConnectionError("connection reset")
        return replies


class _FaultOnce(MemoryStore):
    """Answers the settlement of ``bad`` with an error, once."""

    bad = ""

    async def finish(self, finish: Finish) -> list[int]:
        if finish.rid == self.bad:
            self.bad = ""
            raise StoreFaultError("budget counter 1 is not an integer")
        return await super().finish(finish)


def _gateway(tmp_path: Path, store: RedisStore | MemoryStore) -> Gateway:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "model_groups: [{name: g, deployments: [{id: a, cluster: c, model: m,"
        " prices: {input_cost_per_token: 0.001}}]}]\n"
        "general_settings: {max_budget: 100}\n"
    )
    settings = Settings(policy_path=path, owed_dir=str(tmp_path / "owed"))
    return Gateway(settings, load_policy(path), store)


async def _charges(gateway: Gateway, n: int) -> list[Any]:
    raw = json.dumps({"model": "g", "messages": [], "max_tokens": 1}).encode()
    head = RequestHead("POST", "/v1/chat/completions", {})
    out = []
    for _ in range(n):
        decision = await gateway.route(head, raw, gateway.policy)
        out.append((await gateway.admit(decision, gateway.policy)).charge)
    return out


def _outcomes(gateway: Gateway) -> tuple[float, float]:
    labels = gateway.metrics.settlements.labels
    return labels("settled")._value.get(), labels("failed")._value.get()


async def test_an_unanswered_batch_is_owed_whole_and_lands_once(
    tmp_path: Path, redis_url: str, redis: aioredis.Redis
) -> None:
    store = _LostAnswers.from_url(redis_url)
    assert isinstance(store, _LostAnswers)
    gateway = _gateway(tmp_path, store)
    charges = await _charges(gateway, N)
    store.lose = 1  # the batch ran; the client never heard
    costs = await asyncio.gather(
        *(gateway.settle(c, Usage(input_tokens=10 + i)) for i, c in enumerate(charges))
    )
    assert gateway.coalescer.batches == 1
    assert _outcomes(gateway) == (0, N)
    assert len(gateway.owed) == N
    await gateway.owed.drain(10)
    assert len(gateway.owed) == 0
    # charged exactly once each: the retries found the ids ended
    assert int(await redis.get(GLOBAL) or 0) == sum(costs)
    assert await redis.hlen(resv_hash("{spend}")) == 0
    await gateway.close()


async def test_a_failed_write_is_owed_and_the_others_settle(tmp_path: Path) -> None:
    store = _FaultOnce()
    gateway = _gateway(tmp_path, store)
    charges = await _charges(gateway, 4)
    store.bad = charges[2].rid
    costs = await asyncio.gather(*(gateway.settle(c, Usage(input_tokens=100)) for c in charges))
    assert gateway.coalescer.batches == 1
    assert _outcomes(gateway) == (3, 1)
    assert [item.rid for item in gateway.owed] == [charges[2].rid]  # type: ignore[union-attr]
    await gateway.owed.drain(5)
    assert await store.get_many([GLOBAL]) == [sum(costs)]
    await gateway.close()


async def test_cancels_and_releases_share_a_batch(tmp_path: Path) -> None:
    store = MemoryStore()
    gateway = _gateway(tmp_path, store)
    charges = await _charges(gateway, 3)
    await asyncio.gather(*(gateway.cancel(c, in_flight=False) for c in charges))
    assert gateway.coalescer.batches == 1
    assert store._reservations == {}
    assert await store.get_many([GLOBAL]) == [0]
    await gateway.close()


async def test_a_batch_that_fails_whole_fails_every_caller() -> None:
    class _Down(MemoryStore):
        async def write_many(self, writes: Sequence[Write]) -> list[list[int] | StoreError | None]:
            raise StoreUnavailableError("redis settle failed: ConnectionError")

    coalescer = Coalescer(_Down())
    results = await asyncio.gather(
        coalescer.cancel(Cancel("r1", ())),
        coalescer.release(Release("{lease:k}:leases", "m")),
        return_exceptions=True,
    )
    assert all(isinstance(r, StoreUnavailableError) for r in results)
    assert coalescer.batches == 1


async def test_writes_made_while_a_batch_is_in_flight_go_out_together() -> None:
    gate = asyncio.Event()
    sizes: list[int] = []

    class _Slow(MemoryStore):
        async def write_many(self, writes: Sequence[Write]) -> list[list[int] | StoreError | None]:
            sizes.append(len(writes))
            await gate.wait()
            return await super().write_many(writes)

    coalescer = Coalescer(_Slow(), max_batch=4)
    first = asyncio.ensure_future(coalescer.cancel(Cancel("r0", ())))
    for _ in range(3):  # the first batch is sent
        await asyncio.sleep(0)
    assert sizes == [1]
    rest = [asyncio.ensure_future(coalescer.cancel(Cancel(f"r{i}", ()))) for i in range(1, 7)]
    for _ in range(3):
        await asyncio.sleep(0)
    # four fill a batch sent at once beside the one in flight; two wait for its answer
    assert sizes == [1, 4]
    gate.set()
    await asyncio.gather(first, *rest)
    assert sizes == [1, 4, 2]
    await coalescer.drain()
