"""Deployment health and load, shared by every server process through the store.

Per deployment (keys hash-tagged ``{dep:<id>}`` so each deployment's keys share a
Redis Cluster slot): a cooldown flag with a TTL, this minute's request and failure
counts (and allowed-fails counters), rpm/tpm counters for usage-based routing, an
in-flight counter for least-busy, and the last latency samples for latency-based
routing.

Cooldown rules are LiteLLM's, as of litellm 1.110.2 (PyPI;
``router_utils/cooldown_handlers.py``). Every answer of 400 or more counts as a failure
of the minute; then, for the answer that just failed:

1. Only some statuses can cool at all: 429, 401, 402, 404, 408 and every 5xx (other
   4xx are the caller's fault), unless the deployment's own ``allowed_fails_policy``
   names the answer's error class.
2. A lone deployment (one in its group) is never cooled for a 402 unless a policy
   names bad requests.
3. Deployment level first: a deployment with ``allowed_fails`` or
   ``allowed_fails_policy`` cools once its failures this minute exceed the first of:
   its policy's entry for the error class (counted per class), its ``allowed_fails``,
   the group's policy entry, the group's ``allowed_fails``, 3. A lone deployment
   without fallbacks is exempt unless its policy names the class (or, without its own
   ``allowed_fails``, the group's policy does).
4. Group level (``allowed_fails``/``allowed_fails_policy`` on the group, else in
   ``router_settings``): the same count against the policy's entry for the class, else
   ``allowed_fails``, else 3; the failure-rate rule does not apply. A lone deployment
   without fallbacks is exempt unless the policy names the class.
5. Neither set (the default): a 429 cools a deployment that has siblings; so does more
   than 50% failures of at least 5 calls this minute; every call of at least 1000 this
   minute failing cools even a lone deployment; and an answer not worth retrying (401,
   402, 404) cools any deployment.

The cooldown lasts the deployment's ``cooldown_time``, else the group's; 0 turns
cooldowns off. It does not grow when a deployment cools again right after (LiteLLM's
cooldown cache has no backoff). Error classes follow LiteLLM's exception mapping, by
status: 400/402 bad request (a content-policy refusal is its own class), 401/403
authentication (LiteLLM reads 403 as PermissionDenied, which no policy field names;
here the authentication entry covers it, while 403 still never cools by default),
404 not found, 408/504 timeout, 429 rate limit, 502 bad gateway, 503 service
unavailable, any other 5xx internal server error.

Where we differ, and why: the minute is the clock minute, counted in the store for
every process (LiteLLM counts per process, for 60 s from the first call); the
allowed-fails counters are minute counters too (LiteLLM's expire ``cooldown_time``
after the last failure); an Envoy 503 for a refused connection counts like any 503
(LiteLLM never cools for its APIConnectionError; here a dead upstream must stop
getting calls); and the upstream's ``retry-after`` does not set the cooldown length.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from extproc.store.keys import store_key

__all__ = [
    "ERROR_CLASSES",
    "NO_LIMITS",
    "DeploymentState",
    "FailLimits",
    "FailureRule",
    "HealthSample",
    "cooldown_key",
    "cooldown_reason",
    "counts_as_failure",
    "error_class",
    "fails_key",
    "failure_rule",
    "inflight_key",
    "latency_key",
    "minute_key",
    "ttft_key",
]

#: Latency samples kept per deployment (LiteLLM averages the last 10).
SAMPLES = 10
FAILURE_RATE = 0.5
MIN_REQUESTS_FOR_RATE = 5
#: Every call of at least this many this minute failing cools even a lone deployment.
ALL_FAILED_MIN_REQUESTS = 1000
#: The allowed fails when a policy is set but names neither the class nor a count.
DEFAULT_ALLOWED_FAILS = 3
#: The 4xx that can cool a deployment (LiteLLM's ``_is_cooldown_required``).
_COOLING_4XX = frozenset({401, 402, 404, 408, 429})
#: The 4xx worth retrying (LiteLLM's ``should_retry``); the rest cool at once.
_RETRYABLE_4XX = frozenset({408, 409, 429})

#: Error classes of ``allowed_fails_policy``, keyed as in LiteLLM's policy fields.
ERROR_CLASSES: Mapping[str, str] = MappingProxyType(
    {
        "BadRequestErrorAllowedFails": "bad_request",
        "AuthenticationErrorAllowedFails": "authentication",
        "TimeoutErrorAllowedFails": "timeout",
        "RateLimitErrorAllowedFails": "rate_limit",
        "ContentPolicyViolationErrorAllowedFails": "content_policy",
        "InternalServerErrorAllowedFails": "internal_server_error",
        "ServiceUnavailableErrorAllowedFails": "service_unavailable",
        "BadGatewayErrorAllowedFails": "bad_gateway",
        "NotFoundErrorAllowedFails": "not_found",
    }
)
#: The error class of a status that is not a bad request nor a generic 5xx.
_CLASS_OF_STATUS: Mapping[int, str] = MappingProxyType(
    {
        401: "authentication",
        403: "authentication",
        404: "not_found",
        408: "timeout",
        504: "timeout",
        429: "rate_limit",
        502: "bad_gateway",
        503: "service_unavailable",
    }
)


def _key(dep: str, *parts: str) -> str:
    return store_key(("dep", dep), *parts)


def cooldown_key(dep: str) -> str:
    return _key(dep, "cooldown")


def minute_key(dep: str, minute: int, what: str) -> str:
    """``what``: req, fail, rpm, tpm — counters of one clock minute."""
    return _key(dep, f"m{minute}", what)


def fails_key(dep: str, minute: int, counter: str) -> str:
    """An allowed-fails counter of one clock minute (see :class:`FailureRule`)."""
    return _key(dep, f"m{minute}", "allowed", counter)


def inflight_key(dep: str) -> str:
    return _key(dep, "inflight")


def latency_key(dep: str) -> str:
    return _key(dep, "latency")


def ttft_key(dep: str) -> str:
    return _key(dep, "ttft")


def counts_as_failure(status: int) -> bool:
    """A failure of the minute (LiteLLM counts every failed call): any status of 400 or
    more (connect failures and resets arrive as Envoy's 503)."""
    return status >= 400


def error_class(status: int, *, content_policy: bool = False) -> str | None:
    """The ``allowed_fails_policy`` class of a failed answer (None: not a failure).

    ``content_policy``: the upstream refused the content (a 400 of its own class)."""
    if status < 400:
        return None
    if status in (400, 402):
        return "content_policy" if content_policy else "bad_request"
    if status in _CLASS_OF_STATUS:
        return _CLASS_OF_STATUS[status]
    return "internal_server_error" if status >= 500 else "bad_request"


@dataclass(frozen=True, slots=True)
class FailLimits:
    """``allowed_fails`` and ``allowed_fails_policy`` of one level (group or
    deployment); ``policy`` maps an error class to its allowed fails."""

    allowed_fails: int | None = None
    #: None: no policy given (an empty one still switches the rate rule off).
    policy: Mapping[str, int] | None = None

    @property
    def given(self) -> bool:
        return self.allowed_fails is not None or self.policy is not None

    def entry(self, cls: str) -> int | None:
        if self.policy is None:
            return None
        found = self.policy.get(cls)
        if found is None and cls == "content_policy":
            # LiteLLM matches its entries by exception class, and a content-policy
            # refusal is a bad request: without an entry of its own, that one applies
            found = self.policy.get("bad_request")
        return found


NO_LIMITS = FailLimits()


@dataclass(frozen=True, slots=True)
class FailureRule:
    """How one failed answer may cool its deployment (from :func:`failure_rule`).

    ``counter`` set: the answer adds one to that allowed-fails counter of the minute,
    and cools the deployment once the counter exceeds ``allowed``. None: ``never``, or
    LiteLLM's default rules on the minute's counts decide."""

    never: bool = False
    counter: str | None = None
    allowed: int = DEFAULT_ALLOWED_FAILS


_NEVER = FailureRule(never=True)
_DEFAULT = FailureRule()


def _first(*values: int | None) -> int:
    return next((v for v in values if v is not None), DEFAULT_ALLOWED_FAILS)


def failure_rule(
    status: int,
    *,
    group_size: int,
    has_fallbacks: bool,
    group: FailLimits = NO_LIMITS,
    deployment: FailLimits = NO_LIMITS,
    content_policy: bool = False,
) -> FailureRule:
    """Which of LiteLLM's rules (module docstring, 1 to 5) judges a failed ``status``.

    ``group``: the group's limits, else router_settings'; ``has_fallbacks``: the group
    has fallback groups (a lone deployment with them is not exempt)."""
    cls = error_class(status, content_policy=content_policy)
    if cls is None:
        return _NEVER
    own = deployment.entry(cls)
    shared = group.entry(cls)
    if status < 500 and status not in _COOLING_4XX and own is None:
        return _NEVER
    single = group_size < 2
    lone = single and not has_fallbacks
    if single and status == 402 and own is None and shared is None:
        return _NEVER
    if deployment.given:
        if own is None and lone and (deployment.allowed_fails is not None or shared is None):
            return _NEVER
        if own is not None:
            return FailureRule(counter=cls, allowed=own)
        if deployment.allowed_fails is not None:
            return FailureRule(counter="any", allowed=deployment.allowed_fails)
        return FailureRule(counter="shared", allowed=_first(shared, group.allowed_fails))
    if not group.given:
        return _DEFAULT
    if lone and shared is None:
        return _NEVER
    return FailureRule(counter="shared", allowed=_first(shared, group.allowed_fails))


def cooldown_reason(
    status: int,
    rule: FailureRule,
    *,
    group_size: int,
    failures: int,
    requests: int,
    counted: int = 0,
) -> str | None:
    """Why a deployment that just answered ``status`` should cool down, or None.

    ``failures`` and ``requests`` are this minute's counts and ``counted`` the value of
    ``rule.counter`` (every one this answer included)."""
    if rule.never:
        return None
    if rule.counter is not None:
        if counted > rule.allowed:
            return f"{counted} failures this minute (allowed_fails {rule.allowed})"
        return None
    single = group_size < 2
    if status == 429 and not single:
        return "rate limited (429)"
    if requests >= ALL_FAILED_MIN_REQUESTS and failures >= requests:
        return f"all {requests} requests failed this minute"
    if not single and requests >= MIN_REQUESTS_FOR_RATE and failures / requests > FAILURE_RATE:
        return f"{failures} of {requests} requests failed this minute"
    if 400 <= status < 500 and status not in _RETRYABLE_4XX:
        return f"non-retryable {status}"
    return None


@dataclass(frozen=True, slots=True)
class DeploymentState:
    """What the store says about one deployment right now."""

    cooling_s: float | None = None
    inflight: int = 0
    rpm: int = 0
    tpm: int = 0
    latency: Sequence[float] = field(default_factory=tuple)
    ttft: Sequence[float] = field(default_factory=tuple)

    def mean_latency(self, *, stream: bool) -> float | None:
        samples = self.ttft if stream and self.ttft else self.latency
        return statistics.fmean(samples) if samples else None


@dataclass(frozen=True, slots=True)
class HealthSample:
    """What one answer teaches about a deployment's health, to record in the store.

    ``status`` None: only a time-to-first-token sample (a failover call's first byte,
    whose status its attempt already counted)."""

    deployment: str
    status: int | None = None
    #: Seconds from admission to the response headers (streams only).
    ttft_s: float | None = None
    #: A 400 that is the upstream's content-policy refusal (its own error class).
    content_policy: bool = False
