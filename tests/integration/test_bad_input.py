"""Bad input through the real Envoy, on both the ext_proc and ext_authz paths.

Every case must come back as an OpenAI-style error with a 4xx status, the same on
both paths, and the server must stay up (the stack fixtures also assert that its log
holds no error or traceback).
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import http_ok
from tests.integration.stack import Stack, post

CHAT = "/v1/chat/completions"
# (id, path, body, extra headers, status, code)
CASES: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("not-json", CHAT, b"hello there", {}, 400, "invalid_json"),
    ("malformed-json", CHAT, b'{"model": "auto", "messages": [', {}, 400, "invalid_json"),
    ("json-array", CHAT, b'[{"model": "auto"}]', {}, 400, "invalid_json"),
    ("json-null", CHAT, b"null", {}, 400, "invalid_json"),
    ("model-number", CHAT, b'{"model": 5, "messages": []}', {}, 400, "invalid_parameter"),
    ("model-object", CHAT, b'{"model": {"a": 1}}', {}, 400, "invalid_parameter"),
    ("missing-model", CHAT, b'{"messages": []}', {}, 400, "missing_parameter"),
    (
        "unknown-model",
        CHAT,
        b'{"model": "gpt-unknown", "messages": []}',
        {},
        404,
        "model_not_found",
    ),
    ("empty-body", CHAT, b"", {}, 400, "missing_body"),
    ("invalid-utf8", CHAT, b'{"model": "auto\xc3\x28"}', {}, 400, "invalid_json"),
    ("nan", CHAT, b'{"model": "auto", "temperature": NaN}', {}, 400, "invalid_json"),
    ("deep-nesting", CHAT, b"[" * 50_000 + b"]" * 50_000, {}, 400, "invalid_json"),
    ("stream-string", CHAT, b'{"model": "auto", "stream": "true"}', {}, 400, "invalid_parameter"),
    (
        "bad-session-header",
        CHAT,
        b'{"model": "auto"}',
        {"x-litellm-session-id": "a" * 300},
        400,
        "invalid_session_id",
    ),
    (
        "bad-tags",
        CHAT,
        b'{"model": "auto", "metadata": {"tags": [1, 2]}}',
        {},
        400,
        "invalid_parameter",
    ),
    (
        "oversized",
        CHAT,
        b'{"model": "auto", "x": "' + b"a" * (9 * 1024 * 1024) + b'"}',
        {},
        413,
        "payload_too_large",
    ),
    ("unknown-path", "/v1/files", b"{}", {}, 404, "unknown_route"),
    (
        "max-tokens-fraction",
        CHAT,
        b'{"model": "auto", "messages": [], "max_tokens": 1.5}',
        {},
        400,
        "invalid_parameter",
    ),
    (
        "max-tokens-negative",
        CHAT,
        b'{"model": "auto", "messages": [], "max_completion_tokens": -1}',
        {},
        400,
        "invalid_parameter",
    ),
    (
        "max-tokens-string",
        "/v1/messages",
        b'{"model": "claude", "messages": [], "max_tokens": "1024"}',
        {},
        400,
        "invalid_parameter",
    ),
    (
        "max-tokens-bool",
        "/v1/responses",
        b'{"model": "auto", "input": "hi", "max_output_tokens": true}',
        {},
        400,
        "invalid_parameter",
    ),
    ("n-zero", CHAT, b'{"model": "auto", "messages": [], "n": 0}', {}, 400, "invalid_parameter"),
    (
        "n-over-cap",
        CHAT,
        b'{"model": "auto", "messages": [], "n": 129}',
        {},
        400,
        "invalid_parameter",
    ),
    (
        "best-of-fraction",
        "/v1/completions",
        b'{"model": "auto", "prompt": "x", "best_of": 2.5}',
        {},
        400,
        "invalid_parameter",
    ),
    (
        "gzip-body",
        CHAT,
        b"\x1f\x8b\x08\x00",
        {"content-encoding": "gzip"},
        415,
        "unsupported_content_encoding",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "code"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
@pytest.mark.parametrize("which", ["stack", "authz_stack"])
def test_bad_input_is_an_openai_error(
    request: pytest.FixtureRequest,
    which: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    stack: Stack = request.getfixturevalue(which)
    got_status, got_headers, payload = post(f"{stack.url}{path}", body, headers)
    assert got_status == status, payload[:300]
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert got_headers.get("content-type", "").startswith("application/json")
    assert "x-mock-upstream" not in got_headers
    assert http_ok(f"{stack.admin_url}/healthz")


# (id, body, the member named twice)
DUPLICATES: list[tuple[str, bytes, str]] = [
    ("model", b'{"model": "only-a", "model": "auto", "messages": []}', "model"),
    ("model-escaped", b'{"\\u006dodel": "only-a", "model": "auto", "messages": []}', "model"),
    ("stream", b'{"model": "auto", "stream": false, "stream": true}', "stream"),
    ("max-tokens", b'{"model": "auto", "max_tokens": 1, "max_tokens": 100000}', "max_tokens"),
    ("tools-escaped", b'{"model": "auto", "tools": [], "tool\\u0073": [{"type": "x"}]}', "tools"),
    (
        "metadata-session",
        b'{"model": "auto", "metadata": {"session_id": "a", "session_\\u0069d": "b"}}',
        "metadata",
    ),
]


@pytest.mark.parametrize(
    ("body", "member"), [d[1:] for d in DUPLICATES], ids=[d[0] for d in DUPLICATES]
)
@pytest.mark.parametrize("which", ["stack", "authz_stack"])
def test_duplicate_policy_member_is_refused(
    request: pytest.FixtureRequest, which: str, body: bytes, member: str
) -> None:
    stack: Stack = request.getfixturevalue(which)
    stack.mocks.clear()
    status, headers, payload = post(f"{stack.url}{CHAT}", body)
    assert status == 400, payload[:300]
    error = json.loads(payload)["error"]
    assert (error["code"], error["param"]) == ("invalid_json", member)
    assert headers.get("x-extproc-error") == "invalid_json"
    assert all(not stack.mocks.seen(cluster) for cluster in stack.mocks.ports)


@pytest.mark.parametrize("which", ["stack", "authz_stack"])
def test_duplicate_of_an_unread_member_passes_byte_exact(
    request: pytest.FixtureRequest, which: str
) -> None:
    stack: Stack = request.getfixturevalue(which)
    stack.mocks.clear()
    body = b'{"temperature": 1, "model": "only-a", "temperature": 2, "messages": [], "x": 1e400}'
    status, headers, payload = post(f"{stack.url}{CHAT}", body)
    assert status == 200, payload[:300]
    assert headers["x-mock-upstream"] == "mock_a"
    seen = stack.mocks.seen("mock_a")
    assert len(seen) == 1
    # ext_authz cannot rewrite the body: the upstream gets the client's model name
    model = b'"up-model-a"' if stack.mode == "ext_proc" else b'"only-a"'
    assert seen[0]["body"].encode() == body.replace(b'"only-a"', model)
