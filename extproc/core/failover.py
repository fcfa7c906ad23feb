"""In-request failover, the Envoy way.

For a group that can fail over (``num_retries`` > 0, ``fallbacks``, or fallbacks for
an error class), every deployment ``d`` gets a composite cluster
(``envoy.clusters.composite``). Its default order is ``d`` first, then up to
``num_retries`` of the group's other deployments, then the deployments of its fallback
groups (at most five retries in all). The server routes a call to the composite
cluster of the deployment its strategy chose; the route's retry policy (429, 5xx,
resets, connect failures) makes Envoy send attempt N to sub-cluster N.

Fallbacks by error class (LiteLLM's): a content-policy refusal goes to the group's
``content_policy_fallbacks`` and a provider's context-length error to its
``context_window_fallbacks``, never to the group's other deployments or its generic
fallbacks; with no such list the 400 reaches the client. Envoy fixes a composite's
order before the first attempt, so a group with such lists gets a *dynamic* route:
its sub-clusters are ``d`` and then the hop cluster (an Envoy internal listener whose
route picks the cluster named in ``x-extproc-attempt-cluster``). The attempt filter of
a retry reads the call's earlier refusals (one store key per refusal, by the call's
id, ``x-extproc-call``) and picks the attempt's deployment with :func:`next_attempt`; the
filter of a refused attempt records the refusal and turns the 400 into a 503 that
Envoy retries, and an attempt whose failure has no next deployment is marked
``x-envoy-ratelimited``, which Envoy does not retry.

Each deployment has a cluster of its own here (a copy of its upstream whose endpoint
metadata names the deployment), so an upstream ext_proc filter on the composite
cluster, which runs once per attempt, can tell which deployment an attempt goes to
and give it that deployment's credentials and model name (``adapters.attempts``).
Once response bytes reached the client Envoy never retries, so a stream failing
midway ends in an error, not a retry.

The plan is derived from the policy alone, the same way by ``extproc envoy-config``
and by the server, so the cluster names agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from extproc.core.health import HealthSample
from extproc.core.upstream_errors import normalize_error

__all__ = [
    "ATTEMPT_CLUSTER_HEADER",
    "ATTEMPT_COUNT_HEADER",
    "ATTEMPT_NUMBER_HEADER",
    "CALL_HEADER",
    "DEPLOYMENT_CLUSTER_PREFIX",
    "DEPLOYMENT_HEADER",
    "HOP_CLUSTER",
    "HOP_DEPLOYMENT",
    "HOP_LISTENER",
    "MAX_RETRIES",
    "REFUSAL_CLASSES",
    "RETRIABLE_STATUSES",
    "RETRY_REASON_HEADER",
    "SERVED_BY_HEADER",
    "SERVED_PATH_HEADER",
    "STOP_HEADER",
    "STREAM_HEADER",
    "AttemptAnswer",
    "AttemptTimeouts",
    "FailoverGroup",
    "FailoverRoute",
    "attempt_answer",
    "composite_name",
    "deployment_cluster_name",
    "failover_plan",
    "next_attempt",
    "refusal_class",
    "served_path",
    "sub_clusters",
]

MAX_RETRIES = 5
#: Set by the server on a call it routes to a composite cluster: the deployment it
#: chose (the first attempt needs no rewrite). Removed before any upstream sees it.
DEPLOYMENT_HEADER = "x-extproc-deployment"
#: Added to the response by the attempt that answered: which deployment served it.
SERVED_BY_HEADER = "x-extproc-served-by"
#: On an attempt's refusal turned retriable (content policy): why.
RETRY_REASON_HEADER = "x-extproc-retry"
#: Set by the server on a call it routes to a dynamic composite cluster: the call's id,
#: which every attempt of the call carries (their record of refusals is keyed by it).
#: Envoy keeps an attempt filter's header edits for the next attempt, so the filter
#: cannot remove it: the upstreams of such calls see it, an opaque random id.
CALL_HEADER = "x-extproc-call"
#: Set by the server on a streamed call it routes to a composite cluster, so Envoy
#: picks the route with the stream timeouts. Removed before any upstream sees it.
STREAM_HEADER = "x-extproc-stream"
#: Answers besides 5xx that move a call on to the next deployment (LiteLLM retries
#: these on the group's other deployments, then its fallbacks): rate limited, and a
#: deployment that is misconfigured (a bad key, no access, a wrong model name).
RETRIABLE_STATUSES = (429, 401, 403, 404)
#: The error classes that go to fallbacks of their own (the group's lists of them).
REFUSAL_CLASSES = ("content_policy", "context_window")
#: The cluster of a dynamic route's retries: Envoy's internal listener ``HOP_LISTENER``,
#: whose route sends the attempt to the cluster its attempt filter named here.
HOP_CLUSTER = "extproc.hop"
HOP_LISTENER = "extproc_hop"
ATTEMPT_CLUSTER_HEADER = "x-extproc-attempt-cluster"
#: Beside it: the attempt it was set for (Envoy keeps both for the next attempt, so
#: a retry that fails before its filter runs is not taken for the previous one).
ATTEMPT_NUMBER_HEADER = "x-extproc-attempt-number"
#: The hop cluster's endpoint metadata (deployment ids never start with ``@``).
HOP_DEPLOYMENT = "@hop"
#: Envoy's count of the attempt (on dynamic routes' retries); removed before upstreams.
ATTEMPT_COUNT_HEADER = "x-envoy-attempt-count"
#: Envoy never retries an answer carrying this header (unless ``retry_on`` names
#: envoy-ratelimited); the failover routes remove it before the client sees it.
STOP_HEADER = "x-envoy-ratelimited"
#: On the answer of a dynamic route's attempt: the Envoy retries before it and the
#: fallback groups it passed ("<retries>,<fallbacks>").
SERVED_PATH_HEADER = "x-extproc-served-path"
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
    #: Groups a content-policy refusal goes to (instead of the attempts above).
    content_policy_fallbacks: Sequence[str] = ()
    #: Groups a provider's context-length error goes to.
    context_window_fallbacks: Sequence[str] = ()
    #: Per deployment, in the order of ``deployments``; none: no timeouts.
    timeouts: Sequence[AttemptTimeouts] = ()


Attempt = tuple[str, str]


@dataclass(frozen=True, slots=True)
class FailoverRoute:
    """One composite cluster: the attempts, in order, as (deployment id, cluster)."""

    composite: str
    #: The default order (every failure moves to the next).
    attempts: tuple[Attempt, ...]
    #: The first attempt's deployment's timeouts; Envoy applies them to every attempt.
    timeouts: AttemptTimeouts = AttemptTimeouts()
    #: Per error class of :data:`REFUSAL_CLASSES` that has fallbacks: their deployments.
    by_class: tuple[tuple[str, tuple[Attempt, ...]], ...] = ()

    @property
    def dynamic(self) -> bool:
        """Whether an attempt's error class picks what comes next (the hop cluster)."""
        return bool(self.by_class)

    def targets(self, cls: str) -> tuple[Attempt, ...]:
        return next((t for c, t in self.by_class if c == cls), ())

    @property
    def slots(self) -> int:
        """Attempts Envoy may make: the default order, or for a dynamic route its
        longest path (default attempts, then each class's list: a refusal of one
        class may follow another's), at most 1 + 5."""
        return min(1 + MAX_RETRIES, len(self.attempts) + sum(len(t) for _, t in self.by_class))

    @property
    def retries(self) -> int:
        return self.slots - 1

    def deployments(self) -> list[Attempt]:
        """Every deployment an attempt may go to, each once."""
        out: list[Attempt] = []
        for candidate in (*self.attempts, *(d for _, t in self.by_class for d in t)):
            if candidate not in out:
                out.append(candidate)
        return out


