"""The record of a call's refusals that a dynamic failover route's retries read."""

from __future__ import annotations

from typing import Any

from extproc.state.refusals import read_refusals, record_refusal
from extproc.store import MemoryStore, StoreUnavailableError


async def test_refusals_are_read_back_by_attempt_and_class() -> None:
    store = MemoryStore()
    assert await read_refusals(store, "call-1", 3) == {}
    assert await record_refusal(store, "call-1", 1, "content_policy")
    assert await record_refusal(store, "call-1", 3, "context_window")
    # only the attempts before the one asking
    assert await read_refusals(store, "call-1", 3) == {1: "content_policy"}
    assert await read_refusals(store, "call-1", 6) == {1: "content_policy", 3: "context_window"}
    assert await read_refusals(store, "call-2", 6) == {}  # another call's are its own
    assert await read_refusals(store, "call-1", 1) == {}


async def test_a_hostile_call_id_never_reaches_a_key_as_it_is() -> None:
    store = MemoryStore()
    hostile = "}{x}:" + "\u00e9" * 500
    assert await record_refusal(store, hostile, 1, "content_policy")
    assert await read_refusals(store, hostile, 2) == {1: "content_policy"}
    keys = list(store._values)
    assert all(hostile not in k and len(k) < 64 for k in keys)


async def test_a_store_that_is_down_says_unknown_and_takes_no_refusal() -> None:
    class Down(MemoryStore):
        async def snapshot(self, *args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailableError("connection refused")

        async def incr_many(self, *args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailableError("connection refused")

    store = Down()
    assert await read_refusals(store, "call", 3) is None  # unknown, not "none"
    assert not await record_refusal(store, "call", 1, "content_policy")
