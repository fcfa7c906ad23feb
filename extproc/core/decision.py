"""The decision core: pure functions from a request snapshot to a decision.

Nothing here does I/O. The gRPC adapters (``adapters.ext_proc``, ``adapters.ext_authz``)
translate protobufs into :class:`~extproc.core.request.RequestHead` and body bytes; the
runtime calls :func:`decide_head`, :func:`prepare`, reads the
:class:`~extproc.core.selection.RoutingView` of :func:`view_scope`, routes with
:func:`decide_route`, reads the :class:`~extproc.core.admission.StoreFacts` of the
route's session cap and calls :func:`decide_admission` once (the two steps of
:func:`decide`): the deployment, the edits, the charge and the plan of store effects it
then commits; the adapters translate the result back. So ext_proc and ext_authz cannot
disagree on the same request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from extproc.core.access import (
    TRACE_ID_HEADER,
    Caller,
    authenticate,
    check_model_access,
    check_request_rules,
    check_route,
    request_tags,
    resolve_model_alias,
)
from extproc.core.admission import CallIds, Plan, StoreFacts, plan_admission
from extproc.core.budgets import BudgetRef, applicable_budgets
from extproc.core.charges import Charge, deployment_budgets
from extproc.core.endpoints import (
    TRANSLATED_PATHS,
    EndpointSpec,
    Requirement,
    lookup_endpoint,
    lookup_models,
)
from extproc.core.errors import (
    BadRequestError,
    GatewayError,
    InvalidParameterError,
    MethodNotAllowedError,
    MissingParameterError,
    ModelNotFoundError,
    PayloadTooLargeError,
    UnknownRouteError,
    UnsupportedMediaTypeError,
)
from extproc.core.failover import (
    CALL_HEADER,
    DEPLOYMENT_HEADER,
    SERVED_BY_HEADER,
    SERVED_PATH_HEADER,
    STREAM_HEADER,
    FailoverRoute,
)
from extproc.core.fallbacks import reachable, serve, unserved
from extproc.core.health import HealthSample
from extproc.core.jsonbody import add_member, splice
from extproc.core.limits import tpm_key
from extproc.core.models import Answer, answer_models, may_use
from extproc.core.pricing import OutputAsk, cost_micros, estimate_call, requested_output
from extproc.core.providers import credential_edits
from extproc.core.request import LLMRequest, RequestHead, parse_request
from extproc.core.selection import RoutingView, context_tokens, fitting_group, select
from extproc.core.sessions import SessionCap, session_cap
from extproc.core.translate import chat_to_messages, messages_to_chat
from extproc.core.usage import Usage
from extproc.policy import CompiledDeployment, CompiledGroup, CompiledPolicy

__all__ = [
    "Decision",
    "GatewayConfig",
    "HeadDecision",
    "Prepared",
    "ResponseDecision",
    "RouteDecision",
    "decide",
    "decide_admission",
    "decide_head",
    "decide_response",
    "decide_route",
    "failed_attempt",
    "fallback_scope",
    "prepare",
    "route_to",
    "session_of",
    "view_scope",
    "with_group",
]

#: Endpoints whose streams carry usage only when asked (``stream_options``).
_USAGE_OPT_IN = frozenset({"chat_completions", "completions"})


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The slice of the settings the core needs."""

    cluster_header: str = "x-extproc-cluster"
    session_headers: tuple[str, ...] = ("x-litellm-session-id",)
    tags_header: str = "x-litellm-tags"
    unknown_paths: Literal["pass", "reject"] = "pass"
    max_body_bytes: int = 8 * 1024 * 1024
    #: Output tokens reserved for a call that names no max_tokens.
    default_max_tokens: int = 4096


