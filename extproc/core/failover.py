"""In-request failover, the Envoy way.

For a group that can fail over (``num_retries`` > 0, ``fallbacks`` or
``content_policy_fallbacks``), every
deployment ``d`` gets a composite cluster (``envoy.clusters.composite``) whose
sub-clusters are ``d`` first, then up to ``num_retries`` of the group's other
deployments, then the deployments of its fallback groups, then those of its
content-policy fallback groups (at most five retries in all). A content-policy refusal
(a 400) is not something Envoy retries: the attempt filter reads such a 400 and, while
a content-policy fallback is still to come, turns it into a 503 so Envoy moves on.
The server routes a call to the composite cluster of the deployment its strategy
chose; the route's retry policy (429, 5xx, resets, connect failures) makes Envoy send
attempt N to sub-cluster N. Each deployment has a cluster of its own here (a copy of
its upstream whose endpoint metadata names the deployment), so an upstream ext_proc
filter on the composite cluster, which runs once per attempt, can tell which
deployment an attempt goes to and give it that deployment's credentials and model
name (``adapters.ext_proc``'s attempt streams). Once response bytes reached the client
Envoy never retries, so a stream failing midway ends in an error, not a retry.

The plan is derived from the policy alone, the same way by ``extproc envoy-config``
and by the server, so the cluster names agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from extproc.core.health import HealthSample
from extproc.core.upstream_errors import normalize_error

__all__ = [
    "DEPLOYMENT_CLUSTER_PREFIX",
    "DEPLOYMENT_HEADER",
    "MAX_RETRIES",
    "RETRIABLE_STATUSES",
    "RETRY_REASON_HEADER",
    "SERVED_BY_HEADER",
    "STREAM_HEADER",
    "AttemptAnswer",
    "AttemptTimeouts",
    "FailoverGroup",
    "FailoverRoute",
    "attempt_answer",
    "composite_name",
    "content_policy_retry",
    "deployment_cluster_name",
    "failover_plan",
]

MAX_RETRIES = 5
#: Set by the server on a call it routes to a composite cluster: the deployment it
#: chose (the first attempt needs no rewrite). Removed before any upstream sees it.
DEPLOYMENT_HEADER = "x-extproc-deployment"
#: Added to the response by the attempt that answered: which deployment served it.
SERVED_BY_HEADER = "x-extproc-served-by"
#: On an attempt's refusal turned retriable (content policy): why.
RETRY_REASON_HEADER = "x-extproc-retry"
#: Set by the server on a streamed call it routes to a composite cluster, so Envoy
#: picks the route with the stream timeouts. Removed before any upstream sees it.
STREAM_HEADER = "x-extproc-stream"
#: Answers besides 5xx that move a call on to the next deployment (LiteLLM retries
#: these on the group's other deployments, then its fallbacks): rate limited, and a
#: deployment that is misconfigured (a bad key, no access, a wrong model name).
RETRIABLE_STATUSES = (429, 401, 403, 404)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _slug(dep_id: str) -> str:
    digest = hashlib.sha1(dep_id.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{_UNSAFE.sub('_', dep_id)[:60]}.{digest}"


def composite_name(dep_id: str) -> str:
    """The composite cluster a call chosen for ``dep_id`` is routed to."""
    return f"fo.{_slug(dep_id)}"


#: Per-deployment clusters of failover plans are named ``dep.<slug>``.
DEPLOYMENT_CLUSTER_PREFIX = "dep."


def deployment_cluster_name(dep_id: str) -> str:
    """The per-deployment copy of its upstream cluster (endpoint metadata names it)."""
    return f"{DEPLOYMENT_CLUSTER_PREFIX}{_slug(dep_id)}"


@dataclass(frozen=True, slots=True)
class AttemptTimeouts:
    """Seconds an attempt may take before Envoy gives up on it and moves on
    (LiteLLM's ``timeout`` and ``stream_timeout``; None: no limit of its own)."""

    timeout: float | None = None
    #: For streams: the wait for the first byte and between bytes; else ``timeout``.
    stream_timeout: float | None = None

    @property
    def stream(self) -> float | None:
        return self.stream_timeout or self.timeout


@dataclass(frozen=True, slots=True)
class FailoverGroup:
    """What the plan needs of a model group."""

    name: str
    #: (deployment id, Envoy cluster) in policy order.
    deployments: Sequence[tuple[str, str]]
    #: Retries on the group's other deployments before the fallbacks (LiteLLM's).
    num_retries: int = 0
    fallbacks: Sequence[str] = ()
    #: Groups a content-policy refusal goes to (after the attempts above).
    content_policy_fallbacks: Sequence[str] = ()
    #: Per deployment, in the order of ``deployments``; none: no timeouts.
    timeouts: Sequence[AttemptTimeouts] = ()


@dataclass(frozen=True, slots=True)
class FailoverRoute:
    """One composite cluster: the attempts, in order, as (deployment id, cluster)."""

    composite: str
    attempts: tuple[tuple[str, str], ...]
    #: Index of the first content-policy fallback attempt, if any.
    content_policy_from: int | None = None
    #: The first attempt's deployment's timeouts; Envoy applies them to every attempt.
    timeouts: AttemptTimeouts = AttemptTimeouts()

    def content_policy_fallback_after(self, dep_id: str) -> bool:
        """Whether a content-policy fallback attempt is still to come after ``dep_id``'s."""
        if self.content_policy_from is None:
            return False
        position = next((i for i, (d, _) in enumerate(self.attempts) if d == dep_id), None)
        return position is not None and position + 1 < len(self.attempts)

    @property
    def retries(self) -> int:
        return len(self.attempts) - 1


def failover_plan(
    groups: Iterable[FailoverGroup], default_fallbacks: Sequence[str] = ()
) -> dict[str, FailoverRoute]:
    """Deployment id → its failover route, for every deployment that has somewhere
    to fail over to."""
    by_name: Mapping[str, FailoverGroup] = {g.name: g for g in groups}
    plan: dict[str, FailoverRoute] = {}
    for group in by_name.values():
        fallbacks = group.fallbacks or [f for f in default_fallbacks if f != group.name]
        others: list[tuple[str, str]] = []
        for name in fallbacks:
            fallback = by_name.get(name)
            if fallback is not None:
                others += fallback.deployments
        policy_others: list[tuple[str, str]] = []
        for name in group.content_policy_fallbacks:
            fallback = by_name.get(name)
            if fallback is not None:
                policy_others += fallback.deployments
        timeouts = dict(zip(group.deployments, group.timeouts, strict=False))
        for dep in group.deployments:
            retries = [d for d in group.deployments if d != dep][: group.num_retries]
            attempts: list[tuple[str, str]] = []
            for candidate in (dep, *retries, *others):
                if all(candidate[0] != taken[0] for taken in attempts):
                    attempts.append(candidate)
            attempts = attempts[: 1 + MAX_RETRIES]
            content_from: int | None = None
            for candidate in policy_others:
                if len(attempts) > MAX_RETRIES:
                    break
                if all(candidate[0] != taken[0] for taken in attempts):
                    content_from = len(attempts) if content_from is None else content_from
                    attempts.append(candidate)
            if len(attempts) > 1:
                plan[dep[0]] = FailoverRoute(
                    composite_name(dep[0]),
                    tuple(attempts),
                    content_from,
                    timeouts.get(dep, AttemptTimeouts()),
                )
    return plan


@dataclass(frozen=True, slots=True)
class AttemptAnswer:
    """What the response headers of one failover attempt decide."""

    #: The attempt's status, for its deployment's health (cooldowns).
    health: HealthSample | None
    #: Response headers to set: which deployment served (read back for pricing).
    set_headers: tuple[tuple[str, str], ...]
    #: A 400 whose body is read: a content-policy refusal moves the call on.
    check_content_policy: bool


def attempt_answer(
    dep_id: str, route: FailoverRoute | None, status: str, *, end_of_stream: bool
) -> AttemptAnswer:
    """Rule: every attempt's status counts for its own deployment, and its answer
    names that deployment in ``x-extproc-served-by``; a 400 with a body is read only
    while a content-policy fallback is still to come after this attempt."""
    numeric = int(status) if status.isascii() and status.isdigit() else None
    return AttemptAnswer(
        health=HealthSample(dep_id, numeric) if numeric is not None else None,
        set_headers=((SERVED_BY_HEADER, dep_id),),
        check_content_policy=(
            status == "400"
            and not end_of_stream
            and route is not None
            and route.content_policy_fallback_after(dep_id)
        ),
    )


def content_policy_retry(body: bytes) -> tuple[tuple[str, str], ...]:
    """The response headers that turn a content-policy refusal (a 400 ``body``) into
    a 503 Envoy retries on the next deployment; none for any other 400."""
    if refuses_content(normalize_error(400, body)):
        return ((":status", "503"), (RETRY_REASON_HEADER, "content_policy"))
    return ()


def refuses_content(normalized: bytes | None) -> bool:
    """Whether a normalized upstream error (:func:`normalize_error`) is a
    content-policy refusal."""
    return normalized is not None and b'"content_policy_violation"' in normalized


def held_for_body(sample: HealthSample | None, *, end_of_stream: bool) -> bool:
    """Rule: a 400's health sample waits for its body, which tells a content-policy
    refusal (its own ``allowed_fails_policy`` class) from another bad request."""
    return sample is not None and sample.status == 400 and not end_of_stream


def with_body(sample: HealthSample, body: bytes) -> HealthSample:
    """A held 400 sample (:func:`held_for_body`) once its body is read."""
    return dataclasses.replace(sample, content_policy=refuses_content(normalize_error(400, body)))
