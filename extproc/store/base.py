"""The store interface the core's adapters use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["Store", "StoreError"]


class StoreError(Exception):
    """The store could not be reached or failed; handled at the gRPC boundary."""


class Store(Protocol):
    """Atomic counters with expiry, shared by every server process using the store."""

    @property
    def name(self) -> str: ...

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers."""
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

    async def get_many(self, keys: Sequence[str]) -> list[int | None]:
        """Current values (None where absent or expired)."""
        ...

    async def acquire_lease(
        self, key: str, member: str, limit: int, ttl_s: float
    ) -> tuple[bool, int]:
        """Add ``member`` to the lease set ``key`` unless it holds ``limit`` live leases.

        Returns (acquired, leases now live). Rule: a lease expires ``ttl_s`` after it
        was taken, so a process that dies holding one cannot keep the slot forever.
        """
        ...

    async def release_lease(self, key: str, member: str) -> None:
        """Drop ``member`` from ``key`` (no-op when it is gone already)."""
        ...

    async def close(self) -> None: ...
