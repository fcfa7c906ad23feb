"""Streamed responses between OpenAI Chat Completions and Anthropic Messages, event by
event.

Each translator takes the upstream's SSE bytes in whatever pieces they arrive
(:meth:`feed`: an event may be split anywhere, several may share a piece, CRLF line
ends are fine) and returns the client's SSE bytes completed so far; :meth:`finish`
at the end of the upstream body returns the rest.

:class:`ChatToMessagesStream` (an OpenAI upstream, an Anthropic client): the first
chunk with a choice opens the message (``message_start``, its usage zero: OpenAI
reports usage at the end); text goes to a text block, each tool call to a
``tool_use`` block of its own with its argument fragments as ``input_json_delta``;
blocks are numbered in order of appearance and each is stopped when the next starts.
The finish reason is held until the usage chunk (which OpenAI sends after it) or
``[DONE]``, then ``message_delta`` carries the stop reason and the whole usage (input
included, which Anthropic's SDK takes from a delta), and ``message_stop`` ends it.

:class:`MessagesToChatStream` (an Anthropic upstream, an OpenAI client):
``message_start`` becomes the first chunk (role ``assistant``); text deltas become
content deltas; a ``tool_use`` block becomes a tool call (index, id, type and name
first, then its argument fragments); thinking and server-tool blocks are skipped;
``message_delta`` gives the chunk with the finish reason; ``message_stop`` the usage
chunk (empty ``choices``; only when the client asked ``include_usage``) and
``data: [DONE]``.

Rules:

- an upstream error (OpenAI's ``{"error": ...}`` chunk, an OpenAI-compatible
  server's ``{"object": "error"}``, Anthropic's ``error`` event) becomes the client
  API's error shape, and nothing is translated after it;
- an event larger than :data:`~extproc.core.usage.MAX_EVENT_BYTES` stops the
  translation with an error: no more than that is ever held;
- an upstream that ends before it finished its answer ends the client's stream with
  an error, never with a made-up stop;
- what is not JSON (comments, keep-alives, bytes that are not UTF-8) is skipped;
- the translators never raise.

A tool call whose fragments come after the next block started (OpenAI does not
interleave them; a compatible server might) keeps its fragments on its own block
index rather than losing them. Differences from LiteLLM's ``AnthropicStreamWrapper``:
the message id is the upstream's (``msg_`` prefixed), not a fresh uuid, and a
truncated upstream ends in an ``error`` event.
"""

from __future__ import annotations

from typing import Any

from extproc.core.translate._values import as_dict, as_list, count, encode, loads, text, tool_id
from extproc.core.translate.errors import anthropic_error, openai_error
from extproc.core.translate.responses import (
    anthropic_usage,
    finish_reason,
    message_id,
    openai_usage,
    stop_reason,
    tool_arguments,
)
from extproc.core.usage import MAX_EVENT_BYTES, SSEBuffer, Usage, usage_from_object

__all__ = ["ChatToMessagesStream", "MessagesToChatStream"]

_TOO_LARGE = f"An upstream stream event was larger than {MAX_EVENT_BYTES} bytes."
_TRUNCATED = "The upstream stream ended before the answer was complete."


def _fields(event: bytes) -> tuple[str, bytes]:
    """An SSE event's name and its data lines joined."""
    name = ""
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if line.startswith(b":"):
            continue  # a comment
        field, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if field == b"event":
            name = value.decode("utf-8", "replace")
        elif field == b"data":
            data.append(value)
    return name, b"\n".join(data)


