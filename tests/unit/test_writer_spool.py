"""The usage writer with Postgres unreachable: records go to the spool and survive a bad disk."""

from __future__ import annotations

import json
from pathlib import Path

from extproc.usage import UsageRecord
from extproc.writer import UsageWriter
from tests.support import usage_record

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none"


async def test_records_are_spooled_in_order_when_postgres_is_unreachable(tmp_path: Path) -> None:
    w = UsageWriter(UNREACHABLE, tmp_path / "spool.jsonl")
    recs = [usage_record() for _ in range(5)]
    for r in recs:
        w.enqueue(r)
    await w.close()
    lines = (tmp_path / "spool.jsonl").read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [r.request_id for r in recs]


async def test_spooled_record_round_trips_exactly(tmp_path: Path) -> None:
    w = UsageWriter(UNREACHABLE, tmp_path / "spool.jsonl")
    r = usage_record()
    w.enqueue(r)
    await w.close()
    back = UsageRecord.from_json(json.loads((tmp_path / "spool.jsonl").read_text()))
    assert back == r


async def test_unwritable_spool_keeps_records_queued(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the spool's folder should be")
    w = UsageWriter(UNREACHABLE, blocked / "spool.jsonl")
    w.enqueue(usage_record())
    await w.close()
    assert w.pending == 1
