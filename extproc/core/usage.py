"""Token usage read from LLM responses: JSON bodies and SSE streams, OpenAI and Anthropic.

Pure parsing, no I/O: the adapters feed response bytes in whatever pieces Envoy hands
them over and ask for the :class:`Usage` at the end. One normal form for both APIs:

- ``input_tokens``: input tokens billed at the input price (OpenAI's ``prompt_tokens``
  minus the cached ones; Anthropic's ``input_tokens``, which already excludes cache);
- ``cached_input_tokens``: cache reads; ``cache_creation_tokens``: cache writes
  (Anthropic);
- ``output_tokens``: everything billed at the output price, reasoning included;
  ``reasoning_tokens`` is kept for reporting.

Rule: a usage object whose counts are not non-negative integers (negative,
fractional, strings, booleans), or that names none of its main counts, is no usage
at all: the call is charged its estimate, never less because an upstream said so.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ResponseReader", "SSEBuffer", "Usage", "usage_from_object"]

Api = Literal["openai", "anthropic"]
#: The most response bytes kept to parse a JSON body whole; past it only the tail is
#: kept and the usage object is found in it (usage sits at the end).
MAX_JSON_BYTES = 16 * 1024 * 1024
_TAIL_BYTES = 64 * 1024
#: The most bytes a compressed body is inflated to for reading: past it (a
#: decompression bomb, or just too big) the body is read no further.
MAX_INFLATED_BYTES = 64 * 1024 * 1024
#: The longest SSE event the gateway holds back while splitting a stream.
MAX_EVENT_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_input(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.cache_creation_tokens


class _BadUsageError(ValueError):
    """A usage object no upstream should send: treated as no usage."""


def _count(source: Any, key: str) -> int | None:
    """A token count: None when absent or null; a :class:`_BadUsageError` unless it is a
    non-negative integer (an integral JSON float such as ``5.0`` counts as one)."""
    value = source.get(key) if isinstance(source, dict) else None
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    # bool is an int subclass; a count is never true/false
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _BadUsageError(key)
    return value


def _int(source: Any, key: str) -> int:
    return _count(source, key) or 0


def _main(usage: dict[str, Any], *keys: str) -> tuple[int, ...]:
    """The usage's main counts; a :class:`_BadUsageError` when it names none of them."""
    counts = [_count(usage, key) for key in keys]
    if all(c is None for c in counts):
        raise _BadUsageError("no token counts")
    return tuple(c or 0 for c in counts)


def _openai(usage: dict[str, Any]) -> Usage:
    """Chat/completions/embeddings (``prompt_tokens``...) and Responses (``input_tokens``...)."""
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        prompt, output = _main(usage, "prompt_tokens", "completion_tokens")
        in_details, out_details = "prompt_tokens_details", "completion_tokens_details"
    else:
        prompt, output = _main(usage, "input_tokens", "output_tokens")
        in_details, out_details = "input_tokens_details", "output_tokens_details"
    cached = min(prompt, _int(usage.get(in_details), "cached_tokens"))
    return Usage(
        input_tokens=prompt - cached,
        output_tokens=output,
        cached_input_tokens=cached,
        reasoning_tokens=_int(usage.get(out_details), "reasoning_tokens"),
    )


def _anthropic(usage: dict[str, Any]) -> Usage:
    input_tokens, output_tokens = _main(usage, "input_tokens", "output_tokens")
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=_int(usage, "cache_read_input_tokens"),
        cache_creation_tokens=_int(usage, "cache_creation_input_tokens"),
    )


