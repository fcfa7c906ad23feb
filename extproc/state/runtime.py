"""The per-process state the gRPC and admin adapters share.

One :class:`Gateway` per process holds the settings, the current policy snapshot (a
single reference, replaced whole on reload), the store and the metrics. Request
handling reads ``gateway.policy`` once per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import secrets
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

from extproc.core.admission import (
    CallIds,
    StoreFacts,
    plan_finish,
    plan_session_count,
    read_admitted,
)
from extproc.core.budgets import BudgetRef
from extproc.core.charges import Charge, limit_micros
from extproc.core.decision import (
    Decision,
    GatewayConfig,
    Prepared,
    RouteDecision,
    decide,
    decide_admission,
    decide_route,
    fallback_scope,
    prepare,
    session_of,
    view_scope,
)
from extproc.core.errors import BudgetExceededError, InternalError, ServiceUnavailableError
from extproc.core.health import HealthSample
from extproc.core.leases import (
    CHARGE_FIELD,
    ITERATIONS_LIMIT_FIELD,
    ITERATIONS_REMAINING_FIELD,
    LEASE_FIELD,
    UNMETERED_FIELD,
    Lease,
)
from extproc.core.metering import ResponseMeter
from extproc.core.request import RequestHead
from extproc.core.selection import EMPTY_VIEW, RoutingView
from extproc.core.sessions import IterationCount, SessionCap, check_iterations
from extproc.core.usage import Usage
from extproc.policy import (
    CompiledDeployment,
    CompiledGroup,
    CompiledPolicy,
    PolicyError,
    load_policy,
)
from extproc.state.alerts import Alerter
from extproc.state.clock import Clock, SystemClock
from extproc.state.coalescer import Coalescer
from extproc.state.liveness import Liveness
from extproc.state.metrics import Metrics
from extproc.state.owed import OwedCancel, OwedCount, OwedSettle, OwedUncount, OwedWrites
from extproc.state.routing import Router
from extproc.state.settings import Settings
from extproc.store import MemoryStore, Store, StoreError, StoreUnavailableError, open_store
from extproc.store.base import Cancel, Count, Release
from extproc.store.keys import marker_key

__all__ = ["Admission", "Gateway", "gateway_config"]

log = logging.getLogger("extproc")

#: Refusals by a budget of the deployment the router chose (see ``route_and_admit``).
_DEPLOYMENT_BUDGETS = frozenset({"deployment_budget_exceeded", "provider_budget_exceeded"})


def _token(lease: Lease | None) -> str | None:
    return None if lease is None else lease.token


#: Sessions whose last store count a process remembers (for counting through an outage).
_STORE_COUNTS_KEPT = 100_000


def gateway_config(settings: Settings) -> GatewayConfig:
    """The slice of ``settings`` the core reads (rule: the core never imports the settings)."""
    return GatewayConfig(
        cluster_header=settings.cluster_header,
        session_headers=settings.session_headers,
        tags_header=settings.tags_header,
        unknown_paths=settings.unknown_paths,
        max_body_bytes=settings.max_body_bytes,
        default_max_tokens=settings.default_max_tokens,
    )


@dataclass(frozen=True, slots=True)
class Admission:
    """What admission hands the adapter: a lease for Envoy, the session's count."""

    lease: Lease | None = None
    iterations: IterationCount | None = None
    charge: Charge | None = None
    #: Routed only (an endpoint that is not metered): no charge, nothing to settle.
    unmetered: bool = False

    def metadata(self, *, with_charge: bool) -> dict[str, str]:
        """The dynamic metadata Envoy gets (strings: Envoy formats them verbatim).

        ``with_charge``: the reservation travels along (ext_authz, whose response is
        metered by another filter, maybe in another process)."""
        out: dict[str, str] = {}
        if self.lease is not None:
            out[LEASE_FIELD] = self.lease.token
        if self.iterations is not None:
            out[ITERATIONS_LIMIT_FIELD] = str(self.iterations.limit)
            out[ITERATIONS_REMAINING_FIELD] = str(self.iterations.remaining)
        if with_charge and self.charge is not None:
            out[CHARGE_FIELD] = self.charge.token()
        if with_charge and self.unmetered:
            out[UNMETERED_FIELD] = "1"
        return out


