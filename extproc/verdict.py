"""The gatekeeper's answer to an Admission, as plain data the Exchange turns into a reply.

Keeping the verdict a value (not callbacks into the Exchange) lets the decision, its I/O and
its effect on the request be tested apart, and lets a test interleave admissions at will.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.policy.budgets import Refusal
from extproc.policy.limits import Throttle


@dataclass(frozen=True)
class Granted:
    """Every rate limit had room and every budget reserved the worst case."""

    budget_held: bool  # a reservation exists and must be settled when the request ends


@dataclass(frozen=True)
class Throttled:
    """A rate limit had no room: nothing was charged, nothing reserved."""

    throttle: Throttle


@dataclass(frozen=True)
class OverBudget:
    """A budget could not hold the worst-case cost; rate limits were already charged."""

    refusal: Refusal


@dataclass(frozen=True)
class Unavailable:
    """The budget store could not be asked: a budgeted request is not let through unchecked."""

    reason: str


Verdict = Granted | Throttled | OverBudget | Unavailable
