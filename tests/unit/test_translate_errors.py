"""Error bodies between OpenAI's shape and Anthropic's."""

from __future__ import annotations

import json

import anthropic.types.shared
import pytest

from extproc.core.errors import (
    AuthenticationError,
    BudgetExceededError,
    GatewayError,
    InvalidParameterError,
    ModelNotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
)
from extproc.core.translate import anthropic_error_to_openai, openai_error_to_anthropic
from tests.unit.translate_support import DOCUMENTED, RECORDED, response_body, response_code


def anthropic_shape(status: int, body: bytes) -> dict[str, str]:
    out = json.loads(openai_error_to_anthropic(status, body))
    assert set(out) == {"type", "error"}
    assert out["type"] == "error"
    if out["error"]["type"] != "request_too_large":  # documented, not in the SDK's union
        anthropic.types.shared.ErrorResponse.model_validate(out)
    error: dict[str, str] = out["error"]
    assert set(error) == {"type", "message"}
    return error


def openai_shape(status: int, body: bytes) -> dict[str, str | None]:
    out = json.loads(anthropic_error_to_openai(status, body))
    assert set(out) == {"error"}
    error: dict[str, str | None] = out["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("name", "kind"),
    [("chat-bad-request", "invalid_request_error"), ("chat-unknown-model", "not_found_error")],
)
def test_recorded_openai_errors(name: str, kind: str) -> None:
    body = response_body(RECORDED, name)
    error = anthropic_shape(response_code(RECORDED, name), body)
    assert error["type"] == kind
    assert error["message"] == json.loads(body)["error"]["message"]


@pytest.mark.parametrize(
    ("name", "kind", "code"),
    [
        ("error-invalid-request", "invalid_request_error", "invalid_request"),
        ("error-not-found", "invalid_request_error", "not_found"),
        ("error-overloaded", "server_error", "overloaded"),
    ],
)
def test_documented_anthropic_errors(name: str, kind: str, code: str) -> None:
    body = response_body(DOCUMENTED, name)
    error = openai_shape(response_code(DOCUMENTED, name), body)
    assert (error["type"], error["code"], error["param"]) == (kind, code, None)
    assert error["message"] == json.loads(body)["error"]["message"]


def test_a_prompt_too_long_is_context_length_exceeded() -> None:
    body = (
        b'{"type":"error","error":{"type":"invalid_request_error",'
        b'"message":"prompt is too long: 210463 tokens > 200000 maximum"}}'
    )
    error = openai_shape(400, body)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")


@pytest.mark.parametrize(
    ("status", "openai_type", "code", "kind"),
    [
        (400, "invalid_request_error", "invalid_value", "invalid_request_error"),
        (401, "invalid_request_error", "invalid_api_key", "authentication_error"),
        (403, "invalid_request_error", "unsupported_country_region_territory", "permission_error"),
        (404, "invalid_request_error", "model_not_found", "not_found_error"),
        (409, "invalid_request_error", None, "invalid_request_error"),
        (413, "invalid_request_error", None, "request_too_large"),
        (422, "authentication_error", None, "authentication_error"),
        (429, "requests", "rate_limit_exceeded", "rate_limit_error"),
        (429, "insufficient_quota", "insufficient_quota", "billing_error"),
        (500, "server_error", None, "api_error"),
        (502, "server_error", None, "api_error"),
        (503, "server_error", None, "overloaded_error"),
        (500, "service_unavailable_error", None, "overloaded_error"),
        (504, "server_error", None, "timeout_error"),
        (400, "server_error", None, "invalid_request_error"),
    ],
)
def test_openai_types(status: int, openai_type: str, code: str | None, kind: str) -> None:
    body = {"error": {"message": "m", "type": openai_type, "param": None, "code": code}}
    assert anthropic_shape(status, json.dumps(body).encode())["type"] == kind


@pytest.mark.parametrize(
    ("status", "kind", "openai_type", "code"),
    [
        (400, "invalid_request_error", "invalid_request_error", "invalid_request"),
        (401, "authentication_error", "authentication_error", "invalid_api_key"),
        (402, "billing_error", "insufficient_quota", "insufficient_quota"),
        (403, "permission_error", "permission_error", "permission_denied"),
        (404, "not_found_error", "invalid_request_error", "not_found"),
        (413, "request_too_large", "invalid_request_error", "payload_too_large"),
        (429, "rate_limit_error", "rate_limit_error", "rate_limit_exceeded"),
        (500, "api_error", "server_error", "internal_error"),
        (504, "timeout_error", "server_error", "timeout"),
        (529, "overloaded_error", "server_error", "overloaded"),
        (404, "invalid_request_error", "invalid_request_error", "not_found"),  # status says more
        (503, "some_new_error", "server_error", "overloaded"),  # unknown type: by status
        (418, "some_new_error", "invalid_request_error", "invalid_request"),
    ],
)
def test_anthropic_types(status: int, kind: str, openai_type: str, code: str) -> None:
    body = {"type": "error", "error": {"type": kind, "message": "m"}}
    error = openai_shape(status, json.dumps(body).encode())
    assert (error["type"], error["code"]) == (openai_type, code)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (InvalidParameterError("bad", param="n"), "invalid_request_error"),
        (AuthenticationError("no key"), "authentication_error"),
        (ModelNotFoundError("no model"), "not_found_error"),
        (PayloadTooLargeError("big"), "request_too_large"),
        (BudgetExceededError("spent"), "rate_limit_error"),
        (RateLimitError("rpm"), "rate_limit_error"),
        (ServiceUnavailableError("store down"), "overloaded_error"),
    ],
)
def test_the_gateways_own_errors(error: GatewayError, kind: str) -> None:
    out = anthropic_shape(error.status, error.body())
    assert out == {"type": kind, "message": error.message}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"upstream connect error or disconnect/reset before headers", "upstream connect error"),
        (b"<html><body>502 Bad Gateway</body></html>", "<html><body>502 Bad Gateway"),
        (b"", "Upstream error (HTTP 502)"),
        (b"\xff\xfe not utf-8", "\ufffd\ufffd not utf-8"),
        (b'{"error": "a plain string"}', "a plain string"),
        (b'{"message": "top-level message"}', "top-level message"),
        (b'{"detail": "unknown shape"}', '{"detail": "unknown shape"}'),
        (b"[1, 2]", "[1, 2]"),
        (b"[" * 100_000, "[[[["),
        (b'{"error": {"message": 5}}', '{"error": {"message": 5}}'),
    ],
)
def test_bodies_that_are_not_either_shape(body: bytes, message: str) -> None:
    assert anthropic_shape(502, body)["message"].startswith(message)
    assert str(openai_shape(502, body)["message"]).startswith(message)


def test_messages_are_cut() -> None:
    body = json.dumps({"error": {"message": "x" * 100_000}}).encode()
    assert len(anthropic_shape(500, body)["message"]) == 2000
    assert len(str(openai_shape(500, b"y" * 1_000_000)["message"])) == 2000