def sub_clusters(route: FailoverRoute) -> list[str]:
    """The composite cluster's sub-clusters, in attempt order: the plan's
    per-deployment clusters, or for a dynamic route the first deployment's and then
    the hop listener's for every retry."""
    names = [deployment_cluster_name(d) for d, _ in route.attempts]
    return [names[0]] + [HOP_CLUSTER] * route.retries if route.dynamic else names


def next_attempt(route: FailoverRoute, events: Mapping[int, str], attempt: int) -> Attempt | None:
    """The deployment of ``attempt`` (1-based) of a call on ``route`` whose earlier
    attempts all failed; ``events``: attempt number → error class, for the refusals
    among them (every other earlier attempt failed some other way).

    Rule: attempt 1 is the route's first deployment. After a refusal of class C the
    call goes on with C's list; after any other failure it goes on with the list it
    was on (the default order first). A deployment is never tried twice in a call,
    and there are at most :attr:`FailoverRoute.slots` attempts; None when nothing is
    left."""
    if not 1 <= attempt <= route.slots:
        return None
    path = served_path(route, events, attempt)
    return path[-1] if len(path) == attempt else None


def served_path(route: FailoverRoute, events: Mapping[int, str], attempt: int) -> list[Attempt]:
    """The deployments of attempts 1..``attempt`` (:func:`next_attempt`'s rule); shorter
    when the call runs out of deployments before ``attempt``."""
    tried: list[Attempt] = [route.attempts[0]]
    order: Sequence[Attempt] = route.attempts
    for number in range(2, min(attempt, route.slots) + 1):
        cls = events.get(number - 1)
        if cls is not None:
            order = route.targets(cls)
        ids = {d for d, _ in tried}
        following = next((c for c in order if c[0] not in ids), None)
        if following is None:
            break
        tried.append(following)
    return tried


