"""The model list the gateway answers itself: which groups a key sees, both shapes."""

from __future__ import annotations

import json
from typing import Any

import anthropic.types
import openai.types
import pytest

from extproc.core.decision import decide_head
from extproc.core.endpoints import ModelsTarget, lookup_models
from extproc.core.errors import GatewayError
from extproc.core.models import CREATED, OWNED_BY, answer_models
from extproc.core.request import RequestHead
from extproc.policy import CompiledPolicy, load_policy
from tests.unit.test_keys import CONFIG, ENV, NOW, POLICIES

ALL = ["auto", "only-a", "claude", "openai/gpt-mini"]


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return load_policy(POLICIES / "keys.yaml", env=ENV)


def get(
    policy: CompiledPolicy,
    path: str,
    key: str | None = "sk-alice-all",
    *,
    anthropic_sdk: bool = False,
    method: str = "GET",
) -> Any:
    headers: dict[str, str] = {}
    if anthropic_sdk:
        headers["anthropic-version"] = "2023-06-01"
        if key is not None:
            headers["x-api-key"] = key
    elif key is not None:
        headers["authorization"] = f"Bearer {key}"
    decision = decide_head(RequestHead(method, path, headers), CONFIG, policy, NOW, has_body=False)
    assert decision.action == "answer"
    assert decision.answer is not None
    assert decision.answer.status == 200
    assert dict(decision.answer.headers)["content-type"] == "application/json"
    return json.loads(decision.answer.body)


@pytest.mark.parametrize(
    ("key", "groups"),
    [
        ("sk-alice-all", ALL),
        ("sk-bob-only-a", ["only-a"]),
        ("sk-frank-team", ["auto", "only-a"]),
        ("sk-gina-wildcard", ["only-a"]),
        ("sk-hank-access-group", ["auto"]),
        ("sk-ivy-provider", ["claude"]),
        ("sk-nina-user", ["only-a"]),
        ("sk-oscar-org", ["claude"]),
        ("sk-quinn-project", ["auto"]),
    ],
    ids=[
        "no list",
        "exact",
        "team",
        "wildcard",
        "access group",
        "provider",
        "user",
        "org",
        "project",
    ],
)
def test_a_key_sees_the_groups_it_may_call(
    policy: CompiledPolicy, key: str, groups: list[str]
) -> None:
    listed = get(policy, "/v1/models", key)
    assert [m["id"] for m in listed["data"]] == groups
    anthropic_listed = get(policy, "/v1/models", key, anthropic_sdk=True)
    assert [m["id"] for m in anthropic_listed["data"]] == groups


def test_no_keys_lists_every_group(policy: CompiledPolicy) -> None:
    body = json.loads(answer_models(ModelsTarget(), None, policy, "openai").body)
    assert [m["id"] for m in body["data"]] == ALL


def test_openai_shape_parses_as_the_sdk_types(policy: CompiledPolicy) -> None:
    listed = get(policy, "/models")
    assert listed["object"] == "list"
    assert listed["data"][0] == {
        "id": "auto",
        "object": "model",
        "created": CREATED,
        "owned_by": OWNED_BY,
    }
    for entry in listed["data"]:
        openai.types.Model.model_validate(entry, strict=True)
    one = get(policy, "/v1/models/only-a")
    assert one == {"id": "only-a", "object": "model", "created": CREATED, "owned_by": OWNED_BY}


def test_anthropic_shape_parses_as_the_sdk_types(policy: CompiledPolicy) -> None:
    listed = get(policy, "/v1/models", anthropic_sdk=True)
    assert set(listed) == {"data", "has_more", "first_id", "last_id"}
    assert (listed["has_more"], listed["first_id"], listed["last_id"]) == (
        False,
        "auto",
        "openai/gpt-mini",
    )
    infos = [anthropic.types.ModelInfo.model_validate(m) for m in listed["data"]]
    assert infos[0].type == "model"
    assert infos[0].created_at.timestamp() == CREATED
    one = get(policy, "/v1/models/claude", anthropic_sdk=True)
    assert anthropic.types.ModelInfo.model_validate(one).id == "claude"


