"""Dollar budgets: which ones apply to a request, and whether spend has reached them.

The read side only: spend is read from the store (integer micro-dollars under
:attr:`BudgetRef.store_key`) and compared with each budget that applies, in LiteLLM's
order (key, team, team member, user, end user, org, project, tags, global). A budget
with a ``budget_duration`` has windows (:mod:`extproc.core.windows`): calendar windows put
the period in the store key, rolling ones rely on the key's TTL. Charging spend and
reservations come with the spend-accounting work; :func:`spend_key` names budget keys
(built, like every store key, by :func:`extproc.store.keys.store_key`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, Decimal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

from extproc.core.access import Caller, Team
from extproc.core.errors import BudgetExceededError
from extproc.core.windows import Duration, DurationText, Period, cached_duration, calendar_period
from extproc.store.keys import SPEND, is_tenant_tag, split_key, store_key, tenant_tag

__all__ = [
    "KINDS",
    "MICRO",
    "BudgetRef",
    "EndUser",
    "GlobalBudget",
    "TagBudget",
    "alert_key",
    "applicable_budgets",
    "check_budgets",
    "is_spend_key",
    "limit_micros",
    "make_ref",
    "spend_key",
    "team_member_ref",
]

#: Every kind of budget (the first part of its spend key).
KINDS = frozenset(
    {
        "key",
        "team",
        "team_member",
        "user",
        "end_user",
        "org",
        "project",
        "tag",
        "global",
        "provider",
        "deployment",
    }
)

#: Micro-dollars per dollar: spend is stored as an integer count of these.
MICRO = Decimal(1_000_000)


@functools.lru_cache(maxsize=4096)
def limit_micros(limit: Decimal | None) -> int | None:
    """A dollar limit (max budget, soft budget, alert threshold) in micro-dollars.

    Rule: rounded UP, so a limit above zero never becomes zero (a $1e-12 budget
    admits its first call, then refuses); a zero limit stays zero and refuses every
    call. Spend is whole micro-dollars, so ``spend >= limit`` is the same test in
    dollars and in micro-dollars.
    """
    if limit is None:
        return None
    return int((limit * MICRO).to_integral_value(rounding=ROUND_CEILING))


class EndUser(BaseModel):
    """An end user (the request's ``user``) with a budget of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=256)
    max_budget: Decimal | None = Field(default=None, ge=0)
    budget_duration: DurationText | None = None


class TagBudget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    max_budget: Decimal | None = Field(default=None, ge=0)
    #: A rolling window: starts at the tag's first spend (LiteLLM's tag budgets).
    budget_duration: DurationText | None = None


@dataclass(frozen=True, slots=True)
class BudgetRef:
    """One budget that applies to a request."""

    kind: str
    ident: str
    label: str
    limit: Decimal | None
    #: Crossing it raises one alert per window, never a refusal.
    soft: Decimal | None = None
    duration: Duration | None = None
    #: The calendar window ``now`` is in; None for lifetime and rolling budgets.
    period: Period | None = None
    #: A team member's user id (``ident`` is the team's).
    member: str | None = None
    #: The hash tag of a tenant's own budget (key, team, team member: see
    #: :func:`extproc.store.keys.tenant_tag`); None for budgets that span tenants.
    tenant: tuple[str, ...] | None = None

    @property
    def key_parts(self) -> tuple[str, ...]:
        """What names this budget's spend: kind, owner, window (store key parts)."""
        parts: tuple[str, ...] = (self.kind, self.ident)
        if self.member is not None:
            parts += (self.member,)
        if self.duration is not None:
            parts += (self.duration.text,)
            if self.period is not None:
                parts += (self.period.ident,)
        return parts

    @property
    def store_key(self) -> str:
        return spend_key(*self.key_parts, tenant=self.tenant)

    @property
    def window_s(self) -> float | None:
        """How long a window lasts (the TTL for spend keys), None for lifetime budgets."""
        if self.duration is None:
            return None
        if self.period is not None:
            return (self.period.end - self.period.start).total_seconds()
        return float(self.duration.seconds)

    def retry_after(self, now: datetime) -> int | None:
        """Whole seconds until a calendar window resets; None when unknown."""
        if self.period is None:
            return None
        return max(1, int(self.period.seconds_left(now) + 0.999))


def alert_key(ref: BudgetRef, event: str) -> str:
    """The store key that makes ``event`` (an alert kind) fire once per budget window;
    tagged by the budget it belongs to."""
    return store_key(("alert", *ref.key_parts), event)


#: Budgets of one tenant: their spend keys carry the tenant's tag.
TENANT_KINDS = frozenset({"key", "team", "team_member"})


@functools.lru_cache(maxsize=1 << 16)
def spend_key(kind: str, ident: str, *window: str, tenant: tuple[str, ...] | None = None) -> str:
    """The store key holding the spend of one budget owner, in micro-dollars.

    Rule: the id is the key hash for keys, never a plaintext key. A tenant's own budget
    (:data:`TENANT_KINDS`) carries its tenant's tag, beside the tenant's counters and
    leases (one script admits a call); every other budget the ``{spend}`` tag.
    """
    if kind in TENANT_KINDS:
        if tenant is None:
            # a key without a team is its own tenant; a team is its own
            tenant = tenant_tag(ident if kind != "key" else None, ident if kind == "key" else None)
        return store_key(tenant, kind, ident, *window)
    return store_key(SPEND, kind, ident, *window)


def is_spend_key(key: str) -> bool:
    """Whether ``key`` is a budget's spend key (checked on keys that come back from
    outside, such as a charge carried through Envoy)."""
    split = split_key(key)
    if split is None or len(split[1]) < 2 or split[1][0] not in KINDS:
        return False
    tag, kind = split[0], split[1][0]
    if kind in TENANT_KINDS:
        return is_tenant_tag(tag) and tag[1] != "anon"
    return tag == SPEND


def make_ref(
    kind: str,
    ident: str,
    label: str,
    limit: Decimal | None,
    *,
    duration: str | None,
    now: datetime,
    tz: ZoneInfo,
    soft: Decimal | None = None,
    rolling: bool = False,
    member: str | None = None,
    tenant: tuple[str, ...] | None = None,
) -> BudgetRef | None:
    """A budget in the window ``now`` falls in; None when it has no limit at all."""
    if limit is None and soft is None:
        return None
    parsed = cached_duration(duration) if duration else None
    period = None if parsed is None or rolling else calendar_period(parsed, now, tz)
    return BudgetRef(kind, ident, label, limit, soft, parsed, period, member, tenant)


def team_member_ref(team: Team, user: str, now: datetime, tz: ZoneInfo) -> BudgetRef | None:
    """``user``'s budget within ``team`` (their own entry, else the team default)."""
    limit, duration = team.member_budget(user)
    label = f"user {user} in team {team.id}"
    return make_ref(
        "team_member",
        team.id,
        label,
        limit,
        duration=duration,
        now=now,
        tz=tz,
        member=user,
        tenant=tenant_tag(team.id, None),
    )


@dataclass(frozen=True, slots=True)
class GlobalBudget:
    """Gateway-wide budget settings that :func:`applicable_budgets` needs."""

    max_budget: Decimal | None = None
    duration: str | None = None
    default_end_user_budget: Decimal | None = None
    default_end_user_duration: str | None = None


def applicable_budgets(
    caller: Caller | None,
    *,
    end_user: EndUser | None,
    end_user_id: str | None,
    tags: Iterable[TagBudget],
    gateway: GlobalBudget,
    now: datetime,
    tz: ZoneInfo,
) -> tuple[BudgetRef, ...]:
    """The budgets this request is checked against, in LiteLLM's order, each with the
    window ``now`` falls in."""
    refs: list[BudgetRef] = []

    def add(
        kind: str,
        ident: str,
        label: str,
        limit: Decimal | None,
        duration: str | None,
        *,
        soft: Decimal | None = None,
        rolling: bool = False,
        tenant: tuple[str, ...] | None = None,
    ) -> None:
        ref = make_ref(
            kind,
            ident,
            label,
            limit,
            duration=duration,
            now=now,
            tz=tz,
            soft=soft,
            rolling=rolling,
            tenant=tenant,
        )
        if ref is not None:
            refs.append(ref)

    if caller is not None:
        key = caller.key
        team = caller.team
        tenant = key.tenant
        add(
            "key",
            key.hash,
            f"API key {key.label}",
            key.max_budget,
            key.budget_duration,
            soft=key.soft_budget,
            tenant=tenant,
        )
        if team is not None:
            add(
                "team",
                team.id,
                f"team {team.id}",
                team.max_budget,
                team.budget_duration,
                soft=team.soft_budget,
                tenant=tenant,
            )
            if key.user is not None:
                member = team_member_ref(team, key.user, now, tz)
                if member is not None:
                    refs.append(member)
        elif caller.user is not None:
            user = caller.user
            add("user", user.id, f"user {user.id}", user.max_budget, user.budget_duration)
        if caller.org is not None:
            org = caller.org
            add("org", org.id, f"organization {org.id}", org.max_budget, org.budget_duration)
        if caller.project is not None:
            project = caller.project
            add(
                "project",
                project.id,
                f"project {project.id}",
                project.max_budget,
                project.budget_duration,
            )
    if end_user_id is not None:
        own = end_user is not None and end_user.max_budget is not None
        add(
            "end_user",
            end_user_id,
            f"end user {end_user_id[:64]}",
            end_user.max_budget if own and end_user else gateway.default_end_user_budget,
            end_user.budget_duration if own and end_user else gateway.default_end_user_duration,
        )
    for tag in tags:
        add("tag", tag.name, f"tag {tag.name}", tag.max_budget, tag.budget_duration, rolling=True)
    add("global", "all", "the gateway", gateway.max_budget, gateway.duration)
    return tuple(refs)


def check_budgets(
    refs: Sequence[BudgetRef], spends: Sequence[int | None], now: datetime
) -> tuple[BudgetRef, ...]:
    """Raise a 429 for the first budget whose spend has reached its limit (with
    ``retry-after`` when its window's reset is known); return the budgets whose soft
    limit has been crossed (for alerts)."""
    crossed: list[BudgetRef] = []
    for ref, spent in zip(refs, spends, strict=True):
        micros = spent or 0
        spend = Decimal(micros) / MICRO
        soft, limit = limit_micros(ref.soft), limit_micros(ref.limit)
        if soft is not None and micros >= soft:
            crossed.append(ref)
        if limit is not None and micros >= limit:
            wait = ref.retry_after(now)
            headers = {"retry-after": str(wait)} if wait is not None else None
            window = f" per {ref.duration.text}" if ref.duration else ""
            resets = f" It resets at {ref.period.end.isoformat()}." if ref.period else ""
            raise BudgetExceededError(
                f"Budget exceeded for {ref.label}: spend ${spend:.6f}, "
                f"budget ${ref.limit}{window}.{resets}",
                code=f"{ref.kind}_budget_exceeded",
                headers=headers,
            )
    return tuple(crossed)
