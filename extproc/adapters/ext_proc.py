"""Envoy ext_proc adapter: protobuf stream in, decision core, protobuf replies out.

Processing modes this server is built for (see ``envoy/envoy.yaml``): request headers
SEND, request body BUFFERED, response phases SKIP/NONE. That is two messages per LLM
request, one for a path we do not handle (the headers reply switches the body phase
off with ``mode_override``). Other phases, if a config enables them, get empty replies.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Literal

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2

from extproc.adapters.attempts import Attempt, attempt_deployment
from extproc.adapters.headers import header_mutation, header_option
from extproc.core.charges import Charge
from extproc.core.decision import RouteDecision, decide_head, decide_response
from extproc.core.endpoints import TRANSLATED_PATHS
from extproc.core.errors import GatewayError, InternalError, PayloadTooLargeError
from extproc.core.failover import (
    SERVED_BY_HEADER,
    SERVED_PATH_HEADER,
    held_for_body,
    refuses_content,
)
from extproc.core.health import HealthSample
from extproc.core.leases import LEASE_FIELD, LEASE_NAMESPACE, Lease
from extproc.core.metering import ResponseMeter, charge_from_metadata, unmetered_in_metadata
from extproc.core.models import Answer
from extproc.core.redaction import Redactor
from extproc.core.request import RequestHead
from extproc.core.translate.answers import AnswerTranslation, translate_error
from extproc.core.upstream_errors import normalize_error
from extproc.policy import CompiledPolicy
from extproc.state.runtime import Gateway

__all__ = ["ExternalProcessorService"]

log = logging.getLogger("extproc.ext_proc")

_BODY_NONE = processing_mode_pb2.ProcessingMode.NONE
_SKIP = processing_mode_pb2.ProcessingMode.SKIP
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
_BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED


def answer_response(answer: Answer) -> pb.ProcessingResponse:
    """A reply the gateway sends itself (the model list), never reaching an upstream."""
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=answer.status),
            headers=header_mutation(answer.headers, ()),
            body=answer.body,
            details="extproc_answered",
        )
    )


def immediate_response(err: GatewayError) -> pb.ProcessingResponse:
    """An error answered by Envoy on our behalf, never reaching an upstream."""
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=err.status),
            headers=header_mutation(err.response_headers().items(), ()),
            body=err.body(),
            details=f"extproc_{err.code}",
        )
    )


def _head_from_proto(headers: pb.HttpHeaders) -> RequestHead:
    return RequestHead.from_pairs(
        (h.key, h.raw_value.decode("latin-1") if h.raw_value else h.value)
        for h in headers.headers.headers
    )


class _Stream:
    """One HTTP request's trip through the phases; typed state, no dict of extras."""

    __slots__ = (
        "_chunks",
        "_gateway",
        "_head",
        "_held",
        "_policy",
        "_size",
        "_started",
        "attempt",
        "charge",
        "error_status",
        "finished",
        "lease",
        "logged_lease",
        "meter",
        "translate_errors",
        "translation",
        "unmetered",
    )

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._head: RequestHead | None = None
        # Rule: one request sees one policy snapshot, even across a reload.
        self._policy = gateway.policy
        self._chunks: list[bytes] = []
        self._size = 0
        self._started = 0.0
        #: True once the request phases are answered (routed, refused or passed).
        self.finished = False
        #: The parallel-request lease taken at admission, until Envoy has it.
        self.lease: Lease | None = None
        #: The lease Envoy has, to log back at the stream's end unless given back here.
        self.logged_lease: Lease | None = None
        #: The budget reservation until the response settles it.
        self.charge: Charge | None = None
        self.meter: ResponseMeter | None = None
        #: Set when this stream is one upstream attempt of a failover cluster.
        self.attempt: Attempt | None = None
        #: An upstream 4xx whose body is read to normalize its error code.
        self.error_status: int | None = None
        #: A 400's health sample, recorded once its body says which class it is.
        self._held: HealthSample | None = None
        #: A translated call's answer on its way into the client's API.
        self.translation: AnswerTranslation | None = None
        #: The client's API, when the call was translated (its errors are translated too).
        self.translate_errors: Literal["openai", "anthropic"] | None = None
        #: Routed but not metered (no charge): the answer is only redacted.
        self.unmetered = False

    def _refuse(self, err: GatewayError, phase: str) -> pb.ProcessingResponse:
        metrics = self._gateway.metrics
        metrics.rejected.labels(str(err.status), err.code).inc()
        endpoint = self._head.endpoint if self._head else None
        metrics.requests.labels(endpoint.name if endpoint else "other", "", "rejected").inc()
        log.debug("refused in %s: %s %s", phase, err.status, err.code)
        self.finished = True
        if self.lease is not None:
            self._gateway.release_soon(self.lease)
            self.lease = None
        return immediate_response(err)

    def on_request_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        self._started = self._gateway.clock.monotonic()
        head = self._head = _head_from_proto(msg)
        gateway = self._gateway
        decision = decide_head(
            head, gateway.config, self._policy, gateway.clock.now(), has_body=not msg.end_of_stream
        )
        if decision.answer is not None:
            gateway.metrics.requests.labels("models", "", "answered").inc()
            self.finished = True
            return answer_response(decision.answer)
        common = pb.CommonResponse(header_mutation=header_mutation((), decision.remove_headers))
        reply = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        if decision.action == "pass":
            # Not ours: stop the stream after this reply instead of buffering the body.
            reply.mode_override.request_body_mode = _BODY_NONE
            reply.mode_override.response_header_mode = _SKIP
            gateway.metrics.requests.labels("other", "", "passed").inc()
            self.finished = True
        return reply

    async def on_request_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        gateway = self._gateway
        self._size += len(msg.body)
        if self._size > gateway.config.max_body_bytes:
            raise PayloadTooLargeError(
                f"The request body is larger than {gateway.config.max_body_bytes} bytes."
            )
        self._chunks.append(msg.body)
        if not msg.end_of_stream:
            # Only in STREAMED/partial modes; BUFFERED sends the whole body at once.
            return pb.ProcessingResponse(request_body=pb.BodyResponse())
        if self._head is None:
            raise InternalError(
                "Envoy did not send the request headers: set request_header_mode SEND.",
                code="gateway_misconfigured",
            )
        raw = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        decision, admission = await gateway.route_and_admit(self._head, raw, self._policy)
        self.unmetered = admission.unmetered
        self.lease = admission.lease
        # Held on this stream until the response settles it (or the stream dies).
        self.charge = admission.charge
        self._record(decision)
        self.finished = True
        common = pb.CommonResponse(
            header_mutation=header_mutation(decision.set_headers, decision.remove_headers),
            body_mutation=pb.BodyMutation(body=decision.body),
            clear_route_cache=True,
        )
        reply = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
        metadata = admission.metadata(with_charge=False)
        if metadata:
            # The lease is logged back at stream end (extproc.core.leases); the session
            # count becomes response headers (envoy_config's response_headers_to_add).
            reply.dynamic_metadata.update({LEASE_NAMESPACE: metadata})
        return reply

    async def on_response_headers(
        self, msg: pb.HttpHeaders, metadata: base_pb2.Metadata
    ) -> pb.ProcessingResponse:
        """Start metering the response: its status, type and encoding decide how."""
        reply = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        if self.charge is None:
            # Behind ext_authz, the charge arrives as forwarded dynamic metadata.
            self.charge = charge_from_metadata(metadata)
        charge = self.charge
        if charge is None:
            if self.unmetered or unmetered_in_metadata(metadata):
                self._unmetered_answer(msg, reply)
            return reply
        headers = {h.key: h.raw_value.decode("latin-1") or h.value for h in msg.headers.headers}
        common = reply.response_headers.response
        if _redact_headers(msg, self._policy.redactor, common):
            self._gateway.metrics.credentials_redacted.labels("header").inc()
        answer = decide_response(
            charge,
            headers,
            self._policy,
            end_of_stream=msg.end_of_stream,
            now=self._gateway.clock.wall(),
        )
        charge = self.charge = _served_api(answer.charge, self._policy)
        if charge.client_api is not None:
            # after decide_response: a retry's answer names the deployment that served
            self._translate(charge, headers, msg, common)
        common.header_mutation.remove_headers.extend(answer.remove_headers)
        common.header_mutation.set_headers.extend(
            header_option(k, v) for k, v in answer.set_headers
        )
        if answer.meter:
            # Rule: the meter exists before the first await, so a stream reset from here
            # on is billed for what the upstream answered, never handed back.
            self.meter = ResponseMeter(
                charge,
                content_type=headers.get("content-type", ""),
                encoding=headers.get("content-encoding", ""),
                content_length=headers.get("content-length", ""),
            )
        if answer.read_error is not None and held_for_body(answer.health, end_of_stream=False):
            self._held = answer.health
        else:
            await self._gateway.record_health(answer.health, self._policy)
        if answer.cancel:
            self.charge = None
            self._gateway.cancel_soon(charge)
        if answer.read_error is not None:
            self.error_status = answer.read_error
            reply.mode_override.response_body_mode = _BUFFERED
        if answer.stream_body and self.meter is not None:
            reply.mode_override.response_body_mode = _STREAMED
            if self.meter.rewrites:
                # The body loses the usage chunk the client did not ask for.
                common.header_mutation.remove_headers.append("content-length")
        return reply

    def _unmetered_answer(self, msg: pb.HttpHeaders, reply: pb.ProcessingResponse) -> None:
        """An unmetered call's answer: redacted like any other, its error body read
        (normalized and redacted), the attempts' own headers removed."""
        common = reply.response_headers.response
        if _redact_headers(msg, self._policy.redactor, common):
            self._gateway.metrics.credentials_redacted.labels("header").inc()
        common.header_mutation.remove_headers.extend((SERVED_BY_HEADER, SERVED_PATH_HEADER))
        status = next(
            (h.raw_value.decode() or h.value for h in msg.headers.headers if h.key == ":status"), ""
        )
        if not status.startswith("2") and status.isdigit() and not msg.end_of_stream:
            self.error_status = int(status)
            reply.mode_override.response_body_mode = _BUFFERED

    def _translate(
        self,
        charge: Charge,
        headers: dict[str, str],
        msg: pb.HttpHeaders,
        common: pb.CommonResponse,
    ) -> None:
        """A translated call's answer leaves in the client's API: its body changes
        length, and a 2xx body is translated as it comes (``on_response_body``)."""
        client = charge.client_api
        if client is None or msg.end_of_stream:
            return
        self.translate_errors = client
        common.header_mutation.remove_headers.append("content-length")
        if not headers.get(":status", "").startswith("2"):
            return
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            return  # the gateway asked for none; a compressed answer passes as it is
        dep = self._policy.deployment(charge.priced_by)
        self.translation = AnswerTranslation(
            client,
            sse=headers.get("content-type", "").lower().startswith("text/event-stream"),
            model=dep.model if dep is not None else charge.group,
            created=int(self._gateway.clock.wall()),
            include_usage=charge.client_usage,
        )

    async def on_response_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        meter = self.meter
        reply = pb.ProcessingResponse(response_body=pb.BodyResponse())
        if self.error_status is not None:
            # Rule: redact first: normalizing cuts long messages, which could leave part
            # of an echoed key that no longer matches whole.
            redacted = self._policy.redactor.bytes(msg.body)
            if redacted is not None:
                self._gateway.metrics.credentials_redacted.labels("body").inc()
            normalized = normalize_error(self.error_status, redacted or msg.body)
            if self._held is not None:
                held, self._held = self._held, None
                sample = dataclasses.replace(held, content_policy=refuses_content(normalized))
                await self._gateway.record_health(sample, self._policy)
            if normalized is not None:
                self._gateway.metrics.upstream_errors_normalized.inc()
            if self.translate_errors == "anthropic":
                normalized = translate_error(
                    "anthropic", self.error_status, normalized or redacted or msg.body
                )
            elif self.translate_errors == "openai" and normalized is None:
                normalized = translate_error("openai", self.error_status, redacted or msg.body)
            normalized = normalized or redacted
            if normalized is not None:
                common = reply.response_body.response
                common.body_mutation.body = normalized
                common.header_mutation.set_headers.append(
                    header_option("content-length", str(len(normalized)))
                )
                if self.translate_errors is not None:
                    # the client's error shape is JSON, whatever the upstream said
                    common.header_mutation.set_headers.append(
                        header_option("content-type", "application/json")
                    )
            return reply
        if meter is None:
            return reply
        body = meter.feed(msg.body, end=msg.end_of_stream)
        if self.translation is not None:
            # Rule: metered on the deployment's bytes above, translated after
            body = self.translation.feed(msg.body, end=msg.end_of_stream)
            if not body:
                reply.response_body.response.body_mutation.clear_body = True
                body = None
        if body is not None:
            reply.response_body.response.body_mutation.body = body
        if msg.end_of_stream and self.charge is not None:
            charge, self.charge, self.meter = self.charge, None, None
            await self._gateway.settle_metered(charge, meter, self._policy)
            await self._give_back_lease(reply)
        return reply

    async def end_of_headers_only_response(self, reply: pb.ProcessingResponse) -> None:
        """A 2xx response without a body: settle with what we know (no usage)."""
        if self.charge is not None and self.meter is not None:
            charge, self.charge = self.charge, None
            await self._gateway.settle_metered(charge, self.meter, self._policy)
            await self._give_back_lease(reply)

    async def _give_back_lease(self, reply: pb.ProcessingResponse) -> None:
        """Rule: a metered response's last piece gives the lease back in this process
        (after its settlement, batched with other calls' writes), and empties it in
        Envoy's metadata so the stream's end is not logged back for it; when the store
        did not take it, the lease stays and the access log gives it back at the end."""
        lease, self.logged_lease = self.logged_lease, None
        if lease is not None and await self._gateway.release(lease):
            reply.dynamic_metadata.update({LEASE_NAMESPACE: {LEASE_FIELD: ""}})

    async def _attempt_phase(
        self, attempt: Attempt, msg: pb.ProcessingRequest, phase: str | None
    ) -> pb.ProcessingResponse:
        return await _attempt_reply(attempt, msg, phase)

    def close(self) -> None:
        """The stream ended: a 400 whose body never came is recorded as it is."""
        if self.attempt is not None:
            self.attempt.close()
        if self._held is not None:
            held, self._held = self._held, None
            self._gateway.spawn(self._gateway.record_health(held, self._policy))

    def _record(self, decision: RouteDecision) -> None:
        metrics = self._gateway.metrics
        dep = decision.deployment
        metrics.requests.labels(decision.request.endpoint.name, dep.group, "routed").inc()
        metrics.routed.labels(dep.group, dep.id).inc()
        metrics.decision_seconds.observe(self._gateway.clock.monotonic() - self._started)

    async def handle(self, msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """Answer one message; every refusal becomes an immediate response."""
        phase = msg.WhichOneof("request")
        try:
            if self.attempt is not None:
                return await self._attempt_phase(self.attempt, msg, phase)
            if phase == "request_headers":
                dep_id = attempt_deployment(msg)
                if dep_id is not None:
                    # an upstream attempt of a failover cluster, not a new call
                    self.attempt = Attempt(self._gateway, dep_id)
                    self.finished = True
                    return await self.attempt.on_request_headers(msg.request_headers)
                return self.on_request_headers(msg.request_headers)
            if phase == "request_body":
                return await self.on_request_body(msg.request_body)
            if phase == "response_headers":
                reply = await self.on_response_headers(msg.response_headers, msg.metadata_context)
                if msg.response_headers.end_of_stream:
                    await self.end_of_headers_only_response(reply)
                return reply
            if phase == "response_body":
                return await self.on_response_body(msg.response_body)
        except GatewayError as err:
            return self._refuse(err, phase or "unknown")
        except Exception:
            self._gateway.metrics.internal_errors.labels(phase or "unknown").inc()
            log.exception("unexpected error in phase %s", phase)
            internal = InternalError("The gateway failed to process this request.")
            return self._refuse(internal, phase or "unknown")
        return _passthrough(phase)


def _served_api(charge: Charge, policy: CompiledPolicy) -> Charge:
    """The charge as the deployment that served speaks: a failover retry may have
    landed on a deployment of the other API (its attempt filter translated the body),
    so the answer is metered in that API and translated into the client's."""
    served = policy.deployment(charge.priced_by)
    if served is None or served.api == charge.api:
        return charge
    client = charge.client_api or charge.api
    endpoint, _ = TRANSLATED_PATHS[served.api]
    if served.api == client:
        # the first attempt was translated, this one speaks the client's API: the
        # upstream added a usage chunk only if the translation asked for one
        return dataclasses.replace(
            charge,
            api=served.api,
            endpoint=endpoint,
            client_api=None,
            strip_usage=charge.stream and client == "openai" and not charge.client_usage,
        )
    return dataclasses.replace(
        charge, api=served.api, endpoint=endpoint, client_api=client, strip_usage=False
    )


def _redact_headers(msg: pb.HttpHeaders, redactor: Redactor, common: pb.CommonResponse) -> bool:
    """Replace every upstream header value that holds a deployment credential; whether
    there was one."""
    if not redactor:
        return False
    # the common case, no credential anywhere: one scan over all values at once
    values = b"\n".join(h.raw_value or h.value.encode() for h in msg.headers.headers)
    if not redactor.found(values):
        return False
    by_key: dict[str, list[str]] = {}
    hit: set[str] = set()
    for h in msg.headers.headers:
        value = h.raw_value.decode("latin-1") if h.raw_value else h.value
        by_key.setdefault(h.key, []).append(value)
        if redactor.text(value) is not None:
            hit.add(h.key)
    for key in sorted(hit):
        # Rule: one value replaces every value of the header (repeated headers are
        # joined with ",", as HTTP allows), so none of them survives unredacted.
        value = ",".join(redactor.text(v) or v for v in by_key[key])
        common.header_mutation.set_headers.append(header_option(key, value))
    return bool(hit)


async def _attempt_reply(
    attempt: Attempt, msg: pb.ProcessingRequest, phase: str | None
) -> pb.ProcessingResponse:
    if phase == "request_body":
        return attempt.on_request_body(msg.request_body)
    if phase == "response_headers":
        return await attempt.on_response_headers(msg.response_headers)
    if phase == "response_body":
        return await attempt.on_response_body(msg.response_body)
    return _passthrough(phase)


def _passthrough(phase: str | None) -> pb.ProcessingResponse:
    """An empty reply of the right kind for a phase this server does not act on."""
    if phase == "response_headers":
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    if phase == "response_body":
        return pb.ProcessingResponse(response_body=pb.BodyResponse())
    if phase == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    if phase == "response_trailers":
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse()


class ExternalProcessorService(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """``envoy.service.ext_proc.v3.ExternalProcessor`` on grpc.aio."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def Process(  # noqa: N802 - the gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        metrics = self._gateway.metrics
        stream = _Stream(self._gateway)
        metrics.streams_active.inc()
        try:
            async for msg in request_iterator:
                reply = await stream.handle(msg)
                yield reply
                # Delivered: from here on Envoy owns the lease and logs it back.
                if stream.lease is not None:
                    stream.logged_lease, stream.lease = stream.lease, None
        finally:
            stream.close()
            if stream.lease is not None:
                # The stream broke before Envoy got the lease: nobody will log it.
                self._gateway.release_soon(stream.lease)
            if stream.charge is not None:
                if stream.meter is not None:
                    # The response had started: the provider bills what it generated,
                    # so a client leaving mid-stream pays for it (not a free answer),
                    # and one leaving after the last byte pays as if it had waited.
                    self._gateway.settle_soon(stream.charge, stream.meter)
                else:
                    # Reset or abandoned before any response: nothing to charge.
                    self._gateway.cancel_soon(stream.charge)
            # Envoy ends the stream as soon as it needs no more phases, and resets it
            # when the client goes away mid-request (grpc.aio then just ends the
            # iterator, or closes this generator): a normal end, never logged as an
            # error; an unfinished request is counted.
            metrics.streams_active.dec()
            if not stream.finished:
                metrics.streams_cancelled.inc()
