"""Timeouts and misconfigured deployments fail over, through a real Envoy: a
deployment that accepts and never answers, and one answering 401, 403 or 404, are
retried on the group's other deployment or its fallback group, and cool down."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Literal

import pytest

from tests.integration.stack import POLICIES, Stack, start_stack
from tests.integration.test_router import admin, call, metric_lines

POLICY = POLICIES / "timeouts.yaml"


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    mode: Literal["ext_proc", "ext_authz"] = request.param
    with start_stack(tmp_path_factory.mktemp(mode), mode=mode, policy=POLICY) as running:
        yield running


def _model(info: dict[str, Any]) -> str:
    return str(json.loads(info["_body"])["model"])


#: LiteLLM's failure-rate rule cools a deployment with siblings once more than half of
#: at least 5 calls this minute failed; a timeout (408) is retryable, so it cools by
#: that rule only. The minute may roll over once meanwhile: at most 4 more attempts.
_COOLS_WITHIN = 9


def test_a_hung_deployment_times_out_fails_over_and_cools(stack: Stack) -> None:
    """hang-b takes each request and never answers: every call is answered by hang-a
    within the group's 2 s timeout plus a second, and hang-b cools down (LiteLLM's
    failure-rate rule: its 5th timed-out attempt of the minute)."""
    stack.mocks.clear()
    headers = {"x-mock-fail": "mock_b=hang"}
    calls = 0
    while admin(stack, "/deployments")["deployments"]["hang-b"]["cooling_down"] is not True:
        assert len(stack.mocks.seen("mock_b")) <= _COOLS_WITHIN
        assert calls < 60, "hang-b never cooled"
        started = time.monotonic()
        status, upstream, info = call(stack, "hang", headers)
        calls += 1
        took = time.monotonic() - started
        assert (status, upstream) == (200, "mock_a"), info["_body"]
        if stack.mode == "ext_proc":
            assert _model(info) == "model-a"
        assert took < 3.0
    assert len(stack.mocks.seen("mock_b")) >= 5
    timeouts = metric_lines(
        stack, 'extproc_upstream_answers_total{deployment="hang-b",status="408"}'
    )
    assert sum(timeouts) >= 5
    # cooling down: the next calls go straight to hang-a
    tried = len(stack.mocks.seen("mock_b"))
    for _ in range(4):
        assert call(stack, "hang", headers)[:2] == (200, "mock_a")
    assert len(stack.mocks.seen("mock_b")) == tried


def test_a_stream_whose_deployment_hangs_is_served_by_the_other(stack: Stack) -> None:
    import openai  # noqa: PLC0415

    stack.mocks.clear()
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0, timeout=20)
    calls = 0
    while admin(stack, "/deployments")["deployments"]["hs-b"]["cooling_down"] is not True:
        assert len(stack.mocks.seen("mock_b")) <= _COOLS_WITHIN
        assert calls < 60, "hs-b never cooled"
        started = time.monotonic()
        stream = client.chat.completions.create(
            model="hang-stream",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-mock-fail": "mock_b=hang"},
        )
        calls += 1
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == "Hello from the mock upstream."
        assert time.monotonic() - started < 3.0  # stream_timeout 2 s, plus a second
    assert len(stack.mocks.seen("mock_b")) >= 5


def test_a_paced_stream_outlives_its_stream_timeout(stack: Stack) -> None:
    """stream_timeout bounds the wait for each byte, not the stream: events 0.4 s
    apart stream for longer than the 1 s stream_timeout, untouched."""
    import openai  # noqa: PLC0415

    stack.mocks.clear()
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0, timeout=20)
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="paced",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-mock-chunk-delay-ms": "400"},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Hello from the mock upstream."
    assert time.monotonic() - started > 1.0
    assert len(stack.mocks.seen("mock_a")) + len(stack.mocks.seen("mock_b")) == 1


def test_a_deployment_answering_401_fails_over_to_the_other(stack: Stack) -> None:
    stack.mocks.clear()
    results = [call(stack, "keyed", {"x-mock-fail": "mock_a=401"}) for _ in range(10)]
    assert [(status, upstream) for status, upstream, _ in results] == [(200, "mock_b")] * 10
    assert 1 <= len(stack.mocks.seen("mock_a")) <= 2
    assert admin(stack, "/deployments")["deployments"]["keyed-a"]["cooling_down"] is True


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_misconfigured_group_goes_to_the_default_fallbacks(stack: Stack, status: int) -> None:
    """A lone deployment answering 401 (a bad key), 403 or 404 (a wrong model name):
    the call is served by router_settings.default_fallbacks' group."""
    stack.mocks.clear()
    got, upstream, info = call(stack, f"lock-{status}", {"x-mock-fail": f"mock_a={status}"})
    assert (got, upstream) == (200, "mock_c"), info["_body"]
    assert len(stack.mocks.seen("mock_a")) == 1
    if stack.mode == "ext_proc":
        assert _model(info) == "spare-model"


def test_an_ordinary_400_is_not_retried(stack: Stack) -> None:
    stack.mocks.clear()
    got, _, info = call(stack, "plain-400", {"x-mock-fail": "mock_a=400"})
    assert got == 400
    assert json.loads(info["_body"])["error"]["code"] == "mock_bad_request"
    assert stack.mocks.seen("mock_c") == []
