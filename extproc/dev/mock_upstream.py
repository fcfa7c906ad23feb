"""A local OpenAI- and Anthropic-compatible upstream, for `extproc up` and the tests.

It answers chat completions, completions, embeddings, responses and Anthropic
messages, streamed (SSE) or not, with usage blocks shaped like the real APIs'. Each
site has a name (sent back as ``x-mock-upstream``) and optionally the API key it
expects, so a wrong or missing injected credential shows up as a 401. It records the
requests it saw at ``GET /_mock/requests`` (``DELETE`` clears them). A test header
``x-mock-fail: site=500`` makes a site fail; ``site=500/4`` makes it fail every fourth
of its own requests carrying that rule.

A site may speak one API only (``api``, the command line's ``--only NAME=API``), as a
real provider does: an ``openai`` site answers Anthropic's paths 404 in OpenAI's error
shape ("Invalid URL"), an ``anthropic`` site answers OpenAI's paths 404 in Anthropic's
(``not_found_error``), and each shapes all its errors (``x-mock-fail`` included) like
its provider's. A site without one answers both, with OpenAI's errors.

Tools are answered like a model would: a chat completion or a message offering tools
calls the first one (or the one ``tool_choice`` names; none for ``tool_choice``
"none") with ``{"query": "mock"}``; once the conversation ends in the tool's result,
the answer is text quoting it ("The tool said: ..."). Streams carry the call the way
each provider streams one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import ssl
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from extproc.core.upstreams import endpoint_suffix

__all__ = ["APIS", "MockSite", "make_mock_app", "run_mock"]

_WORDS = ("Hello", " from", " the", " mock", " upstream", ".")


@dataclass(frozen=True, slots=True)
class MockSite:
    name: str
    host: str
    port: int
    api_key: str | None = None
    #: (certificate chain, private key) files: the site serves HTTPS.
    tls: tuple[str, str] | None = None
    #: The one API the site speaks (``openai`` or ``anthropic``), refusing the
    #: other's paths; None: both.
    api: str | None = None


#: The APIs a site can be limited to, and the endpoints (after the version) of each.
APIS: dict[str, frozenset[str]] = {
    "openai": frozenset(
        ("/chat/completions", "/completions", "/embeddings", "/responses"),
    ),
    "anthropic": frozenset(("/messages", "/messages/count_tokens")),
}


_SITE = web.AppKey("site", MockSite)


class _Recorder:
    """The requests a mock site has seen, newest last."""

    def __init__(self, keep: int) -> None:
        self.seen: deque[dict[str, object]] = deque(maxlen=keep)
        #: ``status/n`` failure rule → requests seen with it (every n-th one fails).
        self.nth: dict[str, int] = {}

    def every_nth(self, rule: str) -> str | None:
        """``status/n``: the status on this site's n-th, 2n-th, ... request with the
        rule, else None (a deployment failing a fixed share of its own calls)."""
        status, _, n = rule.partition("/")
        if not (n.isascii() and n.isdigit() and int(n) > 0):
            return None
        count = self.nth[rule] = self.nth.get(rule, 0) + 1
        return status if count % int(n) == 0 else None


_SEEN = web.AppKey("seen", _Recorder)


def _openai_error(status: int, message: str, err_type: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return web.json_response(body, status=status)


#: Anthropic's error type for each status (its "HTTP errors" reference); others: an
#: ``api_error`` from 500 up, else an ``invalid_request_error``.
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def _anthropic_error(status: int, message: str) -> web.Response:
    err_type = _ANTHROPIC_ERRORS.get(
        status, "api_error" if status >= 500 else "invalid_request_error"
    )
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    body = {
        "type": "error",
        "error": {"type": err_type, "message": message},
        "request_id": request_id,
    }
    return web.json_response(body, status=status, headers={"request-id": request_id})


def _error(site: MockSite, status: int, message: str, err_type: str, code: str) -> web.Response:
    """An error in the shape of the site's provider: Anthropic's (whose type follows
    from the status) for an Anthropic-only site, else OpenAI's."""
    if site.api == "anthropic":
        return _anthropic_error(status, message)
    return _openai_error(status, message, err_type, code)


def _presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key") or request.headers.get("api-key")


