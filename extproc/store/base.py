"""The store interface the core's adapters use."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from extproc.store.keys import SPEND, key_tag, store_key, tagged_key

__all__ = [
    "ENDED_KEEP_S",
    "HEARTBEATS",
    "HELD_PREFIX",
    "INT64_MAX",
    "MAX_AMOUNT_MICROS",
    "OWNER_CHARS",
    "OWNER_ID",
    "RESV_EXPIRY",
    "RESV_HASH",
    "SPEND_TAG",
    "Admission",
    "Admitted",
    "Budget",
    "Cancel",
    "Ceiling",
    "Count",
    "Finish",
    "Gauge",
    "Release",
    "Step",
    "Store",
    "StoreError",
    "StoreFaultError",
    "StoreTools",
    "StoreUnavailableError",
    "Take",
    "Write",
    "book_groups",
    "book_tag",
    "books_key",
    "check_amount",
    "check_int64",
    "check_owner",
    "ended_key",
    "held_key",
    "lease_owner",
    "limit_arg",
    "resv_expiry",
    "resv_hash",
    "resv_owner_key",
]

#: The hash tag of budget keys that carry none of their own (and of the reservation
#: book they use). A budget key may carry any tag: the reservation book of a hold
#: lives in the slot of its budget keys (see :func:`book_tag`).
SPEND_TAG = store_key(SPEND)
RESV_HASH = store_key(SPEND, "reservations")
RESV_EXPIRY = store_key(SPEND, "reservations", "expiry")
#: Prefixes a ``{spend}`` budget key to name the sum of its open holds (see
#: :func:`held_key`).
HELD_PREFIX = f"{SPEND_TAG}#held|"


@functools.lru_cache(maxsize=4096)
def book_tag(key: str) -> str:
    """The hash tag (``{...}``) of the reservation book that holds against ``key``:
    the key's own tag, so the book is in the key's slot; :data:`SPEND_TAG` for a key
    without one. Rule: the Lua scripts derive the same tag the same way."""
    return key_tag(key) or SPEND_TAG


def book_groups(keys: Sequence[str]) -> dict[str, list[int]]:
    """Book tag → the indexes of ``keys`` held in that book, in order of first use."""
    books: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        books.setdefault(book_tag(key), []).append(index)
    return books


@functools.lru_cache(maxsize=1024)
def resv_hash(tag: str) -> str:
    """The reservation book of slot ``tag``: reservation id → its entry."""
    return tagged_key(tag, "reservations")


@functools.lru_cache(maxsize=1024)
def resv_expiry(tag: str) -> str:
    """When each reservation of the book of ``tag`` runs out (a sorted set)."""
    return tagged_key(tag, "reservations", "expiry")


def held_key(key: str) -> str:
    """The sum of the open holds on budget ``key`` (Redis, where the scripts derive
    it): ``#`` never follows a tag in a key :func:`store_key` builds, so no key can
    alias it, and the prefix's tag (the key's book tag) keeps it in the key's slot."""
    return f"{book_tag(key)}#held|{key}"


#: Every server process's heartbeat: a sorted set of process ids scored by when their
#: heartbeat runs out. One key, so a peer learns which processes died without knowing
#: their ids beforehand (one slot on Redis Cluster, apart from what they owned).
HEARTBEATS = store_key(("proc",), "heartbeats")
#: A process id: random per process start (never a pid, which a restart reuses), this
#: many lowercase hex digits.
OWNER_CHARS = 16
OWNER_ID = re.compile(f"[0-9a-f]{{{OWNER_CHARS}}}")


#: How long a settled or cancelled reservation id stays marked as ended (and an
#: increment with a marker stays marked as applied). Rule: longer than a write the
#: store did not acknowledge can take to be retried once the store answers again, so
#: a retry never charges twice (see ``extproc/state/owed.py``).
ENDED_KEEP_S = 900.0


