"""Render the Envoy configuration that puts this server in front of a policy's clusters.

The committed files in ``envoy/`` are this module's output for the example policy
(a test keeps them in step). The shape, and why:

* an early header mutation strips any client-sent routing header before Envoy first
  picks a route, so a client can never pick the cluster, whatever happens to the
  server afterwards (a header_mutation filter would be too late: the route is cached
  before filters run);
* ext_proc with request headers SEND and request body BUFFERED, response phases off:
  two messages per LLM request, the minimum that can rewrite the body and still see
  the caller's headers (``request_attributes`` carry no header values);
* routes: a request carrying the routing header goes to that cluster, an LLM path
  sent without the ``/v1`` prefix rewritten to it (query kept); an LLM path without
  the header (the server was down and Envoy failed open) gets a 503, anything else a
  404, both as OpenAI-style JSON;
* ``local_reply_config`` turns local 413 and 5xx replies (ext_proc failure, no
  healthy upstream) into OpenAI-style JSON.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from extproc.core.endpoints import API_PREFIX, ENDPOINT_PATHS, MODELS_PATH
from extproc.core.errors import ERROR_HEADER
from extproc.core.failover import (
    ATTEMPT_CLUSTER_HEADER,
    ATTEMPT_COUNT_HEADER,
    ATTEMPT_NUMBER_HEADER,
    CALL_HEADER,
    HOP_CLUSTER,
    HOP_DEPLOYMENT,
    HOP_LISTENER,
    RETRIABLE_STATUSES,
    STOP_HEADER,
    STREAM_HEADER,
    FailoverRoute,
    deployment_cluster_name,
    sub_clusters,
)
from extproc.core.leases import (
    AUTHZ_NAMESPACE,
    ITERATIONS_LIMIT_FIELD,
    ITERATIONS_REMAINING_FIELD,
    LEASE_FIELD,
    LEASE_NAMESPACE,
)
from extproc.core.sessions import LIMIT_HEADER, REMAINING_HEADER

__all__ = ["LLM_PATH_REGEX", "MODELS_PATH_REGEX", "Upstream", "render_envoy_config"]

_PATHS = "|".join(re.escape(path.removeprefix("/")) for path in ENDPOINT_PATHS)
_PREFIX = re.escape(API_PREFIX.removeprefix("/"))

#: The paths the server parses (see ``endpoints.py``), as one RE2 regex.
LLM_PATH_REGEX = rf"^/({_PREFIX}/)?({_PATHS})/?(\?.*)?$"

#: The model list the server answers itself (``GET /v1/models``, ``/v1/models/{id}``).
MODELS_PATH_REGEX = rf"^/({_PREFIX}/)?{re.escape(MODELS_PATH.removeprefix('/'))}(/.*)?(\?.*)?$"


#: Rule: an LLM path sent without the prefix reaches the upstream with it (the server
#: accepts both; providers serve only ``/v1/...``). Envoy's regex_rewrite sees the path
#: without its query string and keeps the query.
def _add_prefix() -> dict[str, Any]:
    return {"pattern": {"regex": rf"^/({_PATHS})/?$"}, "substitution": rf"{API_PREFIX}/\1"}


_TYPE = "@type"
_API = "type.googleapis.com/envoy."
_EXTPROC_CLUSTER = "extproc"


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where an Envoy cluster sends traffic."""

    host: str
    port: int
    tls: bool = False
    #: The CA bundle a TLS upstream's certificate is checked against (None: the
    #: system's, :func:`system_ca_file`).
    ca_file: str | None = None

    @property
    def authority(self) -> str:
        """The Host header it gets (``auto_host_rewrite``): its host, and its port
        unless the scheme's own."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.tls else 80) else f"{host}:{self.port}"


#: Where distributions keep the system's CA bundle (Debian/Ubuntu/Alpine, Fedora/RHEL,
#: openSUSE, macOS/BSD).
_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
)


def system_ca_file() -> str:
    """The system's CA bundle; a ValueError when there is none (pass one instead)."""
    import os  # noqa: PLC0415 - only while rendering

    for path in _CA_FILES:
        if os.path.isfile(path):
            return path
    raise ValueError("no system CA bundle found for TLS upstreams; pass one with --upstream-ca")


