"""Store-backed routing: which deployments can serve a call right now, then the
group's strategy (``router.choose``), and what each answer teaches about health.

One store round trip per routed call reads every deployment's cooldown, the budgets
of the budget filter and the load the strategy needs. Context windows are checked
first (pure): when no deployment of the group is large enough, the call goes to the
group's ``context_window_fallbacks`` (at most five deep), else a 400
``context_length_exceeded``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from extproc.accounting import deployment_budgets, exhausted_deployments, no_deployment_left
from extproc.budgets import BudgetRef
from extproc.decision import Prepared, with_group
from extproc.errors import BadRequestError, RateLimitError
from extproc.health import (
    SAMPLES,
    DeploymentState,
    cooldown_key,
    cooldown_reason,
    counts_as_failure,
    inflight_key,
    latency_key,
    minute_key,
    ttft_key,
)
from extproc.metrics import Metrics
from extproc.policy import CompiledDeployment, CompiledGroup, CompiledPolicy
from extproc.router import choose, over_usage_limits
from extproc.store import Store, StoreError

__all__ = ["MAX_FALLBACKS", "Router", "context_tokens"]

log = logging.getLogger("extproc.routing")

MAX_FALLBACKS = 5
#: Minute counters live a little longer than their minute.
_MINUTE_TTL_S = 120.0
_SAMPLE_TTL_S = 3600.0


def context_tokens(prepared: Prepared) -> int:
    """Input tokens for the context-window check: the text the model reads (messages,
    input, prompt, system) at a token per 4 characters."""
    body = prepared.request.body
    chars = 0
    for field in ("messages", "input", "prompt", "system", "instructions"):
        value = body.get(field)
        if value is not None:
            chars += len(str(value))
    return max(1, math.ceil(chars / 4))


def _minute() -> int:
    return int(time.time() // 60)


@dataclass(frozen=True, slots=True)
class _View:
    """The group's state from the store, for one routing decision."""

    states: dict[str, DeploymentState]
    spends: dict[str, int | None]
    budgets: dict[str, tuple[BudgetRef, ...]]


