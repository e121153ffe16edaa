"""The usage writer with Postgres unreachable: records go to the spool and survive a bad disk."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
import time
from pathlib import Path

from extproc.usage import UsageRecord
from extproc.writer import UsageWriter, _append
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


def test_append_that_waited_on_a_claim_goes_to_the_fresh_spool(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    spool.write_bytes(b"old\n")
    fd = os.open(spool, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a replayer does while it claims the spool
    appender = threading.Thread(target=_append, args=(spool, b"new\n"))
    appender.start()
    time.sleep(0.2)  # the appender has opened the spool and waits for its lock
    claimed = tmp_path / "spool.jsonl.claimed-00000000000000000001-1"
    os.rename(spool, claimed)
    os.close(fd)
    appender.join(10)
    assert (claimed.read_bytes(), spool.read_bytes()) == (b"old\n", b"new\n")


async def test_spool_locked_by_another_process_does_not_block_the_event_loop(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    spool.touch()
    fd = os.open(spool, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    # Should the writer wait for the lock on the loop after all, this lets the test fail, not hang.
    safety = threading.Timer(3.0, fcntl.flock, (fd, fcntl.LOCK_UN))
    safety.start()
    w = UsageWriter(UNREACHABLE, spool)
    w.enqueue(usage_record())
    closing = asyncio.create_task(w.close())
    try:
        start = time.monotonic()
        await asyncio.sleep(0.3)
        assert time.monotonic() - start < 2.0 and not closing.done()
    finally:
        safety.cancel()
        os.close(fd)
    await asyncio.wait_for(closing, 10)
    assert w.spooled() == 1


async def test_claimed_file_another_process_is_replaying_is_left_to_it(tmp_path: Path) -> None:
    claimed = tmp_path / "spool.jsonl.claimed-00000000000000000001-1"
    claimed.write_text(json.dumps(usage_record().to_json()) + "\n")
    fd = os.open(claimed, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        w = UsageWriter(UNREACHABLE, tmp_path / "spool.jsonl")
        await asyncio.wait_for(w.close(), 10)
    finally:
        os.close(fd)
    assert claimed.exists() and w.spooled() == 1


async def test_unreplayed_claimed_file_is_counted_as_spooled(tmp_path: Path) -> None:
    (tmp_path / "spool.jsonl.claimed-00000000000000000001-1").write_text(
        json.dumps(usage_record().to_json()) + "\n"
    )
    w = UsageWriter(UNREACHABLE, tmp_path / "spool.jsonl")
    w.enqueue(usage_record())
    await w.close()
    assert w.spooled() == 2


async def test_record_that_cannot_be_spooled_goes_to_the_dead_letter_file(tmp_path: Path) -> None:
    w = UsageWriter(UNREACHABLE, tmp_path / "spool.jsonl")
    broken, fine = usage_record(ts="not a time"), usage_record()
    w.enqueue(broken)
    w.enqueue(fine)
    await w.close()
    [entry] = [json.loads(line) for line in (tmp_path / "spool.dead.jsonl").read_text().splitlines()]
    assert entry["request_id"] == broken.request_id and entry["reason"].startswith("AttributeError")
    assert (w.dead_letters, w.pending, w.spooled()) == (1, 0, 1)