def _error_json(message: str, err_type: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


def _json_body(message: str, err_type: str, code: str) -> str:
    import json  # noqa: PLC0415 - only while rendering

    return json.dumps(_error_json(message, err_type, code))


def _error_route(
    match: dict[str, Any], status: int, message: str, err_type: str, code: str
) -> dict[str, Any]:
    """A route Envoy answers itself with an OpenAI-style error."""
    return {
        "match": match,
        "direct_response": {
            "status": status,
            "body": {"inline_string": _json_body(message, err_type, code)},
        },
        "response_headers_to_add": [
            {"header": {"key": ERROR_HEADER, "value": code}},
            {"header": {"key": "content-type", "value": "application/json"}},
        ],
    }


def _cluster(name: str, upstream: Upstream, *, http2: bool = False) -> dict[str, Any]:
    try:
        ipaddress.ip_address(upstream.host)
        discovery = "STATIC"
    except ValueError:
        discovery = "LOGICAL_DNS"
    cluster: dict[str, Any] = {
        "name": name,
        "type": discovery,
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": upstream.host,
                                        "port_value": upstream.port,
                                    }
                                },
                                # Rule: the Host every attempt to it gets (routes
                                # rewrite Host to it), a retry's too
                                "hostname": upstream.authority,
                            }
                        }
                    ]
                }
            ],
        },
    }
    if discovery == "LOGICAL_DNS":
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                _TYPE: _API + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    if upstream.tls:
        try:
            ipaddress.ip_address(upstream.host)
            san, sni = "IP_ADDRESS", {}  # no SNI for an address (RFC 6066)
        except ValueError:
            san, sni = "DNS", {"sni": upstream.host}
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                _TYPE: _API + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                **sni,
                # Rule: a TLS upstream proves it is the host: a certificate of a
                # trusted CA that names it
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": upstream.ca_file or system_ca_file()},
                        "match_typed_subject_alt_names": [
                            {"san_type": san, "matcher": {"exact": upstream.host}}
                        ],
                    }
                },
            },
        }
    return cluster


def _extproc_cluster(
    upstream: Upstream, service: str, extra: Sequence[Upstream] = ()
) -> dict[str, Any]:
    cluster = _cluster(_EXTPROC_CLUSTER, upstream, http2=True)
    # Several server processes (one per core) are endpoints of the one cluster.
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    for more in extra:
        endpoints.append(
            {
                "endpoint": {
                    "address": {"socket_address": {"address": more.host, "port_value": more.port}}
                }
            }
        )
    # Rule: a server process that turns NOT_SERVING (it is stopping) leaves load
    # balancing on the next check's answer; it keeps serving for up to
    # EXTPROC_SHUTDOWN_NOTICE_S (3 s) waiting for that answer, so the interval is
    # shorter. The threshold counts only timeouts and refused connections.
    cluster["health_checks"] = [
        {
            "timeout": "1s",
            "interval": "1s",
            "no_traffic_interval": "1s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": service},
        }
    ]
    # One stream per in-flight request: the default 1024 would cap concurrency.
    limit = 100_000
    cluster["circuit_breakers"] = {
        "thresholds": [
            {"max_connections": limit, "max_pending_requests": limit, "max_requests": limit}
        ]
    }
    return cluster


def _ext_proc(request_header: str, request_body: str, **options: Any) -> dict[str, Any]:
    """An ext_proc filter talking to the server. Response headers are always sent: the
    server switches the response body on (``mode_override``) only when it must read it."""
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            _TYPE: _API + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": _EXTPROC_CLUSTER}, "timeout": "5s"},
            "message_timeout": "2s",
            "allow_mode_override": True,
            **options,
            "processing_mode": {
                "request_header_mode": request_header,
                "request_body_mode": request_body,
                "request_trailer_mode": "SKIP",
                "response_header_mode": "SEND",
                "response_body_mode": "NONE",
                "response_trailer_mode": "SKIP",
            },
        },
    }