def test_empty_list_has_no_ids() -> None:
    body = json.loads(
        answer_models(ModelsTarget(), None, CompiledPolicy(groups={}), "anthropic").body
    )
    assert body == {"data": [], "has_more": False, "first_id": None, "last_id": None}


@pytest.mark.parametrize(
    ("path", "found"),
    [
        ("/v1/models/openai%2Fgpt-mini", "openai/gpt-mini"),
        ("/v1/models/openai/gpt-mini", "openai/gpt-mini"),
        ("/v1/models/only-a?x=1", "only-a"),
        ("/models/only-a/", "only-a"),
    ],
)
def test_one_model_by_any_spelling_of_its_id(policy: CompiledPolicy, path: str, found: str) -> None:
    assert get(policy, path)["id"] == found


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models?limit=1&after_id=auto",
        "/v1/models/",
        "/models",
    ],
)
def test_list_paths(policy: CompiledPolicy, path: str) -> None:
    assert [m["id"] for m in get(policy, path)["data"]] == ALL


def refusal(
    policy: CompiledPolicy, path: str, headers: dict[str, str], method: str = "GET"
) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        decide_head(RequestHead(method, path, headers), CONFIG, policy, NOW, has_body=False)
    body = json.loads(info.value.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return info.value


BOB = {"authorization": "Bearer sk-bob-only-a"}


@pytest.mark.parametrize(
    ("path", "headers", "method", "status", "code"),
    [
        ("/v1/models", {}, "GET", 401, "missing_api_key"),
        ("/v1/models", {"authorization": "Bearer sk-nobody"}, "GET", 401, "invalid_api_key"),
        (
            "/v1/models",
            {"x-api-key": "sk-nobody", "anthropic-version": "1"},
            "GET",
            401,
            "invalid_api_key",
        ),
        ("/v1/models", {"authorization": "Bearer sk-carol-expired"}, "GET", 401, "key_expired"),
        ("/v1/models", {"authorization": "Bearer sk-dave-blocked"}, "GET", 403, "key_blocked"),
        ("/v1/models", {"authorization": "Bearer sk-kate-routes"}, "GET", 403, "route_not_allowed"),
        ("/v1/models", BOB, "POST", 405, "method_not_allowed"),
        ("/v1/models/auto", BOB, "GET", 404, "model_not_found"),
        ("/v1/models/nope", BOB, "GET", 404, "model_not_found"),
        ("/v1/models/" + "x" * 100_000, BOB, "GET", 404, "model_not_found"),
        ("/v1/models/%ff%fe%00", BOB, "GET", 404, "model_not_found"),
        ("/v1/models/a%0d%0aset-cookie:%20x", BOB, "GET", 404, "model_not_found"),
        ("/v1/models/%", BOB, "GET", 404, "model_not_found"),
    ],
    ids=[
        "no key",
        "unknown key",
        "unknown x-api-key",
        "expired",
        "blocked",
        "route",
        "POST",
        "not allowed",
        "unknown",
        "long id",
        "bad utf-8",
        "crlf",
        "lone percent",
    ],
)
def test_refusals(
    policy: CompiledPolicy,
    path: str,
    headers: dict[str, str],
    method: str,
    status: int,
    code: str,
) -> None:
    err = refusal(policy, path, headers, method)
    assert (err.status, err.code) == (status, code)
    assert len(err.body()) < 1024
    assert b"\r" not in err.body()
    assert b"\n" not in err.body()
    if code == "method_not_allowed":
        assert err.response_headers()["allow"] == "GET"


def test_lookup_models_leaves_other_paths() -> None:
    for path in ("/v1/modelsx", "/v1/chat/completions", "/v2/models", "/v1/model"):
        assert lookup_models(path) is None