def _prompt_tokens(body: dict[str, Any]) -> int:
    text = json.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")
    return max(1, len(text) // 4)


def _choices(body: dict[str, Any]) -> int:
    """Choices the provider bills: the larger of ``n`` and ``best_of`` (1 to 128)."""
    counts = [body.get(f) for f in ("n", "best_of")]
    valid = [c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c > 0]
    return min(max(valid, default=1), 128)


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def _delay_s(request: web.Request, header: str) -> float:
    """A test-controlled pause (``x-mock-delay-ms``, ``x-mock-chunk-delay-ms``), <= 30 s."""
    raw = request.headers.get(header, "0")
    return min(int(raw), 30_000) / 1000 if raw.isascii() and raw.isdigit() else 0.0


async def _stream(request: web.Request, chunks: list[bytes]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    resp.headers["x-mock-upstream"] = request.app[_SITE].name
    await resp.prepare(request)
    pause = _delay_s(request, "x-mock-chunk-delay-ms")
    midstream = _per_site(request, "x-mock-fail").get(request.app[_SITE].name) == "midstream"
    for index, chunk in enumerate(chunks):
        if midstream and index == 2 and request.transport is not None:
            request.transport.abort()  # the stream breaks after two events
            raise asyncio.CancelledError
        await resp.write(chunk)
        await asyncio.sleep(pause)
    await resp.write_eof()
    return resp


def _knob(request: web.Request, name: str) -> int:
    """A test-controlled count (``x-mock-cached-tokens``, ``x-mock-reasoning-tokens``)."""
    raw = request.headers.get(f"x-mock-{name}", "0")
    return min(int(raw), 10_000_000) if raw.isascii() and raw.isdigit() else 0


def _overridden(request: web.Request, usage: dict[str, Any]) -> dict[str, Any]:
    """A test-controlled usage (``x-mock-usage``: a JSON object merged into every usage
    block the answer carries), to play a broken or hostile upstream."""
    try:
        extra = json.loads(request.headers.get("x-mock-usage", "{}"))
    except ValueError:
        return usage
    return {**usage, **extra} if isinstance(extra, dict) else usage


def _usage(request: web.Request, prompt: int, completion: int) -> dict[str, Any]:
    """OpenAI usage; cached tokens are part of the prompt, reasoning of the completion."""
    cached, reasoning = _knob(request, "cached-tokens"), _knob(request, "reasoning-tokens")
    return _overridden(
        request,
        {
            "prompt_tokens": prompt + cached,
            "completion_tokens": completion + reasoning,
            "total_tokens": prompt + cached + completion + reasoning,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0},
        },
    )


#: The arguments a mock model calls every tool with, and the pieces a stream sends them
#: in (Anthropic's streams open with an empty one).
_ARGUMENTS = '{"query": "mock"}'
_ARGUMENT_PIECES = ('{"query', '": "mo', 'ck"}')
#: What an Anthropic model says before it calls a tool.
_LOOKUP = "Let me look that up."


def _pieces(text: str) -> list[str]:
    """``text`` in word-sized pieces that join back to it, for a stream."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


def _text_of(content: Any) -> str:
    """Content as text: a string, or the text of its parts (OpenAI's content parts,
    Anthropic's blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _called(names: list[str], choice: Any, forced: str | None) -> str | None:
    """The tool a model calls: the one ``tool_choice`` names, else the first offered;
    None when none is offered or ``tool_choice`` is "none"."""
    if choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    if forced in names:
        return forced
    return names[0] if names else None


def _chat_tool_result(body: dict[str, Any]) -> str | None:
    """The answer to a chat ending in tool results (the last messages, role ``tool``):
    text quoting them; None for any other chat."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    results: list[str] = []
    for message in reversed(messages):
        if not (isinstance(message, dict) and message.get("role") == "tool"):
            break
        results.insert(0, _text_of(message.get("content")))
    return "The tool said: " + " ".join(results) if results else None


def _chat_tool(body: dict[str, Any]) -> str | None:
    """The function a chat request's model calls, or None (it answers text)."""
    tools = body.get("tools")
    names = [
        t["function"]["name"]
        for t in (tools if isinstance(tools, list) else [])
        if isinstance(t, dict)
        and t.get("type") == "function"
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]
    choice = body.get("tool_choice")
    forced = None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        forced = choice["function"].get("name")
    return _called(names, choice, forced)


async def _chat(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    model = body.get("model", "")
    rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    n = _choices(body)
    prompt, completion = _prompt_tokens(body), len(_WORDS) * n
    said = _chat_tool_result(body)
    tool = _chat_tool(body) if said is None else None
    # ``x-mock-pad-bytes``: a response of about that size (large-body tests)
    pad = request.headers.get("x-mock-pad-bytes", "0")
    words = list(_WORDS) if said is None else _pieces(said)
    text = "".join(words) + "x" * (min(int(pad), 64 << 20) if pad.isdigit() else 0)
    if not body.get("stream"):

        def message() -> dict[str, Any]:
            if tool is None:
                return {"role": "assistant", "content": text, "refusal": None}
            call = {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": tool, "arguments": _ARGUMENTS},
            }
            return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}

        return web.json_response(
            {
                "id": rid,
                "object": "chat.completion",
                "created": now,
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "message": message(),
                        "logprobs": None,
                        "finish_reason": "stop" if tool is None else "tool_calls",
                    }
                    for i in range(n)
                ],
                "usage": _usage(request, prompt, completion),
            },
            headers={"x-mock-upstream": request.app[_SITE].name},
        )
    base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model}
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return _sse({**base, "choices": [choice]})

    if tool is None:
        chunks = [chunk({"role": "assistant", "content": ""})]
        chunks += [chunk({"content": w}) for w in words]
        chunks.append(chunk({}, "stop"))
    else:
        # OpenAI's order: the call's id, type and name with empty arguments, then the
        # arguments in pieces, then the finish
        opening = {
            "index": 0,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": tool, "arguments": ""},
        }
        chunks = [
            chunk({"role": "assistant", "content": None, "tool_calls": [opening], "refusal": None})
        ]
        chunks += [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            for piece in _ARGUMENT_PIECES
        ]
        chunks.append(chunk({}, "tool_calls"))
    if include_usage:
        chunks.append(_sse({**base, "choices": [], "usage": _usage(request, prompt, completion)}))
    chunks.append(b"data: [DONE]\n\n")
    return await _stream(request, chunks)


