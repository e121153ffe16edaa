"""Anthropic's Messages API wire protocol."""

from __future__ import annotations

import functools
import json
from typing import Any

from extproc.providers.base import (
    FREE_METHODS,
    UPSTREAM_CONTEXT_TOKENS,
    BadRequest,
    Change,
    ParsedRequest,
    Reported,
    SSEAccountant,
    StreamAccountant,
    UsageReader,
    capped,
    clamp,
    collect_text,
    count_field,
    json_text,
    load_json_object,
    optional_object,
    optional_str,
    stream_flag,
    visible_text,
    walk_dicts,
)
from extproc.usage import Usage

MESSAGES = "messages"
COUNT_TOKENS = "messages.count_tokens"

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

# -- input tiktoken cannot read: worst cases per part ------------------------------------------
# Images: Claude sees 28x28 px patches, a token each, after shrinking a larger image to its
# native maximum: 1568 px on the long edge and ~1.15 MP (~1,600 tokens) up to Claude 4.6, 2576 px
# on the long edge for Opus 4.7. A 2576x2576 image is 92x92 patches: 8,464 tokens. Source:
# Anthropic's vision guide ("Evaluate image size", "Calculate image costs").
IMAGE_TOKENS = 8_464
# PDFs (document blocks with a base64, url or file source) reach the model as each page's text
# plus an image of it, at most 100 pages per request; a page's text runs 1,500-3,000 tokens
# (Anthropic's PDF support guide). The page limit is per request: reserved once.
PDF_PAGES_PER_REQUEST = 100
PDF_TEXT_TOKENS_PER_PAGE = 3_000
# A request with tools gets a tool-use system prompt the body does not show: up to 530 tokens
# by model and tool_choice (tool use overview, "Pricing").
TOOL_SYSTEM_PROMPT_TOKENS = 600
# Tools Anthropic runs itself: their results (search hits, fetched pages, program output) are
# billed as input of the same request.
_SERVER_TOOL_PREFIXES = ("web_search", "web_fetch", "code_execution", "tool_search", "mcp")


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
        thinking = optional_object(doc, "thinking")
        if thinking is not None:
            # Thinking is part of the output max_tokens bounds; the budget is only checked.
            count_field(thinking, "budget_tokens")
        return ParsedRequest(
            model=model,
            stream=stream_flag(doc),
            max_tokens=count_field(doc, "max_tokens"),
            extra_input_tokens=_unseen_input(doc),
            body=doc,
        )

    def response_usage(self, api: str, doc: Any) -> Reported:
        """See Provider.response_usage."""
        if not isinstance(doc, dict):
            return Reported()
        reader = UsageReader()
        raw = reader.obj(doc, "usage")
        return reader.reported(_usage(raw, raw, reader) if raw else None, doc.get("model"))

    def usage_from_response(self, api: str, doc: Any) -> tuple[Usage | None, str | None]:
        """See Provider.usage_from_response."""
        reported = self.response_usage(api, doc)
        return reported.usage, reported.model

    def stream_accountant(self, api: str, request: ParsedRequest) -> StreamAccountant:
        """See Provider.stream_accountant."""
        return SSEAccountant(
            _carries_usage,
            _reduce,
            _delta_text,
            lambda data: '"message_stop"' in data,
            whole=functools.partial(self.response_usage, api),
        )

    def prompt_text(self, api: str, doc: Any) -> str:
        """See Provider.prompt_text. Tool definitions count as their JSON."""
        if not isinstance(doc, dict):
            return ""
        parts = visible_text([doc.get("system"), doc.get("messages")])
        parts.append(json_text(doc.get("tools")))
        return "\n".join(p for p in parts if p)

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


def _usage(input_side: dict[str, Any], output_side: dict[str, Any], reader: UsageReader) -> Usage:
    fresh = reader.get(input_side, "input_tokens")
    write = reader.get(input_side, "cache_creation_input_tokens")
    read = reader.get(input_side, "cache_read_input_tokens")
    # cache_creation splits the writes by lifetime; a one-hour write is priced higher.
    breakdown = reader.obj(input_side, "cache_creation")
    one_hour = reader.get(breakdown, "ephemeral_1h_input_tokens")
    if input_side.get("cache_creation_input_tokens") is None and breakdown:
        write = reader.get(breakdown, "ephemeral_5m_input_tokens") + one_hour
    return reader.usage(
        Usage(
            input_tokens=fresh + write + read,
            cached_input_tokens=read,
            cache_write_tokens=write,
            output_tokens=reader.get(output_side, "output_tokens"),
            cache_write_1h_tokens=one_hour,
        )
    )


def _carries_usage(data: str) -> bool:
    return '"message_start"' in data or '"message_delta"' in data


def _reduce(docs: list[Any]) -> Reported:
    # message_start holds the input side (and a placeholder output count); message_delta holds
    # the cumulative output count and, on newer API versions, the input side again.
    start: dict[str, Any] | None = None
    delta: dict[str, Any] | None = None
    model: Any = None
    for d in docs:
        if not isinstance(d, dict):
            continue
        if d.get("type") == "message_start" and isinstance(d.get("message"), dict):
            message = d["message"]
            start = message["usage"] if isinstance(message.get("usage"), dict) else {}
            model = message.get("model") if isinstance(message.get("model"), str) else model
        elif d.get("type") == "message_delta" and isinstance(d.get("usage"), dict):
            delta = d["usage"]
    reader = UsageReader()
    if not start and delta is None:
        return reader.reported(None, model)
    if delta is None:
        # Only message_start arrived: its output count is a placeholder, not the real figure.
        return reader.reported(_usage(start or {}, {}, reader), model)
    newer = {k: v for k, v in delta.items() if v is not None and k != "output_tokens"}
    return reader.reported(_usage({**(start or {}), **newer}, delta, reader), model)


def _unseen_input(doc: dict[str, Any]) -> int:
    """A worst case in tokens for the input of a request that tiktoken cannot read."""
    total = 0
    documents = False
    for part in walk_dicts(doc.get("system"), doc.get("messages")):
        kind = part.get("type")
        if kind == "image":
            total += IMAGE_TOKENS
        elif kind == "document":
            source = part.get("source")
            # A text or content source is text the prompt count already reads.
            if not (isinstance(source, dict) and source.get("type") in ("text", "content")):
                documents = True
    if documents:
        total += PDF_PAGES_PER_REQUEST * (IMAGE_TOKENS + PDF_TEXT_TOKENS_PER_PAGE)
    tools = doc.get("tools")
    if isinstance(tools, list) and tools:
        total += TOOL_SYSTEM_PROMPT_TOKENS
        if any(
            isinstance(t, dict) and str(t.get("type", "")).startswith(_SERVER_TOOL_PREFIXES) for t in tools
        ):
            total += UPSTREAM_CONTEXT_TOKENS
    elif doc.get("mcp_servers"):
        total += UPSTREAM_CONTEXT_TOKENS
    return capped(total)


def _delta_text(doc: Any) -> list[str]:
    if isinstance(doc, dict) and doc.get("type") == "content_block_delta":
        return collect_text(doc.get("delta"), _DELTA_KEYS)
    return []
