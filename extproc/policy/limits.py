"""Rate-limit arithmetic as pure functions: fixed one-minute windows, charges per request."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from extproc.policy.schema import Policy, RateLimit

WINDOW_SECONDS = 60


@dataclass(frozen=True)
class Charge:
    """What one request takes from one limit in the current window."""

    counter: str  # policy / scope / kind, without the window
    kind: Literal["requests", "tokens"]
    limit: int
    amount: int
    shadow: bool


@dataclass(frozen=True)
class Throttle:
    """A limit with no room left: enough for a clear 429 and OpenAI-style headers."""

    charge: Charge
    used: int
    reset_seconds: int

    def message(self) -> str:
        """Names the limit and when it resets."""
        c = self.charge
        policy, scope, _ = c.counter.split("/", 2)
        return (
            f"rate limit exceeded: policy '{policy}' allows {c.limit} {c.kind} per minute for {scope}; "
            f"{self.used} used, this request needs {c.amount}. Retry in {self.reset_seconds} s."
        )

    def headers(self) -> tuple[tuple[str, str], ...]:
        """retry-after and the x-ratelimit-* headers OpenAI's clients understand."""
        c, left = self.charge, max(self.charge.limit - self.used, 0)
        return (
            ("retry-after", str(self.reset_seconds)),
            (f"x-ratelimit-limit-{c.kind}", str(c.limit)),
            (f"x-ratelimit-remaining-{c.kind}", str(left)),
            (f"x-ratelimit-reset-{c.kind}", f"{self.reset_seconds}s"),
        )


def window(now: dt.datetime) -> tuple[int, int]:
    """The current window's number and the seconds until it ends."""
    epoch = int(now.timestamp())
    return epoch // WINDOW_SECONDS, WINDOW_SECONDS - epoch % WINDOW_SECONDS


def charges_for(
    limits: list[tuple[Policy, RateLimit]], key_id: str, team: str | None, tokens: int
) -> tuple[Charge, ...]:
    """Every counter a request must fit in, in a fixed order."""
    out = []
    for policy, rl in limits:
        if rl.per == "team" and not team:
            continue
        scope = f"key:{key_id}" if rl.per == "key" else f"team:{team}"
        if rl.requests_per_minute is not None:
            out.append(
                Charge(
                    f"{policy.name}/{scope}/requests", "requests", rl.requests_per_minute, 1, policy.shadow
                )
            )
        if rl.tokens_per_minute is not None:
            out.append(
                Charge(f"{policy.name}/{scope}/tokens", "tokens", rl.tokens_per_minute, tokens, policy.shadow)
            )
    return tuple(sorted(out, key=lambda c: c.counter))
