"""Shared state behind one narrow interface; only the process wiring picks a backend."""

from __future__ import annotations

from pathlib import Path

from extproc.store.base import (
    Store,
    StoreError,
    StoreFaultError,
    StoreTools,
    StoreUnavailableError,
)
from extproc.store.memory import MemoryStore

__all__ = [
    "MemoryStore",
    "Store",
    "StoreError",
    "StoreFaultError",
    "StoreTools",
    "StoreUnavailableError",
    "open_store",
]


def open_store(url: str, *, journal: Path | None = None) -> StoreTools:
    """A store for ``memory://``, ``redis://``/``rediss://``/``unix://`` or
    ``redis+cluster://`` (Redis Cluster) URLs."""
    if url.startswith("memory://"):
        return MemoryStore(journal=journal)
    if url.startswith(
        ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
    ):
        from extproc.store.redis import RedisStore  # noqa: PLC0415 - redis only when used

        return RedisStore.from_url(url)
    raise ValueError(f"unsupported store URL scheme: {url.split(':', 1)[0]!r}")
