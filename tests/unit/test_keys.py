"""Virtual-key checks in the decision core, one row per rule."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from extproc.cli.main import main, new_key
from extproc.core.access import hash_key
from extproc.core.decision import GatewayConfig, RouteDecision, decide_head
from extproc.core.errors import GatewayError
from extproc.core.request import RequestHead
from extproc.policy import CompiledPolicy, PolicyError, load_policy
from tests.helpers import decide_request

POLICIES = Path(__file__).resolve().parent.parent / "policies"
ENV = {"TEST_KEY_A": "sk-a", "TEST_KEY_B": "sk-b", "TEST_KEY_C": "sk-c"}
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
CONFIG = GatewayConfig()


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return load_policy(POLICIES / "keys.yaml", env=ENV)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def call(
    policy: CompiledPolicy,
    key: str | None,
    model: str,
    *,
    header: str = "authorization",
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
) -> RouteDecision:
    hdrs = dict(headers or {})
    if key is not None:
        hdrs[header] = f"Bearer {key}" if header == "authorization" else key
    head = RequestHead("POST", path, hdrs)
    decide_head(head, CONFIG, policy, NOW, has_body=True)
    # a real conversation: a call to an Anthropic group (claude) is translated
    messages = [{"role": "user", "content": "hi"}]
    raw = json.dumps({"model": model, "messages": messages, **(extra or {})}).encode()
    return decide_request(head, raw, policy, CONFIG, lambda: 0.1, now=NOW)


ALLOWED = [
    ("all models by default", "sk-alice-all", "claude", "dep-claude"),
    ("exact model", "sk-bob-only-a", "only-a", "only-a-dep"),
    ("team models", "sk-frank-team", "auto", "dep-a"),
    ("team alias resolves to its group", "sk-frank-team", "fast", "only-a-dep"),
    ("wildcard pattern", "sk-gina-wildcard", "only-a", "only-a-dep"),
    ("access group", "sk-hank-access-group", "auto", "dep-a"),
    ("provider wildcard", "sk-ivy-provider", "claude", "dep-claude"),
    ("user models on a personal key", "sk-nina-user", "only-a", "only-a-dep"),
    ("org models", "sk-oscar-org", "claude", "dep-claude"),
    ("org through the team", "sk-rita-team-org", "claude", "dep-claude"),
    ("project models", "sk-quinn-project", "auto", "dep-a"),
]

# (name, key, model, extra body, extra headers, path)
RULES_ALLOWED: list[tuple[str, str, str, dict[str, Any], dict[str, str], str]] = [
    (
        "agent key with trace id",
        "sk-jack-agent",
        "auto",
        {},
        {"x-litellm-trace-id": "t1"},
        "/v1/chat/completions",
    ),
    ("allowed route", "sk-kate-routes", "auto", {"input": "x"}, {}, "/v1/embeddings"),
    ("allowed tool", "sk-liam-tools", "auto", {"tools": TOOLS}, {}, "/v1/chat/completions"),
    ("no tools at all", "sk-liam-tools", "auto", {}, {}, "/v1/chat/completions"),
    (
        "team tools (anthropic shape)",
        "sk-mia-team-tools",
        "claude",
        {"tools": [{"name": "search", "input_schema": {}}], "max_tokens": 5},
        {},
        "/v1/messages",
    ),
]


@pytest.mark.parametrize(
    ("name", "key", "model", "extra", "headers", "path"),
    RULES_ALLOWED,
    ids=[r[0] for r in RULES_ALLOWED],
)
def test_rules_allow(
    policy: CompiledPolicy,
    name: str,
    key: str,
    model: str,
    extra: dict[str, Any],
    headers: dict[str, str],
    path: str,
) -> None:
    assert call(policy, key, model, extra=extra, headers=headers, path=path).caller is not None


RULES_DENIED: list[tuple[str, str, str, dict[str, Any], str, int, str]] = [
    (
        "agent key without trace id",
        "sk-jack-agent",
        "auto",
        {},
        "/v1/chat/completions",
        400,
        "trace_id_required",
    ),
    (
        "route not allowed",
        "sk-kate-routes",
        "auto",
        {},
        "/v1/chat/completions",
        403,
        "route_not_allowed",
    ),
    (
        "tool not allowed",
        "sk-liam-tools",
        "auto",
        {"tools": [{"type": "function", "function": {"name": "rm_rf"}}]},
        "/v1/chat/completions",
        403,
        "tool_access_denied",
    ),
    (
        "team tool not allowed",
        "sk-mia-team-tools",
        "auto",
        {"tools": [{"type": "web_search"}]},
        "/v1/responses",
        403,
        "tool_access_denied",
    ),
    (
        "tools not a list",
        "sk-liam-tools",
        "auto",
        {"tools": "x"},
        "/v1/chat/completions",
        400,
        "invalid_parameter",
    ),
]


@pytest.mark.parametrize(
    ("name", "key", "model", "extra", "path", "status", "code"),
    RULES_DENIED,
    ids=[r[0] for r in RULES_DENIED],
)
def test_rules_deny(
    policy: CompiledPolicy,
    name: str,
    key: str,
    model: str,
    extra: dict[str, Any],
    path: str,
    status: int,
    code: str,
) -> None:
    with pytest.raises(GatewayError) as info:
        call(policy, key, model, extra=extra, path=path)
    assert (info.value.status, info.value.code) == (status, code)


def test_general_settings(tmp_path: Path) -> None:
    text = (POLICIES / "keys.yaml").read_text() + (
        "general_settings: {enforce_user_param: true, reject_clientside_metadata_tags: true}\n"
    )
    path = tmp_path / "strict.yaml"
    path.write_text(text)
    strict = load_policy(path, env=ENV)
    assert call(strict, "sk-alice-all", "auto", extra={"user": "u1"}).request.user == "u1"
    cases: list[tuple[dict[str, Any], dict[str, str], str]] = [
        ({}, {}, "user_param_required"),
        ({"user": "u1", "metadata": {"tags": ["x"]}}, {}, "clientside_tags_rejected"),
        ({"user": "u1"}, {"x-litellm-tags": "x"}, "clientside_tags_rejected"),
    ]
    for extra, headers, code in cases:
        with pytest.raises(GatewayError) as info:
            call(strict, "sk-alice-all", "auto", extra=extra, headers=headers)
        assert (info.value.status, info.value.code) == (400, code)


@pytest.mark.parametrize(
    ("name", "key", "model", "deployment"), ALLOWED, ids=[a[0] for a in ALLOWED]
)
def test_allowed(policy: CompiledPolicy, name: str, key: str, model: str, deployment: str) -> None:
    decision = call(policy, key, model)
    assert decision.deployment.id == deployment
    assert decision.caller is not None


DENIED = [
    ("missing key", None, "auto", 401, "missing_api_key"),
    ("unknown key", "sk-nobody", "auto", 401, "invalid_api_key"),
    ("expired key", "sk-carol-expired", "auto", 401, "key_expired"),
    ("blocked key", "sk-dave-blocked", "auto", 403, "key_blocked"),
    ("blocked team", "sk-erin-blocked-team", "auto", 403, "team_blocked"),
    ("key model not listed", "sk-bob-only-a", "auto", 403, "key_model_access_denied"),
    ("team model not listed", "sk-frank-team", "claude", 403, "team_model_access_denied"),
    ("wildcard does not match", "sk-gina-wildcard", "auto", 403, "key_model_access_denied"),
    (
        "access group does not hold it",
        "sk-hank-access-group",
        "only-a",
        403,
        "key_model_access_denied",
    ),
    (
        "provider wildcard, other provider",
        "sk-ivy-provider",
        "openai/gpt-mini",
        403,
        "key_model_access_denied",
    ),
    ("user model not listed", "sk-nina-user", "auto", 403, "user_model_access_denied"),
    ("org model not listed", "sk-oscar-org", "auto", 403, "org_model_access_denied"),
    ("team's org model not listed", "sk-rita-team-org", "auto", 403, "org_model_access_denied"),
    ("blocked project", "sk-pia-project-blocked", "auto", 403, "project_blocked"),
    ("project model not listed", "sk-quinn-project", "claude", 403, "project_model_access_denied"),
    ("alias of another team is not an alias", "sk-alice-all", "fast", 404, "model_not_found"),
]


@pytest.mark.parametrize(
    ("name", "key", "model", "status", "code"), DENIED, ids=[d[0] for d in DENIED]
)
def test_denied(
    policy: CompiledPolicy, name: str, key: str | None, model: str, status: int, code: str
) -> None:
    with pytest.raises(GatewayError) as info:
        call(policy, key, model)
    assert (info.value.status, info.value.code) == (status, code)
    if key is not None:
        assert key not in info.value.message
        assert key not in info.value.body().decode()


def test_key_via_x_api_key(policy: CompiledPolicy) -> None:
    assert call(policy, "sk-alice-all", "auto", header="x-api-key").caller is not None


def test_bad_key_refused_in_headers_phase(policy: CompiledPolicy) -> None:
    head = RequestHead("POST", "/v1/chat/completions", {"authorization": "Bearer sk-nope"})
    with pytest.raises(GatewayError) as info:
        decide_head(head, CONFIG, policy, NOW, has_body=True)
    assert info.value.status == 401


def test_key_named_by_alias_or_hash_prefix(policy: CompiledPolicy) -> None:
    with pytest.raises(GatewayError) as info:
        call(policy, "sk-dave-blocked", "auto")
    assert "hash:7154f71b" in info.value.message


def test_hash_and_new_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert hash_key("sk-alice-all") == (
        "247c60831c539a1023e2d742f659151dbc9c608e422b541b9e5af237e0364c0e"
    )
    assert new_key() != new_key()
    assert main(["keys", "new"]) == 0
    out = capsys.readouterr().out
    key = out.split("key:")[1].split()[0]
    assert hash_key(key) in out
    assert main(["keys", "hash", "sk-alice-all"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("sk-alice-all")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("keys: [{hash: abc}]", "keys[0].hash: Value error, a key hash is 64 hex"),
        ("keys: [{hash: " + "a" * 64 + ", team: ghost}]", "names unknown team 'ghost'"),
        (
            "keys: [{hash: " + "a" * 64 + ", expires: '2026-01-01T00:00:00'}]",
            "keys[0].expires: Input should have timezone info",
        ),
        ("teams: [{id: t, model_aliases: {x: nowhere}}]", "unknown model group 'nowhere'"),
        ("keys: [{hash: " + "a" * 64 + ", project: ghost}]", "names unknown project 'ghost'"),
        ("teams: [{id: t, org: ghost}]", "names unknown org 'ghost'"),
        ("users: [{id: u}, {id: u}]", "user ids must be unique"),
        ("keys: [{hash: " + "a" * 64 + "}, {hash: " + "A" * 64 + "}]", "listed twice"),
    ],
)
def test_invalid_key_policies(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "model_groups: [{name: g, deployments: [{id: d, cluster: c, model: m}]}]\n" + text + "\n"
    )
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert expected in "\n".join(info.value.errors)
