"""The embedded store: one process, state in a dict (settled spend journaled).

Rule: nothing outlives its expiry by much. Reads drop what they find expired, and a
sweeper evicts the rest in the background (counters, flags, lease sets, sample lists,
reservations): a timer on the running loop, armed by the first entry that can expire,
firing every ``sweep_interval_s`` while anything is left to expire, and evicting at
most ``sweep_batch`` entries per callback so it never holds the loop for long.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from extproc.state.clock import SystemClock
from extproc.store.base import (
    ENDED_KEEP_S,
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
    Step,
    StoreError,
    StoreFaultError,
    Take,
    Write,
    book_groups,
    check_amount,
    check_int64,
    check_owner,
    ended_key,
    lease_owner,
    limit_arg,
)
from extproc.store.expiry import ExpiryIndex, shrunk
from extproc.store.journal import SpendJournal

__all__ = ["MemoryStore"]

#: Seconds between sweeps while anything can expire.
SWEEP_INTERVAL_S = 1.0
#: Most entries one sweep callback evicts (about a millisecond of work); a longer
#: backlog continues in the next loop iteration.
SWEEP_BATCH = 1000
# Entry kinds in the expiry index.
_VALUE, _LIST, _LEASES, _RESERVATION, _MARKER = range(5)


@dataclass(slots=True)
class _Reservation:
    amount: int
    keys: tuple[str, ...]
    expiry: float
    #: Each key's expiry when reserved: the identity of the window the hold is in.
    windows: tuple[float, ...] = ()
    #: The process that took it (None: nobody reaps it, it only expires).
    owner: str | None = None


def _check_step(step: Step | Release) -> None:
    """A step's numbers are in range (as Redis checks them before sending)."""
    if isinstance(step, Count):
        check_int64(step.amount, "amount")
        limit_arg(step.limit)
    elif isinstance(step, Ceiling):
        limit_arg(step.limit)
    elif isinstance(step, Take):
        check_int64(step.limit, "limit")
    elif isinstance(step, Gauge):
        check_int64(step.amount, "amount")


#: Beside a count's marker: the count has been taken back (see ``uncount``).
_UNDONE = "#undone"


def _ms_left(until: float, now: float) -> float:
    """Seconds left until ``until``, in whole milliseconds as Redis's PTTL reports them
    (and never more than the TTL: in floats, ``(now + ttl) - now`` can exceed ``ttl``)."""
    return math.floor((until - now) * 1000) / 1000


