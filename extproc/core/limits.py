"""Per-key request and token rate limits over fixed one-minute windows in the store.

A window starts at the key's first request and lasts :data:`WINDOW_S`; the counter is
incremented before it is compared (atomic in the store, so several server processes
share one limit exactly), and a refused request tells the caller when the window
resets. The counters live in the key's tenant's slot (``{t:team:<id>}`` or
``{t:key:<hash>}``), beside its budgets.
"""

from __future__ import annotations

import math
import re

from extproc.core.access import VirtualKey
from extproc.core.errors import RateLimitError
from extproc.store.keys import is_tenant_tag, split_key, store_key

__all__ = ["WINDOW_S", "check_rpm", "check_tpm", "is_tpm_key", "rpm_key", "tpm_key"]

WINDOW_S = 60.0


_HASH = re.compile(r"[0-9a-f]{64}")


def _key(key: VirtualKey, what: str) -> str:
    """A key's counter, in its tenant's slot (see :func:`extproc.store.keys.tenant_tag`)."""
    return store_key(key.tenant, "key", key.hash, "ratelimit", what)


def rpm_key(key: VirtualKey) -> str:
    return _key(key, "rpm")


def tpm_key(key: VirtualKey) -> str:
    """Tokens used in the current window; charged from response usage."""
    return _key(key, "tpm")


def is_tpm_key(text: str) -> bool:
    """Whether ``text`` is a key's tpm counter (checked on keys that come back from
    outside, such as a charge carried through Envoy)."""
    split = split_key(text)
    if split is None:
        return False
    tag, parts = split
    return (
        is_tenant_tag(tag)
        and tag[1] != "anon"
        and len(parts) == 4
        and parts[0] == "key"
        and _HASH.fullmatch(parts[1]) is not None
        and parts[2:] == ("ratelimit", "tpm")
    )


def _retry_after(seconds_left: float) -> dict[str, str]:
    return {"retry-after": str(max(1, math.ceil(seconds_left)))}


def check_rpm(key: VirtualKey, count: int, seconds_left: float) -> None:
    """Raise a 429 when this request made the window's count pass ``rpm_limit``."""
    if key.rpm_limit is not None and count > key.rpm_limit:
        raise RateLimitError(
            f"Rate limit reached for API key {key.label}: {key.rpm_limit} requests per minute.",
            code="rpm_limit_exceeded",
            headers=_retry_after(seconds_left),
        )


def check_tpm(key: VirtualKey, tokens: int | None) -> None:
    """Raise a 429 when the window's tokens have reached ``tpm_limit``."""
    if key.tpm_limit is not None and (tokens or 0) >= key.tpm_limit:
        raise RateLimitError(
            f"Rate limit reached for API key {key.label}: {key.tpm_limit} tokens per minute.",
            code="tpm_limit_exceeded",
            headers=_retry_after(WINDOW_S),
        )
