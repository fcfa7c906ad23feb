"""An Anthropic Messages request body as an OpenAI Chat Completions one.

:func:`messages_to_chat` returns a new dict (the input is not changed; nested values
such as tool schemas are shared, not copied) and raises only
:class:`~extproc.core.errors.BadRequestError` subclasses, naming the parameter in
Anthropic's spelling (``messages.2.content``):

- ``system`` becomes a leading system message; ``tool_result`` blocks become ``tool``
  messages, placed before the rest of their user turn (OpenAI wants them right after
  the assistant's calls); an image inside a tool result moves to that user message,
  as OpenAI's tool messages carry text only; ``is_error`` is kept as an ``Error:``
  prefix of the result's text; ``cache_control`` is dropped (OpenAI caches by itself);
- text, images (base64 as a ``data:`` URL, or the URL), base64 PDF documents (a
  ``file`` part) and plain-text documents map to content parts; ``tool_use`` blocks
  to ``tool_calls``, the id kept and the input written as the arguments string;
- ``thinking``/``redacted_thinking`` blocks are dropped, and so are the ``thinking``
  parameter and ``output_config.effort``: chat completions return no thinking, and a
  reasoning effort would be refused by a model that does not reason;
- ``max_tokens`` is sent as ``max_completion_tokens`` (OpenAI's reasoning models refuse
  ``max_tokens``, as the recorded ``chat-bad-request`` shows), or under the name the
  caller gives; ``stop_sequences`` as ``stop``; ``metadata.user_id`` as ``user``;
  ``disable_parallel_tool_use`` as ``parallel_tool_calls: false``;
- ``stream`` asks for ``stream_options.include_usage`` too: the gateway meters by it;
- refused with a 400: server tools (web search, code execution, computer use, ...),
  MCP servers, containers, context management, structured output formats, content
  blocks OpenAI has nothing for, and any member Anthropic does not define (as
  Anthropic itself refuses one);
- dropped, with the reason beside each in :data:`_MESSAGES_DROPPED`.

A final assistant turn (Anthropic's prefill, which the answer continues) is sent as
an assistant message, which OpenAI answers after rather than continues, as LiteLLM's
``experimental_pass_through`` adapter does. Differences from that adapter: the
``thinking`` parameter is dropped rather than turned into a ``reasoning_effort``; an
image in a tool result goes to a user message rather than into the tool message's
text; long tool names are not truncated (OpenAI and Anthropic both allow 64
characters); server tools and unknown members are refused rather than passed on.
"""

from __future__ import annotations

from typing import Any

from extproc.core.errors import MissingParameterError
from extproc.core.translate._values import (
    Checked,
    dumps,
    refuse_unknown,
    request_object,
    wrong_type,
)

__all__ = ["messages_to_chat"]

#: Anthropic members dropped, with the reason.
_MESSAGES_DROPPED: dict[str, str] = {
    "top_k": "OpenAI has no top-k sampling",
    "thinking": "chat completions return no thinking blocks",
    "service_tier": "Anthropic's tiers are not OpenAI's",
}
_MESSAGES_MAPPED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "metadata",
        "tools",
        "tool_choice",
        "output_config",
    }
)
_MESSAGES_REFUSED: dict[str, str] = {
    "container": "Containers are",
    "mcp_servers": "MCP servers are",
    "context_management": "Context management is",
    "output_format": "Structured output_format is",
}


