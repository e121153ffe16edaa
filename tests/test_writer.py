"""The usage writer against a real Postgres: COPY batches, idempotent replay of the spool."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from extproc.writer import UsageWriter
from tests.support import migrated_database, usage_record


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    with migrated_database() as url:
        yield url


def rows(dsn: str, ids: list[str]) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT request_id, input_tokens, cost_usd, tags FROM usage_events WHERE request_id = ANY(%s)",
            (ids,),
        ).fetchall()


async def test_batch_is_written_with_exact_values(dsn: str, tmp_path: Path) -> None:
    w = UsageWriter(dsn, tmp_path / "spool.jsonl")
    recs = [usage_record() for _ in range(50)]
    for r in recs:
        w.enqueue(r)
    await w.close()
    got = rows(dsn, [r.request_id for r in recs])
    assert len(got) == 50
    assert {(g[1], g[2], json.dumps(g[3])) for g in got} == {
        (100, Decimal("0.000123456789"), '{"env": "prod"}')
    }


async def test_spool_replay_inserts_each_record_once(dsn: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    already, fresh = usage_record(), usage_record()
    first = UsageWriter(dsn, spool)
    first.enqueue(already)
    await first.close()
    # A crash after inserting but before truncating leaves `already` in the spool as well.
    spool.write_text("".join(json.dumps(r.to_json()) + "\n" for r in (already, fresh)))
    w = UsageWriter(dsn, spool)
    await w.close()
    assert len(rows(dsn, [already.request_id, fresh.request_id])) == 2
    assert w.spooled() == 0 and list(tmp_path.iterdir()) == []


async def test_records_spooled_while_down_arrive_after_recovery(dsn: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    down = UsageWriter("postgresql://nobody@127.0.0.1:1/none", spool)
    recs = [usage_record() for _ in range(3)]
    for r in recs:
        down.enqueue(r)
    await down.close()
    up = UsageWriter(dsn, spool)
    up.enqueue(usage_record(request_id="after-" + uuid.uuid4().hex))
    await up.close()
    assert len(rows(dsn, [r.request_id for r in recs])) == 3 and up.spooled() == 0