def ended_key(rid: str, tag: str = SPEND_TAG) -> str:
    """The marker that reservation ``rid`` has been settled or cancelled in the book of
    ``tag`` (its slot, beside the book): a retry of either is a no-op, and a reserve
    for that id that runs late (a script the client gave up on) changes nothing.
    Rule: one marker per slot book, so each slot of a reservation ends on its own."""
    return tagged_key(tag, "ended", rid)


#: The largest amount one reservation or settlement moves: $1,000,000 in micro-dollars.
#: Rule: far below 2**53, so Lua (whose numbers are doubles) keeps every sum of a few
#: thousand of them exact, and far inside int64.
MAX_AMOUNT_MICROS = 10**12
#: Limits are sent as at most this (2**53 - 1 micro-dollars, $9 billion): exact in Lua.
_LIMIT_CEILING = 2**53 - 1
INT64_MAX = 2**63 - 1


class StoreError(Exception):
    """The store failed; handled at the gRPC boundary. Raised as one of two kinds."""


class StoreUnavailableError(StoreError):
    """The store could not be reached: connection refused or reset, a timeout, the
    cluster down. Only this kind goes to the fail mode (``EXTPROC_FAIL_MODE``)."""


class StoreFaultError(StoreError):
    """The store was reached and answered with an error (a script error, a key of the
    wrong type), its answer made no sense, or the call was refused before it was sent
    (a number out of range: a bug). Rule: never the fail-open path, so no request can
    make itself admitted for free; the request path refuses the call instead."""


def check_int64(value: int, what: str) -> int:
    """``value`` if it is an integer inside int64, else a :class:`StoreFaultError`."""
    if not isinstance(value, int) or isinstance(value, bool) or abs(value) > INT64_MAX:
        raise StoreFaultError(f"{what} out of range: {str(value)[:32]}")
    return value


