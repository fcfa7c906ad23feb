"""Budget alerts: a crossed soft budget (or alert share of a max budget) is reported
once per budget window, as a log line, a metric and an optional webhook POST.

The webhook runs in a task of its own with a timeout and a few retries; its failure
is logged and counted, never felt by traffic.
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from typing import Any, Literal, cast

import aiohttp

from extproc.core.budgets import BudgetRef, alert_key
from extproc.core.pricing import MICROS_PER_DOLLAR
from extproc.state.metrics import Metrics
from extproc.store import Store, StoreError
from extproc.store.base import Admission, Count

__all__ = ["Alerter"]

log = logging.getLogger("extproc.alerts")

#: A budget without a window of its own alerts at most once a day.
DEFAULT_WINDOW_S = 86_400.0
WEBHOOK_TIMEOUT_S = 2.0
WEBHOOK_ATTEMPTS = 3

Kind = Literal["soft_budget", "budget_threshold"]


class Alerter:
    def __init__(
        self, store: Store, metrics: Metrics, webhook_url: str = "", *, owner: str = "0" * 16
    ) -> None:
        self._store = store
        #: The process id the once-per-window counts are filed under.
        self._owner = owner
        self._metrics = metrics
        self._webhook_url = webhook_url
        self._tasks: set[asyncio.Task[None]] = set()

    async def crossed(self, ref: BudgetRef, spent_micros: int, kind: Kind) -> None:
        """Report ``ref`` crossed, unless this window already did (across processes)."""
        ttl = ref.window_s or DEFAULT_WINDOW_S
        key = alert_key(ref, kind)
        try:
            once = Admission(key, self._owner, 0, ttl, (), (Count(key, 1, ttl),))
            (result,) = (await self._store.admit(once)).results
            first = cast(tuple[int, float, bool], result)[0] == 1
            if first and ref.duration is not None and ref.period is None:
                # Rule: a rolling window (tag, provider, deployment budgets) started at
                # its first spend, so its alert lives exactly as long as its spend key:
                # the next window alerts again.
                ((_, left),), _ = await self._store.snapshot([ref.store_key], [])
                if left is not None and left > 0:
                    await self._store.set_flag(key, left)
        except StoreError:
            return  # an alert is never worth failing a request
        if not first:
            return
        spend = Decimal(spent_micros) / MICROS_PER_DOLLAR
        threshold = ref.soft if kind == "soft_budget" else ref.limit
        self._metrics.soft_budget_alerts.labels(ref.kind).inc()
        log.warning(
            "%s crossed for %s: spend $%.6f (soft budget $%s, budget $%s)",
            kind.replace("_", " "),
            ref.label,
            spend,
            ref.soft,
            ref.limit,
        )
        if self._webhook_url:
            event = {
                "event": kind,
                "budget": {
                    "kind": ref.kind,
                    "name": ref.label,
                    "spend": float(spend),
                    "soft_budget": None if ref.soft is None else float(ref.soft),
                    "max_budget": None if ref.limit is None else float(ref.limit),
                    "threshold": None if threshold is None else float(threshold),
                    "window": ref.duration.text if ref.duration else None,
                    "window_resets_at": ref.period.end.isoformat() if ref.period else None,
                },
            }
            task = asyncio.get_running_loop().create_task(self._post(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(self, event: dict[str, Any]) -> None:
        timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)
        delay = 0.5
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                async with (
                    aiohttp.ClientSession(timeout=timeout) as session,
                    session.post(self._webhook_url, json=event) as resp,
                ):
                    if resp.status < 500:
                        if resp.status >= 400:
                            log.warning("alert webhook refused the event: HTTP %d", resp.status)
                            self._metrics.alert_webhooks.labels("refused").inc()
                        else:
                            self._metrics.alert_webhooks.labels("sent").inc()
                        return
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            if attempt < WEBHOOK_ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
        self._metrics.alert_webhooks.labels("failed").inc()
        log.warning("alert webhook failed after %d attempts", WEBHOOK_ATTEMPTS)

    async def drain(self) -> None:
        """Wait for webhook posts in flight (shutdown, tests)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
