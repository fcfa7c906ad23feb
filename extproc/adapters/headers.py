"""The one builder of the protobuf header edits the adapters send Envoy.

Rule: every header value the server sets goes through :func:`header_option`, so
every set overwrites (never appends a second value) and carries the same encoding.
ext_proc reads ``raw_value`` bytes (Latin-1, as HTTP/1 headers are); ext_authz reads
the string ``value`` (``raw=False``).
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

__all__ = ["header_mutation", "header_option"]

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def header_option(key: str, value: str, *, raw: bool = True) -> base_pb2.HeaderValueOption:
    """Set ``key`` to ``value``, replacing any value it has."""
    header = (
        base_pb2.HeaderValue(key=key, raw_value=value.encode("latin-1"))
        if raw
        else base_pb2.HeaderValue(key=key, value=value)
    )
    return base_pb2.HeaderValueOption(header=header, append_action=_OVERWRITE)


def header_mutation(
    set_headers: Iterable[tuple[str, str]] = (), remove: Iterable[str] = ()
) -> pb.HeaderMutation:
    """An ext_proc header mutation: these values set, these headers removed."""
    return pb.HeaderMutation(
        set_headers=[header_option(k, v) for k, v in set_headers],
        remove_headers=list(remove),
    )
