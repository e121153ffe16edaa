"""The usage writer: batches records into Postgres with COPY, spools to disk when it can't.

Records are appended to an in-memory queue by the request path (never awaiting I/O) and written
by one background task. Every record ends in exactly one of three places: `usage_events`, the
spool (to be replayed), or the dead letters. Why it is built the way it is:

- A bad row is not a down database. COPY is all or nothing, so one value Postgres refuses (a NUL
  byte, a cost past numeric(30,18)) used to fail the whole batch, and treating that as an outage
  sent every later record to the spool for good. Records are sanitized first (see
  UsageRecord.sanitized), and a batch that still fails with a data or constraint error (or one
  psycopg raises while adapting a value) is bisected: the good halves are written, and a single
  row that fails alone goes to `usage_dead_letters` with the reason, or, if Postgres won't take
  even that, to a dead-letter file next to the spool. Dead letters are kept, not dropped, so an
  operator can repair and re-insert them. Connection failures and errors that no row can cause
  (missing table, privileges, a read-only server, resource limits) are an outage: the batch is
  spooled and retried after `retry_after`, since bisecting would dead-letter every record.
- Replays are idempotent: a record's primary key is its request id and timestamp, and inserts
  skip rows that already exist. A crash between an insert and the spool's cleanup costs nothing.
  Dead letters are at least once: such a crash can record one twice.
- The spool may be shared by processes, and flock blocks, so no lock may be waited for on the
  event loop nor held across an await. Appending takes the lock in a worker thread for one
  write and fsync. Replay claims the spool instead of holding it: under the lock, in a thread,
  it renames the spool to `<spool>.claimed-<time>-<pid>` and lets go, so appends carry on into a
  fresh spool while the claimed file is replayed at leisure. An appender that opened the spool
  before the rename and got the lock after it notices that the path now names another file and
  appends there instead, so no record lands in a file already read. A claimed file is replayed
  under a non-blocking lock (another process replaying it is skipped, not waited for), deleted
  when done, and cut down to what is left when Postgres fails part way. A crash mid-replay leaves
  it on disk, and every writer looks for claimed files when it starts.
- The background task must not die: anything `flush` raises is logged, counted in `failures`
  and retried, and a batch interrupted by an exception or a cancellation goes back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import json
import os
import re
import time
from collections import deque
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from extproc.usage import UsageRecord

log = structlog.get_logger("spendgate.writer")

_COLS = ", ".join(UsageRecord.COLUMNS)
_STAGE = "usage_stage"
# SQLSTATE classes a row's values can cause: data exception, integrity constraint violation.
_ROW_FAULT_CLASSES = ("22", "23")
_REASON_MAX = 300
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\ud800-\udfff]")


class UsageWriter:
    """Owns the queue, the Postgres connection and the spool file of one extproc process.

    Public counters for metrics: `written` (rows inserted, replays included), `dead_letters`
    (records Postgres refused, kept in `usage_dead_letters` or the dead-letter file) and
    `failures` (unexpected errors in a flush, each logged as `usage.flush_failed`).
    """

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
        self._dead_file = spool_path.with_suffix(".dead.jsonl")
        self._batch_size = batch_size
        self._interval = interval
        self._retry_after = retry_after
        self._queue: deque[UsageRecord] = deque()
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._conn: psycopg.AsyncConnection[object] | None = None
        self._down_until = 0.0
        self._closing = False
        # Claimed files may be on disk: left by a crash, or by a claim whose await was cancelled.
        self._look_for_claimed = True
        self._settled = 0  # how much of the batch in _write is written or dead-lettered so far
        self.written = 0
        self.dead_letters = 0
        self.failures = 0

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
        """Records waiting on disk: in the spool and in claimed files not yet replayed."""
        n = 0
        for path in [self._spool, *_claimed_files(self._spool)]:
            with contextlib.suppress(OSError), path.open("rb") as f:
                n += sum(1 for line in f if line.strip())
        return n

    async def run(self) -> None:
        """Flush forever; cancel, then call close(), to stop."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                # Records stay queued (flush puts an interrupted batch back); pause so that a
                # persistent fault is retried at a walk rather than on every enqueue.
                self._failed(exc)
                await asyncio.sleep(self._retry_after)

    async def flush(self) -> None:
        """Write everything queued now: to Postgres if it is up, else to the spool."""
        async with self._flushing:
            while True:
                if self._spool_pending() and not await self._replay():
                    await self._spool_out(self._take(len(self._queue)))
                    return
                batch = self._take(self._batch_size)
                if not batch:
                    return
                self._settled = 0
                try:
                    done = await self._write(batch)
                except BaseException:
                    # Cancelled at shutdown, or a bug: the unsettled rest goes back, in order. Rows
                    # that reached Postgres after all are skipped when inserted again.
                    self._queue.extendleft(reversed(batch[self._settled :]))
                    raise
                if done < len(batch):
                    await self._spool_out(batch[done:] + self._take(len(self._queue)))
                    return

    async def close(self) -> None:
        """Drain on shutdown: nothing queued may be lost, so what Postgres won't take is spooled."""
        self._closing = True
        self._down_until = 0.0
        try:
            await self.flush()
        except Exception as exc:
            self._failed(exc)
            # Last resort before the process exits; _spool_out keeps in memory what it can't write.
            await self._spool_out(self._take(len(self._queue)))
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        log.error("usage.flush_failed", error=type(exc).__name__, detail=_safe(str(exc))[:200], exc_info=exc)

    def _take(self, n: int) -> list[UsageRecord]:
        q = self._queue
        return [q.popleft() for _ in range(min(n, len(q)))]

    def _spool_pending(self) -> bool:
        if self._look_for_claimed:
            return True
        try:
            return self._spool.stat().st_size > 0
        except OSError:  # missing, or its folder is unusable: either way nothing to replay from it
            return False

    async def _spool_out(self, batch: list[UsageRecord]) -> None:
        if not batch:
            return
        lines: list[bytes] = []
        kept: list[UsageRecord] = []
        for r in batch:
            try:
                lines.append(_line(r.to_json()))
            except Exception as exc:
                # Not even JSON: it can't wait in the spool, and it could never be inserted.
                fallback = _fallback_json(r)
                if await self._dead_letter_to_file(fallback["request_id"], fallback, _reason(exc)):
                    continue
                lines.append(_line(fallback))
            kept.append(r)
        if not kept:
            return
        try:
            await asyncio.to_thread(_append, self._spool, b"".join(lines))
        except BaseException as exc:
            # Disk full or unwritable: keep the batch in memory, in order, and try again later.
            # Cancelled: the thread may still write it; a record both spooled and queued is
            # inserted once, since inserts skip rows that exist.
            self._queue.extendleft(reversed(kept))
            if not isinstance(exc, OSError):
                raise
            log.error("usage.spool_failed", records=len(kept), error=str(exc))
            return
        log.warning("usage.spooled", records=len(kept), spool=str(self._spool))

    async def _replay(self) -> bool:
        """Insert what waits on disk, oldest first; True once nothing is left to replay."""
        if time.monotonic() < self._down_until:
            return False
        if self._look_for_claimed:
            for path in await asyncio.to_thread(_claimed_files, self._spool):
                if not await self._replay_file(path):
                    return False
            self._look_for_claimed = False
        if self._spool_pending():
            self._look_for_claimed = True
            claimed = await asyncio.to_thread(_claim, self._spool)
            if claimed is not None and not await self._replay_file(claimed):
                return False
            self._look_for_claimed = False
        return True

    async def _replay_file(self, path: Path) -> bool:
        """Replay one claimed file; True once it is gone (or another process has it)."""
        opened = await asyncio.to_thread(_open_claimed, path)
        if opened is None:
            return True
        fd, data = opened
        try:
            good: list[tuple[bytes, UsageRecord]] = []
            for line in data.splitlines():
                if not line.strip():
                    continue
                try:
                    good.append((line, UsageRecord.from_json(json.loads(line))))
                except Exception as exc:
                    # A torn line from a crash mid-write, or a file edited by hand: kept aside,
                    # since it can't be inserted and must not stop the lines after it.
                    raw = {"spool_line": _safe(line.decode("utf-8", "replace"))[:8192]}
                    if not await self._dead_letter(None, raw, "unreadable spool line: " + _reason(exc)):
                        return False
            for i in range(0, len(good), self._batch_size):
                chunk = good[i : i + self._batch_size]
                done = await self._write([r for _, r in chunk])
                if done < len(chunk):
                    rest = b"".join(line + b"\n" for line, _ in good[i + done :])
                    await asyncio.to_thread(_keep_only, path, rest)
                    return False
            await asyncio.to_thread(_remove, path)
        finally:
            os.close(fd)
        log.info("usage.spool_replayed", records=len(good), file=path.name)
        return True

    async def _connection(self) -> psycopg.AsyncConnection[object]:
        conn = self._conn
        if conn is not None and not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            # Left mid-statement by a cancellation or a failed COPY: start afresh rather than guess.
            await conn.close()
        if conn is None or conn.closed:
            conn = self._conn = await psycopg.AsyncConnection.connect(
                self._dsn, connect_timeout=3, autocommit=True
            )
            await conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE usage_events INCLUDING DEFAULTS)".encode()
            )
        return conn

    async def _copy(self, rows: list[UsageRecord]) -> None:
        conn = await self._connection()
        async with conn.transaction():
            await conn.execute(f"TRUNCATE {_STAGE}".encode())
            async with conn.cursor() as cur:
                async with cur.copy(f"COPY {_STAGE} ({_COLS}) FROM STDIN".encode()) as copy:
                    for r in rows:
                        row = r.row()
                        await copy.write_row((*row[:-2], Jsonb(row[-2]), row[-1]))
                await cur.execute(
                    f"INSERT INTO usage_events ({_COLS}) SELECT {_COLS} FROM {_STAGE}"
                    " ON CONFLICT DO NOTHING".encode()
                )

    async def _write(self, batch: list[UsageRecord]) -> int:
        """Insert `batch` in order, bisecting around rows Postgres refuses.

        Returns how many leading records are settled (written or dead-lettered); fewer than
        len(batch) means Postgres is unavailable and the rest must wait.
        """
        if time.monotonic() < self._down_until:
            return 0
        rows = [_sanitized(r) for r in batch]
        self._settled = 0
        todo = [(0, len(rows))]  # segments still to write, the next one last
        while todo:
            lo, hi = todo.pop()
            try:
                await self._copy(rows[lo:hi])
            except Exception as exc:
                if not _row_fault(exc):
                    await self._went_down(exc)
                    return self._settled
                if hi - lo > 1:
                    mid = (lo + hi) // 2
                    todo += [(mid, hi), (lo, mid)]
                    continue
                r = rows[lo]
                if not await self._dead_letter(r.request_id, _record_json(r), _reason(exc)):
                    return self._settled
            else:
                self.written += hi - lo
            self._settled = hi
        return self._settled

    async def _went_down(self, exc: BaseException) -> None:
        log.warning("usage.postgres_unavailable", error=type(exc).__name__, detail=_safe(str(exc))[:200])
        self._down_until = 0.0 if self._closing else time.monotonic() + self._retry_after
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    async def _dead_letter(self, request_id: Any, record: dict[str, Any], reason: str) -> bool:
        """Keep a record Postgres refused, in the table or else the file; False if neither took it."""
        log.error("usage.dead_letter", request_id=request_id, reason=reason)
        try:
            conn = await self._connection()
            await conn.execute(
                "INSERT INTO usage_dead_letters (request_id, reason, record) VALUES (%s, %s, %s)",
                (None if request_id is None else str(request_id), reason, Jsonb(record)),
            )
        except Exception as exc:
            log.warning("usage.dead_letter_table_failed", request_id=request_id, error=_reason(exc))
            return await self._dead_letter_to_file(request_id, record, reason)
        self.dead_letters += 1
        return True

    async def _dead_letter_to_file(self, request_id: Any, record: dict[str, Any], reason: str) -> bool:
        entry = {"ts": time.time(), "request_id": request_id, "reason": reason, "record": record}
        try:
            data = json.dumps(entry, separators=(",", ":"), default=repr).encode() + b"\n"
            await asyncio.to_thread(_append, self._dead_file, data)
        except Exception as exc:
            log.error("usage.dead_letter_file_failed", request_id=request_id, error=_reason(exc))
            # Nowhere durable to keep it: hold it back (spooled, retried later) instead.
            self._down_until = 0.0 if self._closing else time.monotonic() + self._retry_after
            return False
        self.dead_letters += 1
        log.error("usage.dead_letter_file", request_id=request_id, file=str(self._dead_file))
        return True


