"""A routed call's admission as data: the store effects it needs, in one batch, and
what the store's answer means. Pure: no store, no clock, no randomness (the ids, the
lease member and the minute come in from the caller).

The order is LiteLLM's, and the store applies it as if one step after another:
every budget is checked and held first (a spent budget refuses before anything is
counted), then the session count, the key's tpm (read), its rpm (counted, then
compared), its parallel-request slot, and the deployment's load for the routing
strategy (least-busy's calls in flight; the minute's calls of a deployment with an
rpm, or of any under usage-based routing). Refused at a step, the store gives
the hold and the slot back; counts made before it stay (a refused call counts, as in LiteLLM).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

from extproc.core.access import VirtualKey
from extproc.core.budgets import BudgetRef, check_budgets
from extproc.core.charges import Charge, limit_micros
from extproc.core.errors import InternalError
from extproc.core.health import inflight_key, minute_key
from extproc.core.leases import Lease, check_parallel
from extproc.core.limits import WINDOW_S, check_rpm, check_tpm, rpm_key, tpm_key
from extproc.core.sessions import IterationCount, SessionCap, check_iterations
from extproc.policy import CompiledDeployment, CompiledGroup
from extproc.store.base import (
    Admission,
    Admitted,
    Budget,
    Ceiling,
    Count,
    Finish,
    Gauge,
    Release,
    Step,
    Take,
)
from extproc.store.keys import marker_key

__all__ = [
    "MINUTE_TTL_S",
    "CallIds",
    "Plan",
    "StoreFacts",
    "counts_minute",
    "plan_admission",
    "plan_finish",
    "plan_session_count",
    "read_admitted",
]

#: A deployment's minute counters live a little longer than their minute.
MINUTE_TTL_S = 120.0


@dataclass(frozen=True, slots=True)
class CallIds:
    """The ids one call needs, drawn by the caller (rule: the core draws none)."""

    #: The reservation id of the call's charge (32 hex digits).
    rid: str
    #: The random part of its parallel-request lease (16 hex digits).
    nonce: str


@dataclass(frozen=True, slots=True)
class StoreFacts:
    """What the runtime knows of the store and of this process when a call is
    admitted: read-only, read just before deciding."""

    #: This process's id, on its holds and leases.
    owner: str
    #: The peers seen dead, whose slots the batch takes back.
    dead_owners: tuple[str, ...]
    #: How long a hold (and a least-busy in-flight count) lasts.
    hold_s: float
    lease_ttl_s: float
    session_ttl_s: float
    #: How long the store remembers an ended id or an added count.
    marker_s: float
    #: Capped sessions are counted in the store (False while it is marked down: the
    #: runtime counts them in process, fail mode open).
    sessions_in_store: bool = True
    #: Counts this process still owes the store, by session counter key (of the
    #: session caps the call may count against: its group's, its fallbacks').
    owed_sessions: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Plan:
    """One call's store batch and where each step's answer is."""

    admission: Admission
    refs: tuple[BudgetRef, ...]
    lease: Lease | None
    session: int | None = None
    tpm: int | None = None
    rpm: int | None = None
    slot: int | None = None
    #: Where the deployment's load is counted (least-busy in flight, the minute's rpm).
    load: int | None = None
    #: Counts of the session this process still owes the store (part of its count).
    owed: int = 0

    @property
    def empty(self) -> bool:
        """Nothing for the store: a call without budgets, caps or limits makes no trip."""
        return not self.admission.budgets and not self.admission.steps


def plan_admission(
    charge: Charge,
    refs: tuple[BudgetRef, ...],
    *,
    session: SessionCap | None,
    key: VirtualKey | None,
    group: CompiledGroup | None,
    facts: StoreFacts,
    nonce: str,
    minute: int,
    limits: bool = True,
    deployment: CompiledDeployment | None = None,
) -> Plan:
    """The batch that admits the call of ``charge`` (priced against ``refs``).
    ``session``: the cap counted in the store (None: not counted there). ``key``: the
    caller's key, whose rate limits and parallel-request slot (a lease made with
    ``nonce``) are checked. ``group``: the deployment's load counted for its
    strategy. ``limits``: False leaves the rate limits, the slot and the load out (a
    reservation alone). ``minute``: the clock minute of the deployment's counters;
    ``deployment``: the one routed to (its rpm/tpm say whether its minute is counted)."""
    steps: list[Step] = []
    at: dict[str, int] = {}
    owed = facts.owed_sessions.get(session.store_key, 0) if session is not None else 0
    if session is not None:
        at["session"] = len(steps)
        steps.append(_session_step(session, charge.rid, facts.session_ttl_s, facts.marker_s, owed))
    lease = None
    if key is not None and limits:
        if key.tpm_limit is not None:
            at["tpm"] = len(steps)
            steps.append(Ceiling(tpm_key(key), key.tpm_limit))
        if key.rpm_limit is not None:
            at["rpm"] = len(steps)
            steps.append(Count(rpm_key(key), 1, WINDOW_S, limit=key.rpm_limit))
        if key.max_parallel_requests is not None:
            lease = Lease.new(key, facts.owner, nonce)
            at["slot"] = len(steps)
            steps.append(
                Take(lease.store_key, lease.member, key.max_parallel_requests, facts.lease_ttl_s)
            )
    if group is not None and limits:
        if group.strategy == "least-busy":
            at["load"] = len(steps)
            steps.append(Gauge(inflight_key(charge.deployment), 1, facts.hold_s))
        if counts_minute(group, deployment, "rpm"):
            at.setdefault("load", len(steps))
            steps.append(Count(minute_key(charge.deployment, minute, "rpm"), 1, MINUTE_TTL_S))
    admission = Admission(
        rid=charge.rid,
        owner=facts.owner,
        amount=charge.estimate,
        hold_s=facts.hold_s,
        budgets=tuple(
            Budget(ref.store_key, limit_micros(ref.limit), ttl)
            for ref, ttl in zip(refs, charge.ttls, strict=True)
        ),
        steps=tuple(steps),
        dead_owners=facts.dead_owners if lease is not None else (),
        keep_s=facts.marker_s,
    )
    return Plan(
        admission,
        refs,
        lease,
        session=at.get("session"),
        tpm=at.get("tpm"),
        rpm=at.get("rpm"),
        slot=at.get("slot"),
        load=at.get("load"),
        owed=owed,
    )


def counts_minute(group: CompiledGroup, deployment: CompiledDeployment | None, what: str) -> bool:
    """Whether a call of ``deployment`` counts its ``what`` (``rpm``: at admission,
    ``tpm``: its usage at settlement) in the deployment's minute.

    Rule: only what some strategy reads is counted: every deployment under
    usage-based routing, else one with that limit (every strategy skips a deployment
    at its rpm/tpm for the minute, as LiteLLM's cost- and latency-based do)."""
    if group.strategy == "usage-based-routing":
        return True
    if deployment is None:
        return False
    return (deployment.rpm if what == "rpm" else deployment.tpm) is not None


def plan_session_count(
    cap: SessionCap, op: str, *, owner: str, ttl_s: float, marker_s: float, owed: int
) -> Plan:
    """A batch of one step: count a capped session (``op``: the call's id)."""
    step = _session_step(cap, op, ttl_s, marker_s, owed)
    admission = Admission(rid=op, owner=owner, amount=0, hold_s=ttl_s, budgets=(), steps=(step,))
    return Plan(admission, (), None, session=0, owed=owed)


def _session_step(cap: SessionCap, op: str, ttl_s: float, marker_s: float, owed: int) -> Count:
    return Count(
        cap.store_key,
        1,
        ttl_s,
        # Rule: counts this process owes the store are part of the session's count
        limit=max(0, cap.cap - owed),
        # Rule: a count whose answer was lost and its retry (owed) add once
        marker=marker_key(cap.store_key, op),
        keep_s=min(ttl_s, marker_s),
    )


def read_admitted(
    plan: Plan,
    admitted: Admitted,
    cap: SessionCap | None,
    key: VirtualKey | None,
    now: datetime,
) -> tuple[IterationCount | None, int]:
    """What the store's answer means: the refusal it makes (raised: the spent budget's
    429, the session cap's, the key's tpm, rpm or parallel limit), else the session's
    count after this call and how many dead processes' slots were taken back.

    Rule: the store refuses by the same comparisons as the checks here, so a refusal
    none of them explains is the store's fault: a 500, never an admission."""
    if admitted.refused_budget is not None:
        index = admitted.refused_budget
        check_budgets(plan.refs[index : index + 1], admitted.spends[index : index + 1], now)
        raise _unexplained("budget", index)
    results = admitted.results
    iterations = None
    reaped = 0
    for index, result in enumerate(results):
        if index == plan.session and cap is not None:
            value, left, _ = cast(tuple[int, float, bool], result)
            iterations = check_iterations(cap, value + plan.owed, left)
        elif key is not None and index == plan.tpm:
            check_tpm(key, cast(int | None, result))
        elif key is not None and index == plan.rpm:
            count, left, _ = cast(tuple[int, float, bool], result)
            check_rpm(key, count, left)
        elif key is not None and index == plan.slot:
            acquired, live, reaped = cast(tuple[bool, int, int], result)
            check_parallel(key, acquired, live)
    if admitted.refused_step is not None:
        raise _unexplained("step", admitted.refused_step)
    return iterations, reaped


def _unexplained(what: str, index: int) -> InternalError:
    return InternalError(
        f"The gateway could not record this request ({what} {index}); it was not sent."
    )


def plan_finish(
    charge: Charge,
    cost: int,
    group: CompiledGroup | None,
    *,
    tokens: int | None,
    hold_s: float,
    marker_s: float,
    minute: int,
    served: CompiledDeployment | None = None,
    served_group: CompiledGroup | None = None,
) -> Finish:
    """What settling a call writes, in one batch: the real cost in place of its hold,
    the key's tpm (``tokens``: the call's, None without usage), and the deployments'
    load: least-busy in flight down on the one admitted (``group``: its group), the
    minute's tokens on ``served``, the one that served (``charge.priced_by``; of
    ``served_group``), when it has a tpm or its group routes by usage.

    Rule: every count carries a marker of the call's id, so a settlement retried after
    a lost answer changes nothing twice. Rule: a count lands where it was taken: the
    in-flight gauge on the deployment admission counted, the tokens on the deployment
    that spent them (a failover may have moved the call)."""
    steps: list[Count | Gauge | Release] = []

    def once(key: str, ttl_s: float) -> tuple[str, float]:
        return marker_key(key, charge.rid), min(ttl_s, marker_s)

    if charge.tpm_key is not None and tokens is not None:
        marker, keep = once(charge.tpm_key, WINDOW_S)
        steps.append(Count(charge.tpm_key, tokens, WINDOW_S, marker=marker, keep_s=keep))
    if group is not None and group.strategy == "least-busy":
        key = inflight_key(charge.deployment)
        marker, keep = once(key, hold_s)
        steps.append(Gauge(key, -1, hold_s, marker=marker, keep_s=keep))
    if tokens and served_group is not None and counts_minute(served_group, served, "tpm"):
        key = minute_key(charge.priced_by, minute, "tpm")
        marker, keep = once(key, MINUTE_TTL_S)
        steps.append(Count(key, tokens, MINUTE_TTL_S, marker=marker, keep_s=keep))
    return Finish(charge.rid, charge.keys, cost, charge.ttls, marker_s, tuple(steps))