def failover_plan(
    groups: Iterable[FailoverGroup], default_fallbacks: Sequence[str] = ()
) -> dict[str, FailoverRoute]:
    """Deployment id → its failover route, for every deployment that has somewhere
    to fail over to."""
    by_name: Mapping[str, FailoverGroup] = {g.name: g for g in groups}

    def deployments_of(names: Iterable[str], without: str) -> tuple[Attempt, ...]:
        out: list[Attempt] = []
        for name in names:
            fallback = by_name.get(name)
            if fallback is not None:
                out += [d for d in fallback.deployments if d not in out and d[0] != without]
        return tuple(out)

    plan: dict[str, FailoverRoute] = {}
    for group in by_name.values():
        fallbacks = group.fallbacks or [f for f in default_fallbacks if f != group.name]
        lists = (
            ("content_policy", group.content_policy_fallbacks),
            ("context_window", group.context_window_fallbacks),
        )
        timeouts = dict(zip(group.deployments, group.timeouts, strict=False))
        for dep in group.deployments:
            retries = [d for d in group.deployments if d != dep][: group.num_retries]
            attempts: list[Attempt] = [dep]
            for candidate in (*retries, *deployments_of(fallbacks, dep[0])):
                if all(candidate[0] != taken[0] for taken in attempts):
                    attempts.append(candidate)
            by_class = tuple(
                (cls, targets[:MAX_RETRIES])
                for cls, names in lists
                if (targets := deployments_of(names, dep[0]))
            )
            if len(attempts) > 1 or by_class:
                plan[dep[0]] = FailoverRoute(
                    composite_name(dep[0]),
                    tuple(attempts[: 1 + MAX_RETRIES]),
                    timeouts.get(dep, AttemptTimeouts()),
                    by_class,
                )
    return plan


@dataclass(frozen=True, slots=True)
class AttemptAnswer:
    """What the response headers of one failover attempt decide."""

    #: The attempt's status, for its deployment's health (cooldowns).
    health: HealthSample | None
    #: Response headers to set: which deployment served (read back for pricing), and
    #: on a dynamic route the mark that stops Envoy when nothing is left to try.
    set_headers: tuple[tuple[str, str], ...]
    #: A 400 whose body is read: a refusal of a class with fallbacks moves the call on.
    check_refusal: bool


def attempt_answer(
    dep_id: str,
    route: FailoverRoute | None,
    status: str,
    *,
    end_of_stream: bool,
    events: Mapping[int, str] | None = None,
    attempt: int = 1,
    group_of: Callable[[str], str | None] = lambda _: None,
) -> AttemptAnswer:
    """Rule: every attempt's status counts for its own deployment, and its answer
    names that deployment in ``x-extproc-served-by``. On a dynamic route, a 400 with a
    body is read (a refusal may move the call to its class's fallbacks); an answer
    Envoy would retry is marked not to be when the call has no deployment left; any
    other answer says where in the call it came (``x-extproc-served-path``: Envoy's
    retries before it, and the groups other than the first's that the call passed)."""
    numeric = int(status) if status.isascii() and status.isdigit() else None
    headers: list[tuple[str, str]] = [(SERVED_BY_HEADER, dep_id)]
    dynamic = route is not None and route.dynamic
    if route is not None and dynamic and numeric is not None:
        known = events or {}
        if _retried(numeric) and next_attempt(route, known, attempt + 1) is None:
            headers.append((STOP_HEADER, "true"))
        path = served_path(route, known, attempt)
        first = group_of(path[0][0])
        groups = {g for d, _ in path if (g := group_of(d)) is not None and g != first}
        headers.append((SERVED_PATH_HEADER, f"{attempt - 1},{len(groups)}"))
    return AttemptAnswer(
        health=HealthSample(dep_id, numeric) if numeric is not None else None,
        set_headers=tuple(headers),
        check_refusal=status == "400" and not end_of_stream and dynamic,
    )


def _retried(status: int) -> bool:
    return status >= 500 or status in RETRIABLE_STATUSES


def refusal_class(body: bytes) -> str | None:
    """The class of an upstream 400 that has fallbacks of its own: ``content_policy``
    for a content-policy refusal, ``context_window`` for a context-length error."""
    normalized = normalize_error(400, body)
    if normalized is None:
        return None
    if b'"content_policy_violation"' in normalized:
        return "content_policy"
    if b'"context_length_exceeded"' in normalized:
        return "context_window"
    return None


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
