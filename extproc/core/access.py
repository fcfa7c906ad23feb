"""Virtual keys and teams: who is calling, and which model groups they may use.

Keys live in the policy only as ``sha256(plaintext)`` hex digests (LiteLLM's scheme),
so the file holds no secret. Messages name a key by its alias or an 8-character hash
prefix, never by the key itself. The checks follow LiteLLM's order: the key
(missing, unknown, expired, blocked), its team (blocked), then model access for the
key and the team.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from extproc.core.endpoints import lookup_endpoint, lookup_models
from extproc.core.errors import AuthenticationError, BadRequestError, PermissionDeniedError
from extproc.core.tools import ServerTarget, pins_servers
from extproc.core.windows import DurationText, zone
from extproc.store.keys import tenant_tag

__all__ = [
    "TRACE_ID_HEADER",
    "Agent",
    "Caller",
    "Directory",
    "GeneralSettings",
    "KeyMetadata",
    "Organization",
    "Project",
    "Team",
    "TeamMember",
    "User",
    "VirtualKey",
    "authenticate",
    "check_model_access",
    "check_request_rules",
    "check_route",
    "hash_key",
    "request_tags",
    "resolve_model_alias",
]

#: The header LiteLLM reads a call's trace (chain) id from.
TRACE_ID_HEADER = "x-litellm-trace-id"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: Model-list entries that allow every model group (LiteLLM's spellings).
_ALL_MODELS = frozenset({"*", "all-proxy-models"})


#: Keys no longer than this are remembered hashed (LiteLLM's keys are about 50
#: characters); longer ones, which no caller needs, are hashed each time, so a client
#: sending large random tokens cannot fill the cache with them.
_CACHED_KEY_CHARS = 256


def hash_key(plaintext: str) -> str:
    """The policy's form of a key: lowercase hex sha256 of the UTF-8 plaintext."""
    if len(plaintext) > _CACHED_KEY_CHARS:
        return _hashed.__wrapped__(plaintext)
    return _hashed(plaintext)


@functools.lru_cache(maxsize=4096)
def _hashed(plaintext: str) -> str:
    """:func:`hash_key` of the keys seen last (a caller sends the same key each call)."""
    return hashlib.sha256(plaintext.encode("utf-8", "surrogatepass")).hexdigest()


class KeyMetadata(BaseModel):
    """Free-form key metadata; the named fields are the ones the gateway reads."""

    model_config = ConfigDict(extra="allow", frozen=True)

    tags: tuple[str, ...] = ()
    allowed_tools: tuple[str, ...] | None = None
    max_iterations: int | None = Field(default=None, ge=1)


class VirtualKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hash: str
    alias: str | None = Field(default=None, max_length=256)
    team: str | None = None
    user: str | None = None
    org: str | None = None
    project: str | None = None
    #: Model groups, wildcards (``*``, ``openai/*``) or access groups; empty = all.
    models: tuple[str, ...] = ()
    agent: str | None = None
    blocked: bool = False
    expires: AwareDatetime | None = None
    #: Dollars; spend at or above it is refused with a 429.
    max_budget: Decimal | None = Field(default=None, ge=0)
    #: Dollars; crossing it raises an alert (log + metric), never a refusal.
    soft_budget: Decimal | None = Field(default=None, ge=0)
    #: Budget window (``1d``, ``7d``, ``1mo``...), reset on calendar boundaries.
    budget_duration: DurationText | None = None
    #: Requests / tokens per one-minute window, shared by every server process.
    rpm_limit: int | None = Field(default=None, ge=0)
    tpm_limit: int | None = Field(default=None, ge=0)
    #: Requests of this key in flight at once, across every server process.
    max_parallel_requests: int | None = Field(default=None, ge=1)
    #: Paths this key may call (``*`` wildcards, ``llm_api_routes``); empty = all.
    allowed_routes: tuple[str, ...] = ()
    metadata: KeyMetadata = KeyMetadata()

    @field_validator("hash")
    @classmethod
    def _check_hash(cls, value: str) -> str:
        value = value.lower().removeprefix("sha256:")
        if not _HEX64.match(value):
            raise ValueError("a key hash is 64 hex characters (`extproc keys hash KEY`)")
        return value

    @property
    def label(self) -> str:
        """How messages and logs name this key: alias, else a hash prefix."""
        return self.alias or f"hash:{self.hash[:8]}"

    @property
    def tenant(self) -> tuple[str, ...]:
        """The hash tag of this key's state: its team's, else its own."""
        return tenant_tag(self.team, self.hash)