class Gateway:
    """Process-wide state: settings, policy snapshot, store, metrics."""

    def __init__(
        self,
        settings: Settings,
        policy: CompiledPolicy,
        store: Store,
        metrics: Metrics | None = None,
        *,
        rng: Callable[[], float] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.config = gateway_config(settings)
        self._policy = policy
        self.store = store
        #: Settlements, cancels and lease releases of concurrent calls, sent together.
        self.coalescer = Coalescer(store)
        self.metrics = metrics or Metrics()
        self.rng: Callable[[], float] = rng or random.SystemRandom().random
        #: Rule: the process's one clock; nothing else here reads the time.
        self.clock: Clock = clock or SystemClock()
        self.ready = True
        self._last_store_log = float("-inf")
        self._last_fault_log = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()
        #: In-process counters for session caps while the store is down.
        self._local = MemoryStore(clock=self.clock.monotonic, wall=self.clock.wall)
        #: Session counter key → (the store's last count, monotonic end of its window).
        self._store_counts: dict[str, tuple[int, float]] = {}
        self._store_retry_at = float("-inf")
        #: This process's id on its leases and holds, and the peers seen dead.
        self.liveness = Liveness(
            store,
            self.metrics,
            ttl_s=settings.heartbeat_ttl_s,
            keep_s=max(settings.lease_ttl_s, settings.reservation_ttl_s),
            clock=self.clock.monotonic,
        )
        embedded = isinstance(store, MemoryStore)
        #: How long the store remembers an ended reservation or an added count. The
        #: embedded store answers every call in process (nothing is ever retried), so
        #: a minute keeps its contract without a marker per call for long.
        self._marker_s = 60.0 if embedded else settings.settlement_marker_ttl_s
        #: Settlements, cancels and counts the store did not acknowledge, until it does.
        self.owed = OwedWrites(
            store,
            self.metrics,
            owner=self.liveness.owner,
            directory=None if embedded else settings.owed_directory,
            keep_s=self._marker_s,
            wall=self.clock.wall,
            monotonic=self.clock.monotonic,
        )
        self.alerts = Alerter(
            store, self.metrics, settings.alert_webhook_url, owner=self.liveness.owner
        )
        self.router = Router(
            store,
            self.metrics,
            self.clock,
            on_read_error=lambda exc: self._store_failed(exc, "routing"),
            on_write_error=self._log_store_failure,
            cache_s=settings.routing_cache_s,
        )

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock) -> Gateway:
        """Load the policy and open the store named by ``settings``."""
        policy = load_policy(
            settings.policy_path, allow_inline_credentials=settings.allow_inline_credentials
        )
        journal = Path(settings.spend_journal).expanduser() if settings.spend_journal else None
        return cls(settings, policy, open_store(settings.store_url, journal=journal), clock=clock)

    @property
    def policy(self) -> CompiledPolicy:
        return self._policy

    async def watch_policy(self, interval_s: float) -> None:
        """Reload the policy whenever its file changes (mtime, size or inode)."""
        path = self.settings.policy_path

        def stamp() -> tuple[float, int, int] | None:
            try:
                st = path.stat()
            except OSError:
                return None
            return (st.st_mtime, st.st_size, st.st_ino)

        seen = stamp()
        while True:
            await asyncio.sleep(interval_s)
            current = stamp()
            if current is not None and current != seen:
                seen = current
                self.reload_policy()

    def _prepare(
        self,
        head: RequestHead,
        raw: bytes,
        policy: CompiledPolicy,
        now: datetime,
        *,
        rewrite_body: bool = True,
    ) -> tuple[Prepared, CompiledGroup, list[CompiledDeployment]]:
        # Rule: a call is translated into the other API only where its body can be
        # rewritten (not under ext_authz)
        prepared = prepare(head, raw, policy, self.config, now=now, translate=rewrite_body)
        group, deployments = view_scope(prepared, policy, rewrite_body=rewrite_body)
        if group is not prepared.group:
            log.debug("context window: %s too small, %s serves", prepared.group.name, group.name)
        return prepared, group, deployments

    async def _view(
        self,
        prepared: Prepared,
        group: CompiledGroup,
        deployments: list[CompiledDeployment],
        policy: CompiledPolicy,
        now: datetime,
        *,
        rewrite_body: bool,
    ) -> tuple[RoutingView, list[str]]:
        """The routing view of the call's group and, only when that group cannot take
        the call, of the fallback groups the core may walk to (read concurrently); and
        the names of the groups whose views were read."""
        # a group none of whose deployments fits the call needs no state to refuse it
        read = [group.name] if deployments else []
        view = await self.router.view(group, deployments, policy, now) if read else EMPTY_VIEW
        chain = fallback_scope(prepared, policy, view, now=now, rewrite_body=rewrite_body)
        if not chain:
            return view, read
        more = await asyncio.gather(*(self.router.view(g, d, policy, now) for g, d in chain))
        return view.merged(*more), [*read, *(g.name for g, _ in chain)]

    async def route(
        self,
        head: RequestHead,
        raw: bytes,
        policy: CompiledPolicy,
        *,
        rewrite_body: bool = True,
    ) -> RouteDecision:
        """Check the request, read what the store knows of the deployments that can
        take it (one store round trip), and let the core route it (no admission)."""
        now = self.clock.now()
        prepared, group, deployments = self._prepare(
            head, raw, policy, now, rewrite_body=rewrite_body
        )
        view, _ = await self._view(
            prepared, group, deployments, policy, now, rewrite_body=rewrite_body
        )
        return decide_route(
            prepared,
            policy,
            self.config,
            view,
            self.rng,
            now=now,
            rewrite_body=rewrite_body,
            call=uuid.uuid4().hex,
        )

    async def route_and_admit(
        self,
        head: RequestHead,
        raw: bytes,
        policy: CompiledPolicy,
        *,
        rewrite_body: bool = True,
    ) -> tuple[RouteDecision, Admission]:
        """Check the request, read the routing view and the store facts, take the
        core's one decision and commit its plan in one batch: what the adapters call.

        Rule: routing may have read deployment spend from the process cache; when the
        reservation finds the chosen deployment's (or its provider's) budget spent and
        a view the call read was cached, the views it read (its group's, and the
        fallback groups' it walked) are forgotten and the call routed once more on
        fresh state, so a stale cache never refuses a call another deployment could
        take. Any other refusal forgets nothing.

        Rule: a call to an endpoint that is not metered (Anthropic's token counter) is
        routed only: no budget hold, charge, session count, limit or lease."""
        if head.endpoint is not None and not head.endpoint.metered:
            decision = await self.route(head, raw, policy, rewrite_body=rewrite_body)
            return decision, Admission(unmetered=True)
        now = self.clock.now()
        prepared, group, deployments = self._prepare(
            head, raw, policy, now, rewrite_body=rewrite_body
        )
        view, read = await self._view(
            prepared, group, deployments, policy, now, rewrite_body=rewrite_body
        )
        try:
            return await self._route_and_admit(
                prepared, view, read, group, policy, rewrite_body=rewrite_body
            )
        except BudgetExceededError as err:
            if err.code not in _DEPLOYMENT_BUDGETS:
                raise
            forgot = [self.router.forget(name) for name in read]
            if not any(forgot):
                raise
        now = self.clock.now()
        prepared, group, deployments = self._prepare(
            head, raw, policy, now, rewrite_body=rewrite_body
        )
        view, read = await self._view(
            prepared, group, deployments, policy, now, rewrite_body=rewrite_body
        )
        return await self._route_and_admit(
            prepared, view, read, group, policy, rewrite_body=rewrite_body
        )

    async def _route_and_admit(
        self,
        prepared: Prepared,
        view: RoutingView,
        read: list[str],
        group: CompiledGroup,
        policy: CompiledPolicy,
        *,
        rewrite_body: bool,
    ) -> tuple[RouteDecision, Admission]:
        # Rule: the charge starts once the view is read (time to first token and the
        # latency samples leave out the gateway's own store reads)
        now = self.clock.now()
        # the session caps the call may count against: its group's, and those of the
        # fallback groups whose views were read (the walk may end in one of them)
        caps = [session_of(prepared, group)]
        caps += [session_of(prepared, policy.groups[n]) for n in read if n in policy.groups]

        def decide_call(facts: StoreFacts, ids: CallIds) -> Decision:
            return decide(
                prepared,
                policy,
                self.config,
                view,
                self.rng,
                now=now,
                ids=ids,
                facts=facts,
                rewrite_body=rewrite_body,
            )

        decision, admission = await self._admit(caps, now, decide_call)
        return decision.route, admission

    async def admit(self, decision: RouteDecision, policy: CompiledPolicy) -> Admission:
        """The store-backed checks of a routed request in one batch (one store round
        trip per hash slot, see :mod:`extproc.core.admission`): the budget reservation, the
        session cap, the key's rate limits and parallel-request slot, the deployment's
        load, for a call :meth:`route` routed (the adapters call
        :meth:`route_and_admit`, which takes both in one decision). The adapter hands
        the lease and the charge to Envoy or keeps them for the response."""
        now = self.clock.now()

        def admit_call(facts: StoreFacts, ids: CallIds) -> Decision:
            return decide_admission(decision, policy, now=now, ids=ids, facts=facts)

        return (await self._admit([decision.iterations], now, admit_call))[1]

    async def reserve(self, decision: RouteDecision, policy: CompiledPolicy) -> Charge:
        """The budget reservation alone (in one store round trip); a 429 for the first
        budget already spent."""
        now = self.clock.now()

        def reserve_call(facts: StoreFacts, ids: CallIds) -> Decision:
            return decide_admission(
                decision, policy, now=now, ids=ids, facts=facts, limits=False, count=False
            )

        charge = (await self._admit([], now, reserve_call))[1].charge
        assert charge is not None  # every admission has one
        return charge

    async def _admit(
        self,
        caps: Sequence[SessionCap | None],
        now: datetime,
        decide_call: Callable[[StoreFacts, CallIds], Decision],
    ) -> tuple[Decision, Admission]:
        """Read what the store side knows (``caps``: the session caps the decision may
        count against, whose owed counts land first), take the core's one decision
        with fresh ids, commit its plan and read the store's answer (``now``: the
        decision's)."""
        mono = self.clock.monotonic()
        # while the store is marked down, sessions are counted in process (fail open);
        # rule: whether it is does not depend on the cap, so the cap the decision
        # counts is counted in the store whenever the store is up
        in_store = mono >= self._store_retry_at
        owed: dict[str, int] = {}
        landing: dict[str, StoreError] = {}
        for each in caps:
            counter = None if each is None else each.store_key
            if counter is None or not in_store or counter in owed:
                continue
            if not self.owed.owes(counter):
                continue
            # land what is owed first: an owed count whose lost attempt ran later is
            # already in the store's count
            try:
                await self.owed.land_counts(counter)
            except StoreError as exc:
                landing[counter] = exc
            owed[counter] = self.owed.pending_count(counter)
        settings = self.settings
        facts = StoreFacts(
            owner=self.liveness.owner,
            dead_owners=self.liveness.dead,
            hold_s=settings.reservation_ttl_s,
            lease_ttl_s=settings.lease_ttl_s,
            session_ttl_s=settings.max_iterations_ttl,
            marker_s=self._marker_s,
            sessions_in_store=in_store,
            owed_sessions=owed,
        )
        decision = decide_call(facts, CallIds(uuid.uuid4().hex, secrets.token_hex(8)))
        charge, plan, cap = decision.charge, decision.plan, decision.cap
        if cap is not None and not in_store and settings.fail_mode == "closed":
            self._store_failed(
                StoreUnavailableError("store marked down after a recent failure"),
                "session_count",
            )
        if cap is not None and cap.store_key in landing:
            return decision, await self._admit_unsure(landing[cap.store_key], charge, cap, None)
        iterations: IterationCount | None = None
        if cap is not None and not in_store:
            # Rule: the session is counted first, as in the store's order (a call its
            # cap refuses takes no rpm count or slot)
            iterations = await self._count_locally(cap, marker_key(cap.store_key, charge.rid))
        if plan.empty:
            return decision, Admission(None, iterations, charge)
        try:
            admitted = await self.store.admit(plan.admission)
        except StoreError as exc:
            return decision, await self._admit_unsure(
                exc,
                charge,
                cap,
                plan.lease,
                counted=iterations if not in_store else None,
                sent_count=plan.session is not None,
            )
        if admitted.refused_budget is not None and cap is not None and not in_store:
            # Rule: a budget refuses before anything counts (the store's order): the
            # session counted in process first is taken back, here and in what is owed
            await self._uncount_locally(cap, marker_key(cap.store_key, charge.rid))
        results = admitted.results
        if plan.session is not None and cap is not None and plan.session < len(results):
            value, left, _ = cast(tuple[int, float, bool], results[plan.session])
            self._remember_count(cap.store_key, value, mono + left)
        if plan.slot is not None and plan.slot < len(results):
            # counted before a refusal is raised: the dead peers' slots are gone either way
            reaped = cast(tuple[bool, int, int], results[plan.slot])[2]
            if reaped:
                self.metrics.leases.labels("reaped").inc(reaped)
        if not admitted.handed_back:
            # Rule: never left to the hold's TTL: what other slots took is owed back
            self.owed.add(OwedCancel(charge.rid, charge.keys, lease=_token(plan.lease)))
        caller = decision.route.caller
        key = caller.key if caller is not None else None
        iterations = read_admitted(plan, admitted, cap, key, now)[0] or iterations
        if plan.slot is not None:
            self.metrics.leases.labels("acquired").inc()
        return decision, Admission(plan.lease, iterations, charge)

    async def _admit_unsure(
        self,
        exc: StoreError,
        charge: Charge,
        cap: SessionCap | None,
        lease: Lease | None,
        *,
        counted: IterationCount | None = None,
        sent_count: bool = False,
    ) -> Admission:
        """The batch failed, maybe after it ran. An answered error refuses the call
        (500; the store wrote nothing). Unreachable, or no answer:

        - closed answers 503 and owes the cancel of the hold and the slot (a batch
          that runs late finds the id ended and is refused where it holds budgets),
          and the session count the batch may have made is owed back (``sent_count``:
          taken back if it was made, else its marker keeps a late batch from making
          it), so a call refused with a 503 never counts against its session's cap;
        - open admits the call as it would have been without a store, under a fresh
          id: whatever the batch did under the old one is owed back (a batch that ran
          and refused a step has ended the old id, so settling it would charge
          nothing), the new id is settled in full. The session is counted in process
          and owed to the store under the batch's marker, so a batch that did run
          counts once; the lease goes to Envoy, which gives it back at the end.

        Rule: a least-busy in-flight count the batch may have added is left as it is
        (the store cannot say whether it ran): at worst one call too many in flight
        for that deployment's routing, until its counter's TTL; never a decrement of
        a count the call never added.
        """
        unavailable = isinstance(exc, StoreUnavailableError)
        if unavailable and cap is not None:
            self._store_retry_at = self.clock.monotonic() + self.settings.store_retry_s
        closed = self.settings.fail_mode == "closed"
        if unavailable and (charge.keys or (closed and lease is not None)):
            # open: the call goes on with its lease, which Envoy gives back at the end
            owed_lease = _token(lease) if closed else None
            self.owed.add(OwedCancel(charge.rid, charge.keys, lease=owed_lease))
        if unavailable and closed and sent_count and cap is not None:
            until = self.clock.wall() + self.settings.max_iterations_ttl
            marker = marker_key(cap.store_key, charge.rid)
            self.owed.add(OwedUncount(cap.store_key, 1, marker, until))
        if not unavailable and charge.keys:
            # an answered error wrote nothing in its slot, but on Redis Cluster another
            # slot's hold may not have been handed back: the cancel is idempotent
            self.owed.add(OwedCancel(charge.rid, charge.keys))
        self._store_failed(exc, "admission")  # raises unless unavailable and open
        old = charge.rid
        charge = dataclasses.replace(charge, rid=uuid.uuid4().hex)
        iterations = counted
        if cap is not None and counted is None:
            iterations = await self._count_locally(cap, marker_key(cap.store_key, old))
        return Admission(lease, iterations, charge)

    async def record_health(self, sample: HealthSample | None, policy: CompiledPolicy) -> None:
        """Record the health sample the core decided on (an answer's status, a time to
        first token): health counts, maybe a cooldown."""
        if sample is not None:
            await self.router.record(sample, policy)

    async def _not_in_flight(self, charge: Charge) -> None:
        await self.router.not_in_flight(
            charge.deployment,
            self._policy.groups.get(charge.group),
            self.settings.reservation_ttl_s,
        )

    async def _budget_alerts(
        self,
        watch: tuple[BudgetRef, ...],
        settled: dict[str, int],
        share: Decimal | None,
    ) -> None:
        """Alerts from settled spend: holds of calls in flight are not spend yet (a
        large reservation must not raise an alert, nor inflate the spend it reports)."""
        for ref in watch:
            spent = settled.get(ref.store_key)
            if spent is None:
                continue
            soft = limit_micros(ref.soft)
            if soft is not None and spent >= soft:
                await self.alerts.crossed(ref, spent, "soft_budget")
            threshold = None if ref.limit is None or share is None else ref.limit * share
            alert_at = limit_micros(threshold)
            if alert_at is not None and spent >= alert_at:
                await self.alerts.crossed(ref, spent, "budget_threshold")

    async def settle(
        self,
        charge: Charge,
        usage: Usage | None,
        policy: CompiledPolicy | None = None,
        *,
        reported: bool = True,
    ) -> int:
        """Charge the call's real cost (its estimate when the response had no usage),
        count spend and tokens; returns the micro-dollars charged. ``reported``: the
        usage came from the provider, not from counting the stream."""
        dep = (policy or self._policy).deployment(charge.priced_by)
        metrics = self.metrics
        usage, clamped = charge.bounded(usage)
        if clamped:
            metrics.usage_clamped.labels(charge.endpoint).inc()
        cost = charge.cost(usage, dep)
        if usage is None or not reported:
            metrics.usage_missing.labels(charge.endpoint).inc()
        if usage is not None:
            for kind, count in (
                ("input", usage.input_tokens),
                ("cached_input", usage.cached_input_tokens),
                ("cache_creation", usage.cache_creation_tokens),
                ("output", usage.output_tokens),
                ("reasoning", usage.reasoning_tokens),
            ):
                if count:
                    metrics.tokens.labels(charge.group, charge.priced_by, kind).inc(count)
        metrics.spend.labels(charge.group, charge.priced_by).inc(float(cost) / 1_000_000)
        per_token = None
        if usage is not None and not charge.stream:
            per_token = max(0.0, self.clock.wall() - charge.started) / max(1, usage.output_tokens)
        snapshot = policy or self._policy
        group = snapshot.groups.get(charge.group)
        tokens = usage.total_input + usage.output_tokens if usage is not None else None
        # Rule: the latency sample is the serving deployment's (a failover call's may
        # be another group's deployment), judged by that deployment's group's strategy
        served_group = snapshot.groups.get(dep.group) if dep is not None else group
        if per_token is not None and served_group is not None:
            await self.router.latency(charge.priced_by, served_group, per_token)
        finish = plan_finish(
            charge,
            cost,
            group,
            tokens=tokens,
            hold_s=self.settings.reservation_ttl_s,
            marker_s=self._marker_s,
            minute=int(self.clock.wall() // 60),
            served=dep,
            served_group=snapshot.groups.get(dep.group) if dep is not None else None,
        )
        outcome = "settled"
        if finish.keys or finish.steps:
            try:
                settled = await self.coalescer.finish(finish)
            except StoreError as exc:
                # Rule: a settlement is never dropped: kept (and journaled) until the
                # store acknowledges it; settling is idempotent by the reservation id,
                # and so is the tpm count (its marker). The deployment's load counts
                # are only for routing: lost with the answer (logged).
                self._log_store_failure(exc)
                if charge.keys:
                    outcome = "failed"
                    self.owed.add(OwedSettle(charge.rid, charge.keys, cost, charge.ttls))
                for step in finish.steps:
                    if isinstance(step, Count) and step.key == charge.tpm_key and step.marker:
                        until = self.clock.wall() + step.ttl_s
                        self.owed.add(OwedCount(step.key, step.amount, step.marker, until))
            else:
                if charge.watch:
                    share = (policy or self._policy).general.budget_alert_at
                    by_key = dict(zip(charge.keys, settled, strict=True))
                    self._spawn(self._budget_alerts(charge.watch, by_key, share))
        metrics.settlements.labels(outcome).inc()
        return cost

    async def cancel(self, charge: Charge, *, in_flight: bool = True) -> None:
        """Give a failed, reset or abandoned call's reservation back (and its in-flight
        count, when it was counted)."""
        if in_flight:
            await self._not_in_flight(charge)
        if not charge.keys:
            return
        try:
            await self.coalescer.cancel(Cancel(charge.rid, charge.keys, self._marker_s))
        except StoreError as exc:
            # Rule: never left to the hold's TTL: kept until the store acknowledges it.
            self.metrics.settlements.labels("failed").inc()
            self._log_store_failure(exc)
            self.owed.add(OwedCancel(charge.rid, charge.keys))
            return
        self.metrics.settlements.labels("cancelled").inc()

    async def settle_metered(
        self, charge: Charge, meter: ResponseMeter, policy: CompiledPolicy | None = None
    ) -> None:
        """:meth:`settle` with what the response meter read (see its billing rule).

        Rule: the settlement runs in a task of its own and is only waited for, so a
        stream that Envoy resets meanwhile (the caller has let go of the charge) cannot
        cancel it: the charge is never lost, and never settled twice."""
        await asyncio.shield(self._spawn(self._settle_metered(charge, meter, policy)))

    def settle_soon(self, charge: Charge, meter: ResponseMeter) -> None:
        """:meth:`settle_metered` from code that cannot await (a stream the client
        left, maybe after its last byte)."""
        self._spawn(self._settle_metered(charge, meter, None))

    async def _settle_metered(
        self, charge: Charge, meter: ResponseMeter, policy: CompiledPolicy | None
    ) -> None:
        await self.settle(
            charge, meter.billable(charge), policy, reported=meter.usage() is not None
        )

    def cancel_soon(self, charge: Charge, *, in_flight: bool = True) -> None:
        """:meth:`cancel` from code that cannot await (a closing stream)."""
        self._spawn(self.cancel(charge, in_flight=in_flight))

    def memory_entries(self) -> dict[str, int]:
        """Entries held by this process's in-memory stores: the embedded store (when it
        is the store) and the session-cap counts kept while the store is down."""
        out = {"session_fallback": self._local.entry_count()}
        if isinstance(self.store, MemoryStore):
            out["embedded"] = self.store.entry_count()
        return out

    async def close(self) -> None:
        """Stop retrying owed writes (the journal keeps what is left), close the store
        and the in-process fallback counts (stops their sweepers)."""
        await self.coalescer.drain()
        await self.owed.close()
        await self.store.close()
        await self._local.close()

    async def drain(self) -> None:
        """Wait for background store work (cancels, releases, webhooks) to finish."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.coalescer.drain()
        await self.alerts.drain()
        await self.router.flush_successes()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run store work in a task of its own (from code that cannot await)."""
        self._spawn(work)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def count_iteration(
        self, cap: SessionCap | None, op: str | None = None
    ) -> IterationCount | None:
        """Count this call (``op``: its id) of a capped session (one store round trip)
        and compare.

        When the store fails, the fail mode decides: ``closed`` answers 503, ``open``
        counts in this process (LiteLLM's fallback), owes the count to the store, and
        tries the store again after ``store_retry_s``, so counting goes back to it once
        it is up.
        """
        if cap is None:
            return None
        op = op or uuid.uuid4().hex
        marker = marker_key(cap.store_key, op)
        now = self.clock.monotonic()
        if now >= self._store_retry_at:
            try:
                if self.owed.owes(cap.store_key):
                    await self.owed.land_counts(cap.store_key)
                owed = self.owed.pending_count(cap.store_key)
                plan = plan_session_count(
                    cap,
                    op,
                    owner=self.liveness.owner,
                    ttl_s=self.settings.max_iterations_ttl,
                    marker_s=self._marker_s,
                    owed=owed,
                )
                admitted = await self.store.admit(plan.admission)
            except StoreError as exc:
                if isinstance(exc, StoreUnavailableError):
                    self._store_retry_at = now + self.settings.store_retry_s
                self._store_failed(exc, "session_count")  # an answered error refuses
            else:
                value, left, _ = cast(tuple[int, float, bool], admitted.results[0])
                self._remember_count(cap.store_key, value, now + left)
                counted, _ = read_admitted(plan, admitted, cap, None, self.clock.now())
                return counted
        elif self.settings.fail_mode == "closed":
            self._store_failed(
                StoreUnavailableError("store marked down after a recent failure"),
                "session_count",
            )
        return await self._count_locally(cap, marker)

    async def _uncount_locally(self, cap: SessionCap, marker: str) -> None:
        """Take back a count :meth:`_count_locally` made under ``marker``: in process,
        and in the store (owed: it lands after the count, or blocks it)."""
        await self._local.incr_window(cap.store_key, -1, self.settings.max_iterations_ttl)
        until = self.clock.wall() + self.settings.max_iterations_ttl
        self.owed.add(OwedUncount(cap.store_key, 1, marker, until))

    async def _count_locally(self, cap: SessionCap, marker: str) -> IterationCount:
        """Count in process (the store is down, fail mode open) and owe the count to
        the store under ``marker``, the one the store attempt used."""
        ttl = self.settings.max_iterations_ttl
        now = self.clock.monotonic()
        self.metrics.iterations_fallback.inc()
        seen = self._store_counts.pop(cap.store_key, None)
        if (
            seen is not None
            and seen[1] > now
            and (await self._local.get_many([cap.store_key]))[0] is None
        ):
            # Rule: counting in process goes on from the store's last count, so a
            # session cannot pass its cap by the calls made before the outage.
            await self._local.incr_window(cap.store_key, seen[0], seen[1] - now)
        count, left = await self._local.incr_window(cap.store_key, 1, ttl)
        # owed to the store while this count's window lasts (the local counter's)
        self.owed.add(OwedCount(cap.store_key, 1, marker, self.clock.wall() + left))
        return check_iterations(cap, count, left)

    def _remember_count(self, key: str, count: int, until: float) -> None:
        """The store's latest count of a session (until its window ends), for counting
        in process from there when the store fails; the oldest are forgotten first."""
        self._store_counts.pop(key, None)
        self._store_counts[key] = (count, until)
        if len(self._store_counts) > _STORE_COUNTS_KEPT:
            del self._store_counts[next(iter(self._store_counts))]

    def release_soon(self, lease: Lease) -> None:
        """Release from code that cannot await (a closing stream): in a task of its own,
        so the release survives the cancellation that is closing the stream."""
        self._spawn(self._release_quietly(lease))

    async def _release_quietly(self, lease: Lease) -> None:
        await self.release(lease)

    async def release(self, lease: Lease) -> bool:
        """Give a lease back (whether the store took it); a store failure only delays
        it until the lease TTL."""
        try:
            await self.coalescer.release(Release(lease.store_key, lease.member))
        except StoreError as exc:
            self.metrics.leases.labels("release_failed").inc()
            self._log_store_failure(exc)
            return False
        self.metrics.leases.labels("released").inc()
        return True

    def _store_failed(self, exc: StoreError, operation: str) -> None:
        """A store failure on the request path. Unavailable: apply the fail mode (count,
        rate-limited log, a 503 if closed). Any other failure — the store answered with
        an error — refuses the call with a 500, whatever the fail mode: a request must
        never be able to make itself admitted for free."""
        if not isinstance(exc, StoreUnavailableError):
            self.metrics.store_faults.labels(operation).inc()
            now = self.clock.monotonic()
            if now - self._last_fault_log >= 10.0:
                self._last_fault_log = now
                log.error("store answered %s with an error, call refused: %s", operation, exc)
            raise InternalError(
                "The gateway could not record this request; it was not sent."
            ) from None
        mode = self.settings.fail_mode
        self.metrics.fail_mode_used.labels(mode).inc()
        self._log_store_failure(exc)
        if mode == "closed":
            raise ServiceUnavailableError(
                "The gateway cannot check its limits right now; try again shortly.",
                code="store_unavailable",
            ) from None

    def _log_store_failure(self, exc: StoreError) -> None:
        """At most one log line per 10 s: a dead store must not flood the log."""
        now = self.clock.monotonic()
        if not isinstance(exc, StoreUnavailableError):
            if now - self._last_fault_log >= 10.0:
                self._last_fault_log = now
                log.error("store answered with an error: %s", exc)
            return
        if now - self._last_store_log >= 10.0:
            self._last_store_log = now
            log.warning("store unavailable, fail mode %s: %s", self.settings.fail_mode, exc)

    def reload_policy(self, path: Path | None = None) -> bool:
        """Load the policy again; on error keep the old one and log why."""
        target = path or self.settings.policy_path
        try:
            fresh = load_policy(
                target, allow_inline_credentials=self.settings.allow_inline_credentials
            )
        except PolicyError as exc:
            self.metrics.policy_reloads.labels("error").inc()
            log.error("policy reload rejected, keeping the old policy: %s", exc)  # noqa: TRY400
            return False
        self._policy = fresh
        self.metrics.policy_reloads.labels("ok").inc()
        log.info("policy reloaded from %s (%d model groups)", target, len(fresh.groups))
        return True
