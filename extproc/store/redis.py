"""The shared store on Redis (or Redis Cluster): one Lua script per counter update,
and per hash slot an admission or settlement touches (one in all on a single Redis)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
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

try:  # redis-py's hiredis packer (redis >= 5), used when hiredis is installed
    from redis.connection import HiredisRespSerializer
    from redis.utils import HIREDIS_AVAILABLE
except ImportError:  # pragma: no cover - an older or a future redis-py
    _HIREDIS_PACKER: Any = None
else:
    _HIREDIS_PACKER = HiredisRespSerializer() if HIREDIS_AVAILABLE else None

from extproc.state.clock import SystemClock
from extproc.store.base import (
    ENDED_KEEP_S,
    HEARTBEATS,
    INT64_MAX,
    OWNER_CHARS,
    SPEND_TAG,
    Admission,
    Admitted,
    Budget,
    Cancel,
    Ceiling,
    Count,
    Finish,
    Gauge,
    Release,
    StoreError,
    StoreFaultError,
    StoreUnavailableError,
    Take,
    Write,
    book_groups,
    book_tag,
    books_key,
    check_amount,
    check_int64,
    check_owner,
    ended_key,
    limit_arg,
    resv_expiry,
    resv_hash,
    resv_owner_key,
)
from extproc.store.redis_lua import (
    ADMIT,
    CANCEL,
    FINISH,
    REAP,
    REAP_BATCH,
    REAP_ROUNDS,
    REGISTER,
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

# Undo an increment made with a marker (KEYS[2]) if it was made, never below zero. The
# marker is left set to 'u' either way: the increment, should it run later, adds
# nothing (it checks that the marker exists), and a retry of the undo, finding 'u',
# takes nothing back twice. → 1 when an increment was (or had been) taken back, else 0.
_UNCOUNT = """
local mark = redis.call('GET', KEYS[2])
if mark == 'u' then return 1 end
if mark and redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('DECRBY', KEYS[1], ARGV[1]) < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
end
redis.call('SET', KEYS[2], 'u', 'PX', ARGV[2])
if mark then return 1 end
return 0
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
# process stopped beating: its expiry is only ever pushed later). KEYS[2]: the id's
# registry of book tags (same slot), kept as long as the heartbeat is remembered.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - keep)
if redis.call('PTTL', KEYS[1]) < ttl + keep then redis.call('PEXPIRE', KEYS[1], ttl + keep) end
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 and redis.call('PTTL', KEYS[2]) < ttl + keep then
  redis.call('PEXPIRE', KEYS[2], ttl + keep)
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
"""


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


def _pack_with_hiredis(pool: Any) -> None:
    """Make the pool's connections pack commands with hiredis (C) when it is installed.

    redis-py's asyncio connections always pack in Python (its sync ones use hiredis),
    about a tenth of a call's CPU for the admission script's many arguments; the packer
    is redis-py's own, so the bytes on the wire are the same."""
    packer = _HIREDIS_PACKER
    if packer is None:
        return
    base = pool.connection_class

    class _Packed(base):  # type: ignore[misc, valid-type]
        def pack_command(self, *args: Any) -> list[bytes]:
            return cast(list[bytes], packer.pack(*args))

    _Packed.__name__ = f"Hiredis{base.__name__}"
    pool.connection_class = _Packed


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
        #: (owner, book tag) → when this process files the tag again (Redis Cluster).
        self._registered: dict[tuple[str, str], float] = {}
        self._monotonic = SystemClock().monotonic

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
        _pack_with_hiredis(pool)
        return cls(aioredis.Redis.from_pool(pool), timeout_s)  # owns (and closes) the pool

    async def ping(self) -> None:
        with _guard("ping"):
            await self._client.ping()

    def _sha(self, script: str) -> str:
        sha = self._shas.get(script)
        if sha is None:
            # Rule: the digest is the script's SHA1, known here: no load is sent while
            # Redis has the script (a burst of first calls sends no burst of loads).
            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest()  # noqa: S324
        return sha

    async def _eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        for arg in args:
            if isinstance(arg, int) and not -INT64_MAX <= arg <= INT64_MAX:
                check_int64(arg, "script argument")  # never sent: Redis would refuse it
        sha = self._sha(script)
        try:
            return await self._client.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            # a new Redis, SCRIPT FLUSH or a failover emptied the script cache: load it.
            await self._client.script_load(script)
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

    async def uncount(self, key: str, amount: int, *, marker: str, keep_s: float) -> bool:
        with _guard("incr"):
            args = [check_int64(amount, "amount"), _ms(keep_s)]
            return bool(int(await self._eval(_UNCOUNT, [key, marker], args)))

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

    def _slot(self, key: str) -> int:
        """The hash slot of ``key`` on Redis Cluster; 0 for every key on one Redis (a
        script there may touch keys of any slot)."""
        return key_slot(key.encode()) if self._cluster else 0

    def _units(self, budgets: Sequence[str], steps: Sequence[str]) -> list[_Unit]:
        """The scripts one admission sends: their budgets' and steps' indexes. Rule:
        one per slot, slots of budgets only first (by slot number, so every call
        touches slots in one order), then the steps' slot with its budgets; steps of
        several slots (unusual) go after all budgets, one per run of a slot. On a
        single Redis: one script for everything."""
        if not self._cluster:
            return [_Unit(range(len(budgets)), range(len(steps)))] if budgets or steps else []
        by_slot: dict[int, list[int]] = {}
        for index, key in enumerate(budgets):
            by_slot.setdefault(self._slot(key), []).append(index)
        runs: list[tuple[int, list[int]]] = []
        for index, key in enumerate(steps):
            slot = self._slot(key)
            if runs and runs[-1][0] == slot:
                runs[-1][1].append(index)
            else:
                runs.append((slot, [index]))
        last = runs[0][0] if len(runs) == 1 else None
        units = [_Unit(by_slot[s], ()) for s in sorted(by_slot) if s != last]
        if last is not None:
            units.append(_Unit(by_slot.get(last, ()), runs[0][1]))
        else:
            units += [_Unit((), indexes) for _, indexes in runs]
        return units

    async def admit(self, admission: Admission) -> Admitted:
        return await self._admit(admission, check_owner(admission.owner))

    def _admit_script(
        self, adm: Admission, owner: str | None, unit: _Unit, registry: bool
    ) -> tuple[list[str], list[Any], list[int]]:
        """(KEYS, ARGV, the budgets' indexes in script order) of one admission script;
        every number checked (so all are built before the first is sent)."""
        books: dict[str, list[int]] = {}
        for i in unit.budgets:
            books.setdefault(book_tag(adm.budgets[i].key), []).append(i)
        keys: list[str] = []
        args: list[Any] = [
            adm.rid,
            check_amount(adm.amount),
            _ms(adm.hold_s),
            _ms(adm.keep_s),
            len(books),
            len(unit.steps),
            len(adm.dead_owners),
            *(check_owner(o) for o in adm.dead_owners),
        ]
        order: list[int] = []
        for tag, indexes in books.items():
            keys += (resv_hash(tag), resv_expiry(tag), ended_key(adm.rid, tag))
            if owner is not None:
                keys.append(resv_owner_key(owner, tag))
            args += (0 if owner is None else 1, len(indexes))
            for i in indexes:
                budget = adm.budgets[i]
                keys.append(budget.key)
                args += (limit_arg(budget.limit), _ms(budget.ttl_s))
            order += indexes
        for i in unit.steps:
            _add_step(adm.steps[i], keys, args)
        if registry and owner is not None:
            keys.append(books_key(owner))
            args += (1, _registry_ms(adm.hold_s))
        else:
            args.append(0)
        return keys, args, order

    async def _admit(self, adm: Admission, owner: str | None) -> Admitted:
        if not self._cluster:
            # Rule: one script for everything (a single Redis takes keys of any slot).
            unit = _Unit(range(len(adm.budgets)), range(len(adm.steps)))
            registry = owner is not None and bool(adm.budgets)
            keys, args, order = self._admit_script(adm, owner, unit, registry)
            if not adm.budgets and not adm.steps:
                return Admitted(None, None, (), ())
            with _guard("admit"):
                out = await self._eval(ADMIT, keys, args)
                return _admitted(
                    adm, unit, order, out, spends=[None] * len(adm.budgets), results=[]
                )
        return await self._admit_by_slot(adm, owner)

    async def _admit_by_slot(self, adm: Admission, owner: str | None) -> Admitted:
        """:meth:`admit` on Redis Cluster: a script per slot, what earlier slots took
        handed back when a later one refuses or fails."""
        budgets = adm.budgets
        units = self._units([b.key for b in budgets], [step.key for step in adm.steps])
        scripts = [self._admit_script(adm, owner, unit, registry=False) for unit in units]
        if not units:
            check_amount(adm.amount)
            for dead in adm.dead_owners:
                check_owner(dead)
        if owner is not None and budgets:
            await self._register(owner, [book_tag(b.key) for b in budgets], adm.hold_s)
        spends: list[int | None] = [None] * len(budgets)
        results: list[object] = []
        held: list[str] = []
        taken: list[Take] = []
        for unit, (script_keys, args, order) in zip(units, scripts, strict=True):
            try:
                with _guard("admit"):
                    out = await self._eval(ADMIT, script_keys, args)
                    admitted = _admitted(adm, unit, order, out, spends=spends, results=results)
            except StoreError:
                await self._hand_back(adm.rid, held, taken, adm.keep_s)
                raise
            if not admitted.admitted:
                if not await self._hand_back(adm.rid, held, taken, adm.keep_s):
                    return dataclasses.replace(admitted, handed_back=False)
                return admitted
            for i in unit.budgets:
                held.append(budgets[i].key)
            for i in unit.steps:
                step = adm.steps[i]
                if isinstance(step, Take):
                    taken.append(step)
        return Admitted(None, None, tuple(spends), tuple(results))

    async def _hand_back(self, rid: str, held: list[str], taken: list[Take], keep_s: float) -> bool:
        """Give back what earlier slots of a refused (or failed) admission took;
        whether it could. Rule: a refusal whose hand-back failed says so
        (:attr:`Admitted.handed_back`), so its caller owes the cancel; the caller of an
        admission whose outcome is unknown owes it anyway."""
        try:
            if held:
                await self.cancel(rid, held, keep_s=keep_s)
            for take in taken:
                await self.release_lease(take.key, take.member)
        except StoreError:
            return False
        return True

    async def _register(self, owner: str, tags: Sequence[str], hold_s: float) -> None:
        """File the book tags under ``owner``'s registry (Redis Cluster: its own slot,
        one more round trip), once per tag while the registration lasts."""
        now = self._monotonic()
        ttl_ms = _registry_ms(hold_s)
        new = sorted({t for t in tags if self._registered.get((owner, t), 0.0) <= now})
        if not new:
            return
        with _guard("register"):
            await self._eval(REGISTER, [books_key(owner)], [ttl_ms, *new])
        for tag in new:
            # renewed well before it can run out (heartbeats push it later meanwhile)
            self._registered[(owner, tag)] = now + ttl_ms / 2000

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
        budgets = tuple(
            Budget(key, limit, ttl) for key, limit, ttl in zip(keys, limits, ttls_s, strict=True)
        )
        if owner is not None:
            check_owner(owner)
        admission = Admission(rid, owner or "", amount, hold_s, budgets, ())
        out = await self._admit(admission, owner)
        return out.refused_budget, [s or 0 for s in out.spends]

    async def finish(self, finish: Finish) -> list[int]:
        scripts = self._finish_scripts(finish)
        with _guard("settle"):
            outs = [await self._eval(FINISH, keys, args) for keys, args, _ in scripts]
            return _settled(finish, scripts, outs)

    def _finish_scripts(self, finish: Finish) -> list[tuple[list[str], list[Any], list[int]]]:
        """(KEYS, ARGV, the budgets' indexes in script order) of each script of a
        finish (one per slot), every number checked before any is sent."""
        keys = finish.keys
        if len(finish.ttls_s) != len(keys):
            raise StoreFaultError("one ttl per budget key")
        cost = check_amount(finish.cost, "cost")
        scripts: list[tuple[list[str], list[Any], list[int]]] = []
        for unit in self._finish_units(keys, [step.key for step in finish.steps]):
            books: dict[str, list[int]] = {}
            for i in unit.budgets:
                books.setdefault(book_tag(keys[i]), []).append(i)
            script_keys: list[str] = []
            args: list[Any] = [finish.rid, cost, _ms(finish.keep_s), len(books), len(unit.steps)]
            order: list[int] = []
            for tag, indexes in books.items():
                script_keys += (resv_hash(tag), resv_expiry(tag), ended_key(finish.rid, tag))
                args.append(len(indexes))
                for i in indexes:
                    script_keys.append(keys[i])
                    args.append(_ms(finish.ttls_s[i]))
                order += indexes
            for i in unit.steps:
                _add_step(finish.steps[i], script_keys, args)
            scripts.append((script_keys, args, order))
        return scripts

    def _finish_units(self, budgets: Sequence[str], steps: Sequence[str]) -> list[_Unit]:
        """One script per slot (one in all on a single Redis): a finish never refuses,
        so its steps go with the budgets of their slot, in any order."""
        if not self._cluster:
            return [_Unit(range(len(budgets)), range(len(steps)))]
        by_slot: dict[int, tuple[list[int], list[int]]] = {}
        for index, key in enumerate(budgets):
            by_slot.setdefault(self._slot(key), ([], []))[0].append(index)
        for index, key in enumerate(steps):
            by_slot.setdefault(self._slot(key), ([], []))[1].append(index)
        return [_Unit(*by_slot[slot]) for slot in sorted(by_slot)]

    async def settle(
        self,
        rid: str,
        keys: Sequence[str],
        cost: int,
        ttls_s: Sequence[float | None],
        *,
        keep_s: float = ENDED_KEEP_S,
    ) -> list[int]:
        return await self.finish(Finish(rid, tuple(keys), cost, tuple(ttls_s), keep_s))

    async def cancel(self, rid: str, keys: Sequence[str], *, keep_s: float = ENDED_KEEP_S) -> None:
        with _guard("cancel"):
            for script_keys, args in self._cancel_scripts(rid, keys, keep_s):
                await self._eval(CANCEL, script_keys, args)

    def _cancel_scripts(
        self, rid: str, keys: Sequence[str], keep_s: float
    ) -> list[tuple[list[str], list[Any]]]:
        """(KEYS, ARGV) of each script of a cancel: one per slot, in slot order."""
        by_slot: dict[int, list[str]] = {}
        for tag in book_groups(keys) or {SPEND_TAG: []}:
            by_slot.setdefault(self._slot(tag), []).append(tag)
        scripts: list[tuple[list[str], list[Any]]] = []
        for slot in sorted(by_slot):
            script_keys: list[str] = []
            for tag in by_slot[slot]:
                script_keys += [resv_hash(tag), resv_expiry(tag), ended_key(rid, tag)]
            scripts.append((script_keys, [rid, _ms(keep_s)]))
        return scripts

    async def write_many(self, writes: Sequence[Write]) -> list[list[int] | StoreError | None]:
        out: list[list[int] | StoreError | None] = [None] * len(writes)
        # the commands of every write, checked before any is sent: (write, script or
        # None for a ZREM, KEYS, ARGV)
        commands: list[tuple[int, str | None, list[str], list[Any]]] = []
        finishes: dict[int, list[tuple[list[str], list[Any], list[int]]]] = {}
        for index, write in enumerate(writes):
            try:
                if isinstance(write, Finish):
                    scripts = finishes[index] = self._finish_scripts(write)
                    commands += [(index, FINISH, keys, args) for keys, args, _ in scripts]
                elif isinstance(write, Cancel):
                    for keys, args in self._cancel_scripts(write.rid, write.keys, write.keep_s):
                        commands.append((index, CANCEL, keys, args))
                else:
                    commands.append((index, None, [write.key], [write.member]))
            except StoreError as exc:
                out[index] = exc
        if not commands:
            return out
        try:
            with _guard("settle"):
                replies = await self._pipelined([(s, k, a) for _, s, k, a in commands])
        except StoreError as exc:
            return [o if isinstance(o, StoreError) else exc for o in out]
        by_write: dict[int, list[Any]] = {}
        for (index, _, _, _), reply in zip(commands, replies, strict=True):
            by_write.setdefault(index, []).append(reply)
        for index, got in by_write.items():
            try:
                with _guard("settle"):
                    for reply in got:
                        if isinstance(reply, BaseException):
                            raise reply
                    planned = finishes.get(index)
                    if planned is not None:
                        out[index] = _settled(cast(Finish, writes[index]), planned, got)
            except StoreError as exc:
                out[index] = exc
        return out

    async def _pipelined(
        self, commands: Sequence[tuple[str | None, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Send ``commands`` (a script's KEYS and ARGV, or a ZREM's key and member) in
        one pipeline (one per node on Redis Cluster); every reply or the error in its
        place. Rule: a script Redis has lost is loaded and its commands sent again (a
        second round trip, after a restart or SCRIPT FLUSH only)."""
        pending = list(range(len(commands)))
        replies: list[Any] = [None] * len(commands)
        for attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            for i in pending:
                script, keys, args = commands[i]
                # Rule: sent as raw commands: redis-py's cluster pipeline refuses its
                # evalsha() helper, and routes a raw EVALSHA by its keys' slot (every
                # script here keeps to one), one write per node
                if script is None:
                    pipe.execute_command("ZREM", keys[0], *args)
                else:
                    pipe.execute_command("EVALSHA", self._sha(script), len(keys), *keys, *args)
            for i, reply in zip(pending, await pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
            lost = [i for i in pending if isinstance(replies[i], NoScriptError)]
            if not lost or attempt:
                break
            for script in {commands[i][0] for i in lost}:
                await self._client.script_load(script)
            pending = lost
        return replies

    async def heartbeat(self, owner: str, ttl_s: float, keep_s: float) -> list[str]:
        args = [check_owner(owner), _ms(ttl_s), _ms(keep_s)]
        with _guard("heartbeat"):
            dead = await self._eval(_HEARTBEAT, [HEARTBEATS, books_key(owner)], args)
            return [d.decode() if isinstance(d, bytes) else str(d) for d in dead]

    async def reap_holds(self, owner: str) -> int:
        check_owner(owner)
        total = 0
        with _guard("reap"):
            listed = await self._client.smembers(books_key(owner))
            tags = {t.decode() if isinstance(t, bytes) else str(t) for t in listed}
            for tag in sorted(tags | {SPEND_TAG}):
                keys = [resv_hash(tag), resv_expiry(tag), resv_owner_key(owner, tag)]
                for _ in range(REAP_ROUNDS):
                    reaped, left = await self._eval(REAP, keys, [REAP_BATCH])
                    total += int(reaped)
                    if int(left) == 0:
                        break
        return total

    async def close(self) -> None:
        await self._client.aclose()


@dataclass(slots=True)
class _Unit:
    """What one script of an admission or finish carries: indexes of its budgets and
    of its steps."""

    budgets: Sequence[int]
    steps: Sequence[int]


def _registry_ms(hold_s: float) -> int:
    """How long a registry of book tags lasts when filed: beyond every hold it lists,
    and the ended markers' time (heartbeats push it later while the process lives)."""
    return max(_ms(hold_s), _ms(ENDED_KEEP_S))


def _add_marker(marker: str | None, keep_s: float, keys: list[str], args: list[Any]) -> None:
    if marker is None:
        args.append(0)
    else:
        keys.append(marker)
        args += (1, _ms(keep_s))


def _add_step(
    step: Count | Ceiling | Take | Gauge | Release, keys: list[str], args: list[Any]
) -> None:
    """Append one step's KEYS and ARGV, its numbers checked (see read_steps)."""
    keys.append(step.key)
    if isinstance(step, Count):
        args += ("c", check_int64(step.amount, "amount"), _ms(step.ttl_s), limit_arg(step.limit))
        _add_marker(step.marker, step.keep_s, keys, args)
    elif isinstance(step, Ceiling):
        args += ("x", limit_arg(step.limit))
    elif isinstance(step, Take):
        args += ("t", step.member, check_int64(step.limit, "limit"), _ms(step.ttl_s))
    elif isinstance(step, Gauge):
        args += ("g", check_int64(step.amount, "amount"), _ms(step.ttl_s))
        _add_marker(step.marker, step.keep_s, keys, args)
    else:
        args += ("r", step.member)


def _admitted(
    adm: Admission,
    unit: _Unit,
    order: Sequence[int],
    out: Any,
    *,
    spends: list[int | None],
    results: list[object],
) -> Admitted:
    """Read one admission script's answer into ``spends`` and ``results`` (the whole
    admission's, indexed as it is) and say what it refused."""
    refused_budget, refused_step = int(out[0]), int(out[1])
    read, raw_results = out[2], out[3]
    if len(read) != len(order) or len(raw_results) > len(unit.steps):
        raise ValueError("one spend per budget, a result per step")
    for index, value in zip(order, read, strict=True):
        spends[index] = int(value)
    for i, raw in zip(unit.steps, raw_results, strict=False):
        results.append(_result(adm.steps[i], raw))
    return Admitted(
        order[refused_budget - 1] if refused_budget else None,
        unit.steps[refused_step - 1] if refused_step else None,
        tuple(spends),
        tuple(results),
    )


def _result(step: object, raw: Any) -> object:
    """A step's result in the shape every store gives (see :class:`Admitted`)."""
    if isinstance(step, Count):
        value, ttl_ms, added = raw
        return int(value), max(0, int(ttl_ms)) / 1000, bool(int(added))
    if isinstance(step, Take):
        ok, live, reaped = raw
        return bool(int(ok)), int(live), int(reaped)
    if isinstance(step, Release):
        return None
    return int(raw)


def _settled(
    finish: Finish, scripts: Sequence[tuple[list[str], list[Any], list[int]]], outs: Sequence[Any]
) -> list[int]:
    """Each budget's settled value from the answers of a finish's scripts."""
    settled: list[int] = [0] * len(finish.keys)
    for (_, _, order), out in zip(scripts, outs, strict=True):
        values = out[0]
        if len(values) != len(order):
            raise ValueError("one settled value per budget")
        for index, value in zip(order, values, strict=True):
            settled[index] = int(value)
    return settled


def _with_ttls(raw: Sequence[Any]) -> list[tuple[int | None, float | None]]:
    """(value, seconds to expiry or None) from a pipeline of GET, PTTL pairs."""
    out: list[tuple[int | None, float | None]] = []
    for value, ttl_ms in zip(raw[::2], raw[1::2], strict=True):
        ttl = int(ttl_ms) / 1000 if int(ttl_ms) >= 0 else None
        out.append((None if value is None else int(value), ttl))
    return out
