"""The admin HTTP server (aiohttp): health and metrics, loopback by default."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from extproc.gateway import Gateway
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


async def _metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    payload = generate_latest(gateway.metrics.registry)
    return web.Response(body=payload, headers={"content-type": CONTENT_TYPE_LATEST})


def make_admin_app(gateway: Gateway) -> web.Application:
    """The admin app; later features add routes here."""
    app = web.Application()
    app[GATEWAY_KEY] = gateway
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app
