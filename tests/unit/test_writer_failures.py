"""The usage writer's background task and shutdown survive errors nobody planned for."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from extproc.usage import UsageRecord
from extproc.writer import UsageWriter
from tests.support import usage_record

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none"


def failing_writes(monkeypatch: pytest.MonkeyPatch, w: UsageWriter, times: int) -> list[int]:
    """Make the writer's next `times` writes raise a bug-like error; returns the call count."""
    real, calls = w._write, [0]

    async def write(batch: list[UsageRecord]) -> int:
        calls[0] += 1
        if calls[0] <= times:
            raise RuntimeError("a bug")
        return await real(batch)

    monkeypatch.setattr(w, "_write", write)
    return calls


async def test_run_loop_counts_an_unexpected_error_and_carries_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = UsageWriter(UNREACHABLE, tmp_path / "spool.jsonl", interval=0.01, retry_after=0.01)
    calls = failing_writes(monkeypatch, w, 1)
    w.enqueue(usage_record())
    task = asyncio.create_task(w.run())
    for _ in range(500):
        if w.spooled():
            break
        await asyncio.sleep(0.01)
    assert not task.done() and w.failures == 1 and calls[0] >= 2 and w.spooled() == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_batch_an_unexpected_error_interrupted_stays_queued_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = UsageWriter(UNREACHABLE, tmp_path / "spool.jsonl")
    failing_writes(monkeypatch, w, 1)
    recs = [usage_record() for _ in range(3)]
    for r in recs:
        w.enqueue(r)
    with pytest.raises(RuntimeError):
        await w.flush()
    await w.close()
    lines = (tmp_path / "spool.jsonl").read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [r.request_id for r in recs]


async def test_close_spools_what_an_unexpected_error_left_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = UsageWriter(UNREACHABLE, tmp_path / "spool.jsonl")
    failing_writes(monkeypatch, w, 10**6)
    for _ in range(3):
        w.enqueue(usage_record())
    await w.close()
    assert (w.failures, w.pending, w.spooled()) == (1, 0, 3)
