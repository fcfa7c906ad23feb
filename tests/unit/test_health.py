"""LiteLLM's cooldown rules (extproc.core.health), one table row per rule, and the
same rules through the store-backed router on a memory store."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from extproc.core.health import (
    NO_LIMITS,
    FailLimits,
    FailureRule,
    HealthSample,
    cooldown_key,
    cooldown_reason,
    error_class,
    failure_rule,
)
from extproc.policy import compile_policy, parse_policy
from extproc.state.metrics import Metrics
from extproc.state.routing import Router
from extproc.store import MemoryStore, StoreError
from tests.helpers import StoppedClock
from tests.unit.test_routing import NOW


def limits(allowed: int | None = None, **policy: int) -> FailLimits:
    return FailLimits(allowed, MappingProxyType(policy) if policy else None)


@pytest.mark.parametrize(
    ("status", "content_policy", "expected"),
    [
        (200, False, None),
        (400, False, "bad_request"),
        (400, True, "content_policy"),
        (402, False, "bad_request"),
        (401, False, "authentication"),
        (403, False, "authentication"),
        (404, False, "not_found"),
        (408, False, "timeout"),
        (504, False, "timeout"),  # Envoy's per-try timeout
        (429, False, "rate_limit"),
        (500, False, "internal_server_error"),
        (501, False, "internal_server_error"),
        (502, False, "bad_gateway"),
        (503, False, "service_unavailable"),
        (422, False, "bad_request"),
    ],
)
def test_error_classes(status: int, content_policy: bool, expected: str | None) -> None:
    assert error_class(status, content_policy=content_policy) == expected


# (status, group size, failures, requests) under the default rules: nothing set
DEFAULT_CASES = [
    ("429 with siblings", 429, 2, 1, 1, True),
    ("429 alone", 429, 1, 1, 1, False),
    ("401 alone: not worth retrying", 401, 1, 1, 1, True),
    ("404 alone", 404, 1, 1, 1, True),
    ("402 with siblings", 402, 2, 1, 1, True),
    ("402 alone", 402, 1, 1, 1, False),
    ("408 is retried, not cooled at once", 408, 3, 1, 10, False),
    ("403 never", 403, 3, 9, 10, False),
    ("400 never", 400, 3, 9, 10, False),
    ("422 never", 422, 3, 1, 1, False),
    ("one 500", 500, 3, 1, 1, False),
    ("3 of 5 failed", 500, 3, 3, 5, True),
    ("2 of 4 failed: under 5 calls", 500, 3, 3, 4, False),
    ("exactly half", 500, 3, 5, 10, False),
    ("many 5xx at 25%: not the old allowed_fails 3", 503, 3, 25, 100, False),
    ("a lone deployment at 100% of 50", 500, 1, 50, 50, False),
    ("a lone deployment at 100% of 1000", 500, 1, 1000, 1000, True),
    ("a success", 200, 3, 9, 10, False),
]


@pytest.mark.parametrize(
    ("case", "status", "size", "failures", "requests", "cools"),
    DEFAULT_CASES,
    ids=[c[0] for c in DEFAULT_CASES],
)
def test_default_rules(
    case: str, status: int, size: int, failures: int, requests: int, cools: bool
) -> None:
    rule = failure_rule(status, group_size=size, has_fallbacks=False)
    assert rule.counter is None
    reason = cooldown_reason(status, rule, group_size=size, failures=failures, requests=requests)
    assert (reason is not None) is cools, case


LIMIT_CASES = [
    # allowed_fails on the group (or router_settings): counted, the rate rule off
    ("allowed 100, 5th failure", 500, 3, limits(100), NO_LIMITS, "shared", 100),
    ("allowed 3 (explicit), a 429 counts", 429, 3, limits(3), NO_LIMITS, "shared", 3),
    ("allowed 0", 500, 3, limits(0), NO_LIMITS, "shared", 0),
    (
        "policy entry for the class",
        500,
        3,
        limits(100, internal_server_error=1),
        NO_LIMITS,
        "shared",
        1,
    ),
    (
        "policy without the class: allowed_fails",
        503,
        3,
        limits(7, internal_server_error=1),
        NO_LIMITS,
        "shared",
        7,
    ),
    ("policy alone: 3 for other classes", 429, 3, limits(timeout=9), NO_LIMITS, "shared", 3),
    ("400 still never", 400, 3, limits(1, bad_request=1), NO_LIMITS, None, None),
    ("lone, no entry", 500, 1, limits(1), NO_LIMITS, None, None),
    ("lone, the policy names it", 500, 1, limits(internal_server_error=2), NO_LIMITS, "shared", 2),
    # deployment level first
    ("deployment allowed_fails", 500, 3, limits(1), limits(50), "any", 50),
    (
        "deployment policy entry, counted per class",
        504,
        3,
        limits(1),
        limits(50, timeout=4),
        "timeout",
        4,
    ),
    (
        "deployment policy lets a 400 count",
        400,
        3,
        NO_LIMITS,
        limits(bad_request=2),
        "bad_request",
        2,
    ),
    ("deployment policy without the class", 500, 3, limits(6), limits(timeout=1), "shared", 6),
    (
        "lone, deployment allowed_fails",
        500,
        1,
        limits(internal_server_error=1),
        limits(5),
        None,
        None,
    ),
    (
        "lone, deployment policy names it",
        500,
        1,
        NO_LIMITS,
        limits(internal_server_error=0),
        "internal_server_error",
        0,
    ),
]


@pytest.mark.parametrize(
    ("case", "status", "size", "group", "deployment", "counter", "allowed"),
    LIMIT_CASES,
    ids=[c[0] for c in LIMIT_CASES],
)
def test_allowed_fails_rules(
    case: str,
    status: int,
    size: int,
    group: FailLimits,
    deployment: FailLimits,
    counter: str | None,
    allowed: int | None,
) -> None:
    rule = failure_rule(
        status, group_size=size, has_fallbacks=False, group=group, deployment=deployment
    )
    if counter is None:
        assert rule.never, case
        return
    assert (rule.counter, rule.allowed) == (counter, allowed), case
    assert allowed is not None
    # cools once the counter exceeds the allowance; the minute's rate plays no part
    for counted in range(allowed + 1):
        assert (
            cooldown_reason(
                status, rule, group_size=size, failures=99, requests=99, counted=counted
            )
            is None
        )
    assert (
        cooldown_reason(status, rule, group_size=size, failures=0, requests=1, counted=allowed + 1)
        is not None
    )


def test_fallbacks_make_a_lone_deployment_count() -> None:
    rule = failure_rule(500, group_size=1, has_fallbacks=True, group=limits(2))
    assert rule == FailureRule(counter="shared", allowed=2)


def test_a_content_policy_refusal_is_its_own_class() -> None:
    deployment = limits(content_policy=1)
    rule = failure_rule(
        400, group_size=2, has_fallbacks=False, deployment=deployment, content_policy=True
    )
    assert rule == FailureRule(counter="content_policy", allowed=1)
    plain = failure_rule(400, group_size=2, has_fallbacks=False, deployment=deployment)
    assert plain.never


def test_a_content_policy_refusal_without_its_own_entry_takes_the_bad_request_one() -> None:
    """LiteLLM matches allowed_fails_policy by exception class, and its content-policy
    error is a bad request: the bad-request entry applies when there is no other."""
    deployment = limits(bad_request=2)
    rule = failure_rule(
        400, group_size=2, has_fallbacks=False, deployment=deployment, content_policy=True
    )
    assert rule == FailureRule(counter="content_policy", allowed=2)
    both = limits(bad_request=2, content_policy=0)
    rule = failure_rule(
        400, group_size=2, has_fallbacks=False, deployment=both, content_policy=True
    )
    assert rule == FailureRule(counter="content_policy", allowed=0)


# --- through the router, on a memory store ------------------------------------------


def _policy(**group: object) -> dict[str, object]:
    return {
        "model_groups": [
            {
                "name": "g",
                "deployments": [
                    {"id": d, "cluster": f"c{d}", "model": "m", **group.pop(d, {})}  # type: ignore[dict-item]
                    for d in "abc"
                ],
                **group,
            }
        ]
    }


async def _cooled(policy: dict[str, object], answers: list[tuple[str, int]]) -> set[str]:
    compiled = compile_policy(parse_policy(policy))
    store, errors = MemoryStore(), list[StoreError]()
    router = Router(
        store,
        Metrics(),
        StoppedClock(NOW),
        on_read_error=errors.append,
        on_write_error=errors.append,
    )
    for dep, status in answers:
        await router.record(HealthSample(dep, status), compiled)
    await router.flush_successes()
    flags = await store.get_many([cooldown_key(d) for d in "abc"])
    assert errors == []
    return {d for d, flag in zip("abc", flags, strict=True) if flag is not None}


async def test_three_deployments_failing_a_quarter_stay_in_service() -> None:
    # every fourth answer of each deployment is a 500, 40 answers each in one minute
    answers = [(d, 500 if i % 4 == 3 else 200) for i in range(40) for d in "abc"]
    assert await _cooled(_policy(), answers) == set()
    # the old rule (more than 3 failures a minute) would cool all three
    assert await _cooled(_policy(allowed_fails=3), answers) == {"a", "b", "c"}


async def test_allowed_fails_100_does_not_cool_at_the_fifth_failure() -> None:
    answers = [("a", 500)] * 5
    assert await _cooled(_policy(), answers) == {"a"}  # the rate rule: 5 of 5 failed
    assert await _cooled(_policy(allowed_fails=100), answers) == set()
    assert await _cooled(_policy(allowed_fails=100), [("a", 500)] * 101) == {"a"}
    routed = {"router_settings": {"allowed_fails": 100}, **_policy()}
    assert await _cooled(routed, answers) == set()


async def test_allowed_fails_policy_per_class_and_per_deployment() -> None:
    policy = _policy(allowed_fails_policy={"RateLimitErrorAllowedFails": 2})
    assert await _cooled(policy, [("a", 429)] * 2) == set()
    assert await _cooled(policy, [("a", 429)] * 3) == {"a"}
    own = _policy(a={"allowed_fails_policy": {"BadRequestErrorAllowedFails": 1}})
    assert await _cooled(own, [("a", 400)] * 2 + [("b", 400)] * 5) == {"a"}
