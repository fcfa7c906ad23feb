"""The per-process state the gRPC and admin adapters share.

One :class:`Gateway` per process holds the settings, the current policy snapshot (a
single reference, replaced whole on reload), the store and the metrics. Request
handling reads ``gateway.policy`` once per request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from extproc.accounting import Charge, deployment_budgets, limit_micros
from extproc.alerts import Alerter
from extproc.budgets import BudgetRef, check_budgets
from extproc.clock import Clock, SystemClock
from extproc.decision import GatewayConfig, RouteDecision, decide, prepare, view_scope
from extproc.errors import InternalError, ServiceUnavailableError
from extproc.health import HealthSample
from extproc.iterations import IterationCount, SessionCap, check_iterations
from extproc.liveness import Liveness
from extproc.metering import ResponseMeter
from extproc.metrics import Metrics
from extproc.owed import OwedCancel, OwedCount, OwedSettle, OwedWrites
from extproc.parallel import (
    CHARGE_FIELD,
    ITERATIONS_LIMIT_FIELD,
    ITERATIONS_REMAINING_FIELD,
    LEASE_FIELD,
    Lease,
    check_parallel,
)
from extproc.policy import CompiledPolicy, PolicyError, load_policy
from extproc.ratelimits import WINDOW_S, check_rpm, check_tpm, rpm_key, tpm_key
from extproc.request import RequestHead
from extproc.routing import Router
from extproc.settings import Settings
from extproc.store import MemoryStore, Store, StoreError, StoreUnavailableError, open_store
from extproc.store.keys import marker_key
from extproc.usage import Usage

__all__ = ["Admission", "Gateway"]

log = logging.getLogger("extproc")

#: Sessions whose last store count a process remembers (for counting through an outage).
_STORE_COUNTS_KEPT = 100_000


@dataclass(frozen=True, slots=True)
class Admission:
    """What admission hands the adapter: a lease for Envoy, the session's count."""

    lease: Lease | None = None
    iterations: IterationCount | None = None
    charge: Charge | None = None

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
        self.config = GatewayConfig.from_settings(settings)
        self._policy = policy
        self.store = store
        self.metrics = metrics or Metrics()
        self.rng: Callable[[], float] = rng or random.SystemRandom().random
        #: Rule: the process's one clock; nothing else here reads the time.
        self.clock: Clock = clock or SystemClock()
        self.ready = True
        self._last_store_log = float("-inf")
        self._last_fault_log = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()
        #: In-process counters for session caps while the store is down.
        self._local = MemoryStore()
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
        )
        self.alerts = Alerter(store, self.metrics, settings.alert_webhook_url)
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

    async def route(
        self,
        head: RequestHead,
        raw: bytes,
        policy: CompiledPolicy,
        *,
        rewrite_body: bool = True,
    ) -> RouteDecision:
        """Check the request, read what the store knows of the deployments that can
        take it (one store round trip), and let the core decide."""
        now = self.clock.now()
        prepared = prepare(head, raw, policy, self.config, now=now)
        group, deployments = view_scope(prepared, policy)
        if group is not prepared.group:
            log.debug("context window: %s too small, %s serves", prepared.group.name, group.name)
        view = await self.router.view(group, deployments, policy, now)
        return decide(
            prepared, policy, self.config, view, self.rng, now=now, rewrite_body=rewrite_body
        )

    async def admit(self, decision: RouteDecision, policy: CompiledPolicy) -> Admission:
        """The store-backed checks of a routed request: the budget reservation, the
        session cap, rate limits, then a parallel-request lease (the adapter hands the
        lease and the charge to Envoy or keeps them for the response)."""
        charge = await self.reserve(decision, policy)
        lease: Lease | None = None
        in_flight = False
        try:
            iterations = await self.count_iteration(decision.iterations, op=charge.rid)
            await self.check_rate_limits(decision)
            lease = await self.take_lease(decision)
            if decision.group is not None:
                ttl = self.settings.reservation_ttl_s
                await self.router.admitted(decision.deployment, decision.group, ttl)
                in_flight = True
        except BaseException:
            # refused or cancelled after the reservation: nothing may stay held (and
            # an in-flight count it never took is not given back)
            self.cancel_soon(charge, in_flight=in_flight)
            if lease is not None:
                self.release_soon(lease)
            raise
        return Admission(lease, iterations, charge)

    async def record_health(self, sample: HealthSample | None, policy: CompiledPolicy) -> None:
        """Record the health sample the core decided on (an answer's status, a time to
        first token): health counts, maybe a cooldown."""
        if sample is not None:
            await self.router.record(sample, policy)

    async def reserve(self, decision: RouteDecision, policy: CompiledPolicy) -> Charge:
        """Reserve the call's estimated cost against every budget it falls under, in one
        store round trip; a 429 for the first budget already spent."""
        now = self.clock.now()
        dep = decision.deployment
        refs = decision.budgets
        if decision.group is not None and not decision.group.zero_cost:
            refs += deployment_budgets(dep, policy, now)
        estimate = decision.hold
        key = decision.caller.key if decision.caller is not None else None
        share = policy.general.budget_alert_at
        charge = Charge.new(
            api=decision.request.endpoint.api,
            endpoint=decision.request.endpoint.name,
            dep=dep,
            stream=decision.request.stream,
            strip_usage=decision.asks_usage,
            estimate=estimate,
            refs=refs,
            now=now,
            tpm_key=tpm_key(key) if key is not None and key.tpm_limit is not None else None,
            prompt_tokens=decision.prompt_tokens,
            max_output_tokens=decision.max_output_tokens,
            usage_cap=decision.usage_cap,
            # the budgets the settlement checks for alerts
            watch=[r for r in refs if r.soft is not None or (share and r.limit is not None)],
            failover=bool(decision.attempts),
        )
        if not refs:
            return charge
        try:
            index, spends = await self.store.reserve(
                charge.rid,
                charge.keys,
                limits=[limit_micros(ref.limit) for ref in refs],
                amount=estimate,
                ttls_s=charge.ttls,
                hold_s=self.settings.reservation_ttl_s,
                owner=self.liveness.owner,
            )
        except StoreError as exc:
            # Rule: a reserve whose answer was lost may still run later. Closed: the call
            # is refused, so its cancel is owed (a reserve that runs after it is refused
            # by the store). Open: admitted unreserved; the call's own settlement (the
            # real cost) or cancel ends the id the same way.
            if isinstance(exc, StoreUnavailableError) and self.settings.fail_mode == "closed":
                self.owed.add(OwedCancel(charge.rid, charge.keys))
            self._store_failed(exc, "reserve")
            return charge
        if index is not None:
            check_budgets(refs[index : index + 1], spends[index : index + 1], now)
        # Rule: no await between a successful reservation and handing the charge back,
        # so a cancelled request cannot strand its hold.
        return charge

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
        await self.router.finished(
            charge.deployment,
            (policy or self._policy).groups.get(charge.group),
            self.settings.reservation_ttl_s,
            tokens=usage.total_input + usage.output_tokens if usage is not None else 0,
            seconds_per_token=per_token,
        )
        outcome = "settled"
        if charge.keys:
            try:
                settled = await self.store.settle(
                    charge.rid, charge.keys, cost, charge.ttls, keep_s=self._marker_s
                )
            except StoreError as exc:
                # Rule: a settlement is never dropped: kept (and journaled) until the
                # store acknowledges it; settling is idempotent by the reservation id.
                outcome = "failed"
                self._log_store_failure(exc)
                self.owed.add(OwedSettle(charge.rid, charge.keys, cost, charge.ttls))
            else:
                if charge.watch:
                    share = (policy or self._policy).general.budget_alert_at
                    by_key = dict(zip(charge.keys, settled, strict=True))
                    self._spawn(self._budget_alerts(charge.watch, by_key, share))
        if charge.tpm_key is not None and usage is not None:
            tokens = usage.total_input + usage.output_tokens
            await self._count_once(charge.tpm_key, tokens, WINDOW_S, charge.rid)
        metrics.settlements.labels(outcome).inc()
        return cost

    async def _count_once(self, key: str, amount: int, ttl_s: float, op: str) -> None:
        """Add to a counter off the request path; owed (exactly once) when it fails."""
        marker = marker_key(key, op)
        try:
            await self.store.incr_once(
                key, amount, ttl_s, marker=marker, keep_s=min(ttl_s, self._marker_s)
            )
        except StoreError as exc:
            self._log_store_failure(exc)
            until = self.clock.wall() + ttl_s
            self.owed.add(OwedCount(key, amount, marker, until))

    async def cancel(self, charge: Charge, *, in_flight: bool = True) -> None:
        """Give a failed, reset or abandoned call's reservation back (and its in-flight
        count, when it was counted)."""
        if in_flight:
            await self.router.finished(
                charge.deployment,
                self._policy.groups.get(charge.group),
                self.settings.reservation_ttl_s,
            )
        if not charge.keys:
            return
        try:
            await self.store.cancel(charge.rid, charge.keys, keep_s=self._marker_s)
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
        await self.owed.close()
        await self.store.close()
        await self._local.close()

    async def drain(self) -> None:
        """Wait for background store work (cancels, releases, webhooks) to finish."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
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
        ttl = self.settings.max_iterations_ttl
        # Rule: the store attempt and the count owed after it share one marker, so an
        # attempt whose answer was lost (it may still run) and its retry add once.
        marker = marker_key(cap.store_key, op or uuid.uuid4().hex)
        keep = min(ttl, self._marker_s)
        now = self.clock.monotonic()
        if now >= self._store_retry_at:
            try:
                if self.owed.pending_count(cap.store_key):
                    # land what is owed first: an owed count whose lost attempt ran
                    # later is already in the store's count
                    await self.owed.land_counts(cap.store_key)
                count, left, _ = await self.store.incr_once(
                    cap.store_key, 1, ttl, marker=marker, keep_s=keep
                )
                self._remember_count(cap.store_key, count, now + left)
                # counts this process still owes the session are part of its count
                return check_iterations(cap, count + self.owed.pending_count(cap.store_key), left)
            except StoreError as exc:
                if isinstance(exc, StoreUnavailableError):
                    self._store_retry_at = now + self.settings.store_retry_s
                self._store_failed(exc, "session_count")  # an answered error refuses
        elif self.settings.fail_mode == "closed":
            self._store_failed(
                StoreUnavailableError("store marked down after a recent failure"),
                "session_count",
            )
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

    async def take_lease(self, decision: RouteDecision) -> Lease | None:
        """A slot of the key's ``max_parallel_requests``, or a 429; None when the key
        has no such limit (or the store is down and the fail mode is open)."""
        key = decision.caller.key if decision.caller is not None else None
        if key is None or key.max_parallel_requests is None:
            return None
        lease = Lease.new(key, self.liveness.owner)
        try:
            acquired, in_flight, reaped = await self.store.acquire_lease(
                lease.store_key,
                lease.member,
                key.max_parallel_requests,
                self.settings.lease_ttl_s,
                dead_owners=self.liveness.dead,
            )
        except StoreError as exc:
            self._store_failed(exc, "lease")
            return None
        if reaped:
            self.metrics.leases.labels("reaped").inc(reaped)
        check_parallel(key, acquired, in_flight)
        self.metrics.leases.labels("acquired").inc()
        return lease

    def release_soon(self, lease: Lease) -> None:
        """Release from code that cannot await (a closing stream): in a task of its own,
        so the release survives the cancellation that is closing the stream."""
        self._spawn(self.release(lease))

    async def release(self, lease: Lease) -> None:
        """Give a lease back; a store failure only delays it until the lease TTL."""
        try:
            await self.store.release_lease(lease.store_key, lease.member)
        except StoreError as exc:
            self.metrics.leases.labels("release_failed").inc()
            self._log_store_failure(exc)
            return
        self.metrics.leases.labels("released").inc()

    async def check_rate_limits(self, decision: RouteDecision) -> None:
        """Per-key tpm (read) and rpm (count, then compare); store failures go to the
        fail mode like budgets."""
        key = decision.caller.key if decision.caller is not None else None
        if key is None or (key.rpm_limit is None and key.tpm_limit is None):
            return
        try:
            if key.tpm_limit is not None:
                (tokens,) = await self.store.get_many([tpm_key(key)])
                check_tpm(key, tokens)
            if key.rpm_limit is not None:
                count, left = await self.store.incr_window(rpm_key(key), 1, WINDOW_S)
                check_rpm(key, count, left)
        except StoreError as exc:
            self._store_failed(exc, "rate_limit")

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
