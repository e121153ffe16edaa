"""The usage writer: batches records into Postgres with COPY, spools to disk when it can't.

Records are appended to an in-memory queue by the request path (never awaiting I/O) and written
by one background task. When Postgres is unreachable, batches go to an append-only spool file,
fsynced, and are replayed in order once it is back. Replays are idempotent: a record's primary
key is its request id and timestamp, and inserts skip rows that already exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import psycopg
import structlog
from psycopg.types.json import Jsonb

from extproc.usage import UsageRecord

log = structlog.get_logger("spendgate.writer")

_COLS = ", ".join(UsageRecord.COLUMNS)
_STAGE = "usage_stage"


class UsageWriter:
    """Owns the queue, the Postgres connection and the spool file of one extproc process."""

    def __init__(
        self,
        dsn: str,
        spool_path: Path,
        *,
        batch_size: int = 1000,
        interval: float = 0.2,
        retry_after: float = 1.0,
    ) -> None:
        self._dsn = dsn
        self._spool = spool_path
        self._batch_size = batch_size
        self._interval = interval
        self._retry_after = retry_after
        self._queue: deque[UsageRecord] = deque()
        self._wake = asyncio.Event()
        self._conn: psycopg.AsyncConnection[object] | None = None
        self._down_until = 0.0
        self._closing = False
        self.written = 0  # rows this process has inserted, replays included (for metrics/tests)

    def enqueue(self, record: UsageRecord) -> None:
        """Hand over a record; returns at once."""
        self._queue.append(record)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    @property
    def pending(self) -> int:
        """Records waiting in memory."""
        return len(self._queue)

    def spooled(self) -> int:
        """Records waiting in the spool file."""
        if not self._spool.exists():
            return 0
        with self._spool.open("rb") as f:
            return sum(1 for _ in f)

    async def run(self) -> None:
        """Flush forever; cancel, then call close(), to stop."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self.flush()
            except OSError as exc:
                # The spool could not even be read; records stay queued and the next tick retries.
                log.error("usage.flush_failed", error=str(exc))

    async def flush(self) -> None:
        """Write everything queued now: to Postgres if it is up, else to the spool."""
        while True:
            if self._spool_has_data() and not await self._replay():
                self._spool_out(self._take(len(self._queue)))
                return
            batch = self._take(self._batch_size)
            if not batch:
                return
            if not await self._insert(batch):
                self._spool_out(batch + self._take(len(self._queue)))
                return

    async def close(self) -> None:
        """Drain on shutdown: nothing queued may be lost, so what Postgres won't take is spooled."""
        self._closing = True
        self._down_until = 0.0
        await self.flush()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def _take(self, n: int) -> list[UsageRecord]:
        q = self._queue
        return [q.popleft() for _ in range(min(n, len(q)))]

    def _spool_has_data(self) -> bool:
        try:
            return self._spool.stat().st_size > 0
        except OSError:  # missing, or its folder is unusable: either way nothing to replay from it
            return False

    def _spool_out(self, batch: list[UsageRecord]) -> None:
        if not batch:
            return
        data = b"".join(json.dumps(r.to_json(), separators=(",", ":")).encode() + b"\n" for r in batch)
        try:
            self._spool.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self._spool, os.O_WRONLY | os.O_APPEND | os.O_CREAT) as fd:
                os.write(fd, data)
                os.fsync(fd)
        except OSError as exc:
            # Disk full or unwritable: keep the batch in memory, in order, and try again later.
            self._queue.extendleft(reversed(batch))
            log.error("usage.spool_failed", records=len(batch), error=str(exc))
            return
        log.warning("usage.spooled", records=len(batch), spool=str(self._spool))

    async def _replay(self) -> bool:
        """Insert the spool's records in order; True once the spool is empty."""
        if time.monotonic() < self._down_until:
            return False
        # Held across read, insert and truncate, so a second process sharing this spool can't
        # append a record in between that the truncate would then lose.
        with _locked(self._spool, os.O_RDWR) as fd:
            records = []
            with os.fdopen(os.dup(fd), "rb") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        try:
                            records.append(UsageRecord.from_json(json.loads(line)))
                        except (ValueError, KeyError) as exc:
                            # A torn last line from a crash mid-write is the only way to get here.
                            log.error("usage.spool_line_unreadable", error=str(exc))
            for i in range(0, len(records), self._batch_size):
                if not await self._insert(records[i : i + self._batch_size]):
                    return False
            # Everything is in Postgres; a crash before this truncate replays harmlessly.
            os.ftruncate(fd, 0)
            os.fsync(fd)
        log.info("usage.spool_replayed", records=len(records))
        return True

    async def _connection(self) -> psycopg.AsyncConnection[object]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self._dsn, connect_timeout=3, autocommit=True)
            await self._conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE usage_events INCLUDING DEFAULTS)".encode()
            )
        return self._conn

    async def _insert(self, batch: list[UsageRecord]) -> bool:
        if time.monotonic() < self._down_until:
            return False
        try:
            conn = await self._connection()
            async with conn.transaction():
                await conn.execute(f"TRUNCATE {_STAGE}".encode())
                async with conn.cursor() as cur:
                    async with cur.copy(f"COPY {_STAGE} ({_COLS}) FROM STDIN".encode()) as copy:
                        for r in batch:
                            row = r.row()
                            await copy.write_row((*row[:-2], Jsonb(row[-2]), row[-1]))
                    await cur.execute(
                        f"INSERT INTO usage_events ({_COLS}) SELECT {_COLS} FROM {_STAGE}"
                        " ON CONFLICT DO NOTHING".encode()
                    )
        except (psycopg.Error, OSError) as exc:
            log.warning("usage.postgres_unavailable", error=type(exc).__name__, detail=str(exc)[:200])
            self._down_until = 0.0 if self._closing else time.monotonic() + self._retry_after
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
            return False
        self.written += len(batch)
        return True


@contextlib.contextmanager
def _locked(path: Path, flags: int) -> Iterator[int]:
    """An open descriptor on `path` holding an exclusive advisory lock."""
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)
