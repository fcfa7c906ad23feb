"""Process wiring for ``extproc serve``: gRPC services, health, admin, signals."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import _async as health_aio  # the servicer `health.aio` re-exports
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.adapters.access_log import AccessLogService
from extproc.adapters.admin import make_admin_app
from extproc.adapters.ext_authz import AuthorizationService
from extproc.adapters.ext_proc import ExternalProcessorService
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
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogService(gateway), server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(settings.grpc_address)

    runner = web.AppRunner(make_admin_app(gateway), access_log=None, handle_signals=False)
    loop = asyncio.get_running_loop()
    watcher: asyncio.Task[None] | None = None
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
        log.info(
            "shutting down: letting in-flight streams finish (%.1fs)", settings.shutdown_grace_s
        )
        gateway.ready = False
        await health_servicer.enter_graceful_shutdown()
        await server.stop(settings.shutdown_grace_s)
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