class TeamMember(BaseModel):
    """A user's budget within one team (spend through the team's keys they own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str = Field(min_length=1, max_length=128)
    max_budget: Decimal | None = Field(default=None, ge=0)
    budget_duration: DurationText | None = None


class Team(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128)
    blocked: bool = False
    models: tuple[str, ...] = ()
    #: Names the team's callers may use for a model group (alias → group).
    model_aliases: dict[str, str] = Field(default_factory=dict)
    org: str | None = None
    max_budget: Decimal | None = Field(default=None, ge=0)
    soft_budget: Decimal | None = Field(default=None, ge=0)
    budget_duration: DurationText | None = None
    #: Every member's budget within the team (LiteLLM's team_member_budget) ...
    member_max_budget: Decimal | None = Field(default=None, ge=0)
    member_budget_duration: DurationText | None = None
    #: ... unless the member has an entry of its own here.
    members: tuple[TeamMember, ...] = ()
    metadata: KeyMetadata = KeyMetadata()

    def member_budget(self, user: str) -> tuple[Decimal | None, str | None]:
        """The budget and window of ``user``'s spend within this team.

        LiteLLM's rules for a member's budget (``_resolve_member_budget_id``): an
        explicit ``max_budget`` on the member is a budget of its own, in the member's
        own ``budget_duration`` (none: lifetime); without one the team default
        applies (``member_max_budget``), in the member's ``budget_duration`` if set,
        else the default's window: ``member_budget_duration``, else the team's
        ``budget_duration`` (what LiteLLM gives a default member budget created
        without a duration).
        """
        entry = next((m for m in self.members if m.user == user), None)
        if entry is not None and entry.max_budget is not None:
            return entry.max_budget, entry.budget_duration
        window = self.member_budget_duration or self.budget_duration
        if entry is not None and entry.budget_duration is not None:
            window = entry.budget_duration
        return self.member_max_budget, window


class User(BaseModel):
    """An internal user; their model list applies to their personal (team-less) keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128)
    models: tuple[str, ...] = ()
    max_budget: Decimal | None = Field(default=None, ge=0)
    budget_duration: DurationText | None = None


class Organization(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128)
    models: tuple[str, ...] = ()
    max_budget: Decimal | None = Field(default=None, ge=0)
    budget_duration: DurationText | None = None


class Project(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128)
    blocked: bool = False
    models: tuple[str, ...] = ()
    max_budget: Decimal | None = Field(default=None, ge=0)
    budget_duration: DurationText | None = None


