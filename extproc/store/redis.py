"""The shared store on Redis (or Redis Cluster): one Lua script per counter update."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from extproc.store.base import StoreError

__all__ = ["RedisStore"]

# Rule: PEXPIRE only when the INCRBY created the key (fixed window from first use).
# Returns {value, milliseconds left}.
_INCR_WITH_TTL = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
return {value, ttl}
"""

# A lease set: members scored by their expiry (server time, ms). Expired leases are
# dropped first, so a crashed process leaks a slot for at most the lease TTL.
# Returns {1, in_flight} when acquired, {0, in_flight} when the set is full.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[2]) then
  return {0, n}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, n + 1}
"""


class RedisStore:
    """Counters in Redis; every failure surfaces as :class:`StoreError`."""

    name = "redis"

    def __init__(self, client: Any, timeout_s: float = 0.25, *, cluster: bool = False) -> None:
        self._client = client
        self._timeout_s = timeout_s
        #: Redis Cluster: multi-key reads are split by slot (every script uses one key).
        self._cluster = cluster
        self._shas: dict[str, str] = {}

    @classmethod
    def from_url(cls, url: str, timeout_s: float = 0.25) -> RedisStore:
        """``redis://``, ``rediss://``, ``unix://``; ``redis+cluster://host:port`` (any
        node) for Redis Cluster."""
        for scheme in ("redis+cluster://", "rediss+cluster://"):
            if url.startswith(scheme):
                seed = scheme.replace("+cluster", "") + url.removeprefix(scheme)
                cluster = RedisCluster.from_url(
                    seed,
                    socket_timeout=timeout_s,
                    socket_connect_timeout=timeout_s,
                    decode_responses=False,
                )
                return cls(cluster, timeout_s, cluster=True)
        client = aioredis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=False,
        )
        return cls(client, timeout_s)

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis ping failed: {type(exc).__name__}") from exc

    async def _eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = await self._client.script_load(script)
        try:
            return await self._client.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            # SCRIPT FLUSH or a failover emptied the script cache: load it again.
            sha = self._shas[script] = await self._client.script_load(script)
            return await self._client.evalsha(sha, len(keys), *keys, *args)

    async def incr(self, key: str, amount: int, ttl_s: float) -> int:
        return (await self.incr_window(key, amount, ttl_s))[0]

    async def incr_window(self, key: str, amount: int, ttl_s: float) -> tuple[int, float]:
        try:
            value, ttl_ms = await self._eval(
                _INCR_WITH_TTL, [key], [amount, max(1, int(ttl_s * 1000))]
            )
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis incr failed: {type(exc).__name__}") from exc
        return int(value), int(ttl_ms) / 1000

    async def get_many(self, keys: Sequence[str]) -> list[int | None]:
        if not keys:
            return []
        try:
            if self._cluster:
                values = await self._client.mget_nonatomic(list(keys))
            else:
                values = await self._client.mget(list(keys))
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis mget failed: {type(exc).__name__}") from exc
        return [None if v is None else int(v) for v in values]

    async def acquire_lease(
        self, key: str, member: str, limit: int, ttl_s: float
    ) -> tuple[bool, int]:
        try:
            ok, count = await self._eval(
                _ACQUIRE, [key], [member, limit, max(1, int(ttl_s * 1000))]
            )
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis lease failed: {type(exc).__name__}") from exc
        return bool(ok), int(count)

    async def release_lease(self, key: str, member: str) -> None:
        try:
            await self._client.zrem(key, member)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis release failed: {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self._client.aclose()
