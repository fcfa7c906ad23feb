"""A store that answers with an error is not a store that is down.

Unavailable (refused, reset, timed out): the fail mode applies. Answered with an
error (a script error, a key of the wrong type, an answer that makes no sense, an
amount out of range): the call is refused with a 500, whatever the fail mode, and
nothing is left half-written.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from extproc.core.decision import GatewayConfig, RouteDecision
from extproc.core.errors import GatewayError
from extproc.core.request import RequestHead
from extproc.policy import load_policy
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import (
    MemoryStore,
    StoreFaultError,
    StoreTools,
    StoreUnavailableError,
    open_store,
)
from extproc.store.base import MAX_AMOUNT_MICROS, Admission, Admitted, Ceiling, Count, Take
from extproc.store.redis import RedisStore
from tests.helpers import decide_request, free_port
from tests.unit.test_budgets import NOW

POLICIES = Path(__file__).resolve().parent.parent / "policies"
BUDGETS = POLICIES / "budgets.yaml"
ITERATIONS = POLICIES / "iterations.yaml"
ENV = {"TEST_KEY_A": "sk-a"}
A, B = "{spend}:key:fault-a", "{spend}:global:fault-b"


def _answering(url: str) -> RedisStore:
    """A store for tests of what Redis answers, not of how long it takes: a full
    garbage collection of the test process landing in a call (a tenth of a second or
    more, late in the suite) must not make the 0.25 s default time it out."""
    return RedisStore.from_url(url, timeout_s=5.0)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StoreTools]:
    if request.param == "memory":
        yield MemoryStore()
        return
    url = request.getfixturevalue("redis_url")
    opened = open_store(url)
    client = aioredis.from_url(url)
    await client.delete(A, B)
    await client.aclose()
    yield opened
    await opened.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    await client.flushdb()  # ended-reservation markers of other tests too
    yield client
    await client.delete(A, B, "t:fault")
    await client.aclose()


# --- the stores ----------------------------------------------------------------------


@pytest.mark.parametrize("amount", [-1, MAX_AMOUNT_MICROS + 1, 10**30, True])
async def test_amount_out_of_range_is_refused_before_it_is_sent(
    store: StoreTools, amount: int
) -> None:
    with pytest.raises(StoreFaultError, match="out of range"):
        await store.reserve("r" * 32, [A], limits=[None], amount=amount, ttls_s=[None], hold_s=60)
    with pytest.raises(StoreFaultError, match="out of range"):
        await store.settle("r" * 32, [A], amount, [None])
    assert await store.get_many([A]) == [None]


async def test_largest_amount_is_exact(store: StoreTools) -> None:
    """At the bound amounts stay exact (no Lua double or cjson number rounds them)."""
    amount = MAX_AMOUNT_MICROS - 1
    rid = "e" * 32
    await store.reserve(rid, [A], limits=[None], amount=amount, ttls_s=[None], hold_s=60)
    await store.reserve("f" * 32, [A], limits=[None], amount=amount, ttls_s=[None], hold_s=60)
    await store.cancel(rid, [A])
    assert await store.get_many([A]) == [amount]
    await store.settle("f" * 32, [A], 123_456_789_012, [None])
    assert await store.get_many([A]) == [123_456_789_012]


async def test_huge_limits_are_still_limits(store: StoreTools) -> None:
    index, _ = await store.reserve(
        "h" * 32, [A], limits=[10**30], amount=5, ttls_s=[None], hold_s=60
    )
    assert index is None


async def test_redis_down_is_unavailable() -> None:
    store = open_store(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreUnavailableError):
        await store.reserve("d" * 32, [A], limits=[None], amount=1, ttls_s=[None], hold_s=1)
    with pytest.raises(StoreUnavailableError):
        await store.incr_window("k", 1, 1)
    await store.close()


async def test_a_redis_out_of_memory_is_unavailable_not_a_fault(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    # no request can cause it: the fail mode decides, as for a Redis that is down
    store = _answering(redis_url)
    await redis_client.config_set("maxmemory", "1")
    try:
        with pytest.raises(StoreUnavailableError, match="OutOfMemory"):
            await store.reserve("o" * 32, [A], limits=[None], amount=1, ttls_s=[None], hold_s=1)
        with pytest.raises(StoreUnavailableError, match="OutOfMemory"):
            await store.incr_window("t:oom", 1, 10)
    finally:
        await redis_client.config_set("maxmemory", "0")
        await store.close()


async def test_wrong_type_budget_key_changes_nothing(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    store = _answering(redis_url)
    await redis_client.hset(B, "x", "1")  # a budget key that is not a counter
    with pytest.raises(StoreFaultError, match="not an integer") as info:
        await store.reserve(
            "w" * 32, [A, B], limits=[None, None], amount=7, ttls_s=[None, None], hold_s=60
        )
    assert not isinstance(info.value, StoreUnavailableError)
    # the first budget was not charged, no hold was remembered
    assert await redis_client.get(A) is None
    assert not await redis_client.hexists("{spend}:reservations", "w" * 32)
    with pytest.raises(StoreFaultError):
        await store.settle("w" * 32, [A, B], 7, [None, None])
    assert await redis_client.get(A) is None
    await store.close()


@pytest.mark.parametrize("junk", [b"1.5", b"abc", b"99999999999999999999"])
async def test_counter_that_is_not_an_integer_changes_nothing(
    redis_url: str, redis_client: aioredis.Redis, junk: bytes
) -> None:
    store = _answering(redis_url)
    await redis_client.set(B, junk)
    with pytest.raises(StoreFaultError):
        await store.reserve(
            "j" * 32, [A, B], limits=[None, None], amount=7, ttls_s=[None, None], hold_s=60
        )
    assert await redis_client.get(A) is None
    assert await redis_client.get(B) == junk
    await store.close()


async def test_expired_hold_on_a_broken_key_is_still_dropped(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Giving back expired holds is best effort per key: one broken counter must not
    stop every later reservation (nor be given back twice)."""
    store = _answering(redis_url)
    await store.reserve(
        "x" * 32, [A, B], limits=[None, None], amount=5, ttls_s=[None, None], hold_s=60
    )
    await redis_client.zadd("{spend}:reservations:expiry", {"x" * 32: 0})  # expired
    await redis_client.delete(B)
    await redis_client.hset(B, "x", "1")
    await store.reserve("y" * 32, [A], limits=[None], amount=3, ttls_s=[None], hold_s=60)
    assert await redis_client.get(A) == b"3"  # the expired 5 given back, the 3 held
    assert not await redis_client.hexists("{spend}:reservations", "x" * 32)
    await store.close()


