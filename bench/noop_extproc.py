"""A do-nothing ext_proc server: the framework floor of the benchmark.

It answers every phase our generated Envoy config sends, with the same number of
messages as the real server, and decides nothing:

* request headers: an empty reply;
* request body (BUFFERED): the routing header, the deployment credential and
  ``clear_route_cache`` (without them the generated routes answer 503), for the next
  ``--route`` in turn (repeat one to weight it); no body rewrite;
* response headers: a 2xx with a body switches the response body on (``mode_override``
  STREAMED), as the real server does to read usage; a non-2xx with a body BUFFERED, as
  the real server does to read the error;
* response body and trailers: empty replies.

Same gRPC runtime, event loop (uvloop) and message limit as ``extproc serve``, so the
difference between this row and the server's row is what the policy costs.

    python bench/noop_extproc.py --port 50061 --route bench_a=sk-key-a --route ...
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
_BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def _route_reply(cluster_header: str, cluster: str, key: str) -> pb.ProcessingResponse:
    headers = ((cluster_header, cluster), ("authorization", f"Bearer {key}"))
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(
                    set_headers=[
                        base_pb2.HeaderValueOption(
                            header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                            append_action=_OVERWRITE,
                        )
                        for k, v in headers
                    ]
                ),
                clear_route_cache=True,
            )
        )
    )


def _status(headers: pb.HttpHeaders) -> bytes:
    for h in headers.headers.headers:
        if h.key == ":status":
            return bytes(h.raw_value) or h.value.encode()
    return b""


class NoopProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Empty replies, except what Envoy needs to route and to send the same phases."""

    def __init__(self, routes: list[pb.ProcessingResponse]) -> None:
        self._routes = itertools.cycle(routes)

    async def Process(  # noqa: N802 - the gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for msg in request_iterator:
            phase = msg.WhichOneof("request")
            if phase == "request_headers":
                yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            elif phase == "request_body":
                yield next(self._routes)
            elif phase == "response_headers":
                reply = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
                if not msg.response_headers.end_of_stream:
                    ok = _status(msg.response_headers).startswith(b"2")
                    reply.mode_override.response_body_mode = _STREAMED if ok else _BUFFERED
                yield reply
            elif phase == "response_body":
                yield pb.ProcessingResponse(response_body=pb.BodyResponse())
            elif phase == "request_trailers":
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
            else:
                yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


async def serve(port: int, routes: list[pb.ProcessingResponse]) -> None:
    # The real server's receive limit for its default 8 MiB body limit.
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 4 * (8 << 20) + (1 << 20)),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(routes), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    for name in (_SERVICE, ""):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    await stop.wait()
    await server.stop(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cluster-header", default="x-extproc-cluster")
    parser.add_argument(
        "--route",
        action="append",
        required=True,
        metavar="CLUSTER=KEY",
        help="a cluster to send calls to (in turn) and the credential it expects",
    )
    args = parser.parse_args()
    routes = []
    for spec in args.route:
        cluster, _, key = spec.partition("=")
        routes.append(_route_reply(args.cluster_header, cluster, key))
    try:
        import uvloop  # noqa: PLC0415 - as extproc serve: uvloop when installed
    except ImportError:
        asyncio.run(serve(args.port, routes))
    else:
        uvloop.run(serve(args.port, routes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
