"""The shared store on Redis (or Redis Cluster): one Lua script per counter update."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from extproc.store.base import RESV_EXPIRY, RESV_HASH, StoreError

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


# Budget reservations. Every budget key shares the hash tag of KEYS[1] and KEYS[2]
# (``{spend}``), so one script can touch them all, on Redis Cluster too. A reservation
# is a hash entry (JSON: amount, keys, and each key's PEXPIRETIME when reserved — its
# window's identity) plus its expiry in a sorted set; expired ones are given back
# first, a few per call, so a crashed process cannot hold budget forever. A hold is
# only ever taken back from, or settled into, the window it was added to: if the key
# has rolled over since, the old window is gone and the new one never held it.
# Spend values are settled + reserved micro-dollars.
_RESV_LIB = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function same_window(key, expires)
  return redis.call('EXISTS', key) == 1 and redis.call('PEXPIRETIME', key) == expires
end
local function change(key, amount)
  if redis.call('INCRBY', key, amount) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
end
local function drop(resv, expiry, id)
  local raw = redis.call('HGET', resv, id)
  if raw then
    local entry = cjson.decode(raw)
    for i, key in ipairs(entry.k) do
      if same_window(key, entry.e[i]) then change(key, -entry.a) end
    end
    redis.call('HDEL', resv, id)
  end
  redis.call('ZREM', expiry, id)
  return raw
end
local function add(key, amount, ttl)
  redis.call('INCRBY', key, amount)
  if ttl > 0 and redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, ttl) end
end
"""

# KEYS: resv hash, expiry zset, budget keys...; ARGV: id, amount, hold ms, n,
# limits (-1: none)..., ttls ms (0: none)... → {0 or the 1-based index of the
# exhausted budget, spends before this call...}
_RESERVE = (
    _RESV_LIB
    + """
local now = now_ms()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 32)) do
  drop(KEYS[1], KEYS[2], id)
end
local n = tonumber(ARGV[4])
local spends = {}
for i = 1, n do
  spends[i] = tonumber(redis.call('GET', KEYS[i + 2]) or '0')
end
for i = 1, n do
  local limit = tonumber(ARGV[4 + i])
  if limit >= 0 and spends[i] >= limit then
    local out = {i}
    for j = 1, n do out[j + 1] = spends[j] end
    return out
  end
end
local amount = tonumber(ARGV[2])
local keys, windows = {}, {}
for i = 1, n do
  add(KEYS[i + 2], amount, tonumber(ARGV[4 + n + i]))
  keys[i] = KEYS[i + 2]
  windows[i] = redis.call('PEXPIRETIME', KEYS[i + 2])
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({a = amount, k = keys, e = windows}))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
local out = {0}
for j = 1, n do out[j + 1] = spends[j] end
return out
"""
)

# KEYS: resv hash, expiry zset, budget keys...; ARGV: id, real cost, ttls ms...
# A live reservation is replaced by the real cost; where it has expired (already
# given back) or its window has rolled over, the cost is charged in full.
_SETTLE = (
    _RESV_LIB
    + """
local cost = tonumber(ARGV[2])
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local entry = raw and cjson.decode(raw)
for i = 3, #KEYS do
  local key = KEYS[i]
  local held = nil
  if entry and entry.k[i - 2] == key and same_window(key, entry.e[i - 2]) then
    held = entry.a
  end
  if held then change(key, cost - held) else add(key, cost, tonumber(ARGV[i])) end
end
if raw then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
"""
)

# KEYS: resv hash, expiry zset; ARGV: id
_CANCEL = (
    _RESV_LIB
    + """
if drop(KEYS[1], KEYS[2], ARGV[1]) then return 1 end
return 0
"""
)


#: Connections per server process to one Redis (requests beyond wait for one).
MAX_CONNECTIONS = 64


def _ms(seconds: float | None) -> int:
    """Milliseconds for a script argument; 0 means none."""
    return 0 if seconds is None else max(1, int(seconds * 1000))


