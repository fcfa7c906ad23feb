"""Input a provider bills that the request body does not hold.

The reservation estimates a call's input from its body. Some calls make the provider
add input of its own: a stored conversation (Responses ``previous_response_id``,
``conversation``, a stored ``prompt``), files by id or URL, documents and images it
fetches, and the results of tools it runs itself (web search and fetch, file search,
code execution, MCP) fed back as input. Such a call is reserved at the deployment's
whole context window (images by URL at a fixed size each), so concurrent calls cannot
overshoot a budget by what their bodies do not show.

Decided on the parsed body, never on raw bytes: a key spelled with escapes
(``"\\u0066ile_id"``) is what every upstream parser reads, and a function tool the
client runs itself that happens to be called ``web_search`` is not a server tool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["IMAGE_URL_TOKENS", "ProviderInput", "provider_input"]

#: Tokens reserved for each image the provider fetches by URL (a large image at high
#: detail costs OpenAI and Anthropic models up to about 1,600).
IMAGE_URL_TOKENS = 2_000
#: Members naming state the provider keeps (Responses).
_STORED = ("previous_response_id", "conversation")
#: Tool types the provider runs itself (OpenAI's names, and Anthropic's dated ones by
#: prefix: ``web_search_20250305``, ``code_execution_20250522``, ``mcp_toolset``, ...).
_SERVER_TOOLS: tuple[str, ...] = (
    "mcp",
    "web_search",
    "web_fetch",
    "file_search",
    "code_interpreter",
    "code_execution",
)
#: Content part types whose content the provider fetches or stores.
_REMOTE_PARTS = frozenset({"input_file", "file", "container_upload"})
#: How deep content is followed (messages → content → parts → sources).
_MAX_DEPTH = 8


@dataclass(frozen=True, slots=True)
class ProviderInput:
    #: The provider adds input of unknown size: reserve the whole context window.
    unbounded: bool = False
    #: Input tokens of images fetched by URL.
    image_tokens: int = 0


#: Without one of these bytes a body names no remote content (an escaped spelling
#: needs ``\u``): the walk over its messages is skipped.
_MAY_BE_REMOTE = (b"file", b"url", b"source", b"image", b"container", b"tools", b"\\u")


def _server_tool(tool: Any, depth: int = 0) -> bool:
    if not isinstance(tool, dict) or depth > _MAX_DEPTH:
        return False
    kind = tool.get("type")
    if kind == "namespace":
        members = tool.get("tools")
        return isinstance(members, list) and any(_server_tool(t, depth + 1) for t in members)
    return isinstance(kind, str) and kind.startswith(_SERVER_TOOLS)


class _Walk:
    __slots__ = ("images", "unbounded")

    def __init__(self) -> None:
        self.unbounded = False
        self.images = 0

    def value(self, value: Any, depth: int) -> None:
        if self.unbounded or depth > _MAX_DEPTH:
            return
        if isinstance(value, list):
            for item in value:
                self.value(item, depth + 1)
        elif isinstance(value, dict):
            self.part(value, depth)

    def part(self, part: dict[str, Any], depth: int) -> None:
        kind = part.get("type")
        if "file_id" in part or "file_url" in part or kind in _REMOTE_PARTS:
            self.unbounded = True
            return
        tools = part.get("tools") if kind == "additional_tools" else None
        if isinstance(tools, list) and any(_server_tool(tool) for tool in tools):
            self.unbounded = True
            return
        source = part.get("source")
        if isinstance(source, dict) and source.get("type") in ("url", "file"):
            # Anthropic: a document fetched or stored by the provider is unbounded,
            # an image is one image
            if kind == "image":
                self.images += 1
            else:
                self.unbounded = True
                return
        if kind in ("image_url", "input_image"):
            url = part.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
            if isinstance(url, str) and not url.startswith("data:"):
                self.images += 1
        for item in part.values():
            if isinstance(item, list | dict):
                self.value(item, depth + 1)


def provider_input(body: dict[str, Any], raw: bytes | None = None) -> ProviderInput:
    """What the provider adds to ``body``'s input (see the module's rules); ``raw``,
    the body's bytes, lets a body that cannot name remote content skip the walk."""
    if any(body.get(name) is not None for name in _STORED) or isinstance(body.get("prompt"), dict):
        return ProviderInput(unbounded=True)
    if body.get("mcp_servers") or body.get("web_search_options") is not None:
        return ProviderInput(unbounded=True)
    tools = body.get("tools")
    if isinstance(tools, list) and any(_server_tool(tool) for tool in tools):
        return ProviderInput(unbounded=True)
    if raw is not None and not any(part in raw for part in _MAY_BE_REMOTE):
        return ProviderInput()
    walk = _Walk()
    for name in ("messages", "input", "system"):
        walk.value(body.get(name), 0)
        if walk.unbounded:
            return ProviderInput(unbounded=True)
    return ProviderInput(image_tokens=walk.images * IMAGE_URL_TOKENS)
