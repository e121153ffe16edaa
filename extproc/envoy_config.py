"""Envoy configuration as data: the ext_proc filter, its cluster, provider clusters, a bootstrap.

The files in envoy/ are rendered from these functions (`spendgate envoy render`), and a test
checks that they match, so the shipped snippets and what `spendgate up` runs never drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc.exchange import UPSTREAM_HEADER
from extproc.failover import HOST_METADATA, PHASE_METADATA
from extproc.upstreams import DEFAULT_BASE_URLS, MAX_CHAIN, Upstream, upstream_for
from extproc.upstreams import failover_cluster as failover_name

EXTPROC_CLUSTER = "spendgate_extproc"
_T = "type.googleapis.com/envoy."
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Big enough for a buffered 8 MiB request body and a large JSON response (embeddings).
BUFFER_LIMIT = 16 * 1024 * 1024
# Headers both ways only: the downstream filter asks per request for the bodies it needs, and
# the per-attempt failover filter needs no body at all.
_HEADERS_ONLY = {
    "request_header_mode": "SEND",
    "response_header_mode": "SEND",
    "request_body_mode": "NONE",
    "response_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP",
}
_NOT_AUTHORISED = (
    '{"error":{"message":"request was not authorised by the Spendgate filter","type":"api_error",'
    '"code":"spendgate_unavailable"}}'
)


@dataclass(frozen=True)
class Endpoint:
    """An extproc process: a unix socket path, or host and port."""

    address: str  # "unix:/path" or "host:port"


def _address(ep: Endpoint) -> dict[str, Any]:
    if ep.address.startswith("unix:"):
        return {"pipe": {"path": ep.address[5:]}}
    host, _, port = ep.address.rpartition(":")
    return {"socket_address": {"address": host, "port_value": int(port)}}


def _host(ep: Endpoint) -> str:
    return "127.0.0.1" if ep.address.startswith("unix:") else ep.address.rpartition(":")[0]


def ext_proc_filter(message_timeout_ms: int = 2000) -> dict[str, Any]:
    """The http filter. It fails closed: no filter, no request."""
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "timeout": "5s"},
            "failure_mode_allow": False,
            "status_on_error": {"code": 503},
            "message_timeout": f"{message_timeout_ms / 1000:g}s",
            "allow_mode_override": True,
            "processing_mode": _HEADERS_ONLY,
        },
    }


def strip_route_header() -> list[dict[str, Any]]:
    """HCM early header mutation: drop a client-sent upstream header before the route is chosen.

    Envoy picks the route when request headers arrive, before any http filter runs, so removing
    the header in a filter would be too late: a forged header would already have routed the
    request, and a filter that never answers would let it through. Only the ext_proc filter,
    which clears the route cache, may route.
    """
    return [
        {
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {
                "@type": _T + "extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                "mutations": [{"remove": UPSTREAM_HEADER}],
            },
        }
    ]


def ext_proc_cluster(endpoints: list[Endpoint]) -> dict[str, Any]:
    """The gRPC cluster of extproc processes (HTTP/2 is required by ext_proc)."""
    return {
        "name": EXTPROC_CLUSTER,
        "type": "STATIC" if all(_is_ip(_host(ep)) for ep in endpoints) else "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": _T.replace("envoy.", "") + _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 100000}},
            }
        },
        # grpc.health.v1 on each process: one that is down or shutting down leaves rotation.
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "2s",
                "no_traffic_interval": "2s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
        # Every open request holds a stream; Envoy's default of 1,024 would turn load into 503s.
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
            ]
        },
        "load_assignment": {
            "cluster_name": EXTPROC_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(ep)}} for ep in endpoints]}],
        },
    }


def provider_cluster(up: Upstream, ca_file: str) -> dict[str, Any]:
    """A cluster for one provider base URL, with verified TLS for https upstreams."""
    cluster: dict[str, Any] = {
        "name": up.cluster,
        "type": "LOGICAL_DNS" if not _is_ip(up.host) else "STATIC",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
        "circuit_breakers": {
            "thresholds": [{"max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000}]
        },
        "outlier_detection": {"consecutive_5xx": 5, "base_ejection_time": "10s", "max_ejection_percent": 50},
        "load_assignment": {
            "cluster_name": up.cluster,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": up.host, "port_value": up.port}},
                                "hostname": up.host,
                            },
                            # The failover filter learns from this which cluster Envoy picked.
                            "metadata": {"filter_metadata": {"spendgate": {"cluster": up.cluster}}},
                        }
                    ]
                }
            ],
        },
    }
    if up.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": up.host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": ca_file},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": up.host}}],
                    }
                },
            },
        }
    return cluster


def failover_cluster(members: list[str]) -> dict[str, Any]:
    """An aggregate cluster trying `members` in order, with the per-attempt credential filter."""
    return {
        "name": failover_name(members),
        "connect_timeout": "5s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {
                "@type": _T + "extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": members,
            },
        },
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": _T.replace("envoy.", "") + _HTTP_OPTIONS,
                "explicit_http_config": {"http_protocol_options": {}},
                # Upstream filters run once per attempt, after the host is chosen: the place to
                # put on each member's own credential.
                "http_filters": [
                    {
                        "name": "envoy.filters.http.ext_proc",
                        "typed_config": {
                            "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
                            "grpc_service": {
                                "envoy_grpc": {"cluster_name": EXTPROC_CLUSTER},
                                "timeout": "5s",
                                "initial_metadata": [{"key": PHASE_METADATA, "value": "upstream"}],
                            },
                            "failure_mode_allow": False,
                            "status_on_error": {"code": 503},
                            "request_attributes": [HOST_METADATA],
                            "processing_mode": _HEADERS_ONLY,
                        },
                    },
                    {
                        "name": "envoy.filters.http.upstream_codec",
                        "typed_config": {
                            "@type": _T + "extensions.filters.http.upstream_codec.v3.UpstreamCodec"
                        },
                    },
                ],
            }
        },
    }


def default_upstreams() -> list[Upstream]:
    """The public providers' clusters, shipped in every config."""
    return [upstream_for(u) for u in DEFAULT_BASE_URLS.values()]