class Router:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        rng: Callable[[], float],
        *,
        on_read_error: Callable[[StoreError], None],
        on_write_error: Callable[[StoreError], None],
        cache_s: float = 0.0,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._rng = rng
        #: Reads follow the fail mode (may raise a 503); writes are only logged.
        self._on_read_error = on_read_error
        self._on_store_error = on_write_error
        self._cache_s = cache_s
        #: group name → (monotonic expiry, deployment ids, view): reads only (budgets
        #: are still enforced by the atomic reservation), dropped on a local failure.
        self._views: dict[str, tuple[float, tuple[str, ...], _View]] = {}
        #: (deployment, minute) → successes not yet added to the store.
        self._successes: dict[tuple[str, int], int] = {}
        self._flush: asyncio.TimerHandle | None = None
        #: Held while pending successes are written, so a failure counts them too.
        self._flushing = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def choose(
        self, prepared: Prepared, policy: CompiledPolicy, now: datetime
    ) -> tuple[Prepared, CompiledDeployment]:
        """The deployment for ``prepared`` (maybe in a fallback group), or a refusal."""
        tokens = context_tokens(prepared)
        tried = [prepared.group.name]
        for _ in range(MAX_FALLBACKS + 1):
            group = prepared.group
            fits = [
                d
                for d in group.deployments
                if d.context_window is None or tokens <= d.context_window
            ]
            if fits:
                chosen = await self._choose_among(prepared, fits, policy, now=now, tokens=tokens)
                return prepared, chosen
            nxt = next(
                (policy.groups[n] for n in group.context_window_fallbacks if n not in tried), None
            )
            if nxt is None:
                break
            log.debug("context window: %s too small, falling back to %s", group.name, nxt.name)
            tried.append(nxt.name)
            prepared = with_group(prepared, nxt)
        largest = max((d.context_window or 0) for d in prepared.group.deployments)
        raise BadRequestError(
            f"This request (about {tokens} input tokens) exceeds the context window of every "
            f"deployment of {', '.join(repr(t[:128]) for t in tried)} (largest {largest}).",
            code="context_length_exceeded",
            param="messages",
        )

    async def _read(
        self,
        group: CompiledGroup,
        deps: list[CompiledDeployment],
        policy: CompiledPolicy,
        now: datetime,
    ) -> _View:
        budgets = (
            {d.id: deployment_budgets(d, policy, now) for d in deps}
            if policy.has_deployment_budgets(group)
            else {}
        )
        budget_keys = sorted({r.store_key for refs in budgets.values() for r in refs})
        minute = _minute()
        keys = [cooldown_key(d.id) for d in deps]
        if group.strategy == "least-busy":
            keys += [inflight_key(d.id) for d in deps]
        if group.strategy == "usage-based-routing":
            keys += [minute_key(d.id, minute, w) for d in deps for w in ("rpm", "tpm")]
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
        return _View(states, spends, budgets)

    async def _cached_read(
        self,
        group: CompiledGroup,
        deps: list[CompiledDeployment],
        policy: CompiledPolicy,
        now: datetime,
    ) -> _View:
        """:meth:`_read`, kept for ``cache_s`` for strategies that do not live on
        per-call load (least-busy and usage-based always read, and so do groups with
        provider or deployment budgets)."""
        if (
            self._cache_s <= 0
            or group.strategy in ("least-busy", "usage-based-routing")
            # the budget filter reads spend fresh: a stale view would send calls to a
            # deployment whose budget the reservation then refuses
            or policy.has_deployment_budgets(group)
        ):
            return await self._read(group, deps, policy, now)
        ids = tuple(d.id for d in deps)
        cached = self._views.get(group.name)
        clock = time.monotonic()
        if cached is not None and cached[0] > clock and cached[1] == ids:
            return cached[2]
        view = await self._read(group, deps, policy, now)
        self._views[group.name] = (clock + self._cache_s, ids, view)
        return view

    async def _choose_among(
        self,
        prepared: Prepared,
        fits: list[CompiledDeployment],
        policy: CompiledPolicy,
        *,
        now: datetime,
        tokens: int,
    ) -> CompiledDeployment:
        group = prepared.group
        try:
            view = await self._cached_read(group, fits, policy, now)
        except StoreError as exc:
            # fail mode open: no cooldowns or load known, route by weight
            self._on_read_error(exc)
            return choose(group, fits, {}, self._rng, stream=prepared.request.stream)
        exhausted = exhausted_deployments(group, view.budgets, view.spends)
        cooling = {d.id: view.states[d.id].cooling_s for d in fits if view.states[d.id].cooling_s}
        left = [d for d in fits if d.id not in exhausted and d.id not in cooling]
        if group.strategy == "usage-based-routing":
            within = [d for d in left if not over_usage_limits(d, view.states[d.id], tokens)]
            if left and not within:
                raise RateLimitError(
                    f"Every deployment of {group.name[:256]!r} is at its rpm/tpm limit "
                    "for this minute.",
                    code="deployments_at_capacity",
                    headers={"retry-after": str(max(1, 60 - int(time.time()) % 60))},
                )
            left = within
        if left:
            return choose(group, left, view.states, self._rng, stream=prepared.request.stream)
        if cooling:
            wait = min(s for s in cooling.values() if s is not None)
            raise RateLimitError(
                f"Every deployment of {group.name[:256]!r} is cooling down after failures; "
                "try again shortly.",
                code="deployments_cooling_down",
                headers={"retry-after": str(max(1, math.ceil(wait)))},
            )
        raise no_deployment_left(group, exhausted)

    # --- what answers teach -----------------------------------------------------

    async def admitted(self, dep: CompiledDeployment, group: CompiledGroup, ttl_s: float) -> None:
        """Count a call going out (least-busy in-flight, usage-based rpm)."""
        try:
            if group.strategy == "least-busy":
                await self._store.incr_many([(inflight_key(dep.id), 1)], ttl_s, refresh_ttl=True)
            elif group.strategy == "usage-based-routing":
                await self._store.incr_many(
                    [(minute_key(dep.id, _minute(), "rpm"), 1)], _MINUTE_TTL_S
                )
        except StoreError as exc:
            self._on_store_error(exc)

    async def finished(
        self,
        dep_id: str,
        group: CompiledGroup | None,
        ttl_s: float,
        *,
        tokens: int = 0,
        seconds_per_token: float | None = None,
    ) -> None:
        """A call is over (settled or cancelled): in-flight down, tokens and latency in."""
        if group is None:
            return
        try:
            if group.strategy == "least-busy":
                await self._store.incr_many([(inflight_key(dep_id), -1)], ttl_s, refresh_ttl=True)
            elif group.strategy == "usage-based-routing" and tokens:
                await self._store.incr_many(
                    [(minute_key(dep_id, _minute(), "tpm"), tokens)], _MINUTE_TTL_S
                )
            elif group.strategy == "latency-based-routing" and seconds_per_token is not None:
                await self._store.push_sample(
                    latency_key(dep_id), seconds_per_token, SAMPLES, _SAMPLE_TTL_S
                )
        except StoreError as exc:
            self._on_store_error(exc)

    async def answered(
        self,
        dep: CompiledDeployment,
        group: CompiledGroup,
        status: int,
        *,
        ttft_s: float | None = None,
    ) -> None:
        """Record one upstream answer; cool the deployment down if LiteLLM's rules say so.

        Successes are added to the store in batches (at most a second late): only a
        failure needs the minute's counts at once, and it flushes this process's
        pending successes with it.
        """
        minute = _minute()
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
        items = [(minute_key(dep.id, minute, "req"), 1 + pending)]
        items.append((minute_key(dep.id, minute, "fail"), 1))
        try:
            counts = await self._store.incr_many(items, _MINUTE_TTL_S)
            reason = cooldown_reason(
                status,
                group_size=len(group.deployments),
                failures=counts[1] if failed else 0,
                requests=counts[0],
                allowed_fails=group.allowed_fails,
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
        minute = _minute()
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
