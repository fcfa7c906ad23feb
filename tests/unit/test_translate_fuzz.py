"""Hostile input for the translators: mutated bodies, streams and error bodies.

Requests may only be refused with a BadRequestError; responses, streams and error
bodies never raise, and what comes out is still valid for the client's SDK.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from typing import Any

import anthropic.types
import openai.types.chat
import pydantic
import pytest

from extproc.core.errors import BadRequestError
from extproc.core.translate import (
    ChatToMessagesStream,
    MessagesToChatStream,
    anthropic_error_to_openai,
    chat_response_to_message,
    chat_to_messages,
    message_to_chat_response,
    messages_to_chat,
    openai_error_to_anthropic,
)
from tests.unit.test_translate_requests import CONVERSATION, TOOLS
from tests.unit.translate_support import (
    DOCUMENTED,
    RECORDED,
    SYNTHETIC,
    anthropic_events,
    check_message,
    openai_chunks,
    pieces,
    request_body,
    response_body,
)

ROUNDS = int(__import__("os").environ.get("FUZZ_ROUNDS", "600"))


def deep(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


def hostile(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            False,
            0,
            -1,
            2**70,
            1.5,
            float("nan"),
            "",
            " ",
            "\ud800",
            "data:",
            "data:image/png;base64,",
            "x" * rng.choice((1, 1000, 300_000)),
            [],
            {},
            [None],
            [{}],
            {"type": None},
            {"type": "text"},
            {"type": "tool_use"},
            {"type": "function", "function": None},
            deep(300),
            list(range(2000)),
        ]
    )


def _containers(value: Any, out: list[tuple[Any, Any]]) -> None:
    """Every (container, key) in a JSON value."""
    if isinstance(value, dict):
        for key in list(value):
            out.append((value, key))
            _containers(value[key], out)
    elif isinstance(value, list):
        for i in range(len(value)):
            out.append((value, i))
            _containers(value[i], out)


def mutate(value: Any, rng: random.Random, times: int = 3) -> Any:
    value = copy.deepcopy(value)
    for _ in range(times):
        spots: list[tuple[Any, Any]] = []
        _containers(value, spots)
        if not spots:
            return hostile(rng)
        container, key = rng.choice(spots)
        action = rng.random()
        if action < 0.6:
            container[key] = hostile(rng)
        elif action < 0.75:
            del container[key]
        elif action < 0.85 and isinstance(container, dict):
            container[rng.choice(("type", "role", "content", "zz", "index", "id"))] = hostile(rng)
        elif isinstance(container, list):
            container.insert(rng.randrange(len(container) + 1), copy.deepcopy(container[key]))
        else:
            container[key] = rng.choice([container[key], [container[key]], {"x": container[key]}])
    return value


CHAT_SEEDS: list[dict[str, Any]] = [
    request_body(RECORDED, "chat-tools"),
    request_body(SYNTHETIC, "openai-streaming-tools"),
    {
        "model": "gpt-4.1",
        "messages": CONVERSATION,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "parallel_tool_calls": False,
        "stop": ["END"],
        "temperature": 0.5,
        "user": "u",
    },
]
MESSAGES_SEEDS: list[dict[str, Any]] = [
    request_body(DOCUMENTED, "messages-tools"),
    request_body(DOCUMENTED, "messages-streaming-tools"),
    {
        "model": "claude",
        "max_tokens": 10,
        "system": [{"type": "text", "text": "S"}],
        "stop_sequences": ["x"],
        "metadata": {"user_id": "u"},
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AA"},
                    },
                    {
                        "type": "document",
                        "source": {"type": "text", "media_type": "text/plain", "data": "d"},
                    },
                ],
            }
        ],
    },
]


@pytest.mark.parametrize(
    ("translate", "seeds"),
    [
        (lambda body: chat_to_messages(body, "claude", default_max_tokens=100), CHAT_SEEDS),
        (lambda body: messages_to_chat(body, "gpt"), MESSAGES_SEEDS),
    ],
    ids=["chat_to_messages", "messages_to_chat"],
)
def test_mutated_requests_are_translated_or_refused(
    translate: Callable[[Any], dict[str, Any]], seeds: list[dict[str, Any]]
) -> None:
    rng = random.Random(1)
    refusals: list[BadRequestError] = []
    for _ in range(ROUNDS):
        body = mutate(rng.choice(seeds), rng, times=rng.randint(1, 4))
        try:
            translate(body)
        except BadRequestError as exc:  # anything else fails the test
            refusals.append(exc)
    assert 0 < len(refusals) < ROUNDS  # both outcomes were exercised
    for refusal in refusals:
        assert refusal.status == 400
        error = json.loads(refusal.body())["error"]
        assert set(error) == {"message", "type", "param", "code"}


def test_requests_that_are_not_objects() -> None:
    values: list[Any] = [None, [], "x", 5, deep(300)]
    for value in values:
        with pytest.raises(BadRequestError):
            chat_to_messages(value, "c", default_max_tokens=1)
        with pytest.raises(BadRequestError):
            messages_to_chat(value, "g")


@pytest.mark.parametrize("seed", range(3))
def test_mutated_responses_still_translate(seed: int) -> None:
    rng = random.Random(seed)
    chat = [json.loads(response_body(RECORDED, n)) for n in ("chat-basic", "chat-tools")]
    anthropic_ = [
        json.loads(response_body(DOCUMENTED, n)) for n in ("messages-basic", "messages-tools")
    ]
    for _ in range(ROUNDS // 3):
        check_message(chat_response_to_message(mutate(rng.choice(chat), rng), "claude"))
        out = message_to_chat_response(mutate(rng.choice(anthropic_), rng), "gpt", created=1)
        openai.types.chat.ChatCompletion.model_validate(out)
    check_message(chat_response_to_message(deep(300), "claude"))
    message_to_chat_response(None, "gpt", created=1)  # type: ignore[arg-type]


# ---- streams ----

_ANTHROPIC_EVENT: pydantic.TypeAdapter[anthropic.types.RawMessageStreamEvent] = (
    pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
)


def mutate_stream(raw: bytes, rng: random.Random) -> bytes:
    events = raw.split(b"\n\n")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(events))
        action = rng.random()
        if action < 0.4:  # a JSON-level change in one event
            head, sep, data = events[i].rpartition(b"data: ")
            try:
                value = json.loads(data)
            except ValueError:
                continue
            events[i] = head + sep + json.dumps(mutate(value, rng, 1)).encode()
        elif action < 0.6:  # bytes flipped or inserted
            at = rng.randrange(len(events[i]) + 1)
            junk = rng.choice(
                [b"\xff", b"\xc3", b"\r", b"\n", b"\r\n\r\n", b"data: ", b"[DONE]", b"{", b"\x00"]
            )
            events[i] = events[i][:at] + junk + events[i][at:]
        elif action < 0.75:
            del events[i]
            if not events:
                events = [b""]
        elif action < 0.9:
            events.insert(i, events[rng.randrange(len(events))])
        else:
            events = events[: rng.randrange(len(events) + 1)] or [b""]  # cut short
    return b"\n\n".join(events)


def check_anthropic_output(raw: bytes) -> None:
    raw.decode("utf-8")
    for event in anthropic_events(raw):
        if event["type"] == "error":
            anthropic.types.shared.ErrorResponse.model_validate(event)
        else:
            _ANTHROPIC_EVENT.validate_python(event)


def check_openai_output(raw: bytes) -> None:
    raw.decode("utf-8")
    for chunk in openai_chunks(raw):
        if isinstance(chunk, dict) and "error" in chunk:
            assert set(chunk["error"]) == {"message", "type", "param", "code"}
        elif isinstance(chunk, dict):
            openai.types.chat.ChatCompletionChunk.model_validate(chunk)


STREAMS = [
    ("openai", response_body(RECORDED, "chat-streaming")),
    ("openai", response_body(SYNTHETIC, "openai-streaming-tools")),
    ("anthropic", response_body(DOCUMENTED, "messages-streaming")),
    ("anthropic", response_body(DOCUMENTED, "messages-streaming-tools")),
    ("anthropic", response_body(DOCUMENTED, "messages-streaming-error")),
]


@pytest.mark.parametrize(
    ("upstream", "body"), STREAMS, ids=[f"{u}-{i}" for i, (u, _) in enumerate(STREAMS)]
)
def test_mutated_streams_never_raise(upstream: str, body: bytes) -> None:
    rng = random.Random(len(body))
    for round_ in range(ROUNDS // 5):
        data = mutate_stream(body, rng)
        how = rng.choice(("whole", "bytes", "random")) if len(data) < 20_000 else "random"
        if upstream == "openai":
            stream: ChatToMessagesStream | MessagesToChatStream = ChatToMessagesStream("c")
        else:
            stream = MessagesToChatStream("g", created=1, include_usage=rng.random() < 0.5)
        out = b"".join(stream.feed(p) for p in pieces(data, how, round_)) + stream.finish()
        assert stream.finish() == b""
        assert stream.feed(b"data: {}\n\n") == b""
        if upstream == "openai":
            check_anthropic_output(out)
        else:
            check_openai_output(out)


def test_random_bytes_as_streams() -> None:
    rng = random.Random(7)
    for _ in range(100):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(2000)))
        upstream = ChatToMessagesStream("c")
        check_anthropic_output(upstream.feed(data) + upstream.finish())
        stream = MessagesToChatStream("g", created=1, include_usage=True)
        check_openai_output(stream.feed(data) + stream.finish())


# ---- error bodies ----


def test_mutated_error_bodies() -> None:
    rng = random.Random(3)
    seeds = [
        json.loads(response_body(RECORDED, "chat-bad-request")),
        json.loads(response_body(DOCUMENTED, "error-overloaded")),
    ]
    for _ in range(ROUNDS):
        status = rng.choice((0, 200, 400, 401, 404, 413, 429, 500, 503, 529, 999))
        body: bytes
        if rng.random() < 0.3:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
        else:
            body = json.dumps(mutate(rng.choice(seeds), rng)).encode()
        as_anthropic = json.loads(openai_error_to_anthropic(status, body))
        assert as_anthropic["type"] == "error"
        assert set(as_anthropic["error"]) == {"type", "message"}
        as_openai = json.loads(anthropic_error_to_openai(status, body))
        assert set(as_openai["error"]) == {"message", "type", "param", "code"}
