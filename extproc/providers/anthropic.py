"""Anthropic's Messages API wire protocol."""

from __future__ import annotations

import json
from typing import Any

from extproc.providers.base import (
    FREE_METHODS,
    BadRequest,
    Change,
    ParsedRequest,
    SSEAccountant,
    StreamAccountant,
    clamp,
    collect_text,
    load_json_object,
    optional_int,
    optional_str,
    stream_flag,
)
from extproc.usage import Usage, as_int

MESSAGES = "messages"
COUNT_TOKENS = "messages.count_tokens"

_PROMPT_KEYS = frozenset({"text", "content", "system", "input"})
_DELTA_KEYS = frozenset({"text", "partial_json", "thinking"})
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class Anthropic:
    """api.anthropic.com and compatible upstreams."""

    name = "anthropic"

    def api_for(self, method: str, path: str) -> str | None:
        """See Provider.api_for. count_tokens is free, so it is forwarded without accounting."""
        return MESSAGES if method == "POST" and path == "/v1/messages" else None

    def is_free(self, method: str, path: str) -> bool:
        """See Provider.is_free."""
        return method in FREE_METHODS or path == "/v1/messages/count_tokens"

    def auth_headers(self, secret: str) -> list[tuple[str, str]]:
        """See Provider.auth_headers."""
        return [("x-api-key", secret)]

    def parse_request(self, api: str, path: str, body: bytes) -> ParsedRequest:
        """See Provider.parse_request."""
        doc = load_json_object(body)
        model = optional_str(doc, "model")
        if not model:
            raise BadRequest("model: Field required")
        if not isinstance(doc.get("messages"), list):
            raise BadRequest("messages: Field required")
        return ParsedRequest(
            model=model,
            stream=stream_flag(doc),
            max_tokens=optional_int(doc, "max_tokens"),
            body=doc,
        )

    def usage_from_response(self, api: str, doc: Any) -> tuple[Usage | None, str | None]:
        """See Provider.usage_from_response."""
        if not isinstance(doc, dict):
            return None, None
        model = doc.get("model") if isinstance(doc.get("model"), str) else None
        raw = doc.get("usage")
        return (_usage(raw, raw) if isinstance(raw, dict) else None), model

    def stream_accountant(self, api: str, request: ParsedRequest) -> StreamAccountant:
        """See Provider.stream_accountant."""
        return SSEAccountant(_carries_usage, _reduce, _delta_text, lambda data: '"message_stop"' in data)

    def prompt_text(self, api: str, doc: Any) -> str:
        """See Provider.prompt_text."""
        if not isinstance(doc, dict):
            return ""
        parts = [doc.get(k) for k in ("system", "messages", "tools")]
        return "\n".join(collect_text([p for p in parts if p is not None], _PROMPT_KEYS))

    def transform(self, api: str, doc: dict[str, Any], path: str, change: Change) -> tuple[bool, str | None]:
        """See Provider.transform."""
        changed = False
        if change.model and doc.get("model") != change.model:
            doc["model"] = change.model
            changed = True
        if change.max_tokens is not None:
            changed |= clamp(doc, "max_tokens", change.max_tokens)
        if change.system_prompt:
            prior = doc.get("system")
            block = {"type": "text", "text": change.system_prompt}
            if isinstance(prior, list):
                doc["system"] = [block, *prior]
            elif isinstance(prior, str) and prior:
                doc["system"] = [block, {"type": "text", "text": prior}]
            else:
                doc["system"] = change.system_prompt
            changed = True
        return changed, None

    def error_body(self, status: int, message: str) -> bytes:
        """See Provider.error_body."""
        etype = _ERROR_TYPES.get(status, "api_error")
        return json.dumps({"type": "error", "error": {"type": etype, "message": message}}).encode()


def _usage(input_side: dict[str, Any], output_side: dict[str, Any]) -> Usage:
    fresh = as_int(input_side.get("input_tokens"))
    write = as_int(input_side.get("cache_creation_input_tokens"))
    read = as_int(input_side.get("cache_read_input_tokens"))
    return Usage(
        input_tokens=fresh + write + read,
        cached_input_tokens=read,
        cache_write_tokens=write,
        output_tokens=as_int(output_side.get("output_tokens")),
    )


def _carries_usage(data: str) -> bool:
    return '"message_start"' in data or '"message_delta"' in data


def _reduce(docs: list[Any]) -> tuple[Usage | None, str | None]:
    # message_start holds the input side (and a placeholder output count); message_delta holds
    # the cumulative output count and, on newer API versions, the input side again.
    start: dict[str, Any] = {}
    delta: dict[str, Any] | None = None
    model = None
    for d in docs:
        if not isinstance(d, dict):
            continue
        if d.get("type") == "message_start" and isinstance(d.get("message"), dict):
            start = d["message"].get("usage") or {}
            model = d["message"].get("model") or model
        elif d.get("type") == "message_delta" and isinstance(d.get("usage"), dict):
            delta = d["usage"]
    if not start and delta is None:
        return None, model
    if delta is None:
        # Only message_start arrived: its output count is a placeholder, not the real figure.
        return _usage(start, {}), model
    input_side = {**start, **{k: v for k, v in delta.items() if v is not None and k != "output_tokens"}}
    return _usage(input_side, delta), model


def _delta_text(doc: Any) -> list[str]:
    if isinstance(doc, dict) and doc.get("type") == "content_block_delta":
        return collect_text(doc.get("delta"), _DELTA_KEYS)
    return []
