"""Budget counters in Postgres, leased to each replica in slices.

A replica takes a slice of a counter's remaining budget (a lease) with one locked UPDATE and
admits requests against it in memory; the slices of all replicas are reserved on the counter,
so together they can never pass the cap. When little budget is left, a slice is exactly one
request's worst case, so admission becomes a per-request reservation and nothing is stranded.
Spending is settled in batches; idle slices are handed back; slices of a replica that died
expire and any replica releases them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from extproc.policy.budgets import Admission, Hold, Refusal, Settlement, crossed

log = structlog.get_logger("spendgate.budgets")

LEASE_TTL = dt.timedelta(minutes=15)
_TRUST = LEASE_TTL.total_seconds() / 2  # a slice not renewed for this long is not used
_IDLE_RETURN = 2.0  # seconds a slice may sit unused before it is handed back
_PER_REQUEST_BELOW = 20  # remaining budget, in worst-case requests, under which slices are one request
_SLICE_REQUESTS = 200  # otherwise a slice is this many requests' worst case, at most a tenth of what is left

_ENSURE = """
INSERT INTO budget_counters (budget_key, policy, scope, period, period_start, period_end, limit_usd)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (budget_key) DO UPDATE SET limit_usd = EXCLUDED.limit_usd
  WHERE budget_counters.limit_usd <> EXCLUDED.limit_usd
"""
# Lock order, everywhere: counters first, by budget_key, then lease rows. Taking a lease row
# before its counter (as settling once did) deadlocks against a concurrent refill.
_LOCK = "SELECT spent_usd, reserved_usd, limit_usd FROM budget_counters WHERE budget_key = %s FOR UPDATE"
_LOCK_ALL = "SELECT 1 FROM budget_counters WHERE budget_key = ANY(%s) ORDER BY budget_key FOR UPDATE"
_LOCK_EXPIRED = """
SELECT 1 FROM budget_counters WHERE budget_key IN (
  SELECT budget_key FROM budget_reservations WHERE expires_at < now()
) ORDER BY budget_key FOR UPDATE
"""
_GRANT_ROW = """
INSERT INTO budget_reservations (request_id, budget_key, amount, expires_at) VALUES (%s, %s, %s, %s)
ON CONFLICT (request_id, budget_key)
  DO UPDATE SET amount = budget_reservations.amount + EXCLUDED.amount, expires_at = EXCLUDED.expires_at
"""
_SHRINK_ROW = """
UPDATE budget_reservations SET amount = amount - %s, expires_at = %s
WHERE request_id = %s AND budget_key = %s RETURNING amount
"""
_RELEASE_EXPIRED = """
WITH gone AS (DELETE FROM budget_reservations WHERE expires_at < now() RETURNING budget_key, amount),
     per_key AS (SELECT budget_key, sum(amount) AS amount FROM gone GROUP BY budget_key)
UPDATE budget_counters c SET reserved_usd = greatest(c.reserved_usd - per_key.amount, 0), updated_at = now()
FROM per_key WHERE c.budget_key = per_key.budget_key
RETURNING c.budget_key
"""


class BudgetUnavailable(Exception):
    """Postgres could not be asked; a budgeted request is refused rather than let through unchecked."""


@dataclass
class _Slice:
    """This replica's lease on one counter."""

    hold: Hold
    available: Decimal = Decimal(0)  # leased and not promised to any request
    renewed: float = 0.0  # monotonic time Postgres last confirmed the lease
    used: float = 0.0  # monotonic time a request last drew on it
    # Nearly exhausted: what a request did not spend goes straight back to the counter, where
    # every replica can use it, instead of waiting in this replica's slice.
    per_request: bool = False
    # Bumped when the slice is started afresh; an amount taken out before that must not be put
    # back into the new lease, which never held it.
    epoch: int = 0

    def trusted(self, now: float) -> bool:
        """Whether Postgres confirmed the lease recently enough to admit against it."""
        return now - self.renewed <= _TRUST