async def _completions(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    model = body.get("model", "")
    rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    n = _choices(body)
    prompt, completion = _prompt_tokens(body), len(_WORDS) * n
    base = {"id": rid, "object": "text_completion", "created": now, "model": model}
    if not body.get("stream"):
        return web.json_response(
            {
                **base,
                "choices": [
                    {"text": "".join(_WORDS), "index": i, "logprobs": None, "finish_reason": "stop"}
                    for i in range(n)
                ],
                "usage": _usage(request, prompt, completion),
            },
            headers={"x-mock-upstream": request.app[_SITE].name},
        )
    chunks = [
        _sse(
            {**base, "choices": [{"text": w, "index": 0, "logprobs": None, "finish_reason": None}]}
        )
        for w in _WORDS
    ]
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append(_sse({**base, "choices": [], "usage": _usage(request, prompt, completion)}))
    chunks.append(b"data: [DONE]\n\n")
    return await _stream(request, chunks)


async def _embeddings(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    prompt = _prompt_tokens(body)
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.0, 0.5, -0.5, 1.0]}
                for i in range(len(items))
            ],
            "model": body.get("model", ""),
            "usage": _overridden(request, {"prompt_tokens": prompt, "total_tokens": prompt}),
        },
        headers={"x-mock-upstream": request.app[_SITE].name},
    )


