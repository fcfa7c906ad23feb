"""The shared store on Redis (or Redis Cluster): one Lua script per counter update."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    BusyLoadingError,
    ClusterError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.store.base import (
    ENDED_KEEP_S,
    HEARTBEATS,
    HELD_PREFIX,
    OWNER_CHARS,
    RESV_EXPIRY,
    RESV_HASH,
    StoreError,
    StoreFaultError,
    StoreUnavailableError,
    check_amount,
    check_int64,
    check_owner,
    ended_key,
    limit_arg,
    resv_owner_key,
)

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

# KEYS: counter, marker (same slot); ARGV: amount, ttl ms, marker ms → {value, ms
# left, 1 when this call added}. Rule: a set marker means the increment was applied
# before (a retry whose answer was lost): nothing changes.
_INCR_ONCE = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  local v = redis.call('GET', KEYS[1])
  return {tonumber(v) or 0, redis.call('PTTL', KEYS[1]), 0}
end
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
redis.call('SET', KEYS[2], 1, 'PX', ARGV[3])
return {value, ttl, 1}
"""

# A lease set: members scored by their expiry (server time, ms). Expired leases are
# dropped first, so a lease no one gives back leaks its slot for at most the lease TTL.
# When the set is full, the leases of dead processes (ARGV[4...]: the owners the
# caller read as dead from the heartbeats, which live in another slot) are dropped
# too: a member starts with its owner's id.
# Returns {1 when acquired else 0, in_flight, leases of dead owners dropped}.
_ACQUIRE = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[2])
local reaped = 0
if n >= limit and #ARGV > 3 then
  local dead = {}
  for i = 4, #ARGV do dead[ARGV[i]] = true end
  for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if dead[string.sub(m, 1, """
    + str(OWNER_CHARS)
    + """)] then
      redis.call('ZREM', KEYS[1], m)
      reaped = reaped + 1
    end
  end
  n = n - reaped
end
if n >= limit then
  return {0, n, reaped}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, n + 1, reaped}
"""
)

# The heartbeats (one sorted set: process id → when its heartbeat runs out, server
# time). KEYS: heartbeats; ARGV: id, ttl ms, keep ms → the ids that ran out in the
# last keep ms (older ones are forgotten; the set itself goes keep ms after the last
# process stopped beating: its expiry is only ever pushed later).
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - keep)
if redis.call('PTTL', KEYS[1]) < ttl + keep then redis.call('PEXPIRE', KEYS[1], ttl + keep) end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
"""


# Budget reservations. Every budget key shares the hash tag of KEYS[1] and KEYS[2]
# (``{spend}``), so one script can touch them all, on Redis Cluster too. A reservation
# is a hash entry (JSON: amount, keys, and each key's PEXPIRETIME when reserved — its
# window's identity, and the set of its owner's open ids, ``o``) plus its expiry in a
# sorted set; expired ones are given back first, a few per call, and a dead owner's by
# the reaper, so a crashed process cannot hold budget for long. A hold is
# only ever taken back from, or settled into, the window it was added to: if the key
# has rolled over since, the old window is gone and the new one never held it.
# Spend values are settled + reserved micro-dollars; beside each budget key a "held"
# counter (HELD_PREFIX .. key, same hash tag, same expiry) sums its open holds, so a
# settlement can say what is settled (value - held) without reading every hold.
#
# Rules: amounts travel as the decimal strings the caller sent (ARGV) and are stored
# as strings in the entry, never as Lua numbers (doubles; cjson keeps only 14 digits).
# Every budget counter is checked to be an integer before the script writes anything,
# so a script that fails has changed nothing (Redis does not roll a script back).
_RESV_LIB = (
    """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- a counter's value (0 when absent), or nil when the key holds anything else
local function counter(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then return nil end
  if not v then return 0 end
  if not string.match(v, '^%-?%d+$') or string.len(v) > 18 then return nil end
  return tonumber(v)
end
local function held(key) return '"""
    + HELD_PREFIX
    + """' .. key end
local function same_window(key, expires)
  return redis.call('EXISTS', key) == 1 and redis.call('PEXPIRETIME', key) == expires
end
local function take_back(key, amount)
  if redis.call('DECRBY', key, amount) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
end
-- give a hold back to a key and its held counter (a held counter that is gone, or
-- not a counter, is left alone: holds taken before it existed)
local function release(key, amount)
  take_back(key, amount)
  local h = held(key)
  if redis.call('EXISTS', h) == 1 and counter(h) then take_back(h, amount) end
end
local function drop(resv, expiry, id)
  local raw = redis.call('HGET', resv, id)
  if raw then
    local entry = cjson.decode(raw)
    for i, key in ipairs(entry.k) do
      -- best effort: a counter that is not an integer is left alone
      if same_window(key, entry.e[i]) and counter(key) then release(key, tostring(entry.a)) end
    end
    redis.call('HDEL', resv, id)
    if entry.o then redis.call('SREM', entry.o, id) end
  end
  redis.call('ZREM', expiry, id)
  return raw
end
-- the settled part of a budget's value: not what open holds have added
local function settled(key)
  return math.max(0, (counter(key) or 0) - (counter(held(key)) or 0))
end
local function add(key, amount, ttl)
  redis.call('INCRBY', key, amount)
  if ttl > 0 and redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, ttl) end
end
"""
)

