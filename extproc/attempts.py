"""One upstream attempt of a call routed through a composite (failover) cluster.

Envoy's upstream ext_proc filter on the composite cluster opens a stream per attempt
and names the attempt's deployment in the ``xds.upstream_host_metadata`` attribute.
The first attempt was already rewritten for its deployment by the request phases; a
retry going elsewhere gets that deployment's credentials and model name here. Every
attempt's status counts for the deployment's health (cooldowns), and the answer that
reaches the client says which deployment served it (for pricing).
"""

from __future__ import annotations

import re

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.failover import (
    DEPLOYMENT_HEADER,
    RETRY_REASON_HEADER,
    SERVED_BY_HEADER,
    FailoverRoute,
)
from extproc.gateway import Gateway
from extproc.jsonbody import member_span, replace_member
from extproc.policy import CompiledDeployment, CompiledPolicy
from extproc.providers import CLIENT_CREDENTIAL_HEADERS
from extproc.upstream_errors import normalize_error

__all__ = ["Attempt", "attempt_deployment"]

_ATTRIBUTE = "xds.upstream_host_metadata"
# the attribute is the host metadata in protobuf text format
_DEPLOYMENT = re.compile(r'key: \\?"deployment\\?" value \{ string_value: \\?"([^"\\]+)\\?"')
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED


def attempt_deployment(msg: pb.ProcessingRequest) -> str | None:
    """The deployment an upstream attempt goes to; None for a downstream stream."""
    for attrs in msg.attributes.values():
        value = attrs.fields.get(_ATTRIBUTE)
        if value is not None:
            match = _DEPLOYMENT.search(value.string_value)
            return match.group(1) if match else ""
    return None


def _set(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode("latin-1")),
        append_action=_OVERWRITE,
    )


class Attempt:
    __slots__ = ("_checking", "_dep", "_gateway", "_policy", "_route")

    def __init__(self, gateway: Gateway, dep_id: str) -> None:
        self._gateway = gateway
        self._policy: CompiledPolicy = gateway.policy
        self._dep: CompiledDeployment | None = self._policy.deployment(dep_id)
        self._route: FailoverRoute | None = None
        #: A 400 whose body is read: a content-policy refusal moves the call on.
        self._checking = False

    def on_request_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = {h.key: h.raw_value.decode("latin-1") or h.value for h in msg.headers.headers}
        self._route = self._policy.failover_route(headers.get(self._gateway.config.cluster_header))
        reply = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
        mutation = reply.request_headers.response.header_mutation
        mutation.remove_headers.append(DEPLOYMENT_HEADER)
        dep = self._dep
        if dep is None:
            # not in this policy (reloaded since Envoy's config was made): never let
            # another deployment's credential travel to it
            mutation.remove_headers.extend(CLIENT_CREDENTIAL_HEADERS)
            return reply
        if headers.get(DEPLOYMENT_HEADER) == dep.id:
            return reply  # the first attempt: rewritten for this deployment already
        if dep.auth_value is not None:
            mutation.set_headers.append(_set(dep.auth_header, dep.auth_value))
        mutation.remove_headers.extend(
            h for h in CLIENT_CREDENTIAL_HEADERS if h != dep.auth_header or dep.auth_value is None
        )
        if not msg.end_of_stream:
            reply.mode_override.request_body_mode = _BUFFERED  # for the model name
        return reply

    def on_request_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        reply = pb.ProcessingResponse(request_body=pb.BodyResponse())
        dep = self._dep
        span = member_span(msg.body, "model") if dep is not None else None
        if dep is None or span is None:
            return reply
        body = replace_member(msg.body, span, dep.model)
        common = reply.request_body.response
        common.body_mutation.body = body
        common.header_mutation.set_headers.append(_set("content-length", str(len(body))))
        return reply

    async def on_response_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        reply = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        dep = self._dep
        if dep is None:
            return reply
        status = next(
            (h.raw_value.decode() or h.value for h in msg.headers.headers if h.key == ":status"), ""
        )
        group = self._policy.groups.get(dep.group)
        if group is not None and status.isascii() and status.isdigit():
            await self._gateway.router.answered(dep, group, int(status))
        reply.response_headers.response.header_mutation.set_headers.append(
            _set(SERVED_BY_HEADER, dep.id)
        )
        route = self._route
        if (
            status == "400"
            and not msg.end_of_stream
            and route is not None
            and route.content_policy_fallback_after(dep.id)
        ):
            self._checking = True
            reply.mode_override.response_body_mode = _BUFFERED
        return reply

    def on_response_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        """A content-policy refusal while a content-policy fallback is still to come:
        made a 503, which Envoy retries on the next deployment of the list."""
        reply = pb.ProcessingResponse(response_body=pb.BodyResponse())
        if not self._checking:
            return reply
        normalized = normalize_error(400, msg.body)
        if normalized is not None and b"content_policy_violation" in normalized:
            mutation = reply.response_body.response.header_mutation
            mutation.set_headers.append(_set(":status", "503"))
            mutation.set_headers.append(_set(RETRY_REASON_HEADER, "content_policy"))
            self._gateway.metrics.content_policy_retries.inc()
        return reply
