"""The price table and the cost of a request as an exact decimal.

The table ships inside the package (extproc/pricing.yaml), so `spendgate up` prices requests from
any directory; a `pricing.yaml` in the policy directory replaces it as a whole.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from extproc.usage import Usage

PER_MILLION = Decimal(1_000_000)

PRICING_FILE = "pricing.yaml"
# Package data (pyproject.toml), next to this module in a wheel as in a checkout.
SHIPPED_PRICES = Path(__file__).with_name(PRICING_FILE)


def price_table_path(policies: Path | None) -> Path:
    """The price table in force for a policy directory: its own pricing.yaml, else the shipped one.

    A user's table replaces the shipped one whole rather than being merged into it: a model the
    user removed must not come back priced from the shipped list.
    """
    if policies is not None:
        own = policies / PRICING_FILE
        if own.exists():
            return own
    return SHIPPED_PRICES


# The dearest list price seen is $600 per million (o1-pro output). A price above this cap is far
# more likely a slipped decimal point ("2500" for "2.50") than a real model, and it would make
# every reservation on that model refuse.
MAX_PRICE = Decimal(1000)
# No model writes ten million tokens in one answer; a larger limit is a typo, and it would be
# reserved in full on every request that sets no max_tokens.
MAX_OUTPUT_TOKENS = 10_000_000

# USD per million tokens: exact, finite, not negative, not absurd.
Price = Annotated[Decimal, Field(ge=0, le=MAX_PRICE, allow_inf_nan=False)]


class Rates(BaseModel):
    """One price card: what each part of a request's tokens costs, USD per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Price
    cached_input: Price
    output: Price
    cache_write: Price | None = None
    cache_write_1h: Price | None = None

    @field_validator("input", "cached_input", "output", "cache_write", "cache_write_1h", mode="before")
    @classmethod
    def _no_float(cls, v: object) -> object:
        # YAML floats like 0.1 are not exact; go through their shortest text form.
        return str(v) if isinstance(v, float) else v

    @model_validator(mode="after")
    def _cache_read_not_dearer(self) -> Self:
        # Every provider discounts cache reads; a dearer read almost always means the two
        # fields were swapped, which would bill every uncached token at the cache price.
        if self.cached_input > self.input:
            raise ValueError(f"cached_input ({self.cached_input}) is dearer than input ({self.input})")
        return self

    @property
    def write_5m(self) -> Decimal:
        """The price of a cache write with the default lifetime (Anthropic: 5 minutes)."""
        return self.cache_write if self.cache_write is not None else self.input

    @property
    def write_1h(self) -> Decimal:
        """The price of a one-hour cache write; without its own price, that of any cache write."""
        return self.cache_write_1h if self.cache_write_1h is not None else self.write_5m

    @property
    def dearest_input(self) -> Decimal:
        """The most any one input token can cost on this card, whichever part it lands in."""
        return max(self.input, self.cached_input, self.write_5m, self.write_1h)


class PriceTier(Rates):
    """The card that prices a whole request once its prompt is longer than `above_input_tokens`."""

    above_input_tokens: int = Field(gt=0, le=100_000_000)


class ModelPrice(Rates):
    """USD per million tokens for one model: a base card and, optionally, long-prompt tiers."""

    provider: Literal["openai", "anthropic", "gemini"]
    max_output_tokens: int = Field(default=0, ge=0, le=MAX_OUTPUT_TOKENS)
    # Input tokens a request can hold at most. Reserved in full for a request that draws on
    # context held upstream (a stored conversation, a cached context, server-run tools), whose
    # input the body does not show; DEFAULT_CONTEXT_WINDOW when the table does not say.
    context_window: int | None = Field(default=None, gt=0, le=100_000_000)
    tiers: tuple[PriceTier, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        thresholds = [t.above_input_tokens for t in self.tiers]
        if thresholds != sorted(set(thresholds)):
            raise ValueError(
                "tiers must be listed by above_input_tokens, each threshold once, smallest first"
            )
        # A tier that forgot a cache price would silently bill those tokens at its plain input rate.
        for t in self.tiers:
            for name in ("cache_write", "cache_write_1h"):
                if getattr(self, name) is not None and getattr(t, name) is None:
                    raise ValueError(f"the tier above {t.above_input_tokens} input tokens needs {name} too")
        # The output ceiling of a request without max_tokens is max_output_tokens; zero would
        # reserve nothing for the answer. Only a model that bills no output (embeddings) may say 0.
        if self.max_output_tokens == 0 and any(c.output > 0 for c in self.cards()):
            raise ValueError("max_output_tokens must be positive for a model that bills output")
        return self

    def cards(self) -> tuple[Rates, ...]:
        """The base card and every tier card."""
        return (self, *self.tiers)

    def rates_for(self, input_tokens: int) -> Rates:
        """The card a request with this many input tokens is billed on, for all of its tokens.

        Providers price the whole request by its prompt size: the last tier whose threshold the
        prompt is strictly above, else the base card (a prompt of exactly the threshold stays on
        the cheaper side).
        """
        card: Rates = self
        for t in self.tiers:
            if input_tokens > t.above_input_tokens:
                card = t
        return card

    def cost(self, usage: Usage) -> Decimal:
        """USD cost of `usage`: each part of its tokens at its own price, on the card its prompt size picks."""
        total_in = max(usage.input_tokens, 0)
        # input_tokens counts every billed input token; the cached and written parts are slices of
        # it. A record whose parts add up to more (an estimate, a parser bug) is fitted inside the
        # total in a fixed order, so no token is billed twice and the reservation, which covers
        # input_tokens at the dearest input rate, stays an upper bound.
        cached = min(max(usage.cached_input_tokens, 0), total_in)
        writes = min(max(usage.cache_write_tokens, 0), total_in - cached)
        writes_1h = min(max(usage.cache_write_1h_tokens, 0), writes)
        uncached = total_in - cached - writes
        r = self.rates_for(total_in)
        total = (
            uncached * r.input
            + cached * r.cached_input
            + (writes - writes_1h) * r.write_5m
            + writes_1h * r.write_1h
            + max(usage.output_tokens, 0) * r.output
        )
        return total / PER_MILLION


class PriceTable(BaseModel):
    """A versioned price list."""

    model_config = ConfigDict(extra="forbid")

    version: str
    effective_date: dt.date
    currency: Literal["USD"] = "USD"
    models: dict[str, ModelPrice]

    def lookup(self, model: str | None) -> ModelPrice | None:
        """The price of a model, matching dated snapshots by the longest listed prefix."""
        if not model:
            return None
        name = model.removeprefix("models/")
        exact = self.models.get(name)
        if exact is not None:
            return exact
        best = max((m for m in self.models if name.startswith(m)), key=len, default=None)
        return self.models[best] if best else None

    def cost(self, model: str | None, usage: Usage) -> Decimal | None:
        """USD cost of `usage` on `model`, each part at its own price; None if the model is unpriced."""
        price = self.lookup(model)
        return price.cost(usage) if price is not None else None
