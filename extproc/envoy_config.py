"""Envoy configuration as data: the ext_proc filter, its cluster, provider clusters, a bootstrap.

The files in envoy/ are rendered from these functions (`spendgate envoy render`), and a test
checks that they match, so the shipped snippets and what `spendgate up` runs never drift.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from extproc.exchange import CREDENTIAL_HEADERS, CREDENTIAL_QUERY, REQUEST_ID_HEADER, UPSTREAM_HEADER
from extproc.failover import HOST_METADATA, PHASE_METADATA
from extproc.providers import PROVIDERS
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
# The downstream filter's own default leaves response headers alone: Envoy runs its local replies
# to requests it could not parse (HTTP/1.0, oversized headers, content-length with
# transfer-encoding) through the encoder filters, and an ext_proc filter that opens a gRPC stream
# for such a reply holds it until the codec closes the connection, so the client got nothing.
# Those replies have no route; every routed request gets _HEADERS_ONLY back from the virtual
# host's per-route config (see route_config).
_LOCAL_REPLIES_PASS = {**_HEADERS_ONLY, "response_header_mode": "SKIP"}
_EXT_PROC = "envoy.filters.http.ext_proc"
_EXT_PROC_PER_ROUTE = _T + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
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
    """The http filter. It fails closed: no filter, no request.

    Its processing mode skips response headers unless the route's per-filter config (set on the
    virtual host by route_config) turns them on: see _LOCAL_REPLIES_PASS.
    """
    return {
        "name": _EXT_PROC,
        "typed_config": {
            "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "timeout": "5s"},
            "failure_mode_allow": False,
            "status_on_error": {"code": 503},
            "message_timeout": f"{message_timeout_ms / 1000:g}s",
            "allow_mode_override": True,
            "processing_mode": _LOCAL_REPLIES_PASS,
        },
    }


def _ext_proc_per_route(**overrides: Any) -> dict[str, Any]:
    return {_EXT_PROC: {"@type": _EXT_PROC_PER_ROUTE, "overrides": overrides}}


def strip_route_header() -> list[dict[str, Any]]:
    """HCM early header mutation: drop a client-sent upstream header before the route is chosen.

    Envoy picks the route when request headers arrive, before any http filter runs, so removing
    the header in a filter would be too late: a forged header would already have routed the
    request, and a filter that never answers would let it through. Only the ext_proc filter,
    which clears the route cache, may route.

    A client-sent request id goes too: Envoy's own error replies copy the filter's request id
    from the request (local_reply_config), and must never echo one the client made up.
    """
    return [
        {
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {
                "@type": _T + "extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                "mutations": [{"remove": UPSTREAM_HEADER}, {"remove": REQUEST_ID_HEADER}],
            },
        }
    ]


# -- Envoy's own error replies ---------------------------------------------------------------
# The details of the filter's immediate responses (extproc.envoy_messages.immediate). They reach
# the client through Envoy's local reply path too, already in the provider's format: the mappers
# below leave every reply with these details alone, whatever its status.
FILTER_REPLY_DETAILS = "spendgate_rejected"
# Envoy's own 5xx replies: the ext_proc filter failing, the catch-all route, upstream trouble.
# A provider's own errors are never local replies, so no mapper ever sees them.
_ENVOY_5XX = f"response.code >= 500 && response.code_details != '{FILTER_REPLY_DETAILS}'"
# Which provider a request is for, as extproc.providers.guess_from_request decides it. By the time
# Envoy answers, the filter may have put a base URL's path prefix in front of the path, so the path
# is searched, not only its start. The key headers are the client's before the filter answers and
# the provider's own after (x-goog-api-key for Gemini, x-api-key for Anthropic); in between (an
# accounted request's body not yet answered) the path and anthropic-version still tell.
PROVIDER_CEL = {
    "gemini": (
        "request.url_path.contains('/v1beta/') || request.url_path.contains('/v1alpha/')"
        " || 'x-goog-api-key' in request.headers"
    ),
    "anthropic": (
        "request.url_path.contains('/v1/messages') || 'anthropic-version' in request.headers"
        " || 'x-api-key' in request.headers"
    ),
    "openai": "true",
}
# The statuses Envoy answers with itself; a provider field that depends on the status (Gemini's
# `status`) is computed from %RESPONSE_CODE% for these, any other takes the provider's default.
_ENVOY_STATUSES = (500, 502, 503, 504)
_MESSAGE_MARK = "@@message@@"


@dataclass(frozen=True)
class EnvoyReply:
    """A kind of reply Envoy makes itself, as a local reply mapper recognises and words it."""

    condition: str  # CEL, on top of _ENVOY_5XX
    message: str  # a substitution format string
    openai_code: str | None = None  # an OpenAI error's `code` (the other shapes have none)


_FILTER_FAILED = "response.code_details.startsWith('ext_proc')"  # ext_proc_error_...
# In order: the first whose condition holds words the reply.
ENVOY_REPLIES = [
    # The filter failed on the response (an upstream host was picked): the provider ran it.
    EnvoyReply(
        f"{_FILTER_FAILED} && has(upstream.address)",
        "Spendgate's filter failed while handling the provider's answer, which is lost; "
        "the request did reach the provider (%RESPONSE_CODE_DETAILS%)",
        "spendgate_unavailable",
    ),
    # ext_proc answers 504 when the filter is past message_timeout, status_on_error otherwise.
    EnvoyReply(
        f"{_FILTER_FAILED} && response.code == 504",
        "Spendgate's filter did not answer in time; the request was not forwarded (%RESPONSE_CODE_DETAILS%)",
        "spendgate_unavailable",
    ),
    EnvoyReply(
        _FILTER_FAILED,
        "Spendgate's filter is unavailable; the request was not forwarded (%RESPONSE_CODE_DETAILS%)",
        "spendgate_unavailable",
    ),
    # The catch-all route: the filter never routed the request.
    EnvoyReply(
        "response.code_details == 'direct_response'",
        "request was not authorised by the Spendgate filter",
        "spendgate_unavailable",
    ),
    EnvoyReply(
        "response.code_details == 'cluster_not_found'",
        "upstream error: Envoy has no cluster for this credential's base URL yet (cluster_not_found)",
    ),
    # Connect failure, no healthy upstream, upstream timeout, a reset before the answer was out.
    EnvoyReply("true", "upstream error: %LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)"),
]


def _cel_filter(expression: str) -> dict[str, Any]:
    """An access log filter (also a local reply mapper's filter): a CEL expression."""
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": _T + "extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }


def _cel_string(value: Any) -> str:
    if not isinstance(value, str) or any(c in value for c in "'\\()%"):
        raise ValueError(f"not a plain string for a CEL literal: {value!r}")
    return f"'{value}'"


def error_format(provider: str, message: str, openai_code: str | None = None) -> dict[str, Any]:
    """A `json_format` body in `provider`'s error shape (its error_body), carrying `message`.

    Fields that vary with the status follow the reply's status: a number equal to it becomes
    %RESPONSE_CODE%, a string that differs between statuses a %CEL()% choice on response.code.
    """
    impl = PROVIDERS[provider]
    docs = {s: json.loads(impl.error_body(s, _MESSAGE_MARK)) for s in (*_ENVOY_STATUSES, 599)}

    def merge(values: dict[int, Any]) -> Any:
        first = values[_ENVOY_STATUSES[0]]
        if isinstance(first, dict):
            return {k: merge({s: v[k] for s, v in values.items()}) for k in first}
        if first == _MESSAGE_MARK:
            return message
        if all(v == s for s, v in values.items()):
            return "%RESPONSE_CODE%"
        if all(v == first for v in values.values()):
            return first
        other = values[599]
        cases = "".join(
            f"response.code == {s} ? {_cel_string(values[s])} : "
            for s in _ENVOY_STATUSES
            if values[s] != other
        )
        return f"%CEL({cases}{_cel_string(other)})%"

    doc: dict[str, Any] = merge(docs)
    if openai_code is not None and provider == "openai":
        doc["error"]["code"] = openai_code
    return doc


