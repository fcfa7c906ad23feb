"""Per-key rpm/tpm over fixed windows, on the memory store with a fake clock."""

from __future__ import annotations

import pytest

from extproc.core.errors import GatewayError
from extproc.core.limits import tpm_key
from extproc.core.usage import Usage
from extproc.policy import CompiledPolicy, load_policy
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore
from tests.unit.test_budgets import POLICY, route
from tests.unit.test_store import FakeClock


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return load_policy(POLICY, env={"TEST_KEY_A": "sk-a"})


async def test_rpm_window_and_retry_after(policy: CompiledPolicy) -> None:
    clock = FakeClock()
    gateway = Gateway(Settings(policy_path=POLICY), policy, MemoryStore(clock))
    decision = route(policy, "sk-uma-rpm")
    for _ in range(10):
        await gateway.admit(decision, gateway.policy)
    clock.now += 20
    with pytest.raises(GatewayError) as info:
        await gateway.admit(decision, gateway.policy)
    err = info.value
    assert (err.status, err.code) == (429, "rpm_limit_exceeded")
    assert err.response_headers()["retry-after"] == "40"
    clock.now += 40  # the window has run out
    await gateway.admit(decision, gateway.policy)


async def test_tpm_reached(policy: CompiledPolicy) -> None:
    store = MemoryStore()
    gateway = Gateway(Settings(policy_path=POLICY), policy, store)
    decision = route(policy, "sk-vic-tpm")
    assert decision.caller is not None
    await store.incr(tpm_key(decision.caller.key), 999, 60)
    await gateway.admit(decision, gateway.policy)
    await store.incr(tpm_key(decision.caller.key), 1, 60)
    with pytest.raises(GatewayError) as info:
        await gateway.admit(decision, gateway.policy)
    assert (info.value.status, info.value.code) == (429, "tpm_limit_exceeded")
    assert "retry-after" in info.value.response_headers()


async def test_tpm_counts_settled_usage(policy: CompiledPolicy) -> None:
    gateway = Gateway(Settings(policy_path=POLICY), policy, MemoryStore())
    decision = route(policy, "sk-vic-tpm")  # 1000 tokens a minute
    admission = await gateway.admit(decision, gateway.policy)
    assert admission.charge is not None
    await gateway.settle(admission.charge, Usage(input_tokens=600, output_tokens=300))
    second = await gateway.admit(decision, gateway.policy)  # 900 < 1000
    assert second.charge is not None
    await gateway.settle(second.charge, Usage(input_tokens=50, cached_input_tokens=50))
    with pytest.raises(GatewayError) as info:  # 1000 reached
        await gateway.admit(decision, gateway.policy)
    assert info.value.code == "tpm_limit_exceeded"
