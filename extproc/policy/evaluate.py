"""Policy decisions as a pure function of the policies in force, the caller and the request."""

from __future__ import annotations

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


def decide(policies: tuple[Policy, ...], who: Subject, model: str | None) -> Decision:
    """Apply every policy bound to `who`: aliases, model rules, transforms, budgets, limits."""
    bound = sorted((p for p in policies if binds(p, who)), key=lambda p: p.applies_to.specificity)
    aliases: dict[str, str] = {}
    for p in bound:  # narrower policies override broader ones
        aliases.update(p.aliases)
    d = Decision(model=aliases.get(model, model) if model else model)
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
