"""Provider error bodies normalized to OpenAI's codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from extproc.core.upstream_errors import normalize_error

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def body_of(path: Path) -> tuple[int, bytes]:
    response = yaml.safe_load(path.read_text())["interactions"][0]["response"]
    return int(response["code"]), response["body"].encode()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (
            b'{"error": {"message": "This model\'s maximum context length is 128000 tokens. '
            b'However, your messages resulted in 130512 tokens.", "type": '
            b'"invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}',
            "context_length_exceeded",
        ),
        (
            body_of(FIXTURES / "synthetic" / "anthropic-prompt-too-long.yaml")[1],
            "context_length_exceeded",
        ),
        (b'{"message": "Input tokens exceed the configured limit"}', "context_length_exceeded"),
        (
            body_of(FIXTURES / "synthetic" / "azure-content-filter.yaml")[1],
            "content_policy_violation",
        ),
        (b"request blocked by the safety system", "content_policy_violation"),
    ],
)
def test_normalized(body: bytes, code: str) -> None:
    out = normalize_error(400, body)
    assert out is not None
    error = json.loads(out)["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("name", ["chat-bad-request", "chat-unknown-model"])
def test_other_recorded_errors_pass_through(name: str) -> None:
    status, body = body_of(FIXTURES / "openai-recorded" / f"{name}.yaml")
    assert normalize_error(status, body) is None


def test_only_4xx_and_small_bodies() -> None:
    assert normalize_error(500, b'{"error": {"message": "context length"}}') is None
    assert normalize_error(400, b"context length " * 10_000) is None