async def _responses(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    model = body.get("model", "")
    prompt, completion = _prompt_tokens(body), len(_WORDS)
    text = "".join(_WORDS)
    resp_id, msg_id = f"resp_{uuid.uuid4().hex[:24]}", f"msg_{uuid.uuid4().hex[:24]}"
    message = {
        "id": msg_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    cached, reasoning = _knob(request, "cached-tokens"), _knob(request, "reasoning-tokens")
    usage = _overridden(
        request,
        {
            "input_tokens": prompt + cached,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion + reasoning,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + cached + completion + reasoning,
        },
    )
    final = {
        "id": resp_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": model,
        "output": [message],
        "usage": usage,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }
    if not body.get("stream"):
        return web.json_response(final, headers={"x-mock-upstream": request.app[_SITE].name})
    started = {**final, "status": "in_progress", "output": [], "usage": None}
    chunks = [
        _sse(
            {"type": "response.created", "sequence_number": 0, "response": started},
            "response.created",
        ),
    ]
    for i, w in enumerate(_WORDS, start=1):
        chunks.append(
            _sse(
                {
                    "type": "response.output_text.delta",
                    "sequence_number": i,
                    "item_id": msg_id,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": w,
                    "logprobs": [],
                },
                "response.output_text.delta",
            )
        )
    chunks.append(
        _sse(
            {"type": "response.completed", "sequence_number": len(_WORDS) + 1, "response": final},
            "response.completed",
        )
    )
    return await _stream(request, chunks)


async def _count_tokens(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """Anthropic's token counter: the prompt's tokens, nothing generated."""
    return web.json_response(
        {"input_tokens": _prompt_tokens(body)},
        headers={"x-mock-upstream": request.app[_SITE].name},
    )


def _messages_tool_result(body: dict[str, Any]) -> str | None:
    """The answer to a conversation whose last user turn holds ``tool_result`` blocks:
    text quoting them; None for any other."""
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not (isinstance(last, dict) and last.get("role") == "user"):
        return None
    content = last.get("content")
    results = [
        _text_of(block.get("content"))
        for block in (content if isinstance(content, list) else [])
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]
    return "The tool said: " + " ".join(results) if results else None


def _messages_tool(body: dict[str, Any]) -> str | None:
    """The (client) tool a messages request's model calls, or None (it answers text)."""
    tools = body.get("tools")
    names = [
        t["name"]
        for t in (tools if isinstance(tools, list) else [])
        if isinstance(t, dict)
        and t.get("type") in (None, "custom")
        and isinstance(t.get("name"), str)
    ]
    choice = body.get("tool_choice")
    forced = (
        choice.get("name") if isinstance(choice, dict) and choice.get("type") == "tool" else None
    )
    return _called(names, choice, forced)


async def _messages(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    model = body.get("model", "")
    prompt, completion = _prompt_tokens(body), len(_WORDS)
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    said = _messages_tool_result(body)
    tool = _messages_tool(body) if said is None else None
    words = list(_WORDS) if said is None else _pieces(said)
    if tool is not None:
        words = _pieces(_LOOKUP)
    tool_id = f"toolu_{uuid.uuid4().hex[:24]}"
    stop_reason = "end_turn" if tool is None else "tool_use"
    if not body.get("stream"):
        content: list[dict[str, Any]] = [{"type": "text", "text": "".join(words)}]
        if tool is not None:
            use = {"type": "tool_use", "id": tool_id, "name": tool, "input": json.loads(_ARGUMENTS)}
            content.append(use)
        return web.json_response(
            {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": _overridden(
                    request,
                    {
                        "input_tokens": prompt,
                        "output_tokens": completion,
                        "cache_creation_input_tokens": _knob(request, "cache-creation-tokens"),
                        "cache_read_input_tokens": _knob(request, "cached-tokens"),
                    },
                ),
            },
            headers={"x-mock-upstream": request.app[_SITE].name},
        )
    start = {
        "type": "message_start",
        "message": {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _overridden(
                request,
                {
                    "input_tokens": prompt,
                    "output_tokens": 1,
                    "cache_creation_input_tokens": _knob(request, "cache-creation-tokens"),
                    "cache_read_input_tokens": _knob(request, "cached-tokens"),
                },
            ),
        },
    }

    def block_start(index: int, block: dict[str, Any]) -> bytes:
        event = {"type": "content_block_start", "index": index, "content_block": block}
        return _sse(event, "content_block_start")

    def delta(index: int, value: dict[str, Any]) -> bytes:
        event = {"type": "content_block_delta", "index": index, "delta": value}
        return _sse(event, "content_block_delta")

    def block_stop(index: int) -> bytes:
        return _sse({"type": "content_block_stop", "index": index}, "content_block_stop")

    chunks = [_sse(start, "message_start"), block_start(0, {"type": "text", "text": ""})]
    chunks += [delta(0, {"type": "text_delta", "text": w}) for w in words]
    chunks.append(block_stop(0))
    if tool is not None:
        # the tool_use block opens with an empty input; its JSON follows in pieces
        chunks.append(
            block_start(1, {"type": "tool_use", "id": tool_id, "name": tool, "input": {}})
        )
        chunks += [
            delta(1, {"type": "input_json_delta", "partial_json": piece})
            for piece in ("", *_ARGUMENT_PIECES)
        ]
        chunks.append(block_stop(1))
    chunks += [
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": _overridden(request, {"output_tokens": completion}),
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return await _stream(request, chunks)


_Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]
_HANDLERS: dict[str, _Handler] = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completions,
    "/v1/embeddings": _embeddings,
    "/v1/responses": _responses,
    "/v1/messages": _messages,
    "/v1/messages/count_tokens": _count_tokens,
}


async def _handle(request: web.Request) -> web.StreamResponse:
    site = request.app[_SITE]
    raw = await request.read()
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    request.app[_SEEN].seen.append(
        {
            "path": request.path_qs,
            "headers": dict(request.headers),
            "body": raw.decode("utf-8", "replace"),
            # the TLS server name the client asked for (None over plain HTTP)
            "sni": _SNI.get(id(ssl_object)) if ssl_object is not None else None,
        }
    )
    if site.api_key is not None:
        presented = _presented_key(request) or ""
        if not hmac.compare_digest(presented.encode(), site.api_key.encode()):
            message = (
                "invalid x-api-key" if site.api == "anthropic" else "Incorrect API key provided."
            )
            return _error(site, 401, message, "invalid_request_error", "invalid_api_key")
    # a provider's own path (api_base, Azure's deployment path) serves its endpoint
    found = endpoint_suffix(request.path)
    handler = _HANDLERS.get("/v1" + found[0]) if found is not None else None
    if handler is None or (found is not None and not _speaks(site, found[0])):
        return _unknown_path(site, request)
    try:
        body = json.loads(raw)
    except ValueError:
        return _error(
            site,
            400,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            "invalid_json",
        )
    if not isinstance(body, dict):
        return _error(
            site, 400, "The body must be a JSON object.", "invalid_request_error", "invalid_json"
        )
    await asyncio.sleep(_delay_s(request, "x-mock-delay-ms"))
    slow = _per_site(request, "x-mock-slow").get(site.name, "")
    if slow.isascii() and slow.isdigit():
        await asyncio.sleep(min(int(slow), 30_000) / 1000)
    fail = _per_site(request, "x-mock-fail").get(site.name)
    if fail is not None and "/" in fail:
        fail = request.app[_SEEN].every_nth(fail)
    if fail is not None and fail.startswith("replay:"):
        return await _replay(request, fail.removeprefix("replay:"))
    if fail == "hang":
        await _hang(request)
    if fail == "reset":
        if request.transport is not None:
            request.transport.abort()  # the connection dies without a response
        raise asyncio.CancelledError
    if fail is not None and fail.isascii() and fail.isdigit():
        status = int(fail)
        err_type, code = _FAILURES.get(status, ("server_error", "mock_failure"))
        return _error(
            site, status, f"The mock deployment {site.name} answers {status}.", err_type, code
        )
    replay = request.headers.get("x-mock-replay")
    if replay is not None:
        return await _replay(request, replay)
    echo = request.headers.get("x-mock-echo-key")
    if echo is not None:
        return await _echo_key(request, echo, handler, body)
    return await handler(request, body)


def _speaks(site: MockSite, suffix: str) -> bool:
    """Whether the site serves the endpoint (a one-API site only its API's)."""
    return site.api is None or suffix in APIS.get(site.api, frozenset())


def _unknown_path(site: MockSite, request: web.Request) -> web.Response:
    """A path the site does not serve, refused as its provider refuses one: OpenAI's
    "Invalid URL", Anthropic's ``not_found_error``."""
    if site.api == "anthropic":
        return _anthropic_error(404, f"Not found: {request.method} {request.path}")
    if site.api == "openai":
        return _openai_error(
            404,
            f"Invalid URL ({request.method} {request.path})",
            "invalid_request_error",
            "unknown_url",
        )
    return _openai_error(
        404, f"Unknown path {request.path}", "invalid_request_error", "unknown_url"
    )


#: ``x-mock-fail: <site>=<status>``: the error body OpenAI sends with that status.
_FAILURES = {
    400: ("invalid_request_error", "mock_bad_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
#: The longest a ``hang`` holds a request before it resets the connection.
_HANG_S = 120.0


async def _hang(request: web.Request) -> None:
    """An upstream that took the request and never answers (``x-mock-fail:
    <site>=hang``): it waits until the peer goes away, then drops the connection."""
    deadline = asyncio.get_running_loop().time() + _HANG_S
    transport = request.transport
    while transport is not None and not transport.is_closing():
        if asyncio.get_running_loop().time() > deadline:
            transport.abort()
            break
        await asyncio.sleep(0.05)
    raise asyncio.CancelledError


async def _echo_key(
    request: web.Request, how: str, handler: _Handler, body: dict[str, Any]
) -> web.StreamResponse:
    """A careless upstream: the key it was sent comes back in headers (twice) and, for
    ``error``, in a 500's message too (redaction tests)."""
    key, site = _presented_key(request) or "", request.app[_SITE]
    if how == "error":
        resp: web.StreamResponse = _error(
            site, 500, f'upstream rejected key {key} ("{key}")', "server_error", "echo"
        )
    elif how == "long-400":
        # normalized to context_length_exceeded, whose message is cut at 2,000 chars:
        # the key straddles the cut
        filler = "x" * (1996 - len("maximum context length exceeded "))
        message = f"maximum context length exceeded {filler}{key}"
        resp = _error(site, 400, message, "invalid_request_error", "echo")
    else:
        resp = await handler(request, body)
    if not resp.prepared:
        resp.headers.add("x-mock-saw-key", f"Bearer {key}")
        resp.headers.add("x-mock-saw-key", key)
    return resp


_CASSETTE = re.compile(r"^[a-z0-9-]{1,64}$")


def _per_site(request: web.Request, header: str) -> dict[str, str]:
    """``site=value,site=value`` from a test header: a knob for some deployments only."""
    out: dict[str, str] = {}
    for part in request.headers.get(header, "").split(","):
        name, _, value = part.strip().partition("=")
        if name and value:
            out[name] = value
    return out


async def _replay(request: web.Request, name: str) -> web.StreamResponse:
    """Answer with a recorded response (go-vcr cassette) from EXTPROC_MOCK_REPLAY_DIR
    (directories separated like PATH)."""
    directories = [d for d in os.environ.get("EXTPROC_MOCK_REPLAY_DIR", "").split(os.pathsep) if d]
    found = [Path(d) / f"{name}.yaml" for d in directories if (Path(d) / f"{name}.yaml").is_file()]
    path = found[0] if found else None
    if path is None or not _CASSETTE.match(name):
        return _error(
            request.app[_SITE],
            404,
            f"no recording {name[:64]!r}",
            "invalid_request_error",
            "replay",
        )
    recorded = yaml.safe_load(path.read_text(encoding="utf-8"))["interactions"][0]["response"]
    content_type = (recorded["headers"].get("Content-Type") or ["application/json"])[0]
    body = recorded["body"].encode()
    if content_type.startswith("text/event-stream"):
        events = [e + b"\n\n" for e in body.split(b"\n\n") if e.strip()]
        return await _stream(request, events)
    return web.Response(
        status=int(recorded["code"]),
        body=body,
        headers={"content-type": content_type, "x-mock-upstream": request.app[_SITE].name},
    )


async def _seen(request: web.Request) -> web.Response:
    if request.method == "DELETE":
        request.app[_SEEN].seen.clear()
        return web.json_response({"cleared": True})
    return web.json_response(list(request.app[_SEEN].seen))


def make_mock_app(site: MockSite, keep: int = 10_000) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_SITE] = site
    app[_SEEN] = _Recorder(keep)
    app.router.add_route("GET", "/_mock/requests", _seen)
    app.router.add_route("DELETE", "/_mock/requests", _seen)
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app


#: TLS connection → the server name its client sent (SNI), for the record of requests.
_SNI: dict[int, str | None] = {}


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def remember(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if len(_SNI) > 10_000:
            _SNI.clear()
        _SNI[id(sock)] = name

    context.sni_callback = remember
    return context


async def run_mock(sites: list[MockSite], stop: asyncio.Event | None = None) -> None:
    """Serve every site until ``stop`` is set (or forever)."""
    runners = []
    for site in sites:
        runner = web.AppRunner(make_mock_app(site), access_log=None, handle_signals=False)
        await runner.setup()
        context = _tls_context(*site.tls) if site.tls is not None else None
        await web.TCPSite(runner, site.host, site.port, ssl_context=context).start()
        runners.append(runner)
    # every site listens: what a supervisor waits for (a port open could be another's)
    print(f"extproc mock: serving {len(sites)} site(s)", flush=True)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        for runner in runners:
            await runner.cleanup()