def _ext_proc_filter(failure_mode_allow: bool, max_body: int) -> dict[str, Any]:
    del max_body  # the buffer limit is the listener's per_connection_buffer_limit_bytes
    return _ext_proc(
        "SEND",
        "BUFFERED",
        failure_mode_allow=failure_mode_allow,
        # Server unreachable or too slow with failure_mode_allow off: 503, not 500.
        status_on_error={"code": 503},
        # The server's parallel-request lease and session counts ride in this namespace
        # to the access log and response headers; other namespaces are dropped.
        metadata_options={"receiving_namespaces": {"untyped": [LEASE_NAMESPACE]}},
    )


def _response_meter_filter() -> dict[str, Any]:
    """Behind ext_authz: an ext_proc filter for the response only, which reads usage and
    settles the charge the Check left in the ext_authz filter's dynamic metadata."""
    return _ext_proc(
        "SKIP",
        "NONE",
        # Accounting never fails a call: if the server is gone, the response passes.
        failure_mode_allow=True,
        metadata_options={"forwarding_namespaces": {"untyped": [AUTHZ_NAMESPACE]}},
    )


def _ext_authz_filter(failure_mode_allow: bool, max_body: int) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            _TYPE: _API + "extensions.filters.http.ext_authz.v3.ExtAuthz",
            "grpc_service": {"envoy_grpc": {"cluster_name": _EXTPROC_CLUSTER}, "timeout": "2s"},
            "transport_api_version": "V3",
            "failure_mode_allow": failure_mode_allow,
            "clear_route_cache": True,
            "status_on_error": {"code": 503},
            "with_request_body": {
                "max_request_bytes": max_body,
                "allow_partial_message": False,
                "pack_as_bytes": True,
            },
        },
    }


#: Envoy retries an attempt that got one of these (never once response bytes left).
RETRY_ON = "5xx,reset,connect-failure,retriable-status-codes"


def _attempt_filter() -> dict[str, Any]:
    """The upstream ext_proc filter of a composite cluster: it runs once per attempt
    and gives the attempt its deployment's credentials and model name."""
    return _ext_proc(
        "SEND",
        "NONE",
        status_on_error={"code": 503},
        # which deployment this attempt goes to (its endpoint's metadata)
        request_attributes=["xds.upstream_host_metadata"],
        # Envoy's attempt count is removed from attempts and x-envoy-ratelimited set on
        # an answer that must not be retried (see failover); other x-envoy-* headers
        # are never touched
        mutation_rules={"allow_envoy": True},
    )


