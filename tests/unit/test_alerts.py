"""Budget alerts: once per window, webhook with retries, failures never raised."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from extproc.core.budgets import BudgetRef
from extproc.core.request import RequestHead
from extproc.core.usage import Usage
from extproc.policy import load_policy
from extproc.state.alerts import Alerter
from extproc.state.metrics import Metrics
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore
from tests.helpers import free_port

REF = BudgetRef("team", "t1", "team t1", Decimal(10), soft=Decimal(5))


async def test_webhook_retried_until_it_answers() -> None:
    seen: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.Response(status=503 if len(seen) == 1 else 204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with TestServer(app, host="127.0.0.1") as server:
        metrics = Metrics()
        alerter = Alerter(MemoryStore(), metrics, str(server.make_url("/hook")))
        for _ in range(3):  # once per window, however often it is crossed
            await alerter.crossed(REF, 6_000_000, "soft_budget")
        await alerter.drain()
    assert len(seen) == 2  # a 503, then the retry that got through
    assert seen[-1]["event"] == "soft_budget"
    assert seen[-1]["budget"] == {
        "kind": "team",
        "name": "team t1",
        "spend": 6.0,
        "soft_budget": 5.0,
        "max_budget": 10.0,
        "threshold": 5.0,
        "window": None,
        "window_resets_at": None,
    }
    assert metrics.alert_webhooks.labels("sent")._value.get() == 1
    assert metrics.soft_budget_alerts.labels("team")._value.get() == 1


async def test_webhook_down_is_logged_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    alerter = Alerter(MemoryStore(), metrics, f"http://127.0.0.1:{free_port()}/hook")
    await alerter.crossed(REF, 12_000_000, "budget_threshold")
    await alerter.drain()
    assert metrics.alert_webhooks.labels("failed")._value.get() == 1
    assert "alert webhook failed after 3 attempts" in caplog.text
    assert "budget threshold crossed for team t1" in caplog.text


ROLLING = """
model_groups:
  - name: g
    deployments:
      - {id: a, cluster: ca, model: m, prices: {input_cost_per_token: 0.001}}
tags:
  - {name: mk, max_budget: 1, budget_duration: 1h}
general_settings: {budget_alert_at: 0.5}
"""


async def test_rolling_window_alert_fires_in_each_window(tmp_path: Path) -> None:
    """A tag budget's window starts at its first spend: its alert ends with it."""
    path = tmp_path / "p.yaml"
    path.write_text(ROLLING)
    policy = load_policy(path)
    t = [0.0]
    store = MemoryStore(clock=lambda: t[0])
    gw = Gateway(Settings(policy_path=path), policy, store)

    async def call(tokens: int) -> None:
        body = {"model": "g", "max_tokens": 1, "metadata": {"tags": ["mk"]}, "messages": []}
        head = RequestHead("POST", "/v1/chat/completions", {})
        decision = await gw.route(head, json.dumps(body).encode(), policy)
        admission = await gw.admit(decision, policy)
        assert admission.charge is not None
        await gw.settle(admission.charge, Usage(input_tokens=tokens), policy)
        await gw.drain()

    alerts = gw.metrics.soft_budget_alerts.labels("tag")
    await call(100)  # t=0: window 1 starts, $0.10
    t[0] = 3000.0
    await call(500)  # $0.60 settled: alert
    assert alerts._value.get() == 1
    t[0] = 3601.0  # window 1 is over (its key expired); window 2 starts
    await call(600)  # $0.60 in window 2: should alert again
    assert alerts._value.get() == 2  # window 2 crossed its share: a second alert
