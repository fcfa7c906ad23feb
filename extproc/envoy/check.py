"""``extproc check``: validate a policy and cross-check it against an Envoy config."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from extproc.core.endpoints import ENDPOINTS
from extproc.core.failover import HOP_CLUSTER, sub_clusters
from extproc.core.providers import ANTHROPIC_API, OPENAI_COMPATIBLE, model_prefix_provider
from extproc.policy import CompiledPolicy
from extproc.state.settings import Settings

__all__ = ["CheckReport", "check_envoy_config", "policy_warnings"]

_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_GRPC_ACCESS_LOG = (
    "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
)
_EARLY_MUTATION = (
    "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3."
    "HeaderMutation"
)


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _cluster_ports(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    out = []
    for node in _walk(cluster.get("load_assignment", {})):
        sock = node.get("socket_address")
        if isinstance(sock, dict):
            out.append((str(sock.get("address")), int(sock.get("port_value", 0))))
    return out


def _check_response_meters(gates: list[dict[str, Any]], report: CheckReport) -> list[Any]:
    """Behind ext_authz, the response-only ext_proc filter that settles spend."""
    has_authz = any(g["@type"] == _EXT_AUTHZ for g in gates)
    meters = [
        g
        for g in gates
        if has_authz
        and g["@type"] == _EXT_PROC
        and (g.get("processing_mode") or {}).get("request_header_mode") == "SKIP"
    ]
    if has_authz and not meters:
        report.warnings.append(
            "ext_authz without a response-only ext_proc filter: usage is not read, so "
            "spend is never charged (reservations run out after EXTPROC_RESERVATION_TTL_S)"
        )
    for meter in meters:
        forwarded = (meter.get("metadata_options") or {}).get("forwarding_namespaces") or {}
        if "envoy.filters.http.ext_authz" not in (forwarded.get("untyped") or []):
            report.errors.append(
                "the response ext_proc filter must forward the envoy.filters.http.ext_authz "
                "metadata namespace (metadata_options.forwarding_namespaces.untyped)"
            )
    return meters


def _check_lease_log(
    typed: list[dict[str, Any]], policy: CompiledPolicy, report: CheckReport
) -> None:
    if any(k.max_parallel_requests for k in policy.directory.keys.values()):
        loggers = [n for n in typed if n["@type"] == _GRPC_ACCESS_LOG]
        if not any("envoy_grpc" in str(n.get("common_config")) for n in loggers):
            report.errors.append(
                "keys use max_parallel_requests, but no http_grpc access logger sends "
                "stream ends to the server: leases would only be freed by their TTL"
            )


def _check_failover(clusters: dict[str, Any], policy: CompiledPolicy, report: CheckReport) -> None:
    missing = sorted(r.composite for r in policy.failover.values() if r.composite not in clusters)
    if missing:
        report.errors.append(
            f"the policy fails over through {len(missing)} composite cluster(s) the Envoy "
            f"config does not define (e.g. {missing[0]}): regenerate it with "
            "`extproc envoy-config`"
        )
    # Rule: a composite's attempt order is the one the server expects (a dynamic
    # route's retries through the hop listener, a static one's in the plan's order);
    # a config made for another policy would send retries to the wrong list
    stale = sorted(
        r.composite
        for r in policy.failover.values()
        if r.composite in clusters and _sub_clusters(clusters[r.composite]) != sub_clusters(r)
    )
    if stale:
        report.errors.append(
            f"{len(stale)} composite cluster(s) list other attempts than the policy's "
            f"failover plan (e.g. {stale[0]}): regenerate the config with `extproc envoy-config`"
        )
    limited = sorted(
        r.composite
        for r in policy.failover.values()
        if r.composite in clusters and "max_retries" not in str(clusters[r.composite])
    )
    if limited:
        report.warnings.append(
            f"{len(limited)} composite cluster(s) keep Envoy's default circuit breaker of 3 "
            f"concurrent retries (e.g. {limited[0]}): under load retries are dropped; "
            "regenerate the config"
        )
    if any(r.dynamic for r in policy.failover.values()) and HOP_CLUSTER not in clusters:
        report.errors.append(
            f"the policy has fallbacks by error class but the Envoy config has no "
            f"{HOP_CLUSTER} cluster (its internal hop listener): regenerate it"
        )


def _sub_clusters(cluster: Any) -> list[str]:
    typed = (cluster.get("cluster_type") or {}).get("typed_config") or {}
    return [c.get("name", "") for c in typed.get("clusters") or [] if isinstance(c, dict)]


def _check_routes(config: dict[str, Any], header: str, report: CheckReport) -> None:
    """Routes send by the routing header, adding the /v1 prefix LLM paths may lack."""
    routed = [
        n["route"]
        for n in _walk(config)
        if isinstance(n.get("route"), dict) and n["route"].get("cluster_header") == header
    ]
    if not routed:
        report.errors.append(f"no route uses cluster_header: {header}")
    unprefixed = [r for r in routed if not r.get("regex_rewrite")]
    if unprefixed:
        report.warnings.append(
            f"{len(unprefixed)} route(s) using cluster_header {header} have no regex_rewrite: "
            "LLM paths sent without /v1 (/chat/completions) reach the upstream as sent; "
            "`extproc envoy-config` renders the rewrite"
        )


def policy_warnings(policy: CompiledPolicy) -> list[str]:
    """What in a valid policy is probably not what its author meant."""
    out: list[str] = []
    for dep in policy.deployments():
        named = model_prefix_provider(dep.model)
        # LiteLLM's openai/<model> is any OpenAI-compatible host
        compatible = named == "openai" and dep.api == "openai"
        if named is not None and named != dep.provider and not compatible:
            out.append(
                f"deployment {dep.id!r}: model {dep.model!r} names provider {named!r}, but "
                f"its provider is {dep.provider!r}: it is called like {dep.provider!r} "
                f"(credential header, path); set provider: {named}"
            )
        if dep.provider not in OPENAI_COMPATIBLE | ANTHROPIC_API:
            out.append(
                f"deployment {dep.id!r}: provider {dep.provider!r} is not one the gateway "
                "knows; it is called as an OpenAI-compatible API (Authorization: Bearer, "
                "OpenAI's paths)"
            )
    for dep_id, route in sorted(policy.failover.items()):
        reached = {d.api for i, _ in route.deployments() if (d := policy.deployment(i)) is not None}
        if len(reached) > 1:
            out.append(
                f"deployment {dep_id!r}: its failover route reaches deployments of both "
                "APIs (a fallback group of the other): under ext_proc a retry there is "
                "translated, but under ext_authz, and for endpoints other than chat "
                "completions and messages, its calls are not failed over in the request"
            )
    for group in policy.groups.values():
        apis = {d.api for d in group.deployments}
        if len(apis) > 1:
            # chat completions and messages translate into each other (ext_proc only);
            # the other endpoints go only to deployments of their own API
            alone = sorted({spec.name for spec in ENDPOINTS.values() if spec.translates_to is None})
            out.append(
                f"group {group.name!r} mixes Anthropic and OpenAI deployments: "
                "chat_completions and messages calls are translated for a deployment of "
                "the other API under ext_proc, but under ext_authz go only to deployments "
                f"of their own API; {', '.join(alone)} calls go only to deployments of "
                "their own API"
            )
    return out


def _check_hosts(
    clusters: dict[str, Any], config: dict[str, Any], policy: CompiledPolicy, report: CheckReport
) -> None:
    """A DNS upstream (a provider) must get its own Host, and a TLS one be verified."""
    used = {d.cluster for d in policy.deployments()}
    routes = [
        n["route"]
        for n in _walk(config)
        if isinstance(n.get("route"), dict) and "cluster_header" in n["route"]
    ]
    rewrites = bool(routes) and all(
        any(k in r for k in ("auto_host_rewrite", "host_rewrite_literal", "host_rewrite_header"))
        for r in routes
    )
    for dep in policy.deployments():
        base, cluster = dep.api_base, clusters.get(dep.cluster)
        if base is None or cluster is None:
            continue
        has_tls = "UpstreamTlsContext" in str(cluster.get("transport_socket") or {})
        if (base.host, base.port) not in _cluster_ports(cluster) or has_tls != base.tls:
            report.warnings.append(
                f"deployment {dep.id!r} names api_base {base.scheme}://{base.host}:"
                f"{base.port}, but cluster {dep.cluster!r} goes elsewhere or "
                f"{'without' if base.tls else 'with'} TLS: regenerate the config"
            )
    for name in sorted(used & clusters.keys()):
        cluster = clusters[name]
        dns = cluster.get("type") in ("LOGICAL_DNS", "STRICT_DNS")
        if dns and not rewrites:
            report.warnings.append(
                f"cluster {name!r} is a DNS upstream, but not every route rewrites Host "
                "(auto_host_rewrite): the provider gets the gateway's own Host header"
            )
        tls = cluster.get("transport_socket") or {}
        if "UpstreamTlsContext" in str(tls.get("typed_config", {}).get("@type", "")):
            validation = (tls["typed_config"].get("common_tls_context") or {}).get(
                "validation_context"
            ) or {}
            if not validation.get("trusted_ca"):
                report.warnings.append(
                    f"cluster {name!r} uses TLS without a trusted_ca: Envoy does not verify "
                    "the upstream's certificate"
                )


def check_envoy_config(text: str, policy: CompiledPolicy, settings: Settings) -> CheckReport:
    """Errors that would break routing, and warnings that weaken it."""
    report = CheckReport()
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        report.errors.append(f"the Envoy config is not valid YAML: {exc}")
        return report
    if not isinstance(config, dict):
        report.errors.append("the Envoy config must be a YAML mapping")
        return report
    clusters = {
        c["name"]: c
        for c in (config.get("static_resources") or {}).get("clusters") or []
        if isinstance(c, dict) and "name" in c
    }
    for dep in policy.deployments():
        if dep.cluster not in clusters:
            report.errors.append(
                f"deployment {dep.id!r} (group {dep.group!r}) names cluster {dep.cluster!r}, "
                "which the Envoy config does not define"
            )
    typed = [n for n in _walk(config) if isinstance(n.get("@type"), str)]
    # the per-attempt filters of failover clusters are not gates (see _check_failover)
    gates = [
        n
        for n in typed
        if n["@type"] in (_EXT_PROC, _EXT_AUTHZ)
        and "xds.upstream_host_metadata" not in (n.get("request_attributes") or [])
    ]
    if not gates:
        report.errors.append("no ext_proc or ext_authz HTTP filter in the Envoy config")
    meters = _check_response_meters(gates, report)
    for gate in (g for g in gates if not any(g is m for m in meters)):
        kind = "ext_proc" if gate["@type"] == _EXT_PROC else "ext_authz"
        target = ((gate.get("grpc_service") or {}).get("envoy_grpc") or {}).get("cluster_name")
        if target not in clusters:
            report.errors.append(
                f"the {kind} filter's grpc_service cluster {target!r} is not defined"
            )
        else:
            ports = _cluster_ports(clusters[target])
            if ports and all(port != settings.grpc_port for _, port in ports):
                report.errors.append(
                    f"the {kind} filter points at {ports}, but this server listens on "
                    f"port {settings.grpc_port} (EXTPROC_GRPC_PORT)"
                )
            proto = clusters[target].get("typed_extension_protocol_options") or {}
            if "http2_protocol_options" not in str(proto):
                report.errors.append(f"cluster {target!r} must use HTTP/2 for gRPC")
        if kind == "ext_proc":
            mode = gate.get("processing_mode") or {}
            if mode.get("request_header_mode", "SEND") != "SEND":
                report.errors.append("ext_proc request_header_mode must be SEND")
            if mode.get("request_body_mode") not in ("BUFFERED",):
                report.errors.append(
                    "ext_proc request_body_mode must be BUFFERED to rewrite the model"
                )
            if gate.get("failure_mode_allow"):
                report.warnings.append(
                    "ext_proc failure_mode_allow is true: requests pass unrouted while "
                    "the server is down"
                )
        else:
            if "with_request_body" not in gate:
                report.errors.append("ext_authz needs with_request_body to read the model")
            for dep in policy.deployments():
                if dep.model != dep.group:
                    report.warnings.append(
                        f"ext_authz cannot rewrite the body: deployment {dep.id!r} will "
                        f"receive model {dep.group!r}, not {dep.model!r}"
                    )
    _check_lease_log(typed, policy, report)
    _check_failover(clusters, policy, report)
    _check_hosts(clusters, config, policy, report)
    header = settings.cluster_header
    _check_routes(config, header, report)
    strips = any(n["@type"] == _EARLY_MUTATION and header in str(n.get("mutations")) for n in typed)
    if not strips:
        report.errors.append(
            f"no early_header_mutation_extensions entry removes {header} from client "
            "requests: a client could pick the cluster while the server is down"
        )
    return report
