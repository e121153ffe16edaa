"""The usage writer against a real Postgres: one bad row is dead-lettered, the rest of its batch written."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from extproc.usage import COST_OUT_OF_RANGE, UsageRecord
from extproc.writer import UsageWriter
from tests.support import migrated_database, usage_record

COST_MAX = Decimal("999999999999.999999999999999999")


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    with migrated_database() as url:
        yield url


@pytest.fixture
def unsanitized(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records reach COPY as they are, so that Postgres itself refuses the bad ones."""
    monkeypatch.setattr(UsageRecord, "sanitized", lambda self: self)


def events(dsn: str, recs: list[UsageRecord]) -> dict[str, dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(
            "SELECT * FROM usage_events WHERE request_id = ANY(%s)", ([r.request_id for r in recs],)
        )
        cols = [c.name for c in cur.description or []]
        return {row[0]: dict(zip(cols, row, strict=True)) for row in cur.fetchall()}


def dead(dsn: str, recs: list[UsageRecord]) -> list[tuple[str, str, dict[str, Any]]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT request_id, reason, record FROM usage_dead_letters WHERE request_id = ANY(%s)",
            ([r.request_id for r in recs],),
        ).fetchall()


def dead_file(spool: Path) -> list[dict[str, Any]]:
    path = spool.with_suffix(".dead.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def spool_lines(recs: list[UsageRecord]) -> str:
    return "".join(json.dumps(r.to_json()) + "\n" for r in recs)


async def test_nul_in_model_is_stripped_and_the_whole_batch_written(dsn: str, tmp_path: Path) -> None:
    w = UsageWriter(dsn, tmp_path / "spool.jsonl")
    recs = [usage_record() for _ in range(4)] + [usage_record(model_used="gpt\x00-4o", tags={"t\x00": "v\x00"})]
    for r in recs:
        w.enqueue(r)
    await w.close()
    got = events(dsn, recs)
    assert len(got) == 5 and w.dead_letters == 0
    assert (got[recs[-1].request_id]["model_used"], got[recs[-1].request_id]["tags"]) == ("gpt-4o", {"t": "v"})


async def test_cost_past_the_column_is_written_clamped_and_flagged(dsn: str, tmp_path: Path) -> None:
    w = UsageWriter(dsn, tmp_path / "spool.jsonl")
    r = usage_record(cost_usd=Decimal("1e17") * Decimal("0.00001"))  # 1e17 tokens at $10 per million
    w.enqueue(r)
    await w.close()
    got = events(dsn, [r])[r.request_id]
    assert (got["cost_usd"], got["flags"]) == (COST_MAX, [COST_OUT_OF_RANGE])


async def test_row_postgres_refuses_is_dead_lettered_and_the_rest_written(dsn: str, tmp_path: Path) -> None:
    w = UsageWriter(dsn, tmp_path / "spool.jsonl")
    recs = [usage_record() for _ in range(9)]
    recs[5] = usage_record(key_id="not-a-uuid")
    for r in recs:
        w.enqueue(r)
    await w.close()
    assert set(events(dsn, recs)) == {r.request_id for i, r in enumerate(recs) if i != 5}
    assert [d[0] for d in dead(dsn, recs)] == [recs[5].request_id]
    assert (w.written, w.dead_letters, w.spooled()) == (8, 1, 0)


async def test_dead_letter_keeps_the_postgres_error_and_the_record(dsn: str, tmp_path: Path) -> None:
    w = UsageWriter(dsn, tmp_path / "spool.jsonl")
    r = usage_record(key_id="not-a-uuid")
    w.enqueue(r)
    await w.close()
    [(_, reason, record)] = dead(dsn, [r])
    assert reason == 'InvalidTextRepresentation (22P02): invalid input syntax for type uuid: "not-a-uuid"'
    assert record == json.loads(json.dumps(r.to_json()))


async def test_numeric_overflow_is_dead_lettered_when_it_reaches_postgres(
    dsn: str, tmp_path: Path, unsanitized: None
) -> None:
    w = UsageWriter(dsn, tmp_path / "spool.jsonl")
    recs = [usage_record(), usage_record(cost_usd=Decimal("1e12")), usage_record()]
    for r in recs:
        w.enqueue(r)
    await w.close()
    assert set(events(dsn, recs)) == {recs[0].request_id, recs[2].request_id}
    [(rid, reason, _)] = dead(dsn, recs)
    assert rid == recs[1].request_id and reason.startswith("NumericValueOutOfRange (22003)")


async def test_several_bad_rows_in_one_batch_are_each_dead_lettered(
    dsn: str, tmp_path: Path, unsanitized: None
) -> None:
    w = UsageWriter(dsn, tmp_path / "spool.jsonl", batch_size=64)
    recs = [usage_record(cost_usd=Decimal("1e15") if i % 7 == 3 else Decimal(1)) for i in range(50)]
    for r in recs:
        w.enqueue(r)
    await w.close()
    bad = {r.request_id for r in recs if r.cost_usd == Decimal("1e15")}
    assert {d[0] for d in dead(dsn, recs)} == bad and len(dead(dsn, recs)) == len(bad)
    assert set(events(dsn, recs)) == {r.request_id for r in recs} - bad


async def test_dead_letter_postgres_refuses_too_goes_to_the_dead_letter_file(
    dsn: str, tmp_path: Path, unsanitized: None
) -> None:
    spool = tmp_path / "spool.jsonl"
    w = UsageWriter(dsn, spool)
    recs = [usage_record(), usage_record(model_used="gpt\x00"), usage_record()]
    for r in recs:
        w.enqueue(r)
    await w.close()
    assert set(events(dsn, recs)) == {recs[0].request_id, recs[2].request_id} and dead(dsn, recs) == []
    [entry] = dead_file(spool)
    assert entry["request_id"] == recs[1].request_id and entry["record"]["model_used"] == "gpt\x00"
    assert entry["reason"].startswith("DataError") and w.dead_letters == 1


async def test_after_a_bad_row_the_next_records_go_straight_to_postgres(dsn: str, tmp_path: Path) -> None:
    w = UsageWriter(dsn, tmp_path / "spool.jsonl")
    bad = usage_record(key_id="not-a-uuid")
    w.enqueue(bad)
    await w.flush()
    after = [usage_record() for _ in range(3)]
    for r in after:
        w.enqueue(r)
    await w.flush()
    assert len(events(dsn, after)) == 3 and w.spooled() == 0 and w.pending == 0
    await w.close()


async def test_spool_with_a_bad_row_replays_the_good_ones(dsn: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    good = [usage_record() for _ in range(3)]
    bad = usage_record(provider=None)  # NOT NULL: sanitising can't mend it
    spool.write_text(spool_lines([good[0], bad, *good[1:]]))
    w = UsageWriter(dsn, spool)
    await w.close()
    assert set(events(dsn, good)) == {r.request_id for r in good}
    assert [(d[0], d[1][:20]) for d in dead(dsn, [bad])] == [(bad.request_id, "NotNullViolation (23")]
    assert w.spooled() == 0


async def test_torn_spool_line_is_dead_lettered_and_the_lines_after_it_replayed(
    dsn: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.jsonl"
    before, after = usage_record(), usage_record()
    spool.write_text(spool_lines([before]) + '{"request_id": "torn\n' + spool_lines([after]))
    w = UsageWriter(dsn, spool)
    await w.close()
    assert set(events(dsn, [before, after])) == {before.request_id, after.request_id}
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT reason FROM usage_dead_letters WHERE record->>'spool_line' = %s", ('{"request_id": "torn',)
        ).fetchone()
    assert row is not None and row[0].startswith("unreadable spool line: JSONDecodeError")


async def test_claimed_file_left_by_a_crash_is_replayed_at_start(dsn: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    recs = [usage_record() for _ in range(3)]
    (tmp_path / "spool.jsonl.claimed-00000000000000000001-4242").write_text(spool_lines(recs))
    w = UsageWriter(dsn, spool)
    await w.close()
    assert len(events(dsn, recs)) == 3 and list(tmp_path.iterdir()) == []


async def test_replay_cut_short_by_an_outage_keeps_only_what_is_left(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "spool.jsonl"
    recs = [usage_record() for _ in range(5)]
    claimed = tmp_path / "spool.jsonl.claimed-00000000000000000001-4242"
    claimed.write_text(spool_lines(recs))
    w = UsageWriter(dsn, spool, batch_size=2)
    real_copy, calls = w._copy, 0

    async def copy_then_fail(rows: list[UsageRecord]) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        await real_copy(rows)

    monkeypatch.setattr(w, "_copy", copy_then_fail)
    await w.flush()
    assert set(events(dsn, recs)) == {recs[0].request_id, recs[1].request_id}
    assert [json.loads(line)["request_id"] for line in claimed.read_text().splitlines()] == [
        r.request_id for r in recs[2:]
    ]
    monkeypatch.setattr(w, "_copy", real_copy)
    await w.close()
    assert len(events(dsn, recs)) == 5 and w.spooled() == 0


async def test_outage_spools_and_recovery_replays_through_a_claimed_file(dsn: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    down = UsageWriter("postgresql://nobody@127.0.0.1:1/none", spool)
    recs = [usage_record() for _ in range(3)]
    for r in recs:
        down.enqueue(r)
    await down.close()
    assert down.spooled() == 3
    up = UsageWriter(dsn, spool)
    await up.close()
    assert len(events(dsn, recs)) == 3 and up.spooled() == 0 and list(tmp_path.iterdir()) == []


async def test_cancelled_flush_puts_its_batch_back_for_close(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = UsageWriter(dsn, tmp_path / "spool.jsonl", interval=0.01)
    real_copy, entered = w._copy, asyncio.Event()

    async def hang(rows: list[UsageRecord]) -> None:
        entered.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(w, "_copy", hang)
    recs = [usage_record() for _ in range(4)]
    for r in recs:
        w.enqueue(r)
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert w.pending == 4
    monkeypatch.setattr(w, "_copy", real_copy)
    await w.close()
    assert len(events(dsn, recs)) == 4

