"""Methods and paths through the real Envoy, on both the ext_proc and ext_authz paths:
a method other than POST on an LLM path is a 405, and an LLM path sent without the
``/v1`` prefix reaches the upstream with it, query string and all."""

from __future__ import annotations

import http.client
import json
import urllib.parse

import pytest

from tests.integration.stack import Stack

MODES = ["stack", "authz_stack"]


def send(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=15)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body, {"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/embeddings?x=1", "/v1/messages"])
@pytest.mark.parametrize("which", MODES)
def test_other_methods_are_a_405_with_allow(
    request: pytest.FixtureRequest, which: str, method: str, path: str
) -> None:
    stack: Stack = request.getfixturevalue(which)
    stack.mocks.clear()
    body = b'{"model": "auto"}' if method in ("PUT", "PATCH") else None
    status, headers, payload = send(method, f"{stack.url}{path}", body)
    assert status == 405, payload[:300]
    assert headers["allow"] == "POST"
    assert headers["content-type"].startswith("application/json")
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "method_not_allowed")
    assert all(not stack.mocks.seen(cluster) for cluster in stack.mocks.ports)


# (path sent, body, cluster, path the upstream must see)
QUERY = "?api-version=2024-10-21&q=a%2Fb"
PATHS: list[tuple[str, dict[str, object], str, str]] = [
    (
        f"/chat/completions{QUERY}",
        {"model": "only-a", "messages": []},
        "mock_a",
        f"/v1/chat/completions{QUERY}",
    ),
    ("/completions", {"model": "only-a", "prompt": "x"}, "mock_a", "/v1/completions"),
    ("/embeddings/", {"model": "only-a", "input": "x"}, "mock_a", "/v1/embeddings"),
    ("/responses?stream=0", {"model": "only-a", "input": "x"}, "mock_a", "/v1/responses?stream=0"),
    (
        "/messages",
        {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        "mock_c",
        "/v1/messages",
    ),
    (
        f"/v1/chat/completions{QUERY}",
        {"model": "only-a", "messages": []},
        "mock_a",
        f"/v1/chat/completions{QUERY}",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "cluster", "upstream_path"), PATHS, ids=[p[0] for p in PATHS]
)
@pytest.mark.parametrize("which", MODES)
def test_unprefixed_paths_reach_the_upstream_under_v1(
    request: pytest.FixtureRequest,
    which: str,
    path: str,
    body: dict[str, object],
    cluster: str,
    upstream_path: str,
) -> None:
    stack: Stack = request.getfixturevalue(which)
    stack.mocks.clear()
    status, headers, payload = send("POST", f"{stack.url}{path}", json.dumps(body).encode())
    assert status == 200, payload[:300]
    assert headers["x-mock-upstream"] == cluster
    seen = stack.mocks.seen(cluster)
    assert [s["path"] for s in seen] == [upstream_path]