class MemoryStore:
    """In-process counters with expiry; ``clock`` is injectable for tests.

    With a ``journal`` path, settled spend survives a restart (see ``journal``).
    """

    name = "memory"

    def __init__(
        self,
        clock: Callable[[], float] | None = None,
        journal: Path | None = None,
        *,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
        sweep_batch: int = SWEEP_BATCH,
        wall: Callable[[], float] | None = None,
    ) -> None:
        system = SystemClock()
        #: Monotonic seconds (expiry) and Unix time (the journal's expiries).
        self._clock = clock or system.monotonic
        self._wall = wall or system.wall
        self._values: dict[str, tuple[int, float]] = {}
        self._leases: dict[str, dict[str, float]] = {}
        #: The ended marker of (reservation id, book tag) → that book's hold: one
        #: entry per slot book, as in Redis.
        self._reservations: dict[str, _Reservation] = {}
        #: Budget keys whose settled spend is journaled (what a compaction keeps).
        self._journaled: set[str] = set()
        #: (key, window) → the sum of the open holds taken in that window of the key.
        self._holds: dict[tuple[str, float], int] = {}
        self._lists: dict[str, tuple[list[float], float]] = {}
        #: Process id → when its heartbeat runs out (one process here: the contract).
        self._beats: dict[str, float] = {}
        #: Marker key → its expiry: ended reservation ids, increments applied once.
        self._markers: dict[str, float] = {}
        self._expiry = ExpiryIndex(5)
        self._sweep_interval_s = sweep_interval_s
        self._sweep_batch = sweep_batch
        self._sweeper: asyncio.Handle | None = None
        self._sweeper_loop: asyncio.AbstractEventLoop | None = None
        self._peaks = [0, 0, 0, 0, 0]
        self._journal = SpendJournal(journal, self._wall) if journal is not None else None
        if self._journal is not None:
            self._replay(self._journal)

    def _replay(self, journal: SpendJournal) -> None:
        wall, now = self._wall(), self._clock()
        for key, amount, expiry in journal.replay():
            if expiry is not None and expiry <= wall:
                continue
            ttl = math.inf if expiry is None else expiry - wall
            self._add(key, amount, ttl, now)
            self._journaled.add(key)

    def _add(self, key: str, amount: int, ttl_s: float, now: float) -> int:
        entry = self._live(key, now)
        if entry is None:
            entry = (amount, now + ttl_s)
            self._expire(_VALUE, key, entry[1])
        else:
            entry = (entry[0] + amount, entry[1])
        self._values[key] = entry
        return entry[0]

    def entry_count(self) -> int:
        """Entries held now, expired ones not yet evicted included (tests, metrics)."""
        return (
            len(self._values)
            + len(self._lists)
            + len(self._leases)
            + len(self._reservations)
            + len(self._markers)
        )

    def _expire(self, kind: int, key: str, expiry: float) -> None:
        """Index an entry's expiry; arms the sweeper when it is not running."""
        self._expiry.schedule(kind, key, expiry)
        if len(self._expiry) and (
            self._sweeper is None or self._sweeper_loop is None or self._sweeper_loop.is_closed()
        ):
            self._arm(self._sweep_interval_s)

    def _arm(self, delay_s: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # no loop yet (built before the server starts): the next write arms it
            self._sweeper = None
            return
        self._sweeper_loop = loop
        if delay_s > 0:
            self._sweeper = loop.call_later(delay_s, self._sweep)
        else:
            self._sweeper = loop.call_soon(self._sweep)

    def _sweep(self) -> None:
        """Evict what has expired (a bounded batch), then arm the next sweep."""
        more = False
        try:
            sizes = (
                len(self._values),
                len(self._lists),
                len(self._leases),
                len(self._reservations),
                len(self._markers),
            )
            self._peaks = [max(peak, n) for peak, n in zip(self._peaks, sizes, strict=True)]
            now = self._clock()
            due, more = self._expiry.pop_due(now, self._sweep_batch)
            for kind, key in due:
                self._evict(kind, key, now)
            if not more:
                self._shrink()
        finally:
            # Rule: one timer at a time (``_expire`` saw this one running and armed none),
            # and a failed sweep still arms the next.
            self._sweeper = None
            if more:
                self._arm(0)
            elif len(self._expiry):
                self._arm(self._sweep_interval_s)

    def _evict(self, kind: int, key: str, now: float) -> None:
        """Drop ``key`` if it has expired, else schedule it again at its real expiry."""
        expiry = math.inf
        if kind == _VALUE:
            entry = self._values.get(key)
            if entry is not None and entry[1] <= now:
                del self._values[key]
                self._journaled.discard(key)
            elif entry is not None:
                expiry = entry[1]
        elif kind == _LIST:
            listed = self._lists.get(key)
            if listed is not None and listed[1] <= now:
                del self._lists[key]
            elif listed is not None:
                expiry = listed[1]
        elif kind == _LEASES:
            leases = self._leases.get(key)
            if leases is not None:
                for name in [m for m, until in leases.items() if until <= now]:
                    del leases[name]
                if leases:
                    expiry = min(leases.values())
                else:
                    del self._leases[key]
        elif kind == _MARKER:
            until = self._markers.get(key)
            if until is not None and until <= now:
                del self._markers[key]
            elif until is not None:
                expiry = until
        else:
            res = self._reservations.get(key)
            if res is not None and res.expiry <= now:
                self._drop(key, now)  # an expired hold is given back, as reserve() would
            elif res is not None:
                expiry = res.expiry
        if not math.isinf(expiry):
            self._expire(kind, key, expiry)

    def _shrink(self) -> None:
        """Copy the tables that shrank far below their peak, so their memory goes back."""
        peaks = self._peaks
        self._values, peaks[0] = shrunk(self._values, peaks[0])
        self._lists, peaks[1] = shrunk(self._lists, peaks[1])
        self._leases, peaks[2] = shrunk(self._leases, peaks[2])
        self._reservations, peaks[3] = shrunk(self._reservations, peaks[3])
        self._markers, peaks[4] = shrunk(self._markers, peaks[4])
        self._expiry.shrink()

    def _wall_expiry(self, key: str, now: float) -> float | None:
        expiry = self._values[key][1]
        return None if math.isinf(expiry) else self._wall() + (expiry - now)

    @property
    def journal_path(self) -> Path | None:
        """Where settled spend is journaled (None: nowhere, it dies with the process)."""
        return self._journal.path if self._journal is not None else None

    async def ping(self) -> None:
        return None

    def _live(self, key: str, now: float) -> tuple[int, float] | None:
        entry = self._values.get(key)
        if entry is not None and entry[1] <= now:
            del self._values[key]
            self._journaled.discard(key)
            return None
        return entry

    async def incr(self, key: str, amount: int, ttl_s: float) -> int:
        return (await self.incr_window(key, amount, ttl_s))[0]

    async def incr_window(self, key: str, amount: int, ttl_s: float) -> tuple[int, float]:
        now = self._clock()
        value = self._add(key, check_int64(amount, "amount"), ttl_s, now)
        return value, _ms_left(self._values[key][1], now)

    def _marked(self, marker: str, now: float) -> bool:
        until = self._markers.get(marker)
        if until is not None and until <= now:
            del self._markers[marker]
            return False
        return until is not None

    def _mark(self, marker: str, keep_s: float, now: float) -> None:
        self._markers[marker] = now + keep_s
        self._expire(_MARKER, marker, now + keep_s)

    async def incr_once(
        self, key: str, amount: int, ttl_s: float, *, marker: str, keep_s: float = ENDED_KEEP_S
    ) -> tuple[int, float, bool]:
        check_int64(amount, "amount")
        now = self._clock()
        if self._marked(marker, now):
            entry = self._live(key, now)
            return (0, 0.0, False) if entry is None else (entry[0], entry[1] - now, False)
        value = self._add(key, amount, ttl_s, now)
        self._mark(marker, keep_s, now)
        return value, self._values[key][1] - now, True

    async def uncount(self, key: str, amount: int, *, marker: str, keep_s: float) -> bool:
        check_int64(amount, "amount")
        now = self._clock()
        undone = marker + _UNDONE
        if self._marked(undone, now):
            return True  # taken back already: a retry changes nothing
        applied = self._marked(marker, now)
        entry = self._live(key, now)
        if applied and entry is not None:
            self._values[key] = (max(0, entry[0] - amount), entry[1])
        self._mark(marker, keep_s, now)
        self._mark(undone, keep_s, now)
        return applied

    async def get_many(self, keys: Sequence[str]) -> list[int | None]:
        now = self._clock()
        out: list[int | None] = []
        for key in keys:
            entry = self._live(key, now)
            out.append(None if entry is None else entry[0])
        return out

    async def acquire_lease(
        self,
        key: str,
        member: str,
        limit: int,
        ttl_s: float,
        *,
        dead_owners: Sequence[str] = (),
    ) -> tuple[bool, int, int]:
        return self._acquire(Take(key, member, limit, ttl_s), set(dead_owners), self._clock())

    def _acquire(self, take: Take, dead: set[str], now: float) -> tuple[bool, int, int]:
        key, member, limit, ttl_s = take.key, take.member, take.limit, take.ttl_s
        leases = self._leases.setdefault(key, {})
        for name in [m for m, expiry in leases.items() if expiry <= now]:
            del leases[name]
        reaped = 0
        if len(leases) >= limit and dead:
            for name in [m for m in leases if lease_owner(m) in dead]:
                del leases[name]
                reaped += 1
        if len(leases) >= limit:
            return False, len(leases), reaped
        leases[member] = now + ttl_s
        self._expire(_LEASES, key, now + ttl_s)
        return True, len(leases), reaped

    async def release_lease(self, key: str, member: str) -> None:
        self._release(key, member)

    def _release(self, key: str, member: str) -> None:
        leases = self._leases.get(key)
        if leases is not None:
            leases.pop(member, None)
            if not leases:
                del self._leases[key]

    async def incr_many(
        self, items: Sequence[tuple[str, int]], ttl_s: float, *, refresh_ttl: bool = False
    ) -> list[int]:
        now = self._clock()
        out = []
        for key, amount in items:
            if refresh_ttl:
                out.append(self._gauge(key, check_int64(amount, "amount"), ttl_s, now))
                continue
            value = max(0, self._add(key, check_int64(amount, "amount"), ttl_s, now))
            self._values[key] = (value, self._values[key][1])
            out.append(value)
        return out

    def _gauge(self, key: str, amount: int, ttl_s: float, now: float) -> int:
        """Add to a counter that lives while it is used (TTL refreshed), never below 0."""
        value = max(0, self._add(key, amount, ttl_s, now))
        self._values[key] = (value, now + ttl_s)
        self._expire(_VALUE, key, now + ttl_s)
        return value

    async def set_flag(self, key: str, ttl_s: float) -> None:
        expiry = self._clock() + ttl_s
        self._values[key] = (1, expiry)
        self._expire(_VALUE, key, expiry)

    async def push_sample(self, key: str, value: float, keep: int, ttl_s: float) -> None:
        now = self._clock()
        samples = self._live_list(key, now)
        self._lists[key] = ([value, *samples][:keep], now + ttl_s)
        self._expire(_LIST, key, now + ttl_s)

    def _live_list(self, key: str, now: float) -> list[float]:
        entry = self._lists.get(key)
        if entry is None or entry[1] <= now:
            self._lists.pop(key, None)
            return []
        return entry[0]

    async def snapshot(
        self, keys: Sequence[str], lists: Sequence[str]
    ) -> tuple[list[tuple[int | None, float | None]], list[list[float]]]:
        now = self._clock()
        values = await self.get_many_with_ttl(keys)
        return values, [list(self._live_list(key, now)) for key in lists]

    async def get_many_with_ttl(self, keys: Sequence[str]) -> list[tuple[int | None, float | None]]:
        now = self._clock()
        out: list[tuple[int | None, float | None]] = []
        for key in keys:
            entry = self._live(key, now)
            if entry is None:
                out.append((None, None))
            else:
                out.append((entry[0], None if math.isinf(entry[1]) else entry[1] - now))
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
        owner: str | None = None,
    ) -> tuple[int | None, list[int]]:
        budgets = tuple(
            Budget(key, limit, ttl) for key, limit, ttl in zip(keys, limits, ttls_s, strict=True)
        )
        if owner is not None:
            check_owner(owner)
        out = self._admit(Admission(rid, owner or "", amount, hold_s, budgets, ()), owner)
        return out.refused_budget, [s or 0 for s in out.spends]

    async def admit(self, admission: Admission) -> Admitted:
        return self._admit(admission, check_owner(admission.owner))

    def _admit(self, adm: Admission, owner: str | None) -> Admitted:
        """:meth:`admit` in one step of the loop (so atomic); ``owner`` None: a hold
        nobody reaps."""
        amount = check_amount(adm.amount)
        bounds = [limit_arg(b.limit) for b in adm.budgets]  # same range rules as Redis
        for step in adm.steps:
            _check_step(step)
        dead = {check_owner(o) for o in adm.dead_owners}
        now = self._clock()
        keys = [b.key for b in adm.budgets]
        books = book_groups(keys)
        for tag in books:
            if ended_key(adm.rid, tag) in self._reservations or self._marked(
                ended_key(adm.rid, tag), now
            ):
                raise StoreFaultError("reservation id already used")
        if books:
            for expired in [r for r, res in self._reservations.items() if res.expiry <= now]:
                self._drop(expired, now)
        spends = [(self._live(key, now) or (0, 0.0))[0] for key in keys]
        for index, (spent, limit) in enumerate(zip(spends, bounds, strict=True)):
            if limit >= 0 and spent >= limit:
                return Admitted(index, None, tuple(spends), ())
        for budget in adm.budgets:
            self._add(budget.key, amount, math.inf if budget.ttl_s is None else budget.ttl_s, now)
        for tag, indexes in books.items():
            held = tuple(keys[i] for i in indexes)
            windows = tuple(self._values[key][1] for key in held)
            book = ended_key(adm.rid, tag)
            self._reservations[book] = _Reservation(amount, held, now + adm.hold_s, windows, owner)
            for slot in zip(held, windows, strict=True):
                self._holds[slot] = self._holds.get(slot, 0) + amount
            self._expire(_RESERVATION, book, now + adm.hold_s)
        results: list[object] = []
        taken: list[Take] = []
        for index, step in enumerate(adm.steps):
            result, refused = self._step(step, dead, now)
            results.append(result)
            if refused:
                for tag in books:
                    self._drop(ended_key(adm.rid, tag), now)
                    self._mark(ended_key(adm.rid, tag), adm.keep_s, now)
                for take in taken:
                    self._release(take.key, take.member)
                return Admitted(None, index, tuple(spends), tuple(results))
            if isinstance(step, Take):
                taken.append(step)
        return Admitted(None, None, tuple(spends), tuple(results))

    def _step(self, step: Step | Release, dead: set[str], now: float) -> tuple[object, bool]:
        """Run one step: (its result, whether it refused)."""
        if isinstance(step, Count):
            limit = limit_arg(step.limit)
            if step.marker is not None and self._marked(step.marker, now):
                entry = self._live(step.key, now)
                value, left = (0, 0.0) if entry is None else (entry[0], entry[1] - now)
                return (value, left, False), 0 <= limit < value
            value = self._add(step.key, step.amount, step.ttl_s, now)
            if step.marker is not None:
                self._mark(step.marker, step.keep_s, now)
            return (value, _ms_left(self._values[step.key][1], now), True), 0 <= limit < value
        if isinstance(step, Ceiling):
            value = (self._live(step.key, now) or (0, 0.0))[0]
            return value, value >= step.limit
        if isinstance(step, Take):
            got = self._acquire(step, dead, now)
            return got, not got[0]
        if isinstance(step, Gauge):
            if step.marker is not None and self._marked(step.marker, now):
                return (self._live(step.key, now) or (0, 0.0))[0], False
            value = self._gauge(step.key, step.amount, step.ttl_s, now)
            if step.marker is not None:
                self._mark(step.marker, step.keep_s, now)
            return value, False
        self._release(step.key, step.member)
        return None, False

    def _forget_holds(self, res: _Reservation) -> None:
        """``res`` is no longer open: its windows hold less (rolled-over ones too)."""
        for slot in zip(res.keys, res.windows, strict=True):
            left = self._holds.get(slot, 0) - res.amount
            if left > 0:
                self._holds[slot] = left
            else:
                self._holds.pop(slot, None)

    def _settled(self, key: str, now: float) -> int:
        entry = self._live(key, now)
        if entry is None:
            return 0
        return max(0, entry[0] - self._holds.get((key, entry[1]), 0))

    def _held(self, res: _Reservation | None, key: str, now: float) -> bool:
        """Whether ``res`` holds an amount in ``key``'s current window (not one that has
        rolled over since: a new window never held it)."""
        if res is None or key not in res.keys:
            return False
        entry = self._live(key, now)
        return entry is not None and entry[1] == res.windows[res.keys.index(key)]

    def _drop(self, book: str, now: float) -> bool:
        res = self._reservations.pop(book, None)
        if res is None:
            return False
        self._expiry.unschedule(_RESERVATION, book)
        self._forget_holds(res)
        for key in res.keys:
            if self._held(res, key, now):
                value, expiry = self._values[key]
                self._values[key] = (max(0, value - res.amount), expiry)
        return True

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

    async def finish(self, finish: Finish) -> list[int]:
        check_amount(finish.cost, "cost")
        if len(finish.ttls_s) != len(finish.keys):
            raise StoreFaultError("one ttl per budget key")
        for step in finish.steps:
            _check_step(step)
        now = self._clock()
        cost, keys = finish.cost, finish.keys
        for tag, indexes in book_groups(keys).items():
            marker = ended_key(finish.rid, tag)
            if self._marked(marker, now):
                continue  # settled already in this book: a retry
            self._mark(marker, finish.keep_s, now)
            res = self._reservations.pop(marker, None)
            held = res.amount if res is not None else 0
            if res is not None:
                self._expiry.unschedule(_RESERVATION, marker)
                self._forget_holds(res)
            for i in indexes:
                key, ttl = keys[i], finish.ttls_s[i]
                if self._held(res, key, now):
                    self._values[key] = (
                        max(0, self._values[key][0] + cost - held),
                        self._values[key][1],
                    )
                else:
                    self._add(key, cost, math.inf if ttl is None else ttl, now)
                self._journaled.add(key)
                if self._journal is not None and cost:
                    self._journal.record(key, cost, self._wall_expiry(key, now))
        settled = [self._settled(key, now) for key in keys]
        for step in finish.steps:
            self._step(step, set(), now)
        return settled

    async def cancel(self, rid: str, keys: Sequence[str], *, keep_s: float = ENDED_KEEP_S) -> None:
        now = self._clock()
        for tag in book_groups(keys) or {SPEND_TAG: []}:
            marker = ended_key(rid, tag)
            if self._marked(marker, now):
                continue
            self._drop(marker, now)
            self._mark(marker, keep_s, now)

    async def write_many(self, writes: Sequence[Write]) -> list[list[int] | StoreError | None]:
        """Each write in turn (nothing to save here: no round trips)."""
        out: list[list[int] | StoreError | None] = []
        for write in writes:
            try:
                if isinstance(write, Finish):
                    out.append(await self.finish(write))
                elif isinstance(write, Cancel):
                    await self.cancel(write.rid, write.keys, keep_s=write.keep_s)
                    out.append(None)
                else:
                    await self.release_lease(write.key, write.member)
                    out.append(None)
            except StoreError as exc:
                out.append(exc)
        return out

    async def heartbeat(self, owner: str, ttl_s: float, keep_s: float) -> list[str]:
        check_owner(owner)
        now = self._clock()
        self._beats[owner] = now + ttl_s
        for gone in [o for o, until in self._beats.items() if until + keep_s <= now]:
            del self._beats[gone]
        return sorted(o for o, until in self._beats.items() if until <= now)

    async def reap_holds(self, owner: str) -> int:
        check_owner(owner)
        now = self._clock()
        mine = [book for book, res in self._reservations.items() if res.owner == owner]
        return sum(self._drop(book, now) for book in mine)

    async def close(self) -> None:
        if self._journal is not None:
            now = self._clock()
            # Rule: only holds of a key's current window are in its value (a window
            # that rolled over since a hold was taken never held it).
            self._journal.compact(
                (key, self._settled(key, now), self._wall_expiry(key, now))
                for key in list(self._journaled)
                if self._live(key, now) is not None
            )
            self._journal.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._values.clear()
        self._leases.clear()
        self._reservations.clear()
        self._holds.clear()
        self._journaled.clear()
        self._beats.clear()
        self._markers.clear()
        self._lists.clear()
        self._expiry.clear()
