"""The refusals of one call's failover attempts, shared by the server processes.

Envoy opens a stream per attempt, and the attempts of one call may reach different
server processes; a dynamic failover route (``extproc.core.failover``) needs the
error classes of a call's earlier refusals to pick a retry's deployment. Each refusal
is one store key, ``{fo:<call>}:<attempt>``, holding the class's number, kept for as
long as a call may last. The call is named by the id the server gave it
(``x-extproc-call``, the same on every attempt), hashed, so no header value the
server did not make becomes a key as it is.

Rule: never a deployment of the wrong list. A refusal that could not be recorded is
not turned into a retry (the client gets the 400 as it is); a record that cannot be
read is None, and the retry is refused (a 503) rather than sent down a list the
call may not be on.
"""

from __future__ import annotations

import hashlib
import logging

from extproc.core.failover import MAX_RETRIES, REFUSAL_CLASSES
from extproc.store import Store, StoreError
from extproc.store.keys import store_key

__all__ = ["KEEP_S", "read_refusals", "record_refusal"]

log = logging.getLogger("extproc")

#: How long a refusal is kept: the longest a call may last (the routes' timeout).
KEEP_S = 600.0


def _key(call: str, attempt: int) -> str:
    digest = hashlib.blake2b(call.encode("utf-8", "replace"), digest_size=12).hexdigest()
    return store_key(("fo", digest), str(attempt))


async def read_refusals(store: Store, call: str, before: int) -> dict[int, str] | None:
    """Attempt number → error class, for the refusals among attempts 1..``before``-1;
    None when the store cannot say."""
    numbers = range(1, min(before, 2 + MAX_RETRIES))
    if not numbers:
        return {}
    try:
        values, _ = await store.snapshot([_key(call, n) for n in numbers], [])
    except StoreError as exc:
        log.warning("could not read a call's refusals (%s): the retry is refused", exc)
        return None
    out: dict[int, str] = {}
    for number, (value, _) in zip(numbers, values, strict=True):
        if value is not None and 1 <= value <= len(REFUSAL_CLASSES):
            out[number] = REFUSAL_CLASSES[value - 1]
    return out


async def record_refusal(store: Store, call: str, attempt: int, cls: str) -> bool:
    """Record that ``attempt`` of the call was refused with ``cls``; False if the
    store could not take it."""
    try:
        await store.incr_many([(_key(call, attempt), REFUSAL_CLASSES.index(cls) + 1)], KEEP_S)
    except StoreError as exc:
        log.warning("could not record a call's refusal (%s): it goes to the client", exc)
        return False
    return True