class BudgetStore:
    """Admit against leases, settle spending, hand back and sweep leases."""

    def __init__(self, dsn: str, *, max_connections: int = 8, interval: float = 0.1) -> None:
        self._pool = AsyncConnectionPool(
            dsn, min_size=1, max_size=max_connections, open=False, kwargs={"autocommit": True}, timeout=1.0
        )
        self._lease_id = f"lease:{uuid.uuid4()}"
        self._slices: dict[str, _Slice] = {}
        self._refill = asyncio.Lock()
        self._queue: deque[Settlement] = deque()
        self._refunds: dict[str, Decimal] = defaultdict(Decimal)  # unspent promises to release at flush
        self._interval = interval
        self.reservations = 0  # counters for metrics and tests
        self.refusals = 0
        self.threshold_crossings = 0

    async def open(self) -> None:
        """Open the connection pool (without waiting for Postgres to be reachable)."""
        await self._pool.open(wait=False)

    async def close(self) -> None:
        """Settle what is queued, hand every lease back, close."""
        await self.flush()
        await self._hand_back(list(self._slices))
        await self._pool.close()

    # -- admission -------------------------------------------------------------------------
    def _take_local(self, adm: Admission) -> bool:
        now = time.monotonic()
        slices = [self._slices.get(h.budget_key) for h in adm.holds]
        if any(s is None or not s.trusted(now) or s.available < adm.amount for s in slices):
            return False
        for s in slices:
            assert s is not None
            s.available -= adm.amount
            s.used = now
        return True

    async def reserve(self, adm: Admission) -> Refusal | None:
        """Promise `adm.amount` on every hold, all or nothing; a Refusal names the full budget."""
        if self._take_local(adm):
            self.reservations += 1
            return None
        async with self._refill:
            if self._take_local(adm):  # another request refilled while this one waited
                self.reservations += 1
                return None
            try:
                await self._lease(adm)
            except _Refused as refused:
                self.refusals += 1
                return refused.refusal
            except (psycopg.Error, OSError, TimeoutError) as exc:
                raise BudgetUnavailable(str(exc)) from exc
        self.reservations += 1
        return None

    async def _lease(self, adm: Admission) -> None:
        """Promise `adm.amount` on every hold: what its slice holds now, the rest leased in one transaction.

        The slices' share is taken out before the first await: requests admitted from the same
        slices meanwhile (they need no lock) can then never be promised the same money, and the
        fresh lease is certain to cover this request. If leasing fails, the share goes back.
        """
        now = time.monotonic()
        taken: dict[str, tuple[_Slice, int, Decimal]] = {}
        for h in adm.holds:
            s = self._slices.get(h.budget_key)
            if s is not None and s.trusted(now):
                # Negative after a request cost more than it reserved: then the lease makes up for it.
                take = min(s.available, adm.amount)
                s.available -= take
                taken[h.budget_key] = (s, s.epoch, take)
        short = {
            h.budget_key: adm.amount - (taken[h.budget_key][2] if h.budget_key in taken else Decimal(0))
            for h in adm.holds
        }
        grants: dict[str, Decimal] = {}
        per_request: dict[str, bool] = {}
        try:
            await self._lease_rows(adm, short, grants, per_request)
        except BaseException:
            for s, epoch, take in taken.values():
                if s.epoch == epoch:
                    s.available += take
            raise
        now = time.monotonic()
        for h in adm.holds:
            s = self._slices.setdefault(h.budget_key, _Slice(h))
            if h.budget_key not in taken:
                # Not trusted (or new): the sweeper may have released the old lease, so what the
                # slice says it holds is void.
                s.available = Decimal(0)
                s.epoch += 1
            s.available += grants[h.budget_key] - short[h.budget_key]
            s.per_request = per_request[h.budget_key]
            s.renewed = now
            s.used = now

    async def _lease_rows(
        self,
        adm: Admission,
        short: dict[str, Decimal],
        grants: dict[str, Decimal],
        per_request: dict[str, bool],
    ) -> None:
        """Lease what each slice is `short` of, in one transaction, in the holds' fixed (lock) order."""
        expires = dt.datetime.now(dt.UTC) + LEASE_TTL
        async with self._pool.connection() as conn:
            # Counters are created in a transaction of their own, so that a refusal (which rolls
            # the leasing back) still leaves the counter for `spendgate budgets` to show.
            async with conn.transaction():
                for h in adm.holds:
                    await conn.execute(
                        _ENSURE,
                        (h.budget_key, h.policy, h.scope, h.period, h.period_start, h.period_end, h.limit),
                    )
            await self._grant(conn, adm, short, grants, per_request, expires)

    async def _grant(
        self,
        conn: psycopg.AsyncConnection[Any],
        adm: Admission,
        short: dict[str, Decimal],
        grants: dict[str, Decimal],
        per_request: dict[str, bool],
        expires: dt.datetime,
    ) -> None:
        """Lock each counter in the holds' fixed order and lease what this replica is short of."""
        async with conn.transaction():
            for h in adm.holds:
                need = max(short[h.budget_key], Decimal(0))
                row = await (await conn.execute(_LOCK, (h.budget_key,))).fetchone()
                assert row is not None
                spent, reserved, limit = row
                remaining = limit - spent - reserved
                if need > remaining and not h.shadow:
                    raise _Refused(Refusal(h, spent, reserved))  # the transaction rolls back
                if h.shadow and need > remaining:
                    log.info("budget.shadow_rejection", request_id=adm.request_id, budget=h.budget_key)
                grant = need
                per_request[h.budget_key] = remaining < adm.amount * _PER_REQUEST_BELOW
                if not per_request[h.budget_key]:
                    grant = max(need, min(remaining / 10, adm.amount * _SLICE_REQUESTS))
                if grant > 0:
                    await conn.execute(
                        "UPDATE budget_counters SET reserved_usd = reserved_usd + %s, updated_at = now()"
                        " WHERE budget_key = %s",
                        (grant, h.budget_key),
                    )
                    await conn.execute(_GRANT_ROW, (self._lease_id, h.budget_key, grant, expires))
                grants[h.budget_key] = grant

    # -- settlement ------------------------------------------------------------------------
    def settle(self, settlement: Settlement) -> None:
        """A request that held a promise ended: free what it did not spend, queue what it did."""
        adm = settlement.admission
        for h in adm.holds:
            s = self._slices.get(h.budget_key)
            if s is not None and not s.per_request:
                s.available += adm.amount - settlement.cost
            else:
                self._refunds[h.budget_key] += adm.amount - settlement.cost
        self._queue.append(settlement)

    async def run(self) -> None:
        """Settle queued spending, hand back idle slices, release expired leases now and then."""
        ticks = 0
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()
            ticks += 1
            if ticks % 600 == 0:  # about once a minute
                await self.sweep()

    async def flush(self) -> None:
        """Move settled spending from this replica's leases to `spent`, renew the leases."""
        idle = [
            k for k, s in self._slices.items() if s.available > 0 and time.monotonic() - s.used > _IDLE_RETURN
        ]
        if idle:
            await self._hand_back(idle)
        if not self._queue:
            return
        # Both are taken out before the first await, so that a flush running meanwhile (close()
        # during the periodic one) cannot settle the same spending twice or drop newer spending;
        # a failed flush puts them back.
        batch = list(self._queue)
        self._queue.clear()
        refunds, self._refunds = self._refunds, defaultdict(Decimal)
        spent: dict[str, Decimal] = defaultdict(Decimal)
        holds: dict[str, Hold] = {}
        for st in batch:
            for h in st.admission.holds:
                spent[h.budget_key] += st.cost
                holds[h.budget_key] = h
        expires = dt.datetime.now(dt.UTC) + LEASE_TTL
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(_LOCK_ALL, (sorted(spent),))
                for key in sorted(spent):
                    out = spent[key] + refunds.get(key, Decimal(0))
                    lease = await (
                        await conn.execute(_SHRINK_ROW, (out, expires, self._lease_id, key))
                    ).fetchone()
                    # Without its lease row (swept after a long outage) the reservation is gone already.
                    release = out if lease is not None else Decimal(0)
                    cur = await conn.execute(
                        "UPDATE budget_counters SET spent_usd = spent_usd + %s,"
                        " reserved_usd = greatest(reserved_usd - %s, 0), updated_at = now()"
                        " WHERE budget_key = %s RETURNING spent_usd, limit_usd",
                        (spent[key], release, key),
                    )
                    row = await cur.fetchone()
                    if row is not None:
                        self._announce(holds[key], row[0] - spent[key], row[0], row[1])
        except BaseException as exc:
            self._queue.extendleft(reversed(batch))
            for key, amount in refunds.items():
                self._refunds[key] += amount
            if not isinstance(exc, psycopg.Error | OSError | TimeoutError):
                raise
            log.warning("budget.settle_deferred", requests=len(batch), error=type(exc).__name__)
            return
        now = time.monotonic()
        for key in spent:
            if key in self._slices:
                self._slices[key].renewed = now

    async def _hand_back(self, keys: list[str]) -> None:
        """Return unpromised slices to their counters, so other replicas can use them."""
        # Taken out of the slices before the first await: a request admitted from a slice while
        # Postgres is asked must find the amount already gone, not have it subtracted from under
        # its promise afterwards (which drove the slice negative and the counter below what was
        # promised). A failed hand-back puts it back.
        give: dict[str, Decimal] = {}
        taken: dict[str, int] = {}
        for k in keys:
            s = self._slices[k]
            if s.available > 0:
                give[k], taken[k] = s.available, s.epoch
                s.available = Decimal(0)
        if not give:
            return
        expires = dt.datetime.now(dt.UTC) + LEASE_TTL
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(_LOCK_ALL, (sorted(give),))
                for key in sorted(give):
                    lease = await (
                        await conn.execute(_SHRINK_ROW, (give[key], expires, self._lease_id, key))
                    ).fetchone()
                    if lease is not None:
                        await conn.execute(
                            "UPDATE budget_counters SET reserved_usd = greatest(reserved_usd - %s, 0),"
                            " updated_at = now() WHERE budget_key = %s",
                            (give[key], key),
                        )
        except BaseException as exc:
            for key, amount in give.items():
                s = self._slices[key]
                if s.epoch == taken[key]:
                    s.available += amount
            if not isinstance(exc, psycopg.Error | OSError | TimeoutError):
                raise
            log.warning("budget.hand_back_deferred", counters=len(give), error=type(exc).__name__)

    def _announce(self, hold: Hold, before: Decimal, after: Decimal, limit: Decimal) -> None:
        for t in crossed(hold.thresholds, limit, before, after):
            self.threshold_crossings += 1
            log.warning(
                "budget.threshold_crossed", budget=hold.budget_key, threshold=t, spent_usd=str(after),
                limit_usd=str(limit),
            )  # fmt: skip

    async def sweep(self) -> None:
        """Release the leases of replicas that died (expired and never renewed)."""
        with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(_LOCK_EXPIRED)
                released = await (await conn.execute(_RELEASE_EXPIRED)).fetchall()
                if released:
                    log.warning("budget.expired_leases_released", counters=len(released))


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