def route_config() -> dict[str, Any]:
    """Route by the cluster the filter chose; anything it did not route is refused."""
    return {
        "name": "spendgate",
        "virtual_hosts": [
            {
                "name": "spendgate",
                "domains": ["*"],
                "routes": [
                    {
                        # Keys with a fallback chain: Envoy retries the next member of the
                        # aggregate cluster on connect failure, reset, 5xx or 429.
                        "match": {
                            "prefix": "/",
                            "headers": [{"name": UPSTREAM_HEADER, "string_match": {"prefix": "fo_"}}],
                        },
                        "route": {
                            "cluster_header": UPSTREAM_HEADER,
                            "auto_host_rewrite": True,
                            "timeout": "600s",
                            "idle_timeout": "300s",
                            "retry_policy": {
                                "retry_on": "connect-failure,refused-stream,reset,5xx,retriable-status-codes",
                                "retriable_status_codes": [429],
                                "num_retries": MAX_CHAIN - 1,
                                "retry_priority": {
                                    "name": "envoy.retry_priorities.previous_priorities",
                                    "typed_config": {
                                        "@type": _T
                                        + "extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                                        "update_frequency": 1,
                                    },
                                },
                            },
                        },
                        "request_headers_to_remove": [UPSTREAM_HEADER],
                    },
                    {
                        "match": {
                            "prefix": "/",
                            "headers": [{"name": UPSTREAM_HEADER, "present_match": True}],
                        },
                        "route": {
                            "cluster_header": UPSTREAM_HEADER,
                            "auto_host_rewrite": True,
                            # Long generations and slow streams are normal for LLM calls.
                            "timeout": "600s",
                            "idle_timeout": "300s",
                        },
                        "request_headers_to_remove": [UPSTREAM_HEADER],
                    },
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 503, "body": {"inline_string": _NOT_AUTHORISED}},
                    },
                ],
            }
        ],
    }


def _hcm(stat_prefix: str, message_timeout_ms: int) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "stream_idle_timeout": "300s",
            "request_timeout": "0s",
            "early_header_mutation_extensions": strip_route_header(),
            "route_config": route_config(),
            "http_filters": [
                ext_proc_filter(message_timeout_ms),
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"},
                },
            ],
        },
    }


def listener(
    name: str, host: str, port: int, *, tls: tuple[str, str] | None = None, message_timeout_ms: int = 2000
) -> dict[str, Any]:
    """A proxy listener; with `tls` (cert path, key path) it terminates TLS, HTTP/2 and 1.1."""
    chain: dict[str, Any] = {"filters": [_hcm(name, message_timeout_ms)]}
    if tls:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _T + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [
                        {"certificate_chain": {"filename": tls[0]}, "private_key": {"filename": tls[1]}}
                    ],
                },
            },
        }
    return {
        "name": name,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
        "filter_chains": [chain],
    }


@dataclass
class BootstrapOptions:
    """What varies between a local stack, a container and the shipped example."""

    endpoints: list[Endpoint]
    ca_file: str
    listen_host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    tls_port: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    upstreams: list[Upstream] | None = None  # static provider clusters (default: the public three)
    cds_path: str | None = None  # provider clusters from a watched file instead
    message_timeout_ms: int = 2000


def bootstrap(opts: BootstrapOptions) -> dict[str, Any]:
    """A complete Envoy bootstrap for standalone use."""
    listeners = [
        listener("spendgate_http", opts.listen_host, opts.port, message_timeout_ms=opts.message_timeout_ms)
    ]
    if opts.tls_port is not None:
        if not (opts.tls_cert and opts.tls_key):
            raise ValueError("a TLS listener needs both a certificate and a private key path")
        listeners.append(
            listener(
                "spendgate_https",
                opts.listen_host,
                opts.tls_port,
                tls=(opts.tls_cert, opts.tls_key),
                message_timeout_ms=opts.message_timeout_ms,
            )
        )
    clusters = [ext_proc_cluster(opts.endpoints)]
    config: dict[str, Any] = {
        "admin": {"address": {"socket_address": {"address": opts.admin_host, "port_value": opts.admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    if opts.cds_path:
        config["node"] = {"id": "spendgate", "cluster": "spendgate"}
        config["dynamic_resources"] = {
            "cds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": opts.cds_path,
                    "watched_directory": {"path": opts.cds_path.rpartition("/")[0] or "."},
                },
            }
        }
    else:
        ups = opts.upstreams if opts.upstreams is not None else default_upstreams()
        clusters.extend(provider_cluster(u, opts.ca_file) for u in ups)
    return config


def cds_document(
    upstreams: list[Upstream], ca_file: str, chains: list[list[str]] | None = None
) -> dict[str, Any]:
    """The file-based CDS document that `spendgate up` rewrites when providers change."""
    clusters = [provider_cluster(u, ca_file) for u in upstreams]
    clusters += [failover_cluster(members) for members in chains or []]
    return {"resources": [{"@type": _T + "config.cluster.v3.Cluster", **c} for c in clusters]}


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
