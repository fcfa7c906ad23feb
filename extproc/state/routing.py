"""Store-backed routing: the adapter around the pure :func:`extproc.core.selection.select`.

It reads, in one store round trip per routed call, the :class:`~extproc.core.selection.RoutingView`
of the group :func:`~extproc.core.selection.fitting_group` names (every deployment's cooldown,
the budgets of the budget filter, the load the strategy needs, the minute's calls and
tokens of deployments with an rpm or tpm), maybe from a short
process cache; and it records what each answer teaches about health (cooldowns,
in-flight counts, latency samples, success counts in batches).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from extproc.core.admission import counts_minute
from extproc.core.charges import deployment_budgets
from extproc.core.health import (
    SAMPLES,
    DeploymentState,
    HealthSample,
    cooldown_key,
    cooldown_reason,
    counts_as_failure,
    fails_key,
    failure_rule,
    inflight_key,
    latency_key,
    minute_key,
    ttft_key,
)
from extproc.core.selection import EMPTY_VIEW, RoutingView
from extproc.policy import CompiledDeployment, CompiledGroup, CompiledPolicy
from extproc.state.clock import Clock
from extproc.state.metrics import Metrics
from extproc.store import Store, StoreError

__all__ = ["Router"]

log = logging.getLogger("extproc.routing")

#: Minute counters live a little longer than their minute.
_MINUTE_TTL_S = 120.0
_SAMPLE_TTL_S = 3600.0


class Router:
    """The store side of routing: views in, health out."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        clock: Clock,
        *,
        on_read_error: Callable[[StoreError], None],
        on_write_error: Callable[[StoreError], None],
        cache_s: float = 0.0,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        #: Reads follow the fail mode (may raise a 503); writes are only logged.
        self._on_read_error = on_read_error
        self._on_store_error = on_write_error
        self._cache_s = cache_s
        #: group name → (monotonic expiry, deployment ids, view): reads only (budgets
        #: are still enforced by the atomic reservation), dropped on a local failure.
        self._views: dict[str, tuple[float, tuple[str, ...], RoutingView]] = {}
        #: (deployment, minute) → successes not yet added to the store.
        self._successes: dict[tuple[str, int], int] = {}
        self._flush: asyncio.TimerHandle | None = None
        #: Held while pending successes are written, so a failure counts them too.
        self._flushing = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def _minute(self) -> int:
        return int(self._clock.wall() // 60)

    async def view(
        self,
        group: CompiledGroup,
        deps: Sequence[CompiledDeployment],
        policy: CompiledPolicy,
        now: datetime,
    ) -> RoutingView:
        """What :func:`~extproc.core.selection.select` needs to know of ``deps`` (of ``group``).

        Rule: a store that cannot be read goes to the fail mode (a 503 when closed);
        open, the call is routed on an empty view (by the strategy alone)."""
        try:
            return await self._cached_read(group, deps, policy, now)
        except StoreError as exc:
            self._on_read_error(exc)
            return EMPTY_VIEW

    async def _read(
        self,
        group: CompiledGroup,
        deps: Sequence[CompiledDeployment],
        policy: CompiledPolicy,
        now: datetime,
    ) -> RoutingView:
        budgets = (
            {d.id: deployment_budgets(d, policy, now) for d in deps}
            if policy.has_deployment_budgets(group)
            else {}
        )
        budget_keys = sorted({r.store_key for refs in budgets.values() for r in refs})
        minute = self._minute()
        keys = [cooldown_key(d.id) for d in deps]
        if group.strategy == "least-busy":
            keys += [inflight_key(d.id) for d in deps]
        if group.minute_limited:
            keys += [
                minute_key(d.id, minute, w)
                for d in deps
                for w in ("rpm", "tpm")
                if counts_minute(group, d, w)
            ]
        keys += budget_keys
        lists = []
        if group.strategy == "latency-based-routing":
            lists = [k for d in deps for k in (latency_key(d.id), ttft_key(d.id))]
        values, samples = await self._store.snapshot(keys, lists)
        found = dict(zip(keys, values, strict=True))
        sampled = dict(zip(lists, samples, strict=True))
        states = {}
        for dep in deps:
            cooling = found[cooldown_key(dep.id)]
            states[dep.id] = DeploymentState(
                cooling_s=(cooling[1] or 0.001) if cooling[0] else None,
                inflight=(found.get(inflight_key(dep.id)) or (0, None))[0] or 0,
                rpm=(found.get(minute_key(dep.id, minute, "rpm")) or (0, None))[0] or 0,
                tpm=(found.get(minute_key(dep.id, minute, "tpm")) or (0, None))[0] or 0,
                latency=sampled.get(latency_key(dep.id), ()),
                ttft=sampled.get(ttft_key(dep.id), ()),
            )
        spends = {k: found[k][0] for k in budget_keys}
        return RoutingView.of(states, spends, budgets)

    async def _cached_read(
        self,
        group: CompiledGroup,
        deps: Sequence[CompiledDeployment],
        policy: CompiledPolicy,
        now: datetime,
    ) -> RoutingView:
        """:meth:`_read`, kept for ``cache_s`` for strategies that do not live on
        per-call load (least-busy, usage-based, and any group with a deployment's rpm
        or tpm to keep: always read).

        Rule: the budget filter may read spend from the cache; the reservation checks
        every budget atomically all the same, and a deployment budget it finds spent
        makes the gateway forget the view and route again once (see
        :meth:`extproc.state.runtime.Gateway.route_and_admit`)."""
        if self._cache_s <= 0 or group.strategy == "least-busy" or group.minute_limited:
            return await self._read(group, deps, policy, now)
        ids = tuple(d.id for d in deps)
        cached = self._views.get(group.name)
        clock = self._clock.monotonic()
        if cached is not None and cached[0] > clock and cached[1] == ids:
            return cached[2]
        view = await self._read(group, deps, policy, now)
        self._views[group.name] = (clock + self._cache_s, ids, view)
        return view

    def forget(self, group: str) -> bool:
        """Drop the cached view of ``group``; whether there was one."""
        return self._views.pop(group, None) is not None

    # --- what answers teach -----------------------------------------------------

    async def not_in_flight(self, dep_id: str, group: CompiledGroup | None, ttl_s: float) -> None:
        """A call admitted to ``dep_id`` ended without a settlement (cancelled): its
        in-flight count down (least-busy; a settlement does it in its own batch)."""
        if group is None or group.strategy != "least-busy":
            return
        try:
            await self._store.incr_many([(inflight_key(dep_id), -1)], ttl_s, refresh_ttl=True)
        except StoreError as exc:
            self._on_store_error(exc)

    async def latency(self, dep_id: str, group: CompiledGroup, seconds_per_token: float) -> None:
        """A finished call's seconds per output token (latency-based routing)."""
        if group.strategy != "latency-based-routing":
            return
        try:
            await self._store.push_sample(
                latency_key(dep_id), seconds_per_token, SAMPLES, _SAMPLE_TTL_S
            )
        except StoreError as exc:
            self._on_store_error(exc)

    async def record(self, sample: HealthSample, policy: CompiledPolicy) -> None:
        """Record a health sample the core decided on (a deployment or group the
        policy no longer has is not recorded)."""
        dep = policy.deployment(sample.deployment)
        group = policy.groups.get(dep.group) if dep is not None else None
        if dep is None or group is None:
            return
        if sample.status is not None:
            await self.answered(
                dep,
                group,
                sample.status,
                ttft_s=sample.ttft_s,
                content_policy=sample.content_policy,
            )
        elif sample.ttft_s is not None:
            await self.first_token(dep, group, sample.ttft_s)

    async def answered(
        self,
        dep: CompiledDeployment,
        group: CompiledGroup,
        status: int,
        *,
        ttft_s: float | None = None,
        content_policy: bool = False,
    ) -> None:
        """Record one upstream answer; cool the deployment down if LiteLLM's rules say so.

        Successes are added to the store in batches (at most a second late): only a
        failure needs the minute's counts at once, and it flushes this process's
        pending successes with it.
        """
        minute = self._minute()
        failed = counts_as_failure(status)
        self._metrics.upstream_answers.labels(dep.id, str(status)).inc()
        if ttft_s is not None and group.strategy == "latency-based-routing":
            try:
                await self._store.push_sample(ttft_key(dep.id), ttft_s, SAMPLES, _SAMPLE_TTL_S)
            except StoreError as exc:
                self._on_store_error(exc)
        if not failed:
            self._successes[(dep.id, minute)] = self._successes.get((dep.id, minute), 0) + 1
            if self._flush is None:
                self._flush = asyncio.get_running_loop().call_later(1.0, self._flush_soon)
            return
        self._views.pop(group.name, None)  # a failure: read fresh state next time
        async with self._flushing:
            pending = self._successes.pop((dep.id, minute), 0)
        size = len(group.deployments)
        rule = failure_rule(
            status,
            group_size=size,
            has_fallbacks=group.has_fallbacks,
            group=group.fails,
            deployment=dep.fails,
            content_policy=content_policy,
        )
        items = [(minute_key(dep.id, minute, "req"), 1 + pending)]
        items.append((minute_key(dep.id, minute, "fail"), 1))
        if rule.counter is not None:
            items.append((fails_key(dep.id, minute, rule.counter), 1))
        try:
            counts = await self._store.incr_many(items, _MINUTE_TTL_S)
            reason = cooldown_reason(
                status,
                rule,
                group_size=size,
                failures=counts[1],
                requests=counts[0],
                counted=counts[2] if rule.counter is not None else 0,
            )
            seconds = dep.cooldown_time if dep.cooldown_time is not None else group.cooldown_time
            if reason is not None and seconds > 0:
                await self._store.set_flag(cooldown_key(dep.id), seconds)
                # a view read while the flag was being set must not outlive it
                self._views.pop(group.name, None)
                self._metrics.cooldowns.labels(dep.id).inc()
                log.warning("deployment %s cools down for %ss: %s", dep.id, seconds, reason)
        except StoreError as exc:
            self._on_store_error(exc)

    def _flush_soon(self) -> None:
        self._flush = None
        task = asyncio.get_running_loop().create_task(self.flush_successes())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush_successes(self) -> None:
        """Add this process's pending success counts to the store."""
        async with self._flushing:
            pending, self._successes = self._successes, {}
            items = list(pending.items())
            for index, ((dep_id, minute), count) in enumerate(items):
                try:
                    await self._store.incr_many(
                        [(minute_key(dep_id, minute, "req"), count)], _MINUTE_TTL_S
                    )
                except StoreError as exc:
                    self._on_store_error(exc)
                    for key, left in items[index:]:  # kept for the next flush
                        self._successes[key] = self._successes.get(key, 0) + left
                    return

    async def first_token(
        self, dep: CompiledDeployment, group: CompiledGroup, ttft_s: float
    ) -> None:
        """A time-to-first-token sample (latency-based routing of streams)."""
        if group.strategy != "latency-based-routing":
            return
        try:
            await self._store.push_sample(ttft_key(dep.id), ttft_s, SAMPLES, _SAMPLE_TTL_S)
        except StoreError as exc:
            self._on_store_error(exc)

    async def deployment_states(self, policy: CompiledPolicy) -> dict[str, dict[str, object]]:
        """For the admin API: every deployment's cooldown and this minute's counts."""
        minute = self._minute()
        deps = policy.deployments()
        keys = [
            k
            for d in deps
            for k in (
                cooldown_key(d.id),
                inflight_key(d.id),
                minute_key(d.id, minute, "req"),
                minute_key(d.id, minute, "fail"),
            )
        ]
        values, _ = await self._store.snapshot(keys, [])
        found = dict(zip(keys, values, strict=True))
        out: dict[str, dict[str, object]] = {}
        for dep in deps:
            cooling = found[cooldown_key(dep.id)]
            out[dep.id] = {
                "model_group": dep.group,
                "cooling_down": bool(cooling[0]),
                "cooldown_remaining_s": cooling[1] if cooling[0] else None,
                "in_flight": found[inflight_key(dep.id)][0] or 0,
                "requests_this_minute": found[minute_key(dep.id, minute, "req")][0] or 0,
                "failures_this_minute": found[minute_key(dep.id, minute, "fail")][0] or 0,
            }
        return out
