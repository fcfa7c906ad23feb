"""The names of the tools a request offers the model, for the tools allowlist.

A key's (else its team's) ``metadata.allowed_tools`` must name every tool of the
request, wherever the API lets a request put one:

* OpenAI-style tool lists (chat completions, completions, the Responses API): a
  function tool by its function's name (``function.name``, or ``name`` in the
  Responses shape; both when both are given), a custom tool by its name, an MCP tool
  by its ``server_label`` (LiteLLM's rule) and, when the allowlist pins servers by
  URL or connector id, also by its ``server_url`` / ``connector_id`` (a label is only
  what the client calls the server), a
  ``namespace`` container by its member tools (never by its own name), any other
  tool by its ``type`` (built-in tools such as ``web_search_preview``,
  ``file_search``, ``code_interpreter``);
* chat completions' legacy ``functions`` (by ``name``), and ``web_search_options``
  (the provider's web search) as ``web_search``;
* Responses ``input`` items of type ``additional_tools`` (their ``tools`` list);
* Anthropic messages: ``tools`` by ``name`` (server tools too, e.g. ``web_search``),
  ``mcp_toolset`` tools by ``mcp_server_name``, and ``mcp_servers`` by ``name`` (and
  ``url``, when the allowlist pins servers).

Rule: a shape we cannot name (a list that is not a list, a tool that is not an
object, a name that is not a string) is a 400, never a tool that slips past the list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

from extproc.core.errors import InvalidParameterError

__all__ = ["ServerTarget", "ToolShapes", "pins_servers", "request_tool_names"]

#: Which tool fields an API has; ``none`` for APIs that take no tools (embeddings).
ToolShapes = Literal["none", "chat", "completions", "responses", "anthropic"]

#: Deepest nesting of namespace containers followed.
MAX_NAMESPACE_DEPTH = 4


def _invalid(message: str, param: str) -> InvalidParameterError:
    return InvalidParameterError(message, param=param)


def _items(value: Any, param: str) -> list[Any]:
    if not isinstance(value, list):
        raise _invalid(f"'{param}' must be an array", param)
    return value


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"'{param}' must be an object", param)
    return value


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"'{param}' must be a string", param)
    return value


def _named(tool: dict[str, Any], inner: str, param: str) -> list[str]:
    """Names of a function or custom tool: ``<inner>.name`` and/or ``name``."""
    names: list[str] = []
    if tool.get(inner) is not None:
        spec = _object(tool[inner], f"{param}.{inner}")
        names.append(_string(spec.get("name"), f"{param}.{inner}.name"))
    if tool.get("name") is not None or not names:
        names.append(_string(tool.get("name"), f"{param}.name"))
    return names


def _openai_tool(item: Any, param: str, depth: int) -> list[str]:
    tool = _object(item, param)
    kind = tool.get("type")
    if kind is not None:
        kind = _string(kind, f"{param}.type")
    if kind == "namespace":
        if depth >= MAX_NAMESPACE_DEPTH:
            raise _invalid(f"namespaces nest at most {MAX_NAMESPACE_DEPTH} deep", param)
        return _openai_tools(tool.get("tools"), f"{param}.tools", depth + 1)
    if kind == "mcp":
        label = _string(tool.get("server_label"), f"{param}.server_label")
        return [label, *_mcp_target(tool, ("server_url", "connector_id"), param)]
    if kind is None or kind == "function":
        return _named(tool, "function", param)
    if kind == "custom":
        return _named(tool, "custom", param)
    return [kind]  # a built-in tool, named by its type


class ServerTarget(str):
    """Where an MCP server really is (``server_url``, ``connector_id``, ``url``), as
    opposed to the label the client gives it: checked when the allowlist pins servers
    (see :func:`pins_servers`)."""

    __slots__ = ()


def pins_servers(allowed: Iterable[str]) -> bool:
    """Whether an allowlist names MCP servers by where they are (a URL, or a
    ``connector_`` id): then every MCP tool's target must be in it too."""
    return any("://" in entry or entry.startswith("connector_") for entry in allowed)


def _mcp_target(tool: dict[str, Any], fields: tuple[str, ...], param: str) -> list[str]:
    """The targets an MCP tool or server names (see :class:`ServerTarget`)."""
    return [
        ServerTarget(_string(tool[field], f"{param}.{field}"))
        for field in fields
        if tool.get(field) is not None
    ]


def _web_search_options(value: Any, param: str) -> list[str]:
    """Chat's ``web_search_options`` turns on the provider's web search: ``web_search``."""
    _object(value, param)
    return ["web_search"]


def _openai_tools(value: Any, param: str, depth: int = 0) -> list[str]:
    names: list[str] = []
    for i, tool in enumerate(_items(value, param)):
        names.extend(_openai_tool(tool, f"{param}[{i}]", depth))
    return names


def _functions(value: Any, param: str) -> list[str]:
    return [
        _string(_object(fn, f"{param}[{i}]").get("name"), f"{param}[{i}].name")
        for i, fn in enumerate(_items(value, param))
    ]


def _additional_tools(value: Any, param: str) -> list[str]:
    if not isinstance(value, list):
        return []  # a string input holds no tools
    names: list[str] = []
    for i, item in enumerate(value):
        if isinstance(item, dict) and item.get("type") == "additional_tools":
            names.extend(_openai_tools(item.get("tools"), f"{param}[{i}].tools"))
    return names


def _anthropic_tools(value: Any, param: str) -> list[str]:
    names: list[str] = []
    for i, item in enumerate(_items(value, param)):
        tool = _object(item, f"{param}[{i}]")
        if tool.get("type") == "mcp_toolset":
            names.append(_string(tool.get("mcp_server_name"), f"{param}[{i}].mcp_server_name"))
        else:
            names.append(_string(tool.get("name"), f"{param}[{i}].name"))
    return names


def _mcp_servers(value: Any, param: str) -> list[str]:
    names: list[str] = []
    for i, item in enumerate(_items(value, param)):
        server = _object(item, f"{param}[{i}]")
        names.append(_string(server.get("name"), f"{param}[{i}].name"))
        names.extend(_mcp_target(server, ("url",), f"{param}[{i}]"))
    return names


#: Per API: (body member, how to read its tool names).
_FIELDS: dict[ToolShapes, tuple[tuple[str, Callable[[Any, str], list[str]]], ...]] = {
    "none": (),
    "chat": (
        ("tools", _openai_tools),
        ("functions", _functions),
        ("web_search_options", _web_search_options),
    ),
    "completions": (("tools", _openai_tools),),
    "responses": (("tools", _openai_tools), ("input", _additional_tools)),
    "anthropic": (("tools", _anthropic_tools), ("mcp_servers", _mcp_servers)),
}


def request_tool_names(shapes: ToolShapes, member: Callable[[str], Any]) -> tuple[str, ...]:
    """Every tool name the request offers (see the module docstring); a 400 for a
    shape that cannot be named. ``member`` gives a top-level member's value (None when
    absent)."""
    names: list[str] = []
    for name, read in _FIELDS[shapes]:
        value = member(name)
        if value is not None:
            names.extend(read(value, name))
    return tuple(names)
