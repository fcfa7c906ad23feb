"""An OpenAI Chat Completions request body as an Anthropic Messages one.

:func:`chat_to_messages` returns a new dict (the input is not changed; nested values
such as tool schemas are shared, not copied) and raises only
:class:`~extproc.core.errors.BadRequestError` subclasses, naming the parameter in
OpenAI's spelling (``messages.[2].content``):

- ``system``/``developer`` messages, wherever they stand, become ``system``: a string
  for a single text, else text blocks in order (mid-conversation ones are hoisted, as
  Anthropic has no other place for them);
- consecutive messages of one role are merged (Anthropic wants turns to alternate);
  ``tool`` messages become ``tool_result`` blocks of a user turn, placed before the
  turn's other blocks as Anthropic requires;
- empty text is dropped (Anthropic refuses empty text blocks), and so is the trailing
  whitespace of a final assistant turn (Anthropic refuses it in a prefill);
- ``image_url`` parts: a base64 ``data:`` URL becomes a base64 image (a PDF one a
  document), an http(s) URL a ``url`` image; a ``file`` part with PDF ``file_data``
  becomes a document; ``cache_control`` on a part or tool (LiteLLM's extension for
  Anthropic's prompt cache) is kept;
- tool-call ids are mapped to Anthropic's alphabet (``[A-Za-z0-9_-]``), the call's and
  its result's alike, so pairs still match; ``arguments`` that are not a JSON object
  are the client's error;
- ``max_completion_tokens`` (else ``max_tokens``, else the caller's default) becomes
  ``max_tokens``; ``temperature`` above Anthropic's maximum of 1 is sent as 1, its
  most random;
- ``user`` (else ``safety_identifier``) becomes ``metadata.user_id`` unless it is an
  e-mail address, which Anthropic refuses (it asks for an opaque id);
- refused with a 400, as they would change the answer and Anthropic has nothing like
  them: ``n`` > 1, ``logprobs``/``top_logprobs``, a ``response_format`` other than
  text, ``audio`` and audio ``modalities``, a non-empty ``logit_bias`` (token ids of
  another tokenizer), ``web_search_options``, the deprecated ``functions`` and
  ``function_call``, a stop sequence that is only whitespace, a ``tool_choice`` that
  asks for a tool when none is given, and any member OpenAI does not define (as OpenAI
  itself refuses one);
- dropped, with the reason beside each in :data:`_CHAT_DROPPED`.

Differences from LiteLLM (``litellm/llms/anthropic/chat/transformation.py`` and
``litellm_core_utils/prompt_templates/factory.py``), which this otherwise follows
(system hoisting, role merging, tool results in the user turn, empty text and final
whitespace, tool choice and ``disable_parallel_tool_use``, PDF documents, the e-mail
test): http(s) images are passed by URL, never downloaded (no I/O here);
``response_format`` is refused instead of emulated with a forced tool;
``reasoning_effort`` is dropped instead of mapped to a thinking budget; a
whitespace-only stop is refused instead of dropped; a numeric ``user`` is kept
(LiteLLM drops what looks like a phone number); unknown members are refused instead of
passed through; ``temperature`` is clamped; tool results go before the rest of their
turn; ``n``/``logprobs``/``logit_bias``/penalties are refused or dropped as listed,
where LiteLLM refuses all of them unless ``drop_params`` is set.
"""

from __future__ import annotations

import re
from typing import Any

from extproc.core.errors import InvalidParameterError, MissingParameterError
from extproc.core.translate._values import (
    Checked,
    loads,
    refuse_unknown,
    request_object,
    tool_id,
    wrong_type,
)

__all__ = ["chat_to_messages"]

#: OpenAI members Anthropic has no equivalent for that do not change what is answered,
#: dropped, with the reason.
_CHAT_DROPPED: dict[str, str] = {
    "stream_options": "an Anthropic stream always reports usage",
    "seed": "OpenAI's determinism is best-effort too",
    "presence_penalty": "a soft sampling nudge",
    "frequency_penalty": "a soft sampling nudge",
    "service_tier": "OpenAI's tiers are not Anthropic's",
    "store": "storage on OpenAI's side",
    "metadata": "OpenAI's tags for stored completions",
    "prediction": "a latency hint: the answer is the same",
    "prompt_cache_key": "a cache-routing hint",
    "reasoning_effort": "a model that does not think would refuse a thinking budget",
    "verbosity": "a style hint of OpenAI's reasoning models",
}
_CHAT_MAPPED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "temperature",
        "top_p",
        "stream",
        "user",
        "safety_identifier",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)
