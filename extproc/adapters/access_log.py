"""Envoy's gRPC access-log stream: where the server learns that an HTTP stream ended.

Envoy's ``envoy.access_loggers.http_grpc`` logger (configured by ``envoy.config`` to
log only streams that carry a lease) sends one entry per finished stream, whatever
ended it: the last response byte, a client disconnect, an upstream reset, a timeout.
Each entry's dynamic metadata carries the lease the server handed out at admission;
releasing it here frees the key's parallel-request slot.

The stream is long-lived: Envoy keeps one open per logger and worker and never ends
it. A stopping process therefore closes its idle streams itself (``close_idle``) and
Envoy opens the next one on another process, so an idle stream never holds shutdown.
Rule: a stream closes only after nothing has arrived on it for ``_IDLE_S``, so an
entry Envoy already sent (each is sent at once: ``buffer_size_bytes: 0``) is read and
its lease released before the close, never dropped by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2 as pb
from envoy.service.accesslog.v3 import als_pb2_grpc as pb_grpc

from extproc.core.decision import failed_attempt
from extproc.core.failover import (
    ATTEMPT_CLUSTER_HEADER,
    ATTEMPT_COUNT_HEADER,
    ATTEMPT_NUMBER_HEADER,
    DEPLOYMENT_CLUSTER_PREFIX,
    HOP_CLUSTER,
)
from extproc.core.leases import AUTHZ_NAMESPACE, LEASE_FIELD, LEASE_NAMESPACE, Lease
from extproc.state.runtime import Gateway

__all__ = ["AccessLogService", "lease_of"]

log = logging.getLogger("extproc.access_log")

#: How long a stream must have been quiet before a stopping process closes it.
_IDLE_S = 0.1


def lease_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> Lease | None:
    """The lease a logged stream carried, from either path's namespace."""
    metadata = entry.common_properties.metadata.filter_metadata
    for namespace in (LEASE_NAMESPACE, AUTHZ_NAMESPACE):
        if namespace in metadata:
            value = metadata[namespace].fields.get(LEASE_FIELD)
            if value is not None and value.WhichOneof("kind") == "string_value":
                return Lease.parse(value.string_value)
    return None


class AccessLogService(pb_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """``envoy.service.accesslog.v3.AccessLogService`` on grpc.aio."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._closing: asyncio.Future[None] | None = None  # one for every stream

    def _closing_future(self) -> asyncio.Future[None]:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
        return self._closing

    def close_idle(self) -> None:
        """From now on, end each stream once it is idle (the process is stopping)."""
        closing = self._closing_future()
        if not closing.done():
            closing.set_result(None)

    async def _next(
        self, messages: AsyncIterator[pb.StreamAccessLogsMessage]
    ) -> pb.StreamAccessLogsMessage | None:
        """The next message, or None when Envoy ended the stream or it is idle while
        the process stops."""
        read = asyncio.ensure_future(anext(messages, None))
        try:
            await asyncio.wait((read, self._closing_future()), return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                # stopping: what Envoy already sent still arrives within the idle time
                await asyncio.wait((read,), timeout=_IDLE_S)
            if read.done():
                return read.result()
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await read
            return None
        finally:
            if not read.done():  # this handler itself was cancelled
                read.cancel()

    async def StreamAccessLogs(  # noqa: N802 - the gRPC method name
        self,
        request_iterator: AsyncIterator[pb.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[pb.StreamAccessLogsMessage, pb.StreamAccessLogsResponse],
    ) -> pb.StreamAccessLogsResponse:
        metrics = self._gateway.metrics
        messages = aiter(request_iterator)
        while (message := await self._next(messages)) is not None:
            for entry in message.http_logs.log_entry:
                upstream = entry.common_properties.upstream_cluster
                if upstream == HOP_CLUSTER:
                    # a retry through the hop listener: its attempt filter named the
                    # deployment's cluster in a header (logged with the entry), unless
                    # it failed before its filter ran (the header is an earlier one's)
                    logged = entry.request.request_headers
                    upstream = logged.get(ATTEMPT_CLUSTER_HEADER, "")
                    number = logged.get(ATTEMPT_NUMBER_HEADER)
                    if number is None or number != logged.get(ATTEMPT_COUNT_HEADER):
                        upstream = ""
                    if not upstream.startswith(DEPLOYMENT_CLUSTER_PREFIX):
                        metrics.access_log_entries.labels("attempt").inc()
                        continue
                if upstream.startswith(DEPLOYMENT_CLUSTER_PREFIX):
                    # a failover attempt that failed without a response (router
                    # upstream_log)
                    flags = entry.common_properties.response_flags
                    policy = self._gateway.policy
                    sample = failed_attempt(
                        policy,
                        upstream,
                        client_left=flags.downstream_connection_termination,
                        timed_out=flags.upstream_request_timeout or flags.stream_idle_timeout,
                    )
                    metrics.access_log_entries.labels("attempt").inc()
                    await self._gateway.record_health(sample, policy)
                    continue
                metrics.access_log_entries.labels("lease").inc()
                lease = lease_of(entry)
                if lease is None:
                    metrics.leases.labels("unknown").inc()
                    continue
                # Rule: in a task of its own, so the releases of entries that come in
                # together share the store's batch; awaited one by one, the stream
                # would read one entry per store round trip and fall behind
                self._gateway.release_soon(lease)
        return pb.StreamAccessLogsResponse()
