"""Prometheus metrics, created once per process as typed attributes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    """Every metric the server exports; labels never carry keys or free text."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "extproc_requests",
            "Requests decided, by endpoint, model group and outcome.",
            ["endpoint", "model_group", "outcome"],
            registry=self.registry,
        )
        self.routed = Counter(
            "extproc_routed",
            "Requests routed, by deployment.",
            ["model_group", "deployment"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "extproc_rejected",
            "Requests refused by the gateway, by status and error code.",
            ["status", "code"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "extproc_decision_seconds",
            "Time spent deciding one request, body parse included.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
            registry=self.registry,
        )
        self.streams_active = Gauge(
            "extproc_streams_active",
            "ext_proc streams open now.",
            registry=self.registry,
        )
        self.streams_cancelled = Counter(
            "extproc_streams_cancelled",
            "ext_proc streams that ended before their request was decided (client gone).",
            registry=self.registry,
        )
        self.internal_errors = Counter(
            "extproc_internal_errors",
            "Unexpected exceptions while handling a request (answered with a 500).",
            ["phase"],
            registry=self.registry,
        )
        self.fail_mode_used = Counter(
            "extproc_fail_mode",
            "Requests handled by the fail mode because the store failed.",
            ["mode"],
            registry=self.registry,
        )
        self.store_faults = Counter(
            "extproc_store_faults",
            "Calls refused (500) because the store answered with an error, by operation.",
            ["operation"],
            registry=self.registry,
        )
        self.soft_budget_alerts = Counter(
            "extproc_soft_budget_alerts",
            "Soft budgets crossed (one per budget and window), by budget kind.",
            ["kind"],
            registry=self.registry,
        )
        self.policy_reloads = Counter(
            "extproc_policy_reloads",
            "Policy reload attempts, by result.",
            ["result"],
            registry=self.registry,
        )
        self.access_log_entries = Counter(
            "extproc_access_log_entries",
            "Entries of Envoy's access-log stream: lease (a stream that ended holding a "
            "lease), attempt (a failover attempt that failed without a response).",
            ["kind"],
            registry=self.registry,
        )
        self.leases = Counter(
            "extproc_parallel_leases",
            "max_parallel_requests leases: acquired, released, release_failed, "
            "unknown (a logged token this server did not write), reaped (a dead "
            "process's, dropped to make room).",
            ["event"],
            registry=self.registry,
        )
        self.iterations_fallback = Counter(
            "extproc_iterations_fallback",
            "Session-cap counts made in process because the store failed.",
            registry=self.registry,
        )
        self.alert_webhooks = Counter(
            "extproc_alert_webhooks",
            "Budget alert webhook posts, by result (sent, refused, failed).",
            ["result"],
            registry=self.registry,
        )
        self.spend = Counter(
            "extproc_spend_dollars",
            "Dollars charged, by model group and deployment.",
            ["model_group", "deployment"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "extproc_tokens",
            "Tokens charged, by model group, deployment and kind "
            "(input, cached_input, cache_creation, output, reasoning).",
            ["model_group", "deployment", "kind"],
            registry=self.registry,
        )
        self.usage_missing = Counter(
            "extproc_usage_missing",
            "Successful responses without usage, charged by their estimate, by endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
        self.usage_clamped = Counter(
            "extproc_usage_clamped",
            "Responses whose usage reported more tokens than the call could produce "
            "(clamped to its context window plus its largest answers), by endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
        self.settlements = Counter(
            "extproc_settlements",
            "Budget reservations ended, by outcome (settled, cancelled, reaped: a dead "
            "process's hold given back; failed: the store did not acknowledge it, kept "
            "and retried, see extproc_settlement_retries_total).",
            ["outcome"],
            registry=self.registry,
        )
        self.settlements_pending = Gauge(
            "extproc_settlements_pending",
            "Store writes kept for retry because the store did not acknowledge them, by "
            "kind (settle, cancel, count: a session or tpm count).",
            ["kind"],
            registry=self.registry,
        )
        self.settlement_retries = Counter(
            "extproc_settlement_retries",
            "Retries of kept store writes, by kind and result (landed, unavailable, fault, "
            "expired: a count whose window had ended).",
            ["kind", "result"],
            registry=self.registry,
        )
        self.heartbeats = Counter(
            "extproc_heartbeats",
            "This process's heartbeats in the store, by result (ok, failed).",
            ["result"],
            registry=self.registry,
        )
        self.budget_remaining = Gauge(
            "extproc_budget_remaining_dollars",
            "Dollars left in provider, deployment and tag budgets (refreshed on scrape).",
            ["kind", "name"],
            registry=self.registry,
        )
        self.upstream_answers = Counter(
            "extproc_upstream_answers",
            "Upstream answers seen on the response path, by deployment and status.",
            ["deployment", "status"],
            registry=self.registry,
        )
        self.cooldowns = Counter(
            "extproc_cooldowns",
            "Deployments put into cooldown, by deployment.",
            ["deployment"],
            registry=self.registry,
        )
        self.cooling = Gauge(
            "extproc_deployment_cooling_down",
            "1 while a deployment is cooling down (refreshed on scrape).",
            ["deployment"],
            registry=self.registry,
        )
        self.memory_entries = Gauge(
            "extproc_memory_store_entries",
            "Entries held in process (refreshed on scrape): the embedded store and the "
            "session-cap counts kept while the store is down.",
            ["store"],
            registry=self.registry,
        )
        self.upstream_errors_normalized = Counter(
            "extproc_upstream_errors_normalized",
            "Upstream 4xx bodies rewritten to context_length_exceeded or content_policy_violation.",
            registry=self.registry,
        )
        self.credentials_redacted = Counter(
            "extproc_credentials_redacted",
            "Upstream responses that echoed a deployment credential, redacted, by where.",
            ["where"],
            registry=self.registry,
        )
        self.content_policy_retries = Counter(
            "extproc_content_policy_retries",
            "Content-policy refusals moved on to a content-policy fallback in the same call.",
            registry=self.registry,
        )
