"""A stopping process: the health service knows when every Envoy has seen it drain, and
the access-log service closes idle streams without dropping what was already sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from grpc_health.v1 import health_pb2

from extproc.adapters.access_log import AccessLogService
from extproc.adapters.health import DrainingHealth
from extproc.state.runtime import Gateway
from tests.unit.test_services import gateway  # noqa: F401 - the fixture

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Clock:
    def __init__(self) -> None:
        self.at = 100.0

    def wall(self) -> float:
        return self.at

    def monotonic(self) -> float:
        return self.at

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.at, UTC)


class Peer:
    """The part of a gRPC context the health service reads."""

    def __init__(self, address: str) -> None:
        self.address = address

    def peer(self) -> str:
        return self.address


async def check(health: DrainingHealth, peer: str) -> int:
    response = await health.Check(health_pb2.HealthCheckRequest(service=""), Peer(peer))
    return int(response.status)


async def test_drain_waits_for_every_envoy_that_was_checking() -> None:
    clock = Clock()
    health = DrainingHealth(clock)
    assert await check(health, "ipv4:127.0.0.1:1") == SERVING
    assert await check(health, "ipv4:127.0.0.1:2") == SERVING
    clock.at += 1
    drain = asyncio.create_task(health.drain(3.0))
    await asyncio.sleep(0)
    assert await check(health, "ipv4:127.0.0.1:1") == NOT_SERVING
    await asyncio.sleep(0.05)
    assert not drain.done()  # the second Envoy has not been told yet
    assert await check(health, "ipv4:127.0.0.1:2") == NOT_SERVING
    assert await asyncio.wait_for(drain, 5) is True


async def test_drain_ignores_peers_gone_quiet_and_ends_at_its_deadline() -> None:
    clock = Clock()
    health = DrainingHealth(clock)
    await check(health, "ipv4:127.0.0.1:1")  # checked 10 s ago: gone
    clock.at += 10
    await check(health, "ipv4:127.0.0.1:2")
    drain = asyncio.create_task(health.drain(3.0))
    await asyncio.sleep(0)
    clock.at += 3.5  # peer 2 never checks again
    await check(health, "ipv4:127.0.0.1:3")  # someone new: wakes the wait
    assert await asyncio.wait_for(drain, 5) is False


async def test_drain_without_any_envoy_returns_at_once() -> None:
    health = DrainingHealth(Clock())
    assert await asyncio.wait_for(health.drain(3.0), 1) is True
    assert await check(health, "ipv4:127.0.0.1:1") == NOT_SERVING


def _message() -> als_pb2.StreamAccessLogsMessage:
    entry = accesslog_pb2.HTTPAccessLogEntry()  # no lease: counted as unknown
    return als_pb2.StreamAccessLogsMessage(
        http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=[entry])
    )


def _unknown(gw: Gateway) -> float:
    value = gw.metrics.registry.get_sample_value(
        "extproc_parallel_leases_total", {"event": "unknown"}
    )
    return value or 0.0


async def test_idle_access_log_stream_closes_and_a_sent_entry_is_read_first(
    gateway: Gateway,  # noqa: F811 - the fixture
) -> None:
    queue: asyncio.Queue[als_pb2.StreamAccessLogsMessage] = asyncio.Queue()

    async def envoy() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        while True:  # like Envoy: never ends the stream itself
            yield await queue.get()

    service = AccessLogService(gateway)
    context: Any = None
    stream = asyncio.create_task(service.StreamAccessLogs(envoy(), context))
    queue.put_nowait(_message())
    await asyncio.sleep(0.05)
    assert _unknown(gateway) == 1
    queue.put_nowait(_message())  # sent, not yet read, when the stop begins
    service.close_idle()
    response = await asyncio.wait_for(stream, 5)
    assert isinstance(response, als_pb2.StreamAccessLogsResponse)
    assert _unknown(gateway) == 2
