"""Per-key ``max_parallel_requests``: a lease per admitted request, shared by every
server process through the store.

The request takes a lease when it is admitted and gives it back when Envoy has
finished with the HTTP stream: completed, failed, cancelled by the client or reset.
The end of a stream is only visible to Envoy, so the server hands the lease to Envoy
as dynamic metadata (``lease``, in :data:`LEASE_NAMESPACE` for ext_proc and the
ext_authz filter's own namespace for ext_authz) and Envoy's gRPC access logger sends
it back when the stream ends (see ``envoy.config``): that works the same on both
paths, and on any server process. A lease names the process that took it (its
member starts with the process id, see ``liveness``): when that process dies, the
next acquire that finds the set full drops it. It also expires after
``lease_ttl_s`` (longer than the route timeout), so a lost log entry frees the slot
in the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from extproc.core.access import VirtualKey
from extproc.core.errors import RateLimitError
from extproc.store.keys import is_tenant_tag, split_key, store_key

__all__ = [
    "AUTHZ_NAMESPACE",
    "CHARGE_FIELD",
    "ITERATIONS_LIMIT_FIELD",
    "ITERATIONS_REMAINING_FIELD",
    "LEASE_FIELD",
    "LEASE_NAMESPACE",
    "UNMETERED_FIELD",
    "Lease",
    "check_parallel",
    "parallel_key",
]

#: Dynamic-metadata namespace the ext_proc server writes leases into.
LEASE_NAMESPACE = "extproc"
#: The ext_authz filter files a Check's dynamic metadata under its own name.
AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
LEASE_FIELD = "lease"
#: Where a capped session's count travels to the response headers (same namespace).
ITERATIONS_LIMIT_FIELD = "iterations_limit"
ITERATIONS_REMAINING_FIELD = "iterations_remaining"
#: The budget reservation to settle on the response path (ext_authz → response filter).
CHARGE_FIELD = "charge"
#: Set instead of a charge on a call routed but not metered (the token counter): its
#: answer is still redacted and stripped of the gateway's own headers.
UNMETERED_FIELD = "unmetered"
_HASH = re.compile(r"[0-9a-f]{64}")
_MEMBER = re.compile(r"[0-9a-f]{32}")


def _lease_set(tenant: tuple[str, ...], key_hash: str) -> str:
    return store_key(tenant, "key", key_hash, "parallel")


def parallel_key(key: VirtualKey) -> str:
    """The store's lease set of one key (in its tenant's slot, beside its budgets)."""
    return _lease_set(key.tenant, key.hash)


@dataclass(frozen=True, slots=True)
class Lease:
    """One admitted request's slot in its key's lease set."""

    store_key: str
    member: str

    @classmethod
    def new(cls, key: VirtualKey, owner: str, nonce: str) -> Lease:
        """A fresh lease of process ``owner``: its id, then ``nonce`` (16 random hex
        digits the caller draws; rule: the core draws no randomness)."""
        return cls(parallel_key(key), owner + nonce)

    @property
    def token(self) -> str:
        """The form Envoy carries in dynamic metadata and logs back."""
        return f"{self.store_key}|{self.member}"

    @classmethod
    def parse(cls, token: str) -> Lease | None:
        """A lease from a logged token; None for anything this server did not write."""
        store, _, member = token.rpartition("|")
        split = split_key(store)
        if split is None or not _MEMBER.fullmatch(member):
            return None
        tag, parts = split
        if not is_tenant_tag(tag) or tag[1] == "anon" or len(parts) != 3:
            return None
        if parts[0] != "key" or not _HASH.fullmatch(parts[1]):
            return None
        return cls(store, member) if store == _lease_set(tag, parts[1]) else None


def check_parallel(key: VirtualKey, acquired: bool, in_flight: int) -> None:
    """Raise a 429 when the key already has ``max_parallel_requests`` in flight."""
    if not acquired:
        raise RateLimitError(
            f"Max parallel request limit reached for API key {key.label}: "
            f"{in_flight} requests in flight, limit {key.max_parallel_requests}.",
            code="parallel_request_limit_exceeded",
        )
