"""Policy reload: the snapshot is swapped whole, and a bad file changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from extproc.core.metering import ResponseMeter
from extproc.core.request import RequestHead
from extproc.policy import load_policy
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore
from extproc.store.base import Admission, Admitted, Finish
from tests.helpers import StoppedClock

ONE = "model_groups: [{name: first, deployments: [{id: a, cluster: c, model: m}]}]\n"
TWO = ONE + "  - {name: second, deployments: [{id: b, cluster: c, model: m}]}\n"


def test_reload_swaps_policy_and_keeps_old_on_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(ONE)
    gateway = Gateway(Settings(policy_path=path), load_policy(path), MemoryStore())
    old = gateway.policy
    path.write_text(TWO.replace("model_groups: [", "model_groups:\n  - ").replace("]}]\n", "]}\n"))
    assert gateway.reload_policy()
    assert set(gateway.policy.groups) == {"first", "second"}
    assert gateway.policy is not old

    current = gateway.policy
    path.write_text("model_groups: [{name: broken, deployments: [{id: a, model: m}]}]")
    assert not gateway.reload_policy()
    assert gateway.policy is current
    assert "model_groups[0].deployments[0].cluster: Field required" in caplog.text
    assert gateway.metrics.policy_reloads.labels("error")._value.get() == 1


class _SlowSettle(MemoryStore):
    """Settlements that take a while, like a store round trip under load."""

    async def finish(self, finish: Finish) -> list[int]:
        await asyncio.sleep(0.05)
        return await super().finish(finish)


async def test_a_settlement_survives_the_stream_being_reset_meanwhile(tmp_path: Path) -> None:
    """Envoy may reset the stream while the last piece's settlement waits on the
    store: the adapter has let go of the charge, so the settlement must finish."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        "model_groups: [{name: g, deployments: [{id: a, cluster: c, model: m,"
        " prices: {input_cost_per_token: 0.001}}]}]\n"
        "general_settings: {max_budget: 100}\n"
    )
    store = _SlowSettle()
    policy = load_policy(path)
    gateway = Gateway(Settings(policy_path=path), policy, store)
    raw = json.dumps({"model": "g", "messages": []}).encode()
    head = RequestHead("POST", "/v1/chat/completions", {})
    decision = await gateway.route(head, raw, policy)
    admission = await gateway.admit(decision, policy)
    assert admission.charge is not None
    meter = ResponseMeter(admission.charge, content_type="application/json", encoding="")
    meter.feed(b'{"usage": {"prompt_tokens": 1000, "completion_tokens": 0}}', end=True)
    task = asyncio.create_task(gateway.settle_metered(admission.charge, meter, policy))
    await asyncio.sleep(0.01)
    task.cancel()  # the stream is reset while the settlement is with the store
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await gateway.drain()
    key = admission.charge.keys[0]
    assert await store.get_many([key]) == [1_000_000]  # 1000 tokens at $0.001: $1
    assert gateway.metrics.settlements.labels("settled")._value.get() == 1


async def test_a_call_refused_after_its_reservation_leaves_in_flight_counts_alone(
    tmp_path: Path,
) -> None:
    """A 429 from the rpm limit comes after the hold but before the call is counted in
    flight (least-busy): handing the hold back must not take a count it never added."""
    from extproc.core.access import hash_key  # noqa: PLC0415
    from extproc.core.errors import GatewayError  # noqa: PLC0415
    from extproc.core.health import inflight_key  # noqa: PLC0415

    key = "sk-review-rpm"
    path = tmp_path / "policy.yaml"
    path.write_text(
        "model_groups: [{name: g, routing_strategy: least-busy, deployments: [{id: a,"
        " cluster: c, model: m, prices: {input_cost_per_token: 0.000001}}]}]\n"
        f"keys: [{{hash: {hash_key(key)}, alias: k, rpm_limit: 1}}]\n"
    )
    policy = load_policy(path)
    store = MemoryStore()
    gateway = Gateway(Settings(policy_path=path), policy, store, rng=lambda: 0.0)
    head = RequestHead("POST", "/v1/chat/completions", {"authorization": f"Bearer {key}"})
    raw = json.dumps({"model": "g", "messages": []}).encode()
    await gateway.admit(await gateway.route(head, raw, policy), policy)  # in flight: 1
    with pytest.raises(GatewayError) as info:
        await gateway.admit(await gateway.route(head, raw, policy), policy)
    assert info.value.code == "rpm_limit_exceeded"
    await gateway.drain()
    assert await store.get_many([inflight_key("a")]) == [1]


async def test_routing_reads_the_injected_clock(tmp_path: Path) -> None:
    """The clock minute of usage-based routing and the retry-after of a full minute
    come from the gateway's clock: a fake one moves across the minute, no sleeping."""
    from datetime import UTC, datetime, timedelta  # noqa: PLC0415

    from extproc.core.errors import GatewayError  # noqa: PLC0415
    from tests.helpers import StoppedClock  # noqa: PLC0415

    path = tmp_path / "policy.yaml"
    path.write_text(
        "model_groups: [{name: g, routing_strategy: usage-based-routing, deployments: ["
        "{id: a, cluster: c, model: m, rpm: 1}]}]\n"
    )
    policy = load_policy(path)
    clock = StoppedClock(datetime(2026, 11, 23, 12, 0, 20, tzinfo=UTC))
    gateway = Gateway(Settings(policy_path=path), policy, MemoryStore(), clock=clock)
    head = RequestHead("POST", "/v1/chat/completions", {})
    raw = json.dumps({"model": "g", "messages": []}).encode()
    await gateway.admit(await gateway.route(head, raw, policy), policy)  # the minute's one
    with pytest.raises(GatewayError) as info:
        await gateway.route(head, raw, policy)
    assert (info.value.code, info.value.headers["retry-after"]) == ("deployments_at_capacity", "40")
    clock.at += timedelta(seconds=40)  # the next minute: a fresh count
    assert (await gateway.route(head, raw, policy)).deployment.id == "a"


LIMITED = (
    "model_groups: [{name: g, routing_strategy: cost-based-routing, deployments: ["
    "{id: cheap, cluster: c, model: m, rpm: 3, tpm: 1000,"
    " prices: {input_cost_per_token: 0.000001, output_cost_per_token: 0.000002}},"
    "{id: dear, cluster: c, model: m,"
    " prices: {input_cost_per_token: 0.00001, output_cost_per_token: 0.00002}}]}]\n"
)


async def test_cost_based_routing_keeps_a_deployment_to_its_rpm_for_the_minute(
    tmp_path: Path,
) -> None:
    """The cheap deployment (rpm 3) takes the minute's first three calls, the dear
    one the rest, and the next minute starts over; the dear one, without a limit,
    is counted nowhere (a routed call's counters cost CPU)."""
    from datetime import timedelta  # noqa: PLC0415

    from extproc.core.health import minute_key  # noqa: PLC0415

    path = tmp_path / "policy.yaml"
    path.write_text(LIMITED)
    policy = load_policy(path)
    clock = StoppedClock(datetime(2026, 11, 23, 12, 0, 20, tzinfo=UTC))
    store = MemoryStore()
    # the routing cache on: a group with limits reads its counts on every call
    settings = Settings(policy_path=path, routing_cache_s=30.0)
    gateway = Gateway(settings, policy, store, clock=clock)
    head = RequestHead("POST", "/v1/chat/completions", {})
    raw = json.dumps({"model": "g", "messages": []}).encode()

    async def served() -> str:
        admission = await gateway.admit(await gateway.route(head, raw, policy), policy)
        assert admission.charge is not None
        return admission.charge.deployment

    assert [await served() for _ in range(5)] == ["cheap"] * 3 + ["dear"] * 2
    minute = int(clock.wall() // 60)
    counts = await store.get_many([minute_key(d, minute, "rpm") for d in ("cheap", "dear")])
    assert counts == [3, None]
    clock.at += timedelta(seconds=40)
    assert await served() == "cheap"
    await gateway.drain()


async def test_a_deployment_tpm_counts_settled_usage_for_every_strategy(tmp_path: Path) -> None:
    """The tokens of a call's usage count toward its deployment's tpm at settlement:
    once the cheap one's minute holds 1000, cost-based routing goes to the dear one."""
    from extproc.core.health import minute_key  # noqa: PLC0415
    from extproc.core.usage import Usage  # noqa: PLC0415

    path = tmp_path / "policy.yaml"
    path.write_text(LIMITED.replace("rpm: 3, ", ""))
    policy = load_policy(path)
    clock = StoppedClock(datetime(2026, 11, 23, 12, 0, 20, tzinfo=UTC))
    store = MemoryStore()
    gateway = Gateway(Settings(policy_path=path), policy, store, clock=clock)
    head = RequestHead("POST", "/v1/chat/completions", {})
    raw = json.dumps({"model": "g", "messages": []}).encode()
    first = await gateway.admit(await gateway.route(head, raw, policy), policy)
    assert first.charge is not None
    assert first.charge.deployment == "cheap"
    await gateway.settle(first.charge, Usage(input_tokens=600, output_tokens=400))
    minute = int(clock.wall() // 60)
    assert await store.get_many([minute_key("cheap", minute, w) for w in ("rpm", "tpm")]) == [
        None,
        1000,
    ]
    assert (await gateway.route(head, raw, policy)).deployment.id == "dear"
    await gateway.drain()


class _CountingStore(MemoryStore):
    """Counts the calls the request path makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def admit(self, admission: Admission) -> Admitted:
        self._count("admit")
        return await super().admit(admission)

    async def finish(self, finish: Finish) -> list[int]:
        self._count("finish")
        return await super().finish(finish)

    async def snapshot(self, keys: Any, lists: Any) -> Any:
        self._count("snapshot")
        return await super().snapshot(keys, lists)


async def test_a_policy_without_keys_caps_or_budgets_makes_no_store_call(tmp_path: Path) -> None:
    """Nothing to hold, count or take: no admission or settlement batch; routing reads
    the cooldowns once per routing-cache window, not once per call."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        "model_groups: [{name: g, deployments: [{id: a, cluster: c, model: m, weight: 2},"
        " {id: b, cluster: d, model: m}]}]\n"
    )
    store = _CountingStore()
    clock = StoppedClock(datetime(2026, 12, 1, tzinfo=UTC))
    gateway = Gateway(Settings(policy_path=path), load_policy(path), store, clock=clock)
    raw = json.dumps({"model": "g", "messages": []}).encode()
    head = RequestHead("POST", "/v1/chat/completions", {})
    for _ in range(20):
        _, admission = await gateway.route_and_admit(head, raw, gateway.policy)
        assert admission.charge is not None
        await gateway.settle(admission.charge, None)
    assert store.calls == {"snapshot": 1}


async def test_a_failover_calls_latency_sample_is_the_serving_deployments(tmp_path: Path) -> None:
    """Latency-based routing learns from the deployment that answered: a call that
    failed over to ``b`` adds its seconds per token to ``b``'s samples, not ``a``'s."""
    import dataclasses  # noqa: PLC0415

    from extproc.core.health import latency_key  # noqa: PLC0415

    path = tmp_path / "policy.yaml"
    path.write_text(
        "model_groups: [{name: g, routing_strategy: latency-based-routing, num_retries: 1,"
        " deployments: [{id: a, cluster: ca, model: m}, {id: b, cluster: cb, model: m}]}]\n"
    )
    store = MemoryStore()
    policy = load_policy(path)
    gateway = Gateway(Settings(policy_path=path), policy, store, rng=lambda: 0.0)
    raw = json.dumps({"model": "g", "messages": []}).encode()
    head = RequestHead("POST", "/v1/chat/completions", {})
    _, admission = await gateway.route_and_admit(head, raw, policy)
    assert admission.charge is not None
    first = admission.charge.deployment
    other = "b" if first == "a" else "a"
    charge = dataclasses.replace(admission.charge, served=other)
    meter = ResponseMeter(charge, content_type="application/json", encoding="")
    meter.feed(b'{"usage": {"prompt_tokens": 10, "completion_tokens": 5}}', end=True)
    await gateway.settle_metered(charge, meter, policy)
    await gateway.drain()
    _, samples = await store.snapshot([], [latency_key(first), latency_key(other)])
    assert samples[0] == []
    assert len(samples[1]) == 1
