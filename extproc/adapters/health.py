"""The gRPC health service, which also knows when Envoy has seen this process drain.

Envoy's active health check of the server cluster (``grpc.health.v1.Health/Check``, as
``envoy.config`` renders it) takes a host out of load balancing on the first
NOT_SERVING answer: an answer, unlike a timeout or a refused connection, needs no
``unhealthy_threshold``. So a stopping process that turned NOT_SERVING may stop taking
new streams once every Envoy that was checking it has been answered NOT_SERVING once;
from then on those Envoys open new streams on the other processes.

Rule: an Envoy is known by its health-check connection (the peer address; Envoy
reuses that connection between checks). The Envoys to wait for are those that checked
within the notice period before the drain began.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from grpc_health.v1 import _async as health_aio  # the servicer `health.aio` re-exports
from grpc_health.v1 import health_pb2

from extproc.state.clock import Clock

__all__ = ["DrainingHealth"]

#: Peers remembered at most; older ones are forgotten first (a reconnecting Envoy
#: checks from a new port, so the table would otherwise grow for ever).
_MAX_PEERS = 256

#: After the last Envoy was told: time for its workers to take the new host set.
_SETTLE_S = 0.2


class DrainingHealth(health_aio.HealthServicer):  # type: ignore[misc]
    """``grpc.health.v1.Health`` that remembers who asked and what it was told."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self._clock = clock
        self._last_check: dict[str, float] = {}  # peer → when it last checked (monotonic)
        self._told: set[str] = set()  # peers answered NOT_SERVING since the drain began
        self._draining = False
        self._answered = asyncio.Event()

    async def Check(  # noqa: N802 - the gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        response: health_pb2.HealthCheckResponse = await super().Check(request, context)
        peer = str(context.peer())
        self._last_check.pop(peer, None)
        self._last_check[peer] = self._clock.monotonic()
        if len(self._last_check) > _MAX_PEERS:
            del self._last_check[next(iter(self._last_check))]
        if self._draining and response.status != health_pb2.HealthCheckResponse.SERVING:
            self._told.add(peer)
            self._answered.set()
        return response

    async def drain(self, notice_s: float) -> bool:
        """Turn every service NOT_SERVING for good, then wait until each Envoy that
        checked in the last ``notice_s`` has been told so, at most ``notice_s``.

        True when every one was told (or none was checking), False at the deadline.
        """
        start = self._clock.monotonic()
        watchers = {peer for peer, at in self._last_check.items() if start - at <= notice_s}
        self._draining = True
        await self.enter_graceful_shutdown()
        deadline = start + notice_s
        while not watchers <= self._told:
            left = deadline - self._clock.monotonic()
            if left <= 0:
                return False
            self._answered.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered.wait(), left)
        if watchers:
            await asyncio.sleep(_SETTLE_S)
        return True