def _strict_usage(api: Api, obj: Any) -> Usage | None:
    """The usage of a JSON object (None when it has none; :class:`_BadUsageError` when
    what it has cannot be believed)."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise _BadUsageError("usage")
    return _anthropic(usage) if api == "anthropic" else _openai(usage)


def usage_from_object(api: Api, obj: Any) -> Usage | None:
    """The usage of a whole JSON response (None when it reports none, or none that
    can be believed)."""
    try:
        return _strict_usage(api, obj)
    except _BadUsageError:
        return None


class SSEBuffer:
    """Splits a byte stream into complete SSE events (blank-line separated; CRLF, CR
    and LF line ends alike), in time linear in the bytes fed.

    A partial event is held until it completes, up to ``limit`` bytes: past that the
    stream is not SSE as we know it, and :attr:`overflowed` says so (the caller stops
    splitting and passes the bytes on as they are).
    """

    __slots__ = ("_cr", "_limit", "_pending", "_scan", "overflowed")

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._pending = bytearray()
        self._scan = 0
        self._cr = False
        self._limit = limit
        self.overflowed = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.overflowed:
            return []
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            # maybe the first half of a CRLF: decide with the next piece
            chunk, self._cr = chunk[:-1], True
        self._pending += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[bytes] = []
        start = 0
        while True:
            end = self._pending.find(b"\n\n", max(start, self._scan))
            if end < 0:
                break
            event = bytes(self._pending[start:end])
            if event.strip():
                events.append(event)
            start = end + 2
        if start:
            del self._pending[:start]
        # the next search starts where this one stopped (minus a possible "\n")
        self._scan = max(0, len(self._pending) - 1)
        if len(self._pending) > self._limit:
            self.overflowed = True
        return events

    def flush(self) -> list[bytes]:
        rest = bytes(self._pending)
        self._pending.clear()
        self._scan = 0
        return [rest] if rest.strip() else []

    def take_pending(self) -> bytes:
        """The held bytes, handed back once the buffer has overflowed."""
        rest = bytes(self._pending) + (b"\r" if self._cr else b"")
        self._pending.clear()
        self._cr = False
        return rest

    @property
    def pending(self) -> bytes:
        return bytes(self._pending)


def event_data(event: bytes) -> Any:
    """The JSON of an SSE event's ``data:`` lines (None for ``[DONE]`` or non-JSON)."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    payload = b"\n".join(lines)
    if payload.strip() == b"[DONE]":
        return None
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None


def _usage_in_tail(api: Api, tail: bytes) -> Usage | None:
    """The last ``"usage": {...}`` object in the end of a JSON body."""
    text = tail.decode("utf-8", "replace")
    at = text.rfind('"usage"')
    if at < 0:
        return None
    colon = text.find(":", at)
    start = text.find("{", colon)
    if colon < 0 or start < 0 or text[colon + 1 : start].strip():
        return None
    try:
        usage, _ = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        return None
    return usage_from_object(api, {"usage": usage})


