"""The price table (policies/pricing.yaml) and the cost of a request as an exact decimal."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from extproc.usage import Usage

PER_MILLION = Decimal(1_000_000)


class ModelPrice(BaseModel):
    """USD per million tokens for one model."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["openai", "anthropic", "gemini"]
    input: Decimal
    cached_input: Decimal
    output: Decimal
    cache_write: Decimal | None = None
    max_output_tokens: int = 0

    @field_validator("input", "cached_input", "output", "cache_write", mode="before")
    @classmethod
    def _no_float(cls, v: object) -> object:
        # YAML floats like 0.1 are not exact; go through their shortest text form.
        return str(v) if isinstance(v, float) else v


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
        if price is None:
            return None
        uncached = max(usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens, 0)
        write_price = price.cache_write if price.cache_write is not None else price.input
        total = (
            uncached * price.input
            + usage.cached_input_tokens * price.cached_input
            + usage.cache_write_tokens * write_price
            + usage.output_tokens * price.output
        )
        return total / PER_MILLION
