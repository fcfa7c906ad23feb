"""More lost or half-given admission answers: take-backs that land once, budget
refusals that count nothing, session metadata kept, and one known limit (xfail)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from extproc.core.access import hash_key
from extproc.core.errors import GatewayError
from extproc.core.request import RequestHead
from extproc.policy import load_policy
from extproc.state.metrics import Metrics
from extproc.state.owed import OwedUncount, OwedWrites
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore, StoreUnavailableError, open_store
from extproc.store.keys import marker_key

KEY = "sk-rev3"
RAW = json.dumps({"model": "g", "messages": []}).encode()
HEAD = RequestHead(
    "POST",
    "/v1/chat/completions",
    {"authorization": f"Bearer {KEY}", "x-litellm-session-id": "s1"},
)


def _policy(tmp_path: Path, key_extra: str = "rpm_limit: 100", iters: int = 5) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"model_groups: [{{name: g, max_iterations: {iters}, deployments: [{{id: a, cluster: c,"
        " model: m, prices: {input_cost_per_token: 0.001}}]}]\n"
        f"keys: [{{hash: {hash_key(KEY)}, alias: k, {key_extra}}}]\n"
    )
    return path


async def test_an_uncount_retried_after_a_lost_answer_takes_back_once() -> None:
    """Was a bug, fixed: OwedUncount for a batch that never ran; another call then counts
    the session (1). The uncount's first attempt runs (sets the marker, takes nothing
    back) but its answer is lost; the retry finds the marker it set itself and takes 1
    off."""
    store = MemoryStore()
    key = "{t:s1}:session_iterations:x:count"
    from extproc.store.keys import store_key  # noqa: PLC0415

    key = store_key(("t", "s1"), "session", "count")
    lost_marker = marker_key(key, "lost-rid")
    other_marker = marker_key(key, "other-rid")
    # another call's real count
    await store.incr_once(key, 1, 600, marker=other_marker, keep_s=600)
    orig = store.uncount
    calls = {"n": 0}

    async def ran_then_lost(*a: Any, **kw: Any) -> bool:
        out = await orig(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreUnavailableError("answer lost")
        return out

    store.uncount = ran_then_lost  # type: ignore[method-assign]
    owed = OwedWrites(store, Metrics(), owner="o" * 16, min_backoff_s=0.001)
    owed.add(OwedUncount(key, 1, lost_marker, until=__import__("time").time() + 1000))
    await owed.drain(5)
    value = (await store.get_many([key]))[0]
    print("\nuncount attempts:", calls["n"], "other call's count now:", value)
    assert value == 1


async def test_redis_uncount_is_idempotent(redis_url: str) -> None:
    """Was a bug, fixed: Same on Redis: the script is not idempotent (the marker it sets
    itself makes a resend count as 'applied')."""
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    store: Any = open_store(redis_url)
    from extproc.store.keys import store_key  # noqa: PLC0415

    key = store_key(("t", "s1"), "session", "count")
    await store.incr_once(key, 3, 600, marker=marker_key(key, "a"), keep_s=600)
    first = await store.uncount(key, 1, marker=marker_key(key, "never"), keep_s=600)
    second = await store.uncount(key, 1, marker=marker_key(key, "never"), keep_s=600)
    value = (await store.get_many([key]))[0]
    await store.close()
    print("\nuncount returns", first, second, "count", value)
    assert value == 3


async def test_marked_down_budget_refusal_does_not_count_the_session(tmp_path: Path) -> None:
    """Was a bug, fixed: Store marked down, fail open: a call the key's budget refuses
    (429) is counted against the session in process and owed to the store. The store
    itself applies budgets before steps, so a budget refusal counts nothing there."""
    path = _policy(tmp_path, "max_budget: 0")
    policy = load_policy(path)
    store = MemoryStore()
    gateway = Gateway(Settings(policy_path=path, fail_mode="open"), policy, store)
    gateway._store_retry_at = float("inf")
    for _ in range(2):
        with pytest.raises(GatewayError) as info:
            await gateway.admit(await gateway.route(HEAD, RAW, policy), policy)
        assert "budget" in info.value.code, info.value.code
    # the session was counted in process first, then taken back, here and in what is
    # owed to the store: once that lands, neither counts the refused calls
    assert [v for v, _ in gateway._local._values.values()] in ([], [0])
    await gateway.owed.drain(5)
    await gateway.drain()
    assert [v for v, _ in store._values.values() if v] == []


async def test_marked_down_then_batch_lost_keeps_iteration_metadata(tmp_path: Path) -> None:
    """Was a bug, fixed: Store marked down (counted in process first), then the batch's
    answer is lost (fail open): Admission.iterations is None, so Envoy gets no
    iterations limit/remaining metadata though the session was counted."""
    path = _policy(tmp_path)
    policy = load_policy(path)
    store = MemoryStore()
    gateway = Gateway(Settings(policy_path=path, fail_mode="open"), policy, store)
    gateway._store_retry_at = float("inf")

    async def lost(*a: Any, **kw: Any) -> Any:
        raise StoreUnavailableError("answer lost")

    store.admit = lost  # type: ignore[method-assign]
    admission = await gateway.admit(await gateway.route(HEAD, RAW, policy), policy)
    meta = admission.metadata(with_charge=False)
    print("\nmetadata:", meta, "iterations:", admission.iterations)
    assert admission.iterations is not None


@pytest.mark.xfail(
    strict=True,
    reason="known limit: a batch with no budgets checks no ended marker, so one that runs "
    "after its owed release takes its slot until the lease TTL",
)
async def test_closed_mode_late_batch_without_budgets_keeps_the_lease(tmp_path: Path) -> None:
    """Known limit: fail closed, a key with max_parallel_requests and no budget: the
    batch's answer is lost, the owed cancel (lease only: no cancel sent, keys empty)
    lands, then the batch runs late. Nothing marks the id ended, so the late Take holds
    a slot until the lease TTL (660 s): the key is one slot short."""
    from extproc.core.leases import parallel_key  # noqa: PLC0415

    path = _policy(tmp_path, "max_parallel_requests: 1")
    policy = load_policy(path)
    store = MemoryStore()
    gateway = Gateway(Settings(policy_path=path, fail_mode="closed"), policy, store)
    real_admit = store.admit
    held: list[Any] = []

    async def lost(adm: Any) -> Any:
        held.append(adm)
        raise StoreUnavailableError("answer lost")

    store.admit = lost  # type: ignore[method-assign, assignment]
    decision = await gateway.route(HEAD, RAW, policy)
    with pytest.raises(GatewayError):
        await gateway.admit(decision, policy)
    await gateway.owed.drain(5)
    print("\nowed after drain:", list(gateway.owed), "charge keys:", held[0].budgets)
    await real_admit(held[0])  # the lost batch runs late
    store.admit = real_admit  # type: ignore[method-assign]
    gateway._store_retry_at = 0.0
    assert decision.caller is not None
    leases = store._leases.get(parallel_key(decision.caller.key))
    print("lease set after the 503:", leases)
    assert not leases