def messages_to_chat(
    body: dict[str, Any], model: str, *, max_tokens_param: str = "max_completion_tokens"
) -> dict[str, Any]:
    """An Anthropic /v1/messages request body as an OpenAI chat/completions body for
    ``model``; ``max_tokens`` goes under ``max_tokens_param`` (``max_tokens`` for a
    server that knows only the deprecated name)."""
    req = request_object(body, openai=False)
    refuse_unknown(
        body, _MESSAGES_MAPPED | frozenset(_MESSAGES_REFUSED) | frozenset(_MESSAGES_DROPPED)
    )
    for key, what in _MESSAGES_REFUSED.items():
        if req.has(key):
            raise req.invalid(key, f"{what} not supported by this model.")
    config = req.child("output_config")
    if config is not None and config.has("format"):
        raise config.invalid("format", "Structured output formats are not supported by this model.")
    req.object("thinking")  # dropped, but a wrong type is still the client's error
    messages = _system_messages(req) + _anthropic_messages(req)
    out: dict[str, Any] = {"model": model, "messages": messages}
    limit = req.integer("max_tokens", minimum=1)
    if limit is None:
        raise MissingParameterError("max_tokens: Field required", param="max_tokens")
    out[max_tokens_param] = limit
    stops = req.array("stop_sequences") or []
    if not all(isinstance(s, str) for s in stops):
        raise wrong_type("stop_sequences", "an array of strings", stops)
    if stops:
        out["stop"] = list(stops)
    for key in ("temperature", "top_p"):
        value = req.number(key, 0.0, 1.0)
        if value is not None:
            out[key] = value
    if req.boolean("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # the gateway meters by it
    metadata = req.child("metadata")
    user = metadata.string("user_id") if metadata is not None else None
    if user:
        out["user"] = user
    tools = _anthropic_tools(req)
    if tools:
        out["tools"] = tools
    _anthropic_tool_choice(req, out)
    return out


def _system_messages(req: Checked) -> list[dict[str, Any]]:
    value = req.obj.get("system")
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [{"role": "system", "content": value}]
    if not isinstance(value, list):
        raise wrong_type("system", "a string or an array of text blocks", value)
    texts: list[str] = []
    for block in req.items("system"):
        if block.need("type") != "text":
            raise block.invalid("type", "System blocks must be text blocks.")
        texts.append(block.need("text"))
    if not texts:
        return []
    if len(texts) == 1:
        return [{"role": "system", "content": texts[0]}]
    return [{"role": "system", "content": [{"type": "text", "text": t} for t in texts]}]


def _anthropic_messages(req: Checked) -> list[dict[str, Any]]:
    if req.array("messages") is None:
        raise MissingParameterError("messages: Field required", param="messages")
    out: list[dict[str, Any]] = []
    for msg in req.items("messages"):
        role = msg.need("role")
        if role == "user":
            out += _anthropic_user(msg)
        elif role == "assistant":
            out += _anthropic_assistant(msg)
        else:
            raise msg.invalid("role", f"Input should be 'user' or 'assistant', not {role[:64]!r}.")
    if not out:
        raise req.invalid("messages", "messages must hold at least one message.")
    return out


def _user_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if len(parts) == 1 and parts[0]["type"] == "text":
        return str(parts[0]["text"])
    return parts


def _anthropic_user(msg: Checked) -> list[dict[str, Any]]:
    """A user turn: its tool results as tool messages first, then one user message
    with the rest (and the images the tool results held)."""
    content = msg.content()
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in content:
        kind = block.need("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.need("text")})
        elif kind == "image":
            parts.append(_anthropic_image(block))
        elif kind == "document":
            parts.append(_anthropic_document(block))
        elif kind == "tool_result":
            tools.append(_anthropic_tool_result(block, images))
        else:
            raise block.invalid("type", f"Content blocks of type {kind[:64]!r} are not supported.")
    parts = images + parts
    return tools + ([{"role": "user", "content": _user_content(parts)}] if parts else [])


def _source(block: Checked) -> Checked:
    source = block.child("source")
    if source is None:
        raise MissingParameterError(
            f"{block.param('source')}: Field required", param=block.param("source")
        )
    return source


def _anthropic_image(block: Checked) -> dict[str, Any]:
    source = _source(block)
    kind = source.need("type")
    if kind == "base64":
        media = source.need("media_type")
        data = source.need("data")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        url = source.need("url")
    else:
        raise source.invalid("type", f"Image sources of type {kind[:64]!r} are not supported.")
    return {"type": "image_url", "image_url": {"url": url}}


def _anthropic_document(block: Checked) -> dict[str, Any]:
    source = _source(block)
    kind = source.need("type")
    if kind == "base64" and source.string("media_type") == "application/pdf":
        data = source.need("data")
        file = {"file_data": f"data:application/pdf;base64,{data}", "filename": "document.pdf"}
        return {"type": "file", "file": file}
    if kind == "text":
        return {"type": "text", "text": source.need("data")}
    raise source.invalid("type", "Only base64 PDF and plain-text documents are supported.")


def _anthropic_tool_result(block: Checked, images: list[dict[str, Any]]) -> dict[str, Any]:
    raw_id = block.need("tool_use_id")
    value = block.obj.get("content")
    texts: list[str] = []
    if isinstance(value, str):
        texts.append(value)
    elif isinstance(value, list):
        for item in block.items("content"):
            kind = item.need("type")
            if kind == "text":
                texts.append(item.need("text"))
            elif kind == "image":
                images.append(_anthropic_image(item))
            else:
                raise item.invalid("type", f"Tool results cannot hold {kind[:64]!r} blocks here.")
    elif value is not None:
        raise wrong_type(block.param("content"), "a string or an array of blocks", value)
    text = "\n".join(texts)
    if block.boolean("is_error"):
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": raw_id, "content": text}


def _anthropic_assistant(msg: Checked) -> list[dict[str, Any]]:
    content = msg.content()
    if isinstance(content, str):
        return [{"role": "assistant", "content": content}]
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block.need("type")
        if kind == "text":
            texts.append(block.need("text"))
        elif kind == "tool_use":
            calls.append(_anthropic_tool_call(block))
        elif kind not in ("thinking", "redacted_thinking"):
            raise block.invalid("type", f"Content blocks of type {kind[:64]!r} are not supported.")
    if not texts and not calls:
        return []  # only thinking: nothing OpenAI can be shown
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _anthropic_tool_call(block: Checked) -> dict[str, Any]:
    call_id = block.need("id")
    name = block.need("name")
    arguments = block.object("input")
    try:
        encoded = dumps({} if arguments is None else arguments)
    except (ValueError, RecursionError):
        raise block.invalid("input", "A tool call's input must be plain JSON.") from None
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": encoded},
    }


def _anthropic_tools(req: Checked) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    for tool in req.items("tools"):
        kind = tool.string("type") or "custom"
        if kind != "custom":
            # web_search_*, bash_*, computer_*, text_editor_*, code_execution_*, ...
            raise tool.invalid("type", f"Anthropic server tools ({kind[:64]}) are not supported.")
        name = tool.need("name")
        schema = tool.object("input_schema")
        if schema is None:
            raise MissingParameterError(
                f"{tool.param('input_schema')}: Field required", param=tool.param("input_schema")
            )
        function: dict[str, Any] = {"name": name, "parameters": schema}
        description = tool.string("description")
        if description is not None:
            function["description"] = description
        tools.append({"type": "function", "function": function})
    return tools


def _anthropic_tool_choice(req: Checked, out: dict[str, Any]) -> None:
    choice = req.child("tool_choice")
    if choice is None:
        return
    kind = choice.need("type")
    mapped: str | dict[str, Any]
    if kind == "auto":
        mapped = "auto"
    elif kind == "any":
        mapped = "required"
    elif kind == "none":
        mapped = "none"
    elif kind == "tool":
        mapped = {"type": "function", "function": {"name": choice.need("name")}}
    else:
        raise choice.invalid("type", f"Invalid tool_choice type {kind[:64]!r}.")
    no_parallel = choice.boolean("disable_parallel_tool_use")
    if "tools" not in out:
        if kind in ("any", "tool"):
            raise choice.invalid("type", "tool_choice is only allowed when tools are given.")
        return
    out["tool_choice"] = mapped
    if no_parallel and kind != "none":
        out["parallel_tool_calls"] = False
