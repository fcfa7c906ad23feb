from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from extproc.store import MemoryStore, StoreError, open_store
from extproc.store.redis import RedisStore
from tests.helpers import free_port


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_incr_fixed_window() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    assert await store.incr("k", 1, ttl_s=10) == 1
    clock.now += 9.9
    assert await store.incr("k", 2, ttl_s=10) == 3  # TTL not extended by later increments
    clock.now += 0.1
    assert await store.get_many(["k", "other"]) == [None, None]
    assert await store.incr("k", 1, ttl_s=10) == 1


async def test_redis_incr_and_script_flush(redis_url: str) -> None:
    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    await store.ping()
    client = aioredis.from_url(redis_url)
    await client.delete("t:k")
    assert await store.incr("t:k", 1, ttl_s=5) == 1
    assert await store.incr("t:k", 4, ttl_s=5) == 5
    ttl_ms = await client.pttl("t:k")
    assert 0 < ttl_ms <= 5000
    await client.script_flush()
    assert await store.incr("t:k", 1, ttl_s=5) == 6  # script reloaded transparently
    assert await store.get_many(["t:k", "t:missing"]) == [6, None]
    await client.aclose()
    await store.close()


async def test_redis_down_raises_store_error() -> None:
    store = open_store(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreError):
        await store.ping()
    with pytest.raises(StoreError):
        await store.incr("k", 1, 1)
    await store.close()


def test_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        open_store("mongodb://x")


async def test_memory_leases_limit_release_and_expiry() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    assert await store.acquire_lease("p", "a", 2, ttl_s=10) == (True, 1, 0)
    assert await store.acquire_lease("p", "b", 2, ttl_s=10) == (True, 2, 0)
    assert await store.acquire_lease("p", "c", 2, ttl_s=10) == (False, 2, 0)
    await store.release_lease("p", "a")
    await store.release_lease("p", "a")  # twice is harmless
    assert await store.acquire_lease("p", "c", 2, ttl_s=10) == (True, 2, 0)
    clock.now += 10  # a holder that never released: its lease runs out
    assert await store.acquire_lease("p", "d", 2, ttl_s=10) == (True, 1, 0)


async def test_redis_leases_atomic_and_script_flush(redis_url: str) -> None:
    store = open_store(redis_url)
    client = aioredis.from_url(redis_url)
    await client.delete("t:p")
    results = await asyncio.gather(
        *(store.acquire_lease("t:p", f"m{i}", 5, ttl_s=30) for i in range(50))
    )
    assert sum(ok for ok, _, _ in results) == 5
    assert await client.zcard("t:p") == 5
    assert 0 < await client.pttl("t:p") <= 30_000
    await client.script_flush()
    assert await store.acquire_lease("t:p", "late", 5, ttl_s=30) == (False, 5, 0)
    winner = next(f"m{i}" for i, (ok, _, _) in enumerate(results) if ok)
    await store.release_lease("t:p", winner)
    await store.release_lease("t:p", "not-a-member")
    assert await store.acquire_lease("t:p", "late", 5, ttl_s=30) == (True, 5, 0)
    await client.delete("t:p")
    # expired leases (TTL 1 ms) are dropped before counting
    assert await store.acquire_lease("t:p", "x", 1, ttl_s=0.001) == (True, 1, 0)
    await asyncio.sleep(0.01)
    assert await store.acquire_lease("t:p", "y", 1, ttl_s=30) == (True, 1, 0)
    await client.aclose()
    await store.close()


async def test_redis_cluster_store(redis_cluster_url: str) -> None:
    store = open_store(redis_cluster_url)
    keys = [f"{{t:{i}}}:n" for i in range(12)]  # spread over the cluster's slots
    for i, key in enumerate(keys):
        assert await store.incr(key, i + 1, ttl_s=30) == i + 1
    assert await store.get_many(keys) == [i + 1 for i in range(len(keys))]
    assert await store.acquire_lease("{t:p}", "m", 1, ttl_s=30) == (True, 1, 0)
    assert await store.acquire_lease("{t:p}", "n", 1, ttl_s=30) == (False, 1, 0)
    await store.close()


async def test_redis_slow_past_timeout_is_a_store_error() -> None:
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()  # accepts, never answers: a hung Redis
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", timeout_s=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(StoreError):
        await store.incr_window("k", 1, 10)
    assert loop.time() - started < 2
    await store.close()
    done.set()
    server.close()
    await server.wait_closed()
