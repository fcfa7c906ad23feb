"""Process settings, read from the environment (prefix ``EXTPROC_``).

These are about the process: where it listens, which policy file and store it uses,
how it fails. What the gateway enforces lives in the policy file (``extproc.policy``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["DEFAULT_POLICY", "Settings", "state_home"]

#: The example policy shipped with the package; `extproc up` runs on it.
DEFAULT_POLICY = Path(__file__).parent.parent / "data" / "example-policy.yaml"


def state_home() -> Path:
    """Where extproc keeps state between runs, by default: ``~/.local/state/extproc``."""
    return Path.home() / ".local" / "state" / "extproc"


_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


class Settings(BaseSettings):
    """Environment settings; every field can be set as ``EXTPROC_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="EXTPROC_", extra="ignore", frozen=True, populate_by_name=True
    )

    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=9190, ge=0, le=65535)
    policy_path: Path = DEFAULT_POLICY
    store_url: str = "memory://"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: What to do when the store cannot be reached: ``open`` lets requests through
    #: (counted in a metric), ``closed`` answers 503.
    fail_mode: Literal["open", "closed"] = "open"
    #: The request header Envoy's route reads as ``cluster_header``.
    cluster_header: str = "x-extproc-cluster"
    #: Headers read for the session id before the body's metadata.
    session_headers: Annotated[tuple[str, ...], NoDecode] = ("x-litellm-session-id",)
    tags_header: str = "x-litellm-tags"
    #: Paths with no endpoint spec: ``pass`` forwards them untouched, ``reject`` answers 404.
    unknown_paths: Literal["pass", "reject"] = "pass"
    #: Largest request body the server parses (Envoy's own buffer limit applies first).
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    #: Allow ``credential: {value: ...}`` in the policy; off so files hold no secret.
    allow_inline_credentials: bool = False
    #: How often the policy file is checked for changes (0 turns watching off;
    #: SIGHUP still reloads).
    policy_poll_s: float = Field(default=0.5, ge=0)
    #: Seconds in-flight streams get to finish on SIGTERM.
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    #: Seconds a stopping process at most keeps serving, NOT_SERVING, until every
    #: Envoy health-checking it has seen that (longer than Envoy's check interval).
    shutdown_notice_s: float = Field(default=3.0, ge=0)
    #: How long a max_parallel_requests lease lives at most (longer than Envoy's
    #: route timeout, 600 s): the bound on a slot leaked by a lost end-of-stream log.
    lease_ttl_s: float = Field(default=660.0, gt=0)
    #: How long a process's heartbeat lives in the store, and how often it beats: a
    #: process silent for longer is dead, and its leases and holds are given back.
    heartbeat_ttl_s: float = Field(default=3.0, gt=0)
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    #: Seconds a session's iteration counter lives, from its first call (LiteLLM's
    #: ``LITELLM_MAX_ITERATIONS_TTL`` is honoured when ours is not set).
    max_iterations_ttl: float = Field(
        default=3600.0,
        gt=0,
        validation_alias=AliasChoices("EXTPROC_MAX_ITERATIONS_TTL", "LITELLM_MAX_ITERATIONS_TTL"),
    )
    #: After a store failure, how long iteration caps count in process before the
    #: store is tried again.
    store_retry_s: float = Field(default=1.0, ge=0)
    #: Output tokens reserved against budgets for a call that names no max_tokens.
    default_max_tokens: int = Field(default=4096, gt=0)
    #: How long a budget reservation holds at most (longer than the route timeout):
    #: a process that dies mid-request cannot hold budget longer than this.
    reservation_ttl_s: float = Field(default=660.0, gt=0)
    #: Spend journal of the embedded store (settled spend survives restarts); empty
    #: turns it off. ``extproc up`` sets it to its own state directory.
    spend_journal: str = Field(default_factory=lambda: str(state_home() / "spend.jsonl"))
    #: Where a process keeps the store writes it still owes (settlements, cancels,
    #: counts the store did not acknowledge), one small file per process. None: an
    #: ``owed`` directory beside the spend journal (else in the state home); empty: off.
    owed_dir: str | None = None
    #: How long the store remembers that a reservation was settled or cancelled (and
    #: that a retried count was added): a retry within it never counts twice.
    settlement_marker_ttl_s: float = Field(default=900.0, gt=0)
    #: POSTed a JSON event when a soft budget (or ``alert_at`` share) is crossed.
    alert_webhook_url: str = ""
    #: How long a process reuses what it read about a group's deployments (cooldowns,
    #: latency, budget filter) before reading the store again; a local failure drops
    #: it at once. 0 reads on every call. least-busy and usage-based always read.
    routing_cache_s: float = Field(default=0.5, ge=0)
    #: Use uvloop when it is installed.
    uvloop: bool = True

    @field_validator("session_headers", mode="before")
    @classmethod
    def _split_headers(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(h.strip() for h in value.split(",") if h.strip())
        return value

    @field_validator("session_headers")
    @classmethod
    def _lower_headers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(h.lower() for h in value)
        for name in out:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"not a valid header name: {name!r}")
        return out

    @field_validator("cluster_header", "tags_header")
    @classmethod
    def _check_header(cls, value: str) -> str:
        value = value.lower()
        if not _HEADER_NAME.match(value):
            raise ValueError(f"not a valid header name: {value!r}")
        if value.startswith(("x-envoy-", ":")):
            raise ValueError("Envoy does not let ext_proc mutate x-envoy-* or pseudo headers")
        return value

    @model_validator(mode="after")
    def _beat_before_it_runs_out(self) -> Settings:
        if self.heartbeat_interval_s >= self.heartbeat_ttl_s:
            raise ValueError("heartbeat_interval_s must be shorter than heartbeat_ttl_s")
        return self

    @property
    def owed_directory(self) -> Path | None:
        """The directory of owed store writes (see ``owed_dir``)."""
        if self.owed_dir is not None:
            return Path(self.owed_dir).expanduser() if self.owed_dir else None
        if self.spend_journal:
            return Path(self.spend_journal).expanduser().parent / "owed"
        return state_home() / "owed"

    @property
    def grpc_address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"
