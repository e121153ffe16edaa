"""The typed schema of policy files (policies/*.yaml, every file but pricing.yaml)."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AppliesTo(_Strict):
    """Who a policy binds: everyone, or keys of a team, a project, or one key (by name or prefix)."""

    all: bool = False
    team: str | None = None
    project: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> AppliesTo:
        chosen = [self.all, self.team is not None, self.project is not None, self.key is not None]
        if sum(chosen) != 1:
            raise ValueError("applies_to needs exactly one of: all: true, team, project, key")
        return self

    @property
    def specificity(self) -> int:
        """Higher binds more narrowly; the narrowest transform wins."""
        return 3 if self.key else 2 if self.project else 1 if self.team else 0


class ModelRules(_Strict):
    """Glob patterns (fnmatch) on the requested model, after aliases."""

    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)


class Transforms(_Strict):
    """Changes made to every request the policy binds."""

    max_tokens: int | None = Field(default=None, gt=0)
    system_prompt: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)


class Downgrade(_Strict):
    """Send small requests for a large model to a smaller one."""

    model: str  # glob on the requested (aliased) model
    to: str
    max_input_tokens: int = Field(gt=0)


class Weighted(_Strict):
    """One branch of a split."""

    model: str
    weight: int = Field(gt=0)


class Split(_Strict):
    """Spread requests for a model over several, by weight."""

    model: str  # glob on the requested (aliased) model
    to: list[Weighted] = Field(min_length=1)


class Routing(_Strict):
    """Model routing beyond aliases; applied after aliases, before model rules."""

    downgrade: list[Downgrade] = Field(default_factory=list)
    split: list[Split] = Field(default_factory=list)


class Budget(_Strict):
    """A USD cap per period, counted per key, team, project or for everyone bound."""

    period: Literal["day", "week", "month"]
    limit_usd: Decimal = Field(gt=0)
    per: Literal["key", "team", "project", "global"] = "key"
    thresholds: list[float] = Field(default_factory=lambda: [0.8])

    @field_validator("limit_usd", mode="before")
    @classmethod
    def _no_float(cls, v: object) -> object:
        return str(v) if isinstance(v, float) else v

    @field_validator("thresholds")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < t < 1 for t in v):
            raise ValueError("thresholds are fractions between 0 and 1, e.g. 0.8")
        return sorted(v)


class RateLimit(_Strict):
    """Requests and tokens per minute, per key or per team."""

    per: Literal["key", "team"] = "key"
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _something(self) -> RateLimit:
        if self.requests_per_minute is None and self.tokens_per_minute is None:
            raise ValueError("a rate limit needs requests_per_minute or tokens_per_minute")
        return self


class Policy(_Strict):
    """One named policy."""

    name: str = Field(min_length=1)
    applies_to: AppliesTo
    shadow: bool = False  # log what it would reject; reject nothing
    models: ModelRules = Field(default_factory=ModelRules)
    aliases: dict[str, str] = Field(default_factory=dict)
    routing: Routing = Field(default_factory=Routing)
    transforms: Transforms = Field(default_factory=Transforms)
    budgets: list[Budget] = Field(default_factory=list)
    rate_limits: list[RateLimit] = Field(default_factory=list)
    # Requests Spendgate does not meter that may still be forwarded: "METHOD /path" globs,
    # e.g. "POST /v1/files" or "POST /v1/images/*". Keys under a budget never get them.
    passthrough: list[str] = Field(default_factory=list)

    @field_validator("passthrough")
    @classmethod
    def _method_and_path(cls, v: list[str]) -> list[str]:
        for entry in v:
            method, _, path = entry.partition(" ")
            if not method.isupper() or not path.startswith("/"):
                raise ValueError(
                    f"'{entry}': a passthrough entry is 'METHOD /path-glob', e.g. 'POST /v1/files'"
                )
        return v


class PolicyFile(_Strict):
    """The top level of a policy file."""

    policies: list[Policy]
