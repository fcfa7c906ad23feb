"""Shared by the translation tests: fixtures, the SDKs' own validation and stream
accumulation, and ways of cutting a byte stream into pieces."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import anthropic.types
import openai.types.chat
import pydantic
import yaml
from anthropic._streaming import SSEDecoder as AnthropicSSEDecoder
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import message_create_params
from openai._streaming import SSEDecoder as OpenAISSEDecoder
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import completion_create_params

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
RECORDED = FIXTURES / "openai-recorded"
DOCUMENTED = FIXTURES / "anthropic-documented"
SYNTHETIC = FIXTURES / "synthetic"


def interaction(folder: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((folder / f"{name}.yaml").read_text())
    first: dict[str, Any] = data["interactions"][0]
    return first


def request_body(folder: Path, name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(interaction(folder, name)["request"]["body"])
    return body


def response_body(folder: Path, name: str) -> bytes:
    body: str = interaction(folder, name)["response"]["body"]
    return body.encode()


def response_code(folder: Path, name: str) -> int:
    return int(interaction(folder, name)["response"]["code"])


# ---- the SDKs' own types ----

_MESSAGES_PARAMS = pydantic.TypeAdapter(message_create_params.MessageCreateParamsNonStreaming)
_CHAT_PARAMS = pydantic.TypeAdapter(completion_create_params.CompletionCreateParamsNonStreaming)
_STREAM_EVENT: pydantic.TypeAdapter[anthropic.types.RawMessageStreamEvent] = pydantic.TypeAdapter(
    anthropic.types.RawMessageStreamEvent
)


def _force(value: Any) -> None:
    """Consume what pydantic validates lazily (``Iterable`` fields), so every nested
    value is checked."""
    if isinstance(value, dict):
        for item in value.values():
            _force(item)
    elif isinstance(value, (list, tuple, Iterator)):
        for item in value:
            _force(item)


def check_messages_request(body: dict[str, Any]) -> None:
    """The body is what the anthropic SDK's ``messages.create`` takes."""
    params = {k: v for k, v in body.items() if k != "stream"}
    _force(_MESSAGES_PARAMS.validate_python(params))


def check_chat_request(body: dict[str, Any]) -> None:
    """The body is what the openai SDK's ``chat.completions.create`` takes."""
    params = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    _force(_CHAT_PARAMS.validate_python(params))


def check_message(message: dict[str, Any]) -> anthropic.types.Message:
    return anthropic.types.Message.model_validate(message)


def check_completion(completion: dict[str, Any]) -> openai.types.chat.ChatCompletion:
    return openai.types.chat.ChatCompletion.model_validate(completion)


# ---- streams ----


class Translator(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


def pieces(data: bytes, how: str, seed: int = 0) -> list[bytes]:
    """``data`` cut ``whole``, into 1-byte pieces, or at random places."""
    if how == "whole":
        return [data]
    if how == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    out: list[bytes] = []
    at = 0
    while at < len(data):
        step = rng.choice((1, 2, 3, 7, 50, 200, 4096))
        out.append(data[at : at + step])
        at += step
    return out


def run(translator: Translator, data: bytes, how: str = "whole", seed: int = 0) -> bytes:
    out = b"".join(translator.feed(piece) for piece in pieces(data, how, seed))
    return out + translator.finish()


def anthropic_events(raw: bytes) -> list[dict[str, Any]]:
    """The client's Anthropic SSE as the anthropic SDK's decoder reads it; each event's
    name must match its data's type."""
    events: list[dict[str, Any]] = []
    for sse in AnthropicSSEDecoder().iter_bytes(iter([raw])):
        data: dict[str, Any] = sse.json()
        assert sse.event == data["type"]
        events.append(data)
    return events


def accumulate_message(raw: bytes) -> anthropic.types.Message:
    """The message the anthropic SDK builds from the stream (every event validated as
    a ``RawMessageStreamEvent`` first)."""
    snapshot: Any = None
    json_bufs: dict[int, bytes] = {}
    events = anthropic_events(raw)
    assert [e["type"] for e in events][-1] == "message_stop"
    for data in events:
        if data["type"] == "ping":
            continue  # a keep-alive: the SDK's stream skips it too
        event = _STREAM_EVENT.validate_python(data)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    return anthropic.types.Message.model_validate(snapshot.model_dump())


def openai_chunks(raw: bytes) -> list[dict[str, Any] | str]:
    """The client's OpenAI SSE as the openai SDK's decoder reads it: each chunk's JSON,
    or the ``[DONE]`` marker."""
    out: list[dict[str, Any] | str] = []
    for sse in OpenAISSEDecoder().iter_bytes(iter([raw])):
        assert sse.event is None
        out.append("[DONE]" if sse.data == "[DONE]" else sse.json())
    return out


def accumulate_completion(raw: bytes) -> openai.types.chat.ChatCompletion:
    """The completion the openai SDK builds from the stream (each chunk validated as
    a ``ChatCompletionChunk``); the stream must end with ``[DONE]``."""
    chunks = openai_chunks(raw)
    assert chunks[-1] == "[DONE]"
    assert "[DONE]" not in chunks[:-1]
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in chunks[:-1]:
        assert isinstance(chunk, dict)
        state.handle_chunk(openai.types.chat.ChatCompletionChunk.model_validate(chunk))
    # the snapshot: get_final_completion() refuses a "length" finish (it parses)
    final = state.current_completion_snapshot
    return openai.types.chat.ChatCompletion.model_validate(final.model_dump())


def openai_sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


def anthropic_sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
