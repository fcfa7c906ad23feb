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

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.adapters.headers import header_option
from extproc.core.failover import (
    DEPLOYMENT_HEADER,
    STREAM_HEADER,
    FailoverRoute,
    attempt_answer,
    content_policy_retry,
    held_for_body,
    with_body,
)
from extproc.core.health import HealthSample
from extproc.core.jsonbody import member_span, replace_member
from extproc.core.providers import credential_edits
from extproc.policy import CompiledDeployment, CompiledPolicy
from extproc.state.runtime import Gateway

__all__ = ["Attempt", "attempt_deployment"]

_ATTRIBUTE = "xds.upstream_host_metadata"
# the attribute is the host metadata in protobuf text format
_DEPLOYMENT = re.compile(r'key: \\?"deployment\\?" value \{ string_value: \\?"([^"\\]+)\\?"')
_BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED


def attempt_deployment(msg: pb.ProcessingRequest) -> str | None:
    """The deployment an upstream attempt goes to; None for a downstream stream."""
    for attrs in msg.attributes.values():
        value = attrs.fields.get(_ATTRIBUTE)
        if value is not None:
            match = _DEPLOYMENT.search(value.string_value)
            return match.group(1) if match else ""
    return None


class Attempt:
    __slots__ = ("_checking", "_dep", "_gateway", "_held", "_policy", "_route")

    def __init__(self, gateway: Gateway, dep_id: str) -> None:
        self._gateway = gateway
        self._policy: CompiledPolicy = gateway.policy
        self._dep: CompiledDeployment | None = self._policy.deployment(dep_id)
        self._route: FailoverRoute | None = None
        #: A 400 whose body is read: a content-policy refusal moves the call on.
        self._checking = False
        #: A 400's health sample, recorded once its body says which class it is.
        self._held: HealthSample | None = None

    def on_request_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = {h.key: h.raw_value.decode("latin-1") or h.value for h in msg.headers.headers}
        self._route = self._policy.failover_route(headers.get(self._gateway.config.cluster_header))
        reply = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
        mutation = reply.request_headers.response.header_mutation
        mutation.remove_headers.extend((DEPLOYMENT_HEADER, STREAM_HEADER))
        dep = self._dep
        if dep is None:
            # not in this policy (reloaded since Envoy's config was made): never let
            # another deployment's credential travel to it
            mutation.remove_headers.extend(credential_edits(None, None)[1])
            return reply
        if headers.get(DEPLOYMENT_HEADER) == dep.id:
            return reply  # the first attempt: rewritten for this deployment already
        credential, remove = credential_edits(dep.auth_header, dep.auth_value)
        mutation.set_headers.extend(header_option(k, v) for k, v in credential)
        mutation.remove_headers.extend(remove)
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
        common.header_mutation.set_headers.append(header_option("content-length", str(len(body))))
        return reply

    async def on_response_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        reply = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        dep = self._dep
        if dep is None:
            return reply
        status = next(
            (h.raw_value.decode() or h.value for h in msg.headers.headers if h.key == ":status"), ""
        )
        answer = attempt_answer(dep.id, self._route, status, end_of_stream=msg.end_of_stream)
        if held_for_body(answer.health, end_of_stream=msg.end_of_stream):
            self._held = answer.health
            reply.mode_override.response_body_mode = _BUFFERED
        else:
            await self._gateway.record_health(answer.health, self._policy)
        reply.response_headers.response.header_mutation.set_headers.extend(
            header_option(k, v) for k, v in answer.set_headers
        )
        if answer.check_content_policy:
            self._checking = True
            reply.mode_override.response_body_mode = _BUFFERED
        return reply

    def close(self) -> None:
        """The stream ended: a 400 whose body never came is recorded as it is."""
        if self._held is not None:
            held, self._held = self._held, None
            self._gateway.spawn(self._gateway.record_health(held, self._policy))

    def on_response_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        """A content-policy refusal while a content-policy fallback is still to come:
        made a 503, which Envoy retries on the next deployment of the list."""
        reply = pb.ProcessingResponse(response_body=pb.BodyResponse())
        if self._held is not None:
            held, self._held = self._held, None
            self._gateway.spawn(
                self._gateway.record_health(with_body(held, msg.body), self._policy)
            )
        if not self._checking:
            return reply
        retry = content_policy_retry(msg.body)
        if retry:
            mutation = reply.response_body.response.header_mutation
            mutation.set_headers.extend(header_option(k, v) for k, v in retry)
            self._gateway.metrics.content_policy_retries.inc()
        return reply
