"""The request path remembers what it rebuilds on every call, never what a client
could use to fill the memory."""

from __future__ import annotations

import hashlib
import tracemalloc

from extproc.core.access import _hashed, hash_key


def test_hash_key_does_not_remember_long_tokens() -> None:
    """An unauthenticated client sending large random bearer tokens must not pin them
    in the key-hash cache (4096 x 16 kB would be 64 MiB)."""
    _hashed.cache_clear()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(4096):
        token = f"{i:08d}" + "x" * 16_000
        assert hash_key(token) == hashlib.sha256(token.encode()).hexdigest()
    retained = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert retained < 8 * 1024 * 1024, f"{retained / 2**20:.0f} MiB retained"
    assert _hashed.cache_info().currsize == 0


def test_hash_key_remembers_a_key_of_usual_length() -> None:
    _hashed.cache_clear()
    key = "sk-" + "a" * 48
    assert hash_key(key) == hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert _hashed.cache_info().hits == 1