async def test_other_operations_answering_errors_are_faults(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    store = _answering(redis_url)
    await redis_client.hset("t:fault", "x", "1")
    with pytest.raises(StoreFaultError):
        await store.incr_window("t:fault", 1, 10)
    with pytest.raises(StoreFaultError):
        await store.acquire_lease("t:fault", "m", 5, 10)
    with pytest.raises(StoreFaultError):
        await store.snapshot(["t:fault"], [])
    assert await store.get_many(["t:fault"]) == [None]  # MGET reads a hash as absent
    await redis_client.delete("t:fault")
    await redis_client.set("t:fault", "not a number")
    with pytest.raises(StoreFaultError, match="malformed"):
        await store.get_many(["t:fault"])
    with pytest.raises(StoreFaultError):
        await store.incr_window("t:fault", 2**63, 10)  # never sent: outside int64
    await store.close()


# --- the gateway: faults refuse, whatever the fail mode ------------------------------


class FaultStore(MemoryStore):
    """Answers one kind of request-path operation with an error (all: every kind)."""

    def __init__(self, fail: str = "all") -> None:
        super().__init__()
        self.fail = fail

    def _check(self, operation: str) -> None:
        if self.fail in (operation, "all"):
            raise StoreFaultError(f"redis {operation} answered ResponseError: WRONGTYPE")

    async def reserve(self, *args: Any, **kwargs: Any) -> tuple[int | None, list[int]]:
        self._check("reserve")
        return await super().reserve(*args, **kwargs)

    async def admit(self, admission: Admission) -> Admitted:
        if admission.budgets:
            self._check("reserve")
        for step in admission.steps:
            if isinstance(step, Take):
                self._check("lease")
            elif isinstance(step, Count | Ceiling):
                self._check("rate_limit" if ":ratelimit:" in step.key else "session_count")
        return await super().admit(admission)

    async def incr_window(self, key: str, amount: int, ttl_s: float) -> tuple[int, float]:
        self._check("rate_limit" if ":ratelimit:" in key else "session_count")
        return await super().incr_window(key, amount, ttl_s)

    async def incr_once(
        self, key: str, amount: int, ttl_s: float, *, marker: str, keep_s: float = 900
    ) -> tuple[int, float, bool]:
        self._check("rate_limit" if ":ratelimit:" in key else "session_count")
        return await super().incr_once(key, amount, ttl_s, marker=marker, keep_s=keep_s)

    async def acquire_lease(
        self, key: str, member: str, limit: int, ttl_s: float, **kwargs: Any
    ) -> tuple[bool, int, int]:
        self._check("lease")
        return await super().acquire_lease(key, member, limit, ttl_s, **kwargs)

    async def snapshot(
        self, keys: Sequence[str], lists: Sequence[str]
    ) -> tuple[list[tuple[int | None, float | None]], list[list[float]]]:
        self._check("routing")
        return await super().snapshot(keys, lists)


def _route(policy_path: Path, key: str, session: str | None = None) -> tuple[Any, RouteDecision]:
    policy = load_policy(policy_path, env=ENV)
    headers = {"authorization": f"Bearer {key}"}
    if session is not None:
        headers["x-litellm-session-id"] = session
    head = RequestHead("POST", "/v1/chat/completions", headers)
    raw = json.dumps({"model": "auto", "messages": []}).encode()
    return policy, decide_request(head, raw, policy, GatewayConfig(), lambda: 0.1, now=NOW)


CASES = [
    ("reserve", BUDGETS, "sk-sam-budget", None),
    ("rate_limit", BUDGETS, "sk-uma-rpm", None),
    ("lease", BUDGETS, "sk-zed-parallel", None),
    ("session_count", ITERATIONS, "sk-iter-agent", "s1"),
]


@pytest.mark.parametrize("mode", ["open", "closed"])
@pytest.mark.parametrize(
    ("operation", "policy_path", "key", "session"), CASES, ids=[c[0] for c in CASES]
)
async def test_fault_refuses_the_call_in_both_fail_modes(
    mode: str,
    operation: str,
    policy_path: Path,
    key: str,
    session: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy, decision = _route(policy_path, key, session)
    settings = Settings(policy_path=policy_path, fail_mode=mode)  # type: ignore[arg-type]
    gateway = Gateway(settings, policy, FaultStore(operation))
    for _ in range(3):
        with pytest.raises(GatewayError) as info:
            await gateway.admit(decision, policy)
        assert (info.value.status, info.value.code) == (500, "internal_error")
    # one batch admits the call: its faults are counted as the admission's
    assert gateway.metrics.store_faults.labels("admission")._value.get() == 3
    assert gateway.metrics.fail_mode_used.labels(mode)._value.get() == 0
    # logged once, with the reason, no traceback
    assert caplog.text.count("store answered") == 1
    assert "WRONGTYPE" in caplog.text or "malformed" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_routing_read_fault_refuses(mode: str) -> None:
    policy = load_policy(BUDGETS, env=ENV)
    settings = Settings(policy_path=BUDGETS, fail_mode=mode, routing_cache_s=0)  # type: ignore[arg-type]
    gateway = Gateway(settings, policy, FaultStore())
    head = RequestHead("POST", "/v1/chat/completions", {"authorization": "Bearer sk-sam-budget"})
    with pytest.raises(GatewayError) as info:
        await gateway.route(head, b'{"model": "auto", "messages": []}', policy)
    assert (info.value.status, info.value.code) == (500, "internal_error")
    assert gateway.metrics.store_faults.labels("routing")._value.get() == 1


async def test_session_count_fault_does_not_fall_back_to_counting_in_process() -> None:
    policy, decision = _route(ITERATIONS, "sk-iter-agent", "s1")
    gateway = Gateway(Settings(policy_path=ITERATIONS), policy, FaultStore())
    for _ in range(5):
        with pytest.raises(GatewayError):
            await gateway.count_iteration(decision.iterations)
    assert gateway.metrics.iterations_fallback._value.get() == 0


async def test_wrong_type_key_in_redis_refuses_through_the_gateway(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    policy, decision = _route(BUDGETS, "sk-sam-budget")
    key = decision.budgets[0].store_key
    await redis_client.delete(key)
    await redis_client.hset(key, "x", "1")
    store = _answering(redis_url)
    gateway = Gateway(Settings(policy_path=BUDGETS, fail_mode="open"), policy, store)
    try:
        with pytest.raises(GatewayError) as info:
            await gateway.reserve(decision, policy)
        assert (info.value.status, info.value.code) == (500, "internal_error")
        assert gateway.metrics.fail_mode_used.labels("open")._value.get() == 0
    finally:
        await redis_client.delete(key)
        await store.close()


@pytest.mark.parametrize(
    ("message", "unavailable"),
    [
        ("BUSY Redis is busy running a script. You can only call SCRIPT KILL", True),
        ("MISCONF Redis is configured to save RDB snapshots, but it's unable to", True),
        ("NOREPLICAS Not enough good replicas to write.", True),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
        ("ERR Error running script (call to f_x): user_script:1: bad", False),
    ],
)
def test_which_redis_answers_mean_it_cannot_serve(message: str, unavailable: bool) -> None:
    from redis.exceptions import ResponseError  # noqa: PLC0415

    from extproc.store.redis import _guard  # noqa: PLC0415

    kind = StoreUnavailableError if unavailable else StoreFaultError
    with pytest.raises(kind), _guard("reserve"):
        raise ResponseError(message)
