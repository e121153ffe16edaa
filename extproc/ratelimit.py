"""Rate-limit counters: in this process for a single host, in Redis to be exact across replicas."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from extproc.policy.limits import WINDOW_SECONDS, Charge, Throttle

log = structlog.get_logger("spendgate.ratelimit")

# All-or-nothing over every counter of a request: check all, then add to all.
# KEYS: counters; ARGV: ttl, then per counter: amount, limit, shadow (0/1).
# Returns {i, used} for the first full counter, or {0, 0, j1, used1, j2, used2...} listing the
# shadow counters the request went past (charged anyway: shadow limits refuse nothing).
_TAKE = """
local over = {}
for i = 1, #KEYS do
  local amount = tonumber(ARGV[3 * i - 1])
  local limit = tonumber(ARGV[3 * i])
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used + amount > limit then
    if ARGV[3 * i + 1] == '0' then return {i, used} end
    table.insert(over, i)
    table.insert(over, used)
  end
end
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], tonumber(ARGV[3 * i - 1]))
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1]))
end
local result = {0, 0}
for _, v in ipairs(over) do table.insert(result, v) end
return result
"""


@dataclass(frozen=True)
class Verdict:
    """A limiter's answer: the limit that refused, and shadow limits that would have."""

    throttle: Throttle | None
    shadow: tuple[Throttle, ...] = ()


class Limiter(Protocol):
    """Takes a request's charges in a window, and corrects token charges afterwards."""

    async def take(self, charges: tuple[Charge, ...], window: int, reset_seconds: int) -> Verdict:
        """Add every charge, or none and say which limit is full."""

    def correct(self, counter: str, window: int, delta: int) -> None:
        """Adjust a token counter by the difference between charged and used tokens; returns at once."""


class LocalLimiter:
    """Counters in this process: exact for one extproc process, per process otherwise."""

    def __init__(self) -> None:
        self._used: dict[tuple[str, int], int] = defaultdict(int)
        self._window = 0

    async def take(self, charges: tuple[Charge, ...], window: int, reset_seconds: int) -> Verdict:
        """See Limiter.take."""
        self._forget_before(window)
        shadow = []
        for c in charges:
            used = self._used[(c.counter, window)]
            if used + c.amount > c.limit:
                if not c.shadow:
                    return Verdict(Throttle(c, used, reset_seconds))
                shadow.append(Throttle(c, used, reset_seconds))
        for c in charges:
            self._used[(c.counter, window)] += c.amount
        return Verdict(None, tuple(shadow))

    def correct(self, counter: str, window: int, delta: int) -> None:
        """See Limiter.correct."""
        if (counter, window) in self._used:
            self._used[(counter, window)] += delta

    def _forget_before(self, window: int) -> None:
        if window != self._window:
            self._window = window
            for k in [k for k in self._used if k[1] < window - 1]:
                del self._used[k]


class RedisLimiter:
    """Counters in Redis, shared exactly by every replica."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self._redis: Any = redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._take = self._redis.register_script(_TAKE)
        self._pending: set[asyncio.Task[None]] = set()

    async def take(self, charges: tuple[Charge, ...], window: int, reset_seconds: int) -> Verdict:
        """See Limiter.take."""
        keys = [f"spendgate:rl:{c.counter}:{window}" for c in charges]
        args: list[Any] = [WINDOW_SECONDS * 2]
        for c in charges:
            args += [c.amount, c.limit, 1 if c.shadow else 0]
        index, used, *over = await self._take(keys=keys, args=args)
        if index != 0:
            return Verdict(Throttle(charges[int(index) - 1], int(used), reset_seconds))
        pairs = zip(over[::2], over[1::2], strict=True)
        return Verdict(None, tuple(Throttle(charges[int(i) - 1], int(u), reset_seconds) for i, u in pairs))

    def correct(self, counter: str, window: int, delta: int) -> None:
        """See Limiter.correct."""
        task = asyncio.get_running_loop().create_task(
            self._correct(f"spendgate:rl:{counter}:{window}", delta)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _correct(self, key: str, delta: int) -> None:
        try:
            if await self._redis.exists(key):
                await self._redis.incrby(key, delta)
        except Exception as exc:  # a lost correction only errs for the rest of one minute
            log.warning("ratelimit.correction_failed", error=type(exc).__name__)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
