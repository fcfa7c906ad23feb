"""The gRPC adapters against the memory store, driven by proto builders."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.adapters.ext_authz import AuthorizationService
from extproc.adapters.ext_proc import ExternalProcessorService
from extproc.policy import load_policy
from extproc.state import runtime as gateway_module
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore
from tests.helpers import body_msg, headers_msg, mutation_dict, post_headers

NO_CONTEXT: Any = None  # the adapters do not use the gRPC context
POLICY_PATH = Path(__file__).resolve().parent.parent / "policies" / "valid.yaml"
ENV = {"TEST_KEY_A": "sk-a", "TEST_KEY_B": "sk-b", "TEST_KEY_C": "sk-c"}


@pytest.fixture
def gateway() -> Gateway:
    settings = Settings(policy_path=POLICY_PATH)
    return Gateway(settings, load_policy(POLICY_PATH, env=ENV), MemoryStore(), rng=lambda: 0.1)


async def run_stream(gateway: Gateway, *msgs: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
    async def source() -> AsyncIterator[pb.ProcessingRequest]:
        for msg in msgs:
            yield msg

    service = ExternalProcessorService(gateway)
    return [r async for r in service.Process(source(), NO_CONTEXT)]


async def test_routes_in_two_messages(gateway: Gateway) -> None:
    raw = json.dumps({"model": "auto", "messages": []}).encode()
    first, second = await run_stream(
        gateway,
        headers_msg(post_headers(authorization="Bearer client", x_extproc_cluster="mock_b")),
        body_msg(raw),
    )
    assert first.WhichOneof("response") == "request_headers"
    assert mutation_dict(first.request_headers.response.header_mutation)["remove"] == [
        "x-extproc-cluster"
    ]
    common = second.request_body.response
    assert common.clear_route_cache
    mutation = mutation_dict(common.header_mutation)
    assert mutation["set"]["x-extproc-cluster"] == "mock_a"
    assert mutation["set"]["authorization"] == "Bearer sk-a"
    assert int(mutation["set"]["content-length"]) == len(common.body_mutation.body)
    assert json.loads(common.body_mutation.body)["model"] == "up-model-a"


async def test_unknown_path_switches_body_off(gateway: Gateway) -> None:
    (reply,) = await run_stream(
        gateway, headers_msg([(":method", "GET"), (":path", "/v1/files")], end_of_stream=True)
    )
    assert reply.WhichOneof("response") == "request_headers"
    assert reply.HasField("mode_override")
    assert reply.mode_override.request_body_mode == 0  # NONE


@pytest.mark.parametrize(
    ("msgs", "status", "code"),
    [
        ([headers_msg(post_headers(), end_of_stream=True)], 400, "missing_body"),
        ([headers_msg(post_headers()), body_msg(b"{oops")], 400, "invalid_json"),
        ([headers_msg(post_headers()), body_msg(b'{"model": "nope"}')], 404, "model_not_found"),
        ([body_msg(b'{"model": "auto"}')], 500, "gateway_misconfigured"),
    ],
    ids=["empty", "malformed", "unknown-model", "body-without-headers"],
)
async def test_refusals_are_immediate_responses(
    gateway: Gateway, msgs: list[pb.ProcessingRequest], status: int, code: str
) -> None:
    replies = await run_stream(gateway, *msgs)
    last = replies[-1]
    assert last.WhichOneof("response") == "immediate_response"
    imm = last.immediate_response
    assert imm.status.code == status
    assert json.loads(imm.body)["error"]["code"] == code
    assert mutation_dict(imm.headers)["set"]["x-extproc-error"] == code


async def test_body_in_chunks_is_joined(gateway: Gateway) -> None:
    raw = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "x" * 100}]})
    half = len(raw) // 2
    replies = await run_stream(
        gateway,
        headers_msg(post_headers()),
        body_msg(raw[:half].encode(), end_of_stream=False),
        body_msg(raw[half:].encode()),
    )
    assert (
        json.loads(replies[-1].request_body.response.body_mutation.body)["messages"][0]["content"]
        == "x" * 100
    )


async def test_other_phases_get_empty_replies(gateway: Gateway) -> None:
    msgs = [
        pb.ProcessingRequest(response_headers=pb.HttpHeaders()),
        pb.ProcessingRequest(response_body=pb.HttpBody()),
        pb.ProcessingRequest(request_trailers=pb.HttpTrailers()),
        pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
    ]
    replies = await run_stream(gateway, *msgs)
    assert [r.WhichOneof("response") for r in replies] == [
        "response_headers",
        "response_body",
        "request_trailers",
        "response_trailers",
    ]


async def test_unexpected_exception_is_a_500_not_a_crash(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(gateway_module, "decide", boom)
    replies = await run_stream(gateway, headers_msg(post_headers()), body_msg(b'{"model": "auto"}'))
    assert replies[-1].immediate_response.status.code == 500
    assert gateway.metrics.internal_errors.labels("request_body")._value.get() == 1


def check_request(
    path: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=method, path=path, headers=headers or {}, raw_body=body
    )
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.CopyFrom(http)
    return request


async def test_check_routes_and_injects(gateway: Gateway) -> None:
    service = AuthorizationService(gateway)
    reply = await service.Check(
        check_request(
            "/v1/messages", b'{"model": "claude", "messages": []}', {"x-api-key": "client"}
        ),
        NO_CONTEXT,
    )
    assert reply.status.code == 0
    headers = {h.header.key: h.header.value for h in reply.ok_response.headers}
    assert headers == {"x-extproc-cluster": "mock_c", "x-api-key": "sk-c"}
    assert "authorization" in reply.ok_response.headers_to_remove


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/chat/completions", b"", 400, "missing_body"),
        ("/v1/chat/completions", b"[1]", 400, "invalid_json"),
        ("/v1/chat/completions", b'{"model": 5}', 400, "invalid_parameter"),
        ("/v1/chat/completions", b'{"model": "nope"}', 404, "model_not_found"),
    ],
)
async def test_check_denies_like_ext_proc(
    gateway: Gateway, path: str, body: bytes, status: int, code: str
) -> None:
    reply = await AuthorizationService(gateway).Check(check_request(path, body), NO_CONTEXT)
    denied = reply.denied_response
    assert denied.status.code == status
    assert json.loads(denied.body)["error"]["code"] == code
    ext_proc = (
        await run_stream(gateway, headers_msg(post_headers(path)), body_msg(body))
        if body
        else await run_stream(gateway, headers_msg(post_headers(path), end_of_stream=True))
    )
    assert ext_proc[-1].immediate_response.status.code == status


async def test_check_passes_unknown_paths(gateway: Gateway) -> None:
    reply = await AuthorizationService(gateway).Check(
        check_request("/v1/files", b"", method="GET"), NO_CONTEXT
    )
    assert reply.status.code == 0
    assert list(reply.ok_response.headers_to_remove) == ["x-extproc-cluster"]


async def test_a_call_whose_failover_was_dropped_counts_its_own_status() -> None:
    """A deployment with a failover route, called straight because the call does not
    fit one of its attempts: no attempt filter saw it, so its 500 counts for its own
    health and an upstream's served-by header does not re-price it."""
    from extproc.policy import compile_policy, parse_policy  # noqa: PLC0415

    policy = compile_policy(
        parse_policy(
            {
                "model_groups": [
                    {
                        "name": "small",
                        "num_retries": 1,
                        "deployments": [
                            {
                                "id": "big",
                                "cluster": "cbig",
                                "model": "m",
                                "context_window": 100_000,
                            },
                            {"id": "tiny", "cluster": "ctiny", "model": "m", "context_window": 10},
                        ],
                    }
                ]
            }
        )
    )
    assert "big" in policy.failover
    gw = Gateway(Settings(policy_path=POLICY_PATH), policy, MemoryStore(), rng=lambda: 0.0)
    raw = json.dumps({"model": "small", "messages": [{"role": "user", "content": "x" * 400}]})
    response = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=headers_msg(
                [(":status", "500"), ("x-extproc-served-by", "tiny")]
            ).request_headers.headers,
            end_of_stream=True,
        )
    )
    replies = await run_stream(gw, headers_msg(post_headers()), body_msg(raw.encode()), response)
    routed = mutation_dict(replies[1].request_body.response.header_mutation)["set"]
    assert routed["x-extproc-cluster"] == "cbig"  # straight to it: no composite cluster
    answers = {
        (s.labels["deployment"], s.labels["status"])
        for m in gw.metrics.upstream_answers.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert answers == {("big", "500")}


def _cp_gateway() -> Gateway:
    from extproc.policy import compile_policy, parse_policy  # noqa: PLC0415

    policy = compile_policy(
        parse_policy(
            {
                "model_groups": [
                    {
                        "name": "g",
                        "deployments": [
                            {
                                "id": "strict",
                                "cluster": "cs",
                                "model": "m",
                                "allowed_fails_policy": {
                                    "ContentPolicyViolationErrorAllowedFails": 0
                                },
                            },
                            {"id": "other", "cluster": "co", "model": "m", "weight": 0},
                        ],
                    }
                ]
            }
        )
    )
    return Gateway(Settings(policy_path=POLICY_PATH), policy, MemoryStore(), rng=lambda: 0.0)


_REFUSAL = json.dumps(
    {
        "error": {
            "message": "Your request was rejected as a result of our safety system.",
            "type": "invalid_request_error",
            "param": None,
            "code": "content_policy_violation",
        }
    }
).encode()
_BAD = json.dumps(
    {"error": {"message": "Unrecognized request argument supplied: foo", "type": "x"}}
).encode()


def _status_msg(status: str) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=headers_msg(
                [(":status", status), ("content-type", "application/json")]
            ).request_headers.headers
        )
    )


