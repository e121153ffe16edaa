"""Token usage in one shape for every provider, and the usage record written per request."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
import uuid
from dataclasses import dataclass, field
from decimal import Context, Decimal
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


def as_int(value: Any, ceiling: int = 2**53) -> int:
    """A token count from provider JSON: always an int in [0, ceiling].

    Absent or null means zero, and so does anything that is not a plain count: a boolean, a
    negative, NaN or an infinity, a fraction, an object. A float with no fractional part (12.0)
    and a decimal string ("12", protobuf's JSON form of a 64-bit integer) read as that integer.
    Whoever needs to know that a value was bad asks `providers.base.count_problem`.
    """
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not value.is_integer():  # NaN and the infinities included
            return 0
        number = int(value)
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        # int() refuses strings of more than 4300 digits; anything past 20 is over the ceiling.
        number = int(value) if len(value) <= 20 else ceiling
    else:
        return 0
    return min(max(number, 0), ceiling)


# Column limits of usage_events. numeric(30,18) holds |x| < 10^12 at 18 decimal places.
_COST_PLACES = Decimal(1).scaleb(-18)
_COST_MAX = Decimal("999999999999.999999999999999999")
_COST_CONTEXT = Context(prec=60)  # enough digits to quantize anything below _COST_MAX exactly
_BIGINT_MAX = 2**63 - 1
_INT_MAX = 2**31 - 1
_TEXT_MAX = 256
_TAG_KEY_MAX, _TAG_VALUE_MAX = 64, 256
# Control characters other than tab (Postgres text cannot hold NUL; the rest only confuse logs
# and terminals) and lone surrogates (not encodable as UTF-8, rejected by psycopg and by jsonb).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\ud800-\udfff]")

_TEXT_FIELDS = (
    "request_id",
    "provider",
    "api",
    "team",
    "project",
    "model_requested",
    "model_used",
    "upstream",
    "price_version",
    "outcome",
)

COST_OUT_OF_RANGE = "cost_out_of_range"
VALUE_OUT_OF_RANGE = "value_out_of_range"


def _clean_text(value: Any, limit: int = _TEXT_MAX) -> Any:
    if value is None:
        return None
    s = value if isinstance(value, str) else str(value)
    if _UNSAFE.search(s) is not None:
        s = _UNSAFE.sub(lambda m: "\ufffd" if m.group() >= "\ud800" else "", s)
    return s[:limit]


def _clamp_int(value: Any, hi: int, flags: set[str]) -> Any:
    """`value` within [0, hi]; a count, duration or status is never negative."""
    if isinstance(value, float):
        if not math.isfinite(value):
            flags.add(VALUE_OUT_OF_RANGE)
            return hi if value > 0 else 0
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        return value  # not a number at all: left for Postgres to refuse and the writer to dead-letter
    if value < 0 or value > hi:
        flags.add(VALUE_OUT_OF_RANGE)
        return 0 if value < 0 else hi
    return value


def _clamp_cost(value: Any, flags: set[str]) -> Any:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not isinstance(value, Decimal):
        return value
    if value.is_nan():
        flags.add(COST_OUT_OF_RANGE)
        return None  # no cost is better than a made-up one; the flag says why it is missing
    if value < 0:
        flags.add(COST_OUT_OF_RANGE)
        return Decimal(0)
    if value > _COST_MAX:
        flags.add(COST_OUT_OF_RANGE)
        return _COST_MAX
    if isinstance(exp := value.as_tuple().exponent, int) and exp < -18:
        # Postgres would round it the same way; doing it here keeps the spool line what is stored.
        return value.quantize(_COST_PLACES, context=_COST_CONTEXT)
    return value


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

    def sanitized(self) -> UsageRecord:
        """This record as Postgres will take it: a pure function, and sanitized() of it is itself.

        Text loses NUL, other control characters but tab, and lone surrogates (replaced by U+FFFD),
        and is cut to 256 characters (tag keys 64). Numbers are clamped into their columns: the
        cost into numeric(30,18) and at least 0, flagged "cost_out_of_range" (a NaN cost becomes
        unknown); tokens, latencies and status into [0, column maximum], flagged
        "value_out_of_range". A flag says a figure was changed, so no bad value passes silently.
        """
        flags: set[str] = set()
        u = self.usage
        counts = {f.name: getattr(u, f.name) for f in dataclasses.fields(u)}
        clamped = {k: _clamp_int(v, _BIGINT_MAX, flags) for k, v in counts.items()}
        changes: dict[str, Any] = {"usage": dataclasses.replace(u, **clamped)} if clamped != counts else {}
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if (clean := _clean_text(value)) is not value:
                changes[name] = clean
        for name in ("latency_ms", "ttft_ms", "status"):
            value = getattr(self, name)
            if (clamped_int := _clamp_int(value, _INT_MAX, flags)) is not value:
                changes[name] = clamped_int
        if (cost := _clamp_cost(self.cost_usd, flags)) is not self.cost_usd:
            changes["cost_usd"] = cost
        tags = {_clean_text(k, _TAG_KEY_MAX): _clean_text(v, _TAG_VALUE_MAX) for k, v in self.tags.items()}
        if tags != self.tags:
            changes["tags"] = tags
        own = tuple(_clean_text(f) for f in self.flags)
        new_flags = (*own, *sorted(flags - set(own)))
        if new_flags != self.flags:
            changes["flags"] = new_flags
        # A clean record, nearly all of them, comes back as itself: this runs on the event loop.
        return dataclasses.replace(self, **changes) if changes else self

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict of the sanitized record, the spool file's line format."""
        return self.sanitized()._json()

    def _json(self) -> dict[str, Any]:
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
