"""Spend durability for the embedded store: an append-only journal of settled costs.

Only settled spend is journaled (reservations die with the process, as they should).
Lines are buffered and written with ``fsync`` at most a second later, so a crash loses
at most about a second of spend; a clean shutdown writes everything, then compacts the
file to one line per live key. Each line is ``{"k": key, "v": micro-dollars,
"e": expiry as Unix time or null}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["SpendJournal"]

log = logging.getLogger("extproc.store")

#: Longest time a settled cost waits in memory before it is on disk.
FLUSH_INTERVAL_S = 1.0


class SpendJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._buffer: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

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
        self._timer = None
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def compact(self, live: Iterable[tuple[str, int, float | None]]) -> None:
        """Replace the file by one line per live key (atomic rename)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buffer.clear()
        now = time.time()
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