@pytest.mark.parametrize(
    ("body", "cools"),
    [(_REFUSAL, True), (_BAD, False), (None, False)],
    ids=["refusal", "bad", "none"],
)
async def test_a_400_is_classed_by_its_body(body: bytes | None, cools: bool) -> None:
    """A 400's health sample waits for its body: a content-policy refusal is its own
    allowed_fails_policy class (here 0 allowed: it cools at once), another 400 is a bad
    request (never cools), and a 400 whose body never comes is recorded as it is when
    the stream ends."""
    from extproc.core.health import cooldown_key  # noqa: PLC0415

    gw = _cp_gateway()
    raw = json.dumps({"model": "g", "messages": [{"role": "user", "content": "hi"}]})
    msgs = [headers_msg(post_headers()), body_msg(raw.encode()), _status_msg("400")]
    if body is not None:
        msgs.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=True)))
    replies = await run_stream(gw, *msgs)
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2  # noqa: PLC0415

    buffered = processing_mode_pb2.ProcessingMode.BUFFERED
    assert replies[2].mode_override.response_body_mode == buffered  # the body is read
    await gw.drain()
    answers = {
        (s.labels["deployment"], s.labels["status"])
        for m in gw.metrics.upstream_answers.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert answers == {("strict", "400")}  # recorded once, whatever the body
    cooled = (await gw.store.get_many([cooldown_key("strict")]))[0] is not None  # type: ignore[attr-defined]
    assert cooled is cools


@pytest.mark.parametrize(
    ("body", "flag"), [(_REFUSAL, True), (_BAD, False)], ids=["refusal", "bad"]
)
async def test_a_failover_attempts_400_is_classed_by_its_body(body: bytes, flag: bool) -> None:
    """The per-attempt filter holds a 400's health sample for its body too."""
    from extproc.adapters.attempts import Attempt  # noqa: PLC0415
    from extproc.core.health import HealthSample  # noqa: PLC0415

    gw = _cp_gateway()
    recorded: list[HealthSample | None] = []

    async def record(sample: HealthSample | None, policy: object) -> None:
        recorded.append(sample)

    gw.record_health = record  # type: ignore[method-assign]
    attempt = Attempt(gw, "strict")
    reply = await attempt.on_response_headers(_status_msg("400").response_headers)
    assert recorded == []  # held for the body
    assert reply.mode_override.response_body_mode != 0
    await attempt.on_response_body(pb.HttpBody(body=body, end_of_stream=True))
    await gw.drain()
    assert recorded == [HealthSample("strict", 400, content_policy=flag)]
    attempt.close()  # nothing held any more: nothing recorded twice
    await gw.drain()
    assert len(recorded) == 1


async def test_a_failover_attempts_400_without_a_body_is_recorded_at_the_end() -> None:
    from extproc.adapters.attempts import Attempt  # noqa: PLC0415
    from extproc.core.health import HealthSample  # noqa: PLC0415

    gw = _cp_gateway()
    recorded: list[HealthSample | None] = []

    async def record(sample: HealthSample | None, policy: object) -> None:
        recorded.append(sample)

    gw.record_health = record  # type: ignore[method-assign]
    attempt = Attempt(gw, "strict")
    await attempt.on_response_headers(_status_msg("400").response_headers)
    attempt.close()
    await gw.drain()
    assert recorded == [HealthSample("strict", 400)]