def _row_fault(exc: BaseException) -> bool:
    """Whether the rows' values are to blame, not the connection or the database."""
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return False
    if isinstance(exc, psycopg.Error):
        # Without a SQLSTATE, psycopg refused a value before anything reached the server.
        return exc.sqlstate is None or exc.sqlstate[:2] in _ROW_FAULT_CLASSES
    # Adapting a value: UnicodeEncodeError, TypeError, OverflowError, ...
    return not isinstance(exc, OSError)


def _reason(exc: BaseException) -> str:
    """The error class and its first line, never the statement's context (it quotes values)."""
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        text = f"{type(exc).__name__} ({exc.sqlstate}): {exc.diag.message_primary}"
    else:
        text = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    return _safe(text)[:_REASON_MAX]


def _safe(text: str) -> str:
    """Text Postgres and a log line can hold."""
    return _UNSAFE.sub("", text)


def _sanitized(r: UsageRecord) -> UsageRecord:
    try:
        return r.sanitized()
    except Exception:
        return r  # an ill-typed record: Postgres will refuse it and it is dead-lettered


def _record_json(r: UsageRecord) -> dict[str, Any]:
    try:
        out = r.to_json()
        json.dumps(out)
        return out
    except Exception:
        return _fallback_json(r)


def _fallback_json(r: UsageRecord) -> dict[str, Any]:
    return {"request_id": _safe(str(getattr(r, "request_id", ""))), "repr": _safe(repr(r))[:8192]}


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# File work below is blocking: it runs in worker threads, never on the event loop.


