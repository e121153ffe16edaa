"""Policy decisions as a pure function of the policies in force, the caller and the request."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from extproc.policy.budgets import Hold, holds_for
from extproc.policy.schema import Budget, Policy, RateLimit


@dataclass(frozen=True)
class Subject:
    """Who is calling, as the key table knows it."""

    key_id: str
    key_name: str
    key_prefix: str
    team: str | None
    project: str | None
    policy: str | None  # a policy named on the key itself binds it whatever its applies_to says


@dataclass
class Decision:
    """What the bound policies make of one request."""

    model: str | None
    reject: str | None = None  # a reason for 403
    shadow: list[str] = field(default_factory=list)  # what shadow policies would have rejected
    max_tokens: int | None = None
    system_prompt: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # shared with the Binding: read only


def binds(policy: Policy, who: Subject) -> bool:
    """Whether a policy applies to a caller."""
    a = policy.applies_to
    return (
        a.all
        or policy.name == who.policy
        or (a.team is not None and a.team == who.team)
        or (a.project is not None and a.project == who.project)
        or (a.key is not None and a.key in (who.key_name, who.key_prefix))
    )


class Binding:
    """What the policies bound to one caller decide whatever the request: worked out once per
    policy set and caller (see `PolicySet.binding`), then shared by that caller's requests."""

    def __init__(self, policies: tuple[Policy, ...], who: Subject) -> None:
        self.who = who
        # Broad first, so that narrower policies override broader ones.
        self.policies = tuple(
            sorted((p for p in policies if binds(p, who)), key=lambda p: p.applies_to.specificity)
        )
        self.aliases: dict[str, str] = {}
        self.max_tokens: int | None = None
        self.system_prompt: str | None = None
        self.tags: dict[str, str] = {}
        self.budgets: list[tuple[Policy, Budget]] = []
        self.rate_limits: list[tuple[Policy, RateLimit]] = []
        for p in self.policies:
            self.aliases.update(p.aliases)
            t = p.transforms
            if t.max_tokens is not None:
                # Clamps combine to the tightest: a broad cap can't be loosened by a narrow policy.
                self.max_tokens = (
                    t.max_tokens if self.max_tokens is None else min(self.max_tokens, t.max_tokens)
                )
            if t.system_prompt is not None:
                self.system_prompt = t.system_prompt
            self.tags.update(t.tags)
            self.budgets += [(p, b) for b in p.budgets]
            self.rate_limits += [(p, r) for r in p.rate_limits]
        self._holds: tuple[dt.date, tuple[Hold, ...]] | None = None

    def holds(self, now: dt.datetime) -> tuple[Hold, ...]:
        """The budget counters this caller's requests fit in at `now` (a UTC time).

        Every period starts at a UTC midnight, so the counters change only with the date.
        """
        day = now.date()
        if self._holds is None or self._holds[0] != day:
            w = self.who
            self._holds = (day, holds_for(self.budgets, w.key_id, w.team, w.project, now))
        return self._holds[1]


def decide(
    binding: Binding,
    model: str | None,
    *,
    input_tokens: Callable[[], int] = lambda: 0,
    draw: float = 0.0,
) -> Decision:
    """Apply the bound policies to one request: routing, model rules and transforms.

    `input_tokens` is called only if a downgrade rule needs the count; `draw`, uniform in [0, 1),
    picks the branch of a weighted split (the caller supplies the randomness).
    """
    b = binding
    d = Decision(
        model=_route(b.policies, b.aliases.get(model, model) if model else model, input_tokens, draw),
        max_tokens=b.max_tokens,
        system_prompt=b.system_prompt,
        tags=b.tags,
    )
    for p in b.policies:
        reason = _model_refusal(p, d.model)
        if reason is not None:
            if p.shadow:
                d.shadow.append(reason)
            elif d.reject is None:
                d.reject = reason
    return d


def _route(
    bound: tuple[Policy, ...], model: str | None, input_tokens: Callable[[], int], draw: float
) -> str | None:
    """The narrowest matching downgrade (when the input is small enough), then split."""
    if model is None:
        return None
    for p in reversed(bound):
        rule = next((r for r in p.routing.downgrade if fnmatchcase(model, r.model)), None)
        if rule is not None:
            if input_tokens() < rule.max_input_tokens:
                model = rule.to
            break
    for p in reversed(bound):
        split = next((s for s in p.routing.split if fnmatchcase(model, s.model)), None)
        if split is not None:
            total = sum(w.weight for w in split.to)
            point, acc = draw * total, 0
            for branch in split.to:
                acc += branch.weight
                if point < acc:
                    return branch.model
            return split.to[-1].model
    return model


def _model_refusal(policy: Policy, model: str | None) -> str | None:
    rules = policy.models
    if not rules.allow and not rules.deny:
        return None
    name = model or ""
    denied = next((pat for pat in rules.deny if fnmatchcase(name, pat)), None)
    if denied is not None:
        return f"model '{name}' is not allowed by policy '{policy.name}' (denied by '{denied}')"
    if rules.allow and not any(fnmatchcase(name, pat) for pat in rules.allow):
        return f"model '{name}' is not allowed by policy '{policy.name}' (allowed: {', '.join(rules.allow)})"
    return None
