"""Policy decisions as a pure function of the policies in force, the caller and the request."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from extproc.policy.budgets import Hold, holds_for
from extproc.policy.limits import Charge, charges_for
from extproc.policy.schema import Budget, Policy, RateLimit

_REMEMBERED_MODELS = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DOT_SEGMENT = re.compile(r"\\|(?:^|/)\.\.?(?:/|$)")


def canonical_model(name: str | None) -> str:
    """A model name as rules and prices compare it: trimmed, lower case, no `models/` prefix.

    Providers resolve `GPT-4o`, ` gpt-4o ` and `models/gpt-4o` alike (or refuse them); a rule
    that compared raw text would let a respelling through.
    """
    return (name or "").strip().lower().removeprefix("models/")


def model_name_problem(name: str) -> str | None:
    """Why a requested model name cannot be checked safely, or None.

    Upstreams that route on the name (Gemini's path, gateways' `vendor/model`) would resolve
    `allowed/../other` to `other` while a glob sees `allowed...`: such names have no single meaning.
    """
    if len(name) > 256:
        return "is longer than 256 characters"
    if _CONTROL.search(name):
        return "contains a control character"
    if _DOT_SEGMENT.search(name):
        return "contains a '.' or '..' path segment or a backslash"
    return None


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
    shadow: tuple[str, ...] = ()  # what shadow policies would have rejected
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
        self.aliases: dict[str, str] = {}  # canonical name -> model to send
        self.passthrough: list[str] = []
        self.max_tokens: int | None = None
        self.system_prompt: str | None = None
        self.tags: dict[str, str] = {}
        self.budgets: list[tuple[Policy, Budget]] = []
        self.rate_limits: list[tuple[Policy, RateLimit]] = []
        for p in self.policies:
            self.aliases.update({canonical_model(k): v for k, v in p.aliases.items()})
            self.passthrough += p.passthrough
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
        self.routes = any(p.routing.downgrade or p.routing.split for p in self.policies)
        self._holds: tuple[dt.date, tuple[Hold, ...]] | None = None
        self._counters: tuple[Charge, ...] | None = None
        self._verdicts: dict[str | None, tuple[str | None, tuple[str, ...]]] = {}

    def holds(self, now: dt.datetime) -> tuple[Hold, ...]:
        """The budget counters this caller's requests fit in at `now` (a UTC time).

        Every period starts at a UTC midnight, so the counters change only with the date.
        """
        day = now.date()
        if self._holds is None or self._holds[0] != day:
            w = self.who
            self._holds = (day, holds_for(self.budgets, w.key_id, w.team, w.project, now))
        return self._holds[1]

    def charges(self, tokens: int) -> tuple[Charge, ...]:
        """The rate-limit charges of one request that counts `tokens` tokens."""
        if self._counters is None:
            self._counters = charges_for(self.rate_limits, self.who.key_id, self.who.team, 0)
        return tuple(
            c if c.kind == "requests" else Charge(c.counter, c.kind, c.limit, tokens, c.shadow)
            for c in self._counters
        )

    def passes_through(self, method: str, path: str) -> bool:
        """Whether a bound policy lets an unmetered `method path` be forwarded."""
        request = f"{method} {path}"
        return any(fnmatchcase(request, pattern) for pattern in self.passthrough)

    def verdict(self, model: str | None) -> tuple[str | None, tuple[str, ...]]:
        """What the model rules say of `model`: a reason to reject it, and what shadow rules
        would have rejected. Kept for the first models a caller asks for."""
        found = self._verdicts.get(model)
        if found is None:
            reject, shadow = None, []
            for p in self.policies:
                reason = _model_refusal(p, model)
                if reason is not None:
                    if p.shadow:
                        shadow.append(reason)
                    elif reject is None:
                        reject = reason
            found = (reject, tuple(shadow))
            if len(self._verdicts) < _REMEMBERED_MODELS:  # model names come from callers
                self._verdicts[model] = found
        return found


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
    routed = b.aliases.get(canonical_model(model), model) if model else model
    if b.routes:
        routed = _route(b.policies, routed, input_tokens, draw)
    reject, shadow = b.verdict(routed)
    return Decision(routed, reject, shadow, b.max_tokens, b.system_prompt, b.tags)


def _route(
    bound: tuple[Policy, ...], model: str | None, input_tokens: Callable[[], int], draw: float
) -> str | None:
    """The narrowest matching downgrade (when the input is small enough), then split."""
    if model is None:
        return None
    for p in reversed(bound):
        rule = next((r for r in p.routing.downgrade if _matches(model, r.model)), None)
        if rule is not None:
            if input_tokens() < rule.max_input_tokens:
                model = rule.to
            break
    for p in reversed(bound):
        split = next((s for s in p.routing.split if _matches(model, s.model)), None)
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
    denied = next((pat for pat in rules.deny if _matches(name, pat)), None)
    if denied is not None:
        return f"model '{name}' is not allowed by policy '{policy.name}' (denied by '{denied}')"
    if rules.allow and not any(_matches(name, pat) for pat in rules.allow):
        return f"model '{name}' is not allowed by policy '{policy.name}' (allowed: {', '.join(rules.allow)})"
    return None


def _matches(model: str, pattern: str) -> bool:
    return fnmatchcase(canonical_model(model), canonical_model(pattern))
