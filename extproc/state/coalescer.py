"""The ends of calls that finish at about the same time share one store round trip.

A call's settlement (:class:`~extproc.store.base.Finish`), the cancel of its
reservation and the release of its parallel-request lease are each awaited by the
call that makes it, with its own outcome. The :class:`Coalescer` collects the ones made
while the event loop runs the same turn and sends them in one
:meth:`~extproc.store.base.Store.write_many` (one pipeline per node on Redis).

Rules:

- A lone write waits for nothing: with no batch in flight, the batch goes out once
  the loop has run the callbacks already ready (the same turn), no timer.
- While a batch is in flight, what arrives waits for its answer and then goes out
  together (group commit): under load a call waits at most the round trip it would
  have spent alone, and the store sees one trip per round trip instead of one per
  call. A batch that reaches ``max_batch`` goes out at once, beside the one in flight.
- Every write gets its own outcome: its settled values, or the
  :class:`~extproc.store.StoreError` it met, which its caller handles exactly as it
  would a store call of its own (owed and retried, see :mod:`extproc.state.owed`).
  A caller that stops waiting does not take its write out of the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast

from extproc.store import Store, StoreError
from extproc.store.base import Cancel, Finish, Release, Write

__all__ = ["Coalescer"]

#: Writes one batch carries at most (a pipeline of this many scripts is a few tens of
#: kilobytes, and a few milliseconds of Redis time).
MAX_BATCH = 128

_Outcome = list[int] | None


def _retrieve(future: asyncio.Future[_Outcome]) -> None:
    """The outcome of a write whose caller stopped waiting is read (not reported)."""
    if not future.cancelled():
        future.exception()


class Coalescer:
    """Finishes, cancels and lease releases of concurrent calls, sent in batches."""

    def __init__(self, store: Store, *, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[tuple[Write, asyncio.Future[_Outcome]]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        #: Whether a send of the pending batch is scheduled already.
        self._scheduled = False
        #: Batches sent and writes they carried (what the tests and the bench read).
        self.batches = 0
        self.writes = 0

    async def finish(self, finish: Finish) -> list[int]:
        """:meth:`Store.finish` in the next batch: each budget's settled value."""
        return cast(list[int], await self._write(finish))

    async def cancel(self, cancel: Cancel) -> None:
        """:meth:`Store.cancel` in the next batch."""
        await self._write(cancel)

    async def release(self, release: Release) -> None:
        """:meth:`Store.release_lease` in the next batch."""
        await self._write(release)

    async def _write(self, write: Write) -> _Outcome:
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._pending.append((write, future))
        if len(self._pending) >= self._max_batch:
            self._send()
        elif not self._in_flight and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_scheduled)
        # Rule: a caller cancelled meanwhile leaves its write in the batch
        return await asyncio.shield(future)

    def _send_scheduled(self) -> None:
        self._scheduled = False
        if not self._in_flight:
            self._send()

    def _send(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._in_flight.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if not self._in_flight:
            self._send()  # what arrived meanwhile

    async def _run(self, batch: list[tuple[Write, asyncio.Future[_Outcome]]]) -> None:
        self.batches += 1
        self.writes += len(batch)
        try:
            outcomes = await self._store.write_many([write for write, _ in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError("one outcome per write")  # noqa: TRY301 - a store bug
        except Exception as exc:  # handed to every caller, who raises it
            # Rule: a batch that failed as a whole is every write's failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, StoreError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def drain(self) -> None:
        """Wait until every write made so far has its outcome."""
        while self._pending or self._in_flight:
            if not self._in_flight:
                self._send()
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._in_flight)
