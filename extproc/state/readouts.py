"""Budget read-outs for the admin server: every budget the policy defines, with its
spend now (one store round trip), in LiteLLM's shapes where LiteLLM has one.

Spend is what the store holds: settled spend plus reservations of calls in flight.
Keys are named by alias or hash prefix, never by anything secret.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from extproc.core.access import Caller
from extproc.core.budgets import BudgetRef, GlobalBudget, applicable_budgets, team_member_ref
from extproc.core.charges import deployment_budgets
from extproc.core.pricing import MICROS_PER_DOLLAR
from extproc.policy import CompiledPolicy
from extproc.store import Store

__all__ = ["BudgetStatus", "all_budgets", "budget_statuses", "provider_budgets_body"]


def all_budgets(policy: CompiledPolicy, now: datetime) -> list[BudgetRef]:
    """Every budget the policy defines, each in the window ``now`` falls in."""
    tz = policy.budget_zone
    seen: dict[str, BudgetRef] = {}

    def add(refs: Sequence[BudgetRef]) -> None:
        for ref in refs:
            seen.setdefault(ref.store_key, ref)

    directory = policy.directory
    none = GlobalBudget()
    for key in directory.keys.values():
        team = directory.teams.get(key.team) if key.team else None
        caller = Caller(key, team, user=directory.users.get(key.user) if key.user else None)
        add(
            applicable_budgets(
                caller, end_user=None, end_user_id=None, tags=(), gateway=none, now=now, tz=tz
            )
        )
    for team in directory.teams.values():
        add([r for m in team.members if (r := team_member_ref(team, m.user, now, tz))])
    for end_user in policy.end_users.values():
        add(
            applicable_budgets(
                None,
                end_user=end_user,
                end_user_id=end_user.id,
                tags=(),
                gateway=none,
                now=now,
                tz=tz,
            )
        )
    add(
        applicable_budgets(
            None,
            end_user=None,
            end_user_id=None,
            tags=policy.tag_budgets.values(),
            gateway=policy.global_budget,
            now=now,
            tz=tz,
        )
    )
    for dep in policy.deployments():
        add(deployment_budgets(dep, policy, now))
    return list(seen.values())


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    ref: BudgetRef
    spend_micros: int
    reset_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        spend = Decimal(self.spend_micros) / MICROS_PER_DOLLAR
        ref = self.ref
        return {
            "kind": ref.kind,
            "name": ref.label,
            "max_budget": None if ref.limit is None else float(ref.limit),
            "soft_budget": None if ref.soft is None else float(ref.soft),
            "spend": float(spend),
            "remaining": None if ref.limit is None else float(max(ref.limit - spend, Decimal(0))),
            "budget_duration": ref.duration.text if ref.duration else None,
            "budget_reset_at": self.reset_at.isoformat() if self.reset_at else None,
        }


async def budget_statuses(
    store: Store, refs: Sequence[BudgetRef], now: datetime
) -> list[BudgetStatus]:
    """Spend and reset time of each budget (one store round trip)."""
    values, _ = await store.snapshot([ref.store_key for ref in refs], [])
    out = []
    for ref, (spend, ttl) in zip(refs, values, strict=True):
        if ref.period is not None:
            reset = ref.period.end
        elif ref.duration is not None and ttl is not None:
            reset = now + timedelta(seconds=ttl)  # rolling: the window ends with the key
        else:
            reset = None
        out.append(BudgetStatus(ref, spend or 0, reset))
    return out


def provider_budgets_body(statuses: Sequence[BudgetStatus]) -> dict[str, Any]:
    """``GET /provider/budgets`` in LiteLLM's shape."""
    providers: dict[str, Any] = {}
    for status in statuses:
        ref = status.ref
        if ref.kind != "provider":
            continue
        providers[ref.ident] = {
            "budget_limit": None if ref.limit is None else float(ref.limit),
            "time_period": ref.duration.text if ref.duration else None,
            "spend": float(Decimal(status.spend_micros) / MICROS_PER_DOLLAR),
            "budget_reset_at": status.reset_at.isoformat() if status.reset_at else None,
        }
    return {"providers": providers}
