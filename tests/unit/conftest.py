"""Fixtures of the unit tests: each store contract test runs on both stores."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from extproc.store import MemoryStore, StoreTools, open_store


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StoreTools]:
    """The embedded store, then a private Redis emptied first (a file may define its
    own ``store`` instead)."""
    if request.param == "memory":
        yield MemoryStore()
        return
    url = request.getfixturevalue("redis_url")
    client = aioredis.from_url(url)
    await client.flushdb()
    await client.aclose()
    opened = open_store(url)
    yield opened
    await opened.close()
