"""Budget counters in Postgres: reservations before forwarding, settlement after, sweeping.

Reservations are one conditional UPDATE per counter, all in one transaction taken in a fixed
order, so concurrent requests on any number of replicas can never sum past a cap. Settlement
is batched off the request path; a replica that dies leaves reservations that any replica
releases once they expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import defaultdict, deque
from decimal import Decimal
from typing import Any

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from extproc.policy.budgets import Admission, Refusal, Settlement, crossed

log = structlog.get_logger("spendgate.budgets")

RESERVATION_TTL = dt.timedelta(minutes=15)  # longer than any request: route timeout is 600 s

_ENSURE = """
INSERT INTO budget_counters (budget_key, policy, scope, period, period_start, period_end, limit_usd)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (budget_key) DO UPDATE SET limit_usd = EXCLUDED.limit_usd
  WHERE budget_counters.limit_usd <> EXCLUDED.limit_usd
"""
_RESERVE = """
UPDATE budget_counters SET reserved_usd = reserved_usd + %(amount)s, updated_at = now()
WHERE budget_key = %(key)s AND (%(shadow)s OR spent_usd + reserved_usd + %(amount)s <= limit_usd)
RETURNING spent_usd, reserved_usd, limit_usd
"""
_RELEASE = """
WITH gone AS (DELETE FROM budget_reservations WHERE {where} RETURNING budget_key, amount),
     per_key AS (SELECT budget_key, sum(amount) AS amount FROM gone GROUP BY budget_key)
UPDATE budget_counters c SET reserved_usd = greatest(c.reserved_usd - per_key.amount, 0), updated_at = now()
FROM per_key WHERE c.budget_key = per_key.budget_key
RETURNING c.budget_key
"""


class BudgetUnavailable(Exception):
    """Postgres could not be asked; a budgeted request is refused rather than let through unchecked."""


class BudgetStore:
    """Reserve, settle, sweep."""

    def __init__(self, dsn: str, *, max_connections: int = 8, interval: float = 0.1) -> None:
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=max_connections,
            open=False,
            kwargs={"autocommit": True},
            timeout=2.0,
        )
        self._queue: deque[Settlement] = deque()
        self._interval = interval
        self.reservations = 0  # counters for metrics and tests
        self.refusals = 0
        self.threshold_crossings = 0

    async def open(self) -> None:
        """Open the connection pool (without waiting for Postgres to be reachable)."""
        await self._pool.open(wait=False)

    async def close(self) -> None:
        """Settle what is queued, then close."""
        await self.flush()
        await self._pool.close()

    async def reserve(self, adm: Admission) -> Refusal | None:
        """Reserve `adm.amount` on every hold, all or nothing; a Refusal names the full budget."""
        try:
            async with self._pool.connection() as conn, conn.transaction():
                for h in adm.holds:
                    await conn.execute(
                        _ENSURE,
                        (h.budget_key, h.policy, h.scope, h.period, h.period_start, h.period_end, h.limit),
                    )
                for h in adm.holds:
                    cur = await conn.execute(
                        _RESERVE, {"amount": adm.amount, "key": h.budget_key, "shadow": h.shadow}
                    )
                    row = await cur.fetchone()
                    if row is None:
                        spent, reserved = await self._usage_of(conn, h.budget_key)
                        raise _Refused(Refusal(h, spent, reserved))
                    if h.shadow and row[0] + row[1] > row[2]:
                        log.info("budget.shadow_rejection", request_id=adm.request_id, budget=h.budget_key)
                expires = dt.datetime.now(dt.UTC) + RESERVATION_TTL
                async with conn.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO budget_reservations (request_id, budget_key, amount, expires_at)"
                        " VALUES (%s, %s, %s, %s)",
                        [(adm.request_id, h.budget_key, adm.amount, expires) for h in adm.holds],
                    )
        except _Refused as refused:
            self.refusals += 1
            return refused.refusal
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise BudgetUnavailable(str(exc)) from exc
        self.reservations += 1
        return None

    @staticmethod
    async def _usage_of(conn: psycopg.AsyncConnection[Any], key: str) -> tuple[Decimal, Decimal]:
        cur = await conn.execute(
            "SELECT spent_usd, reserved_usd FROM budget_counters WHERE budget_key = %s", (key,)
        )
        row = await cur.fetchone()
        return (row[0], row[1]) if row else (Decimal(0), Decimal(0))

    def settle(self, settlement: Settlement) -> None:
        """Queue the settlement of a request that holds a reservation; returns at once."""
        self._queue.append(settlement)

    async def run(self) -> None:
        """Settle queued requests, and release expired reservations now and then."""
        ticks = 0
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()
            ticks += 1
            if ticks % 600 == 0:  # about once a minute
                await self.sweep()

    async def flush(self) -> None:
        """Apply every queued settlement in one transaction; on failure keep them for the next try."""
        if not self._queue:
            return
        batch = list(self._queue)
        spent: dict[str, Decimal] = defaultdict(Decimal)
        thresholds = {}
        for s in batch:
            for h in s.admission.holds:
                spent[h.budget_key] += s.cost
                thresholds[h.budget_key] = h
        try:
            async with self._pool.connection() as conn, conn.transaction():
                ids = [s.admission.request_id for s in batch]
                await conn.execute(_RELEASE.format(where="request_id = ANY(%s)"), (ids,))
                for key in sorted(spent):
                    cur = await conn.execute(
                        "UPDATE budget_counters SET spent_usd = spent_usd + %s, updated_at = now()"
                        " WHERE budget_key = %s RETURNING spent_usd, limit_usd",
                        (spent[key], key),
                    )
                    row = await cur.fetchone()
                    if row is not None:
                        self._announce(thresholds[key], row[0] - spent[key], row[0], row[1])
        except (psycopg.Error, OSError, TimeoutError) as exc:
            log.warning("budget.settle_deferred", requests=len(batch), error=type(exc).__name__)
            return
        for _ in batch:
            self._queue.popleft()

    def _announce(self, hold: Any, before: Decimal, after: Decimal, limit: Decimal) -> None:
        for t in crossed(hold.thresholds, limit, before, after):
            self.threshold_crossings += 1
            log.warning(
                "budget.threshold_crossed",
                budget=hold.budget_key,
                threshold=t,
                spent_usd=str(after),
                limit_usd=str(limit),
            )

    async def sweep(self) -> None:
        """Release reservations of requests that never settled (their replica died)."""
        with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
            async with self._pool.connection() as conn:
                cur = await conn.execute(_RELEASE.format(where="expires_at < now()"))
                released = await cur.fetchall()
                if released:
                    log.warning("budget.expired_reservations_released", counters=len(released))


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
