"""Every key rule gives the same status and code through ext_proc and ext_authz."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.integration.stack import POLICIES, Stack, post, start_stack
from tests.unit.test_keys import DENIED


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


CASES = [(d[1], d[2], d[3], d[4]) for d in DENIED] + [("sk-frank-team", "fast", 200, None)]


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz"])
@pytest.mark.parametrize(
    ("key", "model", "status", "code"), CASES, ids=[d[0] for d in DENIED] + ["team alias allowed"]
)
def test_same_decision_on_both_paths(
    keys_stacks: dict[str, Stack],
    mode: str,
    key: str | None,
    model: str,
    status: int,
    code: str | None,
) -> None:
    stack = keys_stacks[mode]
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    got, resp_headers, payload = post(f"{stack.url}/v1/chat/completions", body.encode(), headers)
    assert got == status, payload[:300]
    if code is None:
        assert resp_headers["x-mock-upstream"] == "mock_a"
        return
    error = json.loads(payload)["error"]
    assert error["code"] == code
    if key:
        assert key not in payload.decode()
