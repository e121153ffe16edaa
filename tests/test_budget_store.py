"""The budget store against a real Postgres: leases, per-request mode near the cap, hand-back, sweeping."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal

import psycopg
import pytest

from extproc.budget_store import _SLICE_REQUESTS, BudgetStore
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