class ResponseReader:
    """Reads one response's usage from its body pieces, JSON or SSE.

    For SSE only events that can hold usage are decoded (a cheap substring test
    first), so long streams cost little. A gzip/deflate body (which the gateway does
    not ask for: it drops ``accept-encoding`` upstream) is inflated on the way.
    """

    __slots__ = (
        "_anthropic_input",
        "_anthropic_output",
        "_api",
        "_body",
        "_inflate",
        "_inflated",
        "_invalid",
        "_size",
        "_sse",
        "_tail_only",
        "usage",
    )

    def __init__(self, api: Api, *, sse: bool, encoding: str = "") -> None:
        self._api = api
        self._sse = SSEBuffer() if sse else None
        self._body: list[bytes] = []
        self._size = 0
        self._inflate: Any = None
        if encoding in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._inflate = zlib.decompressobj()
        self._inflated = 0
        self._tail_only = False
        self._anthropic_input: Usage | None = None
        self._anthropic_output = 0
        #: An event reported usage that cannot be believed: the response has none.
        self._invalid = False
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        """Take the next body piece; returns the complete SSE events it finished."""
        if self._inflated < 0:
            return []  # unreadable: see below
        if self._inflate is not None:
            inflated = self._inflate_piece(chunk)
            if inflated is None:
                # Corrupt or too big: no usage can be read from it (the estimate, or
                # what was streamed so far, is charged); the body passes untouched.
                self._inflated, self._body, self._size = -1, [], 0
                self.usage = None if self._sse is None else self.usage
                return []
            chunk = inflated
        if self._sse is None:
            self._body.append(chunk)
            self._size += len(chunk)
            if self._size > MAX_JSON_BYTES:
                # too big to parse whole: keep a tail that holds the usage object
                tail = b"".join(self._body)[-_TAIL_BYTES:]
                self._body, self._size, self._tail_only = [tail], len(tail), True
            return []
        events = self._sse.feed(chunk)
        for event in events:
            self._event(event)
        return events

    def _inflate_piece(self, chunk: bytes) -> bytes | None:
        """``chunk`` inflated; None when it is corrupt or the body passes the cap.

        Rule: never more than the cap in memory, however small the input."""
        assert self._inflate is not None
        try:
            out: bytes = self._inflate.decompress(chunk, MAX_INFLATED_BYTES - self._inflated + 1)
        except zlib.error:
            return None
        self._inflated += len(out)
        return None if self._inflated > MAX_INFLATED_BYTES else out

    @property
    def overflowed(self) -> bool:
        """An SSE event grew past the limit: the stream is passed on untouched."""
        return self._sse is not None and self._sse.overflowed

    def take_pending(self) -> bytes:
        return self._sse.take_pending() if self._sse is not None else b""

    def flush(self) -> list[bytes]:
        """At the end of the body: the last SSE event, if it had no blank line after it."""
        if self._sse is None:
            return []
        events = self._sse.flush()
        for event in events:
            self._event(event)
        return events

    def is_whole_json(self) -> bool:
        """Whether a JSON body whose end was not seen is a whole JSON document already
        (a chunked body, no ``content-length``, that had in fact ended)."""
        if self._sse is not None or self._tail_only or self._inflated < 0 or not self._body:
            return False
        raw = b"".join(self._body)
        self._body = [raw]
        try:
            json.loads(raw)
        except (ValueError, RecursionError):
            return False
        return True

    def finish(self) -> Usage | None:
        """The usage once the body has ended (None when the response reported none)."""
        if self._sse is not None:
            self.flush()
            if self._invalid:
                self.usage = None
        elif self._body:
            raw = b"".join(self._body)
            self._body.clear()
            if self._tail_only:
                self.usage = _usage_in_tail(self._api, raw)
            else:
                try:
                    obj = json.loads(raw)
                except (ValueError, RecursionError):
                    obj = None
                self.usage = usage_from_object(self._api, obj)
        return self.usage

    def _event(self, event: bytes) -> None:
        if b"usage" not in event or self._invalid:
            return
        data = event_data(event)
        if not isinstance(data, dict):
            return
        try:
            self._event_usage(data)
        except _BadUsageError:
            # Rule: one unbelievable count and the stream reported no usage (sticky:
            # a later event must not make its input free).
            self._invalid = True
            self.usage = None

    def _event_usage(self, data: dict[str, Any]) -> None:
        if self._api == "anthropic":
            self._anthropic(data)
            return
        if data.get("usage") is not None:  # chat/completions final chunk
            self.usage = _strict_usage("openai", data)
        response = data.get("response")  # Responses API: response.completed
        if isinstance(response, dict) and response.get("usage") is not None:
            self.usage = _strict_usage("openai", response)

    def _anthropic(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "message_start":
            self._anthropic_input = _strict_usage("anthropic", data.get("message"))
        elif kind == "message_delta" and data.get("usage") is not None:
            if not isinstance(data["usage"], dict):
                raise _BadUsageError("usage")
            # message_delta's output_tokens is cumulative; newer APIs repeat input here
            delta = _anthropic(data["usage"])
            self._anthropic_output = delta.output_tokens
            if delta.total_input and self._anthropic_input is None:
                self._anthropic_input = delta
        else:
            return
        start = self._anthropic_input or Usage()
        self.usage = Usage(
            input_tokens=start.input_tokens,
            output_tokens=max(self._anthropic_output, start.output_tokens),
            cached_input_tokens=start.cached_input_tokens,
            cache_creation_tokens=start.cache_creation_tokens,
        )
