"""Token usage in one shape for every provider, and the usage record written per request."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


@dataclass(frozen=True)
class Usage:
    """Tokens of one request, with the same meaning whatever the provider.

    input_tokens counts every billed input token, cached or not; cached_input_tokens and
    cache_write_tokens are parts of it. output_tokens counts every billed output token;
    reasoning_tokens is the part spent thinking.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    # The part of cache_write_tokens written with a one-hour lifetime (Anthropic prices it higher).
    cache_write_1h_tokens: int = 0


def as_int(value: Any) -> int:
    """A token count from provider JSON, where absent or null means zero."""
    return int(value) if isinstance(value, int | float) else 0


@dataclass
class UsageRecord:
    """One row of `usage_events`."""

    request_id: str
    ts: dt.datetime
    provider: str
    api: str
    key_id: uuid.UUID | None = None
    team: str | None = None
    project: str | None = None
    model_requested: str | None = None
    model_used: str | None = None
    upstream: str | None = None
    usage: Usage = field(default_factory=Usage)
    cost_usd: Decimal | None = None
    price_version: str | None = None
    latency_ms: int | None = None
    ttft_ms: int | None = None
    status: int = 0
    outcome: str = "complete"
    stream: bool = False
    cache_hit: bool = False
    estimated: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    # Why this record deserves a second look: "implausible_usage", "fail_open", ...
    flags: tuple[str, ...] = ()

    COLUMNS = (
        "request_id",
        "ts",
        "key_id",
        "team",
        "project",
        "provider",
        "api",
        "model_requested",
        "model_used",
        "upstream",
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cache_write_1h_tokens",
        "cost_usd",
        "price_version",
        "latency_ms",
        "ttft_ms",
        "status",
        "outcome",
        "stream",
        "cache_hit",
        "estimated",
        "tags",
        "flags",
    )

    def row(self) -> tuple[Any, ...]:
        """Values in COLUMNS order, ready for COPY (tags stay a dict for the writer to encode; flags a list)."""
        u = self.usage
        return (
            self.request_id,
            self.ts,
            self.key_id,
            self.team,
            self.project,
            self.provider,
            self.api,
            self.model_requested,
            self.model_used,
            self.upstream,
            u.input_tokens,
            u.cached_input_tokens,
            u.cache_write_tokens,
            u.output_tokens,
            u.reasoning_tokens,
            u.cache_write_1h_tokens,
            self.cost_usd,
            self.price_version,
            self.latency_ms,
            self.ttft_ms,
            self.status,
            self.outcome,
            self.stream,
            self.cache_hit,
            self.estimated,
            self.tags,
            list(self.flags),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict, the spool file's line format."""
        out = dict(zip(self.COLUMNS, self.row(), strict=True))
        out["ts"] = self.ts.isoformat()
        out["key_id"] = str(self.key_id) if self.key_id else None
        out["cost_usd"] = str(self.cost_usd) if self.cost_usd is not None else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageRecord:
        """Inverse of to_json."""
        usage = Usage(
            data["input_tokens"],
            data["cached_input_tokens"],
            data["cache_write_tokens"],
            data["output_tokens"],
            data["reasoning_tokens"],
            # Spool lines written before these fields existed lack them.
            data.get("cache_write_1h_tokens", 0),
        )
        return cls(
            request_id=data["request_id"],
            ts=dt.datetime.fromisoformat(data["ts"]),
            provider=data["provider"],
            api=data["api"],
            key_id=uuid.UUID(data["key_id"]) if data["key_id"] else None,
            team=data["team"],
            project=data["project"],
            model_requested=data["model_requested"],
            model_used=data["model_used"],
            upstream=data["upstream"],
            usage=usage,
            cost_usd=Decimal(data["cost_usd"]) if data["cost_usd"] is not None else None,
            price_version=data["price_version"],
            latency_ms=data["latency_ms"],
            ttft_ms=data["ttft_ms"],
            status=data["status"],
            outcome=data["outcome"],
            stream=data["stream"],
            cache_hit=data["cache_hit"],
            estimated=data["estimated"],
            tags=data["tags"],
            flags=tuple(data.get("flags", ())),
        )
