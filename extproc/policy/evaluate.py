"""Policy decisions as a pure function of the policies in force, the caller and the request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from extproc.policy.schema import Budget, Policy, RateLimit


@dataclass(frozen=True)
class Subject:
    """Who is calling, as the key table knows it."""

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
    tags: dict[str, str] = field(default_factory=dict)
    budgets: list[tuple[Policy, Budget]] = field(default_factory=list)
    rate_limits: list[tuple[Policy, RateLimit]] = field(default_factory=list)


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


def decide(
    policies: tuple[Policy, ...],
    who: Subject,
    model: str | None,
    *,
    input_tokens: Callable[[], int] = lambda: 0,
    draw: float = 0.0,
) -> Decision:
    """Apply every policy bound to `who`: routing, model rules, transforms, budgets, limits.

    `input_tokens` is called only if a downgrade rule needs the count; `draw`, uniform in [0, 1),
    picks the branch of a weighted split (the caller supplies the randomness).
    """
    bound = sorted((p for p in policies if binds(p, who)), key=lambda p: p.applies_to.specificity)
    aliases: dict[str, str] = {}
    for p in bound:  # narrower policies override broader ones
        aliases.update(p.aliases)
    d = Decision(model=_route(bound, aliases.get(model, model) if model else model, input_tokens, draw))
    for p in bound:
        reason = _model_refusal(p, d.model)
        if reason is not None:
            if p.shadow:
                d.shadow.append(reason)
            elif d.reject is None:
                d.reject = reason
        t = p.transforms
        if t.max_tokens is not None:
            # Clamps combine to the tightest: a broad cap can't be loosened by a narrow policy.
            d.max_tokens = t.max_tokens if d.max_tokens is None else min(d.max_tokens, t.max_tokens)
        if t.system_prompt is not None:
            d.system_prompt = t.system_prompt
        d.tags.update(t.tags)
        d.budgets += [(p, b) for b in p.budgets]
        d.rate_limits += [(p, r) for r in p.rate_limits]
    return d


def _route(
    bound: list[Policy], model: str | None, input_tokens: Callable[[], int], draw: float
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