#: Checked by :func:`_refuse_chat_params`: a 400 when set to something Anthropic lacks.
_CHAT_REFUSED = frozenset(
    {
        "n",
        "logprobs",
        "top_logprobs",
        "response_format",
        "audio",
        "modalities",
        "logit_bias",
        "web_search_options",
        "functions",
        "function_call",
    }
)

#: LiteLLM's test of an e-mail address, which Anthropic refuses as a user id.
_EMAIL = re.compile(r"^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}$")


def chat_to_messages(
    body: dict[str, Any], model: str, *, default_max_tokens: int
) -> dict[str, Any]:
    """An OpenAI chat/completions request body as an Anthropic /v1/messages body for
    ``model``; ``max_tokens`` is ``default_max_tokens`` when the client set none."""
    req = request_object(body, openai=True)
    refuse_unknown(body, _CHAT_MAPPED | _CHAT_REFUSED | frozenset(_CHAT_DROPPED))
    _refuse_chat_params(req)
    system, turns = _chat_messages(req)
    out: dict[str, Any] = {"model": model, "messages": turns}
    if system is not None:
        out["system"] = system
    limit = req.integer("max_completion_tokens", minimum=1)
    if limit is None:
        limit = req.integer("max_tokens", minimum=1)
    out["max_tokens"] = default_max_tokens if limit is None else limit
    stops = _chat_stop(req)
    if stops:
        out["stop_sequences"] = stops
    temperature = req.number("temperature", 0.0, 2.0)
    if temperature is not None:
        out["temperature"] = min(temperature, 1.0)  # Anthropic's range is 0..1
    top_p = req.number("top_p", 0.0, 1.0)
    if top_p is not None:
        out["top_p"] = top_p
    if req.boolean("stream"):
        out["stream"] = True
    user = _chat_user(req)
    if user is not None:
        out["metadata"] = {"user_id": user}
    tools = _chat_tools(req)
    if tools:
        out["tools"] = tools
    choice = _chat_tool_choice(req, bool(tools))
    if choice is not None:
        out["tool_choice"] = choice
    return out


def _refuse_chat_params(req: Checked) -> None:
    n = req.integer("n", minimum=1)
    if n is not None and n > 1:
        raise req.invalid("n", "n > 1 is not supported by this model: ask once per answer.")
    if req.boolean("logprobs"):
        raise req.invalid("logprobs", "logprobs are not supported by this model.")
    if req.integer("top_logprobs", minimum=0):
        raise req.invalid("top_logprobs", "logprobs are not supported by this model.")
    response_format = req.child("response_format")
    if response_format is not None and response_format.string("type") not in (None, "text"):
        raise req.invalid(
            "response_format",
            "response_format json_object/json_schema is not supported by this model.",
        )
    if req.has("audio"):
        raise req.invalid("audio", "Audio output is not supported by this model.")
    modalities = req.array("modalities") or []
    if "audio" in modalities:
        raise req.invalid("modalities", "Audio output is not supported by this model.")
    if req.object("logit_bias"):
        raise req.invalid("logit_bias", "logit_bias is not supported by this model.")
    if req.has("web_search_options"):
        raise req.invalid("web_search_options", "Web search is not supported by this model.")
    for legacy in ("functions", "function_call"):
        if req.has(legacy):
            raise req.invalid(legacy, f"'{legacy}' is deprecated: use 'tools' and 'tool_choice'.")


def _chat_stop(req: Checked) -> list[str]:
    value = req.obj.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise wrong_type("stop", "a string or an array of strings", value)
    for stop in stops:
        if not stop.strip():
            # Rule: refused, not dropped: without it the answer would run on past it.
            raise req.invalid("stop", "This model does not accept an empty or whitespace stop.")
    return list(stops)


def _chat_user(req: Checked) -> str | None:
    user = req.string("user")
    if not user:
        user = req.string("safety_identifier")
    if not user or _EMAIL.match(user):
        return None
    return user


