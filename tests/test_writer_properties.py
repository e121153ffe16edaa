"""Property: whatever a record holds, the writer ends with it stored exactly once, never lost."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.usage import Usage, UsageRecord
from extproc.writer import UsageWriter
from tests.support import migrated_database, usage_record


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    with migrated_database() as url:
        yield url


records = st.builds(
    lambda model, team, tags, tokens, cost: usage_record(
        model_used=model, team=team, tags=tags, usage=Usage(tokens, 0, 0, tokens), cost_usd=Decimal(cost)
    ),
    model=st.text(max_size=300),
    team=st.one_of(st.none(), st.text(max_size=20)),
    tags=st.dictionaries(st.text(max_size=80), st.text(max_size=20), max_size=3),
    tokens=st.integers(),
    cost=st.integers(),
)


def where_each_landed(dsn: str, ids: list[str], dead_file: Path) -> Counter[str]:
    """How many times each request id is stored: usage_events, dead-letter table and file together."""
    with psycopg.connect(dsn) as conn:
        found = [
            r[0]
            for sql in (
                "SELECT request_id FROM usage_events WHERE request_id = ANY(%s)",
                "SELECT request_id FROM usage_dead_letters WHERE request_id = ANY(%s)",
            )
            for r in conn.execute(sql, (ids,)).fetchall()
        ]
    if dead_file.exists():
        found += [json.loads(line)["request_id"] for line in dead_file.read_text().splitlines()]
    return Counter(found)


def write_all(dsn: str, recs: list[UsageRecord]) -> Counter[str]:
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool.jsonl"
        w = UsageWriter(dsn, spool, batch_size=8)
        for r in recs:
            w.enqueue(r)
        asyncio.run(w.close())
        assert w.spooled() == 0 and w.pending == 0
        return where_each_landed(dsn, [r.request_id for r in recs], spool.with_suffix(".dead.jsonl"))


@settings(max_examples=30, deadline=None)
@given(recs=st.lists(records, min_size=1, max_size=12))
def test_every_record_is_written_or_dead_lettered_exactly_once(dsn: str, recs: list[UsageRecord]) -> None:
    landed = write_all(dsn, recs)
    assert landed == Counter(r.request_id for r in recs)


@settings(max_examples=30, deadline=None)
@given(recs=st.lists(records, min_size=1, max_size=12))
def test_unsanitized_records_are_each_stored_exactly_once_too(dsn: str, recs: list[UsageRecord]) -> None:
    # Past the sanitiser, Postgres and psycopg refuse rows themselves: the bisection must still
    # account for every one, into the dead-letter table or, when even that refuses, the file.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UsageRecord, "sanitized", lambda self: self)
        landed = write_all(dsn, recs)
    assert landed == Counter(r.request_id for r in recs)