def local_reply_config() -> dict[str, Any]:
    """The HCM's local_reply_config: Envoy's own 5xx replies in the calling provider's error JSON.

    Only replies Envoy makes itself reach these mappers; of those, the filter's (details
    FILTER_REPLY_DETAILS) and every reply below 500 pass unchanged. The status is kept, and the
    filter's request id, when it set one on the request, is copied onto the reply.
    """
    mappers = []
    for reply in ENVOY_REPLIES:
        for provider in ("gemini", "anthropic", "openai"):
            expression = f"{_ENVOY_5XX} && {reply.condition}"
            if provider != "openai":
                expression += f" && ({PROVIDER_CEL[provider]})"
            mappers.append(
                {
                    "filter": _cel_filter(expression),
                    "headers_to_add": [
                        {
                            "header": {"key": REQUEST_ID_HEADER, "value": f"%REQ({REQUEST_ID_HEADER})%"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    ],
                    "body_format_override": {
                        "json_format": error_format(provider, reply.message, reply.openai_code)
                    },
                }
            )
    return {"mappers": mappers}


def ext_proc_cluster(endpoints: list[Endpoint]) -> dict[str, Any]:
    """The gRPC cluster of extproc processes (HTTP/2 is required by ext_proc)."""
    return {
        "name": EXTPROC_CLUSTER,
        "type": "STATIC" if all(_is_ip(_host(ep)) for ep in endpoints) else "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        # Envoy's default panic mode sends traffic to unhealthy hosts once fewer than half are
        # healthy: a worker that is not ready (keys or policies not loaded, a background task
        # dead) would then still be asked. With no healthy worker the request fails closed.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
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
                "interval": "1s",
                "no_traffic_interval": "1s",
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


def route_config(fail_open: Sequence[FailOpen] = ()) -> dict[str, Any]:
    """Route by the cluster the filter chose; anything it did not route is refused.

    With `fail_open`, requests the filter did not route (it was unreachable, so Envoy went on
    without it) and that belong to one of those providers go to its break-glass cluster instead.
    """
    return {
        "name": "spendgate",
        "virtual_hosts": [
            {
                "name": "spendgate",
                "domains": ["*"],
                # Every routed request has its response headers processed (see _LOCAL_REPLIES_PASS).
                "typed_per_filter_config": _ext_proc_per_route(processing_mode=_HEADERS_ONLY),
                "routes": [*_filter_routes(), *_unrouted(fail_open)],
            }
        ],
    }


def _filter_routes() -> list[dict[str, Any]]:
    return [
        {
            # Keys with a fallback chain: Envoy retries the next member of the aggregate
            # cluster on connect failure, reset, 5xx or 429.
            "name": "spendgate_failover",
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
            "name": "spendgate_routed",
            "match": {"prefix": "/", "headers": [{"name": UPSTREAM_HEADER, "present_match": True}]},
            "route": {
                "cluster_header": UPSTREAM_HEADER,
                "auto_host_rewrite": True,
                # Long generations and slow streams are normal for LLM calls.
                "timeout": "600s",
                "idle_timeout": "300s",
            },
            "request_headers_to_remove": [UPSTREAM_HEADER],
        },
    ]


_REFUSED = {"status": 503, "body": {"inline_string": _NOT_AUTHORISED}}


def _unrouted(fail_open: Sequence[FailOpen]) -> list[dict[str, Any]]:
    """Routes for requests that carry no route header: refused, or a provider's break-glass route.

    A break-glass route takes only requests that present something shaped like a wrapped key:
    without the filter Envoy cannot tell a valid key from a made-up one, but a request with no
    key at all, or with a raw provider key, is still refused.
    """
    refused = {"name": "spendgate_refused", "match": {"prefix": "/"}, "direct_response": _REFUSED}
    if not fail_open:
        return [refused]
    by_provider = {fo.provider: fo for fo in fail_open}
    routes = []
    # Gemini before Anthropic before OpenAI, whose paths are the catch-all: each request goes to
    # the provider the filter would have taken it for (extproc.providers.guess_from_request).
    for provider in ("gemini", "anthropic", "openai"):
        fo = by_provider.get(provider)
        if fo is None:
            # Not this provider's break-glass route, nor a later provider's: refused here.
            routes += [
                {"name": f"spendgate_refused_{provider}", "match": m, "direct_response": _REFUSED}
                for m in PROVIDER_MATCHES[provider]
                if provider != "openai"
            ]
            continue
        route: dict[str, Any] = {
            "cluster": failopen_cluster_name(provider),
            "auto_host_rewrite": True,
            "timeout": "600s",
            "idle_timeout": "300s",
        }
        if fo.upstream.path_prefix:
            route["prefix_rewrite"] = fo.upstream.path_prefix + "/"
        for match in PROVIDER_MATCHES[provider]:
            for credential in WRAPPED_KEY_MATCHES:
                routes.append(
                    {
                        "name": f"{FAILOPEN_ROUTE_PREFIX}{provider}_{len(routes)}",
                        "match": _and(match, credential),
                        "route": route,
                        # An unreachable filter lets these requests through (failure_mode_allow);
                        # everywhere else it stays closed.
                        "typed_per_filter_config": _ext_proc_per_route(failure_mode_allow=True),
                        # The wrapped key never goes up; the break-glass cluster strips it again
                        # and puts on Envoy's own credential (failopen_cluster).
                        "request_headers_to_remove": [UPSTREAM_HEADER, *CREDENTIAL_HEADERS],
                    }
                )
        # This provider's requests without a wrapped key are refused here.
        routes += [
            {"name": f"spendgate_refused_{provider}", "match": m, "direct_response": _REFUSED}
            for m in PROVIDER_MATCHES[provider]
            if provider != "openai"
        ]
    routes.append(refused)
    return routes


def _and(match: dict[str, Any], credential: dict[str, Any]) -> dict[str, Any]:
    """A provider's path match that also requires a credential match (headers, query)."""
    out = dict(match)
    for k, v in credential.items():
        out[k] = [*out.get(k, []), *v]
    return out


@dataclass(frozen=True)
class FailOpen:
    """A provider whose requests Envoy forwards itself, with a break-glass credential, while
    the filter is unreachable."""

    provider: str  # openai | anthropic | gemini
    upstream: Upstream  # where the break-glass credential is valid
    secret_path: str  # SDS file (a generic secret named breakglass_<provider>)


FAILOPEN_ROUTE_PREFIX = "spendgate_failopen_"
FAILOPEN_METADATA = "spendgate.failopen"
# How a request is recognised as a provider's; the order between providers matters (_unrouted).
PROVIDER_MATCHES: dict[str, list[dict[str, Any]]] = {
    "gemini": [
        {"safe_regex": {"regex": "^/v1(beta|alpha)/.*"}},
        {"prefix": "/", "headers": [{"name": "x-goog-api-key", "present_match": True}]},
    ],
    "anthropic": [
        {"path_separated_prefix": "/v1/messages"},
        {"prefix": "/", "headers": [{"name": "anthropic-version", "present_match": True}]},
        {"prefix": "/", "headers": [{"name": "x-api-key", "present_match": True}]},
    ],
    "openai": [{"prefix": "/"}],
}
# The header each provider takes its key in; the secret file holds the whole header value.
BREAKGLASS_HEADER = {"openai": "authorization", "anthropic": "x-api-key", "gemini": "x-goog-api-key"}


def failopen_cluster_name(provider: str) -> str:
    """The static cluster of a provider's break-glass route."""
    return f"spendgate_failopen_{provider}"


def breakglass_secret_name(provider: str) -> str:
    """The name of the generic SDS secret holding a provider's break-glass header value."""
    return f"breakglass_{provider}"


def breakglass_secret_document(provider: str, key: str) -> dict[str, Any]:
    """The SDS file Envoy reads a break-glass credential from (written 0600 by the CLI)."""
    value = "Bearer " + key if BREAKGLASS_HEADER[provider] == "authorization" else key
    return {
        "resources": [
            {
                "@type": _T + "extensions.transport_sockets.tls.v3.Secret",
                "name": breakglass_secret_name(provider),
                "generic_secret": {"secret": {"inline_string": value}},
            }
        ]
    }


def failopen_cluster(fo: FailOpen, ca_file: str) -> dict[str, Any]:
    """The provider cluster under another name, with upstream filters that remove every
    credential a client sent (headers and query parameters) and inject the break-glass one."""
    cluster = provider_cluster(replace(fo.upstream, cluster=failopen_cluster_name(fo.provider)), ca_file)
    directory = fo.secret_path.rpartition("/")[0] or "."
    cluster["typed_extension_protocol_options"] = {
        _HTTP_OPTIONS: {
            "@type": _T.replace("envoy.", "") + _HTTP_OPTIONS,
            "explicit_http_config": {"http_protocol_options": {}},
            "http_filters": [
                {
                    "name": "envoy.filters.http.header_mutation",
                    "typed_config": {
                        "@type": _T + "extensions.filters.http.header_mutation.v3.HeaderMutation",
                        "mutations": {
                            "request_mutations": [
                                {"remove": h}
                                for h in (*CREDENTIAL_HEADERS, UPSTREAM_HEADER, "x-envoy-original-path")
                            ],
                            "query_parameter_mutations": [{"remove": q} for q in sorted(CREDENTIAL_QUERY)],
                        },
                    },
                },
                {
                    "name": "envoy.filters.http.credential_injector",
                    "typed_config": {
                        "@type": _T + "extensions.filters.http.credential_injector.v3.CredentialInjector",
                        "overwrite": True,
                        "credential": {
                            "name": "envoy.http.injected_credentials.generic",
                            "typed_config": {
                                "@type": _T + "extensions.http.injected_credentials.generic.v3.Generic",
                                "credential": {
                                    "name": breakglass_secret_name(fo.provider),
                                    "sds_config": {
                                        "path_config_source": {
                                            "path": fo.secret_path,
                                            "watched_directory": {"path": directory},
                                        }
                                    },
                                },
                                "header": BREAKGLASS_HEADER[fo.provider],
                            },
                        },
                    },
                },
                {
                    "name": "envoy.filters.http.upstream_codec",
                    "typed_config": {"@type": _T + "extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
                },
            ],
        }
    }
    return cluster


# The shape of a wrapped key (extproc.wrapped_keys.generate): `sg-` and 43 base62 characters.
WRAPPED_KEY = "sg-[0-9A-Za-z]{43}"
_BEARER = "[Bb]earer +"
_QUERY_NAMES = "|".join(sorted(CREDENTIAL_QUERY))
# Where a request can carry its wrapped key, as route matches (any one of them will do): the
# headers the filter reads, and Gemini's `key` query parameter (the filter also takes a few
# rarer query names; with the filter down those requests are refused).
WRAPPED_KEY_MATCHES: list[dict[str, Any]] = [
    {
        "headers": [
            {"name": "authorization", "string_match": {"safe_regex": {"regex": f"^{_BEARER}{WRAPPED_KEY}$"}}}
        ]
    },
    *(
        {"headers": [{"name": h, "string_match": {"safe_regex": {"regex": f"^{WRAPPED_KEY}$"}}}]}
        for h in ("x-api-key", "x-goog-api-key", "api-key")
    ),
    {"query_parameters": [{"name": "key", "string_match": {"safe_regex": {"regex": f"^{WRAPPED_KEY}$"}}}]},
]
# A wrapped key's visible prefix (extproc.wrapped_keys.visible_prefix), or nothing: the pattern
# matches every value, so a value that is not a wrapped key (a raw provider key sent by mistake)
# is replaced by the empty string, never stored.
# (Envoy refuses regexes whose RE2 program is large, so these check the characters, not the length.)
_PREFIX_ONLY = "^(?:[A-Za-z]+[ \t]+)?(?:(sg-[0-9A-Za-z]{8})[0-9A-Za-z]+$|.*$)"
_QUERY_PREFIX_ONLY = (
    f"^(?:[^?#]*[?](?:[^#]*&)?(?:{_QUERY_NAMES})=(sg-[0-9A-Za-z]{{8}})[0-9A-Za-z]*(?:[&#].*)?$|.*$)"
)
# Where the access log finds the key prefix, in the order the importer trusts them.
KEY_PREFIX_SOURCES = {
    "authorization": _PREFIX_ONLY,
    "x-api-key": _PREFIX_ONLY,
    "x-goog-api-key": _PREFIX_ONLY,
    "api-key": _PREFIX_ONLY,
    ":path": _QUERY_PREFIX_ONLY,
}


def key_prefix_field(source: str) -> str:
    """The metadata key (and log field) of the key prefix found in `source`."""
    return "key_prefix_" + source.strip(":").replace("-", "_")


def key_prefix_filter() -> dict[str, Any]:
    """Before the ext_proc filter: note the visible prefix of the client's wrapped key (and only
    that) in dynamic metadata, for the fail-open access log. It runs before the filter swaps the
    credential, and the upstream filters of a break-glass cluster rewrite the headers in place,
    so the log cannot read the headers themselves."""
    return {
        "name": "envoy.filters.http.header_to_metadata",
        "typed_config": {
            "@type": _T + "extensions.filters.http.header_to_metadata.v3.Config",
            "request_rules": [
                {
                    "header": source,
                    "on_header_present": {
                        "metadata_namespace": FAILOPEN_METADATA,
                        "key": key_prefix_field(source),
                        "type": "STRING",
                        "regex_value_rewrite": {"pattern": {"regex": pattern}, "substitution": r"\1"},
                    },
                    "remove": False,
                }
                for source, pattern in KEY_PREFIX_SOURCES.items()
            ],
        },
    }


def model_filter() -> dict[str, Any]:
    """After the ext_proc filter: the request's `model` and `stream` from a JSON body, for the log."""
    return {
        "name": "envoy.filters.http.json_to_metadata",
        "typed_config": {
            "@type": _T + "extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
            "request_rules": {
                "rules": [
                    {
                        "selectors": [{"key": "model"}],
                        "on_present": {
                            "metadata_namespace": FAILOPEN_METADATA,
                            "key": "model",
                            "type": "STRING",
                        },
                    },
                    {
                        "selectors": [{"key": "stream"}],
                        "on_present": {
                            "metadata_namespace": FAILOPEN_METADATA,
                            "key": "stream",
                            "type": "PROTOBUF_VALUE",
                        },
                    },
                ]
            },
        },
    }


# Requests Envoy forwarded without the filter's say: routed by a break-glass route, or answered
# by an upstream without the filter ever seeing the response (it failed mid-request).
FAILOPEN_LOG_FILTER = (
    f"xds.route_name.startsWith('{FAILOPEN_ROUTE_PREFIX}') || "
    f"(response.code_details == 'via_upstream' && !('{REQUEST_ID_HEADER}' in response.headers))"
)
FAILOPEN_LOG_VERSION = 1


def failopen_log_format() -> dict[str, str]:
    """One JSON object per line. No header or query value is logged: key prefixes come from the
    metadata key_prefix_filter wrote, the path without its query string."""
    md = FAILOPEN_METADATA
    fields = {
        "v": str(FAILOPEN_LOG_VERSION),
        "ts": "%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "method": "%REQ(:METHOD)%",
        "path": "%PATH(NQ)%",
        "route": "%ROUTE_NAME%",
        "cluster": "%UPSTREAM_CLUSTER%",
        "model": f"%DYNAMIC_METADATA({md}:model)%",
        "stream": f"%DYNAMIC_METADATA({md}:stream)%",
        "status": "%RESPONSE_CODE%",
        "details": "%RESPONSE_CODE_DETAILS%",
        "flags": "%RESPONSE_FLAGS%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "duration_ms": "%DURATION%",
        "content_type": "%RESP(CONTENT-TYPE)%",
    }
    for source in KEY_PREFIX_SOURCES:
        fields[key_prefix_field(source)] = f"%DYNAMIC_METADATA({md}:{key_prefix_field(source)})%"
    return fields


def failopen_access_log(path: str) -> dict[str, Any]:
    """The HCM access log of requests forwarded without the filter (JSON lines)."""
    return {
        "name": "envoy.access_loggers.file",
        "filter": _cel_filter(FAILOPEN_LOG_FILTER),
        "typed_config": {
            "@type": _T + "extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
            "log_format": {"json_format": failopen_log_format()},
        },
    }


def _hcm(
    stat_prefix: str, message_timeout_ms: int, fail_open: Sequence[FailOpen], log_path: str
) -> dict[str, Any]:
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"},
    }
    filters = [ext_proc_filter(message_timeout_ms), router]
    hcm: dict[str, Any] = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "stream_idle_timeout": "300s",
        "request_timeout": "0s",
        **hcm_options(),
        "early_header_mutation_extensions": strip_route_header(),
        "route_config": route_config(fail_open),
        "local_reply_config": local_reply_config(),
        "http_filters": filters,
    }
    if fail_open:
        filters[:] = [key_prefix_filter(), ext_proc_filter(message_timeout_ms), model_filter(), router]
        hcm["access_log"] = [failopen_access_log(log_path)]
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}


# Envoy normalises the path before routing and before any filter sees it: `.` and `..` segments
# resolved (RFC 3986), runs of slashes merged, and an escaped slash or backslash (%2F, %5C) in
# the path refused with a 400, so `/v1//chat/completions/`, `/v1/./chat/...` and
# `/v1%2Fchat%2Fcompletions` cannot reach the provider as a path the policy did not check.
PATH_HANDLING = {
    "normalize_path": True,
    "merge_slashes": True,
    "path_with_escaped_slashes_action": "REJECT_REQUEST",
}


# HTTP/1.0 is legal HTTP, and what some clients and proxies still send (nginx's proxy_pass speaks
# it upstream unless told otherwise, ApacheBench always): served, not refused with a 426. A
# request without a Host header is routed as if it named this host (the virtual host takes any).
HTTP1_OPTIONS = {"accept_http_10": True, "default_host_for_http_10": "spendgate"}


def hcm_options() -> dict[str, Any]:
    """HCM fields Spendgate relies on: path normalisation, and HTTP/1.0 served."""
    return {**PATH_HANDLING, "http_protocol_options": HTTP1_OPTIONS}


def listener(
    name: str,
    host: str,
    port: int,
    *,
    tls: tuple[str, str] | None = None,
    message_timeout_ms: int = 2000,
    fail_open: Sequence[FailOpen] = (),
    failopen_log: str = "",
) -> dict[str, Any]:
    """A proxy listener; with `tls` (cert path, key path) it terminates TLS, HTTP/2 and 1.1."""
    if fail_open and not failopen_log:
        raise ValueError("fail-open needs an access log path")
    chain: dict[str, Any] = {"filters": [_hcm(name, message_timeout_ms, fail_open, failopen_log)]}
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


MAX_DOWNSTREAM_CONNECTIONS = 10_000


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
    fail_open: list[FailOpen] = field(default_factory=list)  # providers Envoy serves without the filter
    failopen_log: str = ""  # where Envoy logs what it forwarded without the filter (JSON lines)


def bootstrap(opts: BootstrapOptions) -> dict[str, Any]:
    """A complete Envoy bootstrap for standalone use."""

    def make(name: str, port: int, tls: tuple[str, str] | None = None) -> dict[str, Any]:
        return listener(
            name,
            opts.listen_host,
            port,
            tls=tls,
            message_timeout_ms=opts.message_timeout_ms,
            fail_open=opts.fail_open,
            failopen_log=opts.failopen_log,
        )

    listeners = [make("spendgate_http", opts.port)]
    if opts.tls_port is not None:
        if not (opts.tls_cert and opts.tls_key):
            raise ValueError("a TLS listener needs both a certificate and a private key path")
        listeners.append(make("spendgate_https", opts.tls_port, (opts.tls_cert, opts.tls_key)))
    clusters = [ext_proc_cluster(opts.endpoints)]
    clusters += [failopen_cluster(fo, opts.ca_file) for fo in opts.fail_open]
    config: dict[str, Any] = {
        "admin": {"address": {"socket_address": {"address": opts.admin_host, "port_value": opts.admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        # Without a cap Envoy accepts connections until it runs out of file descriptors (and warns
        # at every start). Each proxied request also holds an upstream connection, so the cap sits
        # well under common descriptor limits and far above what one host's proxy serves.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _T
                        + "extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
    }
    if opts.cds_path or opts.fail_open:
        # File-based CDS and SDS both need a node identity.
        config["node"] = {"id": "spendgate", "cluster": "spendgate"}
    if opts.cds_path:
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
