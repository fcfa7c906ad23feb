"""When the embedded store's entries expire: a min-heap the sweeper pops.

Rule: at most one live heap entry per (kind, key), and it is never later than the
entry's real expiry. An expiry that moves later (a refreshed TTL, a key recreated
after it expired) pushes nothing: the early heap entry pops, the store sees the entry
is still live and schedules it again at its real expiry. Only an expiry that moves
earlier pushes a second entry; the first one is then stale and skipped when it pops.
So a hot key costs one heap entry, not one per write.
"""

from __future__ import annotations

import heapq
import math
from typing import TypeVar

__all__ = ["ExpiryIndex", "shrunk"]

_V = TypeVar("_V")

#: A dict that shrank below a quarter of its peak (and had at least this many entries)
#: is copied: CPython never gives a dict's table back otherwise.
SHRINK_FROM = 4096


def shrunk(table: dict[str, _V], peak: int) -> tuple[dict[str, _V], int]:
    """(``table`` or a right-sized copy of it, the peak size to remember)."""
    size = len(table)
    peak = max(peak, size)
    if peak >= SHRINK_FROM and size * 4 < peak:
        return dict(table), size
    return table, peak


class ExpiryIndex:
    """Due times of entries of a few kinds (small ints), each kind keyed by string."""

    def __init__(self, kinds: int) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._due: list[dict[str, float]] = [{} for _ in range(kinds)]
        self._peaks = [0] * kinds

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, kind: int, key: str, expiry: float) -> bool:
        """Make sure ``key`` pops no later than ``expiry``; True when a heap entry was
        pushed (the heap may have been empty)."""
        if math.isinf(expiry):
            return False
        due = self._due[kind]
        current = due.get(key)
        if current is not None and current <= expiry:
            return False
        due[key] = expiry
        heapq.heappush(self._heap, (expiry, kind, key))
        return True

    def unschedule(self, kind: int, key: str) -> None:
        """``key`` is gone before its due time (a settled reservation): forget it, and
        rebuild the heap once most of it is such leftovers, so what is gone early does
        not stay in memory until it would have been due."""
        if self._due[kind].pop(key, None) is None:
            return
        live = sum(len(d) for d in self._due)
        if len(self._heap) > 1024 and len(self._heap) > 2 * live:
            self._heap = [e for e in self._heap if self._due[e[1]].get(e[2]) == e[0]]
            heapq.heapify(self._heap)

    def pop_due(self, now: float, limit: int) -> tuple[list[tuple[int, str]], bool]:
        """Up to ``limit`` heap entries due at ``now``: ((kind, key) of each live one,
        whether more are due). A popped key is unscheduled: the caller evicts it or
        schedules it again."""
        heap = self._heap
        self._peaks = [max(p, len(d)) for p, d in zip(self._peaks, self._due, strict=True)]
        out: list[tuple[int, str]] = []
        for _ in range(limit):
            if not heap or heap[0][0] > now:
                return out, False
            expiry, kind, key = heapq.heappop(heap)
            due = self._due[kind]
            if due.get(key) == expiry:
                del due[key]
                out.append((kind, key))
        return out, bool(heap) and heap[0][0] <= now

    def shrink(self) -> None:
        """Give back the memory of due times that are gone (see :func:`shrunk`)."""
        for kind, due in enumerate(self._due):
            self._due[kind], self._peaks[kind] = shrunk(due, self._peaks[kind])

    def clear(self) -> None:
        self._heap.clear()
        for due in self._due:
            due.clear()
