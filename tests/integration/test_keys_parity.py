"""Every key rule gives the same status and code through ext_proc and ext_authz."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.stack import POLICIES, Stack, post, start_stack
from tests.unit.test_keys import DENIED, RULES_DENIED
from tests.unit.test_tools import KEY as TOOLS_KEY
from tests.unit.test_tools import SHAPES


@pytest.fixture(scope="module")
def keys_stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stack]]:
    policy = POLICIES / "keys.yaml"
    with (
        start_stack(tmp_path_factory.mktemp("kp"), policy=policy) as ext_proc,
        start_stack(tmp_path_factory.mktemp("ka"), mode="ext_authz", policy=policy) as authz,
    ):
        yield {"ext_proc": ext_proc, "ext_authz": authz}
        logs = ext_proc.server_log() + authz.server_log()
    assert "Traceback" not in logs


CHAT = "/v1/chat/completions"
# (key, model, extra body, path, status, code)
CASES: list[tuple[str | None, str, dict[str, Any], str, int, str | None]] = [
    *((d[1], d[2], {}, CHAT, d[3], d[4]) for d in DENIED),
    *((r[1], r[2], r[3], r[4], r[5], r[6]) for r in RULES_DENIED),
    ("sk-frank-team", "fast", {}, CHAT, 200, None),
]
IDS = [d[0] for d in DENIED] + [r[0] for r in RULES_DENIED] + ["team alias allowed"]


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz"])
@pytest.mark.parametrize(("key", "model", "extra", "path", "status", "code"), CASES, ids=IDS)
def test_same_decision_on_both_paths(
    keys_stacks: dict[str, Stack],
    mode: str,
    key: str | None,
    model: str,
    extra: dict[str, Any],
    path: str,
    status: int,
    code: str | None,
) -> None:
    stack = keys_stacks[mode]
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})
    got, resp_headers, payload = post(f"{stack.url}{path}", body.encode(), headers)
    assert got == status, payload[:300]
    if code is None:
        assert resp_headers["x-mock-upstream"] == "mock_a"
        return
    error = json.loads(payload)["error"]
    assert error["code"] == code
    if key:
        assert key not in payload.decode()


TOOL_SHAPES = [
    s
    for s in SHAPES
    if s[0]
    in {
        "chat function refused",
        "chat legacy functions refused",
        "responses built-in tool refused",
        "responses mcp refused",
        "namespace member refused (the container's name is allowed)",
        "additional_tools input item refused",
        "anthropic mcp_servers refused",
        "responses mcp by server_label",
        "anthropic tool by name",
    }
]


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz"])
@pytest.mark.parametrize(
    ("path", "extra", "allowed"),
    [(s[1], s[2], s[4]) for s in TOOL_SHAPES],
    ids=[s[0] for s in TOOL_SHAPES],
)
def test_tools_allowlist_through_envoy(
    keys_stacks: dict[str, Stack], mode: str, path: str, extra: dict[str, Any], allowed: bool
) -> None:
    stack = keys_stacks[mode]
    stack.mocks.clear()
    model = "claude" if path == "/v1/messages" else "auto"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})
    headers = {"authorization": f"Bearer {TOOLS_KEY}"}
    status, resp_headers, payload = post(f"{stack.url}{path}", body.encode(), headers)
    if allowed:
        assert status == 200, payload[:300]
        return
    assert status == 403, payload[:300]
    assert resp_headers["content-type"].startswith("application/json")
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (
        "permission_error",
        "tool_access_denied",
        "tools",
    )
    assert all(not stack.mocks.seen(cluster) for cluster in stack.mocks.ports)


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz"])
@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (b'{"model": "auto", "tools": "x"}', "invalid_parameter", "tools"),
        (
            b'{"model": "auto", "tools": [{"type": "mcp"}]}',
            "invalid_parameter",
            "tools[0].server_label",
        ),
        (
            b'{"model": "auto", "tools": [{"type": "function", '
            b'"function": {"name": "rm_rf", "n\\u0061me": "get_weather"}}]}',
            "invalid_json",
            "tools",
        ),
    ],
    ids=["tools-not-a-list", "mcp-without-label", "tool-name-twice"],
)
def test_tool_shapes_that_cannot_be_named_through_envoy(
    keys_stacks: dict[str, Stack], mode: str, raw: bytes, code: str, param: str
) -> None:
    stack = keys_stacks[mode]
    stack.mocks.clear()
    headers = {"authorization": f"Bearer {TOOLS_KEY}"}
    status, _, payload = post(f"{stack.url}/v1/chat/completions", raw, headers)
    assert status == 400, payload[:300]
    error = json.loads(payload)["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert all(not stack.mocks.seen(cluster) for cluster in stack.mocks.ports)
