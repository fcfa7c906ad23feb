"""The embedded store: one process, state in a dict."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

__all__ = ["MemoryStore"]


class MemoryStore:
    """In-process counters with expiry; ``clock`` is injectable for tests."""

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._values: dict[str, tuple[int, float]] = {}
        self._leases: dict[str, dict[str, float]] = {}

    async def ping(self) -> None:
        return None

    def _live(self, key: str, now: float) -> tuple[int, float] | None:
        entry = self._values.get(key)
        if entry is not None and entry[1] <= now:
            del self._values[key]
            return None
        return entry

    async def incr(self, key: str, amount: int, ttl_s: float) -> int:
        return (await self.incr_window(key, amount, ttl_s))[0]

    async def incr_window(self, key: str, amount: int, ttl_s: float) -> tuple[int, float]:
        now = self._clock()
        entry = self._live(key, now)
        entry = (amount, now + ttl_s) if entry is None else (entry[0] + amount, entry[1])
        self._values[key] = entry
        return entry[0], entry[1] - now

    async def get_many(self, keys: Sequence[str]) -> list[int | None]:
        now = self._clock()
        out: list[int | None] = []
        for key in keys:
            entry = self._live(key, now)
            out.append(None if entry is None else entry[0])
        return out

    async def acquire_lease(
        self, key: str, member: str, limit: int, ttl_s: float
    ) -> tuple[bool, int]:
        now = self._clock()
        leases = self._leases.setdefault(key, {})
        for name in [m for m, expiry in leases.items() if expiry <= now]:
            del leases[name]
        if len(leases) >= limit:
            return False, len(leases)
        leases[member] = now + ttl_s
        return True, len(leases)

    async def release_lease(self, key: str, member: str) -> None:
        leases = self._leases.get(key)
        if leases is not None:
            leases.pop(member, None)
            if not leases:
                del self._leases[key]

    async def close(self) -> None:
        self._values.clear()
        self._leases.clear()
