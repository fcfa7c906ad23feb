"""Spend accounting: reserve at admission, settle with the response's usage.

The core of it is independent of where usage comes from. A :class:`Charge` is made
when a call is admitted and holds everything needed to settle it later, in any server
process: the reservation id, the budget keys and windows, the estimate, the
deployment (for its prices). Today usage arrives on the ext_proc response phases (the
ext_proc adapter, and a response-only ext_proc filter behind ext_authz); an adapter
fed by Envoy's access-log stream would call the same :meth:`Charge.cost`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from extproc.core.budgets import BudgetRef, is_spend_key, limit_micros
from extproc.core.errors import BudgetExceededError
from extproc.core.limits import is_tpm_key
from extproc.core.pricing import MICROS_PER_DOLLAR, cost_micros
from extproc.core.usage import Api, Usage
from extproc.core.windows import Period, cached_duration
from extproc.policy import CompiledDeployment, CompiledGroup, CompiledPolicy

__all__ = [
    "Charge",
    "deployment_budgets",
    "exhausted_deployments",
    "limit_micros",
    "no_deployment_left",
]


def deployment_budgets(
    dep: CompiledDeployment, policy: CompiledPolicy, now: datetime
) -> tuple[BudgetRef, ...]:
    """The provider and deployment budgets a call to ``dep`` spends from.

    Their windows roll from the first spend, as in LiteLLM's router budget limiter.
    """
    del now  # rolling windows: the store's TTL marks where they start
    refs: list[BudgetRef] = []
    provider = policy.provider_budgets.get(dep.provider)
    if provider is not None:
        refs.append(
            BudgetRef(
                "provider",
                dep.provider,
                f"provider {dep.provider}",
                provider.budget_limit,
                duration=cached_duration(provider.time_period) if provider.time_period else None,
            )
        )
    if dep.max_budget is not None:
        refs.append(
            BudgetRef(
                "deployment",
                dep.id,
                f"deployment {dep.id}",
                dep.max_budget,
                duration=cached_duration(dep.budget_duration) if dep.budget_duration else None,
            )
        )
    return tuple(refs)


def exhausted_deployments(
    group: CompiledGroup,
    refs: Mapping[str, tuple[BudgetRef, ...]],
    spends: Mapping[str, int | None],
) -> dict[str, list[tuple[BudgetRef, int]]]:
    """Deployment id → its provider/deployment budgets whose spend reached the limit."""
    out: dict[str, list[tuple[BudgetRef, int]]] = {}
    for dep in group.deployments:
        for ref in refs.get(dep.id, ()):
            spent = spends.get(ref.store_key) or 0
            limit = limit_micros(ref.limit)
            if limit is not None and spent >= limit:
                out.setdefault(dep.id, []).append((ref, spent))
    return out


def no_deployment_left(
    group: CompiledGroup, exhausted: dict[str, list[tuple[BudgetRef, int]]]
) -> BudgetExceededError:
    """LiteLLM's 'No deployments available - crossed budget', naming the budgets."""
    seen: dict[str, str] = {}
    for hits in exhausted.values():
        for ref, spent in hits:
            window = f" per {ref.duration.text}" if ref.duration else ""
            seen[ref.label] = (
                f"{ref.label}: spent ${Decimal(spent) / MICROS_PER_DOLLAR:.6f} of "
                f"${ref.limit}{window}"
            )
    return BudgetExceededError(
        f"No deployments available for model group {group.name[:256]!r} - crossed budget: "
        + "; ".join(seen.values())
        + ".",
        code="deployment_budgets_exhausted",
    )


def _ref_token(ref: BudgetRef) -> list[str | None]:
    """A budget as plain JSON values, to travel in a charge."""
    period = ref.period
    return [
        ref.kind,
        ref.ident,
        ref.label,
        None if ref.limit is None else str(ref.limit),
        None if ref.soft is None else str(ref.soft),
        ref.duration.text if ref.duration else None,
        period.start.isoformat() if period else None,
        period.end.isoformat() if period else None,
    ]


