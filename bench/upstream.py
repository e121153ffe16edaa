"""A provider stand-in fast enough not to be the bottleneck: Envoy answering from memory.

The benchmark compares plain Envoy with the Spendgate path; both talk to this same upstream,
so whatever it costs cancels out of the ratios.
"""

from __future__ import annotations

import json
from typing import Any

MODEL = "fake-openai-model"
USAGE = {"prompt_tokens": 57, "completion_tokens": 23, "total_tokens": 80}
STREAM_HEADER = "x-bench-stream"

CHAT_JSON = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream"},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
)


def _chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> str:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    doc = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": choices,
        "usage": usage,
    }
    return "data: " + json.dumps(doc) + "\n\n"


CHAT_SSE = (
    _chunk({"role": "assistant", "content": ""})
    + "".join(_chunk({"content": w}) for w in ("Hello", " from", " the", " bench", " upstream"))
    + _chunk({}, "stop")
    + _chunk({}, usage=USAGE)
    + "data: [DONE]\n\n"
)


def _envoy(name: str, port: int, admin_port: int, routes: list[dict[str, Any]]) -> dict[str, Any]:
    """A one-listener Envoy with the given routes and nothing but the router filter."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    listener = {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [listener]},
    }


def bootstrap(port: int, admin_port: int) -> dict[str, Any]:
    """Envoy serving a chat completion, as JSON or as an SSE stream when the bench header asks."""

    def respond(body: str, content_type: str) -> dict[str, Any]:
        return {
            "direct_response": {"status": 200, "body": {"inline_string": body}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": content_type}}],
        }

    stream = {"prefix": "/", "headers": [{"name": STREAM_HEADER, "present_match": True}]}
    return _envoy(
        "bench_upstream",
        port,
        admin_port,
        [
            {"match": stream, **respond(CHAT_SSE, "text/event-stream")},
            {"match": {"prefix": "/"}, **respond(CHAT_JSON, "application/json")},
        ],
    )


def plain_proxy(port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    """The baseline: Envoy proxying to the upstream with no filter at all."""
    config = _envoy(
        "baseline",
        port,
        admin_port,
        [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "600s"}}],
    )
    address = {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}
    config["static_resources"]["clusters"] = [
        {
            "name": "upstream",
            "type": "STATIC",
            "connect_timeout": "1s",
            "circuit_breakers": {
                "thresholds": [
                    {"max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000}
                ]
            },
            "load_assignment": {
                "cluster_name": "upstream",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
            },
        }
    ]
    return config
