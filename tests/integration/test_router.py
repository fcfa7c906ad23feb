"""Routing strategies, cooldowns and context windows through a real Envoy with three
mock deployments (mock_a, mock_b, mock_c)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import pytest

from tests.integration.stack import POLICIES, Stack, post, start_stack

POLICY = POLICIES / "routing.yaml"


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    mode: Literal["ext_proc", "ext_authz"] = request.param
    with start_stack(tmp_path_factory.mktemp(mode), mode=mode, policy=POLICY) as running:
        yield running


def call(
    stack: Stack, model: str, headers: dict[str, str] | None = None, text: str = "hi"
) -> tuple[int, str, dict[str, Any]]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}]}).encode()
    status, resp_headers, payload = post(f"{stack.url}/v1/chat/completions", body, headers or {})
    return status, resp_headers.get("x-mock-upstream", ""), {**resp_headers, "_body": payload}


def served(stack: Stack, model: str, n: int, headers: dict[str, str] | None = None) -> Counter[str]:
    return Counter(
        upstream if status == 200 else f"{status}"
        for status, upstream, _ in (call(stack, model, headers) for _ in range(n))
    )


def metric_lines(stack: Stack, prefix: str) -> list[float]:
    with urllib.request.urlopen(f"{stack.admin_url}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]


def admin(stack: Stack, path: str) -> Any:
    with urllib.request.urlopen(f"{stack.admin_url}{path}", timeout=5) as resp:  # noqa: S310
        return json.load(resp)


def test_a_429_cools_the_deployment_for_cooldown_time(stack: Stack) -> None:
    stack.mocks.clear()
    failing = {"x-mock-fail": "mock_b=429"}
    counts = served(stack, "trio", 60, failing)
    # the first call that lands on trio-b gets its 429; then trio-b is skipped
    assert counts["429"] == 1
    assert counts["mock_a"] + counts["mock_c"] == 59
    assert len(stack.mocks.seen("mock_b")) == 1
    state = admin(stack, "/deployments")["deployments"]["trio-b"]
    assert state["cooling_down"] is True
    assert 0 < state["cooldown_remaining_s"] <= 3
    time.sleep(3.2)  # cooldown_time: 3 s
    assert "mock_b" in served(stack, "trio", 30)


def test_a_lone_deployment_cools_on_401_and_the_answer_is_a_429(stack: Stack) -> None:
    status, _, _ = call(stack, "lone", {"x-mock-fail": "mock_c=401"})
    assert status == 401  # the upstream's own answer, passed on
    status, _, info = call(stack, "lone")
    assert status == 429
    assert json.loads(info["_body"])["error"]["code"] == "deployments_cooling_down"
    assert 1 <= int(info["retry-after"]) <= 5


def test_three_deployments_failing_a_quarter_stay_in_service(stack: Stack) -> None:
    """LiteLLM's default rules: each deployment fails every fourth of its calls with a
    500 (never more than half of five or more), so none cools down."""
    headers = {"x-mock-fail": "mock_a=500/4,mock_b=500/4,mock_c=500/4"}
    counts = served(stack, "flaky", 100, headers)
    assert set(counts) <= {"mock_a", "mock_b", "mock_c", "500"}  # no 429 cooling refusal
    assert 22 <= counts["500"] <= 25  # the failures did happen, and reached the client
    states = admin(stack, "/deployments")["deployments"]
    assert [states[f"flaky-{d}"]["cooling_down"] for d in "abc"] == [False] * 3


def test_allowed_fails_100_does_not_cool_at_the_fifth_failure(stack: Stack) -> None:
    """12 failures over two deployments: one has at least 6, which the failure-rate
    rule would cool; with allowed_fails 100 it is counted, not cooled."""
    headers = {"x-mock-fail": "mock_a=500,mock_b=500"}
    statuses = [call(stack, "tolerant", headers)[0] for _ in range(12)]
    assert statuses == [500] * 12  # never a 429 deployments_cooling_down
    states = admin(stack, "/deployments")["deployments"]
    assert not states["tolerant-a"]["cooling_down"]
    assert not states["tolerant-b"]["cooling_down"]


async def test_least_busy_avoids_the_slow_deployment(stack: Stack) -> None:
    headers = {"x-mock-slow": "mock_b=1500"}
    gate = asyncio.Semaphore(4)

    async def one() -> str:
        async with gate:
            _, upstream, _ = await asyncio.to_thread(call, stack, "busy", headers)
        return upstream

    counts = Counter(await asyncio.gather(*(one() for _ in range(24))))
    assert counts["mock_a"] >= 3 * counts["mock_b"]


def test_latency_based_prefers_the_fast_deployment(stack: Stack) -> None:
    headers = {"x-mock-slow": "mock_b=300"}
    counts = served(stack, "fast", 20, headers)
    assert counts["mock_b"] <= 2  # measured once or twice, then avoided
    assert counts["mock_a"] >= 18


def test_cost_based_takes_the_cheapest(stack: Stack) -> None:
    assert served(stack, "cheap", 10) == {"mock_b": 10}


def test_usage_based_respects_rpm(stack: Stack) -> None:
    if time.time() % 60 > 45:  # keep the calls inside one clock minute
        time.sleep(61 - time.time() % 60)
    counts = served(stack, "usage", 11)
    assert counts == {"mock_a": 5, "mock_b": 5, "429": 1}


def test_cost_based_keeps_the_cheapest_to_its_rpm_for_the_minute(stack: Stack) -> None:
    """The cheap deployment has rpm 3: calls 4+ of the minute go to the other one."""
    if time.time() % 60 > 45:  # keep the calls inside one clock minute
        time.sleep(61 - time.time() % 60)
    order = [call(stack, "cheaprpm")[:2] for _ in range(6)]
    assert order == [(200, "mock_b")] * 3 + [(200, "mock_a")] * 3


def test_priority_order_and_failover_after_cooldown(stack: Stack) -> None:
    assert served(stack, "prio", 5) == {"mock_a": 5}
    failing = {"x-mock-fail": "mock_a=500"}
    statuses = [call(stack, "prio", failing)[:2] for _ in range(8)]
    # more than allowed_fails (3) failures in a minute cool prio-a: prio-b takes over
    first_b = next(i for i, (s, up) in enumerate(statuses) if up == "mock_b")
    assert all(s == 500 for s, _ in statuses[:first_b])
    assert all(up == "mock_b" for _, up in statuses[first_b:])
    assert first_b <= 4


def test_context_window_fallback_and_overflow(stack: Stack) -> None:
    long_text = "word " * 200  # ~250 tokens: more than small-a's 50
    status, upstream, _ = call(stack, "small", text=long_text)
    assert (status, upstream) == (200, "mock_c")  # fell back to the big group
    status, upstream, _ = call(stack, "small", text="hi")
    assert (status, upstream) == (200, "mock_a")
    status, _, info = call(stack, "tiny", text=long_text)
    error = json.loads(info["_body"])["error"]
    assert (status, error["code"], error["param"]) == (400, "context_length_exceeded", "messages")


@pytest.mark.parametrize(
    ("group", "failure", "site"),
    [
        ("ha1", "429", "mock_b"),
        ("ha2", "500", "mock_a"),
        ("ha3", "reset", "mock_c"),
        ("ha4", "refused", "mock_dead"),  # nothing listens: connections are refused
    ],
)
def test_failover_gives_the_client_one_success(
    stack: Stack, group: str, failure: str, site: str
) -> None:
    """One of three deployments answers 429, 500 or resets: Envoy retries the call on
    another deployment (its own credentials and model name), and the failing one
    cools down."""
    stack.mocks.clear()
    headers = {"x-mock-fail": f"{site}={failure}"}
    results = [call(stack, group, headers) for _ in range(300)]
    assert [status for status, _, _ in results] == [200] * 300
    for _, upstream, info in results:
        assert upstream != site
        model = json.loads(info["_body"])["model"]
        if stack.mode == "ext_proc" or model != group:
            assert model == f"model-{upstream[-1]}"  # rewritten for the deployment that served
    # the failed attempts reached the failing deployment; its cooldown stopped the rest
    deployment = f"{group}-{site.removeprefix('mock_')}"
    if site != "mock_dead":
        assert 1 <= len(stack.mocks.seen(site)) <= 5
    else:
        answers = metric_lines(stack, f'extproc_upstream_answers_total{{deployment="{deployment}"')
        assert 1 <= sum(answers) <= 5
    state = admin(stack, "/deployments")["deployments"][deployment]
    assert state["cooling_down"] is True


def test_fallback_group_serves_when_the_group_fails(stack: Stack) -> None:
    status, upstream, info = call(stack, "solo", {"x-mock-fail": "mock_a=500"})
    assert (status, upstream) == (200, "mock_b")
    assert json.loads(info["_body"])["model"] == "backup-model"


def test_a_stream_failing_midway_is_not_retried_and_ends_in_an_error(stack: Stack) -> None:
    import openai  # noqa: PLC0415

    stack.mocks.clear()
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="solo",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        # paced, so the first events reach the client before the upstream breaks
        extra_headers={"x-mock-fail": "mock_a=midstream", "x-mock-chunk-delay-ms": "100"},
    )
    received: list[Any] = []

    def read_all() -> None:
        received.extend(stream)

    with pytest.raises(Exception) as info:  # noqa: PT011 - the transport error type varies
        read_all()
    assert not isinstance(info.value, AssertionError)
    assert len(received) <= 2  # what was sent before the break, never a clean end
    assert stack.mocks.seen("mock_b") == []  # bytes had reached the client: no retry


@pytest.mark.parametrize(
    ("recording", "code"),
    [
        ("anthropic-prompt-too-long", "context_length_exceeded"),
        ("azure-content-filter", "content_policy_violation"),
    ],
)
def test_upstream_errors_normalized(stack: Stack, recording: str, code: str) -> None:
    status, _, info = call(stack, "trio", {"x-mock-replay": recording})
    error = json.loads(info["_body"])["error"]
    assert (status, error["code"]) == (400, code)
    assert int(info["content-length"]) == len(info["_body"])


def test_large_group_built_from_context_windows(stack: Stack) -> None:
    """Deployments with different windows: a <group>-large group of the larger ones."""
    status, upstream, _ = call(stack, "mixed-large")
    assert (status, upstream) == (200, "mock_c")


def test_content_policy_refusal_goes_to_the_content_policy_fallback(stack: Stack) -> None:
    stack.mocks.clear()
    refusal = {"x-mock-fail": "mock_a=replay:azure-content-filter"}
    status, upstream, info = call(stack, "strict", refusal)
    assert (status, upstream) == (200, "mock_b")
    assert json.loads(info["_body"])["model"] == "lenient-model"
    # an ordinary 400 is the caller's problem: passed on, not retried
    stack.mocks.clear()
    status, _, info = call(stack, "strict", {"x-mock-fail": "mock_a=replay:chat-bad-request"})
    assert status == 400
    assert stack.mocks.seen("mock_b") == []
    # the fallback refuses too: the client gets the normalized refusal
    both = {"x-mock-fail": "mock_a=replay:azure-content-filter,mock_b=replay:azure-content-filter"}
    status, _, info = call(stack, "strict", both)
    assert (status, json.loads(info["_body"])["error"]["code"]) == (400, "content_policy_violation")


def test_failover_keeps_in_flight_counts_exact(stack: Stack) -> None:
    for _ in range(6):
        status, _, _ = call(stack, "busyha", {"x-mock-fail": "mock_a=500"})
        assert status == 200
    states = admin(stack, "/deployments")["deployments"]
    assert (states["busyha-a"]["in_flight"], states["busyha-b"]["in_flight"]) == (0, 0)


def test_clients_hanging_up_do_not_cool_a_healthy_deployment(stack: Stack) -> None:
    body = json.dumps({"model": "patient", "messages": [{"role": "user", "content": "hi"}]})
    slow = {"x-mock-slow": "mock_a=1500,mock_b=1500", "content-type": "application/json"}
    for _ in range(5):  # 5 of 5 would cool (failure-rate rule); all given up by clients
        request = urllib.request.Request(  # noqa: S310 - a loopback http URL
            f"{stack.url}/v1/chat/completions", data=body.encode(), headers=slow
        )
        with pytest.raises(TimeoutError):  # the client hangs up
            urllib.request.urlopen(request, timeout=0.3)  # noqa: S310
    time.sleep(2)
    states = admin(stack, "/deployments")["deployments"]
    assert not states["patient-a"]["cooling_down"]
    assert not states["patient-b"]["cooling_down"]


def test_failover_routes_add_the_v1_prefix(stack: Stack) -> None:
    """A failover group's route (a composite cluster) rewrites an unprefixed path too,
    for the attempt that serves it; the query string stays."""
    stack.mocks.clear()
    body = json.dumps({"model": "ha1", "messages": [{"role": "user", "content": "hi"}]})
    status, headers, payload = post(f"{stack.url}/chat/completions?x=1", body.encode())
    assert status == 200, payload[:300]
    upstream = headers["x-mock-upstream"]
    assert [s["path"] for s in stack.mocks.seen(upstream)] == ["/v1/chat/completions?x=1"]
