"""Budget arithmetic as pure functions: periods, counters a request must fit in, cost ceilings."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from extproc.policy.limits import Charge
from extproc.policy.schema import Budget, Policy
from extproc.pricing import PER_MILLION, ModelPrice


@dataclass(frozen=True)
class Hold:
    """One budget counter a request must fit in."""

    budget_key: str
    policy: str
    scope: str
    period: str
    period_start: dt.datetime
    period_end: dt.datetime
    limit: Decimal
    shadow: bool
    thresholds: tuple[float, ...]


@dataclass(frozen=True)
class Admission:
    """What a request must be granted before it is forwarded: rate-limit charges, then budget."""

    request_id: str
    holds: tuple[Hold, ...]  # budget counters
    amount: Decimal  # the worst-case cost, reserved on every hold
    charges: tuple[Charge, ...] = ()  # rate-limit counters
    window: int = 0  # the rate-limit window the charges were taken in
    reset_seconds: int = 0


@dataclass(frozen=True)
class Settlement:
    """A finished request: release its reservation, add its real cost, correct its token charge."""

    admission: Admission
    cost: Decimal
    tokens: int  # tokens really used (input + output), to correct tokens-per-minute charges
    budget_held: bool  # False when the budget refused it: there is no reservation to release


@dataclass(frozen=True)
class Refusal:
    """A budget that had no room: enough to write a clear 429."""

    hold: Hold
    spent: Decimal
    reserved: Decimal

    def message(self, amount: Decimal) -> str:
        """Names the budget, what is left and what was asked."""
        h = self.hold
        left = max(h.limit - self.spent - self.reserved, Decimal(0))
        return (
            f"budget exceeded: policy '{h.policy}' allows ${h.limit:.2f} per {h.period} for {h.scope}; "
            f"${left:.6f} is left and this request may cost up to ${amount:.6f}. "
            f"It resets at {h.period_end.isoformat()}."
        )


def period_bounds(period: str, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The UTC calendar period (day, ISO week from Monday, month) containing `now`."""
    day = dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC)
    if period == "day":
        return day, day + dt.timedelta(days=1)
    if period == "week":
        start = day - dt.timedelta(days=day.weekday())
        return start, start + dt.timedelta(days=7)
    start = day.replace(day=1)
    nxt = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, nxt


def scope_of(budget: Budget, key_id: str, team: str | None, project: str | None) -> str | None:
    """The counter scope of a budget for a caller; None when the caller has no such attribute."""
    if budget.per == "key":
        return f"key:{key_id}"
    if budget.per == "team":
        return f"team:{team}" if team else None
    if budget.per == "project":
        return f"project:{project}" if project else None
    return "global"


def holds_for(
    budgets: list[tuple[Policy, Budget]], key_id: str, team: str | None, project: str | None, now: dt.datetime
) -> tuple[Hold, ...]:
    """Every counter a request must fit in, in a fixed order (the lock order in Postgres)."""
    out = {}
    for policy, b in budgets:
        scope = scope_of(b, key_id, team, project)
        if scope is None:
            continue
        start, end = period_bounds(b.period, now)
        bkey = f"{policy.name}/{b.period}/{scope}/{start.date().isoformat()}"
        out[bkey] = Hold(
            bkey, policy.name, scope, b.period, start, end, b.limit_usd, policy.shadow, tuple(b.thresholds)
        )
    return tuple(out[k] for k in sorted(out))


def ceiling(price: ModelPrice | None, input_tokens: int, max_output: int | None) -> Decimal | None:
    """Worst-case cost: every input token at the dearest input rate, plus the full output ceiling.

    "Dearest" is taken over the base card and every long-prompt tier, whatever `input_tokens`
    says: the count is tiktoken's estimate of the request body, while the provider picks the tier
    by its own count, which can be far larger (another tokenizer, images and files, a Gemini
    cachedContent or an OpenAI previous_response_id that the body only names). A tier cheaper
    than the base card is covered too. The price of that safety is a reservation up to the tier
    premium (2x input, 1.5x output) above the likely cost; settlement returns the difference.
    None when the model has no price (it can't be budgeted, so it is refused).
    """
    if price is None:
        return None
    out_tokens = max_output if max_output is not None else price.max_output_tokens
    cards = price.cards()
    input_rate = max(c.dearest_input for c in cards)
    output_rate = max(c.output for c in cards)
    return (max(input_tokens, 0) * input_rate + max(out_tokens, 0) * output_rate) / PER_MILLION


def crossed(thresholds: tuple[float, ...], limit: Decimal, before: Decimal, after: Decimal) -> list[float]:
    """The soft thresholds a settlement moved spending across."""
    return [t for t in thresholds if before < limit * Decimal(str(t)) <= after]