def _failover(
    plan: Mapping[str, FailoverRoute],
    clusters: Mapping[str, Upstream],
    cluster_header: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Routes (one per composite cluster, retrying as many times as it has attempts)
    and clusters (per-deployment copies with metadata, and the composites)."""
    routes: list[dict[str, Any]] = []
    out: dict[str, dict[str, Any]] = {}
    for route in sorted(plan.values(), key=lambda r: r.composite):
        for dep_id, cluster in route.deployments():
            name = deployment_cluster_name(dep_id)
            if name not in out and cluster in clusters:
                copy = _cluster(name, clusters[cluster])
                endpoint = copy["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
                endpoint["metadata"] = {
                    "filter_metadata": {LEASE_NAMESPACE: {"deployment": dep_id}}
                }
                out[name] = copy
        # a dynamic route's first attempt goes straight to its deployment, every
        # retry through the hop listener, to the deployment its attempt filter picks
        names = sub_clusters(route)
        if route.dynamic:
            out.setdefault(HOP_CLUSTER, _hop_cluster())
        out[route.composite] = {
            "name": route.composite,
            "connect_timeout": "2s",
            "lb_policy": "CLUSTER_PROVIDED",
            # Rule: Envoy's default allows 3 concurrent retries per cluster; past them
            # a retry is dropped and the client gets the failed attempt's answer
            "circuit_breakers": _NO_LIMITS,
            "cluster_type": {
                "name": "envoy.clusters.composite",
                "typed_config": {
                    _TYPE: _API + "extensions.clusters.composite.v3.ClusterConfig",
                    "clusters": [{"name": n} for n in names],
                },
            },
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    _TYPE: _API + "extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {}},
                    "http_filters": [
                        _attempt_filter(),
                        {
                            "name": "envoy.filters.http.upstream_codec",
                            "typed_config": {
                                _TYPE: _API + "extensions.filters.http.upstream_codec.v3."
                                "UpstreamCodec"
                            },
                        },
                    ],
                }
            },
        }
        routes += _failover_routes(route, cluster_header)
    return routes, list(out.values())


#: Circuit breakers out of the way (Envoy's defaults: 1024 connections, 3 retries):
#: the gateway's own limits (rpm, tpm, parallel requests) decide.
_NO_LIMITS = {
    "thresholds": [
        {
            "max_connections": 100_000,
            "max_pending_requests": 100_000,
            "max_requests": 100_000,
            "max_retries": 100_000,
        }
    ]
}


def _hop_cluster() -> dict[str, Any]:
    """The cluster of a dynamic route's retries: Envoy's internal hop listener."""
    return {
        "name": HOP_CLUSTER,
        "connect_timeout": "2s",
        "circuit_breakers": _NO_LIMITS,
        "load_assignment": {
            "cluster_name": HOP_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "envoy_internal_address": {"server_listener_name": HOP_LISTENER}
                                }
                            },
                            "metadata": {
                                "filter_metadata": {LEASE_NAMESPACE: {"deployment": HOP_DEPLOYMENT}}
                            },
                        }
                    ]
                }
            ],
        },
    }


def _hop_listener(max_body_bytes: int) -> dict[str, Any]:
    """The internal listener a dynamic route's retries pass through: it sends each to
    the per-deployment cluster its attempt filter named, and nothing else. Timeouts
    and retries stay with the outer route."""
    hcm = {
        _TYPE: _API + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hop",
        "codec_type": "AUTO",
        "stream_idle_timeout": "0s",
        # its own failures (a reset, a refused connection) as OpenAI-style JSON too
        "local_reply_config": _local_reply_config(),
        "server_header_transformation": "PASS_THROUGH",
        "route_config": {
            "name": "hop",
            "virtual_hosts": [
                {
                    "name": "hop",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {
                                "cluster_header": ATTEMPT_CLUSTER_HEADER,
                                "timeout": "0s",
                                "auto_host_rewrite": True,
                            },
                            "request_headers_to_remove": [
                                ATTEMPT_CLUSTER_HEADER,
                                ATTEMPT_NUMBER_HEADER,
                                ATTEMPT_COUNT_HEADER,
                            ],
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {_TYPE: _API + "extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "name": HOP_LISTENER,
        "internal_listener": {},
        "per_connection_buffer_limit_bytes": max_body_bytes,
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") + "s"


def _failover_routes(route: FailoverRoute, cluster_header: str) -> list[dict[str, Any]]:
    """The routes of one composite cluster: for streams (the server marks them) when
    it has a stream timeout, then for every call.

    Rule: a timeout is Envoy's ``per_try_timeout``, the wait for an attempt's
    response headers (Envoy ignores it once the response has started), and an
    attempt that times out is retried like a 5xx. A stream's timeout is also its
    ``per_try_idle_timeout``, the longest gap between bytes, which keeps running while
    the stream flows (a stall then ends the stream: its bytes have left)."""
    match_composite = {"name": cluster_header, "string_match": {"exact": route.composite}}

    def one(headers: list[dict[str, Any]], timeout: float | None, idle: bool) -> dict[str, Any]:
        retry: dict[str, Any] = {
            "retry_on": RETRY_ON,
            "retriable_status_codes": list(RETRIABLE_STATUSES),
            "num_retries": route.retries,
        }
        if timeout is not None:
            retry["per_try_timeout"] = _seconds(timeout)
            if idle:
                retry["per_try_idle_timeout"] = _seconds(timeout)
        out: dict[str, Any] = {
            "match": {"prefix": "/", "headers": headers},
            "route": {
                "cluster_header": cluster_header,
                "timeout": "600s",
                "regex_rewrite": _add_prefix(),
                # a DNS upstream gets its own host name as Host (a provider's), not
                # the gateway's
                "auto_host_rewrite": True,
                "retry_policy": retry,
            },
        }
        if route.dynamic:
            # the attempt filter's mark that nothing is left to try (see failover)
            out["response_headers_to_remove"] = [STOP_HEADER]
        return out

    routes = []
    stream = route.timeouts.stream
    if stream is not None:
        marked = {"name": STREAM_HEADER, "present_match": True}
        routes.append(one([match_composite, marked], stream, idle=True))
    routes.append(one([match_composite], route.timeouts.timeout, idle=False))
    return routes


#: The access-log name of failed connection attempts (see _router).
ATTEMPT_LOG = "extproc-attempts"


def _router(failover: bool, dynamic: bool = False) -> dict[str, Any]:
    """The router; with failover clusters it logs attempts that could not connect.

    An attempt refused at connect time never runs the composite cluster's upstream
    filters, and one that is reset or times out (or stalls past its idle timeout) gets
    no response for them to see: the router's ``upstream_log`` (once per attempt)
    sends those to the server's access-log service, which counts them for the
    deployment's health, a timeout as a 408 (unless the client went away first: that
    is not the deployment's fault).
    """
    router: dict[str, Any] = {_TYPE: _API + "extensions.filters.http.router.v3.Router"}
    if failover:
        router["upstream_log"] = [
            {
                "name": "envoy.access_loggers.http_grpc",
                # connect failure, overflow, reset, connection termination, timeout,
                # idle timeout
                "filter": {"response_flag_filter": {"flags": ["UF", "UO", "UR", "UC", "UT", "SI"]}},
                "typed_config": {
                    _TYPE: _API + "extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                    "common_config": {
                        "log_name": ATTEMPT_LOG,
                        "grpc_service": {"envoy_grpc": {"cluster_name": _EXTPROC_CLUSTER}},
                        "transport_api_version": "V3",
                        "buffer_size_bytes": 0,
                        "buffer_flush_interval": "0.1s",
                    },
                    # a retry through the hop listener: the deployment its filter sent it
                    # to, and the attempt that was (the header outlives its attempt)
                    **(
                        {
                            "additional_request_headers_to_log": [
                                ATTEMPT_CLUSTER_HEADER,
                                ATTEMPT_NUMBER_HEADER,
                                ATTEMPT_COUNT_HEADER,
                            ]
                        }
                        if dynamic
                        else {}
                    ),
                },
            }
        ]
    return router


def _lease_access_log(mode: str) -> dict[str, Any]:
    """Send the end of every stream that holds a parallel-request lease to the server.

    Access logs run once the stream is over, however it ended (done, client gone,
    upstream reset, timeout), so this is where a lease is given back. Only streams
    still carrying a lease are logged (a non-empty one: the ext_proc server empties it
    when it gave the lease back itself, at the end of a metered response);
    ``buffer_size_bytes: 0`` sends each entry at once.
    """
    namespace = LEASE_NAMESPACE if mode == "ext_proc" else AUTHZ_NAMESPACE
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {
            "metadata_filter": {
                "matcher": {
                    "filter": namespace,
                    "path": [{"key": LEASE_FIELD}],
                    "value": {"string_match": {"safe_regex": {"regex": ".+"}}},
                },
                "match_if_key_not_found": False,
            }
        },
        "typed_config": {
            _TYPE: _API + "extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": "extproc-leases",
                "grpc_service": {"envoy_grpc": {"cluster_name": _EXTPROC_CLUSTER}},
                "transport_api_version": "V3",
                "buffer_size_bytes": 0,
                "buffer_flush_interval": "0.1s",
            },
        },
    }


def _session_headers(mode: str) -> list[dict[str, Any]]:
    """A capped session's count, from the server's dynamic metadata, on the response.

    Empty when the request had no cap (no metadata), and then not added. The server's
    own 429 carries the headers itself.
    """
    namespace = LEASE_NAMESPACE if mode == "ext_proc" else AUTHZ_NAMESPACE
    return [
        {
            "header": {"key": header, "value": f"%DYNAMIC_METADATA({namespace}:{field})%"},
            "append_action": "ADD_IF_ABSENT",
            "keep_empty_value": False,
        }
        for header, field in (
            (LIMIT_HEADER, ITERATIONS_LIMIT_FIELD),
            (REMAINING_HEADER, ITERATIONS_REMAINING_FIELD),
        )
    ]


def _local_reply_config() -> dict[str, Any]:
    """Every local reply of these statuses as OpenAI-style JSON.

    Access-log filters cannot see response headers, so a mapper cannot tell the
    server's own 5xx from Envoy's: both are rewritten here, the details (our
    ``extproc_<code>``) go into the message and the server's ``x-extproc-error``
    header is kept. The server's 4xx replies are never rewritten.
    """

    def mapper(status: int, err_type: str, code: str, message: str) -> dict[str, Any]:
        return {
            "filter": {
                "status_code_filter": {
                    "comparison": {
                        "op": "EQ",
                        "value": {
                            "default_value": status,
                            "runtime_key": f"extproc.local_reply.{status}",
                        },
                    }
                }
            },
            "headers_to_add": [
                {
                    "header": {"key": ERROR_HEADER, "value": code},
                    # the server's own code, when it set one, stays
                    "append_action": "ADD_IF_ABSENT",
                }
            ],
            "body_format_override": {
                "json_format": _error_json(message, err_type, code),
                "content_type": "application/json",
            },
        }

    return {
        "mappers": [
            mapper(
                413,
                "invalid_request_error",
                "payload_too_large",
                "The request body is larger than the gateway accepts.",
            ),
            mapper(
                500,
                "api_error",
                "gateway_error",
                "The gateway failed to process this request (%RESPONSE_CODE_DETAILS%).",
            ),
            mapper(
                502, "api_error", "upstream_error", "The upstream failed (%RESPONSE_CODE_DETAILS%)."
            ),
            mapper(
                503,
                "service_unavailable_error",
                "service_unavailable",
                "The gateway or the upstream is unavailable (%RESPONSE_CODE_DETAILS%).",
            ),
            mapper(
                504,
                "timeout_error",
                "timeout",
                "The gateway or the upstream timed out (%RESPONSE_CODE_DETAILS%).",
            ),
        ]
    }


_ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}


def render_envoy_config(
    clusters: Mapping[str, Upstream],
    *,
    mode: Literal["ext_proc", "ext_authz"] = "ext_proc",
    listen: Upstream = Upstream("127.0.0.1", 10000),
    server: Upstream = Upstream("127.0.0.1", 50051),
    extra_servers: Sequence[Upstream] = (),
    admin: Upstream | None = Upstream("127.0.0.1", 9901),
    cluster_header: str = "x-extproc-cluster",
    failure_mode_allow: bool = False,
    max_body_bytes: int = 8 * 1024 * 1024,
    access_log_path: str = "/dev/stdout",
    failover: Mapping[str, FailoverRoute] | None = None,
) -> str:
    """The Envoy bootstrap YAML for ``clusters`` (policy cluster name → upstream), with
    a composite cluster and a retrying route per ``failover`` entry."""
    if _EXTPROC_CLUSTER in clusters:
        raise ValueError(f"the cluster name {_EXTPROC_CLUSTER!r} is reserved for the server")
    if mode == "ext_proc":
        service = "envoy.service.ext_proc.v3.ExternalProcessor"
        gate = _ext_proc_filter(failure_mode_allow, max_body_bytes)
    else:
        service = "envoy.service.auth.v3.Authorization"
        gate = _ext_authz_filter(failure_mode_allow, max_body_bytes)
    gates = [gate] if mode == "ext_proc" else [gate, _response_meter_filter()]
    failover_routes, failover_clusters = _failover(failover or {}, clusters, cluster_header)
    dynamic = any(r.dynamic for r in (failover or {}).values())
    routes = [
        *failover_routes,
        {
            "match": {"prefix": "/", "headers": [{"name": cluster_header, "present_match": True}]},
            # LLM calls are long; streams may run for minutes.
            "route": {
                "cluster_header": cluster_header,
                "timeout": "600s",
                "regex_rewrite": _add_prefix(),
                # a DNS upstream gets its own host name as Host (a provider's), not
                # the gateway's
                "auto_host_rewrite": True,
            },
        },
        _error_route(
            {"safe_regex": {"regex": LLM_PATH_REGEX}},
            503,
            "The gateway could not route this request: its policy server is down.",
            "service_unavailable_error",
            "gateway_unavailable",
        ),
        _error_route(
            {"safe_regex": {"regex": MODELS_PATH_REGEX}},
            503,
            "The gateway could not list models: its policy server is down.",
            "service_unavailable_error",
            "gateway_unavailable",
        ),
        _error_route(
            {"prefix": "/"},
            404,
            "Not an LLM endpoint this gateway serves.",
            "invalid_request_error",
            "unknown_route",
        ),
    ]
    hcm = {
        _TYPE: _API + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "llm",
        "codec_type": "AUTO",
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    _TYPE: _API + "extensions.access_loggers.file.v3.FileAccessLog",
                    "path": access_log_path,
                    "log_format": {"json_format": _ACCESS_LOG_FORMAT},
                },
            },
            _lease_access_log(mode),
        ],
        "local_reply_config": _local_reply_config(),
        "route_config": {
            "name": "llm",
            "virtual_hosts": [
                {
                    "name": "llm",
                    "domains": ["*"],
                    "routes": routes,
                    "response_headers_to_add": _session_headers(mode),
                    # a dynamic route's retries read Envoy's attempt count; no upstream
                    # sees it (the attempt filter removes it from retries)
                    **(
                        {
                            "include_request_attempt_count": True,
                            "request_headers_to_remove": [ATTEMPT_COUNT_HEADER],
                        }
                        if dynamic
                        else {}
                    ),
                }
            ],
        },
        # Rule: strip a client-sent routing header before the route is first chosen.
        # A header_mutation *filter* is too late: the connection manager has already
        # cached a route from the client's header, and with the server down nothing
        # clears that cache.
        "early_header_mutation_extensions": [
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {
                    _TYPE: _API + "extensions.http.early_header_mutation.header_mutation.v3."
                    "HeaderMutation",
                    "mutations": [
                        {"remove": cluster_header},
                        {"remove": STREAM_HEADER},
                        {"remove": ATTEMPT_CLUSTER_HEADER},
                        {"remove": ATTEMPT_NUMBER_HEADER},
                        {"remove": CALL_HEADER},
                    ],
                },
            }
        ],
        "http_filters": [
            *gates,
            {
                "name": "envoy.filters.http.router",
                "typed_config": _router(bool(failover), dynamic),
            },
        ],
    }
    config: dict[str, Any] = {
        "static_resources": {
            "listeners": [
                {
                    "name": "llm",
                    "address": {
                        "socket_address": {"address": listen.host, "port_value": listen.port}
                    },
                    # The largest request body Envoy buffers; above it Envoy answers 413.
                    "per_connection_buffer_limit_bytes": max_body_bytes,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                },
                *([_hop_listener(max_body_bytes)] if dynamic else []),
            ],
            "clusters": [
                _extproc_cluster(server, service, extra_servers),
                *(_cluster(name, up) for name, up in sorted(clusters.items())),
                *failover_clusters,
            ],
        },
    }
    if dynamic:
        config["bootstrap_extensions"] = [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    _TYPE: _API + "extensions.bootstrap.internal_listener.v3.InternalListener"
                },
            }
        ]
    # A ceiling on downstream connections, so a connection flood cannot exhaust the host.
    config["overload_manager"] = {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    _TYPE: _API + "extensions.resource_monitors.downstream_connections.v3."
                    "DownstreamConnectionsConfig",
                    "max_active_downstream_connections": 50_000,
                },
            }
        ]
    }
    if admin is not None:
        config["admin"] = {
            "address": {"socket_address": {"address": admin.host, "port_value": admin.port}}
        }
    header = (
        f"# Envoy in front of the extproc policy server ({mode}).\n"
        "# Generated by `extproc envoy-config`; see extproc/envoy/config.py for the why.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False, width=100)
