"""The one clock: every read of the time outside the stores goes through a :class:`Clock`.

Rule: the decision core never reads the time itself; it is handed ``now``. The
process wiring (``adapters.server``, ``cli.up``) builds one :class:`SystemClock` and injects
it; tests inject a fake and move it across window boundaries instead of sleeping.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """Wall time (seconds since the epoch, and as a UTC datetime) and a monotonic time."""

    def wall(self) -> float:
        """Unix time in seconds (latency samples, clock minutes)."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go backwards (deadlines, rate-limited logs, caches)."""
        ...

    def now(self) -> datetime:
        """The wall time as an aware UTC datetime (budget windows, key expiry)."""
        ...


class SystemClock:
    """The operating system's clocks."""

    __slots__ = ()

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)