@dataclass(frozen=True, slots=True)
class HeadDecision:
    """After the headers: pass the request through untouched, read its body, or
    answer it here (``answer``: the model list)."""

    action: Literal["pass", "read_body", "answer"]
    #: Headers to strip now (a client-sent routing header never survives).
    remove_headers: tuple[str, ...]
    #: The authenticated caller; None when the policy has no keys.
    caller: Caller | None = None
    #: What the gateway answers itself, for ``answer``.
    answer: Answer | None = None


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Send the request to ``deployment`` with these header and body changes."""

    request: LLMRequest
    caller: Caller | None
    deployment: CompiledDeployment
    #: Budgets to check against spend from the store before admitting the request.
    budgets: tuple[BudgetRef, ...]
    set_headers: tuple[tuple[str, str], ...]
    remove_headers: tuple[str, ...]
    body: bytes
    #: The session cap this call counts against, if any.
    iterations: SessionCap | None = None
    group: CompiledGroup | None = None
    #: High estimates for the reservation, settled to the response's usage.
    prompt_tokens: int = 0
    max_output_tokens: int = 0
    #: The most tokens of one kind the response's usage may report (clamped there).
    usage_cap: int = 0
    #: The deployments a failover may reach.
    attempts: tuple[CompiledDeployment, ...] = ()
    #: Micro-dollars to hold: what the call may cost where it may land.
    hold: int = 0
    #: The gateway added ``stream_options.include_usage``: the client did not ask for
    #: the usage chunk, so it is taken out of the stream it gets.
    asks_usage: bool = False
    #: Fallback hops the call took at admission (LiteLLM's ``attempted_fallbacks``).
    fallbacks: int = 0
    #: The deployment speaks the other API: the body was translated, and the answer
    #: is translated back (the charge says into which API).
    translated: bool = False


def _authenticate(head: RequestHead, policy: CompiledPolicy, now: datetime) -> Caller | None:
    if not policy.auth_required:
        return None
    caller = authenticate(head.caller_key(), policy.directory, now)
    check_route(caller, head.path)
    return caller


def decide_head(
    head: RequestHead,
    config: GatewayConfig,
    policy: CompiledPolicy,
    now: datetime,
    *,
    has_body: bool,
) -> HeadDecision:
    """Decide what the headers alone allow; raises a GatewayError to refuse.

    The caller is authenticated here, so a bad key is refused before Envoy sends
    (and buffers) the body.
    """
    strip = (config.cluster_header,)
    models = lookup_models(head.path)
    if models is not None:
        if head.method != "GET":
            raise MethodNotAllowedError(
                f"{head.method[:16]} is not allowed on the model list; it takes GET.",
                headers={"allow": "GET"},
            )
        # Rule: authenticated as a call is; nothing is counted (no store effect).
        caller = _authenticate(head, policy, now)
        # The Anthropic SDK always sends anthropic-version; OpenAI's never does.
        shape: Literal["openai", "anthropic"] = (
            "anthropic" if "anthropic-version" in head.headers else "openai"
        )
        return HeadDecision("answer", strip, caller, answer_models(models, caller, policy, shape))
    if head.method != "POST" and lookup_endpoint(head.path) is not None:
        # Rule: answered before authentication, as a web framework's router would.
        raise MethodNotAllowedError(
            f"{head.method[:16]} is not allowed on {head.path.split('?', 1)[0][:256]}; "
            "LLM endpoints take POST.",
            headers={"allow": "POST"},
        )
    if head.endpoint is None:
        if config.unknown_paths == "reject":
            raise UnknownRouteError(
                f"{head.method} {head.path.split('?', 1)[0]} is not an LLM endpoint "
                "this gateway serves."
            )
        return HeadDecision("pass", strip)
    if not has_body:
        raise MissingParameterError(
            "The request body is empty; expected a JSON object.", code="missing_body"
        )
    encoding = head.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # The body must be read to route; a compressed one cannot be.
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {encoding[:32]!r} is not supported on LLM requests; "
            "send the body uncompressed."
        )
    length = head.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > config.max_body_bytes:
        raise PayloadTooLargeError(
            f"The request body is larger than {config.max_body_bytes} bytes."
        )
    return HeadDecision("read_body", strip, _authenticate(head, policy, now))


@dataclass(frozen=True, slots=True)
class Prepared:
    """A checked request before a deployment is chosen."""

    head: RequestHead
    raw: bytes
    request: LLMRequest
    caller: Caller | None
    group: CompiledGroup
    budgets: tuple[BudgetRef, ...]
    #: The output the request asks for (checked), priced once a deployment is chosen.
    ask: OutputAsk = dataclasses.field(default_factory=OutputAsk)


def prepare(
    head: RequestHead,
    raw_body: bytes,
    policy: CompiledPolicy,
    config: GatewayConfig,
    *,
    now: datetime,
    translate: bool = True,
) -> Prepared:
    """Parse and check one LLM request: everything that does not depend on which
    deployment serves it (a GatewayError refuses it). ``translate``: a call may go to
    a deployment of the other API (the body can be rewritten: not under ext_authz)."""
    endpoint = head.endpoint
    if endpoint is None:
        raise UnknownRouteError(f"{head.path.split('?', 1)[0]} is not an LLM endpoint.")
    if len(raw_body) > config.max_body_bytes:
        raise PayloadTooLargeError(
            f"The request body is larger than {config.max_body_bytes} bytes."
        )
    request = parse_request(
        head,
        endpoint,
        raw_body,
        session_headers=config.session_headers,
        tags_header=config.tags_header,
    )
    caller = _authenticate(head, policy, now)
    group = policy.groups.get(resolve_model_alias(caller, request.model))
    if group is None:
        raise ModelNotFoundError(
            f"The model `{request.model[:256]}` does not exist or you do not have access to it.",
            param="model",
        )
    if caller is not None:
        check_model_access(
            caller,
            request.model,
            group.name,
            (d.provider for d in group.deployments),
            policy.access_groups,
        )
    group = _serving(group, endpoint, translate=translate, body=request.body)
    metadata = request.body.get("metadata")
    check_request_rules(
        caller,
        policy.general,
        user=request.user,
        body=request.body,
        client_tags=bool(
            (isinstance(metadata, dict) and metadata.get("tags"))
            or head.headers.get(config.tags_header)
        ),
        trace_id=head.headers.get(TRACE_ID_HEADER),
        # nested keys are read: a tool naming "name" twice must not pass as the other
        tool_names=lambda: endpoint.tool_names(request.strict_member),
    )
    ask = requested_output(endpoint.name, request.body, raw_body)
    budgets = () if group.zero_cost else _caller_budgets(caller, request, policy, now)
    return Prepared(head, raw_body, request, caller, group, budgets, ask)


#: What each requirement means to a client, for the 400 when no deployment offers it.
_REQUIREMENTS = {
    "anthropic": "an Anthropic deployment (provider: anthropic)",
    "responses": (
        "a deployment that serves the Responses API (OpenAI or Azure OpenAI, or "
        "responses_api: true); use /v1/chat/completions"
    ),
}


def _serving(
    group: CompiledGroup,
    endpoint: EndpointSpec,
    *,
    translate: bool,
    body: dict[str, Any] | None = None,
) -> CompiledGroup:
    """The group's deployments that can serve an endpoint: they offer what it requires
    and speak its API, or the API its calls translate into (where the body can be
    rewritten); a 400 when none can (never an upstream's 404 for an API it does not
    have).

    Rule: in a group of both APIs, a call the other API cannot express (``n`` > 1,
    ``response_format``, a server tool) goes to deployments of its own: never a 400 or
    not by the routing draw."""
    apis = _apis(endpoint, translate=translate)
    if len(apis) > 1 and body is not None and len({d.api for d in group.deployments}) > 1:
        try:
            translate_request(body, endpoint.api, "model", GatewayConfig())
        except BadRequestError:
            apis = frozenset({endpoint.api})
    serving = group.serving(endpoint.requires, apis)
    if serving.deployments:
        return serving
    if endpoint.requires:
        needs = _REQUIREMENTS[endpoint.requires]
    elif endpoint.translates_to is not None:
        needs = (
            f"a deployment that speaks {_API_NAMES[endpoint.api]}'s API: calls are "
            "translated only where the body can be rewritten (ext_proc, not ext_authz)"
        )
    else:
        needs = f"a deployment that speaks {_API_NAMES[endpoint.api]}'s API"
    raise InvalidParameterError(
        f"The model `{group.name[:256]}` cannot serve {endpoint.name}: it needs {needs}.",
        param="model",
        code="unsupported_endpoint",
    )


_API_NAMES = {"openai": "OpenAI", "anthropic": "Anthropic"}


def _apis(endpoint: EndpointSpec, *, translate: bool) -> frozenset[str]:
    if translate and endpoint.translates_to is not None:
        return frozenset({endpoint.api, endpoint.translates_to})
    return frozenset({endpoint.api})


def keeper(
    prepared: Prepared, *, rewrite_body: bool = True
) -> Callable[[CompiledGroup], CompiledGroup]:
    """Of another group the call may go to (a fallback, a larger context window), the
    deployments that can serve its endpoint (``_serving``'s rule)."""
    endpoint = prepared.request.endpoint
    apis = _apis(endpoint, translate=rewrite_body)
    return lambda group: group.serving(endpoint.requires, apis)


def _call_tokens(prepared: Prepared) -> int:
    """The call's input tokens for context-window checks; 0 for the token counter
    (counting a prompt too large for a model is what it is for)."""
    request = prepared.request
    return context_tokens(request.body) if request.endpoint.metered else 0


def _caller_budgets(
    caller: Caller | None, request: LLMRequest, policy: CompiledPolicy, now: datetime
) -> tuple[BudgetRef, ...]:
    """The caller's budgets a priced call holds (key, team, member, user, end user,
    tags, the global budget)."""
    end_user = request.user
    return applicable_budgets(
        caller,
        end_user=policy.end_users.get(end_user) if end_user else None,
        end_user_id=end_user,
        tags=[
            policy.tag_budgets[t]
            for t in request_tags(request.tags, caller)
            if t in policy.tag_budgets
        ],
        gateway=policy.global_budget,
        now=now,
        tz=policy.budget_zone,
    )


def with_group(
    prepared: Prepared, group: CompiledGroup, policy: CompiledPolicy, *, now: datetime
) -> Prepared:
    """The same request sent to another group (a fallback, a larger context window).

    Rule: a call holds the budgets of the group that serves it, as if it had asked
    for that group: none in a zero-cost group, the caller's in a priced one."""
    budgets = prepared.budgets
    if group.zero_cost:
        budgets = ()
    elif prepared.group.zero_cost:
        budgets = _caller_budgets(prepared.caller, prepared.request, policy, now)
    return dataclasses.replace(prepared, group=group, budgets=budgets)


def route_to(
    prepared: Prepared,
    deployment: CompiledDeployment,
    config: GatewayConfig,
    *,
    rewrite_body: bool = True,
    failover: FailoverRoute | None = None,
    attempts: tuple[CompiledDeployment, ...] = (),
    fallbacks: int = 0,
    call: str = "",
) -> RouteDecision:
    """The changes that send ``prepared`` to ``deployment`` (through its composite
    cluster when it can fail over: Envoy retries other deployments in the same call).

    A streamed chat/completions call that does not ask for usage asks for it upstream
    (``stream_options.include_usage``). ``rewrite_body``: off where the body cannot be
    changed (ext_authz): the upstream gets the client's bytes, so neither the model
    name nor the usage opt-in is edited and the length stays the client's.
    ``attempts``: the deployments a failover may reach; the estimate and the usage
    bound cover the largest of them. ``fallbacks``: the hops admission took to reach
    ``deployment``'s group. ``disable_fallbacks`` is the gateway's and never reaches
    the upstream (where the body can be changed). ``call``: the call's id, which a
    dynamic failover route's attempts share (``x-extproc-call``).
    """
    request, raw_body, group = prepared.request, prepared.raw, prepared.group
    endpoint = request.endpoint
    translated = deployment.api != endpoint.api
    if translated and not rewrite_body:
        # never an untranslated call to another API's deployment (prepare keeps them out)
        raise InvalidParameterError(
            f"{endpoint.name} cannot reach deployment {deployment.id!r} here: it speaks "
            "another API and the body cannot be rewritten.",
            param="model",
            code="unsupported_endpoint",
        )
    # Rule: every edit splices a span of the one parse; the body is never scanned again.
    edits: list[tuple[tuple[int, int], Any]] = [(request.model_span, deployment.body_model)]
    add_options: dict[str, Any] | None = None
    asks_usage = False
    if rewrite_body and request.stream and endpoint.name in _USAGE_OPT_IN and not translated:
        options = request.body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            merged = {**options} if isinstance(options, dict) else {}
            if request.stream_options_span is None:
                add_options = {**merged, "include_usage": True}
            else:
                edits.append((request.stream_options_span, {**merged, "include_usage": True}))
            asks_usage = True
    if "disable_fallbacks" in request.body:
        extent = request.parsed.member_extent("disable_fallbacks")
        if extent is not None:
            edits.append((extent, b""))
    body = splice(raw_body, edits) if rewrite_body else raw_body
    if add_options is not None:
        body = add_member(body, "stream_options", add_options)
    if translated:
        # another API's deployment: the whole body in its API (extproc.core.translate)
        body = translate_request(
            request.body, endpoint.api, deployment.body_model, config, deployment
        )
    set_headers: list[tuple[str, str]] = [(config.cluster_header, deployment.cluster)]
    if failover is not None:
        set_headers = [
            (config.cluster_header, failover.composite),
            # the first attempt is already rewritten for this deployment
            (DEPLOYMENT_HEADER, deployment.id),
        ]
        if request.stream:
            set_headers.append((STREAM_HEADER, "1"))  # the route with the stream timeouts
        if failover.dynamic and call:
            set_headers.append((CALL_HEADER, call))  # the attempts' record of refusals
    credential, remove = credential_edits(deployment.auth_header, deployment.auth_value)
    set_headers += credential
    api_set, api_remove = _api_edits(prepared.head, deployment, translated=translated)
    set_headers += api_set
    remove += api_remove
    if rewrite_body:
        set_headers.append(("content-length", str(len(body))))
    # Usage is read from the response: ask the upstream for an uncompressed one.
    remove += ("accept-encoding",)
    if failover is None:
        # only the server names the chosen deployment to the attempt filter
        remove += (DEPLOYMENT_HEADER,)
    caller = prepared.caller
    estimates = [
        estimate_call(
            prepared.ask,
            raw_body,
            default_max_tokens=config.default_max_tokens,
            max_output_tokens=dep.max_output_tokens,
            context_window=dep.context_window,
        )
        for dep in (deployment, *attempts)
    ]
    return RouteDecision(
        request=request,
        caller=caller,
        deployment=deployment,
        budgets=prepared.budgets,
        set_headers=tuple(set_headers),
        remove_headers=remove,
        body=body,
        iterations=session_of(prepared, group),
        group=group,
        prompt_tokens=max(e.prompt_tokens for e in estimates),
        max_output_tokens=max(e.output_tokens for e in estimates),
        usage_cap=max(e.usage_cap for e in estimates),
        # Rule: held at the dearest deployment the call may reach, each priced for
        # what it can produce (not the largest window at the dearest price).
        hold=max(
            (
                cost_micros(
                    dep.prices, Usage(input_tokens=e.prompt_tokens, output_tokens=e.output_tokens)
                )
                for dep, e in zip((deployment, *attempts), estimates, strict=True)
                if dep.prices is not None
            ),
            default=0,
        ),
        asks_usage=asks_usage,
        attempts=attempts,
        fallbacks=fallbacks,
        translated=translated,
    )


def _api_edits(
    head: RequestHead, deployment: CompiledDeployment, *, translated: bool
) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """The path and API headers the deployment's upstream expects: its provider's path
    (api_base, Azure's deployment path), and for a translated call the other API's
    endpoint and version header."""
    if translated:
        _, target = TRANSLATED_PATHS[deployment.api]
        path = [(":path", deployment.path_for(target))]
        if deployment.api == "openai":
            # anthropic-* headers stay (OpenAI ignores them): a failover retry on an
            # Anthropic deployment still has the client's anthropic-beta
            return path, ()
        if "anthropic-version" not in head.headers:
            path.append(("anthropic-version", ANTHROPIC_VERSION))
        return path, ()
    if deployment.api_base is not None:
        return [(":path", deployment.path_for(head.path))], ()
    return [], ()


#: The Anthropic API version a translated call asks for (the SDKs' current one).
ANTHROPIC_VERSION = "2023-06-01"


def translate_request(
    body: dict[str, Any],
    api: str,
    model: str,
    config: GatewayConfig,
    deployment: CompiledDeployment | None = None,
) -> bytes:
    """A request body of ``api`` (the client's) in the other API's shape; a 400 for
    what the other API cannot express. Anthropic requires ``max_tokens``: a chat call
    naming none gets the gateway's default, at most the deployment's largest answer;
    OpenAI and Azure read ``max_completion_tokens``, compatible hosts ``max_tokens``."""
    if api == "openai":
        default = config.default_max_tokens
        if deployment is not None and deployment.max_output_tokens is not None:
            default = min(default, deployment.max_output_tokens)
        out = chat_to_messages(body, model, default_max_tokens=default)
    else:
        native = deployment is None or deployment.provider in ("openai", "azure")
        param = "max_completion_tokens" if native else "max_tokens"
        out = messages_to_chat(body, model, max_tokens_param=param)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode()


def session_of(prepared: Prepared, group: CompiledGroup) -> SessionCap | None:
    """The session cap a call of ``prepared`` served by ``group`` (the group of
    :func:`view_scope`) counts against, if any: known before the deployment is."""
    return session_cap(prepared.caller, prepared.request.session_id, group.max_iterations)


def view_scope(
    prepared: Prepared, policy: CompiledPolicy, *, rewrite_body: bool = True
) -> tuple[CompiledGroup, list[CompiledDeployment]]:
    """The group (maybe a context-window fallback) and deployments whose state
    :func:`decide` reads: what the adapter reads into the :class:`RoutingView`. A 400
    ``context_length_exceeded`` when no deployment is large enough, unless the group
    has fallbacks the call may walk to: then the group with no deployments (none can
    take the call; :func:`fallback_scope` names the groups to read, and the walk of
    :func:`decide` refuses with that 400 when none of them can serve)."""
    group = prepared.group
    try:
        keep = keeper(prepared, rewrite_body=rewrite_body)
        return fitting_group(group, policy, _call_tokens(prepared), keep)
    except GatewayError as err:
        if not (unserved(err) and group.fallbacks and not prepared.request.disable_fallbacks):
            raise
        return group, []


def _fallback_allowed(
    prepared: Prepared, policy: CompiledPolicy, *, rewrite_body: bool = True
) -> Callable[[CompiledGroup], bool]:
    """Whether the caller may be sent to a fallback group: with
    ``enforce_fallback_model_access`` (LiteLLM's default), only to one it could ask
    for by name.

    Rule: where the body cannot be changed (ext_authz) the upstream gets the model
    name the client sent, so the walk goes only to a group every deployment of which
    takes that name: never to one whose upstream would read another model's name."""
    caller = prepared.caller
    sent = prepared.request.model
    enforce = caller is not None and policy.general.enforce_fallback_model_access
    keep = keeper(prepared, rewrite_body=rewrite_body)

    def allowed(group: CompiledGroup) -> bool:
        # Rule: a group some deployment of which could not serve the endpoint (its
        # API, the Responses API) is not walked to
        if len(keep(group).deployments) != len(group.deployments):
            return False
        if not rewrite_body and any(d.model != sent for d in group.deployments):
            return False
        return not enforce or may_use(caller, group, policy)

    return allowed


def fallback_scope(
    prepared: Prepared,
    policy: CompiledPolicy,
    view: RoutingView,
    *,
    now: datetime,
    rewrite_body: bool = True,
) -> list[tuple[CompiledGroup, list[CompiledDeployment]]]:
    """The fallback groups (and deployments) whose state :func:`decide` also reads,
    given ``view`` of the :func:`view_scope` group: none while that group can serve
    the call (or fallbacks are off for it), else every group the walk may try
    (``rewrite_body``: as :func:`decide_route`'s). So a policy without fallbacks, and a
    call its group serves, read nothing more."""
    group = prepared.group
    request = prepared.request
    if not group.fallbacks or request.disable_fallbacks or request.endpoint.requires:
        return []
    tokens = _call_tokens(prepared)
    keep = keeper(prepared, rewrite_body=rewrite_body)
    try:
        select(group, policy, view, lambda: 0.0, now=now.timestamp(), tokens=tokens, keep=keep)
    except GatewayError as err:
        if not unserved(err):
            return []
        allowed = _fallback_allowed(prepared, policy, rewrite_body=rewrite_body)
        return reachable(group, policy, tokens=tokens, allowed=allowed, keep=keep)
    return []


def _crosses_apis(route: FailoverRoute, policy: CompiledPolicy, api: str) -> bool:
    return any(
        dep.api != api for d, _ in route.deployments() if (dep := policy.deployment(d)) is not None
    )


def _expressible_in_both(
    prepared: Prepared, config: GatewayConfig, deployment: CompiledDeployment
) -> bool:
    """Whether every retry can be sent (a dry run of the translations the attempt
    filter makes): retries get the first attempt's body, translated for the other API,
    so a call whose first attempt is already translated is translated back."""
    request = prepared.request
    try:
        sent = translate_request(request.body, request.endpoint.api, "model", config)
        if deployment.api != request.endpoint.api:
            translate_request(json.loads(sent), deployment.api, "model", config)
    except (BadRequestError, ValueError):
        return False
    return True


def _fits_every_attempt(
    route: FailoverRoute,
    policy: CompiledPolicy,
    tokens: int,
    requirement: Requirement = "",
    api: str | None = None,
) -> bool:
    """Whether the call fits the context window of every deployment it may fail over
    to (a class's fallbacks included), and each offers what the endpoint requires and
    speaks ``api`` (the first deployment's: a retry's body is not translated again)."""
    for dep_id, _ in route.deployments():
        dep = policy.deployment(dep_id)
        if dep is None:
            continue
        if dep.context_window is not None and tokens > dep.context_window:
            return False
        if requirement and not dep.serves(requirement):
            return False
        if api is not None and dep.api != api:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Decision:
    """The whole decision on one admitted call: where it goes and how, its charge,
    and the store effects that admit it."""

    route: RouteDecision
    charge: Charge
    #: The batch to commit (budget holds, session count, rpm/tpm, slot, load) and
    #: where each step's answer is read.
    plan: Plan
    #: The session cap the call counts against (None: not counted): in the plan, or
    #: in process when the store is marked down (``StoreFacts.sessions_in_store``).
    cap: SessionCap | None


def decide(
    prepared: Prepared,
    policy: CompiledPolicy,
    config: GatewayConfig,
    view: RoutingView,
    rng: Callable[[], float],
    *,
    now: datetime,
    ids: CallIds,
    facts: StoreFacts,
    rewrite_body: bool = True,
    limits: bool = True,
    count: bool = True,
) -> Decision:
    """The one decision on a checked request: :func:`decide_route`, then
    :func:`decide_admission` (a GatewayError refuses it).

    Rule: this is the one decision of both adapters; nothing in it reads the store
    (what it needs of it is ``view`` and ``facts``) or the clock (``now``), or draws
    randomness other than ``rng`` (the ids come in as ``ids``)."""
    route = decide_route(
        prepared,
        policy,
        config,
        view,
        rng,
        now=now,
        rewrite_body=rewrite_body,
        call=call_id(ids.rid),
    )
    return decide_admission(
        route, policy, now=now, ids=ids, facts=facts, limits=limits, count=count
    )


def call_id(rid: str) -> str:
    """The id a call's attempts share (``x-extproc-call``): derived from its
    reservation id, which upstreams never see."""
    return hashlib.blake2b(rid.encode(), digest_size=16, person=b"extproc-call").hexdigest()


def _may_translate(route: RouteDecision) -> bool:
    api = route.request.endpoint.api
    return route.translated or any(d.api != api for d in route.attempts)


def _asks_usage_chunk(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def decide_admission(
    route: RouteDecision,
    policy: CompiledPolicy,
    *,
    now: datetime,
    ids: CallIds,
    facts: StoreFacts,
    limits: bool = True,
    count: bool = True,
) -> Decision:
    """What admitting a routed call writes: its charge (the reservation ``ids.rid``
    against the request's budgets and its deployment's and provider's) and the plan
    of :func:`~extproc.core.admission.plan_admission`. ``limits``: False plans the
    reservation and the session count alone (ext_authz's reserve); ``count``: False
    leaves the session uncounted."""
    dep = route.deployment
    group = route.group
    refs = route.budgets
    if group is not None and not group.zero_cost:
        refs += deployment_budgets(dep, policy, now)
    key = route.caller.key if route.caller is not None else None
    share = policy.general.budget_alert_at
    request = route.request
    translated = TRANSLATED_PATHS[dep.api][0] if route.translated else None
    charge = Charge.new(
        rid=ids.rid,
        # Rule: the usage is read from the provider's answer, before translation
        api=dep.api if translated else request.endpoint.api,
        endpoint=translated or request.endpoint.name,
        client_api=request.endpoint.api if translated else None,
        # the client's usage-chunk wish, where an answer may be translated (this
        # deployment, or a retry's of the other API)
        client_usage=_may_translate(route) and _asks_usage_chunk(request.body),
        dep=dep,
        stream=request.stream,
        strip_usage=route.asks_usage,
        estimate=route.hold,
        refs=refs,
        now=now,
        tpm_key=tpm_key(key) if key is not None and key.tpm_limit is not None else None,
        prompt_tokens=route.prompt_tokens,
        max_output_tokens=route.max_output_tokens,
        usage_cap=route.usage_cap,
        # the budgets the settlement checks for alerts
        watch=[r for r in refs if r.soft is not None or (share and r.limit is not None)],
        failover=bool(route.attempts),
        fallbacks=route.fallbacks,
    )
    cap = route.iterations if count else None
    plan = plan_admission(
        charge,
        refs,
        session=cap if facts.sessions_in_store else None,
        key=key,
        group=group,
        facts=facts,
        nonce=ids.nonce,
        minute=int(now.timestamp() // 60),
        limits=limits,
        deployment=dep,
    )
    return Decision(route, charge, plan, cap)


def decide_route(
    prepared: Prepared,
    policy: CompiledPolicy,
    config: GatewayConfig,
    view: RoutingView,
    rng: Callable[[], float],
    *,
    now: datetime,
    rewrite_body: bool = True,
    call: str = "",
) -> RouteDecision:
    """Route one checked request: the deployment :func:`~extproc.core.fallbacks.serve` picks
    with what ``view`` says of the group of :func:`view_scope` and, when it cannot serve,
    of its fallbacks (:func:`fallback_scope`), or a refusal; its
    failover route when every attempt can take the call, and the header and body
    edits that send it there."""
    tokens = _call_tokens(prepared)
    endpoint = prepared.request.endpoint
    served = serve(
        prepared.group,
        policy,
        view,
        rng,
        now=now.timestamp(),
        tokens=tokens,
        stream=prepared.request.stream,
        allowed=_fallback_allowed(prepared, policy, rewrite_body=rewrite_body),
        # an endpoint only some deployments offer stays in the group that offers it
        enabled=not prepared.request.disable_fallbacks and not endpoint.requires,
        keep=keeper(prepared, rewrite_body=rewrite_body),
    )
    group, deployment = served.group, served.deployment
    if group is not prepared.group:
        prepared = with_group(prepared, group, policy, now=now)
    # an unmetered call (the token counter) is not failed over: no response reading
    failover = policy.failover.get(deployment.id) if endpoint.metered else None
    # Rule: a retry to a deployment of the other API is translated by the attempt
    # filter (chat completions and messages, where the body can be rewritten), so
    # failover may cross APIs there when the call can be expressed in both
    same_api: str | None = deployment.api
    if (
        failover is not None
        and rewrite_body
        and endpoint.translates_to is not None
        and _crosses_apis(failover, policy, deployment.api)
        and _expressible_in_both(prepared, config, deployment)
    ):
        same_api = None
    if failover is not None and not _fits_every_attempt(
        failover, policy, tokens, endpoint.requires, same_api
    ):
        # a retry could land on a deployment too small for this call, or one without
        # the API it needs: no failover
        failover = None
    attempts: tuple[CompiledDeployment, ...] = ()
    if failover is not None:
        found = (policy.deployment(dep_id) for dep_id, _ in failover.deployments())
        attempts = tuple(d for d in found if d is not None)
    return route_to(
        prepared,
        deployment,
        config,
        rewrite_body=rewrite_body,
        failover=failover,
        attempts=attempts,
        fallbacks=served.fallbacks,
        call=call,
    )


def _served_path(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    retries, _, hops = value.partition(",")
    if not (retries.isascii() and retries.isdigit() and hops.isascii() and hops.isdigit()):
        return None
    return min(int(retries), 99), min(int(hops), 99)


# --- the response side --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseDecision:
    """What the response headers of an admitted call decide."""

    #: The call's charge, priced by the deployment that served it.
    charge: Charge
    #: Response headers to strip (``x-extproc-served-by`` never reaches a client).
    remove_headers: tuple[str, ...]
    #: What the answer teaches about the deployment's health, if anything.
    health: HealthSample | None
    #: A 2xx: the body is metered and the call settled from it.
    meter: bool
    #: Not a 2xx: the call costs nothing, its reservation is given back.
    cancel: bool
    #: Not a 2xx and a body follows: the status whose error body is read (redacted,
    #: provider error words normalized).
    read_error: int | None
    #: A 2xx and a body follows: it streams through the meter.
    stream_body: bool
    #: Response headers to set: which deployment served, after how many attempts.
    set_headers: tuple[tuple[str, str], ...] = ()


def decide_response(
    charge: Charge,
    headers: Mapping[str, str],
    policy: CompiledPolicy,
    *,
    end_of_stream: bool,
    now: float,
) -> ResponseDecision:
    """Decide from the upstream's response headers (``:status`` among them; lower-case
    names) which deployment served and prices the call, the health sample, and whether
    the reservation is metered or given back. ``now``: Unix time (time to first token).

    Rule: ``x-extproc-served-by`` is trusted only on a call routed through a failover
    cluster, where the attempt filter sets it; anywhere else an upstream sent it, and
    it is stripped and ignored. Rule: a failover call's statuses were counted by its
    attempts, so only its first byte is a sample here (Envoy's own reply after failed
    attempts teaches nothing more); any other call's status counts for its deployment.
    """
    status = headers.get(":status", "")
    numeric = int(status) if status.isascii() and status.isdigit() else None
    served = headers.get(SERVED_BY_HEADER)
    failover = charge.failover
    remove: tuple[str, ...] = ()
    path = headers.get(SERVED_PATH_HEADER)
    if path is not None:
        remove = (SERVED_PATH_HEADER,)
    if served is not None:
        remove += (SERVED_BY_HEADER,)
        if not failover:
            served = None
    known = served is not None and policy.deployment(served) is not None
    if known and served != charge.deployment:
        charge = dataclasses.replace(charge, served=served)
    ttft = max(0.0, now - charge.started) if charge.stream else None
    health: HealthSample | None = None
    if served is not None:
        if ttft is not None:
            health = HealthSample(charge.priced_by, ttft_s=ttft)
    elif not failover and numeric is not None:
        health = HealthSample(charge.deployment, numeric, ttft)
    ok = status.startswith("2")
    return ResponseDecision(
        charge=charge,
        remove_headers=remove,
        set_headers=_attempt_headers(charge, policy, path if served is not None else None),
        health=health,
        meter=ok,
        cancel=not ok,
        read_error=numeric if not ok and not end_of_stream else None,
        stream_body=ok and not end_of_stream,
    )


#: LiteLLM's response headers: the deployment that served, Envoy's retries before it,
#: the fallback hops (admission's and Envoy's).
MODEL_ID_HEADER = "x-litellm-model-id"
RETRIES_HEADER = "x-litellm-attempted-retries"
FALLBACKS_HEADER = "x-litellm-attempted-fallbacks"


def _attempt_headers(
    charge: Charge, policy: CompiledPolicy, path: str | None = None
) -> tuple[tuple[str, str], ...]:
    """The serving deployment and the attempts it took. Rule: a composite cluster's
    attempt N goes to its N-th deployment, so where the served one sits in the list is
    the count of Envoy's attempts before it; each other group it passed to get there
    is one more fallback hop. A dynamic route's attempt says both itself (``path``:
    ``x-extproc-served-path``)."""
    served = charge.priced_by
    retries = 0
    fallbacks = charge.fallbacks
    route = policy.failover.get(charge.deployment) if charge.failover else None
    counted = _served_path(path) if route is not None and route.dynamic else None
    if counted is not None:
        retries, hops = counted
        fallbacks += hops
    elif route is not None and served != charge.deployment:
        ids = [d for d, _ in route.attempts]
        if served in ids:
            retries = ids.index(served)
            first = policy.deployment(charge.deployment)
            groups = {
                dep.group
                for d in ids[: retries + 1]
                if (dep := policy.deployment(d)) is not None
                and first is not None
                and dep.group != first.group
            }
            fallbacks += len(groups)
    return (
        (MODEL_ID_HEADER, served),
        (RETRIES_HEADER, str(retries)),
        (FALLBACKS_HEADER, str(fallbacks)),
    )


def failed_attempt(
    policy: CompiledPolicy, cluster: str, *, client_left: bool, timed_out: bool = False
) -> HealthSample | None:
    """A failover attempt to the per-deployment ``cluster`` that ended without a
    response: a 503 for its deployment's health, a 408 when it timed out (LiteLLM's
    status of a timeout).

    Rule: a client hanging up is not the deployment's fault."""
    if client_left:
        return None
    dep_id = policy.attempt_deployment(cluster)
    return HealthSample(dep_id, 408 if timed_out else 503) if dep_id is not None else None
