"""Store keys: every key the gateway reads or writes is built by :func:`store_key`.

A key is its Redis Cluster hash tag ``{<tag part>:<tag part>...}`` followed by
``:<part>`` for each further part. Every part is escaped: a character outside
letters, digits and ``-_.~/@+=!*,`` becomes ``%XX`` for each of its UTF-8 bytes, so
no escaped part holds a ``:``, ``{``, ``}`` or bare ``%``. That gives the rules:

- Rule: two different (tag, parts) tuples never make the same key (team ``t`` with
  session ``u:s`` and team ``t:u`` with session ``s`` are two counters).
- Rule: a key has exactly one ``{...}``, at its start, and an id can never inject a
  brace: the slot is chosen by the tag the code names, never by a client's id.
- Rule: the tag is never empty (``{}`` would hash the whole key): its first part is
  a fixed namespace.

What is tagged by what: the keys of one tenant (the caller's team, else its key) share
the tenant's tag (:func:`tenant_tag`): its key, team and team-member budgets, session
counters, rate limits and parallel-request leases, so one script per call touches them
all, and on Redis Cluster tenants spread over the nodes. Budgets that span tenants
(users, end users, organizations, projects, tags, providers, deployments, the global
budget) share the ``{spend}`` tag; a deployment's health is tagged by the deployment.
The reservation book of a hold lives in its budget key's slot (see
:func:`extproc.store.base.book_tag`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

__all__ = [
    "SPEND",
    "TENANT",
    "is_tenant_tag",
    "key_tag",
    "marker_key",
    "split_key",
    "store_key",
    "tagged_key",
    "tenant_tag",
]

#: The hash tag of the budgets that span tenants (and of their reservation book).
SPEND = ("spend",)
#: The namespace of tenant tags.
TENANT = "t"
_TENANT_KINDS = frozenset({"team", "key", "anon"})

_SAFE = "A-Za-z0-9\\-_.~/@+=!*,"
_PLAIN = re.compile(f"[{_SAFE}]*")
_ESCAPED = re.compile(f"(?:[{_SAFE}]|%[0-9A-F]{{2}})*")
_BYTE = re.compile("%([0-9A-F]{2})")
#: Parts and keys remembered escaped and split (the same few recur on every call).
_CACHED = 1 << 16


@functools.lru_cache(maxsize=_CACHED)
def _escape(part: str) -> str:
    if _PLAIN.fullmatch(part):
        return part
    out: list[str] = []
    for char in part:
        if _PLAIN.fullmatch(char):
            out.append(char)
        else:
            # surrogatepass: a lone surrogate still has one escape of its own
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    return "".join(out)


@functools.lru_cache(maxsize=_CACHED)
def _unescape(text: str) -> str | None:
    if not _ESCAPED.fullmatch(text):
        return None
    raw = bytearray()
    pos = 0
    for match in _BYTE.finditer(text):
        raw += text[pos : match.start()].encode("ascii")
        raw.append(int(match.group(1), 16))
        pos = match.end()
    raw += text[pos:].encode("ascii")
    try:
        part = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
    # only the canonical spelling of a part is one of ours ("%61" is not "a")
    return part if _escape(part) == text else None


def store_key(tag: Sequence[str], *parts: str) -> str:
    """The key ``{<tag>}:<parts>``, every part escaped (see the module's rules)."""
    if not tag or not tag[0]:
        raise ValueError("a hash tag starts with a fixed, non-empty namespace")
    head = "{" + ":".join(_escape(p) for p in tag) + "}"
    return head + "".join(":" + _escape(p) for p in parts)


def tenant_tag(
    team: str | None, key_hash: str | None, session: str | None = None
) -> tuple[str, ...]:
    """The hash tag of one tenant's keys: ``("t", "team", <id>)`` for a team's callers,
    else ``("t", "key", <key hash>)``; without a caller (no virtual keys), each session
    is its own tenant: ``("t", "anon", <session id>)``.

    Rule: a key's tenant is its team when it has one, so a key's own budget, rate limits
    and leases live in the slot of its team's budget and one script admits the call."""
    if team is not None:
        return (TENANT, "team", team)
    if key_hash is not None:
        return (TENANT, "key", key_hash)
    if session is not None:
        return (TENANT, "anon", session)
    raise ValueError("a tenant is a team, a key or a session")


def is_tenant_tag(tag: Sequence[str]) -> bool:
    """Whether ``tag`` (as :func:`split_key` returns it) is one :func:`tenant_tag` builds."""
    return len(tag) == 3 and tag[0] == TENANT and tag[1] in _TENANT_KINDS and bool(tag[2])


#: The hash tag a key starts with, as Redis Cluster reads it (the first ``{...}``).
_TAG = re.compile(r"\{[^}]+\}")


def key_tag(key: str) -> str | None:
    """The hash tag text ``{...}`` a key starts with (what Redis Cluster hashes), or
    None when it starts with none."""
    match = _TAG.match(key)
    return None if match is None else match.group(0)


def tagged_key(tag: str, *parts: str) -> str:
    """A key in the slot of the hash tag text ``tag`` (``{...}``, as :func:`key_tag`
    returns it): ``tag`` followed by ``:<part>`` for each part, every part escaped."""
    if _TAG.fullmatch(tag) is None:
        raise ValueError("not a hash tag")
    return tag + "".join(":" + _escape(p) for p in parts)


def marker_key(key: str, op: str) -> str:
    """The marker that operation ``op`` was applied to ``key`` (a key :func:`store_key`
    built): the same hash tag, so one script on one Redis Cluster slot sees both, and
    a first part (``once``) no counter uses."""
    split = split_key(key)
    if split is None:
        raise ValueError("not a key store_key built")
    tag, parts = split
    return store_key(tag, "once", *parts, op)


@functools.lru_cache(maxsize=_CACHED)
def split_key(key: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(tag parts, parts) of a key :func:`store_key` built; None for anything else
    (how keys that came back from outside, e.g. through Envoy, are checked)."""
    end = key.find("}")
    if not key.startswith("{") or end < 0:
        return None
    rest = key[end + 1 :]
    if rest and not rest.startswith(":"):
        return None
    tag = _unescape_all(key[1:end].split(":"))
    parts = _unescape_all(rest[1:].split(":")) if rest else ()
    if tag is None or parts is None or not tag[0]:
        return None
    return tag, parts


def _unescape_all(texts: Sequence[str]) -> tuple[str, ...] | None:
    out: list[str] = []
    for text in texts:
        part = _unescape(text)
        if part is None:
            return None
        out.append(part)
    return tuple(out)
