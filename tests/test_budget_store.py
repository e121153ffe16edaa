"""The budget store against a real Postgres: leases, per-request mode near the cap, hand-back, sweeping."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from extproc.budget_store import _LOCK, _SLICE_REQUESTS, BudgetStore
from extproc.policy.budgets import Admission, Hold, Settlement
from tests.support import migrated_database

AMOUNT = Decimal("0.01")


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    with migrated_database() as url:
        yield url


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[BudgetStore]:
    s = BudgetStore(dsn)
    await s.open()
    yield s
    await s.close()


def hold(limit: str) -> Hold:
    now = dt.datetime.now(dt.UTC)
    key = f"test/{uuid.uuid4().hex}"
    return Hold(key, "test", "global", "day", now, now + dt.timedelta(days=1), Decimal(limit), False, (0.8,))


def admission(h: Hold) -> Admission:
    return Admission(str(uuid.uuid4()), (h,), AMOUNT)


def counter(dsn: str, h: Hold) -> tuple[Decimal, Decimal]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT spent_usd, reserved_usd FROM budget_counters WHERE budget_key = %s", (h.budget_key,)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


async def test_a_roomy_budget_is_leased_in_a_slice_of_many_requests(dsn: str, store: BudgetStore) -> None:
    h = hold("100")
    for _ in range(10):
        assert await store.reserve(admission(h)) is None
    _, reserved = counter(dsn, h)
    assert reserved == AMOUNT * _SLICE_REQUESTS  # one slice covered all ten: one round trip, not ten


async def test_a_nearly_spent_budget_is_reserved_one_request_at_a_time(dsn: str, store: BudgetStore) -> None:
    h = hold("0.05")
    assert await store.reserve(admission(h)) is None
    assert counter(dsn, h) == (0, AMOUNT)


async def test_settling_moves_the_real_cost_to_spent_and_idle_slices_go_back(
    dsn: str, store: BudgetStore
) -> None:
    h = hold("100")
    adm = admission(h)
    await store.reserve(adm)
    store.settle(Settlement(adm, Decimal("0.004"), 0, True))
    await store.flush()
    spent, _ = counter(dsn, h)
    assert spent == Decimal("0.004")
    await store.close()  # hands every slice back
    assert counter(dsn, h) == (Decimal("0.004"), 0)


async def test_two_replicas_racing_never_pass_the_cap(dsn: str) -> None:
    h = hold("0.105")  # room for ten promises and a half
    replicas = [BudgetStore(dsn), BudgetStore(dsn)]
    for r in replicas:
        await r.open()
    try:
        results = await asyncio.gather(*(replicas[i % 2].reserve(admission(h)) for i in range(40)))
        granted = sum(1 for r in results if r is None)
        assert granted == 10
        _, reserved = counter(dsn, h)
        assert reserved <= Decimal("0.105")
    finally:
        for r in replicas:
            await r.close()


async def test_refusal_names_the_budget(dsn: str, store: BudgetStore) -> None:
    h = hold("0.005")
    refusal = await store.reserve(admission(h))
    assert refusal is not None and "policy 'test'" in refusal.message(AMOUNT)


async def test_leases_of_a_replica_that_died_are_released_by_the_sweep(dsn: str, store: BudgetStore) -> None:
    h = hold("100")
    dead = BudgetStore(dsn)
    await dead.open()
    await dead.reserve(admission(h))
    with psycopg.connect(dsn, autocommit=True) as conn:  # it never renews: its lease expires
        conn.execute(
            "UPDATE budget_reservations SET expires_at = now() - interval '1 s' WHERE budget_key = %s",
            (h.budget_key,),
        )
    await store.sweep()
    assert counter(dsn, h) == (0, 0)
    await dead._pool.close()  # it "died": closed without handing anything back


async def lease_row_free_while_counter_held(dsn: str, h: Hold, work: Callable[[], Awaitable[None]]) -> bool:
    """Hold `h`'s counter lock while `work` runs; whether its lease row stayed unlocked meanwhile.

    Every writer takes counters before lease rows; one that took the lease row first would
    deadlock against a refill, which locks the counter and then writes its lease row.
    """
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("SELECT 1 FROM budget_counters WHERE budget_key = %s FOR UPDATE", (h.budget_key,))
        task = asyncio.create_task(work())
        await asyncio.sleep(0.3)  # `work` is now waiting on the counter, holding whatever it took before
        try:
            await conn.execute(
                "SELECT 1 FROM budget_reservations WHERE budget_key = %s FOR UPDATE NOWAIT", (h.budget_key,)
            )
            free = True
        except psycopg.errors.LockNotAvailable:
            free = False
        await conn.rollback()
    await task
    return free


async def test_settling_locks_the_counter_before_the_lease_row(dsn: str, store: BudgetStore) -> None:
    h = hold("100")
    adm = admission(h)
    await store.reserve(adm)
    store.settle(Settlement(adm, Decimal("0.004"), 0, True))
    assert await lease_row_free_while_counter_held(dsn, h, store.flush)
    assert counter(dsn, h)[0] == Decimal("0.004")


async def test_handing_back_locks_the_counter_before_the_lease_row(dsn: str, store: BudgetStore) -> None:
    h = hold("100")
    await store.reserve(admission(h))
    assert await lease_row_free_while_counter_held(dsn, h, lambda: store._hand_back([h.budget_key]))
    assert counter(dsn, h)[1] == AMOUNT  # only the promised request's share stays reserved


async def test_the_sweep_locks_the_counter_before_the_lease_row(dsn: str, store: BudgetStore) -> None:
    h = hold("100")
    dead = BudgetStore(dsn)
    await dead.open()
    await dead.reserve(admission(h))
    await dead._pool.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE budget_reservations SET expires_at = now() - interval '1 s' WHERE budget_key = %s",
            (h.budget_key,),
        )
    assert await lease_row_free_while_counter_held(dsn, h, store.sweep)
    assert counter(dsn, h) == (0, 0)


# -- promises are taken out of a slice before any await ---------------------------------------------
async def waiting_on_locks(dsn: str, count: int) -> None:
    """Return once `count` other sessions wait on a row lock (the ones the test holds up)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(500):
            row = await (
                await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            ).fetchone()
            if row is not None and row[0] >= count:
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} sessions ever waited on a lock")


