"""A translated call's answer, in the pieces Envoy hands it over.

The gateway sent a call of one API to a deployment of the other
(:func:`~extproc.core.translate.chat_to_messages`,
:func:`~extproc.core.translate.messages_to_chat`); its answer comes back in the
deployment's API and leaves in the client's. A stream is translated event by event as
its bytes come; a JSON answer is held whole (it cannot be translated in parts) and
leaves with its last piece; an error body is translated into the client's error shape.

Rule: the usage is read from the deployment's bytes before they are translated (the
metering sees the provider's answer, never the gateway's rewrite of it).

The limit: the answer's status has left before its body, so a 2xx JSON answer the
gateway cannot read (not JSON, or larger than :data:`MAX_TRANSLATED_BYTES`) reaches the
client as an error in its API's shape under that 2xx status.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from extproc.core.translate.errors import anthropic_error_to_openai, openai_error_to_anthropic
from extproc.core.translate.responses import chat_response_to_message, message_to_chat_response
from extproc.core.translate.streams import ChatToMessagesStream, MessagesToChatStream
from extproc.core.usage import MAX_INFLATED_BYTES

__all__ = ["AnswerTranslation", "translate_error"]

Api = Literal["openai", "anthropic"]
#: The largest JSON answer held whole to be translated (a model's answer is far smaller).
MAX_TRANSLATED_BYTES = MAX_INFLATED_BYTES


class AnswerTranslation:
    """One answer of ``upstream``'s API into ``client``'s: :meth:`feed` each piece,
    the returned bytes go to the client instead."""

    __slots__ = ("_body", "_client", "_created", "_model", "_stream", "_whole")

    def __init__(
        self, client: Api, *, sse: bool, model: str, created: int, include_usage: bool
    ) -> None:
        self._client = client
        self._model = model
        self._created = created
        self._stream: ChatToMessagesStream | MessagesToChatStream | None = None
        if sse:
            self._stream = (
                ChatToMessagesStream(model)
                if client == "anthropic"
                else MessagesToChatStream(model, created=created, include_usage=include_usage)
            )
        self._body: list[bytes] = []
        self._whole = 0

    def feed(self, chunk: bytes, *, end: bool) -> bytes:
        if self._stream is not None:
            out = self._stream.feed(chunk)
            return out + self._stream.finish() if end else out
        self._whole += len(chunk)
        if self._whole <= MAX_TRANSLATED_BYTES:
            self._body.append(chunk)
        return self._translated() if end else b""

    def _translated(self) -> bytes:
        raw = b"".join(self._body)
        self._body.clear()
        try:
            data: Any = json.loads(raw) if self._whole <= MAX_TRANSLATED_BYTES else None
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            # not an answer of the deployment's API: an error in the client's shape
            return translate_error(self._client, 502, raw[:4096])
        if self._client == "anthropic":
            out = chat_response_to_message(data, self._model)
        else:
            out = message_to_chat_response(data, self._model, created=self._created)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode()


def translate_error(client: Api, status: int, body: bytes) -> bytes:
    """An upstream's error body in the client's API's error shape."""
    if client == "anthropic":
        return openai_error_to_anthropic(status, body)
    return anthropic_error_to_openai(status, body)
