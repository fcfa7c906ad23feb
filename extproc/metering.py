"""The response side of a call: read its usage, take out what the client did not ask
for, and hand the usage to the gateway to settle the charge.

Adapter-neutral: fed body pieces by the ext_proc response phases today.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2

from extproc.accounting import Charge
from extproc.parallel import AUTHZ_NAMESPACE, CHARGE_FIELD
from extproc.usage import ResponseReader, Usage, event_data

__all__ = ["ResponseMeter", "charge_from_metadata"]


def charge_from_metadata(metadata: base_pb2.Metadata) -> Charge | None:
    """The charge the ext_authz decision left in the stream's dynamic metadata."""
    if AUTHZ_NAMESPACE not in metadata.filter_metadata:
        return None
    value = metadata.filter_metadata[AUTHZ_NAMESPACE].fields.get(CHARGE_FIELD)
    if value is None or value.WhichOneof("kind") != "string_value":
        return None
    return Charge.parse(value.string_value)


def _usage_only(event: bytes) -> bool:
    """The usage chunk of a chat/completions stream: ``choices: []`` plus ``usage``."""
    if b'"usage"' not in event:
        return False
    data = event_data(event)
    return (
        isinstance(data, dict) and data.get("choices") == [] and isinstance(data.get("usage"), dict)
    )


class ResponseMeter:
    __slots__ = ("_events", "_reader", "_sse", "rewrites")

    def __init__(self, charge: Charge, *, content_type: str, encoding: str) -> None:
        sse = content_type.lower().startswith("text/event-stream")
        encoding = encoding.strip().lower()
        self._reader = ResponseReader(charge.api, sse=sse, encoding=encoding)
        self._sse = sse
        self._events = 0
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
        if not was_rewriting:
            return None
        out = b"".join(event + b"\n\n" for event in events if not _usage_only(event))
        if self._reader.overflowed:
            # Not an SSE stream we can split: give back what was held, then pass the
            # rest on untouched.
            self.rewrites = False
            out += self._reader.take_pending()
        return out

    def usage(self) -> Usage | None:
        return self._reader.finish()

    def abandoned(self, charge: Charge) -> Usage | None:
        """The usage to charge when the client left mid-response: what the provider
        reported so far, else the prompt plus an output token per streamed event (the
        provider bills what it generated); None (the estimate) for a JSON body, which
        was generated in full."""
        usage = self._reader.usage
        if usage is not None and usage.output_tokens:
            return usage
        if not self._sse:
            return None
        output = min(self._events, charge.max_output_tokens or self._events)
        return Usage(input_tokens=charge.prompt_tokens, output_tokens=output)