def _ref_from_token(raw: Any) -> BudgetRef | None:
    """The budget :func:`_ref_token` wrote; None for anything else."""
    if not isinstance(raw, list) or len(raw) != 8:
        return None
    kind, ident, label, limit, soft, duration, start, end = raw
    if not all(isinstance(v, str) for v in (kind, ident, label)):
        return None
    if not all(v is None or isinstance(v, str) for v in (limit, soft, duration, start, end)):
        return None
    try:
        period = None
        if start is not None and end is not None:
            period = Period(datetime.fromisoformat(start), datetime.fromisoformat(end))
        return BudgetRef(
            kind,
            ident,
            label,
            None if limit is None else Decimal(limit),
            None if soft is None else Decimal(soft),
            cached_duration(duration) if duration else None,
            period,
        )
    except (ValueError, ArithmeticError):
        return None


def _period_ttl(ref: BudgetRef, now: datetime) -> float | None:
    """The spend key's TTL: the rest of a calendar window (plus a day to read it back),
    a rolling window's length, or none for a lifetime budget."""
    if ref.duration is None:
        return None
    if ref.period is not None:
        return ref.period.seconds_left(now) + 86_400
    return float(ref.duration.seconds)


@dataclass(frozen=True, slots=True)
class Charge:
    """One admitted call's reservation and how to settle it."""

    rid: str
    api: Api
    endpoint: str
    group: str
    deployment: str
    stream: bool
    #: The gateway asked for the usage chunk; the client does not get it.
    strip_usage: bool
    estimate: int
    keys: tuple[str, ...]
    ttls: tuple[float | None, ...]
    #: The key's tokens-per-minute counter, when it has a tpm limit.
    tpm_key: str | None = None
    #: Unix time of admission (latency samples).
    started: float = 0.0
    #: The estimates behind ``estimate``, to price a stream the client abandoned.
    prompt_tokens: int = 0
    max_output_tokens: int = 0
    #: The deployment that served the call when failover moved it (pricing only;
    #: ``deployment`` stays the one admitted, for its in-flight count).
    served: str | None = None
    #: The most tokens of one kind the response may report (its context window plus
    #: its largest answer for every choice, per prompt); larger counts are clamped.
    usage_cap: int = 0
    #: The budgets whose alerts the settlement checks (soft budgets, alert shares).
    watch: tuple[BudgetRef, ...] = ()
    #: Sent through a failover (composite) cluster: its attempts' filters counted the
    #: statuses and may name the deployment that served it.
    failover: bool = False
    #: Fallback hops admission took to reach ``deployment``'s group.
    fallbacks: int = 0
    #: The client's API when the call was translated into ``api`` (None: not
    #: translated), and whether that client asked for a stream's usage chunk.
    client_api: Api | None = None
    client_usage: bool = False

    @property
    def priced_by(self) -> str:
        return self.served or self.deployment

    @classmethod
    def new(
        cls,
        *,
        rid: str,
        api: Api,
        endpoint: str,
        dep: CompiledDeployment,
        stream: bool,
        strip_usage: bool,
        estimate: int,
        refs: Sequence[BudgetRef],
        now: datetime,
        tpm_key: str | None = None,
        prompt_tokens: int = 0,
        max_output_tokens: int = 0,
        usage_cap: int = 0,
        watch: Sequence[BudgetRef] = (),
        failover: bool = False,
        fallbacks: int = 0,
        client_api: Api | None = None,
        client_usage: bool = False,
    ) -> Charge:
        """A charge held under reservation id ``rid`` (rule: the caller draws the id;
        the core makes none)."""
        return cls(
            rid=rid,
            api=api,
            endpoint=endpoint,
            group=dep.group,
            deployment=dep.id,
            stream=stream,
            strip_usage=strip_usage,
            estimate=estimate,
            keys=tuple(ref.store_key for ref in refs),
            ttls=tuple(_period_ttl(ref, now) for ref in refs),
            tpm_key=tpm_key,
            started=now.timestamp(),
            prompt_tokens=prompt_tokens,
            max_output_tokens=max_output_tokens,
            usage_cap=usage_cap,
            watch=tuple(watch),
            failover=failover,
            fallbacks=fallbacks,
            client_api=client_api,
            client_usage=client_usage,
        )

    def bounded(self, usage: Usage | None) -> tuple[Usage | None, bool]:
        """``usage`` with every count at most :attr:`usage_cap`, and whether one was
        larger (a broken or hostile upstream; 0: no cap known)."""
        if usage is None or self.usage_cap <= 0:
            return usage, False
        cap = self.usage_cap
        counts = {f.name: getattr(usage, f.name) for f in dataclasses.fields(usage)}
        if all(value <= cap for value in counts.values()):
            return usage, False
        return Usage(**{name: min(value, cap) for name, value in counts.items()}), True

    def cost(self, usage: Usage | None, dep: CompiledDeployment | None) -> int:
        """Micro-dollars to charge: the usage at the deployment's prices; the
        estimate when the response reported no usage (never free)."""
        if usage is None:
            return self.estimate
        if dep is None or dep.prices is None:
            return 0
        return cost_micros(dep.prices, usage)

    def token(self) -> str:
        """Compact JSON for Envoy's dynamic metadata (ext_authz → response filter):
        the field values in declaration order."""
        values = [
            [_ref_token(ref) for ref in self.watch] if f.name == "watch" else getattr(self, f.name)
            for f in _FIELDS
        ]
        # Rule: trailing fields added since an older release are left out while they
        # hold their defaults, so a process not yet upgraded still reads the token
        names = [f.name for f in _FIELDS]
        while len(values) > _SHORTEST and values[-1] == _ADDED_DEFAULTS[names[len(values) - 1]]:
            values.pop()
        return json.dumps(values, separators=(",", ":"))

    @classmethod
    def parse(cls, text: str) -> Charge | None:
        """A charge from :meth:`token`; None for anything malformed or foreign."""
        try:
            raw: Any = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(raw, list) or not _SHORTEST <= len(raw) <= len(_FIELDS):
            return None
        # Rule: a token of the previous release (made by a process not yet upgraded)
        # lacks the trailing fields added since; they take their defaults
        v = {**_ADDED_DEFAULTS, **dict(zip((f.name for f in _FIELDS), raw, strict=False))}
        keys, ttls, tpm = v["keys"], v["ttls"], v["tpm_key"]
        ok = (
            isinstance(v["rid"], str)
            and len(v["rid"]) == 32
            and v["api"] in ("openai", "anthropic")
            and all(isinstance(v[n], str) for n in ("endpoint", "group", "deployment"))
            and isinstance(v["stream"], bool)
            and isinstance(v["strip_usage"], bool)
            and all(
                isinstance(v[n], int) and not isinstance(v[n], bool)
                for n in ("estimate", "prompt_tokens", "max_output_tokens", "usage_cap")
            )
            and v["usage_cap"] >= 0
            and isinstance(keys, list)
            and isinstance(ttls, list)
            and len(keys) == len(ttls)
            and all(isinstance(k, str) and is_spend_key(k) for k in keys)
            and all(t is None or isinstance(t, int | float) for t in ttls)
            and (tpm is None or (isinstance(tpm, str) and is_tpm_key(tpm)))
            and isinstance(v["started"], int | float)
            and (v["served"] is None or isinstance(v["served"], str))
            and isinstance(v["failover"], bool)
            and isinstance(v["fallbacks"], int)
            and not isinstance(v["fallbacks"], bool)
            and 0 <= v["fallbacks"] <= 64
            and v["client_api"] in (None, "openai", "anthropic")
            and isinstance(v["client_usage"], bool)
        )
        watch = v["watch"]
        if not ok or not isinstance(watch, list) or len(watch) > len(keys):
            return None
        refs: list[BudgetRef] = []
        for item in watch:
            ref = _ref_from_token(item)
            if ref is None or ref.store_key not in keys:
                return None
            refs.append(ref)
        fields = {
            **v,
            "keys": tuple(keys),
            "ttls": tuple(ttls),
            "started": float(v["started"]),
            "watch": tuple(refs),
        }
        return cls(**fields)


_FIELDS = dataclasses.fields(Charge)
#: The trailing fields added since the previous release, with their defaults: a
#: rolling upgrade settles the charges the old processes admitted.
_ADDED_DEFAULTS: dict[str, Any] = {"fallbacks": 0, "client_api": None, "client_usage": False}
_SHORTEST = len(_FIELDS) - len(_ADDED_DEFAULTS)
