"""Model lists through the real Envoy in both modes, with the official SDKs."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator

import anthropic
import openai
import pytest

from tests.integration.stack import POLICIES, Stack, start_stack

MODES = ["ext_proc", "ext_authz"]
ALL = ["auto", "only-a", "claude", "openai/gpt-mini"]


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stack]]:
    policy = POLICIES / "keys.yaml"
    with (
        start_stack(tmp_path_factory.mktemp("mp"), policy=policy) as ext_proc,
        start_stack(tmp_path_factory.mktemp("ma"), mode="ext_authz", policy=policy) as authz,
    ):
        yield {"ext_proc": ext_proc, "ext_authz": authz}
        logs = ext_proc.server_log() + authz.server_log()
    assert "Traceback" not in logs, logs
    assert " ERROR " not in logs, logs


def get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=15)
    try:
        conn.request("GET", url[len(f"{parts.scheme}://{parts.netloc}") :], headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def openai_client(stack: Stack, key: str, prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}{prefix}", api_key=key, max_retries=0)


def anthropic_client(stack: Stack, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=key, max_retries=0)


@pytest.mark.parametrize("mode", MODES)
def test_openai_sdk_lists_only_the_keys_groups(stacks: dict[str, Stack], mode: str) -> None:
    stack = stacks[mode]
    stack.mocks.clear()
    with openai_client(stack, "sk-frank-team") as limited:
        assert [m.id for m in limited.models.list()] == ["auto", "only-a"]
        model = limited.models.retrieve("only-a")
        assert (model.id, model.object, model.owned_by) == ("only-a", "model", "openai")
        with pytest.raises(openai.NotFoundError) as info:
            limited.models.retrieve("claude")
        assert info.value.code == "model_not_found"
    with openai_client(stack, "sk-alice-all") as everyone:
        assert [m.id for m in everyone.models.list()] == ALL
        assert everyone.models.retrieve("openai/gpt-mini").id == "openai/gpt-mini"
    with openai_client(stack, "sk-bob-only-a", prefix="") as unprefixed:
        assert [m.id for m in unprefixed.models.list()] == ["only-a"]
    # answered by the server: no upstream saw a request
    for cluster in ("mock_a", "mock_b", "mock_c"):
        assert stack.mocks.seen(cluster) == []


@pytest.mark.parametrize("mode", MODES)
def test_anthropic_sdk_lists_only_the_keys_groups(stacks: dict[str, Stack], mode: str) -> None:
    stack = stacks[mode]
    with anthropic_client(stack, "sk-oscar-org") as client:
        page = client.models.list()
        assert [m.id for m in page] == ["claude"]
        assert page.has_more is False
        assert client.models.retrieve("claude").display_name == "claude"
    with anthropic_client(stack, "sk-alice-all") as everyone:
        assert [m.id for m in everyone.models.list()] == ALL


@pytest.mark.parametrize("mode", MODES)
def test_bad_keys_get_the_call_paths_401(stacks: dict[str, Stack], mode: str) -> None:
    stack = stacks[mode]
    with (
        openai_client(stack, "sk-nobody") as client,
        pytest.raises(openai.AuthenticationError) as openai_err,
    ):
        client.models.list()
    assert openai_err.value.code == "invalid_api_key"
    with (
        anthropic_client(stack, "sk-nobody") as other,
        pytest.raises(anthropic.AuthenticationError),
    ):
        other.models.list()
    status, headers, body = get(f"{stack.url}/v1/models", {})
    assert (status, headers["x-extproc-error"]) == (401, "missing_api_key")
    assert json.loads(body)["error"]["code"] == "missing_api_key"


HOSTILE = [
    ("/v1/models/" + "x" * 6000, 404),
    ("/v1/models/%ff%fe%00", 404),
    ("/v1/models/a%0d%0aset-cookie:%20x", 404),
    ("/v1/models/%", 404),
    ("/v1/models/..%2f..%2fetc", 404),
    ("/v1/models/only-a?x=%ff&&=", 200),
    ("/v1/models?limit=-1&after_id=%00", 200),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("path", "status"), HOSTILE)
def test_hostile_ids_get_a_clean_answer(
    stacks: dict[str, Stack], mode: str, path: str, status: int
) -> None:
    got, headers, body = get(stacks[mode].url + path, {"authorization": "Bearer sk-alice-all"})
    payload = json.loads(body)
    assert got == status, payload
    assert headers["content-type"] == "application/json"
    if status == 404:
        assert headers["x-extproc-error"] == "model_not_found"
        assert set(payload["error"]) == {"message", "type", "param", "code"}
        assert "set-cookie" not in headers


@pytest.mark.parametrize("mode", MODES)
def test_post_to_the_model_list_is_405(stacks: dict[str, Stack], mode: str) -> None:
    parts = urllib.parse.urlsplit(stacks[mode].url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=15)
    try:
        conn.request("POST", "/v1/models", b"{}", {"authorization": "Bearer sk-alice-all"})
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("allow")) == (405, "GET")
        assert json.loads(resp.read())["error"]["code"] == "method_not_allowed"
    finally:
        conn.close()
