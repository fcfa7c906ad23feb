"""Whole (non-streamed) responses between OpenAI Chat Completions and Anthropic Messages.

:func:`chat_response_to_message` turns a ``chat.completion`` into an Anthropic message,
:func:`message_to_chat_response` the reverse; the stream translators share the stop
reason and usage tables below.

Rule: these read an upstream's answer, which the client has paid for, so they are
total: a member of the wrong type reads as absent (no text, no tool calls, zero
tokens), unparseable tool arguments as ``{}``, an unknown finish or stop reason as the
plain one (``end_turn``, ``stop``); they never raise.

Stop reasons, OpenAI → Anthropic: ``stop`` → ``end_turn`` (OpenAI does not say whether a
stop sequence matched), ``length`` → ``max_tokens``, ``tool_calls``/``function_call`` →
``tool_use`` (and ``stop`` with tool calls, as some compatible servers send),
``content_filter`` or a ``refusal`` → ``refusal``. Anthropic → OpenAI: ``end_turn``,
``stop_sequence``, ``pause_turn`` → ``stop``; ``max_tokens`` and
``model_context_window_exceeded`` → ``length``; ``tool_use`` → ``tool_calls``; ``refusal``
→ ``content_filter``. (LiteLLM maps ``content_filter`` to ``end_turn``, hiding it.)

Usage, by :mod:`extproc.core.usage`'s normal form: Anthropic's ``input_tokens`` is
OpenAI's ``prompt_tokens`` less the cached ones, which become
``cache_read_input_tokens`` (OpenAI reports no cache writes); OpenAI's
``prompt_tokens`` is Anthropic's input plus cache reads plus cache writes (LiteLLM
leaves the writes out), ``cached_tokens`` its cache reads.
"""

from __future__ import annotations

from typing import Any

from extproc.core.translate._values import as_dict, as_list, dumps, loads, text, tool_id
from extproc.core.usage import Usage, usage_from_object

__all__ = [
    "anthropic_usage",
    "chat_response_to_message",
    "finish_reason",
    "message_id",
    "message_to_chat_response",
    "openai_usage",
    "stop_reason",
    "tool_arguments",
    "tool_input",
]

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def stop_reason(finish: Any, *, refused: bool = False, tool_calls: bool = False) -> str:
    """Anthropic's stop reason for an OpenAI finish reason."""
    if refused:
        return "refusal"
    reason = _STOP_REASONS.get(text(finish), "end_turn")
    return "tool_use" if tool_calls and reason == "end_turn" else reason


def finish_reason(stop: Any) -> str:
    """OpenAI's finish reason for an Anthropic stop reason."""
    return _FINISH_REASONS.get(text(stop), "stop")


def message_id(raw: Any) -> str:
    """An Anthropic message id for an upstream id (``msg_`` prefixed when it lacks it)."""
    value = text(raw)
    return value if value.startswith("msg_") else f"msg_{value or 'unknown'}"


def anthropic_usage(usage: Usage | None) -> dict[str, int]:
    u = usage or Usage()
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_read_input_tokens": u.cached_input_tokens,
        "cache_creation_input_tokens": u.cache_creation_tokens,
    }


def openai_usage(usage: Usage | None) -> dict[str, Any]:
    u = usage or Usage()
    return {
        "prompt_tokens": u.total_input,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_input + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
    }


def _first_choice(resp: dict[str, Any]) -> dict[str, Any]:
    choices = [as_dict(c) for c in as_list(resp.get("choices"))]
    for choice in choices:
        if choice.get("index", 0) == 0:
            return choice
    return choices[0] if choices else {}


def _message_text(content: Any) -> str:
    """A chat message's text: a string, or (some compatible servers) text parts."""
    if isinstance(content, list):
        return "".join(text(as_dict(p).get("text")) for p in content)
    return text(content)


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments string as Anthropic's ``input`` object; ``{}`` when it is
    not a JSON object."""
    try:
        value = loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def chat_response_to_message(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` as an Anthropic message from ``model``."""
    body = as_dict(resp)
    choice = _first_choice(body)
    message = as_dict(choice.get("message"))
    content: list[dict[str, Any]] = []
    answer = _message_text(message.get("content"))
    refusal = text(message.get("refusal"))
    for piece in (answer, refusal):
        if piece:
            content.append({"type": "text", "text": piece})
    for i, raw in enumerate(as_list(message.get("tool_calls"))):
        call = as_dict(raw)
        function = as_dict(call.get("function"))
        content.append(
            {
                "type": "tool_use",
                "id": tool_id(call.get("id"), f"toolu_{i}"),
                "name": text(function.get("name")),
                "input": tool_input(function.get("arguments")),
            }
        )
    calls = any(block["type"] == "tool_use" for block in content)
    return {
        "id": message_id(body.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(
            choice.get("finish_reason"), refused=bool(refusal), tool_calls=calls
        ),
        "stop_sequence": None,
        "usage": anthropic_usage(usage_from_object("openai", body)),
    }


def tool_arguments(value: Any) -> str:
    """Anthropic's tool ``input`` as OpenAI's arguments string (``{}`` if it is not an
    object that can be written)."""
    if not isinstance(value, dict):
        return "{}"
    try:
        return dumps(value)
    except (ValueError, RecursionError):
        return "{}"


def message_to_chat_response(resp: dict[str, Any], model: str, *, created: int) -> dict[str, Any]:
    """An Anthropic message as an OpenAI ``chat.completion`` from ``model``, ``created``
    at that Unix time."""
    body = as_dict(resp)
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for raw in as_list(body.get("content")):
        block = as_dict(raw)
        kind = block.get("type")
        if kind == "text":
            texts.append(text(block.get("text")))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": text(block.get("id")) or f"call_{len(calls)}",
                    "type": "function",
                    "function": {
                        "name": text(block.get("name")),
                        "arguments": tool_arguments(block.get("input")),
                    },
                }
            )
        # thinking, redacted_thinking and server-tool blocks have no chat equivalent
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    choice = {
        "index": 0,
        "message": message,
        "finish_reason": finish_reason(body.get("stop_reason")),
        "logprobs": None,
    }
    return {
        "id": text(body.get("id")) or "chatcmpl-unknown",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": openai_usage(usage_from_object("anthropic", body)),
    }
