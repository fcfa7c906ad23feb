"""The store interface the core's adapters use."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from extproc.store.keys import SPEND, store_key

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
    "Store",
    "StoreError",
    "StoreFaultError",
    "StoreUnavailableError",
    "check_amount",
    "check_int64",
    "check_owner",
    "ended_key",
    "lease_owner",
    "limit_arg",
    "resv_owner_key",
]

#: Every budget key carries this hash tag: a reservation touches all of a request's
#: budgets atomically, and on Redis Cluster that needs them in one slot.
SPEND_TAG = store_key(SPEND)
RESV_HASH = store_key(SPEND, "reservations")
RESV_EXPIRY = store_key(SPEND, "reservations", "expiry")
#: Prefixes a budget key to name the sum of its open holds (Redis, where the scripts
#: derive it): ``#`` never follows a tag in a key :func:`store_key` builds, so no key
#: can alias it, and the prefix's own tag keeps it in the budget's slot.
HELD_PREFIX = f"{SPEND_TAG}#held|"
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
#: a retry never charges twice (see ``extproc/owed.py``).
ENDED_KEEP_S = 900.0


def ended_key(rid: str) -> str:
    """The marker that reservation ``rid`` has been settled or cancelled (``{spend}``
    slot, beside the reservation book): a retry of either is a no-op, and a reserve
    for that id that runs late (a script the client gave up on) changes nothing."""
    return store_key(SPEND, "ended", rid)


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


def resv_owner_key(owner: str) -> str:
    """The set of a process's open reservation ids (the ``{spend}`` slot, beside them)."""
    return store_key(SPEND, "reservations", "owner", check_owner(owner))


def limit_arg(limit: int | None) -> int:
    """A budget limit as a script argument: -1 for none, at most ``_LIMIT_CEILING``."""
    if limit is None:
        return -1
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise StoreFaultError(f"limit out of range: {str(limit)[:32]}")
    return min(limit, _LIMIT_CEILING)


class Store(Protocol):
    """Atomic counters with expiry, shared by every server process using the store."""

    @property
    def name(self) -> str: ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailableError` unless the store answers."""
        ...

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

    async def release_lease(self, key: str, member: str) -> None:
        """Drop ``member`` from ``key`` (no-op when it is gone already)."""
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
        """Reserve ``amount`` against every budget key, atomically, or none of them.

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

    async def cancel(self, rid: str, *, keep_s: float = ENDED_KEEP_S) -> None:
        """Give reservation ``rid`` back and mark it ended for ``keep_s`` (a no-op when
        ended already; an id never reserved is only marked, so a reserve of it that
        runs late is refused)."""
        ...

    async def heartbeat(self, owner: str, ttl_s: float, keep_s: float) -> list[str]:
        """Mark process ``owner`` alive for ``ttl_s``; returns the processes whose
        heartbeat has run out (in the last ``keep_s``; older ones are forgotten)."""
        ...

    async def reap_holds(self, owner: str) -> int:
        """Give back every open reservation of process ``owner`` exactly as
        :meth:`cancel` would; returns how many. Rule: idempotent, and safe while other
        processes reap the same owner (each hold is given back once)."""
        ...

    async def get_many_with_ttl(self, keys: Sequence[str]) -> list[tuple[int | None, float | None]]:
        """(value, seconds until it expires or None) for each key (read-outs only)."""
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
