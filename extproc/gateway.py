"""The per-process state the gRPC and admin adapters share.

One :class:`Gateway` per process holds the settings, the current policy snapshot (a
single reference, replaced whole on reload), the store and the metrics. Request
handling reads ``gateway.policy`` once per request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from extproc.budgets import BudgetRef, alert_key, check_budgets
from extproc.decision import GatewayConfig, RouteDecision
from extproc.errors import ServiceUnavailableError
from extproc.iterations import IterationCount, SessionCap, check_iterations
from extproc.metrics import Metrics
from extproc.parallel import (
    ITERATIONS_LIMIT_FIELD,
    ITERATIONS_REMAINING_FIELD,
    LEASE_FIELD,
    Lease,
    check_parallel,
)
from extproc.policy import CompiledPolicy, PolicyError, load_policy
from extproc.ratelimits import WINDOW_S, check_rpm, check_tpm, rpm_key, tpm_key
from extproc.settings import Settings
from extproc.store import MemoryStore, Store, StoreError, open_store

__all__ = ["Admission", "Gateway"]

log = logging.getLogger("extproc")

#: A soft budget without a window of its own alerts at most once a day.
SOFT_ALERT_WINDOW_S = 86_400.0


@dataclass(frozen=True, slots=True)
class Admission:
    """What admission hands the adapter: a lease for Envoy, the session's count."""

    lease: Lease | None = None
    iterations: IterationCount | None = None

    def metadata(self) -> dict[str, str]:
        """The dynamic metadata Envoy gets (strings: Envoy formats them verbatim)."""
        out: dict[str, str] = {}
        if self.lease is not None:
            out[LEASE_FIELD] = self.lease.token
        if self.iterations is not None:
            out[ITERATIONS_LIMIT_FIELD] = str(self.iterations.limit)
            out[ITERATIONS_REMAINING_FIELD] = str(self.iterations.remaining)
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
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.config = GatewayConfig.from_settings(settings)
        self._policy = policy
        self.store = store
        self.metrics = metrics or Metrics()
        self.rng: Callable[[], float] = rng or random.SystemRandom().random
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.ready = True
        self._last_store_log = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()
        #: In-process counters for session caps while the store is down.
        self._local = MemoryStore()
        self._store_retry_at = float("-inf")

    @classmethod
    def from_settings(cls, settings: Settings) -> Gateway:
        """Load the policy and open the store named by ``settings``."""
        policy = load_policy(
            settings.policy_path, allow_inline_credentials=settings.allow_inline_credentials
        )
        return cls(settings, policy, open_store(settings.store_url))

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

    async def admit(self, decision: RouteDecision) -> Admission:
        """The store-backed checks of a routed request: budgets, the session cap, rate
        limits, then a parallel-request lease (the adapter hands it to Envoy)."""
        await self.check_budgets(decision)
        iterations = await self.count_iteration(decision.iterations)
        await self.check_rate_limits(decision)
        return Admission(await self.take_lease(decision), iterations)

    async def count_iteration(self, cap: SessionCap | None) -> IterationCount | None:
        """Count this call of a capped session (one store round trip) and compare.

        When the store fails, the fail mode decides: ``closed`` answers 503, ``open``
        counts in this process (LiteLLM's fallback) and tries the store again after
        ``store_retry_s``, so counting goes back to it once it is up.
        """
        if cap is None:
            return None
        ttl = self.settings.max_iterations_ttl
        now = time.monotonic()
        if now >= self._store_retry_at:
            try:
                count, left = await self.store.incr_window(cap.store_key, 1, ttl)
                return check_iterations(cap, count, left)
            except StoreError as exc:
                self._store_retry_at = now + self.settings.store_retry_s
                self._store_failed(exc)
        elif self.settings.fail_mode == "closed":
            self._store_failed(StoreError("store marked down after a recent failure"))
        self.metrics.iterations_fallback.inc()
        count, left = await self._local.incr_window(cap.store_key, 1, ttl)
        return check_iterations(cap, count, left)

    async def take_lease(self, decision: RouteDecision) -> Lease | None:
        """A slot of the key's ``max_parallel_requests``, or a 429; None when the key
        has no such limit (or the store is down and the fail mode is open)."""
        key = decision.caller.key if decision.caller is not None else None
        if key is None or key.max_parallel_requests is None:
            return None
        lease = Lease.new(key)
        try:
            acquired, in_flight = await self.store.acquire_lease(
                lease.store_key, lease.member, key.max_parallel_requests, self.settings.lease_ttl_s
            )
        except StoreError as exc:
            self._store_failed(exc)
            return None
        check_parallel(key, acquired, in_flight)
        self.metrics.leases.labels("acquired").inc()
        return lease

    def release_soon(self, lease: Lease) -> None:
        """Release from code that cannot await (a closing stream): in a task of its own,
        so the release survives the cancellation that is closing the stream."""
        task = asyncio.get_running_loop().create_task(self.release(lease))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            self._store_failed(exc)

    def _store_failed(self, exc: StoreError) -> None:
        """Apply the fail mode: count and (rate-limited) log; raise a 503 if closed."""
        mode = self.settings.fail_mode
        self.metrics.fail_mode_used.labels(mode).inc()
        self._log_store_failure(exc)
        if mode == "closed":
            raise ServiceUnavailableError(
                "The gateway cannot check its limits right now; try again shortly.",
                code="store_unavailable",
            ) from None

    async def check_budgets(self, decision: RouteDecision) -> None:
        """Read the spend of every budget the request falls under (one store round trip)
        and refuse it if one is reached; a store failure goes to the fail mode."""
        if not decision.budgets:
            return
        try:
            spends = await self.store.get_many([b.store_key for b in decision.budgets])
        except StoreError as exc:
            self._store_failed(exc)
            return
        for ref in check_budgets(decision.budgets, spends, self.clock()):
            await self._soft_budget_alert(ref)

    async def _soft_budget_alert(self, ref: BudgetRef) -> None:
        """Log and count a crossed soft budget once per window, across processes."""
        try:
            # Rule: once per window: a calendar window's alert key names the window,
            # and lives as long as it.
            ttl = ref.window_s or SOFT_ALERT_WINDOW_S
            first = await self.store.incr(alert_key(ref), 1, ttl) == 1
        except StoreError:
            return  # an alert is never worth failing a request
        if first:
            self.metrics.soft_budget_alerts.labels(ref.kind).inc()
            log.warning("soft budget crossed for %s (soft budget $%s)", ref.label, ref.soft)

    def _log_store_failure(self, exc: StoreError) -> None:
        """At most one log line per 10 s: a dead store must not flood the log."""
        now = time.monotonic()
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
