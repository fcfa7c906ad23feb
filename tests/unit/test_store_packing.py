"""The Redis store's connections pack commands with hiredis, byte for byte as
redis-py's own Python packer does."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from extproc.store.redis import RedisStore

ARGS: list[tuple[bytes | str | int | float, ...]] = [
    ("EVALSHA", "0" * 40, 2, "{t:key:ab}:rpm", "{t:key:ab}:once:rpm:r1", 1, 60000, -3, 2**62),
    ("SCRIPT LOAD", "return 1"),  # a two-word command name is sent as two arguments
    ("ZREM", b"{t:key:ab}:leases", "caf\u00e9"),
    ("SET", "k", 0.1),
]


@pytest.mark.parametrize("args", ARGS)
async def test_packed_like_redis_py(args: tuple[bytes | str | int | float, ...]) -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0")
    try:
        pool = store._client.connection_pool
        assert pool.connection_class.__name__ == "HiredisConnection"
        fast = pool.make_connection()
        plain = Connection()
        assert b"".join(fast.pack_command(*args)) == b"".join(plain.pack_command(*args))
        assert b"".join(fast.pack_commands([args, args])) == b"".join(
            plain.pack_commands([args, args])
        )
    finally:
        await store.close()
