"""The response side of a call: read its usage, take out what the client did not ask
for, and hand the usage to the gateway to settle the charge.

Adapter-neutral: fed body pieces by the ext_proc response phases today.
"""

from __future__ import annotations

import dataclasses
import re

from envoy.config.core.v3 import base_pb2

from extproc.core.charges import Charge
from extproc.core.leases import AUTHZ_NAMESPACE, CHARGE_FIELD, UNMETERED_FIELD
from extproc.core.usage import ResponseReader, Usage, event_data

__all__ = ["ResponseMeter", "charge_from_metadata", "unmetered_in_metadata"]


def charge_from_metadata(metadata: base_pb2.Metadata) -> Charge | None:
    """The charge the ext_authz decision left in the stream's dynamic metadata."""
    if AUTHZ_NAMESPACE not in metadata.filter_metadata:
        return None
    value = metadata.filter_metadata[AUTHZ_NAMESPACE].fields.get(CHARGE_FIELD)
    if value is None or value.WhichOneof("kind") != "string_value":
        return None
    return Charge.parse(value.string_value)


def unmetered_in_metadata(metadata: base_pb2.Metadata) -> bool:
    """Whether the ext_authz decision routed an unmetered call (no charge to settle)."""
    if AUTHZ_NAMESPACE not in metadata.filter_metadata:
        return False
    return UNMETERED_FIELD in metadata.filter_metadata[AUTHZ_NAMESPACE].fields


def _usage_only(event: bytes) -> bool:
    """The usage chunk of a chat/completions stream: ``choices: []`` plus ``usage``."""
    if b'"usage"' not in event:
        return False
    data = event_data(event)
    return (
        isinstance(data, dict) and data.get("choices") == [] and isinstance(data.get("usage"), dict)
    )


#: SSE event types after which a stream has nothing more to say: Anthropic's
#: ``message_stop``, the Responses API's final events.
_TERMINAL_TYPES = frozenset(
    {b"message_stop", b"response.completed", b"response.incomplete", b"response.failed"}
)


#: Bytes without which no event of a piece can be a terminal one.
_MAY_END = re.compile(rb"\[DONE\]|message_stop|response\.(?:completed|incomplete|failed)")


def _terminal(event: bytes) -> bool:
    """The last event of a stream: ``data: [DONE]`` (OpenAI chat and completions) or
    an ``event:`` line naming a terminal type."""
    if not _MAY_END.search(event):
        return False  # the common case, found in C
    for line in event.split(b"\n"):
        if line.startswith(b"data:") and line[5:].strip() == b"[DONE]":
            return True
        if line.startswith(b"event:") and line[6:].strip() in _TERMINAL_TYPES:
            return True
    return False


class ResponseMeter:
    """Reads one response for its usage and decides what it costs.

    Rule: the same response costs the same however the client reads it. A response is
    *complete* once its end was seen, its ``content-length`` bytes have passed, or its
    stream's terminal event has; a client that hangs up after that (SDKs close right
    after ``[DONE]``, often before Envoy has sent us the end of the stream) is charged
    exactly as one that waited for the end.
    """

    __slots__ = ("_complete", "_events", "_left", "_reader", "_sse", "rewrites")

    def __init__(
        self, charge: Charge, *, content_type: str, encoding: str, content_length: str = ""
    ) -> None:
        sse = content_type.lower().startswith("text/event-stream")
        encoding = encoding.strip().lower()
        self._reader = ResponseReader(charge.api, sse=sse, encoding=encoding)
        self._sse = sse
        self._events = 0
        self._complete = False
        length = content_length.strip()
        #: Body bytes still to come, when the response said how many.
        self._left = int(length) if length.isascii() and length.isdigit() else None
        #: The usage chunk the gateway asked for is taken out of the client's stream
        #: (only from uncompressed SSE; the gateway does not ask for compression).
        self.rewrites = charge.strip_usage and sse and encoding in ("", "identity")

    def feed(self, chunk: bytes, *, end: bool) -> bytes | None:
        """Read a body piece; returns what the client gets instead, when rewriting.

        While rewriting, a partial event is held back until it is complete, so only
        whole events are ever passed on or dropped.
        """
        was_rewriting = self.rewrites and not self._reader.overflowed
        events = self._reader.feed(chunk)
        if end:
            events += self._reader.flush()
        self._events += len(events)
        if self._left is not None:
            self._left -= len(chunk)
        if end or (self._left is not None and self._left <= 0):
            self._complete = True
        elif self._sse and not self._complete:
            # Rule: an OpenAI stream's usage chunk ends what is billable (only [DONE]
            # follows it): a client that hangs up after it pays as one that waited
            self._complete = any(_terminal(event) or _usage_only(event) for event in events)
        if not was_rewriting:
            return None
        out = b"".join(event + b"\n\n" for event in events if not _usage_only(event))
        if self._reader.overflowed:
            # Not an SSE stream we can split: give back what was held, then pass the
            # rest on untouched.
            self.rewrites = False
            out += self._reader.take_pending()
        return out

    @property
    def complete(self) -> bool:
        """The whole response has passed (see the class's rule); a JSON body without
        ``content-length`` counts once what arrived is a whole JSON document."""
        if not self._complete and not self._sse and self._reader.is_whole_json():
            self._complete = True
        return self._complete

    def usage(self) -> Usage | None:
        """The usage the response reported (None when it reported none)."""
        return self._reader.finish() if self.complete else self._reader.usage

    def billable(self, charge: Charge) -> Usage | None:
        """The usage to charge, complete or not.

        Complete: what the provider reported; a stream that reported none, the prompt
        estimate plus one output token per streamed event; a JSON body without usage,
        None (the reservation's estimate). Left before the end: a JSON body, the
        estimate; a stream pays for what was streamed, at least one output token per
        event whatever the usage so far says (Anthropic's ``message_start`` reports
        one output token before any text)."""
        usage = self.usage()
        if self.complete and (usage is not None or not self._sse):
            return usage
        if not self._sse:
            return None
        streamed = min(self._events, charge.max_output_tokens or self._events)
        if usage is None:
            return Usage(input_tokens=charge.prompt_tokens, output_tokens=streamed)
        return dataclasses.replace(usage, output_tokens=max(usage.output_tokens, streamed))
