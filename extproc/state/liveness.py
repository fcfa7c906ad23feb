"""Which server processes are alive: this one's heartbeat, and its dead peers' leftovers.

Every process has a random id for its lifetime (:attr:`Liveness.owner`; never the
pid, which a restart reuses). The leases and holds it takes carry that id. It beats
in the store every ``interval_s`` (the beat lives ``ttl_s``) and learns from the same
call which processes stopped beating. Their leases are dropped by the next lease
acquire that finds a set full (the store does it in the acquire's own step); their
budget holds are given back here, by every live process that sees them dead (the
store gives each hold back once, however many reap it).

Rule: a process stalled longer than ``ttl_s`` counts as dead. Its slots and holds
may be given back while it still runs: the limits admit a little more for a moment,
its later settlements charge in full, nothing is counted twice or lost.

Rule: after a beat that failed (the store was unreachable, so its peers could not beat
either), the dead list is not believed until this process has beaten again for
``ttl_s``: once the store is back every peer has had time to beat, and only the
really dead are left in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable

from extproc.state.metrics import Metrics
from extproc.store import Store, StoreError
from extproc.store.base import OWNER_CHARS, OWNER_ID, check_owner

__all__ = ["Liveness"]

log = logging.getLogger("extproc.liveness")

#: A clean stop marks this process dead at once (its beat runs out in a millisecond).
_RETIRE_TTL_S = 0.001


class Liveness:
    """This process's id and heartbeat, and the peers it has seen dead."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        ttl_s: float,
        keep_s: float,
        owner: str | None = None,
        clock: Callable[[], float],
    ) -> None:
        self.owner = check_owner(owner or secrets.token_hex(OWNER_CHARS // 2))
        self._clock = clock
        #: When the dead list may be believed again after a failed beat (None: now).
        self._trust_at: float | None = None
        self._failed = False
        #: Processes whose heartbeat ran out, as of the last beat (never this one).
        self.dead: tuple[str, ...] = ()
        self._store = store
        self._metrics = metrics
        self._ttl_s = ttl_s
        #: Rule: a dead id is remembered as long as anything it took can still live.
        self._keep_s = keep_s
        self._reaped: set[str] = set()
        self._last_log = float("-inf")
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        """One heartbeat, then the holds of every peer newly seen dead given back.

        Raises :class:`StoreError`; a peer whose reap failed is tried again next beat."""
        dead = await self._store.heartbeat(self.owner, self._ttl_s, self._keep_s)
        if self._failed:
            self._failed, self._trust_at = False, self._clock() + self._ttl_s
        if self._trust_at is not None:
            if self._clock() < self._trust_at:
                self.dead = ()  # peers may not have beaten since the store came back
                return
            self._trust_at = None
        # Rule: only what could be a process id travels on (a stray entry in the
        # heartbeats must not make every lease acquire a fault).
        self.dead = tuple(p for p in dead if p != self.owner and OWNER_ID.fullmatch(p))
        self._reaped &= set(self.dead)  # one that beats again may die again later
        for peer in self.dead:
            if peer in self._reaped:
                continue
            holds = await self._store.reap_holds(peer)
            self._reaped.add(peer)
            if holds:
                self._metrics.settlements.labels("reaped").inc(holds)
                log.warning(
                    "server process %s stopped beating: gave back its %d budget holds",
                    peer,
                    holds,
                )

    async def tick(self) -> None:
        """:meth:`beat`, a failure counted and logged (at most once per 10 s)."""
        try:
            await self.beat()
        except StoreError as exc:
            self._failed = True
            self.dead = ()
            self._metrics.heartbeats.labels("failed").inc()
            now = self._clock()
            if now - self._last_log >= 10.0:
                self._last_log = now
                log.warning("heartbeat failed (peers may take this process for dead): %s", exc)
            return
        self._metrics.heartbeats.labels("ok").inc()

    async def start(self, interval_s: float) -> None:
        """Beat now, then every ``interval_s`` in a task of its own until :meth:`stop`."""
        await self.tick()
        self._task = asyncio.get_running_loop().create_task(self._run(interval_s))

    async def _run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.tick()

    async def stop(self) -> None:
        """Stop beating and retire (a clean stop); nothing when never started."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.retire()

    async def retire(self) -> None:
        """This process is dead at once, and whatever it still holds (nothing, once
        its streams are drained) is given back now."""
        try:
            await self._store.heartbeat(self.owner, _RETIRE_TTL_S, self._keep_s)
            holds = await self._store.reap_holds(self.owner)
        except StoreError as exc:
            log.warning("could not retire this process's heartbeat: %s", exc)
            return
        if holds:
            self._metrics.settlements.labels("reaped").inc(holds)
