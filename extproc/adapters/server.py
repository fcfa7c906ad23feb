"""Process wiring for ``extproc serve``: gRPC services, health, admin, signals.

Rule: a stop (SIGTERM, SIGINT) loses no call. In order: health turns NOT_SERVING
(gRPC and the admin ``/healthz``) while every stream is still served; once each Envoy
that was health-checking the process has been answered NOT_SERVING (at most
``shutdown_notice_s``), and those Envoys therefore open new streams elsewhere, the
server stops taking new streams, closes its idle access-log streams (Envoy reopens
them on another process), lets the streams in flight finish (at most
``shutdown_grace_s``) and exits as soon as none is left.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.adapters.access_log import AccessLogService
from extproc.adapters.admin import make_admin_app
from extproc.adapters.ext_authz import AuthorizationService
from extproc.adapters.ext_proc import ExternalProcessorService
from extproc.adapters.health import DrainingHealth
from extproc.state.clock import SystemClock
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore

__all__ = ["grpc_receive_limit", "run", "serve"]

log = logging.getLogger("extproc")

_SERVICES = (
    "envoy.service.ext_proc.v3.ExternalProcessor",
    "envoy.service.auth.v3.Authorization",
)


def grpc_receive_limit(settings: Settings) -> int:
    """The largest gRPC message the server accepts.

    Rule: every message Envoy can send under its buffer limit is accepted. In STREAMED
    mode Envoy hands over, as one piece, whatever arrived while the previous piece was
    with us: more than its buffer limit (8.7 MB was seen with an 8 MiB limit), since
    reading pauses only after the limit is passed. Four times the limit covers that.
    """
    return 4 * settings.max_body_bytes + (1 << 20)


async def _stop_streams(
    server: grpc.aio.Server,
    health: DrainingHealth,
    access_log: AccessLogService,
    notice_s: float,
    settings: Settings,
) -> None:
    """NOT_SERVING until Envoy has seen it (at most ``notice_s``), then no new stream,
    idle access-log streams closed, and the streams in flight finished (at most the
    grace)."""
    log.info("shutting down: NOT_SERVING until Envoy has seen it (at most %.1fs)", notice_s)
    if not await health.drain(notice_s):
        log.warning("an Envoy did not health-check this process within %.1fs", notice_s)
    log.info("shutting down: letting in-flight streams finish (%.1fs)", settings.shutdown_grace_s)
    access_log.close_idle()
    await server.stop(settings.shutdown_grace_s)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives; SIGHUP reloads the policy."""
    gateway = Gateway.from_settings(settings, SystemClock())
    if isinstance(gateway.store, MemoryStore):
        journal = gateway.store.journal_path
        if journal is None:
            log.warning(
                "spend journal off (EXTPROC_SPEND_JOURNAL empty): spend dies with this process"
            )
        else:
            log.info("spend journal %s (settled spend survives restarts)", journal)
    stop = stop or asyncio.Event()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", grpc_receive_limit(settings)),
            ("grpc.so_reuseport", 0),
        ]
    )
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessorService(gateway), server
    )
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationService(gateway), server
    )
    access_log = AccessLogService(gateway)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(access_log, server)
    health_servicer = DrainingHealth(gateway.clock)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(settings.grpc_address)

    runner = web.AppRunner(make_admin_app(gateway), access_log=None, handle_signals=False)
    loop = asyncio.get_running_loop()
    watcher: asyncio.Task[None] | None = None
    serving = False
    # Rule: everything started below is stopped in the finally, startup failures included.
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.admin_host, settings.admin_port)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_policy)
        # Rule: this process beats before it takes its first lease or hold, so a crash
        # at any later moment is seen by its peers.
        await gateway.liveness.start(settings.heartbeat_interval_s)
        # what a stopped process left owed (settlements, cancels, counts) is retried
        await gateway.owed.start()
        await server.start()
        serving = True
        await site.start()
        for name in (*_SERVICES, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "extproc serving gRPC on %s, admin on http://%s:%d, policy %s (%d model groups), "
            "store %s",
            settings.grpc_address,
            settings.admin_host,
            settings.admin_port,
            gateway.policy.source,
            len(gateway.policy.groups),
            gateway.store.name,
        )
        if settings.policy_poll_s > 0:
            watcher = asyncio.create_task(gateway.watch_policy(settings.policy_poll_s))
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        gateway.ready = False
        notice_s = settings.shutdown_notice_s if serving else 0.0
        await _stop_streams(server, health_servicer, access_log, notice_s, settings)
        await runner.cleanup()
        await gateway.drain()  # settlements, releases and alerts still in flight
        # owed writes get the grace period to land; the rest stays journaled
        await gateway.owed.drain(settings.shutdown_grace_s)
        await gateway.liveness.stop()
        await gateway.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        log.info("stopped")


def run(settings: Settings) -> None:
    """Run :func:`serve` on uvloop when available."""
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop  # noqa: PLC0415 - optional accelerator
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    if settings.uvloop and uvloop is not None:
        uvloop.run(serve(settings))
    else:
        asyncio.run(serve(settings))
