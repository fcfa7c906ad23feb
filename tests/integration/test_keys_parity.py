"""Every key rule gives the same status and code through ext_proc and ext_authz."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.stack import POLICIES, Stack, post, start_stack
from tests.unit.test_keys import DENIED, RULES_DENIED


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
