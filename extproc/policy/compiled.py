"""The compiled policy: a validated :class:`~extproc.policy.schema.Policy` with its
credentials resolved to headers and its lookups indexed, which request handling reads
without further checks.

Rule: compiling reads credentials (an environment variable or a file) and nothing else;
the snapshot it returns is immutable.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Literal
from zoneinfo import ZoneInfo

from extproc.core.access import (
    Directory,
    GeneralSettings,
)
from extproc.core.budgets import EndUser, GlobalBudget, TagBudget
from extproc.core.endpoints import Requirement
from extproc.core.failover import (
    FailoverRoute,
    deployment_cluster_name,
    failover_plan,
)
from extproc.core.health import ERROR_CLASSES, NO_LIMITS, FailLimits
from extproc.core.pricing import (
    Prices,
    bundled_context_window,
    bundled_max_output_tokens,
    bundled_prices,
)
from extproc.core.providers import auth_header_for
from extproc.core.redaction import Redactor
from extproc.core.upstreams import ApiBase, upstream_path
from extproc.core.windows import zone
from extproc.policy.schema import (
    AllowedFailsPolicy,
    CredentialRef,
    Policy,
    PolicyError,
    ProviderBudget,
)

__all__ = ["CompiledDeployment", "CompiledGroup", "CompiledPolicy", "compile_policy"]


@dataclass(frozen=True, slots=True)
class CompiledDeployment:
    """A deployment ready to route to: credential resolved to a header."""

    id: str
    group: str
    provider: str
    cluster: str
    model: str
    weight: float | None
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
    #: The deployment's own allowed fails (decide before the group's).
    fails: FailLimits = NO_LIMITS
    #: Whether the upstream serves OpenAI's Responses API.
    responses_api: bool = False
    #: Where the provider is, when the policy says (``api_base``); Azure's api-version.
    api_base: ApiBase | None = None
    api_version: str | None = None

    @property
    def body_model(self) -> str:
        """The model name the upstream's body gets (Azure's deployment name without a
        LiteLLM-style ``azure/`` prefix)."""
        return self.model.removeprefix("azure/") if self.provider == "azure" else self.model

    def path_for(self, path: str) -> str:
        """The upstream path of a call to ``path`` (see extproc.core.upstreams)."""
        return upstream_path(self.api_base, self.provider, self.model, self.api_version, path)

    @property
    def api(self) -> Literal["openai", "anthropic"]:
        """The API the upstream speaks: Anthropic's Messages for ``anthropic``, else
        OpenAI's (every other provider the gateway knows speaks OpenAI's protocol)."""
        return "anthropic" if self.provider == "anthropic" else "openai"

    def serves(self, requirement: Requirement) -> bool:
        """Whether this deployment offers what an endpoint requires (its ``requires``)."""
        if requirement == "anthropic":
            return self.api == "anthropic"
        if requirement == "responses":
            return self.responses_api
        return True


#: Providers whose upstreams serve the Responses API unless the policy says otherwise.
RESPONSES_PROVIDERS = frozenset({"openai", "azure"})


@dataclass(frozen=True, slots=True)
class CompiledGroup:
    name: str
    deployments: tuple[CompiledDeployment, ...]
    #: Running sums of the weights, for weighted picks by bisection.
    cumulative_weights: tuple[float, ...]
    max_iterations: int | None = None
    strategy: str = "simple-shuffle"
    #: The group's allowed fails, else router_settings'.
    fails: FailLimits = NO_LIMITS
    cooldown_time: float = 5.0
    #: Fallback groups exist (a lone deployment with them is not exempt from cooldowns).
    has_fallbacks: bool = False
    lowest_latency_buffer: float = 0.0
    context_window_fallbacks: tuple[str, ...] = ()
    #: Groups a call goes to when none of this group's deployments can take it: the
    #: group's ``fallbacks``, else ``router_settings.default_fallbacks`` (itself left out).
    fallbacks: tuple[str, ...] = ()

    @property
    def minute_limited(self) -> bool:
        """Some deployment has an rpm or tpm: its minute's use is counted and read
        whatever the strategy (usage-based routing counts every deployment's)."""
        return self.strategy == "usage-based-routing" or any(
            d.rpm is not None or d.tpm is not None for d in self.deployments
        )

    @property
    def zero_cost(self) -> bool:
        """Every deployment is priced at zero: budget checks are skipped (LiteLLM)."""
        return all(d.prices is not None and d.prices.is_zero for d in self.deployments)

    def serving(
        self, requirement: Requirement, apis: frozenset[str] = frozenset({"openai", "anthropic"})
    ) -> CompiledGroup:
        """This group with only the deployments that offer ``requirement`` and speak
        one of ``apis`` (itself when all do)."""
        kept = tuple(d for d in self.deployments if d.serves(requirement) and d.api in apis)
        if len(kept) == len(self.deployments):
            return self
        return dataclasses.replace(
            self,
            deployments=kept,
            cumulative_weights=tuple(itertools.accumulate(d.weight or 0.0 for d in kept)),
        )

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
    #: How many fallback hops a call that no group's deployment can take may make.
    max_fallbacks: int = 5
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
            for dep_id, _ in route.deployments()
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


def _fail_limits(allowed_fails: int | None, policy: AllowedFailsPolicy | None) -> FailLimits:
    if allowed_fails is None and policy is None:
        return NO_LIMITS
    classes = None
    if policy is not None:
        given = policy.model_dump(exclude_none=True)
        classes = MappingProxyType({ERROR_CLASSES[k]: v for k, v in given.items()})
    return FailLimits(allowed_fails, classes)


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
    router = policy.router_settings
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
                    fails=_fail_limits(dep.allowed_fails, dep.allowed_fails_policy),
                    responses_api=(
                        dep.responses_api
                        if dep.responses_api is not None
                        else dep.provider in RESPONSES_PROVIDERS
                    ),
                    api_base=dep.upstream,
                    api_version=dep.api_version,
                )
            )
        weights = tuple(itertools.accumulate(d.weight or 0.0 for d in compiled))
        fallbacks = group.fallbacks or tuple(n for n in router.default_fallbacks if n != group.name)
        groups[group.name] = CompiledGroup(
            group.name,
            tuple(compiled),
            weights,
            group.max_iterations,
            strategy=group.routing_strategy.removesuffix("-v2"),
            fails=_fail_limits(
                group.allowed_fails if group.allowed_fails is not None else router.allowed_fails,
                group.allowed_fails_policy or router.allowed_fails_policy,
            ),
            has_fallbacks=bool(fallbacks),
            fallbacks=fallbacks,
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
        max_fallbacks=policy.router_settings.max_fallbacks,
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
            cumulative_weights=tuple(itertools.accumulate(d.weight or 0.0 for d in large)),
            context_window_fallbacks=(),
        )
        if not group.context_window_fallbacks:
            groups[group.name] = dataclasses.replace(group, context_window_fallbacks=(name,))