def check_amount(value: int, what: str = "amount") -> int:
    """A reservation or settlement amount: an integer in ``[0, MAX_AMOUNT_MICROS]``."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_AMOUNT_MICROS:
        raise StoreFaultError(f"{what} out of range: {str(value)[:32]}")
    return value


def check_owner(owner: str) -> str:
    """A process id (:data:`OWNER_ID`), else a :class:`StoreFaultError`."""
    if not isinstance(owner, str) or not OWNER_ID.fullmatch(owner):
        raise StoreFaultError(f"not a process id: {str(owner)[:32]!r}")
    return owner


def lease_owner(member: str) -> str:
    """The process that took a lease. Rule: a lease member starts with its owner's id,
    so whoever releases it (any process, from Envoy's log) needs nothing else."""
    return member[:OWNER_CHARS]


def resv_owner_key(owner: str, tag: str = SPEND_TAG) -> str:
    """The set of a process's open reservation ids in the book of ``tag`` (its slot)."""
    return tagged_key(tag, "reservations", "owner", check_owner(owner))


def books_key(owner: str) -> str:
    """The book tags a process has held in (a set, ``{proc}`` slot): what a reaper of
    that process goes through. Rule: a process adds a tag before its first hold there."""
    return store_key(("proc",), "books", check_owner(owner))


def limit_arg(limit: int | None) -> int:
    """A budget limit as a script argument: -1 for none, at most ``_LIMIT_CEILING``."""
    if limit is None:
        return -1
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise StoreFaultError(f"limit out of range: {str(limit)[:32]}")
    return min(limit, _LIMIT_CEILING)


@dataclass(frozen=True, slots=True)
class Budget:
    """A budget counter an admission holds its ``amount`` against (``ttl_s`` None:
    the counter never expires; ``limit`` None: none)."""

    key: str
    limit: int | None
    ttl_s: float | None


@dataclass(frozen=True, slots=True)
class Count:
    """Add ``amount`` to ``key`` (its TTL set when created): :meth:`Store.incr_window`,
    or :meth:`Store.incr_once` with a ``marker`` (a key in ``key``'s slot). Refuses when
    ``limit`` is set and the new value passes it; the addition stays (a count of every
    attempt, compared after). Result: (value, seconds left, whether this call added)."""

    key: str
    amount: int
    ttl_s: float
    limit: int | None = None
    marker: str | None = None
    keep_s: float = ENDED_KEEP_S


@dataclass(frozen=True, slots=True)
class Ceiling:
    """Read the counter ``key``; refuses when its value has reached ``limit``. Writes
    nothing. Result: the value."""

    key: str
    limit: int


@dataclass(frozen=True, slots=True)
class Take:
    """Take a lease (:meth:`Store.acquire_lease`, the admission's dead owners dropped
    first when full); refuses when the set is full. Result: (acquired, live, reaped)."""

    key: str
    member: str
    limit: int
    ttl_s: float


@dataclass(frozen=True, slots=True)
class Gauge:
    """Add ``amount`` to ``key``, never below 0, its TTL refreshed (a count of what is
    in flight: :meth:`Store.incr_many` with ``refresh_ttl``). With a ``marker`` it is
    applied once (a retried :class:`Finish`). Never refuses. Result: the value."""

    key: str
    amount: int
    ttl_s: float
    marker: str | None = None
    keep_s: float = ENDED_KEEP_S


@dataclass(frozen=True, slots=True)
class Release:
    """Give a lease back (:meth:`Store.release_lease`); idempotent. Result: None."""

    key: str
    member: str


Step = Count | Ceiling | Take | Gauge


@dataclass(frozen=True, slots=True)
class Admission:
    """What admitting one call checks and writes (see :meth:`Store.admit`)."""

    rid: str
    owner: str
    amount: int
    hold_s: float
    budgets: tuple[Budget, ...]
    steps: tuple[Step, ...]
    dead_owners: tuple[str, ...] = ()
    #: How long the id stays marked ended when a step refuses (its hold given back).
    keep_s: float = ENDED_KEEP_S


@dataclass(frozen=True, slots=True)
class Admitted:
    """The outcome of :meth:`Store.admit`: admitted when both refusals are None.

    ``spends``: each budget's value before the call (None where it was not read);
    ``results``: one per step that ran (the refusing one included), in order."""

    refused_budget: int | None
    refused_step: int | None
    spends: tuple[int | None, ...]
    results: tuple[object, ...]
    #: False when a refusal's hand-back of what other slots took could not be sent
    #: (Redis Cluster): the caller then owes ``cancel(rid, keys)`` and the lease.
    handed_back: bool = True

    @property
    def admitted(self) -> bool:
        return self.refused_budget is None and self.refused_step is None


@dataclass(frozen=True, slots=True)
class Finish:
    """What finishing one call writes (see :meth:`Store.finish`)."""

    rid: str
    keys: tuple[str, ...]
    cost: int
    ttls_s: tuple[float | None, ...]
    keep_s: float
    steps: tuple[Count | Gauge | Release, ...] = ()


@dataclass(frozen=True, slots=True)
class Cancel:
    """Give reservation ``rid`` back in the books of ``keys`` (see :meth:`Store.cancel`)."""

    rid: str
    keys: tuple[str, ...]
    keep_s: float = ENDED_KEEP_S


#: What ends a call: settled (:class:`Finish`), given back (:class:`Cancel`), its lease
#: released (:class:`Release`). Several calls' go out together (:meth:`Store.write_many`).
Write = Finish | Cancel | Release


class Store(Protocol):
    """The primitives every server process uses to share state: read a batch of keys
    (:meth:`snapshot`), admit a call (:meth:`admit`: its checks and effects in one
    batch), settle it (:meth:`finish`), give back (:meth:`cancel`, :meth:`release_lease`,
    :meth:`uncount`), end several calls at once (:meth:`write_many`), record deployment
    health (:meth:`incr_many`, :meth:`set_flag`, :meth:`push_sample`) and liveness
    (:meth:`heartbeat`, :meth:`reap_holds`).

    Rule: the request path and the runtime use only these; the per-feature helpers
    both stores also have (:class:`StoreTools`) are for read-outs kept in the store
    module, for seeding state and for tests."""

    @property
    def name(self) -> str: ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailableError` unless the store answers."""
        ...

    async def uncount(self, key: str, amount: int, *, marker: str, keep_s: float) -> bool:
        """Take back an increment of ``key`` made with ``marker`` (a :class:`Count` of an
        admission whose answer was lost), if it was made: ``amount`` off, never below 0;
        returns whether it was. Rule: the marker is set either way (for ``keep_s``), so
        the increment, should its script run later, adds nothing."""
        ...

    async def release_lease(self, key: str, member: str) -> None:
        """Drop ``member`` from ``key`` (no-op when it is gone already)."""
        ...

    async def cancel(self, rid: str, keys: Sequence[str], *, keep_s: float = ENDED_KEEP_S) -> None:
        """Give reservation ``rid`` back in the books of ``keys`` (the budget keys it
        was made with: their slots; none means the ``{spend}`` book) and mark it ended
        there for ``keep_s``. Rule: per slot, a no-op where ended already; an id never
        reserved there is only marked, so a reserve of it that runs late is refused."""
        ...

    async def admit(self, admission: Admission) -> Admitted:
        """Check and apply everything admitting one call needs, as if in this order:

        1. Every budget is checked (its value, open holds included, has reached its
           limit: ``refused_budget``, nothing written; what another slot took is
           handed back); if none refuses, ``amount`` is held against all of them under
           ``rid`` as :meth:`reserve` would (no budgets: no hold, no book touched).
        2. The steps in order. The first that refuses stops: ``refused_step``; the
           hold is given back (as :meth:`cancel`: the id ends) and a lease taken by
           an earlier step released. Counts applied stay applied.

        Rule: one script per hash slot touched (one in all on a single Redis): a slot
        of budgets only first, in a fixed order, then the slot of the steps with its
        own budgets. Amounts and limits are checked before anything is sent. An
        unknown outcome is a :class:`StoreUnavailableError`: the caller then owes
        ``cancel(rid, keys)``, which is safe whatever ran."""
        ...

    async def finish(self, finish: Finish) -> list[int]:
        """:meth:`settle` and then the steps (a tpm count with a marker, a lease
        released, the in-flight gauge down), one script per slot. Returns the settled
        values. Rule: a retry changes nothing: the settlement ends the id, counts and
        gauges with markers are applied once, a release is idempotent (a gauge without
        a marker is applied again, so a retry passes one or leaves it out)."""
        ...

    async def write_many(self, writes: Sequence[Write]) -> list[list[int] | StoreError | None]:
        """Several calls' :class:`Write` at once, each as :meth:`finish`, :meth:`cancel`
        or :meth:`release_lease` would apply it; one outcome per write, in order: the
        settled values of a finish, None for a cancel or a release, or the
        :class:`StoreError` that write met (a batch that could not be sent is every
        write's). Rule: one round trip per node (a pipeline on Redis); one write's
        error never fails another, and each is as idempotent as alone."""
        ...

    async def heartbeat(self, owner: str, ttl_s: float, keep_s: float) -> list[str]:
        """Mark process ``owner`` alive for ``ttl_s``; returns the processes whose
        heartbeat has run out (in the last ``keep_s``; older ones are forgotten)."""
        ...

    async def reap_holds(self, owner: str) -> int:
        """Give back every open reservation of process ``owner`` exactly as
        :meth:`cancel` would, in every book it filed a tag of (:func:`books_key`);
        returns how many book entries (a reservation holds one per slot). Rule:
        idempotent, and safe while other processes reap the same owner (each hold is
        given back once)."""
        ...

    async def incr_many(
        self, items: Sequence[tuple[str, int]], ttl_s: float, *, refresh_ttl: bool = False
    ) -> list[int]:
        """Add to several counters of one slot (one hash tag), never below zero.

        The TTL is set when a counter is created, or on every call with
        ``refresh_ttl`` (a counter that lives while it is used).
        """
        ...

    async def set_flag(self, key: str, ttl_s: float) -> None:
        """Set ``key`` to 1 for ``ttl_s`` seconds (a cooldown)."""
        ...

    async def push_sample(self, key: str, value: float, keep: int, ttl_s: float) -> None:
        """Prepend ``value`` to the list ``key``, keeping the newest ``keep``."""
        ...

    async def snapshot(
        self, keys: Sequence[str], lists: Sequence[str]
    ) -> tuple[list[tuple[int | None, float | None]], list[list[float]]]:
        """In one round trip: (value, seconds to expiry) of each key, and each list."""
        ...

    async def close(self) -> None: ...


class StoreTools(Store, Protocol):
    """The per-feature helpers both stores keep beside the primitives (the contract
    tests and tools read and seed state through them; :meth:`reserve` and
    :meth:`settle` run through :meth:`Store.admit` and :meth:`Store.finish`)."""

    async def incr(self, key: str, amount: int, ttl_s: float) -> int:
        """Add ``amount`` to ``key`` and return the new value.

        Rule: the TTL is set only when the increment creates the key, so the window is
        fixed from the first increment.
        """
        ...

    async def incr_window(self, key: str, amount: int, ttl_s: float) -> tuple[int, float]:
        """Like :meth:`incr`, also returning the seconds left before the key expires."""
        ...

    async def incr_once(
        self, key: str, amount: int, ttl_s: float, *, marker: str, keep_s: float = ENDED_KEEP_S
    ) -> tuple[int, float, bool]:
        """:meth:`incr_window` unless ``marker`` (a key in ``key``'s slot, see
        :func:`extproc.store.keys.marker_key`) is set; sets it for ``keep_s``. Returns
        (value, seconds left, whether this call added). Rule: a retry of an increment
        whose answer was lost adds nothing."""
        ...

    async def get_many(self, keys: Sequence[str]) -> list[int | None]:
        """Current values (None where absent or expired)."""
        ...

    async def acquire_lease(
        self,
        key: str,
        member: str,
        limit: int,
        ttl_s: float,
        *,
        dead_owners: Sequence[str] = (),
    ) -> tuple[bool, int, int]:
        """Add ``member`` to the lease set ``key`` unless it holds ``limit`` live leases.

        When the set is full, the leases of ``dead_owners`` (see :func:`lease_owner`)
        are dropped first, in the same atomic step. Returns (acquired, leases now live,
        leases of dead owners dropped). Rule: a lease expires ``ttl_s`` after it was
        taken in any case, the last resort for a process no peer saw die.
        """
        ...

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
        """Reserve ``amount`` against every budget key, or none of them: :meth:`admit`
        with no steps (atomic per slot; where the keys span slots on Redis Cluster, one
        script per slot, and what earlier slots took is handed back when one refuses).

        ``owner``: the process id the hold is filed under, so :meth:`reap_holds` can
        give it back when that process dies.

        ``amount`` is at most :data:`MAX_AMOUNT_MICROS` (else a
        :class:`StoreFaultError`, nothing sent); a limit above 2**53 - 1 is that ($9 billion).

        Rule: a reservation id is used once. A reserve for an id that is held, or has
        ended (:func:`ended_key`), changes nothing and raises :class:`StoreFaultError`
        (what a reserve that runs late, after its settlement or cancel, finds).

        Expired reservations are given back first. If a key's value (settled plus
        reserved) has reached its limit, nothing changes and the result is (index of
        that key, every key's value); else ``amount`` is added to each key (its TTL
        set when the key is new) and remembered under ``rid`` for ``hold_s``: (None,
        every key's value before the addition).
        """
        ...

    async def settle(
        self,
        rid: str,
        keys: Sequence[str],
        cost: int,
        ttls_s: Sequence[float | None],
        *,
        keep_s: float = ENDED_KEEP_S,
    ) -> list[int]:
        """Replace reservation ``rid`` by the real ``cost`` (charged in full when the
        reservation has expired meanwhile); returns each key's settled value after it:
        its value less what open holds of other calls add (what alerts compare).

        Rule: idempotent by ``rid``. The id is marked ended for ``keep_s``; a settle
        (or cancel) of an ended id changes nothing and returns the settled values."""
        ...

    async def get_many_with_ttl(self, keys: Sequence[str]) -> list[tuple[int | None, float | None]]:
        """(value, seconds until it expires or None) for each key (read-outs only)."""
        ...
