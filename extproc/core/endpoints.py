"""What differs between the LLM APIs the gateway understands, one spec per path.

Everything endpoint-specific (where the user id lives, whether the call can stream)
is behind :class:`EndpointSpec`; the rest of the gateway handles all endpoints the same
way. Add an API by registering a spec in :data:`ENDPOINTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import unquote

from extproc.core.errors import InvalidParameterError
from extproc.core.tools import ToolShapes, request_tool_names

__all__ = [
    "API_PREFIX",
    "ENDPOINTS",
    "ENDPOINT_PATHS",
    "MODELS_PATH",
    "TRANSLATED_PATHS",
    "EndpointSpec",
    "ModelsTarget",
    "Requirement",
    "lookup_endpoint",
    "lookup_models",
]

Api = Literal["openai", "anthropic"]
#: What a deployment must offer to serve an endpoint: nothing more than its API family
#: (""), Anthropic's own API, or OpenAI's Responses API.
Requirement = Literal["", "anthropic", "responses"]


class EndpointSpec(Protocol):
    """How to read one API's request body."""

    @property
    def name(self) -> str: ...

    @property
    def api(self) -> Api: ...

    def user(self, body: dict[str, Any]) -> str | None:
        """The end-user id the body names, if any."""
        ...

    @property
    def user_param(self) -> str:
        """Where the end-user id lives, for error messages (``user``, ``metadata.user_id``)."""
        ...

    def stream(self, body: dict[str, Any]) -> bool:
        """Whether the client asked for a streamed response."""
        ...

    def tool_names(self, member: Callable[[str], Any]) -> tuple[str, ...]:
        """Names of the tools the request offers the model; a 400 for a shape that
        cannot be named. ``member`` reads a top-level member of the body."""
        ...

    @property
    def requires(self) -> Requirement:
        """What a deployment must offer to serve this endpoint."""
        ...

    @property
    def metered(self) -> bool:
        """Whether a call is admitted and charged (False: routed only, never counted)."""
        ...

    @property
    def translates_to(self) -> Api | None:
        """The other API a call to this endpoint can be translated into, if any."""
        ...


def _optional_str(body: dict[str, Any], container: str | None, key: str, param: str) -> str | None:
    source: Any = body
    if container is not None:
        source = body.get(container)
        if source is None:
            return None
        if not isinstance(source, dict):
            raise InvalidParameterError(f"'{container}' must be an object", param=container)
    value = source.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidParameterError(f"'{param}' must be a string", param=param)
    return value


@dataclass(frozen=True, slots=True)
class JsonEndpoint:
    """An endpoint whose JSON body names ``model`` at the top level."""

    name: str
    api: Api
    can_stream: bool = True
    #: (container, key): where the end-user id lives; container None is top level.
    user_field: tuple[str | None, str] = (None, "user")
    #: Where this API's requests carry tools (``none``: it takes none).
    tool_shapes: ToolShapes = "chat"
    requires: Requirement = ""
    #: False: the call is routed only: no budget hold, charge, session count or limit.
    metered: bool = True
    #: The other API this endpoint's calls translate into (extproc.core.translate).
    translates_to: Api | None = None

    @property
    def user_param(self) -> str:
        container, key = self.user_field
        return f"{container}.{key}" if container else key

    def user(self, body: dict[str, Any]) -> str | None:
        container, key = self.user_field
        param = f"{container}.{key}" if container else key
        return _optional_str(body, container, key, param)

    def stream(self, body: dict[str, Any]) -> bool:
        value = body.get("stream")
        if value is None:
            return False
        if not isinstance(value, bool):
            raise InvalidParameterError("'stream' must be a boolean", param="stream")
        if value and not self.can_stream:
            raise InvalidParameterError(f"{self.name} does not stream", param="stream")
        return value

    def tool_names(self, member: Callable[[str], Any]) -> tuple[str, ...]:
        """Every tool the request offers, by the names ``allowed_tools`` lists
        (:mod:`extproc.core.tools`)."""
        return request_tool_names(self.tool_shapes, member)


_SPECS: tuple[tuple[str, JsonEndpoint], ...] = (
    ("/chat/completions", JsonEndpoint("chat_completions", "openai", translates_to="anthropic")),
    ("/completions", JsonEndpoint("completions", "openai", tool_shapes="completions")),
    ("/embeddings", JsonEndpoint("embeddings", "openai", can_stream=False, tool_shapes="none")),
    (
        "/responses",
        JsonEndpoint("responses", "openai", tool_shapes="responses", requires="responses"),
    ),
    (
        "/messages",
        JsonEndpoint(
            "messages",
            "anthropic",
            user_field=("metadata", "user_id"),
            tool_shapes="anthropic",
            translates_to="openai",
        ),
    ),
    # Anthropic's token counter: free, so neither charged nor counted (LiteLLM's too)
    (
        "/messages/count_tokens",
        JsonEndpoint(
            "count_tokens",
            "anthropic",
            can_stream=False,
            user_field=("metadata", "user_id"),
            tool_shapes="anthropic",
            requires="anthropic",
            metered=False,
        ),
    ),
)

#: The endpoint a translated call goes to, by the API it is translated into.
TRANSLATED_PATHS: dict[Api, tuple[str, str]] = {
    "anthropic": ("messages", "/v1/messages"),
    "openai": ("chat_completions", "/v1/chat/completions"),
}

#: The prefix upstreams expect. The paths without it are accepted too, as LiteLLM does;
#: Envoy's routes (``envoy.config``) add it before a request goes upstream.
API_PREFIX = "/v1"

#: The LLM paths without the prefix: the one list the server's table and Envoy's
#: routes are built from.
ENDPOINT_PATHS: tuple[str, ...] = tuple(suffix for suffix, _ in _SPECS)

#: Path (without query) → spec. Both ``/v1/x`` and ``/x`` are accepted, as LiteLLM does.
ENDPOINTS: dict[str, EndpointSpec] = {
    prefix + suffix: spec for suffix, spec in _SPECS for prefix in (API_PREFIX, "")
}


def lookup_endpoint(path: str) -> EndpointSpec | None:
    """The spec for a request path; query strings and a trailing slash are ignored."""
    bare = path.split("?", 1)[0]
    if len(bare) > 1 and bare.endswith("/"):
        bare = bare[:-1]
    return ENDPOINTS.get(bare)


#: The model list (``GET /v1/models``, ``/v1/models/{id}``), answered by the gateway
#: itself (``extproc.core.models``); also without the prefix.
MODELS_PATH = "/models"


@dataclass(frozen=True, slots=True)
class ModelsTarget:
    """A request for the model list (``model`` None) or for one model."""

    model: str | None = None


def lookup_models(path: str) -> ModelsTarget | None:
    """The model-list request a path names, if any; the id is percent-decoded, the
    query string ignored."""
    bare = path.split("?", 1)[0]
    if len(bare) > 1 and bare.endswith("/"):
        bare = bare[:-1]
    for prefix in (API_PREFIX + MODELS_PATH, MODELS_PATH):
        if bare == prefix:
            return ModelsTarget()
        if bare.startswith(prefix + "/"):
            # Rule: an id may hold "/" (``openai/gpt-mini``), sent raw or as %2F.
            return ModelsTarget(unquote(bare[len(prefix) + 1 :], errors="replace"))
    return None
