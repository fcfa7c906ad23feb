"""The response side of the core (pure): which deployment served and prices a call,
what its answer teaches about health, whether its reservation is given back; the
failover attempts' answers; the one credential rule and the one header builder."""

from __future__ import annotations

import dataclasses

import pytest

from extproc.adapters.headers import header_mutation, header_option
from extproc.core.charges import Charge
from extproc.core.decision import decide_response, failed_attempt
from extproc.core.failover import (
    SERVED_BY_HEADER,
    SERVED_PATH_HEADER,
    STOP_HEADER,
    attempt_answer,
    deployment_cluster_name,
    refusal_class,
)
from extproc.core.health import HealthSample
from extproc.core.providers import CLIENT_CREDENTIAL_HEADERS, credential_edits
from extproc.policy import CompiledPolicy, compile_policy, parse_policy

POLICY: CompiledPolicy = compile_policy(
    parse_policy(
        {
            "model_groups": [
                {
                    "name": "pair",
                    "num_retries": 1,
                    "content_policy_fallbacks": ["solo"],
                    "deployments": [
                        {"id": "a", "cluster": "ca", "model": "m"},
                        {"id": "b", "cluster": "cb", "model": "m"},
                    ],
                },
                {"name": "solo", "deployments": [{"id": "s", "cluster": "cs", "model": "m"}]},
            ]
        }
    )
)
STARTED = 1_000.0


def charge(dep: str, *, stream: bool = False, failover: bool | None = None) -> Charge:
    """A call admitted to ``dep``; sent through its failover cluster when it has one
    (unless ``failover`` says otherwise)."""
    return Charge(
        rid="r",
        api="openai",
        endpoint="chat_completions",
        group="pair" if dep in "ab" else "solo",
        deployment=dep,
        stream=stream,
        strip_usage=False,
        estimate=0,
        keys=(),
        ttls=(),
        started=STARTED,
        failover=dep in POLICY.failover if failover is None else failover,
    )


#: (case, admitted deployment, stream, response headers, end of stream) →
#: (priced by, stripped headers, health sample, meter, cancel, read error, stream body)
RESPONSE_CASES: list[
    tuple[
        str,
        str,
        bool,
        dict[str, str],
        bool,
        tuple[str, tuple[str, ...], HealthSample | None, bool, bool, int | None, bool],
    ]
] = [
    (
        "a 200 counts for its deployment and is metered",
        "s",
        False,
        {":status": "200"},
        False,
        ("s", (), HealthSample("s", 200), True, False, None, True),
    ),
    (
        "a stream's status comes with its time to first token",
        "s",
        True,
        {":status": "200"},
        False,
        ("s", (), HealthSample("s", 200, 2.5), True, False, None, True),
    ),
    (
        "a 200 without a body: metered, nothing streams",
        "s",
        False,
        {":status": "200"},
        True,
        ("s", (), HealthSample("s", 200), True, False, None, False),
    ),
    (
        "a 429 is given back and its error body read",
        "s",
        False,
        {":status": "429"},
        False,
        ("s", (), HealthSample("s", 429), False, True, 429, False),
    ),
    (
        "an error without a body: given back, nothing to read",
        "s",
        False,
        {":status": "503"},
        True,
        ("s", (), HealthSample("s", 503), False, True, None, False),
    ),
    (
        "served-by from an upstream of a call without failover: stripped, ignored",
        "s",
        False,
        {":status": "200", SERVED_BY_HEADER: "a"},
        False,
        ("s", (SERVED_BY_HEADER,), HealthSample("s", 200), True, False, None, True),
    ),
    (
        "failover: the deployment that served prices it; its attempt counted the status",
        "a",
        False,
        {":status": "200", SERVED_BY_HEADER: "b"},
        False,
        ("b", (SERVED_BY_HEADER,), None, True, False, None, True),
    ),
    (
        "failover stream: a time-to-first-token sample for the one that served",
        "a",
        True,
        {":status": "200", SERVED_BY_HEADER: "b"},
        False,
        ("b", (SERVED_BY_HEADER,), HealthSample("b", None, 2.5), True, False, None, True),
    ),
    (
        "failover naming a deployment the policy does not have: priced as admitted",
        "a",
        False,
        {":status": "200", SERVED_BY_HEADER: "gone"},
        False,
        ("a", (SERVED_BY_HEADER,), None, True, False, None, True),
    ),
    (
        "Envoy's own reply after failed attempts: each was counted already",
        "a",
        False,
        {":status": "503"},
        False,
        ("a", (), None, False, True, 503, False),
    ),
    (
        "no status at all: no sample, given back",
        "s",
        False,
        {},
        False,
        ("s", (), None, False, True, None, False),
    ),
]


