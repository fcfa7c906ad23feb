"""Table-driven tests of the pure decision core."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from extproc.core.decision import GatewayConfig, decide_head
from extproc.core.errors import GatewayError
from extproc.core.health import DeploymentState
from extproc.core.request import POLICY_MEMBERS, RequestHead
from extproc.core.selection import RoutingView
from extproc.policy import CompiledPolicy, load_policy
from tests.helpers import decide_request

POLICY_PATH = Path(__file__).resolve().parent.parent / "policies" / "valid.yaml"
ENV = {"TEST_KEY_A": "sk-a", "TEST_KEY_B": "sk-b", "TEST_KEY_C": "sk-c"}
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
EMPTY_POLICY = CompiledPolicy(groups={})
CONFIG = GatewayConfig(session_headers=("x-litellm-session-id", "x-session"))


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return load_policy(POLICY_PATH, env=ENV)


def head(path: str = "/v1/chat/completions", method: str = "POST", **headers: str) -> RequestHead:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    return RequestHead(method=method, path=path, headers=hdrs)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# (name, head, body, rng value, expected: dict of checks or (status, code))
ROUTE_CASES: list[tuple[str, RequestHead, bytes, float, dict[str, Any]]] = [
    (
        "weighted low draw picks the heavy deployment",
        head(),
        body(model="auto", messages=[]),
        0.0,
        {"deployment": "dep-a", "model": "up-model-a", "auth": ("authorization", "Bearer sk-a")},
    ),
    (
        "draw at 0.74 still in the first 3/4",
        head(),
        body(model="auto", messages=[]),
        0.74,
        {"deployment": "dep-a"},
    ),
    (
        "draw at 0.76 falls in the last 1/4",
        head(),
        body(model="auto", messages=[]),
        0.76,
        {"deployment": "dep-b", "model": "up-model-b"},
    ),
    (
        "anthropic messages get x-api-key",
        head("/v1/messages", x_api_key="client-key"),
        body(model="claude", max_tokens=5, messages=[], metadata={"user_id": "u1"}),
        0.5,
        {
            "deployment": "dep-claude",
            "auth": ("x-api-key", "sk-c"),
            "user": "u1",
            "removed": ("authorization", "api-key"),
        },
    ),
    (
        "azure gets api-key",
        head("/v1/chat/completions"),
        body(model="azure-gpt", messages=[]),
        0.5,
        {"auth": ("api-key", "azure-secret-value")},
    ),
    (
        "no credential: every client credential is stripped",
        head(authorization="Bearer client"),
        body(model="open", messages=[]),
        0.5,
        {"auth": None, "removed": ("authorization", "x-api-key", "api-key")},
    ),
    (
        "path without /v1 and with query",
        head("/chat/completions?x=1"),
        body(model="only-a", messages=[]),
        0.9,
        {"deployment": "only-a-dep"},
    ),
    (
        "session id from header wins over metadata",
        head(x_litellm_session_id="hdr-sid"),
        body(model="auto", metadata={"session_id": "body-sid"}),
        0.1,
        {"session": "hdr-sid"},
    ),
    (
        "configured extra session header",
        head(x_session="extra-sid"),
        body(model="auto"),
        0.1,
        {"session": "extra-sid"},
    ),
    (
        "session id from metadata",
        head(),
        body(model="auto", metadata={"session_id": "m-sid"}),
        0.1,
        {"session": "m-sid"},
    ),
    (
        "session id from litellm_metadata",
        head(),
        body(model="auto", litellm_metadata={"session_id": "l-sid"}),
        0.1,
        {"session": "l-sid"},
    ),
    (
        "tags from metadata and header, deduplicated",
        head(x_litellm_tags="b, c"),
        body(model="auto", metadata={"tags": ["a", "b"]}),
        0.1,
        {"tags": ("a", "b", "c")},
    ),
    (
        "stream and user",
        head(authorization="Bearer sk-virtual"),
        body(model="auto", stream=True, user="end-1"),
        0.1,
        {"stream": True, "user": "end-1", "api_key": "sk-virtual"},
    ),
    (
        "embeddings",
        head("/v1/embeddings"),
        body(model="auto", input="hi"),
        0.1,
        {"deployment": "dep-a"},
    ),
    (
        "responses",
        head("/v1/responses"),
        body(model="auto", input="hi", stream=True),
        0.1,
        {"stream": True},
    ),
    ("completions", head("/v1/completions"), body(model="auto", prompt="hi"), 0.1, {}),
]


@pytest.mark.parametrize(
    ("name", "req_head", "raw", "u", "expect"), ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES]
)
def test_route(
    policy: CompiledPolicy,
    name: str,
    req_head: RequestHead,
    raw: bytes,
    u: float,
    expect: dict[str, Any],
) -> None:
    decision = decide_request(req_head, raw, policy, CONFIG, lambda: u, now=NOW)
    headers = dict(decision.set_headers)
    dep = decision.deployment
    assert headers[CONFIG.cluster_header] == dep.cluster
    assert headers["content-length"] == str(len(decision.body))
    sent = json.loads(decision.body)
    assert sent["model"] == dep.model
    # everything but the model (and the usage opt-in of a stream) is untouched
    original = json.loads(raw)
    changed = {"model", "stream_options"} if decision.asks_usage else {"model"}
    assert {k: v for k, v in sent.items() if k not in changed} == {
        k: v for k, v in original.items() if k not in changed
    }
    if decision.asks_usage:
        assert sent["stream_options"]["include_usage"] is True
    if "deployment" in expect:
        assert dep.id == expect["deployment"]
    if "model" in expect:
        assert sent["model"] == expect["model"]
    if "auth" in expect:
        if expect["auth"] is None:
            assert not {"authorization", "x-api-key", "api-key"} & headers.keys()
        else:
            assert headers[expect["auth"][0]] == expect["auth"][1]
    if "removed" in expect:
        assert set(expect["removed"]) <= set(decision.remove_headers)
    req = decision.request
    for key, attr in (
        ("session", "session_id"),
        ("tags", "tags"),
        ("stream", "stream"),
        ("user", "user"),
        ("api_key", "api_key"),
    ):
        if key in expect:
            assert getattr(req, attr) == expect[key]


LONG = "x" * 257
ERROR_CASES: list[tuple[str, RequestHead, bytes, int, str, str | None]] = [
    ("not json", head(), b"hello", 400, "invalid_json", None),
    ("malformed json", head(), b'{"model": "auto",', 400, "invalid_json", None),
    ("json array", head(), b'[{"model": "auto"}]', 400, "invalid_json", None),
    ("json string", head(), b'"auto"', 400, "invalid_json", None),
    ("empty body", head(), b"", 400, "missing_body", None),
    ("whitespace body", head(), b"  \n", 400, "missing_body", None),
    ("invalid utf-8", head(), b'{"model": "\xff\xfe"}', 400, "invalid_json", None),
    ("NaN", head(), b'{"model": "auto", "temperature": NaN}', 400, "invalid_json", None),
    ("deep nesting", head(), b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None),
    ("model is a number", head(), body(model=5), 400, "invalid_parameter", "model"),
    ("model is a list", head(), body(model=["auto"]), 400, "invalid_parameter", "model"),
    ("model missing", head(), body(messages=[]), 400, "missing_parameter", "model"),
    ("model null", head(), body(model=None), 400, "missing_parameter", "model"),
    ("model empty", head(), body(model=" "), 400, "invalid_parameter", "model"),
    ("unknown model", head(), body(model="gpt-nope"), 404, "model_not_found", "model"),
    (
        "stream not bool",
        head(),
        body(model="auto", stream="yes"),
        400,
        "invalid_parameter",
        "stream",
    ),
    (
        "embeddings cannot stream",
        head("/v1/embeddings"),
        body(model="auto", stream=True),
        400,
        "invalid_parameter",
        "stream",
    ),
    ("user not string", head(), body(model="auto", user=5), 400, "invalid_parameter", "user"),
    (
        "metadata not object",
        head("/v1/messages"),
        body(model="claude", metadata=[1]),
        400,
        "invalid_parameter",
        "metadata",
    ),
    (
        "tags not list",
        head(),
        body(model="auto", metadata={"tags": "a"}),
        400,
        "invalid_parameter",
        "metadata.tags",
    ),
    (
        "session id too long",
        head(x_litellm_session_id=LONG),
        body(model="auto"),
        400,
        "invalid_session_id",
        "x-litellm-session-id",
    ),
    (
        "session id control chars",
        head(),
        body(model="auto", metadata={"session_id": "a\nb"}),
        400,
        "invalid_session_id",
        "metadata.session_id",
    ),
    (
        "end user with a line break (it names a store key)",
        head(),
        body(model="auto", user="x\n{spend}:global:all"),
        400,
        "invalid_user",
        "user",
    ),
    (
        "anthropic end user too long",
        head("/v1/messages"),
        body(model="auto", max_tokens=5, messages=[], metadata={"user_id": "u" * 300}),
        400,
        "invalid_user",
        "metadata.user_id",
    ),
    (
        "session id wrong type",
        head(),
        body(model="auto", metadata={"session_id": 7}),
        400,
        "invalid_session_id",
        "metadata.session_id",
    ),
    *(
        (
            f"duplicate {name}{' (escaped)' if escaped else ''}",
            head("/v1/messages" if name == "system" else "/v1/chat/completions"),
            (
                b'{"model": "auto", "'
                + (b"\\u%04x" % ord(name[0]) + name[1:].encode() if escaped else name.encode())
                + b'": 1, "'
                + name.encode()
                + b'": 2}'
            ),
            400,
            "invalid_json",
            name,
        )
        for name in sorted(POLICY_MEMBERS)
        for escaped in (False, True)
    ),
    (
        "body over the limit",
        head(),
        b'{"model": "auto", "p": "' + b"x" * 9_000_000 + b'"}',
        413,
        "payload_too_large",
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "req_head", "raw", "status", "code", "param"),
    ERROR_CASES,
    ids=[c[0] for c in ERROR_CASES],
)
def test_refusal(
    policy: CompiledPolicy,
    name: str,
    req_head: RequestHead,
    raw: bytes,
    status: int,
    code: str,
    param: str | None,
) -> None:
    with pytest.raises(GatewayError) as info:
        decide_request(req_head, raw, policy, CONFIG, lambda: 0.5, now=NOW)
    err = info.value
    assert (err.status, err.code, err.param) == (status, code, param)
    payload = json.loads(err.body())
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["code"] == code


HEAD_CASES = [
    ("llm path with body reads it", head(), True, GatewayConfig(), "read_body"),
    ("unknown path passes", head("/v1/files", "GET"), False, GatewayConfig(), "pass"),
    (
        "GET /files passes (not an LLM endpoint)",
        head("/files", "GET"),
        False,
        GatewayConfig(),
        "pass",
    ),
]


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/chat/completions?x=1",
        "/v1/embeddings/",
        "/messages",
        "/v1/responses",
    ],
)
def test_other_methods_on_llm_paths_are_a_405(method: str, path: str) -> None:
    keyed = load_policy(POLICY_PATH.parent / "keys.yaml", env=ENV)
    for pol in (EMPTY_POLICY, keyed):  # before authentication: no key needed to learn it
        with pytest.raises(GatewayError) as info:
            decide_head(head(path, method), GatewayConfig(), pol, NOW, has_body=False)
        err = info.value
        assert (err.status, err.code, err.err_type) == (
            405,
            "method_not_allowed",
            "invalid_request_error",
        )
        assert err.response_headers()["allow"] == "POST"
        assert set(json.loads(err.body())["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("name", "req_head", "has_body", "config", "action"),
    HEAD_CASES,
    ids=[c[0] for c in HEAD_CASES],
)
def test_head(
    name: str, req_head: RequestHead, has_body: bool, config: GatewayConfig, action: str
) -> None:
    decision = decide_head(req_head, config, EMPTY_POLICY, NOW, has_body=has_body)
    assert decision.action == action
    assert config.cluster_header in decision.remove_headers


@pytest.mark.parametrize(
    ("name", "req_head", "has_body", "config", "status", "code"),
    [
        ("empty body on llm path", head(), False, GatewayConfig(), 400, "missing_body"),
        (
            "unknown path rejected by setting",
            head("/v1/files", "GET"),
            False,
            GatewayConfig(unknown_paths="reject"),
            404,
            "unknown_route",
        ),
        (
            "gzip request body",
            head(content_encoding="gzip"),
            True,
            GatewayConfig(),
            415,
            "unsupported_content_encoding",
        ),
        (
            "declared length over the limit",
            head(content_length="999999999"),
            True,
            GatewayConfig(),
            413,
            "payload_too_large",
        ),
    ],
)
def test_head_refusal(
    name: str,
    req_head: RequestHead,
    has_body: bool,
    config: GatewayConfig,
    status: int,
    code: str,
) -> None:
    with pytest.raises(GatewayError) as info:
        decide_head(req_head, config, EMPTY_POLICY, NOW, has_body=has_body)
    assert (info.value.status, info.value.code) == (status, code)


def test_unknown_model_message_is_bounded(policy: CompiledPolicy) -> None:
    with pytest.raises(GatewayError) as info:
        decide_request(head(), body(model="m" * 10_000), policy, CONFIG, lambda: 0.5, now=NOW)
    assert len(info.value.message) < 400


def _const(u: float) -> Callable[[], float]:
    return lambda: u


def test_weighted_split_is_three_to_one(policy: CompiledPolicy) -> None:
    draws = [i / 1000 for i in range(1000)]
    picks = [
        decide_request(head(), body(model="auto"), policy, CONFIG, _const(u), now=NOW).deployment.id
        for u in draws
    ]
    assert picks.count("dep-a") == 750


def test_lone_surrogate_session_id_is_a_400(policy: CompiledPolicy) -> None:
    raw = b'{"model": "auto", "metadata": {"session_id": "\\ud800"}}'
    with pytest.raises(GatewayError) as info:
        decide_request(head(), raw, policy, CONFIG, lambda: 0.5, now=NOW)
    assert (info.value.status, info.value.code) == (400, "invalid_session_id")


@pytest.mark.parametrize("length", ["\xb2", "١٢", "-1", "1e9", " 12", ""])
def test_odd_content_length_never_crashes(length: str) -> None:
    decision = decide_head(
        head(content_length=length), GatewayConfig(), EMPTY_POLICY, NOW, has_body=True
    )
    assert decision.action == "read_body"


def test_random_input_only_raises_gateway_errors(policy: CompiledPolicy) -> None:
    """Mutated bodies and hostile header values give a decision or a GatewayError."""
    import random  # noqa: PLC0415

    rng = random.Random(1234)
    seeds = [
        json.dumps(
            {
                "model": "auto",
                "messages": [{"role": "user", "content": "hi"}],
                "metadata": {"session_id": "s", "tags": ["t"]},
                "stream": True,
            }
        ).encode(),
        b'{"model": "claude", "metadata": {"user_id": "u"}}',
    ]
    alphabet = b'{}[]:,"\\ \x00\xff\xc3\xa9u0123456789.eE+-truefalsnul'
    for _ in range(3000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(raw) + 1)
            if rng.random() < 0.5 and raw:
                del raw[min(pos, len(raw) - 1)]
            else:
                raw.insert(pos, rng.choice(alphabet))
        value = "".join(chr(rng.randrange(0, 0x250)) for _ in range(rng.randint(0, 8)))
        req_head = head(
            rng.choice(["/v1/chat/completions", "/v1/messages", "/v1/embeddings"]),
            x_litellm_session_id=value,
            x_litellm_tags=value,
            content_length=value,
            authorization=value,
        )
        try:
            decide_head(req_head, CONFIG, policy, NOW, has_body=True)
            decide_request(req_head, bytes(raw), policy, CONFIG, rng.random, now=NOW)
        except GatewayError:
            pass


@pytest.mark.parametrize(
    ("path", "extra", "asks", "options"),
    [
        ("/v1/chat/completions", {"stream": True}, True, {"include_usage": True}),
        (
            "/v1/chat/completions",
            {"stream": True, "stream_options": {"include_obfuscation": False}},
            True,
            {"include_obfuscation": False, "include_usage": True},
        ),
        (
            "/v1/chat/completions",
            {"stream": True, "stream_options": {"include_usage": True}},
            False,
            {"include_usage": True},
        ),
        (
            "/v1/completions",
            {"stream": True, "stream_options": None},
            True,
            {"include_usage": True},
        ),
        ("/v1/chat/completions", {}, False, None),
        ("/v1/responses", {"stream": True}, False, None),  # usage comes with the stream
    ],
)
def test_streams_ask_for_usage(
    policy: CompiledPolicy,
    path: str,
    extra: dict[str, Any],
    asks: bool,
    options: dict[str, Any] | None,
) -> None:
    raw = b'{"model": "auto", "temperature": 1e400, "prompt": "x", "messages": [], "z": "\\u00e9"'
    raw += b"".join(b", " + json.dumps({k: v})[1:-1].encode() for k, v in extra.items()) + b"}"
    decision = decide_request(head(path), raw, policy, CONFIG, lambda: 0.1, now=NOW)
    assert decision.asks_usage is asks
    assert b'"temperature": 1e400' in decision.body  # untouched bytes stay untouched
    assert b'"z": "\\u00e9"' in decision.body
    sent = json.loads(decision.body.replace(b"1e400", b"1"))
    assert sent.get("stream_options") == options
    unchanged = decide_request(
        head(path), raw, policy, CONFIG, lambda: 0.1, now=NOW, rewrite_body=False
    )
    assert unchanged.asks_usage is False
    # where the body cannot be rewritten (ext_authz), the client's bytes and length stay
    assert unchanged.body == raw
    assert "content-length" not in dict(unchanged.set_headers)


def test_policy_members_cover_the_list_of_the_issue() -> None:
    issue = {"model", "stream", "user", "metadata", "tools", "functions", "max_tokens"}
    issue |= {"max_completion_tokens", "max_output_tokens", "n", "stream_options"}
    assert issue | {"best_of", "input"} <= POLICY_MEMBERS


def test_duplicate_model_with_escaped_first_spelling(policy: CompiledPolicy) -> None:
    raw = b'{"\\u006dodel": "only-a", "model": "auto", "messages": []}'
    with pytest.raises(GatewayError) as info:
        decide_request(head(), raw, policy, CONFIG, lambda: 0.5, now=NOW)
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_json", "model")
    assert "'model'" in info.value.message


@pytest.mark.parametrize(
    ("name", "member"),
    [
        ("MODEL", "model"),
        ("Stream", "stream"),
        ("Max_Tokens", "max_tokens"),
        ("tool\u017f", "tools"),  # long s: Go's encoding/json folds it to "s"
        ("\u017ftream", "stream"),
    ],
)
def test_other_letter_cases_of_policy_members(
    policy: CompiledPolicy, name: str, member: str
) -> None:
    raw = b'{"model": "auto", "messages": [], "%s": 1}' % name.encode()
    with pytest.raises(GatewayError) as info:
        decide_request(head(), raw, policy, CONFIG, lambda: 0.5, now=NOW)
    assert (info.value.status, info.value.code, info.value.param) == (
        400,
        "invalid_json",
        member,
    )


@pytest.mark.parametrize("member", ["metadata", "litellm_metadata", "stream_options"])
def test_duplicates_inside_objects_the_policy_reads(policy: CompiledPolicy, member: str) -> None:
    raw = b'{"model": "auto", "%s": {"user_id": "a", "x": 1, "user_id": "b"}}' % member.encode()
    with pytest.raises(GatewayError) as info:
        decide_request(head(), raw, policy, CONFIG, lambda: 0.5, now=NOW)
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_json", member)


def test_duplicates_of_other_members_pass_byte_exact(policy: CompiledPolicy) -> None:
    raw = b'{"temperature": 1, "model": "auto", "temperature": 2, "x": {"a": 1, "a": 2}}'
    decision = decide_request(head(), raw, policy, CONFIG, lambda: 0.1, now=NOW)
    assert decision.body == raw.replace(b'"auto"', b'"up-model-a"')


@pytest.mark.parametrize("before", [True, False])
def test_usage_opt_in_spliced_around_the_model(policy: CompiledPolicy, before: bool) -> None:
    options = b'"stream_options": {"include_obfuscation": false}'
    rest = b'"model": "auto", "z": "\xc3\xa9", "stream": true'
    raw = b"{" + (options + b", " + rest if before else rest + b", " + options) + b"}"
    decision = decide_request(head(), raw, policy, CONFIG, lambda: 0.1, now=NOW)
    sent = json.loads(decision.body)
    assert sent["model"] == "up-model-a"
    assert sent["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert b'"z": "\xc3\xa9"' in decision.body


def test_decide_routes_on_the_view_it_is_given(policy: CompiledPolicy) -> None:
    """The store's answer arrives as a view: the same draw lands elsewhere when the
    deployment it would pick is cooling down, and every one cooling is a 429."""
    raw = body(model="auto", messages=[])
    assert decide_request(head(), raw, policy, CONFIG, lambda: 0.0, now=NOW).deployment.id == (
        "dep-a"
    )
    cooling_a = RoutingView.of({"dep-a": DeploymentState(cooling_s=2.0)}, {}, {})
    moved = decide_request(head(), raw, policy, CONFIG, lambda: 0.0, now=NOW, view=cooling_a)
    assert moved.deployment.id != "dep-a"
    every = RoutingView.of(
        {d.id: DeploymentState(cooling_s=2.0) for d in policy.groups["auto"].deployments}, {}, {}
    )
    with pytest.raises(GatewayError) as info:
        decide_request(head(), raw, policy, CONFIG, lambda: 0.0, now=NOW, view=every)
    assert (info.value.status, info.value.code) == (429, "deployments_cooling_down")
