"""The admin HTTP server (aiohttp): health, metrics, budget read-outs; loopback by default."""

from __future__ import annotations

import contextlib
from decimal import Decimal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from extproc.core.errors import error_body
from extproc.core.pricing import MICROS_PER_DOLLAR
from extproc.state.readouts import BudgetStatus, all_budgets, budget_statuses, provider_budgets_body
from extproc.state.runtime import Gateway
from extproc.store import StoreError

__all__ = ["make_admin_app"]

GATEWAY_KEY = web.AppKey("gateway", Gateway)


async def _healthz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    body: dict[str, object] = {
        "status": "ok",
        "policy": gateway.policy.source,
        "model_groups": len(gateway.policy.groups),
        "store": gateway.store.name,
    }
    status = 200
    try:
        await gateway.store.ping()
    except StoreError as exc:
        body.update(status="degraded", store_error=str(exc))
        status = 503
    if not gateway.ready:
        body["status"] = "shutting_down"
        status = 503
    return web.json_response(body, status=status)


async def _statuses(gateway: Gateway) -> list[BudgetStatus]:
    now = gateway.clock.now()
    return await budget_statuses(gateway.store, all_budgets(gateway.policy, now), now)


def _store_down(exc: StoreError) -> web.Response:
    body = error_body(
        f"The store cannot be read right now: {exc}",
        "service_unavailable_error",
        "store_unavailable",
    )
    return web.Response(status=503, body=body, content_type="application/json")


async def _provider_budgets(request: web.Request) -> web.Response:
    """LiteLLM's ``GET /provider/budgets``."""
    try:
        statuses = await _statuses(request.app[GATEWAY_KEY])
    except StoreError as exc:
        return _store_down(exc)
    return web.json_response(provider_budgets_body(statuses))


async def _budgets(request: web.Request) -> web.Response:
    """Every budget of the policy: limit, spend, remaining, window and reset."""
    try:
        statuses = await _statuses(request.app[GATEWAY_KEY])
    except StoreError as exc:
        return _store_down(exc)
    return web.json_response({"budgets": [s.as_dict() for s in statuses]})


async def _deployments(request: web.Request) -> web.Response:
    """Every deployment's cooldown, in-flight count and this minute's answers."""
    gateway = request.app[GATEWAY_KEY]
    try:
        states = await gateway.router.deployment_states(gateway.policy)
    except StoreError as exc:
        return _store_down(exc)
    return web.json_response({"deployments": states})


async def _metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    with contextlib.suppress(StoreError):
        for dep_id, state in (await gateway.router.deployment_states(gateway.policy)).items():
            gateway.metrics.cooling.labels(dep_id).set(1 if state["cooling_down"] else 0)
    # Remaining provider/deployment/tag budgets are read when scraped; a store
    # failure leaves the last values (the scrape itself still answers).
    with contextlib.suppress(StoreError):
        gauge = gateway.metrics.budget_remaining
        for status in await _statuses(gateway):
            ref = status.ref
            if ref.kind in ("provider", "deployment", "tag") and ref.limit is not None:
                remaining = ref.limit - Decimal(status.spend_micros) / MICROS_PER_DOLLAR
                gauge.labels(ref.kind, ref.ident).set(float(max(remaining, Decimal(0))))
    for store, count in gateway.memory_entries().items():
        gateway.metrics.memory_entries.labels(store).set(count)
    payload = generate_latest(gateway.metrics.registry)
    return web.Response(body=payload, headers={"content-type": CONTENT_TYPE_LATEST})


def make_admin_app(gateway: Gateway) -> web.Application:
    """The admin app; later features add routes here."""
    app = web.Application()
    app[GATEWAY_KEY] = gateway
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/budgets", _budgets)
    app.router.add_get("/deployments", _deployments)
    app.router.add_get("/provider/budgets", _provider_budgets)
    return app