class _Stream:
    """Splitting, decoding and the end of a stream; subclasses translate events."""

    __slots__ = ("_buffer", "_done")

    def __init__(self) -> None:
        self._buffer = SSEBuffer(MAX_EVENT_BYTES)
        self._done = False

    def feed(self, chunk: bytes) -> bytes:
        """The client's bytes for the events ``chunk`` completes."""
        if self._done:
            return b""
        out = [self._event(event) for event in self._buffer.feed(chunk) if not self._done]
        if self._buffer.overflowed and not self._done:
            self._buffer.take_pending()
            out.append(self._fail(_TOO_LARGE))
        return b"".join(out)

    def finish(self) -> bytes:
        """The client's last bytes, once the upstream body has ended."""
        if self._done:
            return b""
        out = [self._event(event) for event in self._buffer.flush() if not self._done]
        if not self._done:
            out.append(self._end())
        self._done = True
        return b"".join(out)

    def _event(self, raw: bytes) -> bytes:
        if self._done:
            return b""
        if len(raw) > MAX_EVENT_BYTES:
            return self._fail(_TOO_LARGE)
        name, data = _fields(raw)
        if data.strip() == b"[DONE]":
            return self._on_done()
        try:
            obj = loads(data)
        except (ValueError, RecursionError):
            return b""  # not JSON: a keep-alive or noise
        return self._on_data(name, obj) if isinstance(obj, dict) else b""

    def _fail(self, message: str) -> bytes:
        self._done = True
        return self._error(message)

    def _on_data(self, name: str, obj: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def _on_done(self) -> bytes:
        raise NotImplementedError

    def _end(self) -> bytes:
        raise NotImplementedError

    def _error(self, message: str) -> bytes:
        raise NotImplementedError


def _anthropic_event(data: dict[str, Any]) -> bytes:
    name: str = data["type"]
    return b"event: " + name.encode() + b"\ndata: " + encode(data) + b"\n\n"


class ChatToMessagesStream(_Stream):
    """An OpenAI chat.completion.chunk stream as Anthropic Messages events."""

    __slots__ = (
        "_blocks",
        "_model",
        "_open",
        "_open_text",
        "_refused",
        "_started",
        "_stop",
        "_tools",
        "_usage",
    )

    def __init__(self, model: str) -> None:
        super().__init__()
        self._model = model
        self._started = False
        #: Blocks started so far; the index of the open one (None when none is).
        self._blocks = 0
        self._open: int | None = None
        self._open_text = False
        #: OpenAI tool-call index → its block index.
        self._tools: dict[int, int] = {}
        self._stop: str | None = None
        self._refused = False
        self._usage: Usage | None = None

    def _on_data(self, name: str, obj: dict[str, Any]) -> bytes:
        if obj.get("error") is not None or obj.get("object") == "error":
            # OpenAI's {"error": {...}}; vLLM's {"object": "error", "message": ...}
            self._done = True
            error = anthropic_error(None, obj.get("error") or obj)
            return _anthropic_event({"type": "error", "error": error})
        out: list[bytes] = []
        if obj.get("usage") is not None:
            self._usage = usage_from_object("openai", obj)
        choices = [as_dict(c) for c in as_list(obj.get("choices"))]
        choice = next((c for c in choices if count(c.get("index")) == 0), None)
        if choice is not None:
            out.append(self._start(obj))
            delta = as_dict(choice.get("delta"))
            refusal = text(delta.get("refusal"))
            self._refused = self._refused or bool(refusal)
            for piece in (text(delta.get("content")), refusal):
                if piece:
                    out.append(self._text(piece))
            for call in as_list(delta.get("tool_calls")):
                out.append(self._tool(as_dict(call)))
            finish = text(choice.get("finish_reason"))
            if finish:
                self._stop = finish
        if self._stop is not None and obj.get("usage") is not None:
            out.append(self._close())
        return b"".join(out)

    def _start(self, obj: dict[str, Any]) -> bytes:
        if self._started:
            return b""
        self._started = True
        message: dict[str, Any] = {
            "id": message_id(obj.get("id")),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return _anthropic_event({"type": "message_start", "message": message})

    def _stop_open(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open, self._open_text = self._open, None, False
        return _anthropic_event({"type": "content_block_stop", "index": index})

    def _begin(self, block: dict[str, Any]) -> bytes:
        out = self._stop_open()
        self._open, self._blocks = self._blocks, self._blocks + 1
        event = {"type": "content_block_start", "index": self._open, "content_block": block}
        return out + _anthropic_event(event)

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return _anthropic_event({"type": "content_block_delta", "index": index, "delta": delta})

    def _text(self, piece: str) -> bytes:
        out = b""
        if not self._open_text:
            out = self._begin({"type": "text", "text": ""})
            self._open_text = True
        assert self._open is not None
        return out + self._delta(self._open, {"type": "text_delta", "text": piece})

    def _tool(self, call: dict[str, Any]) -> bytes:
        index = count(call.get("index"))
        function = as_dict(call.get("function"))
        out = b""
        if index not in self._tools:
            block = {
                "type": "tool_use",
                "id": tool_id(call.get("id"), f"toolu_{self._blocks}"),
                "name": text(function.get("name")),
                "input": {},
            }
            out = self._begin(block)
            assert self._open is not None
            self._tools[index] = self._open
        fragment = text(function.get("arguments"))
        if fragment:
            delta = {"type": "input_json_delta", "partial_json": fragment}
            out += self._delta(self._tools[index], delta)
        return out

    def _close(self) -> bytes:
        """The held finish: stop the open block, then message_delta and message_stop."""
        self._done = True
        reason = stop_reason(self._stop, refused=self._refused, tool_calls=bool(self._tools))
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": None},
            "usage": anthropic_usage(self._usage),
        }
        return (
            self._stop_open() + _anthropic_event(delta) + _anthropic_event({"type": "message_stop"})
        )

    def _on_done(self) -> bytes:
        if not self._started:
            return self._fail(_TRUNCATED)
        self._stop = self._stop or "stop"  # the upstream says it is done
        return self._close()

    def _end(self) -> bytes:
        return self._close() if self._stop is not None else self._fail(_TRUNCATED)

    def _error(self, message: str) -> bytes:
        return _anthropic_event(
            {"type": "error", "error": {"type": "api_error", "message": message}}
        )


def _openai_data(data: dict[str, Any] | str) -> bytes:
    payload = data.encode() if isinstance(data, str) else encode(data)
    return b"data: " + payload + b"\n\n"


class MessagesToChatStream(_Stream):
    """An Anthropic Messages event stream as OpenAI chat.completion.chunks."""

    __slots__ = (
        "_created",
        "_finished",
        "_id",
        "_include_usage",
        "_model",
        "_started",
        "_tools",
        "_usage",
    )

    def __init__(self, model: str, *, created: int, include_usage: bool) -> None:
        super().__init__()
        self._model = model
        self._created = created
        self._include_usage = include_usage
        self._id = "chatcmpl-unknown"
        self._started = False
        self._finished = False
        #: Anthropic block index → OpenAI tool-call index.
        self._tools: dict[int, int] = {}
        #: The usage so far: message_start's, overwritten by message_delta's counts.
        self._usage: dict[str, Any] = {}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return _openai_data(
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [choice],
            }
        )

    def _on_data(self, name: str, obj: dict[str, Any]) -> bytes:
        kind = text(obj.get("type")) or name
        if kind == "error":
            self._done = True
            return _openai_data({"error": openai_error(None, obj.get("error"))})
        if kind == "message_start":
            message = as_dict(obj.get("message"))
            self._id = text(message.get("id")) or self._id
            self._usage = dict(as_dict(message.get("usage")))
            return self._start()
        if kind == "content_block_start":
            return self._start() + self._block(count(obj.get("index")), obj.get("content_block"))
        if kind == "content_block_delta":
            return self._start() + self._block_delta(count(obj.get("index")), obj.get("delta"))
        if kind == "message_delta":
            usage = as_dict(obj.get("usage"))
            self._usage.update({k: v for k, v in usage.items() if v is not None})
            return self._start() + self._finish(as_dict(obj.get("delta")).get("stop_reason"))
        if kind == "message_stop":
            return self._start() + self._finish("end_turn") + self._close()
        return b""  # ping, and events this translator does not know

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return self._chunk({"role": "assistant", "content": ""})

    def _block(self, index: int, raw: Any) -> bytes:
        block = as_dict(raw)
        kind = block.get("type")
        if kind == "text":
            piece = text(block.get("text"))
            return self._chunk({"content": piece}) if piece else b""
        if kind != "tool_use":
            return b""  # thinking, server tools: nothing for a chat client
        tool = len(self._tools)
        self._tools[index] = tool
        call = {
            "index": tool,
            "id": text(block.get("id")) or f"call_{tool}",
            "type": "function",
            "function": {"name": text(block.get("name")), "arguments": ""},
        }
        out = self._chunk({"tool_calls": [call]})
        if as_dict(block.get("input")):
            arguments = tool_arguments(block.get("input"))
            out += self._chunk(
                {"tool_calls": [{"index": tool, "function": {"arguments": arguments}}]}
            )
        return out

    def _block_delta(self, index: int, raw: Any) -> bytes:
        delta = as_dict(raw)
        kind = delta.get("type")
        if kind == "text_delta":
            piece = text(delta.get("text"))
            return self._chunk({"content": piece}) if piece else b""
        if kind == "input_json_delta" and index in self._tools:
            fragment = text(delta.get("partial_json"))
            if fragment:
                call = {"index": self._tools[index], "function": {"arguments": fragment}}
                return self._chunk({"tool_calls": [call]})
        return b""  # thinking, signatures, citations

    def _finish(self, stop: Any) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        return self._chunk({}, finish_reason(stop))

    def _close(self) -> bytes:
        self._done = True
        out = b""
        if self._include_usage:
            usage = openai_usage(usage_from_object("anthropic", {"usage": self._usage}))
            out = _openai_data(
                {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self._model,
                    "choices": [],
                    "usage": usage,
                }
            )
        return out + _openai_data("[DONE]")

    def _on_done(self) -> bytes:
        return b""  # Anthropic sends none; message_stop ends the stream

    def _end(self) -> bytes:
        return self._close() if self._finished else self._fail(_TRUNCATED)

    def _error(self, message: str) -> bytes:
        error = {
            "message": message,
            "type": "server_error",
            "param": None,
            "code": "upstream_stream",
        }
        return _openai_data({"error": error})