def _same_file(fd: int, path: Path) -> bool:
    try:
        st, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _append(path: Path, data: bytes) -> None:
    """Append `data` to the file at `path`, under its lock, fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not _same_file(fd, path):
                continue  # claimed while we waited: the file we hold is being replayed already
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                # The caller keeps the records; a torn line left behind would be replayed as junk.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
            return
        finally:
            os.close(fd)


def _claim(path: Path) -> Path | None:
    """Rename the spool aside under its lock, for replay; None if it is missing or empty."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not _same_file(fd, path):
                continue
            if os.fstat(fd).st_size == 0:
                return None
            claimed = path.with_name(f"{path.name}.claimed-{time.time_ns():020d}-{os.getpid()}")
            os.rename(path, claimed)
            _sync_dir(path.parent)
            return claimed
        finally:
            os.close(fd)


def _claimed_files(spool: Path) -> list[Path]:
    """Claimed files of this spool, oldest claim first."""
    try:
        return sorted(spool.parent.glob(glob.escape(spool.name) + ".claimed-*"), key=lambda p: p.name)
    except OSError:
        return []


def _open_claimed(path: Path) -> tuple[int, bytes] | None:
    """A locked descriptor on a claimed file and its content; None if another process has it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if os.fstat(fd).st_nlink == 0:  # replayed and removed by another process while we opened it
            os.close(fd)
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return fd, f.read()
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def _keep_only(path: Path, rest: bytes) -> None:
    """Replace a claimed file by the lines still to replay, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(rest)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    _sync_dir(path.parent)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