# KEYS: resv hash, expiry zset, the id's ended marker, budget keys..., [the owner's
# set of open ids]; ARGV: id, amount, hold ms, n, limits (-1: none)..., ttls ms (0:
# none)... → {0 or the 1-based index of the exhausted budget, spends before this
# call...}. Rule: an id that is held or has ended is refused before anything is
# written (a reserve the client gave up on may run after its cancel or settlement).
_RESERVE = (
    _RESV_LIB
    + """
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return redis.error_reply('reservation id already used')
end
local now = now_ms()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 32)) do
  drop(KEYS[1], KEYS[2], id)
end
local n = tonumber(ARGV[4])
local spends = {}
for i = 1, n do
  spends[i] = counter(KEYS[i + 3])
  if not (spends[i] and counter(held(KEYS[i + 3]))) then
    return redis.error_reply('budget counter ' .. i .. ' is not an integer')
  end
end
for i = 1, n do
  local limit = tonumber(ARGV[4 + i])
  if limit >= 0 and spends[i] >= limit then
    local out = {i}
    for j = 1, n do out[j + 1] = spends[j] end
    return out
  end
end
local amount = ARGV[2]
local keys, windows = {}, {}
for i = 1, n do
  local key = KEYS[i + 3]
  add(key, amount, tonumber(ARGV[4 + n + i]))
  keys[i] = key
  windows[i] = redis.call('PEXPIRETIME', key)
  -- the held counter lives exactly as long as the window it counts holds of
  redis.call('INCRBY', held(key), amount)
  if windows[i] > 0 then redis.call('PEXPIREAT', held(key), windows[i]) end
end
local owners = KEYS[n + 4]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({a = amount, k = keys, e = windows, o = owners}))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
if owners then
  -- the set outlives every hold it lists
  redis.call('SADD', owners, ARGV[1])
  if redis.call('PTTL', owners) < tonumber(ARGV[3]) then redis.call('PEXPIRE', owners, ARGV[3]) end
end
local out = {0}
for j = 1, n do out[j + 1] = spends[j] end
return out
"""
)

# KEYS: resv hash, expiry zset, the id's ended marker, budget keys...; ARGV: id,
# real cost, marker ms, ttls ms... A live reservation is replaced by the real cost;
# where it has expired (already given back) or its window has rolled over, the cost is
# charged in full. Rule: an id that has ended is settled already (a retry whose first
# answer was lost): nothing changes. → {each budget's settled value after it...}
_SETTLE = (
    _RESV_LIB
    + """
local out = {}
if redis.call('EXISTS', KEYS[3]) == 1 then
  for i = 4, #KEYS do out[i - 3] = settled(KEYS[i]) end
  return out
end
local cost = ARGV[2]
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local entry = raw and cjson.decode(raw)
for i = 4, #KEYS do
  if not (counter(KEYS[i]) and counter(held(KEYS[i]))) then
    return redis.error_reply('budget counter ' .. (i - 3) .. ' is not an integer')
  end
end
for i = 4, #KEYS do
  local key = KEYS[i]
  if entry and entry.k[i - 3] == key and same_window(key, entry.e[i - 3]) then
    redis.call('INCRBY', key, cost)
    release(key, tostring(entry.a))
  else
    add(key, cost, tonumber(ARGV[i]))
  end
  out[i - 3] = settled(key)
end
if raw then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  if entry.o then redis.call('SREM', entry.o, ARGV[1]) end
end
redis.call('SET', KEYS[3], 1, 'PX', ARGV[3])
return out
"""
)

# KEYS: resv hash, expiry zset, the id's ended marker; ARGV: id, marker ms. An id
# never reserved is only marked (a reserve of it that runs late is then refused).
_CANCEL = (
    _RESV_LIB
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local found = drop(KEYS[1], KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], 1, 'PX', ARGV[2])
if found then return 1 end
return 0
"""
)

# A dead process's holds, a batch per call, each given back as a cancel would (drop).
# KEYS: resv hash, expiry zset, the owner's set of open ids; ARGV: batch size
# → {holds given back, ids left}. Rule: two reapers of one owner never give a hold
# back twice (drop finds it gone).
_REAP = (
    _RESV_LIB
    + """