def _chat_messages(req: Checked) -> tuple[str | list[dict[str, Any]] | None, list[dict[str, Any]]]:
    if req.array("messages") is None:
        raise MissingParameterError("Missing required parameter: 'messages'.", param="messages")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for msg in req.items("messages"):
        role = msg.need("role")
        if role in ("system", "developer"):
            system += _chat_text_blocks(msg)
        elif role == "user":
            _append(turns, "user", _chat_user_blocks(msg))
        elif role == "assistant":
            _append(turns, "assistant", _chat_assistant_blocks(msg))
        elif role == "tool":
            _append(turns, "user", [_chat_tool_result(msg)])
        elif role == "function":
            raise msg.invalid("role", "The 'function' role is deprecated: use 'tool'.")
        else:
            raise msg.invalid("role", f"Invalid value for 'role': {role[:64]!r}.")
    for turn in turns:
        if turn["role"] == "user":
            # Rule: Anthropic wants a turn's tool results before anything else in it.
            blocks = turn["content"]
            turn["content"] = [b for b in blocks if b["type"] == "tool_result"] + [
                b for b in blocks if b["type"] != "tool_result"
            ]
    _strip_final_assistant(turns)
    if not turns:
        raise req.invalid("messages", "messages must hold at least one non-empty user message.")
    if len(system) == 1 and set(system[0]) == {"type", "text"}:
        return system[0]["text"], turns
    return system or None, turns


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"] += blocks
    else:
        turns.append({"role": role, "content": blocks})


def _strip_final_assistant(turns: list[dict[str, Any]]) -> None:
    if not turns or turns[-1]["role"] != "assistant":
        return
    blocks = turns[-1]["content"]
    if blocks[-1]["type"] == "text":
        blocks[-1] = {**blocks[-1], "text": blocks[-1]["text"].rstrip()}
        if not blocks[-1]["text"]:
            blocks.pop()
    if not blocks:
        turns.pop()


