"""The policy file's schema: what the gateway enforces, as frozen pydantic models.

The YAML is validated with ``extra="forbid"`` so a misspelled key is an error, not a
silently ignored setting, and every error names its path in the file
(``model_groups[1].deployments[0].cluster: ...``). A validated :class:`Policy` is
compiled once (``extproc.policy.compiled``) into what request handling reads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from extproc.core.access import (
    Agent,
    GeneralSettings,
    Organization,
    Project,
    Team,
    User,
    VirtualKey,
)
from extproc.core.budgets import EndUser, TagBudget
from extproc.core.failover import (
    MAX_RETRIES,
    AttemptTimeouts,
    FailoverGroup,
)
from extproc.core.pricing import (
    Prices,
)
from extproc.core.upstreams import ApiBase, check_api_version, parse_api_base
from extproc.core.windows import DurationText

__all__ = [
    "AllowedFailsPolicy",
    "CredentialRef",
    "Deployment",
    "ModelGroup",
    "Policy",
    "PolicyError",
    "ProviderBudget",
    "RouterSettings",
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


class AllowedFailsPolicy(_Model):
    """Allowed fails per error class (LiteLLM's ``allowed_fails_policy``, same names)."""

    BadRequestErrorAllowedFails: int | None = Field(default=None, ge=0)
    AuthenticationErrorAllowedFails: int | None = Field(default=None, ge=0)
    TimeoutErrorAllowedFails: int | None = Field(default=None, ge=0)
    RateLimitErrorAllowedFails: int | None = Field(default=None, ge=0)
    ContentPolicyViolationErrorAllowedFails: int | None = Field(default=None, ge=0)
    InternalServerErrorAllowedFails: int | None = Field(default=None, ge=0)
    ServiceUnavailableErrorAllowedFails: int | None = Field(default=None, ge=0)
    BadGatewayErrorAllowedFails: int | None = Field(default=None, ge=0)
    NotFoundErrorAllowedFails: int | None = Field(default=None, ge=0)


class Deployment(_Model):
    """One upstream that can serve a model group: an Envoy cluster plus a model name."""

    id: str
    provider: str = "openai"
    #: The Envoy cluster; with ``api_base`` the gateway makes it (and names it, when
    #: this is left out).
    cluster: str
    #: Where the provider is (LiteLLM's ``api_base``): see extproc.core.upstreams.
    api_base: str | None = None
    #: Azure OpenAI's ``api-version`` (LiteLLM's ``api_version``).
    api_version: str | None = None
    #: The model name the upstream expects; the body's ``model`` is rewritten to it.
    model: str = Field(min_length=1, max_length=256)
    credential: CredentialRef | None = None
    #: LiteLLM's litellm_params.weight: when any deployment of a group has one, one
    #: without gets none of the traffic.
    weight: float | None = Field(default=None, ge=0)
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
    #: Seconds an attempt may wait for its answer before the call fails over
    #: (LiteLLM's ``timeout``); ``stream_timeout`` for streams. Else the group's.
    timeout: float | None = Field(default=None, gt=0)
    stream_timeout: float | None = Field(default=None, gt=0)
    #: This deployment's own failure allowance (LiteLLM's model_info fields); when
    #: either is set it decides before the group's (see extproc.core.health).
    allowed_fails: int | None = Field(default=None, ge=0)
    allowed_fails_policy: AllowedFailsPolicy | None = None
    #: Whether the upstream serves OpenAI's Responses API (``/v1/responses``); unset:
    #: OpenAI and Azure OpenAI do, other OpenAI-compatible hosts only chat completions.
    responses_api: bool | None = None

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

    @model_validator(mode="before")
    @classmethod
    def _cluster_from_api_base(cls, data: Any) -> Any:
        """A deployment with ``api_base`` and no ``cluster`` gets the gateway's."""
        if isinstance(data, dict) and data.get("cluster") is None:
            base = data.get("api_base")
            if isinstance(base, str):
                return {**data, "cluster": parse_api_base(base).cluster}
        return data

    @field_validator("api_base")
    @classmethod
    def _check_api_base(cls, value: str | None) -> str | None:
        if value is not None:
            parse_api_base(value)
        return value

    @field_validator("api_version")
    @classmethod
    def _check_api_version(cls, value: str | None) -> str | None:
        return check_api_version(value) if value is not None else None

    @property
    def upstream(self) -> ApiBase | None:
        """The parsed ``api_base``."""
        return parse_api_base(self.api_base) if self.api_base is not None else None

    @model_validator(mode="after")
    def _azure_needs_a_version(self) -> Deployment:
        """Azure's deployment paths take an ``api-version``; its v1 API (an api_base
        ending in /openai/v1) does not."""
        base = self.upstream
        if (
            self.provider == "azure"
            and base is not None
            and not base.path.endswith("/v1")
            and self.api_version is None
        ):
            raise ValueError(
                "an Azure OpenAI deployment with an api_base needs api_version (e.g. "
                '"2024-10-21"), unless its api_base is Azure\'s v1 API (.../openai/v1)'
            )
        return self


class RouterSettings(_Model):
    """Router-wide settings (LiteLLM's ``router_settings``)."""

    #: Fallback groups for every group that names none of its own.
    default_fallbacks: tuple[str, ...] = ()
    #: How deep fallbacks go when a group cannot serve (LiteLLM's ``max_fallbacks``).
    max_fallbacks: int = Field(default=5, ge=0, le=64)
    #: Attempt timeouts for groups and deployments that set none (LiteLLM's).
    timeout: float | None = Field(default=None, gt=0)
    stream_timeout: float | None = Field(default=None, gt=0)
    #: For groups that set neither: failures per minute before a cooldown, and per
    #: error class. Unset, LiteLLM's failure-rate rule applies instead.
    allowed_fails: int | None = Field(default=None, ge=0)
    allowed_fails_policy: AllowedFailsPolicy | None = None


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
    #: Failures a deployment may have in a minute before it cools down, and per error
    #: class; else router_settings'. Neither set: LiteLLM's failure-rate rule.
    allowed_fails: int | None = Field(default=None, ge=0)
    allowed_fails_policy: AllowedFailsPolicy | None = None
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
    #: Attempt timeouts for deployments that set none, else router_settings'.
    timeout: float | None = Field(default=None, gt=0)
    stream_timeout: float | None = Field(default=None, gt=0)

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
                g.context_window_fallbacks,
                timeouts=[
                    AttemptTimeouts(
                        d.timeout or g.timeout or self.router_settings.timeout,
                        d.stream_timeout or g.stream_timeout or self.router_settings.stream_timeout,
                    )
                    for d in g.deployments
                ],
            )
            for g in self.model_groups
        ]

    @model_validator(mode="after")
    def _clusters_agree(self) -> Policy:
        """Deployments that share a cluster agree on where it is: the same
        ``api_base`` scheme, host and port, or none at all."""
        where: dict[str, tuple[str, str, int] | None] = {}
        for group in self.model_groups:
            for dep in group.deployments:
                base = dep.upstream
                address = (base.scheme, base.host, base.port) if base is not None else None
                if where.setdefault(dep.cluster, address) != address:
                    raise ValueError(
                        f"deployment {dep.id!r}: cluster {dep.cluster!r} is also used by "
                        "a deployment with another api_base (or none)"
                    )
        return self

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
