"""Envoy ext_authz adapter: the same decision core behind a unary ``Check``.

ext_authz can set and remove request headers (routing header, credentials) but cannot
change the body, so in this mode the upstream receives the model name the client
sent: deployments served through the ext_authz variant should use the group's name
as their upstream model (``extproc check`` warns when they do not).
"""

from __future__ import annotations

import logging

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from extproc.adapters.headers import header_option
from extproc.core.decision import decide_head
from extproc.core.errors import GatewayError, InternalError
from extproc.core.models import Answer
from extproc.core.request import RequestHead
from extproc.state.runtime import Gateway

__all__ = ["AuthorizationService"]

log = logging.getLogger("extproc.ext_authz")


def denied_response(err: GatewayError) -> pb.CheckResponse:
    return pb.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=err.code),
        denied_response=pb.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=err.status),
            headers=[header_option(k, v, raw=False) for k, v in err.response_headers().items()],
            body=err.body().decode("utf-8"),
        ),
    )


def answered_response(answer: Answer) -> pb.CheckResponse:
    """A reply the gateway sends itself (the model list): a denied response is the
    only way a Check answers the client, and its status may be a 200."""
    return pb.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message="answered"),
        denied_response=pb.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=answer.status),
            headers=[header_option(k, v, raw=False) for k, v in answer.headers],
            body=answer.body.decode("utf-8"),
        ),
    )


class AuthorizationService(pb_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``envoy.service.auth.v3.Authorization`` on grpc.aio."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def _decide(self, request: pb.CheckRequest) -> pb.CheckResponse:
        gateway = self._gateway
        http = request.attributes.request.http
        headers = {k.lower(): v for k, v in http.headers.items()}
        head = RequestHead(method=http.method, path=http.path, headers=headers)
        body = http.raw_body or http.body.encode("utf-8")
        has_body = bool(body) or headers.get("content-length", "0") not in ("", "0")
        now = gateway.clock.now()
        policy = gateway.policy
        head_decision = decide_head(head, gateway.config, policy, now, has_body=has_body)
        if head_decision.answer is not None:
            gateway.metrics.requests.labels("models", "", "answered").inc()
            return answered_response(head_decision.answer)
        if head_decision.action == "pass":
            gateway.metrics.requests.labels("other", "", "passed").inc()
            return pb.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=pb.OkHttpResponse(headers_to_remove=head_decision.remove_headers),
            )
        # ext_authz cannot rewrite the body
        decision, admission = await gateway.route_and_admit(head, body, policy, rewrite_body=False)
        dep = decision.deployment
        gateway.metrics.requests.labels(decision.request.endpoint.name, dep.group, "routed").inc()
        gateway.metrics.routed.labels(dep.group, dep.id).inc()
        reply = pb.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=pb.OkHttpResponse(
                headers=[header_option(k, v, raw=False) for k, v in decision.set_headers],
                headers_to_remove=decision.remove_headers,
            ),
        )
        metadata = admission.metadata(with_charge=True)
        if metadata:
            # Filed under the ext_authz filter's namespace: the lease is logged back at
            # stream end, the session count becomes response headers, the charge is
            # settled by the response-only ext_proc filter (forwarded namespace).
            reply.dynamic_metadata.update(metadata)
        return reply

    async def Check(  # noqa: N802 - the gRPC method name
        self,
        request: pb.CheckRequest,
        context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse],
    ) -> pb.CheckResponse:
        try:
            return await self._decide(request)
        except GatewayError as err:
            self._gateway.metrics.rejected.labels(str(err.status), err.code).inc()
            return denied_response(err)
        except Exception:
            self._gateway.metrics.internal_errors.labels("check").inc()
            log.exception("unexpected error in Check")
            return denied_response(InternalError("The gateway failed to process this request."))