# KEYS: counters of one slot; ARGV: ttl ms, refresh (0/1), amounts...
_INCR_MANY = """
local out = {}
for i = 1, #KEYS do
  local value = redis.call('INCRBY', KEYS[i], ARGV[i + 2])
  if value < 0 then
    redis.call('SET', KEYS[i], 0, 'KEEPTTL')
    value = 0
  end
  if ARGV[2] == '1' or redis.call('PTTL', KEYS[i]) < 0 then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  end
  out[i] = value
end
return out
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
        # Rule: a burst of requests waits briefly for a pooled connection instead of
        # failing with "too many connections" (the non-blocking pool's behaviour).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=max(2.0, timeout_s * 8),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=False,
        )
        return cls(aioredis.Redis.from_pool(pool), timeout_s)  # owns (and closes) the pool

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

    async def incr_many(
        self, items: Sequence[tuple[str, int]], ttl_s: float, *, refresh_ttl: bool = False
    ) -> list[int]:
        if not items:
            return []
        keys = [key for key, _ in items]
        args: list[Any] = [_ms(ttl_s), 1 if refresh_ttl else 0, *(amount for _, amount in items)]
        try:
            out = await self._eval(_INCR_MANY, keys, args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis incr failed: {type(exc).__name__}") from exc
        return [int(v) for v in out]

    async def set_flag(self, key: str, ttl_s: float) -> None:
        try:
            await self._client.set(key, 1, px=_ms(ttl_s))
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis set failed: {type(exc).__name__}") from exc

    async def push_sample(self, key: str, value: float, keep: int, ttl_s: float) -> None:
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.lpush(key, repr(value))
            pipe.ltrim(key, 0, keep - 1)
            pipe.pexpire(key, _ms(ttl_s))
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis push failed: {type(exc).__name__}") from exc

    async def snapshot(
        self, keys: Sequence[str], lists: Sequence[str]
    ) -> tuple[list[tuple[int | None, float | None]], list[list[float]]]:
        if not keys and not lists:
            return [], []
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            for key in lists:
                pipe.lrange(key, 0, -1)
            raw = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {type(exc).__name__}") from exc
        values: list[tuple[int | None, float | None]] = []
        for value, ttl_ms in zip(raw[: 2 * len(keys) : 2], raw[1 : 2 * len(keys) : 2], strict=True):
            ttl = int(ttl_ms) / 1000 if int(ttl_ms) >= 0 else None
            values.append((None if value is None else int(value), ttl))
        samples = [[float(v) for v in items] for items in raw[2 * len(keys) :]]
        return values, samples

    async def get_many_with_ttl(self, keys: Sequence[str]) -> list[tuple[int | None, float | None]]:
        if not keys:
            return []
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            raw = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {type(exc).__name__}") from exc
        out: list[tuple[int | None, float | None]] = []
        for value, ttl_ms in zip(raw[::2], raw[1::2], strict=True):
            ttl = int(ttl_ms) / 1000 if int(ttl_ms) >= 0 else None
            out.append((None if value is None else int(value), ttl))
        return out

    async def reserve(
        self,
        rid: str,
        keys: Sequence[str],
        *,
        limits: Sequence[int | None],
        amount: int,
        ttls_s: Sequence[float | None],
        hold_s: float,
    ) -> tuple[int | None, list[int]]:
        n = len(keys)
        args: list[Any] = [rid, amount, _ms(hold_s), n]
        args += [-1 if limit is None else limit for limit in limits]
        args += [_ms(ttl) for ttl in ttls_s]
        try:
            out = await self._eval(_RESERVE, [RESV_HASH, RESV_EXPIRY, *keys], args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis reserve failed: {type(exc).__name__}") from exc
        spends = [int(v) for v in out[1:]]
        return (None if int(out[0]) == 0 else int(out[0]) - 1), spends

    async def settle(
        self, rid: str, keys: Sequence[str], cost: int, ttls_s: Sequence[float | None]
    ) -> None:
        args: list[Any] = [rid, cost, *(_ms(ttl) for ttl in ttls_s)]
        try:
            await self._eval(_SETTLE, [RESV_HASH, RESV_EXPIRY, *keys], args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis settle failed: {type(exc).__name__}") from exc

    async def cancel(self, rid: str) -> None:
        try:
            await self._eval(_CANCEL, [RESV_HASH, RESV_EXPIRY], [rid])
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis cancel failed: {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self._client.aclose()
