"""The tools allowlist sees every tool: one row per shape, allowed and refused."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.core.endpoints import lookup_endpoint
from extproc.core.errors import GatewayError
from extproc.core.request import RequestHead
from extproc.core.tools import request_tool_names
from extproc.policy import CompiledPolicy, load_policy
from tests.helpers import decide_request
from tests.unit.test_keys import CONFIG, ENV, NOW, POLICIES, call

#: allowed_tools of the key: get_weather, db, web_search_preview, web_search
KEY = "sk-tess-tools"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"


def fn(name: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {}}}


def rfn(name: Any) -> dict[str, Any]:
    """A function tool in the Responses shape."""
    return {"type": "function", "name": name, "parameters": {}}


def namespace(*tools: dict[str, Any], name: str = "db") -> dict[str, Any]:
    return {"type": "namespace", "name": name, "tools": list(tools)}


MCP_DB = {"type": "mcp", "server_label": "db"}


def extra_tools(*tools: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "hi"}, {"type": "additional_tools", "tools": list(tools)}]


# (id, path, body members, names the request offers, allowed)
SHAPES: list[tuple[str, str, dict[str, Any], tuple[str, ...], bool]] = [
    ("chat function", CHAT, {"tools": [fn("get_weather")]}, ("get_weather",), True),
    ("chat function refused", CHAT, {"tools": [fn("rm_rf")]}, ("rm_rf",), False),
    (
        "chat function with a second name",
        CHAT,
        {"tools": [{**fn("get_weather"), "name": "rm_rf"}]},
        ("get_weather", "rm_rf"),
        False,
    ),
    (
        "chat legacy functions",
        CHAT,
        {"functions": [{"name": "get_weather"}]},
        ("get_weather",),
        True,
    ),
    ("chat legacy functions refused", CHAT, {"functions": [{"name": "rm"}]}, ("rm",), False),
    (
        "chat custom tool",
        CHAT,
        {"tools": [{"type": "custom", "custom": {"name": "db"}}]},
        ("db",),
        True,
    ),
    (
        "chat custom tool refused",
        CHAT,
        {"tools": [{"type": "custom", "custom": {"name": "shell"}}]},
        ("shell",),
        False,
    ),
    ("completions tools", COMPLETIONS, {"tools": [fn("get_weather")]}, ("get_weather",), True),
    ("completions tools refused", COMPLETIONS, {"tools": [fn("rm_rf")]}, ("rm_rf",), False),
    ("responses function", RESPONSES, {"tools": [rfn("get_weather")]}, ("get_weather",), True),
    ("responses function refused", RESPONSES, {"tools": [rfn("rm_rf")]}, ("rm_rf",), False),
    (
        "responses custom tool",
        RESPONSES,
        {"tools": [{"type": "custom", "name": "db"}]},
        ("db",),
        True,
    ),
    (
        "responses custom tool refused",
        RESPONSES,
        {"tools": [{"type": "custom", "name": "shell"}]},
        ("shell",),
        False,
    ),
    (
        "responses built-in tool by type",
        RESPONSES,
        {"tools": [{"type": "web_search_preview"}]},
        ("web_search_preview",),
        True,
    ),
    (
        "responses built-in tool refused",
        RESPONSES,
        {"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]},
        ("code_interpreter",),
        False,
    ),
    (
        "responses mcp by server_label and url",
        RESPONSES,
        {"tools": [{"type": "mcp", "server_label": "db", "server_url": "https://mcp.internal/db"}]},
        ("db", "https://mcp.internal/db"),
        True,
    ),
    ("responses mcp by server_label alone", RESPONSES, {"tools": [MCP_DB]}, ("db",), True),
    (
        "responses mcp refused",
        RESPONSES,
        {"tools": [{"type": "mcp", "server_label": "files", "server_url": "https://x"}]},
        ("files", "https://x"),
        False,
    ),
    (
        "responses mcp with an allowed label pointing elsewhere",
        RESPONSES,
        {"tools": [{**MCP_DB, "server_url": "https://attacker.example/mcp"}]},
        ("db", "https://attacker.example/mcp"),
        False,
    ),
    (
        "responses mcp connector under an allowed label",
        RESPONSES,
        {"tools": [{**MCP_DB, "connector_id": "connector_gmail"}]},
        ("db", "connector_gmail"),
        False,
    ),
    (
        "chat web_search_options",
        CHAT,
        {"web_search_options": {"search_context_size": "high"}},
        ("web_search",),
        True,
    ),
    (
        "namespace by its members",
        RESPONSES,
        {"tools": [namespace(rfn("get_weather"), name="not_listed")]},
        ("get_weather",),
        True,
    ),
    (
        "namespace member refused (the container's name is allowed)",
        RESPONSES,
        {"tools": [namespace(rfn("get_weather"), rfn("rm_rf"), name="db")]},
        ("get_weather", "rm_rf"),
        False,
    ),
    (
        "nested namespace member refused",
        RESPONSES,
        {"tools": [namespace(namespace({"type": "mcp", "server_label": "files"}))]},
        ("files",),
        False,
    ),
    (
        "additional_tools input item",
        RESPONSES,
        {"input": extra_tools(rfn("get_weather"))},
        ("get_weather",),
        True,
    ),
    (
        "additional_tools input item refused",
        RESPONSES,
        {"input": extra_tools({"type": "mcp", "server_label": "files"})},
        ("files",),
        False,
    ),
    ("responses string input holds no tools", RESPONSES, {"input": "hi"}, (), True),
    (
        "anthropic tool by name",
        MESSAGES,
        {"tools": [{"name": "get_weather", "input_schema": {}}], "max_tokens": 5},
        ("get_weather",),
        True,
    ),
    (
        "anthropic tool refused",
        MESSAGES,
        {"tools": [{"name": "rm_rf", "input_schema": {}}], "max_tokens": 5},
        ("rm_rf",),
        False,
    ),
    (
        "anthropic server tool by name",
        MESSAGES,
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}], "max_tokens": 5},
        ("web_search",),
        True,
    ),
    (
        "anthropic server tool refused",
        MESSAGES,
        {"tools": [{"type": "bash_20250124", "name": "bash"}], "max_tokens": 5},
        ("bash",),
        False,
    ),
    (
        "anthropic mcp_toolset by server name",
        MESSAGES,
        {"tools": [{"type": "mcp_toolset", "mcp_server_name": "db"}], "max_tokens": 5},
        ("db",),
        True,
    ),
    (
        "anthropic mcp_servers refused",
        MESSAGES,
        {"mcp_servers": [{"type": "url", "url": "https://x", "name": "files"}], "max_tokens": 5},
        ("files", "https://x"),
        False,
    ),
    (
        "anthropic mcp_servers with an allowed name pointing elsewhere",
        MESSAGES,
        {"mcp_servers": [{"type": "url", "url": "https://x", "name": "db"}], "max_tokens": 5},
        ("db", "https://x"),
        False,
    ),
    (
        "anthropic mcp_servers by name and url",
        MESSAGES,
        {
            "mcp_servers": [{"type": "url", "url": "https://mcp.internal/db", "name": "db"}],
            "max_tokens": 5,
        },
        ("db", "https://mcp.internal/db"),
        True,
    ),
    (
        "embeddings take no tools (ignored)",
        "/v1/embeddings",
        {"input": "x", "tools": [fn("rm_rf")], "functions": "not even a list"},
        (),
        True,
    ),
]

# (id, path, body members, param of the 400)
BAD_SHAPES: list[tuple[str, str, dict[str, Any], str]] = [
    ("tools not a list", CHAT, {"tools": {"type": "function"}}, "tools"),
    ("a tool not an object", CHAT, {"tools": ["get_weather"]}, "tools[0]"),
    ("function name not a string", CHAT, {"tools": [fn(["rm_rf"])]}, "tools[0].function.name"),
    (
        "function not an object",
        CHAT,
        {"tools": [{"type": "function", "function": "x"}]},
        "tools[0].function",
    ),
    ("function without a name", CHAT, {"tools": [{"type": "function"}]}, "tools[0].name"),
    ("type not a string", RESPONSES, {"tools": [{"type": 5, "name": "x"}]}, "tools[0].type"),
    ("mcp without server_label", RESPONSES, {"tools": [{"type": "mcp"}]}, "tools[0].server_label"),
    (
        "namespace tools not a list",
        RESPONSES,
        {"tools": [{"type": "namespace", "name": "db", "tools": "x"}]},
        "tools[0].tools",
    ),
    ("functions not a list", CHAT, {"functions": {"name": "x"}}, "functions"),
    ("a function name not a string", CHAT, {"functions": [{"name": 1}]}, "functions[0].name"),
    (
        "additional_tools without a list",
        RESPONSES,
        {"input": [{"type": "additional_tools"}]},
        "input[0].tools",
    ),
    ("anthropic tool without a name", MESSAGES, {"tools": [{"input_schema": {}}]}, "tools[0].name"),
    ("mcp_servers entry not an object", MESSAGES, {"mcp_servers": ["files"]}, "mcp_servers[0]"),
]


def _deep_namespace(depth: int) -> dict[str, Any]:
    tool: dict[str, Any] = rfn("get_weather")
    for _ in range(depth):
        tool = namespace(tool)
    return tool


BAD_SHAPES.append(
    (
        "namespaces nested too deep",
        RESPONSES,
        {"tools": [_deep_namespace(6)]},
        "tools[0].tools[0].tools[0].tools[0].tools[0]",
    )
)


def _model(path: str) -> str:
    return "claude" if path == MESSAGES else "auto"


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return load_policy(POLICIES / "keys.yaml", env=ENV)


@pytest.mark.parametrize(
    ("path", "extra", "names", "allowed"), [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES]
)
def test_allowlist_sees_every_shape(
    policy: CompiledPolicy, path: str, extra: dict[str, Any], names: tuple[str, ...], allowed: bool
) -> None:
    endpoint = lookup_endpoint(path)
    assert endpoint is not None
    assert endpoint.tool_names(extra.get) == names
    if allowed:
        assert call(policy, KEY, _model(path), extra=extra, path=path).caller is not None
        return
    with pytest.raises(GatewayError) as info:
        call(policy, KEY, _model(path), extra=extra, path=path)
    err = info.value
    assert (err.status, err.code, err.param) == (403, "tool_access_denied", "tools")
    allowlist = {"get_weather", "db", "web_search_preview", "web_search", "https://mcp.internal/db"}
    refused = [n for n in names if n not in allowlist]
    assert refused
    assert all(repr(n) in err.message for n in refused)


@pytest.mark.parametrize(
    ("path", "extra", "param"), [s[1:] for s in BAD_SHAPES], ids=[s[0] for s in BAD_SHAPES]
)
def test_wrong_shapes_are_a_400_never_a_pass(
    policy: CompiledPolicy, path: str, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(GatewayError) as info:
        call(policy, KEY, _model(path), extra=extra, path=path)
    assert (info.value.status, info.value.code, info.value.param) == (
        400,
        "invalid_parameter",
        param,
    )


def test_shapes_are_only_read_when_an_allowlist_applies(policy: CompiledPolicy) -> None:
    # no allowed_tools on this key: the tools are the upstream's to validate
    decision = call(policy, "sk-alice-all", "auto", extra={"tools": "x"})
    assert decision.caller is not None


@pytest.mark.parametrize(
    ("shapes", "body", "names"),
    [
        ("none", {"tools": [fn("a")]}, ()),
        ("chat", {"tools": [fn("a")], "functions": [{"name": "b"}]}, ("a", "b")),
        ("completions", {"tools": [fn("a")], "functions": [{"name": "b"}]}, ("a",)),
        ("responses", {"tools": [rfn("a")], "input": extra_tools(rfn("b"))}, ("a", "b")),
        ("anthropic", {"tools": [{"name": "a"}], "mcp_servers": [{"name": "b"}]}, ("a", "b")),
    ],
)
def test_which_members_each_api_reads(
    shapes: Any, body: dict[str, Any], names: tuple[str, ...]
) -> None:
    assert request_tool_names(shapes, body.get) == names


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        (
            CHAT,
            b'{"model": "auto", "tools": [{"type": "function", '
            b'"function": {"name": "rm_rf", "n\\u0061me": "get_weather"}}]}',
            "tools",
        ),
        (
            RESPONSES,
            b'{"model": "auto", "input": [{"type": "additional_tools", '
            b'"tools": [{"type": "mcp", "server_label": "files", "server_label": "db"}]}]}',
            "input",
        ),
    ],
)
def test_a_tool_naming_a_key_twice_is_a_400(
    policy: CompiledPolicy, path: str, raw: bytes, param: str
) -> None:
    """The allowlist would read the last name; an upstream may read the first."""
    req_head = RequestHead("POST", path, {"authorization": f"Bearer {KEY}"})
    with pytest.raises(GatewayError) as info:
        decide_request(req_head, raw, policy, CONFIG, lambda: 0.1, now=NOW)
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_json", param)
    # without an allowlist nothing reads the tools: the body passes untouched
    other = RequestHead("POST", path, {"authorization": "Bearer sk-alice-all"})
    assert decide_request(other, raw, policy, CONFIG, lambda: 0.1, now=NOW).caller is not None


def test_chat_web_search_needs_web_search_allowed(policy: CompiledPolicy) -> None:
    extra: dict[str, Any] = {"web_search_options": {}}
    with pytest.raises(GatewayError) as info:
        call(policy, "sk-liam-tools", "auto", extra=extra, path=CHAT)
    assert (info.value.status, info.value.code) == (403, "tool_access_denied")
    with pytest.raises(GatewayError) as bad:
        call(policy, KEY, "auto", extra={"web_search_options": "high"}, path=CHAT)
    assert (bad.value.status, bad.value.param) == (400, "web_search_options")


@pytest.mark.parametrize(
    ("tool", "allowed"),
    [
        ({"type": "mcp", "server_label": "db"}, True),
        ({"type": "mcp", "server_label": "db", "server_url": "https://mcp.example/db"}, True),
        ({"type": "mcp", "server_label": "db", "connector_id": "connector_gmail"}, True),
        ({"type": "mcp", "server_label": "files", "server_url": "https://mcp.example/db"}, False),
    ],
)
def test_mcp_by_label_where_no_server_is_pinned(
    policy: CompiledPolicy, tool: dict[str, Any], allowed: bool
) -> None:
    """allowed_tools: [db] names no server by URL: an MCP tool is named by its label
    alone (LiteLLM's rule, and the issue's example)."""
    extra = {"tools": [tool]}
    if allowed:
        assert call(policy, "sk-mika-mcp", "auto", extra=extra, path=RESPONSES).caller is not None
        return
    with pytest.raises(GatewayError) as info:
        call(policy, "sk-mika-mcp", "auto", extra=extra, path=RESPONSES)
    assert info.value.code == "tool_access_denied"
