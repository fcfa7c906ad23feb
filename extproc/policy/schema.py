"""The policy file: what the gateway enforces, as frozen pydantic models.

The YAML is validated with ``extra="forbid"`` so a misspelled key is an error, not a
silently ignored setting, and every error names its path in the file
(``model_groups[1].deployments[0].cluster: ...``). A validated :class:`Policy` is
compiled once into a :class:`CompiledPolicy` (credentials resolved, lookups indexed)
that request handling reads without further checks.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from extproc.core.access import (
    Agent,
    Directory,
    GeneralSettings,
    Organization,
    Project,
    Team,
    User,
    VirtualKey,
)
from extproc.core.budgets import EndUser, GlobalBudget, TagBudget
from extproc.core.failover import (
    MAX_RETRIES,
    FailoverGroup,
    FailoverRoute,
    deployment_cluster_name,
    failover_plan,
)
from extproc.core.pricing import (
    Prices,
    bundled_context_window,
    bundled_max_output_tokens,
    bundled_prices,
)
from extproc.core.providers import auth_header_for
from extproc.core.redaction import Redactor
from extproc.core.windows import DurationText, zone

__all__ = [
    "CompiledDeployment",
    "CompiledGroup",
    "CompiledPolicy",
    "CredentialRef",
    "Deployment",
    "ModelGroup",
    "Policy",
    "PolicyError",
    "compile_policy",
    "load_policy",
    "parse_policy",
]

_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
_PROVIDER_NAME = re.compile(r"^[a-z0-9_\-]{1,64}$")
_ID = re.compile(r"^[A-Za-z0-9_.:/\-]{1,128}$")


class PolicyError(Exception):
    """The policy file is invalid; ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: Sequence[str]) -> None:
        self.source = source
        self.errors = list(errors)
        super().__init__(f"{source}: " + "; ".join(self.errors))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CredentialRef(_Model):
    """Where a deployment's upstream credential comes from: exactly one source."""

    env: str | None = Field(default=None, min_length=1)
    file: Path | None = None
    #: Inline secret; refused unless the process allows inline credentials.
    value: str | None = Field(default=None, min_length=1, repr=False)

    @model_validator(mode="after")
    def _exactly_one(self) -> CredentialRef:
        given = [n for n in ("env", "file", "value") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of env, file or value")
        return self


class ProviderBudget(_Model):
    """A provider's budget (LiteLLM's ``provider_budget_config`` entry).

    ``budget_limit`` missing or null: no limit (spend is still counted and read out).
    ``time_period`` missing or null: no window, a lifetime budget (LiteLLM's default
    is None too, but its limiter then never counts spend, so the limit never refuses).
    ``max_budget`` / ``budget_duration`` are accepted for them, as LiteLLM's
    ``BudgetConfig`` does.
    """

    budget_limit: Decimal | None = Field(
        default=None, ge=0, validation_alias=AliasChoices("budget_limit", "max_budget")
    )
    time_period: DurationText | None = Field(
        default=None, validation_alias=AliasChoices("time_period", "budget_duration")
    )

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, alias in (("budget_limit", "max_budget"), ("time_period", "budget_duration")):
                if name in data and alias in data:
                    raise ValueError(f"give {name} or its alias {alias}, not both")
        return data


class Deployment(_Model):
    """One upstream that can serve a model group: an Envoy cluster plus a model name."""

    id: str
    provider: str = "openai"
    cluster: str
    #: The model name the upstream expects; the body's ``model`` is rewritten to it.
    model: str = Field(min_length=1, max_length=256)
    credential: CredentialRef | None = None
    weight: float = Field(default=1.0, gt=0)
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    context_window: int | None = Field(default=None, gt=0)
    #: The most output tokens one choice can have (requests asking for more are
    #: reserved at this); the bundled table's ``max_output_tokens`` when unset.
    max_output_tokens: int | None = Field(default=None, gt=0)
    #: Dollars per token; the bundled price table's entry for ``model`` when unset.
    prices: Prices | None = None
    #: A budget of this deployment (LiteLLM's litellm_params max_budget/budget_duration).
    max_budget: Decimal | None = Field(default=None, ge=0)
    budget_duration: DurationText | None = None
    #: Priority for the ``priority`` strategy: lower goes first (LiteLLM's ``order``).
    order: int | None = Field(default=None, ge=0)
    #: Seconds this deployment cools down after failing (0: never); else the group's.
    cooldown_time: float | None = Field(default=None, ge=0)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("ids use letters, digits and _ . : / - (at most 128)")
        return value

    @field_validator("provider")
    @classmethod
    def _check_provider(cls, value: str) -> str:
        if not _PROVIDER_NAME.match(value):
            raise ValueError("provider names use lowercase letters, digits, _ and -")
        return value

    @field_validator("cluster")
    @classmethod
    def _check_cluster(cls, value: str) -> str:
        if not _CLUSTER_NAME.match(value):
            raise ValueError("Envoy cluster names here use letters, digits and _ . -")
        return value


class RouterSettings(_Model):
    """Router-wide settings (LiteLLM's ``router_settings``)."""

    #: Fallback groups for every group that names none of its own.
    default_fallbacks: tuple[str, ...] = ()


RoutingStrategy = Literal[
    "simple-shuffle",
    "least-busy",
    "usage-based-routing",
    "usage-based-routing-v2",
    "latency-based-routing",
    "cost-based-routing",
    "priority",
]


class ModelGroup(_Model):
    """A model name clients ask for, served by one of its deployments."""

    name: str = Field(min_length=1, max_length=256)
    deployments: tuple[Deployment, ...] = Field(min_length=1)
    #: Access groups this model group belongs to; keys and teams can list them.
    access_groups: tuple[str, ...] = ()
    #: Session cap for callers whose agent and key set none.
    max_iterations: int | None = Field(default=None, ge=1)
    routing_strategy: RoutingStrategy = "simple-shuffle"
    #: Failures a deployment may have in a minute before it cools down (LiteLLM: 3).
    allowed_fails: int = Field(default=3, ge=0)
    #: Seconds a failing deployment is skipped (LiteLLM's default 5).
    cooldown_time: float = Field(default=5.0, ge=0)
    #: latency-based: deployments within this share of the fastest count as fastest.
    lowest_latency_buffer: float = Field(default=0.0, ge=0)
    #: Groups tried when every deployment's context window is too small for the call.
    context_window_fallbacks: tuple[str, ...] = ()
    #: In-request failover: retries on the group's other deployments, then these groups
    #: (Envoy retries; see extproc.core.failover). 0 and no fallbacks: no failover.
    num_retries: int = Field(default=0, ge=0, le=MAX_RETRIES)
    fallbacks: tuple[str, ...] = ()
    #: Groups a content-policy refusal is retried on, in the same request.
    content_policy_fallbacks: tuple[str, ...] = ()

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not value.isprintable() or value != value.strip():
            raise ValueError("model group names are printable, without surrounding spaces")
        return value


class Policy(_Model):
    """The whole policy file."""

    model_groups: tuple[ModelGroup, ...] = Field(min_length=1)
    #: Virtual keys; when there are any, every LLM request must present one.
    keys: tuple[VirtualKey, ...] = ()
    teams: tuple[Team, ...] = ()
    agents: tuple[Agent, ...] = ()
    users: tuple[User, ...] = ()
    orgs: tuple[Organization, ...] = ()
    projects: tuple[Project, ...] = ()
    end_users: tuple[EndUser, ...] = ()
    tags: tuple[TagBudget, ...] = ()
    general_settings: GeneralSettings = GeneralSettings()
    #: Provider budgets, by provider name (LiteLLM's ``provider_budget_config``).
    provider_budgets: dict[str, ProviderBudget] = Field(default_factory=dict)
    router_settings: RouterSettings = RouterSettings()

    def failover_groups(self) -> list[FailoverGroup]:
        return [
            FailoverGroup(
                g.name,
                [(d.id, d.cluster) for d in g.deployments],
                g.num_retries,
                g.fallbacks,
                g.content_policy_fallbacks,
            )
            for g in self.model_groups
        ]

    @model_validator(mode="after")
    def _references(self) -> Policy:
        groups = {g.name for g in self.model_groups}
        team_ids: set[str] = set()
        for team in self.teams:
            if team.id in team_ids:
                raise ValueError(f"team {team.id!r} is defined twice")
            team_ids.add(team.id)
            for alias, target in team.model_aliases.items():
                if target not in groups:
                    raise ValueError(
                        f"team {team.id!r} aliases {alias!r} to unknown model group {target!r}"
                    )
        ids: dict[str, set[str]] = {}
        for kind, objects in (
            ("agent", self.agents),
            ("user", self.users),
            ("org", self.orgs),
            ("project", self.projects),
        ):
            ids[kind] = {o.id for o in objects}
            if len(ids[kind]) != len(objects):
                raise ValueError(f"{kind} ids must be unique")
        for team in self.teams:
            if team.org is not None and team.org not in ids["org"]:
                raise ValueError(f"team {team.id!r} names unknown org {team.org!r}")
        hashes: set[str] = set()
        for key in self.keys:
            for kind in ("agent", "user", "org", "project"):
                ref = getattr(key, kind)
                if ref is not None and ref not in ids[kind]:
                    raise ValueError(f"key {key.label} names unknown {kind} {ref!r}")
            if key.hash in hashes:
                raise ValueError(f"key hash {key.hash[:8]}... is listed twice")
            hashes.add(key.hash)
            if key.team is not None and key.team not in team_ids:
                raise ValueError(f"key {key.label} names unknown team {key.team!r}")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Policy:
        seen_groups: set[str] = set()
        seen_ids: set[str] = set()
        for group in self.model_groups:
            if group.name in seen_groups:
                raise ValueError(f"model group {group.name!r} is defined twice")
            seen_groups.add(group.name)
        for name in self.router_settings.default_fallbacks:
            if name not in seen_groups:
                raise ValueError(f"default_fallbacks names unknown group {name!r}")
        for group in self.model_groups:
            for fallback in (
                *group.context_window_fallbacks,
                *group.fallbacks,
                *group.content_policy_fallbacks,
            ):
                if fallback not in seen_groups or fallback == group.name:
                    raise ValueError(
                        f"model group {group.name!r} falls back to unknown group {fallback!r}"
                    )
            for dep in group.deployments:
                if dep.id in seen_ids:
                    raise ValueError(f"deployment id {dep.id!r} is used twice")
                seen_ids.add(dep.id)
        return self


# --- compiled form -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledDeployment:
    """A deployment ready to route to: credential resolved to a header."""

    id: str
    group: str
    provider: str
    cluster: str
    model: str
    weight: float
    auth_header: str
    #: The full header value (``Bearer sk-...``); never logged.
    auth_value: str | None = field(repr=False)
    rpm: int | None = None
    tpm: int | None = None
    context_window: int | None = None
    #: The policy's, else the bundled table's; None when neither knows it.
    max_output_tokens: int | None = None
    #: The policy's prices, else the bundled table's; None when neither knows it.
    prices: Prices | None = None
    max_budget: Decimal | None = None
    budget_duration: str | None = None
    order: int | None = None
    cooldown_time: float | None = None


@dataclass(frozen=True, slots=True)
class CompiledGroup:
    name: str
    deployments: tuple[CompiledDeployment, ...]
    #: Running sums of the weights, for weighted picks by bisection.
    cumulative_weights: tuple[float, ...]
    max_iterations: int | None = None
    strategy: str = "simple-shuffle"
    allowed_fails: int = 3
    cooldown_time: float = 5.0
    lowest_latency_buffer: float = 0.0
    context_window_fallbacks: tuple[str, ...] = ()

    @property
    def zero_cost(self) -> bool:
        """Every deployment is priced at zero: budget checks are skipped (LiteLLM)."""
        return all(d.prices is not None and d.prices.is_zero for d in self.deployments)

    def pick_weighted(self, u: float) -> CompiledDeployment:
        """The deployment at ``u`` in [0, 1) of the weight line."""
        total = self.cumulative_weights[-1]
        index = bisect.bisect_right(self.cumulative_weights, u * total)
        return self.deployments[min(index, len(self.deployments) - 1)]


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """The runtime snapshot a request reads: swapped whole on reload."""

    groups: Mapping[str, CompiledGroup]
    source: str = "<memory>"
    #: Keys and the objects they name; no keys means no caller is authenticated.
    directory: Directory = field(default_factory=Directory)
    general: GeneralSettings = field(default_factory=GeneralSettings)
    end_users: Mapping[str, EndUser] = field(default_factory=dict)
    tag_budgets: Mapping[str, TagBudget] = field(default_factory=dict)
    #: Access group name → model group names in it.
    access_groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    provider_budgets: Mapping[str, ProviderBudget] = field(default_factory=dict)
    #: Deployment id → its composite cluster and attempts (in-request failover).
    failover: Mapping[str, FailoverRoute] = field(default_factory=dict)
    # Indexes built once per snapshot for the per-request lookups below.
    _by_id: Mapping[str, CompiledDeployment] = field(init=False, repr=False)
    _by_composite: Mapping[str, FailoverRoute] = field(init=False, repr=False)
    _by_attempt_cluster: Mapping[str, str] = field(init=False, repr=False)
    _budgeted: frozenset[str] = field(init=False, repr=False)
    #: Every deployment credential, to take out of what upstreams send back.
    redactor: Redactor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by_id = {d.id: d for g in self.groups.values() for d in g.deployments}
        secrets = (
            d.auth_value.removeprefix(auth_header_for(d.provider)[1])
            for d in by_id.values()
            if d.auth_value is not None
        )
        object.__setattr__(self, "redactor", Redactor(secrets))
        budgeted = frozenset(
            g.name
            for g in self.groups.values()
            if any(
                d.max_budget is not None or d.provider in self.provider_budgets
                for d in g.deployments
            )
        )
        attempt_clusters = {
            deployment_cluster_name(dep_id): dep_id
            for route in self.failover.values()
            for dep_id, _ in route.attempts
        }
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_by_composite", {r.composite: r for r in self.failover.values()})
        object.__setattr__(self, "_by_attempt_cluster", attempt_clusters)
        object.__setattr__(self, "_budgeted", budgeted)

    def has_deployment_budgets(self, group: CompiledGroup) -> bool:
        """Whether the budget filter has provider or deployment budgets to read."""
        return group.name in self._budgeted and not group.zero_cost

    def failover_route(self, composite: str | None) -> FailoverRoute | None:
        return self._by_composite.get(composite) if composite else None

    def attempt_deployment(self, cluster: str) -> str | None:
        """The deployment of a failover plan's per-deployment cluster."""
        return self._by_attempt_cluster.get(cluster)

    @property
    def global_budget(self) -> GlobalBudget:
        general = self.general
        return GlobalBudget(
            general.max_budget,
            general.budget_duration,
            general.default_end_user_max_budget,
            general.default_end_user_budget_duration,
        )

    @property
    def budget_zone(self) -> ZoneInfo:
        return zone(self.general.budget_reset_timezone)

    @property
    def auth_required(self) -> bool:
        return bool(self.directory.keys)

    @property
    def clusters(self) -> frozenset[str]:
        return frozenset(d.cluster for g in self.groups.values() for d in g.deployments)

    def deployments(self) -> list[CompiledDeployment]:
        """Every deployment once (``-large`` groups reuse their group's)."""
        return list(self._by_id.values())

    def deployment(self, dep_id: str) -> CompiledDeployment | None:
        return self._by_id.get(dep_id)


def _format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "<root>"


def parse_policy(data: Any, source: str = "<memory>") -> Policy:
    """Validate parsed YAML into a :class:`Policy`, with path-named errors."""
    if not isinstance(data, dict):
        raise PolicyError(source, ["<root>: the policy must be a YAML mapping"])
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            lines.append(f"{_format_loc(loc)}: {err['msg']}")
        raise PolicyError(source, lines) from None


def _resolve_credential(
    ref: CredentialRef,
    where: str,
    base_dir: Path,
    env: Mapping[str, str],
    allow_inline: bool,
) -> str:
    if ref.env is not None:
        secret = env.get(ref.env)
        if not secret:
            raise PolicyError("", [f"{where}.env: environment variable {ref.env} is not set"])
        return secret
    if ref.file is not None:
        path = ref.file if ref.file.is_absolute() else base_dir / ref.file
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError("", [f"{where}.file: cannot read {path}: {exc}"]) from None
        if not secret:
            raise PolicyError("", [f"{where}.file: {path} is empty"])
        return secret
    if not allow_inline:
        raise PolicyError(
            "",
            [f"{where}.value: inline credentials are off (EXTPROC_ALLOW_INLINE_CREDENTIALS)"],
        )
    assert ref.value is not None
    return ref.value


def compile_policy(
    policy: Policy,
    *,
    source: str = "<memory>",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    allow_inline_credentials: bool = False,
) -> CompiledPolicy:
    """Resolve credentials and index the policy for request handling."""
    environ = os.environ if env is None else env
    base = base_dir or Path.cwd()
    errors: list[str] = []
    groups: dict[str, CompiledGroup] = {}
    for gi, group in enumerate(policy.model_groups):
        compiled: list[CompiledDeployment] = []
        for di, dep in enumerate(group.deployments):
            where = f"model_groups[{gi}].deployments[{di}].credential"
            header, prefix = auth_header_for(dep.provider)
            value: str | None = None
            if dep.credential is not None:
                try:
                    secret = _resolve_credential(
                        dep.credential, where, base, environ, allow_inline_credentials
                    )
                except PolicyError as exc:
                    errors.extend(exc.errors)
                    continue
                if not (secret.isascii() and secret.isprintable()):
                    # Rule: a header value Envoy accepts; no line breaks to inject headers.
                    errors.append(f"{where}: the credential must be printable ASCII")
                    continue
                value = prefix + secret
            compiled.append(
                CompiledDeployment(
                    id=dep.id,
                    group=group.name,
                    provider=dep.provider,
                    cluster=dep.cluster,
                    model=dep.model,
                    weight=dep.weight,
                    auth_header=header,
                    auth_value=value,
                    rpm=dep.rpm,
                    tpm=dep.tpm,
                    context_window=dep.context_window or bundled_context_window(dep.model),
                    max_output_tokens=(
                        dep.max_output_tokens or bundled_max_output_tokens(dep.model)
                    ),
                    prices=dep.prices if dep.prices is not None else bundled_prices(dep.model),
                    max_budget=dep.max_budget,
                    budget_duration=dep.budget_duration,
                    order=dep.order,
                    cooldown_time=dep.cooldown_time,
                )
            )
        weights = tuple(itertools.accumulate(d.weight for d in compiled))
        groups[group.name] = CompiledGroup(
            group.name,
            tuple(compiled),
            weights,
            group.max_iterations,
            strategy=group.routing_strategy.removesuffix("-v2"),
            allowed_fails=group.allowed_fails,
            cooldown_time=group.cooldown_time,
            lowest_latency_buffer=group.lowest_latency_buffer,
            context_window_fallbacks=group.context_window_fallbacks,
        )
    if errors:
        raise PolicyError(source, errors)
    _add_large_groups(groups)
    members: dict[str, set[str]] = {}
    for group in policy.model_groups:
        for name in group.access_groups:
            members.setdefault(name, set()).add(group.name)
    return CompiledPolicy(
        groups=groups,
        source=source,
        directory=Directory(
            keys={k.hash: k for k in policy.keys},
            teams={t.id: t for t in policy.teams},
            agents={a.id: a for a in policy.agents},
            users={u.id: u for u in policy.users},
            orgs={o.id: o for o in policy.orgs},
            projects={p.id: p for p in policy.projects},
        ),
        general=policy.general_settings,
        end_users={e.id: e for e in policy.end_users},
        tag_budgets={t.name: t for t in policy.tags},
        access_groups={name: frozenset(m) for name, m in members.items()},
        provider_budgets=dict(policy.provider_budgets),
        failover=failover_plan(policy.failover_groups(), policy.router_settings.default_fallbacks),
    )


def _add_large_groups(groups: dict[str, CompiledGroup]) -> None:
    """The seed's ``auto-large``: for a group whose deployments' context windows
    differ, a ``<name>-large`` group of those larger than the smallest, which becomes
    the group's context-window fallback when it names none (unless the policy already
    has a group of that name)."""
    for group in list(groups.values()):
        windows = [d.context_window for d in group.deployments]
        if None in windows or len(set(windows)) < 2:
            continue
        smallest = min(w for w in windows if w is not None)
        large = tuple(d for d in group.deployments if (d.context_window or 0) > smallest)
        name = f"{group.name}-large"
        if name in groups:
            continue
        groups[name] = dataclasses.replace(
            group,
            name=name,
            deployments=large,
            cumulative_weights=tuple(itertools.accumulate(d.weight for d in large)),
            context_window_fallbacks=(),
        )
        if not group.context_window_fallbacks:
            groups[group.name] = dataclasses.replace(group, context_window_fallbacks=(name,))


def load_policy(
    path: Path,
    *,
    env: Mapping[str, str] | None = None,
    allow_inline_credentials: bool = False,
) -> CompiledPolicy:
    """Read, validate and compile a policy file."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(source, [f"cannot read the policy file: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(source, [f"not valid YAML: {exc}"]) from None
    policy = parse_policy(data, source)
    return compile_policy(
        policy,
        source=source,
        base_dir=path.parent,
        env=env,
        allow_inline_credentials=allow_inline_credentials,
    )
