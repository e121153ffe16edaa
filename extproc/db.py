"""Postgres connections, schema migrations and usage partitions."""

from __future__ import annotations

import datetime as dt
import os
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

MIGRATIONS_LOCK = 72_851_001  # advisory lock id: one migrator at a time across replicas


def database_url(home: Path) -> str:
    """`DATABASE_URL`, or the embedded database a running `spendgate up` wrote down."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    recorded = home / "database_url"
    if recorded.exists():
        return recorded.read_text().strip()
    raise RuntimeError("no database: set DATABASE_URL, or start the local stack with `spendgate up`")


def _migrations() -> list[tuple[str, str]]:
    folder = resources.files("extproc") / "migrations"
    files = sorted(f.name for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(name, (folder / name).read_text()) for name in files]


def migrate(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; return what was applied."""
    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATIONS_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, applied_at timestamptz"
            " NOT NULL DEFAULT now())"
        )
        done = {r[0] for r in conn.execute("SELECT name FROM schema_migrations").fetchall()}
        for name, sql in _migrations():
            if name in done:
                continue
            conn.execute(sql.encode())
            conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
            applied.append(name)
        ensure_partitions(conn, dt.datetime.now(dt.UTC).date())
    return applied


def _month_start(day: dt.date, offset: int) -> dt.date:
    month = day.month - 1 + offset
    return dt.date(day.year + month // 12, month % 12 + 1, 1)


def ensure_partitions(conn: psycopg.Connection[Any], today: dt.date, ahead: int = 2) -> None:
    """Create monthly usage partitions from this month to `ahead` months on.

    Rows for a month with no partition land in the default partition, so nothing is refused;
    creating partitions ahead keeps the default one empty and retention a matter of DROP TABLE.
    """
    for i in range(ahead + 1):
        lo, hi = _month_start(today, i), _month_start(today, i + 1)
        name = f"usage_events_{lo:%Y_%m}"
        exists = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
        if exists and exists[0]:
            continue
        try:
            with conn.transaction():
                conn.execute(
                    f"CREATE TABLE {name} PARTITION OF usage_events FOR VALUES FROM ('{lo}') TO ('{hi}')".encode()
                )
        except psycopg.errors.CheckViolation:
            # The default partition already holds rows of that month; they stay there, still queryable.
            continue


def ensure_partitions_now(dsn: str) -> None:
    """ensure_partitions on a connection of its own, for periodic housekeeping."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_partitions(conn, dt.datetime.now(dt.UTC).date())


def fetch_dicts(
    conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] = ()
) -> list[dict[str, Any]]:
    """Rows of a query as dicts keyed by column name."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql.encode(), params).fetchall()