class Agent(BaseModel):
    """An agent identity that keys can belong to (LiteLLM's agent registry)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128)
    max_iterations: int | None = Field(default=None, ge=1)
    #: Calls with this agent's keys must carry the trace-id header.
    require_trace_id: bool = False


class GeneralSettings(BaseModel):
    """Gateway-wide rules (LiteLLM's general_settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: LLM calls must name their end user (``user``; ``metadata.user_id`` for Anthropic).
    enforce_user_param: bool = False
    #: Tags come from key metadata only; client-sent tags are a 400.
    reject_clientside_metadata_tags: bool = False
    #: Dollars the whole gateway may spend.
    max_budget: Decimal | None = Field(default=None, ge=0)
    budget_duration: DurationText | None = None
    #: Budget for end users that have no entry of their own.
    default_end_user_max_budget: Decimal | None = Field(default=None, ge=0)
    default_end_user_budget_duration: DurationText | None = None
    #: Also alert when spend reaches this share of a max budget (e.g. 0.8).
    budget_alert_at: Decimal | None = Field(default=None, gt=0, le=1)
    #: IANA time zone in which calendar budget windows reset (LiteLLM's ``timezone``).
    budget_reset_timezone: str = "UTC"
    #: A fallback group is tried only if the caller's key (team, user, org, project)
    #: could ask for it by name (LiteLLM's default: on).
    enforce_fallback_model_access: bool = True

    @field_validator("budget_reset_timezone")
    @classmethod
    def _check_zone(cls, value: str) -> str:
        zone(value)
        return value


@dataclass(frozen=True, slots=True)
class Directory:
    """Every identity object of the policy, indexed (keys by hash, the rest by id)."""

    keys: Mapping[str, VirtualKey] = field(default_factory=dict)
    teams: Mapping[str, Team] = field(default_factory=dict)
    agents: Mapping[str, Agent] = field(default_factory=dict)
    users: Mapping[str, User] = field(default_factory=dict)
    orgs: Mapping[str, Organization] = field(default_factory=dict)
    projects: Mapping[str, Project] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of one request and the objects its key names."""

    key: VirtualKey
    team: Team | None
    agent: Agent | None = None
    user: User | None = None
    org: Organization | None = None
    project: Project | None = None


def authenticate(api_key: str | None, directory: Directory, now: datetime) -> Caller:
    """The caller behind ``api_key``, or a 401/403."""
    if not api_key:
        raise AuthenticationError(
            "No API key provided. Send it as 'Authorization: Bearer <key>' or 'x-api-key'.",
            code="missing_api_key",
        )
    digest = hash_key(api_key)
    key = directory.keys.get(digest)
    if key is None or not hmac.compare_digest(key.hash, digest):
        raise AuthenticationError("Invalid API key.", code="invalid_api_key")
    if key.expires is not None and key.expires <= now:
        raise AuthenticationError(f"API key {key.label} has expired.", code="key_expired")
    if key.blocked:
        raise PermissionDeniedError(f"API key {key.label} is blocked.", code="key_blocked")
    team = directory.teams.get(key.team) if key.team else None
    if team is not None and team.blocked:
        raise PermissionDeniedError(f"Team {team.id} is blocked.", code="team_blocked")
    project = directory.projects.get(key.project) if key.project else None
    if project is not None and project.blocked:
        raise PermissionDeniedError(f"Project {project.id} is blocked.", code="project_blocked")
    org_id = key.org or (team.org if team is not None else None)
    return Caller(
        key,
        team,
        agent=directory.agents.get(key.agent) if key.agent else None,
        user=directory.users.get(key.user) if key.user else None,
        org=directory.orgs.get(org_id) if org_id else None,
        project=project,
    )


def _route_allowed(pattern: str, path: str) -> bool:
    if pattern == "llm_api_routes":
        return lookup_endpoint(path) is not None or lookup_models(path) is not None
    bare = path.split("?", 1)[0]
    regex = "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"
    return re.match(regex, bare) is not None


def check_route(caller: Caller, path: str) -> None:
    """Raise a 403 unless the key's ``allowed_routes`` admit ``path``."""
    routes = caller.key.allowed_routes
    if routes and not any(_route_allowed(p, path) for p in routes):
        raise PermissionDeniedError(
            f"API key {caller.key.label} may not call {path.split('?', 1)[0][:256]}.",
            code="route_not_allowed",
        )


def check_request_rules(
    caller: Caller | None,
    settings: GeneralSettings,
    *,
    user: str | None,
    body: Mapping[str, Any],
    client_tags: bool,
    trace_id: str | None,
    tool_names: Callable[[], Iterable[str]],
) -> None:
    """The body-level rules, in LiteLLM's order: trace id, user param, tags, tools.

    ``tool_names`` is called only when an allowlist applies (it may raise a 400 for a
    shape it cannot name)."""
    agent = caller.agent if caller is not None else None
    if agent is not None and agent.require_trace_id and not trace_id:
        raise BadRequestError(
            f"Calls with keys of agent {agent.id} must send the {TRACE_ID_HEADER} header.",
            code="trace_id_required",
        )
    if settings.enforce_user_param and user is None:
        raise BadRequestError(
            "The 'user' parameter is required (enforce_user_param).",
            code="user_param_required",
            param="user",
        )
    if settings.reject_clientside_metadata_tags and client_tags:
        raise BadRequestError(
            "Client-side tags are not allowed (reject_clientside_metadata_tags); "
            "tags come from the key's metadata.",
            code="clientside_tags_rejected",
            param="metadata.tags",
        )
    if caller is None:
        return
    allowed = caller.key.metadata.allowed_tools
    if not allowed and caller.team is not None:
        allowed = caller.team.metadata.allowed_tools
    if not allowed:
        return
    pinned = pins_servers(allowed)
    denied = sorted(
        {
            name
            for name in tool_names()
            if name not in allowed and (pinned or not isinstance(name, ServerTarget))
        }
    )
    if denied:
        raise PermissionDeniedError(
            f"Tools {[name[:64] for name in denied[:20]]} are not in the allowed tools list "
            "of this key or team.",
            code="tool_access_denied",
            param="tools",
        )


def request_tags(client_tags: Iterable[str], caller: Caller | None) -> tuple[str, ...]:
    """Every tag of a call: the client's (where allowed), then its key's
    ``metadata.tags``, then its team's, without repeats (LiteLLM's ``_merge_tags``
    order). Rule: the policy's tags are part of every call the key makes, so tag
    budgets and tag spend see them whatever the client sends."""
    policy: tuple[str, ...] = ()
    if caller is not None:
        policy = caller.key.metadata.tags
        if caller.team is not None:
            policy += caller.team.metadata.tags
    return tuple(dict.fromkeys((*client_tags, *policy)))


def resolve_model_alias(caller: Caller | None, requested: str) -> str:
    """The model group a team alias stands for, else the name as sent."""
    if caller is None or caller.team is None:
        return requested
    return caller.team.model_aliases.get(requested, requested)


def _pattern_allows(
    pattern: str,
    requested: str,
    group: str,
    providers: Iterable[str],
    access_groups: Mapping[str, frozenset[str]],
) -> bool:
    if pattern in _ALL_MODELS or pattern in (requested, group):
        return True
    if pattern in access_groups:
        return group in access_groups[pattern]
    if "*" not in pattern:
        return False
    if pattern.endswith("/*"):
        provider = pattern[:-2]
        deployed = set(providers)
        # provider wildcard: every deployment of the group is that provider's
        if deployed and deployed == {provider}:
            return True
    regex = "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"
    return any(re.match(regex, name) is not None for name in (requested, group))


def check_model_access(
    caller: Caller,
    requested: str,
    group: str,
    providers: Iterable[str],
    access_groups: Mapping[str, frozenset[str]],
) -> None:
    """Raise a 403 unless every object of the caller with a model list allows ``group``.

    Order: key, team, user (personal keys only, as in LiteLLM), organization, project.
    """
    provider_list = tuple(providers)
    owners: list[tuple[str, tuple[str, ...], str]] = [
        (f"API key {caller.key.label}", caller.key.models, "key_model_access_denied")
    ]
    if caller.team is not None:
        owners.append((f"Team {caller.team.id}", caller.team.models, "team_model_access_denied"))
    elif caller.user is not None:
        owners.append((f"User {caller.user.id}", caller.user.models, "user_model_access_denied"))
    if caller.org is not None:
        owners.append(
            (f"Organization {caller.org.id}", caller.org.models, "org_model_access_denied")
        )
    if caller.project is not None:
        owners.append(
            (f"Project {caller.project.id}", caller.project.models, "project_model_access_denied")
        )
    for who, models, code in owners:
        if not models:
            continue
        if not any(
            _pattern_allows(p, requested, group, provider_list, access_groups) for p in models
        ):
            raise PermissionDeniedError(
                f"{who} is not allowed to access model {requested[:256]!r}.",
                code=code,
                param="model",
            )