@pytest.mark.parametrize(
    ("case", "dep", "stream", "headers", "end", "expected"),
    RESPONSE_CASES,
    ids=[c[0] for c in RESPONSE_CASES],
)
def test_decide_response(
    case: str,
    dep: str,
    stream: bool,
    headers: dict[str, str],
    end: bool,
    expected: tuple[str, tuple[str, ...], HealthSample | None, bool, bool, int | None, bool],
) -> None:
    answer = decide_response(
        charge(dep, stream=stream), headers, POLICY, end_of_stream=end, now=STARTED + 2.5
    )
    got = (
        answer.charge.priced_by,
        answer.remove_headers,
        answer.health,
        answer.meter,
        answer.cancel,
        answer.read_error,
        answer.stream_body,
    )
    assert got == expected, case
    # the admitted deployment keeps its in-flight count, whoever served
    assert answer.charge.deployment == dep
    assert dataclasses.replace(answer.charge, served=None) == charge(dep, stream=stream)


def test_failed_attempt() -> None:
    cluster = deployment_cluster_name("b")
    assert failed_attempt(POLICY, cluster, client_left=False) == HealthSample("b", 503)
    assert failed_attempt(POLICY, cluster, client_left=True) is None
    assert failed_attempt(POLICY, "dep.unknown", client_left=False) is None


def test_attempt_answer() -> None:
    route = POLICY.failover["a"]  # dynamic: pair has content-policy fallbacks
    group_of = {"a": "pair", "b": "pair", "s": "solo"}.get
    plain = attempt_answer("a", route, "200", end_of_stream=False, group_of=group_of)
    assert plain.health == HealthSample("a", 200)
    assert plain.set_headers == ((SERVED_BY_HEADER, "a"), (SERVED_PATH_HEADER, "0,0"))
    assert not plain.check_refusal
    # on a dynamic route every 400 with a body is read: it may be a refusal
    assert attempt_answer("a", route, "400", end_of_stream=False).check_refusal
    assert not attempt_answer("a", route, "400", end_of_stream=True).check_refusal
    assert attempt_answer("a", route, "", end_of_stream=False).health is None
    # attempt 2 (b, the retry) fails: nothing is left on the default order, so Envoy
    # is told not to retry
    last = attempt_answer("b", route, "500", end_of_stream=False, attempt=2)
    assert (STOP_HEADER, "true") in last.set_headers
    first = attempt_answer("a", route, "500", end_of_stream=False, attempt=1)
    assert all(k != STOP_HEADER for k, _ in first.set_headers)
    # served by the content-policy fallback after a refusal: one retry, one group
    served = attempt_answer(
        "s",
        route,
        "200",
        end_of_stream=False,
        events={1: "content_policy"},
        attempt=2,
        group_of=group_of,
    )
    assert (SERVED_PATH_HEADER, "1,1") in served.set_headers
    # a route without class lists keeps the plain answer
    assert "s" not in POLICY.failover  # solo fails over nowhere: no route at all


def test_refusal_class() -> None:
    refusal = b'{"error": {"message": "request blocked by the safety system"}}'
    assert refusal_class(refusal) == "content_policy"
    too_long = b'{"error": {"message": "This model\'s maximum context length is 8192 tokens"}}'
    assert refusal_class(too_long) == "context_window"
    assert refusal_class(b'{"error": {"message": "bad temperature"}}') is None
    assert refusal_class(b"not json at all") is None


@pytest.mark.parametrize(
    ("header", "value", "sets", "removes"),
    [
        # the deployment's own header overwrites, every other client credential goes
        (
            "authorization",
            "Bearer k",
            (("authorization", "Bearer k"),),
            ("x-api-key", "api-key"),
        ),
        ("x-api-key", "k", (("x-api-key", "k"),), ("authorization", "api-key")),
        # no credential: none travels, the deployment's header included
        ("authorization", None, (), ("x-api-key", "api-key", "authorization")),
        ("x-goog-api-key", None, (), (*CLIENT_CREDENTIAL_HEADERS, "x-goog-api-key")),
        # an unknown deployment: every client credential removed
        (None, None, (), CLIENT_CREDENTIAL_HEADERS),
    ],
)
def test_credential_rule(
    header: str | None,
    value: str | None,
    sets: tuple[tuple[str, str], ...],
    removes: tuple[str, ...],
) -> None:
    assert credential_edits(header, value) == (sets, removes)


def test_header_builder() -> None:
    option = header_option("x-a", "é")
    assert (option.header.key, option.header.raw_value, option.header.value) == ("x-a", b"\xe9", "")
    authz = header_option("x-a", "v", raw=False)
    assert (authz.header.value, authz.header.raw_value) == ("v", b"")
    assert option.append_action == option.OVERWRITE_IF_EXISTS_OR_ADD
    mutation = header_mutation([("x-a", "1")], ["x-b"])
    assert [h.header.key for h in mutation.set_headers] == ["x-a"]
    assert list(mutation.remove_headers) == ["x-b"]


def test_a_call_whose_failover_was_dropped_is_a_plain_call() -> None:
    """A deployment with a failover route, called straight (the call did not fit
    every attempt): no attempt filter counted its status or set the served-by
    header, so an upstream's header is stripped and ignored and the status counts."""
    direct = charge("a", failover=False)
    assert "a" in POLICY.failover
    answer = decide_response(
        direct, {":status": "500", SERVED_BY_HEADER: "b"}, POLICY, end_of_stream=True, now=0.0
    )
    assert answer.charge.priced_by == "a"
    assert answer.remove_headers == (SERVED_BY_HEADER,)
    assert answer.health == HealthSample("a", 500, None)
