"""Deployment credentials never reach a client, even when an upstream echoes them."""

from __future__ import annotations

import http.client
import json
import urllib.parse

import openai
import pytest

from tests.integration.stack import KEYS, Stack

KEY = KEYS["TEST_KEY_A"]


def raw_post(stack: Stack, echo: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, every header pair as sent, body): repeated headers kept apart."""
    parts = urllib.parse.urlsplit(stack.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=15)
    try:
        body = json.dumps({"model": "only-a", "messages": [{"role": "user", "content": "hi"}]})
        conn.request(
            "POST",
            "/v1/chat/completions",
            body,
            {"content-type": "application/json", "x-mock-echo-key": echo},
        )
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz"])
def test_echoed_credentials_are_redacted(request: pytest.FixtureRequest, mode: str) -> None:
    stack: Stack = request.getfixturevalue("stack" if mode == "ext_proc" else "authz_stack")
    # an error body and headers that repeat the key the gateway injected
    status, headers, body = raw_post(stack, "error")
    assert status == 500
    assert KEY.encode() not in body
    message = json.loads(body)["error"]["message"]
    assert message == 'upstream rejected key [REDACTED] ("[REDACTED]")'
    saw = [v for k, v in headers if k.lower() == "x-mock-saw-key"]
    assert saw == ["Bearer [REDACTED],[REDACTED]"]  # a repeated header is joined
    assert all(KEY not in v for _, v in headers)
    # a successful response's headers too; its body is untouched
    status, headers, body = raw_post(stack, "header")
    assert status == 200
    assert [v for k, v in headers if k.lower() == "x-mock-saw-key"] == [
        "Bearer [REDACTED],[REDACTED]"
    ]
    assert json.loads(body)["choices"][0]["message"]["content"]
    # the SDK sees an ordinary server error without the key
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="any", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(
            model="only-a",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-mock-echo-key": "error"},
        )
    assert KEY not in str(info.value.body)
    assert KEY not in str(info.value.response.headers)


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz"])
def test_a_key_cut_by_normalization_is_still_redacted(
    request: pytest.FixtureRequest, mode: str
) -> None:
    # a context-overflow 400 is rewritten to OpenAI's shape, its message cut at 2,000
    # characters, right through the echoed key: redaction comes first
    stack: Stack = request.getfixturevalue("stack" if mode == "ext_proc" else "authz_stack")
    status, _, body = raw_post(stack, "long-400")
    assert status == 400
    error = json.loads(body)["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["message"].endswith("[RED")  # the replacement, cut with the message
    assert KEY[:5] not in error["message"]