async def hold_counter(dsn: str, h: Hold) -> psycopg.AsyncConnection[tuple[object, ...]]:
    conn = await psycopg.AsyncConnection.connect(dsn)
    await conn.execute("SELECT 1 FROM budget_counters WHERE budget_key = %s FOR UPDATE", (h.budget_key,))
    return conn


async def test_a_reserve_during_a_hand_back_cannot_drive_the_slice_negative(
    dsn: str, store: BudgetStore
) -> None:
    h = hold("100")
    first = admission(h)
    await store.reserve(first)  # leases a slice of 200 requests, one of them promised
    held = await hold_counter(dsn, h)
    hand_back = asyncio.create_task(store._hand_back([h.budget_key]))
    await waiting_on_locks(dsn, 1)  # the hand-back is blocked in Postgres, half done
    second = asyncio.create_task(store.reserve(admission(h)))
    await asyncio.sleep(0.05)  # let the reserve draw on the slice if it still can
    await held.rollback()  # release the counter
    await held.close()
    await asyncio.gather(hand_back, second)
    assert second.result() is None
    slice_ = store._slices[h.budget_key]
    assert slice_.available >= 0
    # Both promises are still reserved on the counter, besides whatever the slice kept.
    _, reserved = counter(dsn, h)
    assert reserved == 2 * AMOUNT + slice_.available


async def test_a_request_admitted_during_a_refill_cannot_take_the_refills_share(
    dsn: str, store: BudgetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = hold("1")
    await store.reserve(admission(h))  # a slice of $0.10 leased, $0.09 unpromised
    # Pause the refill just before it locks the counter, after it worked out what it is short of.
    paused, go = asyncio.Event(), asyncio.Event()
    execute = psycopg.AsyncConnection.execute

    async def execute_after_go(self: psycopg.AsyncConnection[Any], query: Any, *args: Any, **kw: Any) -> Any:
        if query == _LOCK and not go.is_set():
            paused.set()
            await go.wait()
        return await execute(self, query, *args, **kw)

    monkeypatch.setattr(psycopg.AsyncConnection, "execute", execute_after_go)
    # $0.10 is more than the slice holds: the slice's $0.09 plus the cent it is short of, leased
    # per request (only $0.90 is left, under 20 such requests).
    big = asyncio.create_task(store.reserve(Admission(str(uuid.uuid4()), (h,), Decimal("0.10"))))
    await paused.wait()
    small = asyncio.create_task(store.reserve(admission(h)))
    await asyncio.sleep(0.05)  # let it draw on the slice if it still can
    go.set()
    refusals = await asyncio.gather(big, small)
    assert all(r is None for r in refusals)  # both admitted, neither tripped over the other
    slice_ = store._slices[h.budget_key]
    assert slice_.available >= 0
    _, reserved = counter(dsn, h)
    assert reserved == AMOUNT + Decimal("0.10") + AMOUNT + slice_.available


async def test_overlapping_flushes_settle_each_request_exactly_once(dsn: str, store: BudgetStore) -> None:
    h = hold("100")
    a, b = admission(h), admission(h)
    await store.reserve(a)
    await store.reserve(b)
    store.settle(Settlement(a, Decimal("0.004"), 0, True))
    held = await hold_counter(dsn, h)
    periodic = asyncio.create_task(store.flush())
    await waiting_on_locks(dsn, 1)
    store.settle(Settlement(b, Decimal("0.003"), 0, True))
    closing = asyncio.create_task(store.flush())  # as close() does while the periodic one waits
    await waiting_on_locks(dsn, 2)
    await held.rollback()
    await held.close()
    await asyncio.gather(periodic, closing)
    assert counter(dsn, h)[0] == Decimal("0.007")
    assert not store._queue


async def test_a_failed_hand_back_keeps_the_slice(dsn: str, store: BudgetStore) -> None:
    h = hold("100")
    await store.reserve(admission(h))
    before = store._slices[h.budget_key].available
    await store._pool.close()  # Postgres can no longer be asked
    await store._hand_back([h.budget_key])
    assert store._slices[h.budget_key].available == before
    store._pool = AsyncConnectionPool(dsn, min_size=1, open=False, kwargs={"autocommit": True})
    await store._pool.open()
