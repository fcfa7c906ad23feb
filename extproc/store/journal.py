"""Spend durability for the embedded store: an append-only journal of settled costs.

Only settled spend is journaled (reservations die with the process, as they should).
Lines are buffered and written with ``fsync`` at most a second later, so a crash loses
at most about a second of spend; a clean shutdown writes everything, then compacts the
file to one line per live key. Each line is ``{"k": key, "v": micro-dollars,
"e": expiry as Unix time or null}``.

Rule: a journal is checked when it is opened (its directory made, the file opened for
appending) and held by one process at a time (``flock`` on ``<journal>.lock``): an
unusable path or a second process is a one-line startup error, never lost spend. Two
processes compacting one journal would each drop what the other settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from extproc.state.clock import SystemClock

__all__ = ["JournalError", "SpendJournal", "check_journal"]

log = logging.getLogger("extproc.store")

#: Longest time a settled cost waits in memory before it is on disk.
FLUSH_INTERVAL_S = 1.0


class JournalError(Exception):
    """The spend journal cannot be used; the message is one line naming the path."""


def _claim(path: Path) -> int:
    """Check that ``path`` can be appended to, and lock it for this process: the lock's
    file descriptor."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
        fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename and str(exc.filename) != str(path) else ""
        # mkdir(exist_ok=True) of a directory that is a regular file says "File exists"
        reason = "Not a directory" if isinstance(exc, FileExistsError) else exc.strerror or ""
        raise JournalError(f"cannot write the spend journal {path}: {reason}{where}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise JournalError(
            f"the spend journal {path} is in use by another extproc process"
        ) from None
    return fd


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def check_journal(path: Path) -> None:
    """Raise :class:`JournalError` unless a server could open ``path`` now."""
    os.close(_claim(path))


class SpendJournal:
    def __init__(self, path: Path, wall: Callable[[], float] | None = None) -> None:
        self.path = path
        #: Unix time, from the process's clock (expiries are wall-clock instants).
        self._wall = wall or SystemClock().wall
        self._buffer: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._lock: int | None = _claim(path)

    def replay(self) -> Iterator[tuple[str, int, float | None]]:
        """(key, amount, expiry as Unix time or None) for every readable line."""
        try:
            handle = self.path.open(encoding="utf-8")
        except FileNotFoundError:
            return
        with handle:
            for number, line in enumerate(handle, 1):
                try:
                    entry = json.loads(line)
                    key, amount, expiry = str(entry["k"]), int(entry["v"]), entry["e"]
                except (ValueError, KeyError, TypeError):
                    # a torn last line after a crash: skip it, keep the rest
                    log.warning("spend journal %s: skipping unreadable line %d", self.path, number)
                    continue
                yield key, amount, None if expiry is None else float(expiry)

    def record(self, key: str, amount: int, expiry: float | None) -> None:
        self._buffer.append(json.dumps({"k": key, "v": amount, "e": expiry}) + "\n")
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        """Append what was recorded; a failed write keeps it for the next try.

        Rule: settled spend is never dropped, nor counted twice: a batch that fails
        part-way is cut off the file again before it is retried.
        """
        self._timer = None
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        try:
            self._append("".join(lines).encode())
        except OSError as exc:
            self._buffer[:0] = lines
            log.error(  # noqa: TRY400 - one line, no traceback: the cause is the disk
                "spend journal %s: write failed, %d lines kept for the next try: %s",
                self.path,
                len(self._buffer),
                exc,
            )
            with contextlib.suppress(RuntimeError):  # no loop: the next record retries
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(FLUSH_INTERVAL_S, self.flush)

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)

    def close(self) -> None:
        """Let another process open the journal (after :meth:`compact`)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def compact(self, live: Iterable[tuple[str, int, float | None]]) -> None:
        """Replace the file by one line per live key (atomic rename); if that fails,
        append what is still buffered instead (logged, never raised: shutdown goes on)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self._compact(live)
        except OSError as exc:
            log.error(  # noqa: TRY400 - one line, no traceback: the cause is the disk
                "spend journal %s: compaction failed, appending instead: %s", self.path, exc
            )
            self.flush()
            return
        self._buffer.clear()

    def _compact(self, live: Iterable[tuple[str, int, float | None]]) -> None:
        now = self._wall()
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as handle:
            for key, amount, expiry in live:
                if amount > 0 and (expiry is None or expiry > now):
                    handle.write(json.dumps({"k": key, "v": amount, "e": expiry}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
