"""Spend accounting through real Envoys: usage read from every API's JSON and SSE
responses, charged at the deployment's prices, reservations under concurrency."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import redis

from extproc.core.access import hash_key
from extproc.core.budgets import spend_key
from extproc.dev.mock_upstream import _WORDS, _prompt_tokens
from tests.helpers import holds_open, wait_until
from tests.integration.stack import (
    POLICIES,
    Stack,
    post,
    start_server,
    start_stack,
    start_two_servers,
)

POLICY = POLICIES / "spend.yaml"
ANN = spend_key("key", hash_key("sk-spend-ann"), tenant=("t", "team", "t-spend"))
BOB = spend_key("key", hash_key("sk-spend-bob"))
CARL = spend_key("key", hash_key("sk-spend-carl"))
DORA = spend_key("key", hash_key("sk-spend-dora"))
ERIN = spend_key("key", hash_key("sk-spend-erin"))
FAY = spend_key("key", hash_key("sk-spend-fay"))
MSGS: list[Any] = [{"role": "user", "content": "How much does this cost?"}]
# dep-a: $ per token
IN, OUT, CACHED = Decimal("0.000001"), Decimal("0.000002"), Decimal("0.0000005")


def micros(dollars: Decimal) -> int:
    return math.ceil(dollars * 1_000_000)


def chat_cost(body: dict[str, Any], cached: int = 0, reasoning: int = 0) -> int:
    prompt, completion = _prompt_tokens(body), len(_WORDS)
    return micros(prompt * IN + cached * CACHED + (completion + reasoning) * OUT)


@pytest.fixture(params=["ext_proc", "ext_authz"])
def stack(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Iterator[Stack]:
    env = {"EXTPROC_STORE_URL": redis_url}
    with start_stack(tmp_path, mode=request.param, policy=POLICY, server_env=env) as running:
        yield running


@pytest.fixture
def spend(redis_url: str) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_url)

    def read(key: str = ANN, *, settled: bool = True) -> int:
        # A client may finish reading before the response's last (empty) piece is
        # settled: wait until no reservation is outstanding.
        if settled:
            wait_until(lambda: holds_open(client) == 0, 5, "settlement")
        value = client.get(key)
        return int(value) if value is not None else 0

    yield read
    client.close()


def metric(stack: Stack, name: str) -> float:
    with urllib.request.urlopen(f"{stack.admin_url}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-spend-ann", max_retries=0)


ANN_BUDGETS = [
    ANN,
    "{t:team:t-spend}:team:t-spend",
    "{t:team:t-spend}:team_member:t-spend:u-ann",
    "{spend}:global:all",
]


def test_chat_json_with_cached_and_reasoning_tokens(stack: Stack, spend: Any) -> None:
    before = [spend(key) for key in ANN_BUDGETS]
    reply = oai(stack).chat.completions.create(
        model="auto",
        messages=MSGS,
        extra_headers={"x-mock-cached-tokens": "40", "x-mock-reasoning-tokens": "7"},
    )
    assert reply.usage is not None
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 40
    body = {"model": "auto", "messages": MSGS}
    cost = chat_cost(body, cached=40, reasoning=7)
    # the key, its team, the user's share of the team and the gateway: all charged
    assert [spend(key) - was for key, was in zip(ANN_BUDGETS, before, strict=True)] == [cost] * 4


def test_chat_stream_usage_asked_for_the_client(stack: Stack, spend: Any) -> None:
    before, missing = spend(), metric(stack, "extproc_usage_missing_total")
    chunks = list(oai(stack).chat.completions.create(model="auto", messages=MSGS, stream=True))
    # the client did not ask for usage: no usage chunk, every chunk has a choice
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(_WORDS)
    charged = spend() - before
    if stack.mode == "ext_proc":
        # the gateway asked upstream for usage: the real cost
        assert charged == chat_cost({"model": "auto", "messages": MSGS})
        assert metric(stack, "extproc_usage_missing_total") == missing
    else:
        # ext_authz cannot change the body: charged by the estimate, counted
        assert charged > chat_cost({"model": "auto", "messages": MSGS})
        assert metric(stack, "extproc_usage_missing_total") == missing + 1


def test_chat_stream_with_usage_kept_for_the_client(stack: Stack, spend: Any) -> None:
    before = spend()
    chunks = list(
        oai(stack).chat.completions.create(
            model="auto",
            messages=MSGS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1  # the client asked: it gets the usage chunk
    assert spend() - before == chat_cost({"model": "auto", "messages": MSGS})


@pytest.mark.parametrize("streamed", [False, True])
def test_completions(stack: Stack, spend: Any, streamed: bool) -> None:
    before = spend()
    client = oai(stack)
    if streamed:
        list(client.completions.create(model="auto", prompt="Say hi", stream=True))
    else:
        client.completions.create(model="auto", prompt="Say hi")
    expected = chat_cost({"model": "auto", "prompt": "Say hi"})
    if streamed and stack.mode == "ext_authz":
        assert spend() - before > expected  # estimate: no usage in the stream
    else:
        assert spend() - before == expected


def test_embeddings(stack: Stack, spend: Any) -> None:
    before = spend()
    oai(stack).embeddings.create(model="auto", input=["one", "two"])
    prompt = _prompt_tokens({"model": "auto", "input": ["one", "two"]})
    assert spend() - before == micros(prompt * IN)


@pytest.mark.parametrize("streamed", [False, True])
def test_responses_api(stack: Stack, spend: Any, streamed: bool) -> None:
    before = spend()
    client = oai(stack)
    headers = {"x-mock-cached-tokens": "10", "x-mock-reasoning-tokens": "3"}
    if streamed:
        events = list(
            client.responses.create(model="auto", input="hi", stream=True, extra_headers=headers)
        )
        assert events[-1].type == "response.completed"
    else:
        client.responses.create(model="auto", input="hi", extra_headers=headers)
    prompt = _prompt_tokens({"input": "hi"})
    expected = micros(prompt * IN + 10 * CACHED + (len(_WORDS) + 3) * OUT)
    assert spend() - before == expected


@pytest.mark.parametrize("streamed", [False, True])
def test_anthropic_messages(stack: Stack, spend: Any, streamed: bool) -> None:
    before = spend()
    client = anthropic.Anthropic(base_url=stack.url, api_key="sk-spend-ann", max_retries=0)
    headers = {"x-mock-cached-tokens": "1000", "x-mock-cache-creation-tokens": "200"}
    kwargs: dict[str, Any] = {
        "model": "claude",
        "max_tokens": 64,
        "messages": MSGS,
        "extra_headers": headers,
    }
    if streamed:
        with client.messages.stream(**kwargs) as events:
            final = events.get_final_message()
    else:
        final = client.messages.create(**kwargs)
    assert final.usage.cache_read_input_tokens == 1000
    prompt = _prompt_tokens({"messages": MSGS})
    expected = micros(
        prompt * Decimal("0.000003")
        + 1000 * Decimal("0.0000003")
        + 200 * Decimal("0.00000375")
        + len(_WORDS) * Decimal("0.000015")
    )
    assert spend() - before == expected


@pytest.mark.parametrize("size", [10 << 20, 20 << 20])
def test_large_json_responses_pass_whole_and_are_charged(
    stack: Stack, spend: Any, size: int
) -> None:
    # Envoy hands a STREAMED body over in pieces larger than its buffer limit; the
    # server must take every one of them (a refused piece used to end the response
    # after its headers: a 200 with no body). Over 16 MiB only the tail is read.
    body = {"model": "auto", "messages": MSGS}
    raw = json.dumps(body).encode()
    headers = {"authorization": "Bearer sk-spend-ann", "x-mock-pad-bytes": str(size)}
    before = spend()
    for _ in range(10):
        status, _, data = post(f"{stack.url}/v1/chat/completions", raw, headers)
        assert status == 200
        reply = json.loads(data)
        assert reply["choices"][0]["message"]["content"] == "".join(_WORDS) + "x" * size
        assert reply["usage"]["completion_tokens"] == len(_WORDS)
    assert spend() - before == 10 * chat_cost(body)


def test_recorded_openai_response_is_charged(stack: Stack, spend: Any) -> None:
    before = spend()
    raw = oai(stack).chat.completions.with_raw_response.create(
        model="auto",
        messages=MSGS,
        extra_headers={"x-mock-replay": "chat-basic"},
    )
    assert raw.parse().usage is not None
    # recorded usage: 8 prompt, 377 completion (320 of them reasoning)
    assert spend() - before == micros(8 * IN + 377 * OUT)


def test_upstream_error_is_not_charged(stack: Stack, spend: Any) -> None:
    before, cancelled = spend(), metric(stack, 'extproc_settlements_total{outcome="cancelled"}')
    with pytest.raises(openai.BadRequestError) as info:
        oai(stack).chat.completions.create(
            model="auto",
            messages=MSGS,
            extra_headers={"x-mock-replay": "chat-bad-request"},
        )
    assert info.value.status_code == 400  # the real OpenAI error body, passed through
    wait_until(
        lambda: metric(stack, 'extproc_settlements_total{outcome="cancelled"}') > cancelled,
        5,
        "the reservation to be cancelled",
    )
    assert spend() == before


def test_abandoned_stream_is_charged_for_what_was_streamed(stack: Stack, spend: Any) -> None:
    """A client that leaves mid-stream pays for what was generated so far (the
    provider bills it), not for the whole reservation and not nothing."""
    before = spend()
    parts = urllib.parse.urlsplit(stack.url)
    body = json.dumps({"model": "auto", "stream": True, "messages": MSGS}).encode()
    request = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        "authorization: Bearer sk-spend-ann\r\nx-mock-chunk-delay-ms: 1000\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        held = spend(settled=False) - before
        assert held > 8000  # the reservation: 4096 output tokens at $0.000002
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    wait_until(lambda: 0 < spend() - before < 1000, 10, "the hold to settle to what streamed")
    assert spend() - before <= chat_cost({"model": "auto", "messages": MSGS}) + 200


def _raw_stream(stack: Stack, body: bytes, headers: str, *, close_at_done: bool) -> bytes:
    """POST over a bare socket; read to EOF, or hang up as soon as ``data: [DONE]``
    has arrived (as SDKs do), resetting the connection."""
    parts = urllib.parse.urlsplit(stack.url)
    request = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"connection: close\r\n{headers}content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    got = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            got += chunk
            if close_at_done and b"data: [DONE]" in got:
                linger = b"\x01\x00\x00\x00\x00\x00\x00\x00"
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                break
    return got


def test_usage_less_stream_costs_the_same_however_it_is_read(stack: Stack, spend: Any) -> None:
    """A recorded OpenAI stream without usage, read to its end by three clients: the
    SDK (stops at [DONE]), a raw read to EOF, a raw read that resets right after
    [DONE]. Each is charged the same: prompt estimate + a token per streamed event."""
    sent: list[bytes] = []
    http = openai.DefaultHttpxClient(event_hooks={"request": [lambda req: sent.append(req.read())]})
    sdk = openai.OpenAI(
        base_url=f"{stack.url}/v1", api_key="sk-spend-ann", max_retries=0, http_client=http
    )
    replay = "x-mock-replay: chat-streaming\r\nauthorization: Bearer sk-spend-ann\r\n"
    missing = metric(stack, "extproc_usage_missing_total")
    charged = []
    before = spend()
    with http:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in sdk.chat.completions.create(
                model="auto",
                messages=MSGS,
                stream=True,
                extra_headers={"x-mock-replay": "chat-streaming"},
            )
            if c.choices
        )
    assert text  # the recording's answer reached the SDK
    charged.append(spend() - before)
    raw = sent[0]  # the same bytes again: the prompt estimate counts them
    for close_at_done in (False, True):
        before = spend()
        got = _raw_stream(stack, raw, replay, close_at_done=close_at_done)
        assert b"data: [DONE]" in got
        charged.append(spend() - before)
    assert charged[0] > 0
    assert charged == [charged[0]] * 3
    # far below the reservation (4096 output tokens at $0.000002 = $0.008192)
    assert charged[0] < 8192
    assert metric(stack, "extproc_usage_missing_total") == missing + 3


def test_anthropic_stream_left_before_its_usage_pays_for_its_text(stack: Stack, spend: Any) -> None:
    """message_start reports one output token; a client that reads every text delta
    and hangs up before message_delta must not pay for that one token only."""
    body = json.dumps(
        {"model": "claude", "max_tokens": 64, "stream": True, "messages": MSGS}
    ).encode()
    parts = urllib.parse.urlsplit(stack.url)
    request = (
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        "x-api-key: sk-spend-ann\r\nanthropic-version: 2023-06-01\r\n"
        f"x-mock-chunk-delay-ms: 50\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    charged = {}
    for how in ("eof", "reset"):
        before, got = spend(), b""
        with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                got += chunk
                if how == "reset" and b"content_block_stop" in got:
                    linger = b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    break
                if how == "eof" and b"message_stop" in got:
                    break
        assert got.count(b"text_delta") == len(_WORDS)  # the whole answer arrived
        charged[how] = spend() - before
    # the reset read got the same text: it pays at least as much
    assert charged["reset"] >= charged["eof"] > 0, charged


def test_budget_filter_skips_spent_deployments(stack: Stack, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.delete("{spend}:deployment:dep-cheap:1h", "{spend}:provider:acme:1d")
    body = json.dumps({"model": "budgeted", "messages": MSGS}).encode()
    headers = {"authorization": "Bearer sk-spend-ann"}
    url = f"{stack.url}/v1/chat/completions"
    served: Counter[str] = Counter()
    for _ in range(40):
        status, resp_headers, payload = post(url, body, headers)
        if status != 200:
            break
        served[resp_headers["x-mock-upstream"]] += 1
    # both budgets ($0.00005, ~3 calls each) run out; then nothing is left
    assert status == 429
    error = json.loads(payload)["error"]
    assert error["code"] == "deployment_budgets_exhausted"
    assert "deployment dep-cheap" in error["message"]
    assert "provider acme" in error["message"]
    assert "sk-" not in error["message"]
    assert set(served) == {"mock_a", "mock_b"}
    assert client.ttl("{spend}:deployment:dep-cheap:1h") > 3000  # rolling window from first spend
    client.close()


@pytest.mark.parametrize("where", ["redis", "cluster"])
async def test_no_overshoot_under_concurrency(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    """$1.00, about a cent a call, 500 concurrent calls through two server processes, on
    one Redis and on a 3-node Redis Cluster (where the key's budget lives in its
    tenant's slot and the global budget in ``{spend}``: two slots a call)."""
    if where == "redis":
        redis_url = request.getfixturevalue("redis_url")
        client: Any = redis.Redis.from_url(redis_url)
    else:
        redis_url = request.getfixturevalue("redis_cluster_url")
        client = redis.RedisCluster.from_url(redis_url.replace("redis+cluster://", "redis://"))
    client.delete(BOB)
    body = {"model": "pricey", "messages": MSGS, "max_tokens": len(_WORDS)}
    raw = json.dumps(body).encode()
    headers = {"authorization": "Bearer sk-spend-bob"}
    gate = asyncio.Semaphore(100)
    with start_two_servers(tmp_path, POLICY, {"EXTPROC_STORE_URL": redis_url}) as (url, _):

        async def one() -> tuple[int, str]:
            async with gate:
                status, _, payload = await asyncio.to_thread(
                    post, f"{url}/v1/chat/completions", raw, headers
                )
            return status, json.loads(payload)["error"]["code"] if status != 200 else ""

        results = Counter(await asyncio.gather(*(one() for _ in range(500))))
    per_call = micros(_prompt_tokens(body) * Decimal("0.000001") + len(_WORDS) * Decimal("0.0016"))
    spent = int(client.get(BOB) or 0)
    client.close()
    admitted = results[(200, "")]
    print(f"admitted {admitted} of 500, spent {spent} micro-dollars, {per_call} per call")
    assert set(results) == {(200, ""), (429, "key_budget_exceeded")}
    assert spent == admitted * per_call  # every admitted call charged exactly once
    assert spent <= 1_000_000 + per_call  # never past the budget by more than one call
    assert spent >= 900_000  # and the budget is not wasted on stale reservations


async def _concurrent(
    url: str, body: dict[str, Any], key: str, count: int
) -> Counter[tuple[int, str]]:
    raw = json.dumps(body).encode()
    headers = {"authorization": f"Bearer {key}"}

    async def one() -> tuple[int, str]:
        status, _, payload = await asyncio.to_thread(
            post, f"{url}/v1/chat/completions", raw, headers
        )
        return status, json.loads(payload)["error"]["code"] if status != 200 else ""

    return Counter(await asyncio.gather(*(one() for _ in range(count))))


def _short_cost(body: dict[str, Any], output: int) -> int:
    """dep-short: $0.000001 per input token, $0.0001 per output token."""
    return micros(_prompt_tokens(body) * Decimal("0.000001") + output * Decimal("0.0001"))


async def test_absurd_max_tokens_is_clamped_and_reserved(
    stack: Stack, spend: Any, redis_url: str
) -> None:
    """max_tokens 1e30 is reserved at the deployment's largest answer (10 tokens): a
    reservation that fits the store, so 20 concurrent calls on a $0.003 budget stay
    within it plus one call (they were all admitted, unreserved, before)."""
    with redis.Redis.from_url(redis_url) as client:
        client.delete(CARL)
    body = {"model": "short", "messages": MSGS, "max_tokens": 10**30}
    results = await _concurrent(stack.url, body, "sk-spend-carl", 20)
    spent = spend(CARL)
    per_call = _short_cost(body, len(_WORDS))
    assert set(results) <= {(200, ""), (429, "key_budget_exceeded")}, results
    admitted = results[(200, "")]
    assert admitted >= 2  # the estimate is 10 tokens, not the budget's worth
    assert spent == admitted * per_call
    assert spent <= 3000 + per_call


async def test_n_choices_are_reserved(stack: Stack, spend: Any, redis_url: str) -> None:
    """n: 100 is 100 answers: 10 concurrent calls on a budget worth two calls stay
    within it plus one call."""
    body = {"model": "short", "messages": MSGS, "max_tokens": len(_WORDS), "n": 100}
    per_call = _short_cost(body, len(_WORDS) * 100)
    assert 2 * per_call <= 130_000 < 3 * per_call
    with redis.Redis.from_url(redis_url) as client:
        client.delete(DORA)
    results = await _concurrent(stack.url, body, "sk-spend-dora", 10)
    spent = spend(DORA)
    assert set(results) <= {(200, ""), (429, "key_budget_exceeded")}, results
    assert spent == results[(200, "")] * per_call
    assert spent <= 130_000 + per_call


CLAUDE_IN, CLAUDE_OUT = Decimal("0.000003"), Decimal("0.000015")
# (id, path, body, x-mock-usage, what is charged)
HOSTILE: list[tuple[str, str, dict[str, Any], dict[str, Any], str]] = [
    (
        "chat-json-negative",
        "/v1/chat/completions",
        {"model": "auto", "messages": MSGS, "max_tokens": 50},
        {"completion_tokens": -5},
        "estimate",
    ),
    (
        "chat-sse-fraction",
        "/v1/chat/completions",
        {
            "model": "auto",
            "messages": MSGS,
            "max_tokens": 50,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {"prompt_tokens": 1.5},
        "streamed",
    ),
    (
        "anthropic-sse-bool",
        "/v1/messages",
        {"model": "claude", "messages": MSGS, "max_tokens": 50, "stream": True},
        {"input_tokens": True},
        "streamed",
    ),
    (
        "responses-json-string",
        "/v1/responses",
        {"model": "auto", "input": "hi", "max_output_tokens": 50},
        {"output_tokens": "9"},
        "estimate",
    ),
    (
        "chat-json-huge",
        "/v1/chat/completions",
        {"model": "auto", "messages": MSGS, "max_tokens": 50},
        {"completion_tokens": 10**30},
        "clamped",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "usage", "charged"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_usage_is_never_a_free_call(
    stack: Stack,
    spend: Any,
    path: str,
    body: dict[str, Any],
    usage: dict[str, Any],
    charged: str,
) -> None:
    """Counts that are negative, fractional, strings or booleans are no usage: a JSON
    answer is charged the estimate, a stream what it streamed (the prompt estimate and
    a token per event, as any usage-less stream); counts past what the call can
    produce are clamped there."""
    raw = json.dumps(body).encode()
    headers = {"authorization": "Bearer sk-spend-fay", "x-mock-usage": json.dumps(usage)}
    before = spend(FAY)
    missing = metric(stack, "extproc_usage_missing_total")
    clamped = metric(stack, "extproc_usage_clamped_total")
    status, _, payload = post(f"{stack.url}{path}", raw, headers)
    assert status == 200, payload[:300]
    paid = spend(FAY) - before
    price_in, price_out = (CLAUDE_IN, CLAUDE_OUT) if body["model"] == "claude" else (IN, OUT)
    if charged in ("estimate", "streamed"):
        events = len([e for e in payload.split(b"\n\n") if e.strip()])
        output = 50 if charged == "estimate" else events
        assert paid == micros(math.ceil(len(raw) / 4) * price_in + output * price_out)
        assert metric(stack, "extproc_usage_missing_total") == missing + 1
    else:
        # dep-a names no window or largest answer: 2,000,000 + 1,000,000 tokens
        assert paid == micros(_prompt_tokens(body) * price_in + 3_000_000 * price_out)
        assert metric(stack, "extproc_usage_clamped_total") == clamped + 1


def test_soft_budget_alert_from_the_settlement(stack: Stack, redis_url: str) -> None:
    """The alert is raised where the call settles (behind ext_authz: the response
    filter, from the budgets the charge carries through Envoy's metadata)."""
    with redis.Redis.from_url(redis_url) as client:
        for name in client.scan_iter(match=f"{{alert:key:{hash_key('sk-spend-fay')}*"):
            client.delete(name)  # the other path's run raised this window's alert
    alerts = metric(stack, 'extproc_soft_budget_alerts_total{kind="key"}')
    raw = json.dumps({"model": "auto", "messages": MSGS}).encode()
    status, _, _ = post(
        f"{stack.url}/v1/chat/completions", raw, {"authorization": "Bearer sk-spend-fay"}
    )
    assert status == 200
    wait_until(
        lambda: metric(stack, 'extproc_soft_budget_alerts_total{kind="key"}') == alerts + 1,
        10,
        "the soft-budget alert",
    )
    assert "soft budget crossed for API key fay" in stack.server_log()


def test_store_answering_errors_refuses_the_call(stack: Stack, redis_url: str) -> None:
    """A budget counter of the wrong type makes the reservation script fail: the call
    is refused (500), never admitted by the fail mode (open here) without a hold."""
    client = redis.Redis.from_url(redis_url)
    client.delete(ERIN)
    client.hset(ERIN, "broken", "1")
    body = json.dumps({"model": "auto", "messages": MSGS}).encode()
    headers = {"authorization": "Bearer sk-spend-erin"}
    url = f"{stack.url}/v1/chat/completions"
    faults, fail_open = (
        metric(stack, "extproc_store_faults_total"),
        metric(stack, "extproc_fail_mode_total"),
    )
    stack.mocks.clear()
    try:
        for _ in range(3):
            status, resp_headers, payload = post(url, body, headers)
            assert status == 500, payload[:300]
            assert resp_headers["x-extproc-error"] == "internal_error"
            assert set(json.loads(payload)["error"]) == {"message", "type", "param", "code"}
        assert stack.mocks.seen("mock_a") == []  # nothing reached the upstream
        assert metric(stack, "extproc_store_faults_total") == faults + 3
        assert metric(stack, "extproc_fail_mode_total") == fail_open
    finally:
        client.delete(ERIN)
        client.close()
    status, _, _ = post(url, body, headers)  # the store answers again: served
    assert status == 200


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310
        return json.load(resp)


def test_budget_read_outs(stack: Stack, spend: Any) -> None:
    oai(stack).chat.completions.create(model="auto", messages=MSGS)
    post(
        f"{stack.url}/v1/chat/completions",
        json.dumps({"model": "budgeted", "messages": MSGS}).encode(),
        {"authorization": "Bearer sk-spend-ann", "x-extproc-test": "1"},
    )
    providers = _get(f"{stack.admin_url}/provider/budgets")["providers"]
    assert set(providers) == {"acme"}
    acme = providers["acme"]
    assert (acme["budget_limit"], acme["time_period"]) == (0.00005, "1d")
    assert acme["spend"] >= 0
    budgets = _get(f"{stack.admin_url}/budgets")["budgets"]
    ann = next(b for b in budgets if b["name"] == "API key ann")
    assert ann["max_budget"] == 100
    assert ann["spend"] == pytest.approx(spend() / 1_000_000)
    assert ann["remaining"] == pytest.approx(100 - spend() / 1_000_000)
    assert {b["kind"] for b in budgets} >= {"key", "provider", "deployment"}
    assert all("sk-spend" not in json.dumps(b) for b in budgets)
    text = urllib.request.urlopen(f"{stack.admin_url}/metrics", timeout=5).read().decode()  # noqa: S310
    assert 'extproc_budget_remaining_dollars{kind="provider",name="acme"}' in text
    assert 'extproc_spend_dollars_total{deployment="dep-a",model_group="auto"}' in text
    assert 'extproc_tokens_total{deployment="dep-a",kind="output",model_group="auto"}' in text


def test_memory_store_spend_survives_a_killed_server(tmp_path: Path) -> None:
    """The embedded store journals settled spend: SIGKILL loses at most ~1 s of it."""
    import signal  # noqa: PLC0415

    def ann_spend(admin_url: str) -> float:
        budgets = _get(f"{admin_url}/budgets")["budgets"]
        return float(next(b["spend"] for b in budgets if b["name"] == "API key ann"))

    with start_stack(tmp_path, policy=POLICY) as first:
        client = oai(first)
        for _ in range(3):
            client.chat.completions.create(model="auto", messages=MSGS)
        spent = ann_spend(first.admin_url)
        assert spent > 0
        time.sleep(1.5)  # past the journal's flush interval
        assert first.server is not None
        first.server.stop(signal.SIGKILL)
    restart = tmp_path / "again"
    restart.mkdir()
    journal = {"EXTPROC_SPEND_JOURNAL": str(tmp_path / "spend.jsonl")}
    with start_server(restart, POLICY, journal) as (_, _, admin_port):
        assert ann_spend(f"http://127.0.0.1:{admin_port}") == pytest.approx(spent)


def _paid_once_then_refused(
    stack: Stack, redis_url: str, api_key: str, spend_keys: str, code: str, **body: Any
) -> dict[str, Any]:
    """A budget that the first call exhausts: that call is answered, the next is a 429
    with ``code``; returns the refusal's error body."""
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=spend_keys):  # the other mode's run spent it
        client.delete(key)
    url = f"{stack.url}/v1/chat/completions"
    raw = json.dumps({"model": "auto", "messages": MSGS, **body}).encode()
    headers = {"authorization": f"Bearer {api_key}"}
    status, _, payload = post(url, raw, headers)
    assert status == 200, payload
    wait_until(lambda: holds_open(client) == 0, 5, "settlement")
    assert sum(int(client.get(k) or 0) for k in client.scan_iter(match=spend_keys)) > 0
    status, resp_headers, payload = post(url, raw, headers)
    client.close()
    assert status == 429, payload
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], resp_headers["x-extproc-error"]) == (code, code)
    assert api_key not in error["message"]
    return dict(error)


def test_tiny_key_budget_admits_one_call(stack: Stack, redis_url: str) -> None:
    """$1e-12 is rounded up to one micro-dollar, never down to a zero that refuses all."""
    cy = hash_key("sk-spend-cy")
    error = _paid_once_then_refused(
        stack, redis_url, "sk-spend-cy", f"{{t:key:{cy}}}:key:{cy}*", "key_budget_exceeded"
    )
    assert "API key cy" in error["message"]


def test_member_entry_without_budget_gets_the_team_default(stack: Stack, redis_url: str) -> None:
    """u-eve's members: entry sets only a window; the team's member_max_budget applies."""
    error = _paid_once_then_refused(
        stack,
        redis_url,
        "sk-spend-eve",
        "{t:team:t-fall}:team_member:t-fall:u-eve:1h*",  # her own window, the default's limit
        "team_member_budget_exceeded",
    )
    assert "user u-eve in team t-fall" in error["message"]


def test_key_metadata_tag_budget_is_enforced(stack: Stack, redis_url: str) -> None:
    """dot's key carries dot-tag in its metadata: the tag budget counts its calls (the
    client's own tags are merged in), and the tag read-outs show that spend."""
    error = _paid_once_then_refused(
        stack,
        redis_url,
        "sk-spend-dot",
        "{spend}:tag:dot-tag*",
        "tag_budget_exceeded",
        metadata={"tags": ["client-side"]},
    )
    assert "tag dot-tag" in error["message"]
    budgets = _get(f"{stack.admin_url}/budgets")["budgets"]
    tag = next(b for b in budgets if b["kind"] == "tag" and b["name"] == "tag dot-tag")
    assert tag["spend"] > 0
