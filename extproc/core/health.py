"""Deployment health and load, shared by every server process through the store.

Per deployment (keys hash-tagged ``{dep:<id>}`` so each deployment's keys share a
Redis Cluster slot): a cooldown flag with a TTL, this minute's request and failure
counts, rpm/tpm counters for usage-based routing, an in-flight counter for least-busy,
and the last latency samples for latency-based routing.

Cooldown rules are LiteLLM's (``router_utils/cooldown_handlers.py``):

- a 429 cools a deployment of a group with more than one deployment;
- more than 50% failures in the current minute, with at least 5 requests, does too
  (more than one deployment);
- so do more than ``allowed_fails`` failures in the minute (more than one deployment);
- 401, 404 and 408 are not worth retrying: they cool even a lone deployment;
- any other 4xx never cools (the caller's fault, not the deployment's);
- ``cooldown_time`` 0 turns cooldowns off for a deployment.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from extproc.store.keys import store_key

__all__ = [
    "DeploymentState",
    "HealthSample",
    "cooldown_key",
    "cooldown_reason",
    "counts_as_failure",
    "inflight_key",
    "latency_key",
    "minute_key",
    "ttft_key",
]

#: Latency samples kept per deployment (LiteLLM averages the last 10).
SAMPLES = 10
_NON_RETRYABLE = frozenset({401, 404, 408})
FAILURE_RATE = 0.5
MIN_REQUESTS_FOR_RATE = 5


def _key(dep: str, *parts: str) -> str:
    return store_key(("dep", dep), *parts)


def cooldown_key(dep: str) -> str:
    return _key(dep, "cooldown")


def minute_key(dep: str, minute: int, what: str) -> str:
    """``what``: req, fail, rpm, tpm — counters of one clock minute."""
    return _key(dep, f"m{minute}", what)


def inflight_key(dep: str) -> str:
    return _key(dep, "inflight")


def latency_key(dep: str) -> str:
    return _key(dep, "latency")


def ttft_key(dep: str) -> str:
    return _key(dep, "ttft")


def counts_as_failure(status: int) -> bool:
    """Failures for cooldown purposes: 429, 5xx (connect failures arrive as Envoy's
    503) and the non-retryable 401/404/408."""
    return status == 429 or status >= 500 or status in _NON_RETRYABLE


def cooldown_reason(
    status: int, *, group_size: int, failures: int, requests: int, allowed_fails: int
) -> str | None:
    """Why a deployment that just answered ``status`` should cool down, or None.

    ``failures`` and ``requests`` are this minute's counts, this answer included.
    """
    if status in _NON_RETRYABLE:
        return f"non-retryable {status}"
    if not counts_as_failure(status) or group_size < 2:
        return None
    if status == 429:
        return "rate limited (429)"
    if requests >= MIN_REQUESTS_FOR_RATE and failures / requests > FAILURE_RATE:
        return f"{failures} of {requests} requests failed this minute"
    if failures > allowed_fails:
        return f"{failures} failures this minute (allowed_fails {allowed_fails})"
    return None


@dataclass(frozen=True, slots=True)
class DeploymentState:
    """What the store says about one deployment right now."""

    cooling_s: float | None = None
    inflight: int = 0
    rpm: int = 0
    tpm: int = 0
    latency: Sequence[float] = field(default_factory=tuple)
    ttft: Sequence[float] = field(default_factory=tuple)

    def mean_latency(self, *, stream: bool) -> float | None:
        samples = self.ttft if stream and self.ttft else self.latency
        return statistics.fmean(samples) if samples else None


@dataclass(frozen=True, slots=True)
class HealthSample:
    """What one answer teaches about a deployment's health, to record in the store.

    ``status`` None: only a time-to-first-token sample (a failover call's first byte,
    whose status its attempt already counted)."""

    deployment: str
    status: int | None = None
    #: Seconds from admission to the response headers (streams only).
    ttft_s: float | None = None
