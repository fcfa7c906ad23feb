"""Fallbacks by error class through a real Envoy (both paths): a content-policy
refusal goes to ``content_policy_fallbacks``, a provider's context-length error to
``context_window_fallbacks``, any other failure to the generic ``fallbacks``; a
refusal never reaches an unrelated group. Retries of such a group pass through
Envoy's internal hop listener (see ``extproc.core.failover``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import pytest

from tests.integration.stack import POLICIES, Stack, post, start_stack

POLICY = POLICIES / "routing.yaml"
REFUSAL = "replay:azure-content-filter"
TOO_LONG = "replay:anthropic-prompt-too-long"
#: Headers the gateway uses between its own filters; no upstream may see them.
INTERNAL = ("x-extproc-attempt-cluster", "x-envoy-attempt-count", "x-extproc-deployment")


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    mode: Literal["ext_proc", "ext_authz"] = request.param
    with start_stack(tmp_path_factory.mktemp(mode), mode=mode, policy=POLICY) as running:
        yield running


def call(stack: Stack, model: str, fail: str) -> tuple[int, dict[str, str], Any]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    status, headers, payload = post(
        f"{stack.url}/v1/chat/completions", body.encode(), {"x-mock-fail": fail}
    )
    return status, headers, json.loads(payload)


def models_seen(stack: Stack, site: str) -> list[str]:
    return [json.loads(s["body"])["model"] for s in stack.mocks.seen(site)]


def assert_no_internal_headers(stack: Stack) -> None:
    for site in ("mock_a", "mock_b", "mock_c"):
        for seen in stack.mocks.seen(site):
            sent = {k.lower() for k in seen["headers"]}
            assert not sent & set(INTERNAL), (site, sorted(sent & set(INTERNAL)))


def test_a_content_policy_refusal_goes_to_its_own_fallback(stack: Stack) -> None:
    stack.mocks.clear()
    status, headers, body = call(stack, "guarded", f"mock_a={REFUSAL}")
    assert status == 200, body
    assert headers["x-mock-upstream"] == "mock_b"
    assert body["model"] == "lenient-model"  # not spare-model, the generic fallback
    assert models_seen(stack, "mock_b") == ["lenient-model"]
    assert headers["x-litellm-model-id"] == "lenient-b"
    assert headers["x-litellm-attempted-retries"] == "1"
    assert headers["x-litellm-attempted-fallbacks"] == "1"
    assert "x-envoy-ratelimited" not in headers
    assert_no_internal_headers(stack)


def test_a_context_length_error_goes_to_the_context_window_fallback(stack: Stack) -> None:
    stack.mocks.clear()
    status, headers, body = call(stack, "guarded", f"mock_a={TOO_LONG}")
    assert status == 200, body
    assert (headers["x-mock-upstream"], body["model"]) == ("mock_c", "roomy-model")
    assert stack.mocks.seen("mock_b") == []  # neither spare nor lenient was asked
    assert headers["x-litellm-model-id"] == "roomy-c"


def test_any_other_failure_goes_to_the_generic_fallback(stack: Stack) -> None:
    stack.mocks.clear()
    status, headers, body = call(stack, "guarded", "mock_a=500")
    assert status == 200, body
    assert (headers["x-mock-upstream"], body["model"]) == ("mock_b", "spare-model")
    assert headers["x-litellm-attempted-retries"] == "1"
    assert_no_internal_headers(stack)


def test_a_refusal_never_reaches_an_unrelated_group(stack: Stack) -> None:
    # the content-policy fallback fails too (a 500): its list has nothing left, so the
    # client gets that answer, not one from the generic fallback (also on mock_b)
    stack.mocks.clear()
    status, headers, body = call(stack, "guarded", f"mock_a={REFUSAL},mock_b=500")
    assert status == 500, body
    assert models_seen(stack, "mock_b") == ["lenient-model"]
    assert "x-envoy-ratelimited" not in headers
    # the fallback refuses too: the client gets the (normalized) refusal
    stack.mocks.clear()
    status, _, body = call(stack, "guarded", f"mock_a={REFUSAL},mock_b={REFUSAL}")
    assert (status, body["error"]["code"]) == (400, "content_policy_violation")
    assert models_seen(stack, "mock_b") == ["lenient-model"]
    # a group without content-policy fallbacks: the refusal reaches the client and its
    # generic fallback is not asked
    stack.mocks.clear()
    status, _, body = call(stack, "plainfb", f"mock_a={REFUSAL}")
    assert (status, body["error"]["code"]) == (400, "content_policy_violation")
    assert stack.mocks.seen("mock_b") == []
    # an ordinary bad request is the caller's: passed on, never retried
    stack.mocks.clear()
    status, _, _ = call(stack, "guarded", "mock_a=replay:chat-bad-request")
    assert status == 400
    assert stack.mocks.seen("mock_b") == stack.mocks.seen("mock_c") == []


def test_the_sdk_streams_from_the_content_policy_fallback(stack: Stack) -> None:
    import openai  # noqa: PLC0415

    stack.mocks.clear()
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="guarded",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-mock-fail": f"mock_a={REFUSAL}"},
        )
        chunks = list(raw.parse())
        assert raw.headers["x-mock-upstream"] == "mock_b"
        assert raw.headers["x-litellm-model-id"] == "lenient-b"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert models_seen(stack, "mock_b") == ["lenient-model"]


def test_a_hung_retry_is_timed_out_and_cools_its_own_deployment(stack: Stack) -> None:
    """The content-policy fallback's first deployment accepts and never answers:
    Envoy's per-try timeout ends it, the call goes on with the same list (not another
    group), and the timeout counts for that deployment (``allowed_fails: 0``: it cools
    at once)."""
    import time  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    stack.mocks.clear()
    started = time.monotonic()
    status, headers, body = call(stack, "timed", f"mock_a={REFUSAL},mock_b=hang")
    assert time.monotonic() - started < 1 + 2  # the 1 s timeout, not the client's
    assert status == 200, body
    assert headers["x-litellm-model-id"] == "slowcp-c"
    assert headers["x-litellm-attempted-retries"] == "2"
    assert models_seen(stack, "mock_b") == ["slowcp-model"]
    deadline = time.monotonic() + 5
    while True:
        with urllib.request.urlopen(f"{stack.admin_url}/deployments", timeout=5) as resp:  # noqa: S310
            states = json.load(resp)["deployments"]
        if states["slowcp-b"]["cooling_down"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert states["slowcp-b"]["cooling_down"]
    assert not states["timed-a"]["cooling_down"]  # allowed_fails: 100


def test_a_burst_of_refusals_is_served_whole(stack: Stack) -> None:
    """40 refusals at once: every one is retried on the content-policy fallback (a
    composite cluster's retry circuit breaker is Envoy's 3 by default)."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    stack.mocks.clear()
    with ThreadPoolExecutor(max_workers=40) as pool:
        results = list(pool.map(lambda _: call(stack, "guarded", f"mock_a={REFUSAL}"), range(40)))
    assert [status for status, _, _ in results] == [200] * 40
    assert {body["model"] for _, _, body in results} == {"lenient-model"}
    assert all("x-extproc-retry" not in headers for _, headers, _ in results)


def test_a_retry_the_hop_cannot_connect_for_answers_json(stack: Stack) -> None:
    """Both deployments drop the connection: the hop listener's own 503 reaches the
    client as an OpenAI-style error, like the first listener's."""
    stack.mocks.clear()
    status, headers, body = call(stack, "guarded", "mock_a=reset,mock_b=reset")
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert set(body["error"]) == {"message", "type", "param", "code"}
