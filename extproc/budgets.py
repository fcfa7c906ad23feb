"""Dollar budgets: which ones apply to a request, and whether spend has reached them.

The read side only: spend is read from the store (integer micro-dollars under
:func:`spend_key`) and compared with each budget that applies, in LiteLLM's order
(key, team, user, end user, org, project, tags, global). Charging spend, windows and
reservations come with the spend-accounting work; :func:`spend_key` is the one place
that names the store keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

from extproc.errors import BudgetExceededError
from extproc.keys import Caller

__all__ = [
    "MICRO",
    "BudgetRef",
    "EndUser",
    "TagBudget",
    "alert_key",
    "applicable_budgets",
    "check_budgets",
    "spend_key",
]

#: Micro-dollars per dollar: spend is stored as an integer count of these.
MICRO = Decimal(1_000_000)


class EndUser(BaseModel):
    """An end user (the request's ``user``) with a budget of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=256)
    max_budget: Decimal | None = Field(default=None, ge=0)


class TagBudget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    max_budget: Decimal | None = Field(default=None, ge=0)


@dataclass(frozen=True, slots=True)
class BudgetRef:
    """One budget that applies to a request."""

    kind: str
    ident: str
    label: str
    limit: Decimal | None
    #: Crossing it raises one alert per window, never a refusal.
    soft: Decimal | None = None

    @property
    def store_key(self) -> str:
        return spend_key(self.kind, self.ident)


def alert_key(ref: BudgetRef) -> str:
    """The store key that makes a soft-budget alert fire once per window."""
    return f"alert:soft:{ref.kind}:{ref.ident}"


def spend_key(kind: str, ident: str) -> str:
    """The store key holding the spend of one budget owner, in micro-dollars.

    Rule: the id is the key hash for keys, never a plaintext key.
    """
    return f"spend:{kind}:{ident}"


def applicable_budgets(
    caller: Caller | None,
    *,
    end_user: EndUser | None,
    default_end_user_budget: Decimal | None,
    end_user_id: str | None,
    tags: Iterable[TagBudget],
    global_budget: Decimal | None,
) -> tuple[BudgetRef, ...]:
    """The budgets this request is checked against, in LiteLLM's order."""
    refs: list[BudgetRef] = []

    def add(
        kind: str, ident: str, label: str, limit: Decimal | None, soft: Decimal | None = None
    ) -> None:
        if limit is not None or soft is not None:
            refs.append(BudgetRef(kind, ident, label, limit, soft))

    if caller is not None:
        key = caller.key
        add("key", key.hash, f"API key {key.label}", key.max_budget, key.soft_budget)
        if caller.team is not None:
            team = caller.team
            add("team", team.id, f"team {team.id}", team.max_budget, team.soft_budget)
        elif caller.user is not None:
            add("user", caller.user.id, f"user {caller.user.id}", caller.user.max_budget)
        if caller.org is not None:
            add("org", caller.org.id, f"organization {caller.org.id}", caller.org.max_budget)
        if caller.project is not None:
            add(
                "project",
                caller.project.id,
                f"project {caller.project.id}",
                caller.project.max_budget,
            )
    if end_user_id is not None:
        limit = end_user.max_budget if end_user is not None else None
        add(
            "end_user",
            end_user_id,
            f"end user {end_user_id[:64]}",
            limit if limit is not None else default_end_user_budget,
        )
    for tag in tags:
        add("tag", tag.name, f"tag {tag.name}", tag.max_budget)
    add("global", "all", "the gateway", global_budget)
    return tuple(refs)


def check_budgets(refs: Sequence[BudgetRef], spends: Sequence[int | None]) -> tuple[BudgetRef, ...]:
    """Raise a 429 for the first budget whose spend has reached its limit; return the
    budgets whose soft limit has been crossed (for alerts)."""
    crossed: list[BudgetRef] = []
    for ref, spent in zip(refs, spends, strict=True):
        spend = Decimal(spent or 0) / MICRO
        if ref.soft is not None and spend >= ref.soft:
            crossed.append(ref)
        if ref.limit is not None and spend >= ref.limit:
            raise BudgetExceededError(
                f"Budget exceeded for {ref.label}: spend ${spend:.6f}, budget ${ref.limit}.",
                code=f"{ref.kind}_budget_exceeded",
            )
    return tuple(crossed)
