"""Translation between OpenAI Chat Completions and Anthropic Messages, both ways.

Pure functions and incremental stream translators, no I/O: the gateway wires them
into its request and response paths when a client's API is not its upstream's.

- requests: :func:`chat_to_messages`, :func:`messages_to_chat`
  (:mod:`~extproc.core.translate.requests`).

``X_to_Y`` reads X's shape and writes Y's. Rule: a client's mistake in a request is a
:class:`~extproc.core.errors.BadRequestError` naming the parameter, and nothing else
is ever raised; what an upstream sends is translated leniently and never raises.
"""

from extproc.core.translate.requests import chat_to_messages, messages_to_chat

__all__ = ["chat_to_messages", "messages_to_chat"]
