"""The per-process state the gRPC and admin adapters share.

One :class:`Gateway` per process holds the settings, the current policy snapshot (a
single reference, replaced whole on reload), the store and the metrics. Request
handling reads ``gateway.policy`` once per request.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from extproc.decision import GatewayConfig
from extproc.metrics import Metrics
from extproc.policy import CompiledPolicy, PolicyError, load_policy
from extproc.settings import Settings
from extproc.store import Store, open_store

__all__ = ["Gateway"]

log = logging.getLogger("extproc")


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
