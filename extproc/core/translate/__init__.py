"""Translation between OpenAI Chat Completions and Anthropic Messages, both ways.

Pure functions and incremental stream translators, no I/O: the gateway wires them
into its request and response paths when a client's API is not its upstream's.

- requests: :func:`chat_to_messages` (:mod:`~extproc.core.translate.chat_request`),
  :func:`messages_to_chat` (:mod:`~extproc.core.translate.messages_request`);
- whole responses: :func:`chat_response_to_message`, :func:`message_to_chat_response`
  (:mod:`~extproc.core.translate.responses`);
- streams: :class:`ChatToMessagesStream`, :class:`MessagesToChatStream`
  (:mod:`~extproc.core.translate.streams`);
- error bodies: :func:`openai_error_to_anthropic`, :func:`anthropic_error_to_openai`
  (:mod:`~extproc.core.translate.errors`).

``X_to_Y`` reads X's shape and writes Y's. Rule: a client's mistake in a request is a
:class:`~extproc.core.errors.BadRequestError` naming the parameter, and nothing else
is ever raised; what an upstream sends is translated leniently and never raises.
"""

from extproc.core.translate.chat_request import chat_to_messages
from extproc.core.translate.errors import anthropic_error_to_openai, openai_error_to_anthropic
from extproc.core.translate.messages_request import messages_to_chat
from extproc.core.translate.responses import chat_response_to_message, message_to_chat_response
from extproc.core.translate.streams import ChatToMessagesStream, MessagesToChatStream

__all__ = [
    "ChatToMessagesStream",
    "MessagesToChatStream",
    "anthropic_error_to_openai",
    "chat_response_to_message",
    "chat_to_messages",
    "message_to_chat_response",
    "messages_to_chat",
    "openai_error_to_anthropic",
]
