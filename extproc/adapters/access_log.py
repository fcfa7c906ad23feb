"""Envoy's gRPC access-log stream: where the server learns that an HTTP stream ended.

Envoy's ``envoy.access_loggers.http_grpc`` logger (configured by ``envoy.config`` to
log only streams that carry a lease) sends one entry per finished stream, whatever
ended it: the last response byte, a client disconnect, an upstream reset, a timeout.
Each entry's dynamic metadata carries the lease the server handed out at admission;
releasing it here frees the key's parallel-request slot.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2 as pb
from envoy.service.accesslog.v3 import als_pb2_grpc as pb_grpc

from extproc.core.decision import failed_attempt
from extproc.core.failover import DEPLOYMENT_CLUSTER_PREFIX
from extproc.core.leases import AUTHZ_NAMESPACE, LEASE_FIELD, LEASE_NAMESPACE, Lease
from extproc.state.runtime import Gateway

__all__ = ["AccessLogService", "lease_of"]

log = logging.getLogger("extproc.access_log")


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

    async def StreamAccessLogs(  # noqa: N802 - the gRPC method name
        self,
        request_iterator: AsyncIterator[pb.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[pb.StreamAccessLogsMessage, pb.StreamAccessLogsResponse],
    ) -> pb.StreamAccessLogsResponse:
        metrics = self._gateway.metrics
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                upstream = entry.common_properties.upstream_cluster
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
                    await self._gateway.record_health(sample, policy)
                    continue
                lease = lease_of(entry)
                if lease is None:
                    metrics.leases.labels("unknown").inc()
                    continue
                await self._gateway.release(lease)
        return pb.StreamAccessLogsResponse()
