"""Store writes a call still owes: settlements, cancels and counts the store did not
acknowledge, kept and retried until they land.

A settlement (or cancel) whose store call failed is not dropped: it is kept in memory
and in a small journal of this process (``owed-<process id>.jsonl`` in the owed
directory, see ``Settings.owed_directory``), and retried with backoff (``min_backoff_s``
doubling to ``max_backoff_s``) until the store acknowledges it. So are the session
counts a process made while its store was down (fail mode open) and the tokens of a
settlement's tpm count.

Rules:

- Every retry is idempotent. A settle or cancel of a reservation id that has ended is
  a no-op in the store (its ended marker, kept ``keep_s``), a count carries the marker
  of its first attempt (:meth:`Store.incr_once`): a write whose first answer was lost,
  or that ran late, never counts twice.
- Nothing is dropped but a count whose window has ended (the counter it would add to
  has expired with it): counted in ``extproc_settlement_retries_total{result="expired"}``.
- A process that stops (or dies) with writes still owed leaves its journal; the next
  process that starts on the same directory adopts every journal no live process
  holds (an ``flock`` on ``<journal>.lock``) and retries what it lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.state.clock import SystemClock
from extproc.state.metrics import Metrics
from extproc.store import Store, StoreError, StoreUnavailableError
from extproc.store.base import ENDED_KEEP_S, Admission, Count, Finish

__all__ = ["Owed", "OwedCancel", "OwedCount", "OwedSettle", "OwedUncount", "OwedWrites"]

log = logging.getLogger("extproc.owed")

#: Longest time an owed write waits in the page cache before it is fsynced. Rule: the
#: line is written at once, so a killed process loses nothing; a machine crash at most
#: this much.
FSYNC_INTERVAL_S = 1.0
#: Owed writes sent to the store at once while catching up.
_BATCH = 16


@dataclass(frozen=True, slots=True)
class OwedSettle:
    """Replace reservation ``rid`` by its real cost (see :meth:`Store.settle`)."""

    rid: str
    keys: tuple[str, ...]
    cost: int
    ttls: tuple[float | None, ...]
    #: Unix time of the first attempt (0: set when it is owed).
    since: float = 0.0

    @property
    def ident(self) -> str:
        return f"settle:{self.rid}"


@dataclass(frozen=True, slots=True)
class OwedCancel:
    """Give reservation ``rid`` back, or refuse it if it lands later."""

    rid: str
    #: The budget keys it was made with (their slots' books); none: the ``{spend}``
    #: book (what a journal line written before reservations had keys means).
    keys: tuple[str, ...] = ()
    #: Unix time of the first attempt (0: set when it is owed).
    since: float = 0.0
    #: A parallel-request lease the call may have taken (``key|member``, as Envoy
    #: carries it): given back with the hold.
    lease: str | None = None

    @property
    def ident(self) -> str:
        return f"cancel:{self.rid}"


@dataclass(frozen=True, slots=True)
class OwedCount:
    """Add ``amount`` to the counter ``key`` once (``marker``), while its window lasts
    (``until``, Unix time: the counter would have expired by then)."""

    key: str
    amount: int
    marker: str
    until: float

    @property
    def ident(self) -> str:
        return f"count:{self.marker}"


@dataclass(frozen=True, slots=True)
class OwedUncount:
    """Take back the increment of ``key`` made with ``marker`` if it was made (a call
    refused after its admission's answer was lost: it must not count), while the
    counter's window lasts (``until``, Unix time)."""

    key: str
    amount: int
    marker: str
    until: float

    @property
    def ident(self) -> str:
        return f"uncount:{self.marker}"


Owed = OwedSettle | OwedCancel | OwedCount | OwedUncount


def _kind(item: Owed) -> str:
    if isinstance(item, OwedSettle):
        return "settle"
    if isinstance(item, OwedUncount):
        return "uncount"
    return "cancel" if isinstance(item, OwedCancel) else "count"


def _line(item: Owed) -> dict[str, Any]:
    if isinstance(item, OwedSettle):
        return {
            "op": "settle",
            "rid": item.rid,
            "keys": list(item.keys),
            "cost": item.cost,
            "ttls": list(item.ttls),
            "t": item.since,
        }
    if isinstance(item, OwedCancel):
        line: dict[str, Any] = {
            "op": "cancel",
            "rid": item.rid,
            "keys": list(item.keys),
            "t": item.since,
        }
        if item.lease is not None:
            line["lease"] = item.lease
        return line
    op = "uncount" if isinstance(item, OwedUncount) else "count"
    return {"op": op, "key": item.key, "n": item.amount, "m": item.marker, "u": item.until}


def _parse(entry: dict[str, Any]) -> Owed | str:
    """An owed write, or the ident of one that is done; raises on anything else."""
    op = entry["op"]
    if op == "settle":
        keys = tuple(str(k) for k in entry["keys"])
        ttls = tuple(None if t is None else float(t) for t in entry["ttls"])
        if len(keys) != len(ttls):
            raise ValueError("one ttl per key")
        since = float(entry.get("t") or 0.0)
        return OwedSettle(str(entry["rid"]), keys, int(entry["cost"]), ttls, since)
    if op == "cancel":
        keys = tuple(str(k) for k in entry.get("keys") or ())
        lease = entry.get("lease")
        since = float(entry.get("t") or 0.0)
        return OwedCancel(str(entry["rid"]), keys, since, None if lease is None else str(lease))
    if op in ("count", "uncount"):
        kind = OwedCount if op == "count" else OwedUncount
        return kind(str(entry["key"]), int(entry["n"]), str(entry["m"]), float(entry["u"]))
    if op == "done":
        return str(entry["id"])
    raise ValueError(f"unknown op {op!r}")


def read_owed(path: Path) -> dict[str, Owed]:
    """What a journal still owes: every write it lists that no later line marks done."""
    out: dict[str, Owed] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                parsed = _parse(json.loads(line))
            except (ValueError, KeyError, TypeError):
                # a torn last line after a crash: skip it, keep the rest
                log.warning("owed writes %s: skipping unreadable line %d", path, number)
                continue
            if isinstance(parsed, str):
                out.pop(parsed, None)
            else:
                out[parsed.ident] = parsed
    return out


def _lock(path: Path) -> int | None:
    """An exclusive lock on ``<path>.lock`` (its descriptor), None if another holds it."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class _Journal:
    """This process's append-only file of owed writes and the ones done since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(path)
        if lock is None:
            raise OSError(f"{path} is in use by another process")
        self._lock = lock
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._timer: asyncio.TimerHandle | None = None

    def write(self, lines: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.sync()
                return
            self._timer = loop.call_later(FSYNC_INTERVAL_S, self.sync)

    def sync(self) -> None:
        self._timer = None
        with contextlib.suppress(OSError):
            os.fsync(self._fd)

    def empty(self) -> None:
        """Nothing is owed: the file starts over (it never grows past an outage)."""
        os.ftruncate(self._fd, 0)

    def close(self, *, owed: bool) -> None:
        """Close; the file stays for the next process only when something is owed."""
        if self._timer is not None:
            self._timer.cancel()
        self.sync()
        os.close(self._fd)
        if not owed:
            with contextlib.suppress(OSError):
                self.path.unlink()
            with contextlib.suppress(OSError):
                self.path.with_name(self.path.name + ".lock").unlink()
        os.close(self._lock)


class OwedWrites:
    """The writes this process owes its store, retried until they land."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        owner: str,
        directory: Path | None = None,
        keep_s: float = ENDED_KEEP_S,
        min_backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        wall: Callable[[], float] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._owner = owner
        self._directory = directory
        self.keep_s = keep_s
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        system = SystemClock()
        self._wall = wall or system.wall
        self._monotonic = monotonic or system.monotonic
        self._items: dict[str, Owed] = {}
        #: Counter key → the amounts owed to it (what a decision adds to the store's count).
        self._counts: dict[str, int] = {}
        self._journal: _Journal | None = None
        self._journal_failed = False
        #: Lines in the journal since it was last emptied (compaction).
        self._lines = 0
        self._task: asyncio.Task[None] | None = None
        #: Set while nothing is owed.
        self._settled = asyncio.Event()
        self._settled.set()
        self._last_log = float("-inf")

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Owed]:
        return iter(list(self._items.values()))

    @property
    def journal_path(self) -> Path | None:
        if self._directory is None:
            return None
        return self._directory / f"owed-{self._owner}.jsonl"

    def pending_count(self, key: str) -> int:
        """What this process still owes the counter ``key``."""
        return self._counts.get(key, 0)

    def owes(self, key: str) -> bool:
        """Whether a count or a take-back of the counter ``key`` is still owed."""
        if key in self._counts:
            return True
        return any(isinstance(i, OwedUncount) and i.key == key for i in self._items.values())

    def add(self, item: Owed) -> None:
        """Keep ``item`` until the store acknowledges it; retries start at once."""
        if item.ident in self._items:
            return
        self._keep(item)
        self._record([_line(item)])
        self._kick()

    def _keep(self, item: Owed) -> None:
        if isinstance(item, OwedSettle | OwedCancel) and not item.since:
            item = dataclasses.replace(item, since=self._wall())  # unknown: from now
        self._items[item.ident] = item
        self._settled.clear()
        if isinstance(item, OwedCount):
            self._counts[item.key] = self._counts.get(item.key, 0) + item.amount
        self._metrics.settlements_pending.labels(_kind(item)).inc()

    def _forget(self, item: Owed) -> bool:
        """Whether ``item`` was still owed (a count landed by a decision and by the
        retry loop at once is forgotten once)."""
        if self._items.pop(item.ident, None) is None:
            return False
        if not self._items:
            self._settled.set()
        if isinstance(item, OwedCount):
            left = self._counts.get(item.key, 0) - item.amount
            if left > 0:
                self._counts[item.key] = left
            else:
                self._counts.pop(item.key, None)
        self._metrics.settlements_pending.labels(_kind(item)).dec()
        return True

    def _record(self, lines: list[dict[str, Any]]) -> bool:
        """Journal ``lines``; whether the journal now lists everything owed.

        A journal that cannot be written keeps the writes in memory (logged once; they
        still land while this process lives) and is tried again with the next line,
        then written whole. Rule: once the done lines far outnumber what is owed, the file is
        rewritten with only what is owed, so it never grows past what one outage owes.
        """
        path = self.journal_path
        if path is None:
            return False
        try:
            if self._journal is None:
                self._journal = _Journal(path)
            if self._journal_failed or self._lines > 4 * len(self._items) + 1000:
                self._journal.empty()
                lines = [_line(item) for item in self._items.values()]
                self._lines = 0
            self._journal.write(lines)
            self._lines += len(lines)
            if not self._items:
                self._journal.empty()
                self._lines = 0
        except OSError as exc:
            if not self._journal_failed:
                log.error(  # noqa: TRY400 - one line, no traceback: the cause is the disk
                    "owed writes journal %s cannot be written, keeping them in memory: %s",
                    path,
                    exc,
                )
            self._journal_failed = True
            return False
        self._journal_failed = False
        return True

    async def start(self) -> None:
        """Adopt what stopped processes left owed in the directory, and retry it."""
        directory = self._directory
        if directory is None or not directory.is_dir():
            return
        own = self.journal_path
        for path in sorted(directory.glob("owed-*.jsonl")):
            if path == own:
                continue
            try:
                lock = _lock(path)
            except OSError:
                continue
            if lock is None:
                continue  # a live process's
            try:
                adopted = [i for i in read_owed(path).values() if i.ident not in self._items]
                for item in adopted:
                    self._keep(item)
                if adopted:
                    log.warning("adopted %d owed store writes from %s", len(adopted), path)
                # Rule: the dead process's file goes only once this one's lists them.
                if self._record([_line(item) for item in adopted]) or not adopted:
                    path.unlink()
                    path.with_name(path.name + ".lock").unlink()
            except OSError as exc:
                log.warning("could not adopt owed store writes from %s: %s", path, exc)
            finally:
                os.close(lock)
        self._kick()

    def _kick(self) -> None:
        if self._items and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        backoff = self._min_backoff_s
        while self._items:
            if await self.retry_once():
                backoff = self._min_backoff_s
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)

    async def retry_once(self) -> bool:
        """Send every owed write once (a few at a time); False when the store is still
        down or answered an error (the caller backs off), True when all went out."""
        items = list(self._items.values())
        landed_all = True
        for start in range(0, len(items), _BATCH):
            # Rule: every batch is tried each round: a write the store refuses (a fault)
            # must not hold back the ones behind it.
            batch = items[start : start + _BATCH]
            results = await asyncio.gather(*(self._apply(i) for i in batch))
            await self._done([item for item, ok in zip(batch, results, strict=True) if ok])
            landed_all = landed_all and all(results)
        return landed_all

    async def _done(self, items: list[Owed]) -> None:
        forgotten = [item for item in items if self._forget(item)]
        if forgotten:
            self._record([{"op": "done", "id": item.ident} for item in forgotten])

    async def land_counts(self, key: str) -> None:
        """Send what is owed to the counter ``key`` now (before a decision reads it:
        an owed count whose lost attempt landed meanwhile must not count twice)."""
        owed = [
            i
            for i in self._items.values()
            if isinstance(i, OwedCount | OwedUncount) and i.key == key
        ]
        results = await asyncio.gather(*(self._apply(i) for i in owed))
        await self._done([item for item, ok in zip(owed, results, strict=True) if ok])

    async def _apply(self, item: Owed) -> bool:
        kind = _kind(item)
        if isinstance(item, OwedSettle | OwedCancel) and self._wall() - item.since > self.keep_s:
            # Its first attempt may have landed and its marker has expired since: sent
            # again it could charge twice. Dropped, counted and logged instead.
            self._metrics.settlement_retries.labels(kind, "expired").inc()
            log.warning("owed %s older than the marker TTL, dropped: %s", kind, item.rid)
            return True
        try:
            if isinstance(item, OwedSettle):
                await self._store.finish(
                    Finish(item.rid, item.keys, item.cost, item.ttls, self.keep_s)
                )
            elif isinstance(item, OwedCancel):
                if item.keys or item.lease is None:
                    await self._store.cancel(item.rid, item.keys, keep_s=self.keep_s)
                if item.lease is not None:
                    key, _, member = item.lease.rpartition("|")
                    await self._store.release_lease(key, member)
            else:
                left = item.until - self._wall()
                if left <= 0:
                    self._metrics.settlement_retries.labels(kind, "expired").inc()
                    return True
                keep = min(left, self.keep_s)
                if isinstance(item, OwedUncount):
                    await self._store.uncount(
                        item.key, item.amount, marker=item.marker, keep_s=keep
                    )
                else:
                    step = Count(item.key, item.amount, left, marker=item.marker, keep_s=keep)
                    await self._store.admit(
                        Admission(item.ident, self._owner, 0, left, (), (step,))
                    )
        except StoreError as exc:
            down = isinstance(exc, StoreUnavailableError)
            self._metrics.settlement_retries.labels(kind, "unavailable" if down else "fault").inc()
            now = self._monotonic()
            if now - self._last_log >= 10.0:
                self._last_log = now
                log.warning("%d owed store writes kept for retry: %s", len(self._items), exc)
            return False
        self._metrics.settlement_retries.labels(kind, "landed").inc()
        return True

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for what is owed to land."""
        if self._items:
            self._kick()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout_s)

    async def close(self) -> None:
        """Stop retrying; what is still owed stays in the journal for the next start."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._items:
            log.warning(
                "stopping with %d store writes owed; kept in %s for the next start",
                len(self._items),
                self.journal_path,
            )
        if self._journal is not None:
            self._journal.close(owed=bool(self._items))
            self._journal = None
