"""Per-session iteration caps for agent loops (LiteLLM's max_iterations limiter).

An agent framework sends one session id with every LLM call of one task; the cap stops
a runaway loop after N calls. The cap is the caller's agent's ``max_iterations``, else
the key's ``metadata.max_iterations`` (the seed's order), else the model group's.

Counting is increment-then-compare in the store, with the TTL set only when the
counter is created: a fixed window from the session's first call, so calls refused
over the cap still count, as in LiteLLM.

Unlike LiteLLM, whose counter key is global (``{session_iterations:<sid>}:count``), the
counter is scoped by the caller's tenant (team, or key, or the session itself without
keys): session ids
come from clients, so with a global key one tenant could exhaust, or probe, another
tenant's session by sending the same id.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.core.access import Caller
from extproc.core.errors import RateLimitError
from extproc.store.keys import store_key, tenant_tag

__all__ = [
    "LIMIT_HEADER",
    "REMAINING_HEADER",
    "IterationCount",
    "SessionCap",
    "check_iterations",
    "counter_key",
    "session_cap",
    "session_scope",
]

LIMIT_HEADER = "x-session-iterations-limit"
REMAINING_HEADER = "x-session-iterations-remaining"


def session_scope(caller: Caller | None) -> tuple[str, ...]:
    """Whose sessions a counter belongs to: the team's, else the key's."""
    if caller is None:
        return ("anon",)
    if caller.team is not None:
        return ("team", caller.team.id)
    return ("key", caller.key.hash)


def counter_key(scope: tuple[str, ...], session_id: str) -> str:
    """The store key of a session's count: in its tenant's slot (the scope's team or
    key, see :func:`extproc.store.keys.tenant_tag`), beside the caller's budgets;
    without a caller each session is a tenant of its own."""
    if scope[0] == "team":
        tenant = tenant_tag(scope[1], None)
    elif scope[0] == "key":
        tenant = tenant_tag(None, scope[1])
    else:
        tenant = tenant_tag(None, None, session_id)
    return store_key(tenant, "session_iterations", session_id, "count")


@dataclass(frozen=True, slots=True)
class SessionCap:
    """A capped session: the cap and the counter it is counted in."""

    session_id: str
    cap: int
    store_key: str


@dataclass(frozen=True, slots=True)
class IterationCount:
    """Where a capped session stands after this call: for the response headers."""

    limit: int
    remaining: int

    def headers(self) -> tuple[tuple[str, str], ...]:
        return ((LIMIT_HEADER, str(self.limit)), (REMAINING_HEADER, str(self.remaining)))


def session_cap(
    caller: Caller | None, session_id: str | None, group_cap: int | None
) -> SessionCap | None:
    """The cap this call counts against; None when uncapped (no session id, no cap)."""
    if session_id is None:
        return None
    cap: int | None = None
    if caller is not None:
        if caller.agent is not None:
            cap = caller.agent.max_iterations
        if cap is None:
            cap = caller.key.metadata.max_iterations
    if cap is None:
        cap = group_cap
    if cap is None:
        return None
    return SessionCap(session_id, cap, counter_key(session_scope(caller), session_id))


def check_iterations(cap: SessionCap, count: int, seconds_left: float) -> IterationCount:
    """Compare the incremented ``count`` with the cap: a 429 once it is passed."""
    remaining = max(0, cap.cap - count)
    if count > cap.cap:
        shown = cap.session_id[:64] + ("..." if len(cap.session_id) > 64 else "")
        raise RateLimitError(
            f"Max iterations exceeded for session {shown}. "
            f"Current count: {count}, max_iterations: {cap.cap}.",
            code="max_iterations_exceeded",
            headers={
                "retry-after": str(max(1, int(seconds_left + 0.999))),
                LIMIT_HEADER: str(cap.cap),
                REMAINING_HEADER: "0",
            },
        )
    return IterationCount(cap.cap, remaining)