def _text_block(text: str, part: Checked | None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": text}
    cache = part.object("cache_control") if part is not None else None
    if cache is not None:
        block["cache_control"] = cache  # LiteLLM's extension for Anthropic's prompt cache
    return block


def _chat_text_blocks(msg: Checked, kinds: tuple[str, ...] = ("text",)) -> list[dict[str, Any]]:
    """A message's text as text blocks (empty ones dropped); a part of a type not in
    ``kinds`` is a 400."""
    content = msg.content()
    if isinstance(content, str):
        return [_text_block(content, msg)] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.need("type")
        if kind not in kinds:
            role = msg.obj.get("role")
            raise part.invalid("type", f"A {role!r} message cannot hold {kind[:64]!r} parts.")
        text = part.need(kind)
        if text:
            blocks.append(_text_block(text, part))
    return blocks


def _chat_user_blocks(msg: Checked) -> list[dict[str, Any]]:
    content = msg.content()
    if isinstance(content, str):
        return [_text_block(content, msg)] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.need("type")
        if kind == "text":
            text = part.need("text")
            if text:
                blocks.append(_text_block(text, part))
        elif kind == "image_url":
            blocks.append(_chat_image(part))
        elif kind == "file":
            blocks.append(_chat_file(part))
        elif kind == "input_audio":
            raise part.invalid("type", "Audio input is not supported by this model.")
        else:
            raise part.invalid("type", f"Invalid content part type {kind[:64]!r}.")
    return blocks


def _chat_image(part: Checked) -> dict[str, Any]:
    value = part.obj.get("image_url")
    if isinstance(value, str):  # LiteLLM accepts the bare URL
        url, param = value, part.param("image_url")
    else:
        image = part.child("image_url")
        if image is None:
            raise MissingParameterError(
                f"Missing required parameter: '{part.param('image_url')}'.",
                param=part.param("image_url"),
            )
        url, param = image.need("url"), image.param("url")
    block = _data_url_block(url, param)
    if block is None:
        if not url.lower().startswith(("https://", "http://")):
            raise InvalidParameterError(
                "An image URL must be an http(s) URL or a base64 data: URL.", param=param
            )
        block = {"type": "image", "source": {"type": "url", "url": url}}
    cache = part.object("cache_control")
    if cache is not None:
        block["cache_control"] = cache
    return block


def _chat_file(part: Checked) -> dict[str, Any]:
    file = part.child("file")
    data = file.string("file_data") if file is not None else None
    if file is None or data is None:
        raise part.invalid("file", "Only files given inline as file_data are supported.")
    block = _data_url_block(data, file.param("file_data"))
    if block is None or block["type"] != "document":
        raise InvalidParameterError(
            "file_data must be a base64 data: URL of a PDF.", param=file.param("file_data")
        )
    return block


def _data_url_block(url: str, param: str) -> dict[str, Any] | None:
    """A base64 ``data:`` URL as an image or (PDF) document block; None for another
    kind of URL."""
    if url[:5].lower() != "data:":
        return None
    header, comma, data = url[5:].partition(",")
    media, _, encoding = header.rpartition(";")
    if not comma or encoding.lower() != "base64" or not data:
        raise InvalidParameterError("A data: URL must be base64-encoded.", param=param)
    media = media.lower()
    source = {"type": "base64", "media_type": media, "data": data}
    if media == "application/pdf":
        return {"type": "document", "source": source}
    if not media.startswith("image/"):
        raise InvalidParameterError(f"Unsupported media type {media[:64]!r}.", param=param)
    return {"type": "image", "source": source}


def _chat_assistant_blocks(msg: Checked) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if msg.obj.get("content") is not None:
        blocks = _chat_text_blocks(msg, ("text", "refusal"))
    elif msg.string("refusal"):
        blocks = [_text_block(msg.string("refusal") or "", None)]
    if msg.has("function_call"):
        raise msg.invalid("function_call", "'function_call' is deprecated: use 'tool_calls'.")
    for call in msg.items("tool_calls"):
        blocks.append(_chat_tool_use(call))
    return blocks


def _chat_tool_use(call: Checked) -> dict[str, Any]:
    kind = call.string("type") or "function"
    if kind != "function":
        raise call.invalid("type", f"Tool calls of type {kind[:64]!r} are not supported.")
    raw_id = call.need("id")
    function = call.child("function")
    if function is None:
        raise MissingParameterError(
            f"Missing required parameter: '{call.param('function')}'.", param=call.param("function")
        )
    name = function.need("name")
    arguments = function.string("arguments") or ""
    try:
        parsed = loads(arguments) if arguments.strip() else {}
    except (ValueError, RecursionError):
        raise function.invalid("arguments", "Tool call arguments must be valid JSON.") from None
    if not isinstance(parsed, dict):
        raise function.invalid("arguments", "Tool call arguments must be a JSON object.")
    return {"type": "tool_use", "id": tool_id(raw_id, "toolu_"), "name": name, "input": parsed}


def _chat_tool_result(msg: Checked) -> dict[str, Any]:
    raw_id = msg.need("tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id(raw_id, "toolu_")}
    content = msg.content()
    if isinstance(content, str):
        if content:
            block["content"] = content
    else:
        texts = _chat_text_blocks(msg)
        if texts:
            block["content"] = texts
    return block


def _chat_tools(req: Checked) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    for tool in req.items("tools"):
        kind = tool.string("type") or "function"
        if kind != "function":
            raise tool.invalid(
                "type", f"Tools of type {kind[:64]!r} are not supported by this model."
            )
        function = tool.child("function")
        if function is None:
            raise MissingParameterError(
                f"Missing required parameter: '{tool.param('function')}'.",
                param=tool.param("function"),
            )
        name = function.need("name")
        if not name:
            raise function.invalid("name", "A tool's name must not be empty.")
        schema = function.object("parameters")
        if schema is None:
            schema = {"type": "object"}
        elif "type" not in schema:
            schema = {"type": "object", **schema}  # OpenAI reads {} as no parameters
        out: dict[str, Any] = {"name": name, "input_schema": schema}
        description = function.string("description")
        if description is not None:
            out["description"] = description
        cache = tool.object("cache_control")
        if cache is not None:
            out["cache_control"] = cache
        tools.append(out)
    return tools


def _chat_tool_choice(req: Checked, has_tools: bool) -> dict[str, Any] | None:
    value = req.obj.get("tool_choice")
    choice: dict[str, Any] | None
    if value is None:
        choice = None
    elif isinstance(value, str):
        kinds = {"auto": "auto", "required": "any", "none": "none"}
        if value not in kinds:
            raise req.invalid("tool_choice", f"Invalid value for 'tool_choice': {value[:64]!r}.")
        choice = {"type": kinds[value]}
    elif isinstance(value, dict):
        named = Checked(value, "tool_choice", True)
        kind = named.need("type")
        function = named.child("function")
        if kind != "function" or function is None:
            raise req.invalid("tool_choice", "tool_choice must name a function tool.")
        choice = {"type": "tool", "name": function.need("name")}
    else:
        raise wrong_type("tool_choice", "a string or an object", value)
    parallel = req.boolean("parallel_tool_calls")
    if not has_tools:
        if choice is not None and choice["type"] not in ("auto", "none"):
            raise req.invalid("tool_choice", "tool_choice is only allowed when tools are given.")
        return None
    if parallel is False:
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    return choice
