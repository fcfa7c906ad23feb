"""Session iteration caps: which cap applies, counting across the window, fallback."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from extproc.core.access import hash_key
from extproc.core.decision import GatewayConfig, RouteDecision
from extproc.core.errors import GatewayError
from extproc.core.request import RequestHead
from extproc.core.sessions import counter_key
from extproc.policy import CompiledPolicy, load_policy
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore, StoreUnavailableError
from extproc.store.base import Admission, Admitted
from tests.helpers import decide_request
from tests.unit.test_store import FakeClock

POLICY = Path(__file__).resolve().parent.parent / "policies" / "iterations.yaml"
ENV = {"TEST_KEY_A": "sk-a"}
_NOW = datetime(2026, 11, 23, tzinfo=UTC)


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return load_policy(POLICY, env=ENV)


def route(
    policy: CompiledPolicy,
    key: str,
    session: str | None = "s1",
    model: str = "auto",
    **body: Any,
) -> RouteDecision:
    headers = {"authorization": f"Bearer {key}"}
    if session is not None:
        headers["x-litellm-session-id"] = session
    raw = json.dumps({"model": model, "messages": [], **body}).encode()
    head = RequestHead("POST", "/v1/chat/completions", headers)
    return decide_request(head, raw, policy, GatewayConfig(), lambda: 0.1, now=_NOW)


@pytest.mark.parametrize(
    ("key", "model", "cap", "scope"),
    [
        ("sk-iter-agent", "auto", 3, f"key:{hash_key('sk-iter-agent')}"),  # agent over metadata
        ("sk-iter-meta", "auto", 4, f"key:{hash_key('sk-iter-meta')}"),
        ("sk-iter-team-a1", "auto", 50, "team:team-a"),
        ("sk-iter-plain", "capped", 2, f"key:{hash_key('sk-iter-plain')}"),  # group's cap
        ("sk-iter-meta", "capped", 4, f"key:{hash_key('sk-iter-meta')}"),  # key's wins
    ],
)
def test_which_cap_applies(
    policy: CompiledPolicy, key: str, model: str, cap: int, scope: str
) -> None:
    decision = route(policy, key, model=model)
    assert decision.iterations is not None
    assert decision.iterations.cap == cap
    assert decision.iterations.store_key == f"{{t:{scope}}}:session_iterations:s1:count"


def test_uncapped(policy: CompiledPolicy) -> None:
    assert route(policy, "sk-iter-agent", session=None).iterations is None  # no session
    assert route(policy, "sk-iter-plain").iterations is None  # no cap anywhere


def test_session_from_body_metadata(policy: CompiledPolicy) -> None:
    for container in ("metadata", "litellm_metadata"):
        body: dict[str, Any] = {container: {"session_id": "from-body"}}
        decision = route(policy, "sk-iter-meta", None, "auto", **body)
        assert decision.iterations is not None
        assert decision.iterations.session_id == "from-body"


def make_gateway(policy: CompiledPolicy, store: Any = None, **settings: Any) -> Gateway:
    return Gateway(Settings(policy_path=POLICY, **settings), policy, store or MemoryStore())


async def test_cap_counts_rejected_calls_and_resets_with_the_window(
    policy: CompiledPolicy,
) -> None:
    clock = FakeClock()
    gateway = make_gateway(policy, MemoryStore(clock), max_iterations_ttl=60)
    decision = route(policy, "sk-iter-agent")  # cap 3
    counts = [await gateway.count_iteration(decision.iterations) for _ in range(3)]
    assert [(c.limit, c.remaining) for c in counts if c] == [(3, 2), (3, 1), (3, 0)]
    clock.now += 59
    with pytest.raises(GatewayError) as info:
        await gateway.count_iteration(decision.iterations)
    err = info.value
    assert (err.status, err.code) == (429, "max_iterations_exceeded")
    assert (
        err.message
        == "Max iterations exceeded for session s1. Current count: 4, max_iterations: 3."
    )
    assert err.headers == {
        "retry-after": "1",
        "x-session-iterations-limit": "3",
        "x-session-iterations-remaining": "0",
    }
    with pytest.raises(GatewayError):  # still counted: 5 > 3
        await gateway.count_iteration(decision.iterations)
    clock.now += 1  # the window from the first call has run out
    fresh = await gateway.count_iteration(decision.iterations)
    assert fresh is not None
    assert fresh.remaining == 2


async def test_tenants_do_not_share_a_session_id(policy: CompiledPolicy) -> None:
    gateway = make_gateway(policy)
    a1, a2, b = (route(policy, k) for k in ("sk-iter-team-a1", "sk-iter-team-a2", "sk-iter-team-b"))
    for _ in range(3):
        await gateway.count_iteration(a1.iterations)
    same_team = await gateway.count_iteration(a2.iterations)
    other_team = await gateway.count_iteration(b.iterations)
    assert same_team is not None
    assert other_team is not None
    assert (same_team.remaining, other_team.remaining) == (46, 49)


class FlakyStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.calls = 0

    async def admit(self, admission: Admission) -> Admitted:
        self.calls += 1
        if self.down:
            raise StoreUnavailableError("connection refused")
        return await super().admit(admission)

    async def incr_once(
        self, key: str, amount: int, ttl_s: float, *, marker: str, keep_s: float = 900
    ) -> tuple[int, float, bool]:
        self.calls += 1
        if self.down:
            raise StoreUnavailableError("connection refused")
        return await super().incr_once(key, amount, ttl_s, marker=marker, keep_s=keep_s)

    async def get_many(self, keys: Sequence[str]) -> list[int | None]:
        return [None for _ in keys]


async def test_store_down_counts_in_process_then_goes_back(
    policy: CompiledPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore()
    gateway = make_gateway(policy, store, store_retry_s=0)
    decision = route(policy, "sk-iter-agent")  # cap 3
    for _ in range(3):
        await gateway.count_iteration(decision.iterations)  # no 5xx: counted in process
    with pytest.raises(GatewayError) as info:
        await gateway.count_iteration(decision.iterations)
    assert info.value.status == 429  # the in-process count still caps
    assert gateway.metrics.iterations_fallback._value.get() == 4
    assert caplog.text.count("store unavailable") == 1  # logged once per interval
    store.down = False
    # counting in the store again, and the 4 calls counted in process are owed to it
    with pytest.raises(GatewayError) as info:
        await gateway.count_iteration(decision.iterations)
    assert info.value.status == 429
    await gateway.owed.drain(5)
    assert len(gateway.owed) == 0
    assert decision.iterations is not None
    assert await MemoryStore.get_many(store, [decision.iterations.store_key]) == [5]
    await gateway.close()


async def test_counts_owed_to_the_store_keep_the_cap_exact(policy: CompiledPolicy) -> None:
    """Counted in process while the store is down, then in the store: the cap holds
    across both, and the store ends with every call counted once."""
    store = FlakyStore()
    gateway = make_gateway(policy, store, store_retry_s=0)
    decision = route(policy, "sk-iter-agent")  # cap 3
    assert decision.iterations is not None
    await gateway.count_iteration(decision.iterations)  # 1, in process
    store.down = False
    back = await gateway.count_iteration(decision.iterations)  # 2: 1 in the store + 1 owed
    assert back is not None
    assert back.remaining == 1
    await gateway.owed.drain(5)
    assert await MemoryStore.get_many(store, [decision.iterations.store_key]) == [2]
    await gateway.close()


async def test_store_retry_interval_skips_the_store(policy: CompiledPolicy) -> None:
    store = FlakyStore()
    gateway = make_gateway(policy, store, store_retry_s=60)
    decision = route(policy, "sk-iter-meta")
    for _ in range(3):
        await gateway.count_iteration(decision.iterations)
    assert store.calls == 1  # a dead store is not asked again on every request


async def test_store_down_fail_closed_is_a_503(policy: CompiledPolicy) -> None:
    gateway = make_gateway(policy, FlakyStore(), fail_mode="closed")
    decision = route(policy, "sk-iter-agent")
    for _ in range(2):
        with pytest.raises(GatewayError) as info:
            await gateway.count_iteration(decision.iterations)
        assert (info.value.status, info.value.code) == (503, "store_unavailable")


def test_counter_key_has_one_hash_tag() -> None:
    assert counter_key(("team", "t"), "abc") == "{t:team:t}:session_iterations:abc:count"
    assert counter_key(("anon",), "abc") == "{t:anon:abc}:session_iterations:abc:count"
    # ids with ':' make different counters, and cannot move the hash tag
    assert counter_key(("team", "t"), "u:s") != counter_key(("team", "t:u"), "s")
    assert counter_key(("team", "t"), "x}{y") == "{t:team:t}:session_iterations:x%7D%7By:count"


def test_ttl_from_litellm_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_MAX_ITERATIONS_TTL", "120")
    assert Settings().max_iterations_ttl == 120
    monkeypatch.setenv("EXTPROC_MAX_ITERATIONS_TTL", "30")
    assert Settings().max_iterations_ttl == 30


async def test_counting_in_process_goes_on_from_the_stores_last_count(
    policy: CompiledPolicy,
) -> None:
    """Two calls counted in the store, then the store fails: the in-process count
    starts at 2, so the cap of 3 still admits one call, not three more."""
    store = FlakyStore()
    store.down = False
    gateway = make_gateway(policy, store, store_retry_s=0)
    decision = route(policy, "sk-iter-agent")  # cap 3
    for _ in range(2):
        await gateway.count_iteration(decision.iterations)
    store.down = True
    third = await gateway.count_iteration(decision.iterations)  # in process: 3
    assert third is not None
    assert third.remaining == 0
    with pytest.raises(GatewayError) as info:
        await gateway.count_iteration(decision.iterations)
    assert info.value.code == "max_iterations_exceeded"
    store.down = False
    await gateway.owed.drain(5)
    assert decision.iterations is not None
    # the store got the two calls counted in process once each, not the seed
    assert await MemoryStore.get_many(store, [decision.iterations.store_key]) == [4]
    await gateway.close()
