"""One upstream attempt of a call routed through a composite (failover) cluster.

Envoy's upstream ext_proc filter on the composite cluster opens a stream per attempt
and names the attempt's deployment in the ``xds.upstream_host_metadata`` attribute.
The first attempt was already rewritten for its deployment by the request phases; a
retry going elsewhere gets that deployment's credentials and model name here. Every
attempt's status counts for the deployment's health (cooldowns), and the answer that
reaches the client says which deployment served it (for pricing).

On a dynamic route (fallbacks by error class, see ``extproc.core.failover``) a retry
goes to the hop listener: its filter reads the call's earlier refusals, picks the
deployment and names its cluster in ``x-extproc-attempt-cluster``; a refused attempt's
filter records the refusal and makes the 400 a 503 Envoy retries.
"""

from __future__ import annotations

import json
import re
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from extproc.adapters.headers import header_mutation, header_option
from extproc.core.decision import ANTHROPIC_VERSION, translate_request
from extproc.core.endpoints import TRANSLATED_PATHS
from extproc.core.errors import BadRequestError, ServiceUnavailableError
from extproc.core.failover import (
    ATTEMPT_CLUSTER_HEADER,
    ATTEMPT_COUNT_HEADER,
    ATTEMPT_NUMBER_HEADER,
    CALL_HEADER,
    DEPLOYMENT_HEADER,
    HOP_DEPLOYMENT,
    RETRY_REASON_HEADER,
    STREAM_HEADER,
    FailoverRoute,
    attempt_answer,
    deployment_cluster_name,
    held_for_body,
    next_attempt,
    refusal_class,
    with_body,
)
from extproc.core.health import HealthSample
from extproc.core.jsonbody import member_span, replace_member
from extproc.core.providers import credential_edits
from extproc.policy import CompiledDeployment, CompiledPolicy
from extproc.state.refusals import read_refusals, record_refusal
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
    __slots__ = (
        "_call",
        "_checking",
        "_dep",
        "_events",
        "_gateway",
        "_held",
        "_hop",
        "_number",
        "_policy",
        "_route",
        "_translate_from",
    )

    def __init__(self, gateway: Gateway, dep_id: str) -> None:
        self._gateway = gateway
        self._policy: CompiledPolicy = gateway.policy
        #: A retry of a dynamic route: its deployment is picked here.
        self._hop = dep_id == HOP_DEPLOYMENT
        self._dep: CompiledDeployment | None = (
            None if self._hop else self._policy.deployment(dep_id)
        )
        self._route: FailoverRoute | None = None
        #: A 400 whose body is read: a refusal may move the call to its class's list.
        self._checking = False
        #: A 400's health sample, recorded once its body says which class it is.
        self._held: HealthSample | None = None
        #: This attempt's number, the call's id and its earlier refusals (dynamic routes).
        self._number = 1
        self._call: str | None = None
        self._events: dict[int, str] = {}
        #: The API of the body to translate for this deployment (one of the other API).
        self._translate_from: str | None = None

    async def on_request_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = {h.key: h.raw_value.decode("latin-1") or h.value for h in msg.headers.headers}
        route = self._route = self._policy.failover_route(
            headers.get(self._gateway.config.cluster_header)
        )
        count = headers.get(ATTEMPT_COUNT_HEADER, "1")
        self._number = int(count) if count.isascii() and count.isdigit() and len(count) < 3 else 1
        self._call = headers.get(CALL_HEADER) or None
        reply = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
        mutation = reply.request_headers.response.header_mutation
        mutation.remove_headers.extend((DEPLOYMENT_HEADER, STREAM_HEADER))
        if not self._hop:
            # through the hop, its route removes it (the upstream log reads it first)
            mutation.remove_headers.append(ATTEMPT_COUNT_HEADER)
        if self._hop:
            target = None
            if route is not None and route.dynamic:
                if self._call is not None and self._number > 1:
                    events = await read_refusals(self._gateway.store, self._call, self._number)
                    if events is None:
                        # Rule: never guess the list: the last attempt may have been
                        # a refusal whose list this call must keep to
                        return _nothing_left("the gateway's store could not be read")
                    self._events = events
                target = next_attempt(route, self._events, self._number)
            if target is None:
                return _nothing_left("every deployment this call may go to has been tried")
            self._dep = self._policy.deployment(target[0])
            mutation.set_headers.extend(
                (
                    header_option(ATTEMPT_CLUSTER_HEADER, deployment_cluster_name(target[0])),
                    header_option(ATTEMPT_NUMBER_HEADER, str(self._number)),
                )
            )
        dep = self._dep
        if dep is None:
            # not in this policy (reloaded since Envoy's config was made): never let
            # another deployment's credential travel to it
            mutation.remove_headers.extend(credential_edits(None, None)[1])
            return reply
        if headers.get(DEPLOYMENT_HEADER) == dep.id:
            return reply  # the first attempt: rewritten for this deployment already
        first = self._first_api(route)
        path = headers.get(":path", "")
        if first is not None and route is not None and self._crosses(route):
            # Rule: on a route that reaches both APIs every retry gets its API's own
            # endpoint (an earlier attempt's, kept by Envoy, may be the other API's);
            # the body (the first attempt's, in its API) is translated for a
            # deployment of the other API (on_request_body). Anthropic's other
            # headers (anthropic-beta) stay: OpenAI ignores them
            if first != dep.api:
                self._translate_from = first
            wanted = dep.path_for(TRANSLATED_PATHS[dep.api][1])
            if wanted != path:
                mutation.set_headers.append(header_option(":path", wanted))
            if dep.api == "anthropic" and "anthropic-version" not in headers:
                mutation.set_headers.append(header_option("anthropic-version", ANTHROPIC_VERSION))
        elif path and (wanted := dep.path_for(path)) != path:
            # Rule: rebuilt from the endpoint, so an earlier attempt's provider path
            # (kept by Envoy for this one) never reaches this deployment
            mutation.set_headers.append(header_option(":path", wanted))
        credential, remove = credential_edits(dep.auth_header, dep.auth_value)
        mutation.set_headers.extend(header_option(k, v) for k, v in credential)
        mutation.remove_headers.extend(remove)
        if not msg.end_of_stream:
            reply.mode_override.request_body_mode = _BUFFERED  # for the model name
        return reply

    def _crosses(self, route: FailoverRoute) -> bool:
        """Whether the route reaches deployments of both APIs."""
        apis = {
            d.api for i, _ in route.deployments() if (d := self._policy.deployment(i)) is not None
        }
        return len(apis) > 1

    def _first_api(self, route: FailoverRoute | None) -> str | None:
        """The API of the call's first attempt (the body every attempt is sent)."""
        if route is None:
            return None
        first = self._policy.deployment(route.attempts[0][0])
        return first.api if first is not None else None

    def on_request_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        reply = pb.ProcessingResponse(request_body=pb.BodyResponse())
        dep = self._dep
        if dep is not None and self._translate_from is not None:
            body = self._translated(msg.body, self._translate_from, dep)
            if body is None:
                return _nothing_left("the call cannot be sent in this deployment's API")
            common = reply.request_body.response
            common.body_mutation.body = body
            common.header_mutation.set_headers.append(
                header_option("content-length", str(len(body)))
            )
            return reply
        span = member_span(msg.body, "model") if dep is not None else None
        if dep is None or span is None:
            return reply
        body = replace_member(msg.body, span, dep.body_model)
        common = reply.request_body.response
        common.body_mutation.body = body
        common.header_mutation.set_headers.append(header_option("content-length", str(len(body))))
        return reply

    def _group_of(self, dep_id: str) -> str | None:
        dep = self._policy.deployment(dep_id)
        return dep.group if dep is not None else None

    async def on_response_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        reply = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        dep = self._dep
        if dep is None:
            return reply
        status = next(
            (h.raw_value.decode() or h.value for h in msg.headers.headers if h.key == ":status"), ""
        )
        answer = attempt_answer(
            dep.id,
            self._route,
            status,
            end_of_stream=msg.end_of_stream,
            events=self._events,
            attempt=self._number,
            group_of=self._group_of,
        )
        if held_for_body(answer.health, end_of_stream=msg.end_of_stream):
            self._held = answer.health
            reply.mode_override.response_body_mode = _BUFFERED
        else:
            await self._gateway.record_health(answer.health, self._policy)
        reply.response_headers.response.header_mutation.set_headers.extend(
            header_option(k, v) for k, v in answer.set_headers
        )
        if answer.check_refusal:
            self._checking = True
            reply.mode_override.response_body_mode = _BUFFERED
        return reply

    def _translated(self, raw: bytes, api: str, dep: CompiledDeployment) -> bytes | None:
        """The first attempt's body in ``dep``'s API; None when it cannot be (a dry run
        at admission makes that a broken body, never a client's request)."""
        body = _body_of(raw)
        if body is None:
            return None
        try:
            return translate_request(body, api, dep.body_model, self._gateway.config, dep)
        except BadRequestError:
            return None

    def close(self) -> None:
        """The stream ended: a 400 whose body never came is recorded as it is."""
        if self._held is not None:
            held, self._held = self._held, None
            self._gateway.spawn(self._gateway.record_health(held, self._policy))

    async def on_response_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        """A refusal of a class whose fallbacks have a deployment left for the call:
        recorded for the next attempt and made a 503, which Envoy retries."""
        reply = pb.ProcessingResponse(response_body=pb.BodyResponse())
        if self._held is not None:
            held, self._held = self._held, None
            self._gateway.spawn(
                self._gateway.record_health(with_body(held, msg.body), self._policy)
            )
        route = self._route
        if not self._checking or route is None or self._call is None:
            return reply
        cls = refusal_class(msg.body)
        if cls is None or not route.targets(cls):
            return reply
        events = {**self._events, self._number: cls}
        if next_attempt(route, events, self._number + 1) is None:
            return reply
        if not await record_refusal(self._gateway.store, self._call, self._number, cls):
            return reply
        mutation = reply.response_body.response.header_mutation
        mutation.set_headers.extend(
            (header_option(":status", "503"), header_option(RETRY_REASON_HEADER, cls))
        )
        if cls == "content_policy":
            self._gateway.metrics.content_policy_retries.inc()
        return reply


def _body_of(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _nothing_left(why: str) -> pb.ProcessingResponse:
    """A retry with no deployment to go to (the previous attempt timed out or was
    reset after the call's lists ran out, or the record of its refusals cannot be
    read): the client gets a 503, never a wrong group's answer."""
    err = ServiceUnavailableError(
        f"No deployments available for selected model: {why}.", code="no_deployments_left"
    )
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=err.status),
            headers=header_mutation(err.response_headers().items(), ()),
            body=err.body(),
            details="extproc_no_deployments_left",
        )
    )
