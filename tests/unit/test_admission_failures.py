"""Admission batches whose store answer was lost or half given: nothing charged
twice or never, no slot, hold or count left behind (fail open and closed, one Redis
and a 3-node cluster)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.core.access import hash_key
from extproc.core.errors import GatewayError
from extproc.core.metering import ResponseMeter
from extproc.core.request import RequestHead
from extproc.policy import load_policy
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore, open_store
from extproc.store.redis_lua import ADMIT

KEY = "sk-review2"


def _policy(tmp_path: Path, extra_key: str = "rpm_limit: 100", strategy: str = "") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "model_groups: [{name: g, " + strategy + "deployments: [{id: a, cluster: c, model: m,"
        " prices: {input_cost_per_token: 0.001}}]}]\n"
        "general_settings: {max_budget: 100}\n"
        f"keys: [{{hash: {hash_key(KEY)}, alias: k, max_budget: 50, {extra_key}}}]\n"
    )
    return path


HEAD = RequestHead("POST", "/v1/chat/completions", {"authorization": f"Bearer {KEY}"})
RAW = json.dumps({"model": "g", "messages": []}).encode()


async def _flush_cluster(url: str) -> None:
    raw = RedisCluster.from_url("redis://" + url.removeprefix("redis+cluster://"))
    await raw.initialize()
    for node in raw.get_primaries():
        client = aioredis.Redis(host=node.host, port=int(node.port))
        await client.flushall()
        await client.aclose()
    await raw.aclose()


def _fail_admit_call(store: Any, which: int, exc: Exception) -> dict[str, int]:
    """The ``which``-th ADMIT script sent raises ``exc`` (a node down / timeout)."""
    orig = store._eval
    seen = {"n": 0}

    async def flaky(script: str, keys: Any, args: Any) -> Any:
        if script is ADMIT:
            seen["n"] += 1
            if seen["n"] == which:
                raise exc
        return await orig(script, keys, args)

    store._eval = flaky
    return seen


def _lose_admit_answers(store: Any) -> Any:
    """Every ADMIT script runs, then its answer is lost (a timeout); returns the real
    ``_eval`` so the test can put it back."""
    orig = store._eval

    async def ran_then_lost(script: str, keys: Any, args: Any) -> Any:
        out = await orig(script, keys, args)
        if script is ADMIT:
            raise RedisTimeoutError("answer lost")
        return out

    store._eval = ran_then_lost
    return orig


async def _settle_1000_tokens(gateway: Gateway, charge: Any, policy: Any) -> None:
    meter = ResponseMeter(charge, content_type="application/json", encoding="")
    meter.feed(b'{"usage": {"prompt_tokens": 1000, "completion_tokens": 0}}', end=True)
    await gateway.settle_metered(charge, meter, policy)
    await gateway.drain()


async def test_cluster_open_mode_later_slot_down_still_charges_every_budget(
    tmp_path: Path, redis_cluster_url: str
) -> None:
    """Was a bug, fixed: Fail open, Redis Cluster: the {spend}
    slot admits (global budget held), the tenant slot's node is unreachable. The call is
    admitted (fail open) but the store's hand-back cancelled the {spend} hold and marked
    the id ended there, so the real cost ($1) never reaches the global budget."""
    await _flush_cluster(redis_cluster_url)
    path = _policy(tmp_path)
    policy = load_policy(path)
    store: Any = open_store(redis_cluster_url)
    gateway = Gateway(Settings(policy_path=path, fail_mode="open"), policy, store)
    seen = _fail_admit_call(store, 2, RedisConnectionError("node down"))
    decision = await gateway.route(HEAD, RAW, policy)
    admission = await gateway.admit(decision, policy)  # admitted, fail open
    assert seen["n"] == 2
    charge = admission.charge
    assert charge is not None
    await _settle_1000_tokens(gateway, charge, policy)
    values = dict(zip(charge.keys, await store.get_many(list(charge.keys)), strict=True))
    await store.close()
    print("\nbudget values after settling a $1 call:", values)
    assert all(v == 1_000_000 for v in values.values()), values


async def test_open_mode_timeout_that_ran_and_refused_is_charged_in_full(
    tmp_path: Path, redis_url: str
) -> None:
    """Was a bug, fixed: Fail open, single Redis: the admission
    script ran and a step (rpm) refused, which ends the id in its books, but the answer
    was lost (timeout). The call is admitted fail-open and its settlement finds the id
    ended: $0 charged."""
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    path = _policy(tmp_path, "rpm_limit: 1")
    policy = load_policy(path)
    store: Any = open_store(redis_url)
    gateway = Gateway(Settings(policy_path=path, fail_mode="open"), policy, store)
    first = await gateway.admit(await gateway.route(HEAD, RAW, policy), policy)
    assert first.charge is not None
    await _settle_1000_tokens(gateway, first.charge, policy)
    orig = _lose_admit_answers(store)
    second = await gateway.admit(await gateway.route(HEAD, RAW, policy), policy)
    store._eval = orig
    assert second.charge is not None
    await _settle_1000_tokens(gateway, second.charge, policy)
    values = await store.get_many(list(second.charge.keys))
    await store.close()
    print("\nbudget values after two settled $1 calls:", values)
    assert values == [2_000_000, 2_000_000]


async def test_cluster_closed_mode_503_leaves_in_flight_counts_alone(
    tmp_path: Path, redis_cluster_url: str
) -> None:
    """Was a bug, fixed: Fail closed, least-busy, Redis Cluster:
    one call is in flight on deployment a. A second call's tenant-slot script (its
    second) is refused a connection (nothing ran, the in-flight Gauge in the
    deployment's slot never ran); the 503 path spawns _not_in_flight anyway, taking the
    first call's count."""
    from extproc.core.health import inflight_key  # noqa: PLC0415

    await _flush_cluster(redis_cluster_url)
    path = _policy(tmp_path, "rpm_limit: 100", strategy="routing_strategy: least-busy, ")
    policy = load_policy(path)
    store: Any = open_store(redis_cluster_url)
    gateway = Gateway(Settings(policy_path=path, fail_mode="closed"), policy, store)
    await gateway.admit(await gateway.route(HEAD, RAW, policy), policy)
    assert await store.get_many([inflight_key("a")]) == [1]
    seen = _fail_admit_call(store, 2, RedisConnectionError("node down"))
    with pytest.raises(GatewayError) as info:
        await gateway.admit(await gateway.route(HEAD, RAW, policy), policy)
    assert info.value.code == "store_unavailable"
    await gateway.drain()
    left = await store.get_many([inflight_key("a")])
    await store.close()
    print("\nin flight on a after the 503 (one call still in flight):", left, seen)
    assert left == [1]


async def test_closed_mode_timeout_gives_the_lease_back(tmp_path: Path, redis_url: str) -> None:
    """Was a bug, fixed: Fail closed, single Redis,
    max_parallel_requests 1: the admission script ran (its lease taken) but the answer
    was lost; the call got a 503 and its owed cancel gives the hold back, but nothing
    releases the lease: the key's only slot is gone for lease_ttl_s, and its next call
    is refused with a 429."""
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    path = _policy(tmp_path, "max_parallel_requests: 1")
    policy = load_policy(path)
    store: Any = open_store(redis_url)
    gateway = Gateway(Settings(policy_path=path, fail_mode="closed"), policy, store)
    orig = _lose_admit_answers(store)
    with pytest.raises(GatewayError) as info:
        await gateway.admit(await gateway.route(HEAD, RAW, policy), policy)
    assert info.value.code == "store_unavailable"
    store._eval = orig
    gateway._store_retry_at = float("-inf")
    await gateway.owed.drain(5)  # the owed cancel gives the slot back with the hold
    await gateway.drain()
    try:
        await gateway.admit(await gateway.route(HEAD, RAW, policy), policy)
        outcome = "admitted"
    except GatewayError as err:
        outcome = err.code
    await store.close()
    print("\nnext call after the 503, store healthy again:", outcome)
    assert outcome == "admitted"


async def test_leases_reaped_then_refused_are_counted(tmp_path: Path) -> None:
    """Was a bug, fixed: A full lease set: a dead peer's lease is
    dropped (reaped) but a live one still fills it, so the call is refused. The old
    take_lease counted leases{reaped} before check_parallel; the new _admit reads the
    reaped count only after read_admitted, which raises first: the metric misses the
    reaped lease."""
    path = _policy(tmp_path, "max_parallel_requests: 1")
    policy = load_policy(path)
    store = MemoryStore()
    gateway = Gateway(Settings(policy_path=path), policy, store)
    decision = await gateway.route(HEAD, RAW, policy)
    assert decision.caller is not None
    key = decision.caller.key
    from extproc.core.leases import Lease  # noqa: PLC0415

    dead, live = "d" * 16, "e" * 16
    for owner in (dead, live):
        lease = Lease.new(key, owner, secrets.token_hex(8))
        store._leases.setdefault(lease.store_key, {})[lease.member] = store._clock() + 600
    gateway.liveness.dead = (dead,)
    with pytest.raises(GatewayError) as info:
        await gateway.admit(decision, policy)
    assert info.value.code == "parallel_request_limit_exceeded"
    reaped = gateway.metrics.leases.labels("reaped")._value.get()
    print(
        "\nleases in the set:",
        len(store._leases[Lease.new(key, dead, "0" * 16).store_key]),
        "reaped metric:",
        reaped,
    )
    assert reaped == 1


async def test_cluster_refusal_whose_hand_back_fails_owes_the_hold(
    tmp_path: Path, redis_cluster_url: str
) -> None:
    """Was a bug, fixed: Redis Cluster: the {spend} slot holds
    the global budget, the tenant slot's rpm refuses. _hand_back's cancel of the {spend}
    hold fails (store blip) and is suppressed; the gateway raises the 429 without owing
    the cancel, so the hold sits on the global budget for the whole reservation_ttl_s
    (the old path owed it)."""
    from extproc.store import StoreUnavailableError  # noqa: PLC0415

    await _flush_cluster(redis_cluster_url)
    path = _policy(tmp_path, "rpm_limit: 0")
    policy = load_policy(path)
    store: Any = open_store(redis_cluster_url)
    gateway = Gateway(Settings(policy_path=path), policy, store)
    orig_cancel = store.cancel

    async def failing_cancel(*a: Any, **k: Any) -> None:
        raise StoreUnavailableError("blip")

    store.cancel = failing_cancel
    with pytest.raises(GatewayError) as info:
        await gateway.admit(await gateway.route(HEAD, RAW, policy), policy)
    store.cancel = orig_cancel
    assert info.value.code == "rpm_limit_exceeded"
    await gateway.drain()
    held = await store.get_many(["{spend}:global:all"])
    owed = len(gateway.owed)
    await store.close()
    print("\nglobal budget after a refused call:", held, "owed writes:", owed)
    assert held in ([0], [None]) or owed


async def test_store_marked_down_counts_the_session_first(tmp_path: Path) -> None:
    """Was a bug, fixed: Fail open, the store marked down (a
    recent failure, store_retry_s not over) but answering: the session is counted in
    process only after the batch ran, so a call over its session cap has already counted
    rpm (and taken and handed back a lease). The old path counted the session first: a
    session refusal left rpm alone."""
    from extproc.core.limits import rpm_key  # noqa: PLC0415

    path = tmp_path / "policy.yaml"
    path.write_text(
        "model_groups: [{name: g, max_iterations: 1, deployments: [{id: a, cluster: c,"
        " model: m}]}]\n"
        f"keys: [{{hash: {hash_key(KEY)}, alias: k, rpm_limit: 100}}]\n"
    )
    policy = load_policy(path)
    store = MemoryStore()
    gateway = Gateway(Settings(policy_path=path, fail_mode="open"), policy, store)
    head = RequestHead(
        "POST",
        "/v1/chat/completions",
        {"authorization": f"Bearer {KEY}", "x-litellm-session-id": "s1"},
    )
    gateway._store_retry_at = float("inf")  # marked down after a failure
    await gateway.admit(await gateway.route(head, RAW, policy), policy)
    decision = await gateway.route(head, RAW, policy)
    with pytest.raises(GatewayError) as info:
        await gateway.admit(decision, policy)
    await gateway.drain()
    assert decision.caller is not None
    rpm = await store.get_many([rpm_key(decision.caller.key)])
    print("\nsession refusal:", info.value.code, "rpm counted:", rpm)
    assert rpm == [1]


async def test_closed_mode_timeout_does_not_count_the_refused_call(
    tmp_path: Path, redis_url: str
) -> None:
    """Was a bug, fixed: Fail closed, single Redis: the admission
    ran (or runs late, as in a SIGSTOP stall) but its answer was lost: the caller gets a
    503, the owed cancel gives the hold back, yet the session count (and rpm) the batch
    made stay: a refused call counted (test_outage's `count == ok + 1` fails
    intermittently for this)."""
    from extproc.core.limits import rpm_key  # noqa: PLC0415

    client = aioredis.from_url(redis_url)
    await client.flushdb()
    path = tmp_path / "policy.yaml"
    path.write_text(
        "model_groups: [{name: g, max_iterations: 5, deployments: [{id: a, cluster: c,"
        " model: m, prices: {input_cost_per_token: 0.001}}]}]\n"
        f"keys: [{{hash: {hash_key(KEY)}, alias: k, max_budget: 5, rpm_limit: 100}}]\n"
    )
    policy = load_policy(path)
    store: Any = open_store(redis_url)
    gateway = Gateway(Settings(policy_path=path, fail_mode="closed"), policy, store)
    head = RequestHead(
        "POST",
        "/v1/chat/completions",
        {"authorization": f"Bearer {KEY}", "x-litellm-session-id": "s1"},
    )
    orig = _lose_admit_answers(store)
    decision = await gateway.route(head, RAW, policy)
    with pytest.raises(GatewayError) as info:
        await gateway.admit(decision, policy)
    store._eval = orig
    assert info.value.code == "store_unavailable"
    await gateway.owed.drain(5)  # the session count the lost batch made is taken back
    await gateway.drain()
    sessions = [k async for k in client.scan_iter(match="*session_iterations*count")]
    counts = [int(await client.get(k) or 0) for k in sessions]
    assert decision.caller is not None
    rpm = await store.get_many([rpm_key(decision.caller.key)])
    await client.aclose()
    await store.close()
    print("\nafter one 503 (nothing admitted): session counts", counts, "rpm", rpm)
    assert counts in ([], [0])