local n = 0
for _, id in ipairs(redis.call('SRANDMEMBER', KEYS[3], tonumber(ARGV[1]))) do
  if drop(KEYS[1], KEYS[2], id) then n = n + 1 end
  redis.call('SREM', KEYS[3], id)
end
return {n, redis.call('SCARD', KEYS[3])}
"""
)
#: Holds one reap script gives back (a few milliseconds of Redis time).
_REAP_BATCH = 256
#: Batches one reap sends at most (each takes ids off the set, so this ends).
_REAP_ROUNDS = 1000


#: Connections per server process to one Redis (requests beyond wait for one).
MAX_CONNECTIONS = 64


def _ms(seconds: float | None) -> int:
    """Milliseconds for a script argument; 0 means none."""
    return 0 if seconds is None else check_int64(max(1, int(seconds * 1000)), "ttl")


#: Errors that mean Redis could not be reached or could not serve (a failover, a
#: cluster reconfiguring): the fail mode applies. Every other RedisError is an answer.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # refused, reset, auth, pool exhausted, still loading
    RedisTimeoutError,
    ClusterError,  # CLUSTERDOWN, MASTERDOWN, too many redirections
    TryAgainError,
    ReadOnlyError,  # connected to a replica after a failover
    OutOfMemoryError,  # maxmemory reached with noeviction
    BusyLoadingError,  # still loading its dataset
    MasterDownError,
    RedisClusterException,
    OSError,  # includes the builtin TimeoutError
)


#: Error codes of a reachable Redis that cannot serve for now, whatever was asked.
_UNAVAILABLE_CODES = frozenset(
    {
        "OOM",
        "BUSY",
        "MISCONF",
        "NOREPLICAS",
        "LOADING",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "READONLY",
    }
)


@contextlib.contextmanager
def _guard(op: str) -> Iterator[None]:
    """Turn what redis-py raises (and answers we cannot read) into the store's two
    kinds of :class:`StoreError`."""
    try:
        yield
    except StoreError:
        raise
    except _UNAVAILABLE as exc:
        raise StoreUnavailableError(f"redis {op} failed: {type(exc).__name__}") from exc
    except RedisError as exc:
        if str(exc).split(" ", 1)[0] in _UNAVAILABLE_CODES:
            # Redis cannot serve right now (out of memory, a long script, a failing
            # disk or replica): no request causes that, so the fail mode decides.
            raise StoreUnavailableError(f"redis {op} failed: {str(exc)[:80]}") from exc
        reason = str(exc).split(" script: ", 1)[0][:200]
        raise StoreFaultError(f"redis {op} answered {type(exc).__name__}: {reason}") from exc
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise StoreFaultError(f"redis {op}: malformed answer ({type(exc).__name__})") from exc


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
    """Counters in Redis; every failure surfaces as a :class:`StoreError` of one of
    its two kinds (unavailable, or an answer that is an error)."""

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
        with _guard("ping"):
            await self._client.ping()

    async def _eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        for arg in args:
            if isinstance(arg, int):
                check_int64(arg, "script argument")  # never sent: Redis would refuse it
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
        with _guard("incr"):
            value, ttl_ms = await self._eval(_INCR_WITH_TTL, [key], [amount, _ms(ttl_s)])
            return int(value), int(ttl_ms) / 1000

    async def incr_once(
        self, key: str, amount: int, ttl_s: float, *, marker: str, keep_s: float = ENDED_KEEP_S
    ) -> tuple[int, float, bool]:
        with _guard("incr"):
            args = [amount, _ms(ttl_s), _ms(keep_s)]
            value, ttl_ms, added = await self._eval(_INCR_ONCE, [key, marker], args)
            return int(value), max(0, int(ttl_ms)) / 1000, bool(int(added))

    async def get_many(self, keys: Sequence[str]) -> list[int | None]:
        if not keys:
            return []
        with _guard("mget"):
            if self._cluster:
                values = await self._client.mget_nonatomic(list(keys))
            else:
                values = await self._client.mget(list(keys))
            return [None if v is None else int(v) for v in values]

    async def acquire_lease(
        self,
        key: str,
        member: str,
        limit: int,
        ttl_s: float,
        *,
        dead_owners: Sequence[str] = (),
    ) -> tuple[bool, int, int]:
        args: list[Any] = [member, limit, _ms(ttl_s), *(check_owner(o) for o in dead_owners)]
        with _guard("lease"):
            ok, count, reaped = await self._eval(_ACQUIRE, [key], args)
            return bool(ok), int(count), int(reaped)

    async def release_lease(self, key: str, member: str) -> None:
        with _guard("release"):
            await self._client.zrem(key, member)

    async def incr_many(
        self, items: Sequence[tuple[str, int]], ttl_s: float, *, refresh_ttl: bool = False
    ) -> list[int]:
        if not items:
            return []
        keys = [key for key, _ in items]
        args: list[Any] = [_ms(ttl_s), 1 if refresh_ttl else 0, *(amount for _, amount in items)]
        with _guard("incr"):
            out = await self._eval(_INCR_MANY, keys, args)
            return [int(v) for v in out]

    async def set_flag(self, key: str, ttl_s: float) -> None:
        with _guard("set"):
            await self._client.set(key, 1, px=_ms(ttl_s))

    async def push_sample(self, key: str, value: float, keep: int, ttl_s: float) -> None:
        with _guard("push"):
            pipe = self._client.pipeline(transaction=False)
            pipe.lpush(key, repr(value))
            pipe.ltrim(key, 0, keep - 1)
            pipe.pexpire(key, _ms(ttl_s))
            await pipe.execute()

    async def snapshot(
        self, keys: Sequence[str], lists: Sequence[str]
    ) -> tuple[list[tuple[int | None, float | None]], list[list[float]]]:
        if not keys and not lists:
            return [], []
        with _guard("read"):
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            for key in lists:
                pipe.lrange(key, 0, -1)
            raw = await pipe.execute()
            values = _with_ttls(raw[: 2 * len(keys)])
            samples = [[float(v) for v in items] for items in raw[2 * len(keys) :]]
            return values, samples

    async def get_many_with_ttl(self, keys: Sequence[str]) -> list[tuple[int | None, float | None]]:
        if not keys:
            return []
        with _guard("read"):
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            return _with_ttls(await pipe.execute())

    async def reserve(
        self,
        rid: str,
        keys: Sequence[str],
        *,
        limits: Sequence[int | None],
        amount: int,
        ttls_s: Sequence[float | None],
        hold_s: float,
        owner: str | None = None,
    ) -> tuple[int | None, list[int]]:
        n = len(keys)
        args: list[Any] = [rid, check_amount(amount), _ms(hold_s), n]
        args += [limit_arg(limit) for limit in limits]
        args += [_ms(ttl) for ttl in ttls_s]
        script_keys = [RESV_HASH, RESV_EXPIRY, ended_key(rid), *keys]
        if owner is not None:
            script_keys.append(resv_owner_key(owner))
        with _guard("reserve"):
            out = await self._eval(_RESERVE, script_keys, args)
            spends = [int(v) for v in out[1:]]
            if len(spends) != n:
                raise ValueError("one spend per budget")
            return (None if int(out[0]) == 0 else int(out[0]) - 1), spends

    async def settle(
        self,
        rid: str,
        keys: Sequence[str],
        cost: int,
        ttls_s: Sequence[float | None],
        *,
        keep_s: float = ENDED_KEEP_S,
    ) -> list[int]:
        args: list[Any] = [rid, check_amount(cost, "cost"), _ms(keep_s)]
        args += [_ms(ttl) for ttl in ttls_s]
        with _guard("settle"):
            script_keys = [RESV_HASH, RESV_EXPIRY, ended_key(rid), *keys]
            out = await self._eval(_SETTLE, script_keys, args)
            settled = [int(v) for v in out]
            if len(settled) != len(keys):
                raise ValueError("one settled value per budget")
            return settled

    async def cancel(self, rid: str, *, keep_s: float = ENDED_KEEP_S) -> None:
        with _guard("cancel"):
            keys = [RESV_HASH, RESV_EXPIRY, ended_key(rid)]
            await self._eval(_CANCEL, keys, [rid, _ms(keep_s)])

    async def heartbeat(self, owner: str, ttl_s: float, keep_s: float) -> list[str]:
        args = [check_owner(owner), _ms(ttl_s), _ms(keep_s)]
        with _guard("heartbeat"):
            dead = await self._eval(_HEARTBEAT, [HEARTBEATS], args)
            return [d.decode() if isinstance(d, bytes) else str(d) for d in dead]

    async def reap_holds(self, owner: str) -> int:
        keys = [RESV_HASH, RESV_EXPIRY, resv_owner_key(owner)]
        total = 0
        with _guard("reap"):
            for _ in range(_REAP_ROUNDS):
                reaped, left = await self._eval(_REAP, keys, [_REAP_BATCH])
                total += int(reaped)
                if int(left) == 0:
                    break
        return total

    async def close(self) -> None:
        await self._client.aclose()


def _with_ttls(raw: Sequence[Any]) -> list[tuple[int | None, float | None]]:
    """(value, seconds to expiry or None) from a pipeline of GET, PTTL pairs."""
    out: list[tuple[int | None, float | None]] = []
    for value, ttl_ms in zip(raw[::2], raw[1::2], strict=True):
        ttl = int(ttl_ms) / 1000 if int(ttl_ms) >= 0 else None
        out.append((None if value is None else int(value), ttl))
    return out
