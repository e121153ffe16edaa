"""The gatekeeper: the I/O of admission (rate limits, then budgets) and of settling afterwards."""

from __future__ import annotations

import structlog

from extproc.budget_store import BudgetStore, BudgetUnavailable
from extproc.policy.budgets import Admission, Settlement
from extproc.ratelimit import Limiter
from extproc.ratelimit import Verdict as LimiterVerdict
from extproc.verdict import Granted, OverBudget, Throttled, Unavailable, Verdict

log = structlog.get_logger("spendgate.admission")


class Gatekeeper:
    """Grants or refuses Admissions; settles them when requests end."""

    def __init__(self, budgets: BudgetStore, limiter: Limiter) -> None:
        self.budgets = budgets
        self.limiter = limiter
        self.throttles = 0

    async def admit(self, adm: Admission) -> Verdict:
        """Charge rate limits (all or nothing), then reserve budget; say what happened."""
        if adm.charges:
            try:
                limited = await self.limiter.take(adm.charges, adm.window, adm.reset_seconds)
            except Exception as exc:  # Redis down or slow: a limit that can't be checked is not enforced
                log.warning("ratelimit.unavailable", request_id=adm.request_id, error=type(exc).__name__)
                limited = LimiterVerdict(None)
            for would in limited.shadow:
                log.info("ratelimit.shadow_rejection", request_id=adm.request_id, reason=would.message())
            if limited.throttle is not None:
                self.throttles += 1
                return Throttled(limited.throttle)
        if not adm.holds:
            return Granted(budget_held=False)
        try:
            refusal = await self.budgets.reserve(adm)
        except BudgetUnavailable as exc:
            log.warning("budget.unavailable", request_id=adm.request_id, error=str(exc)[:200])
            return Unavailable(str(exc)[:200])
        return Granted(budget_held=True) if refusal is None else OverBudget(refusal)

    def settle(self, s: Settlement) -> None:
        """Called from the request path when a granted request ends; returns at once."""
        if s.budget_held:
            self.budgets.settle(s)
        for c in s.admission.charges:
            if c.kind == "tokens" and s.tokens != c.amount:
                self.limiter.correct(c.counter, s.admission.window, s.tokens - c.amount)
