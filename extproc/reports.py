"""Reports: `spendgate usage` (spend and tokens by key, team, project, model, provider or day),
`spendgate budgets`, and the plain text tables every listing command prints."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import psycopg

from extproc.db import fetch_dicts

PASSTHROUGH_API = "passthrough"  # usage_events.api of a request Spendgate forwards or refuses unmetered

GROUPS = {
    "key": "coalesce(k.prefix, 'unknown')",
    "team": "coalesce(u.team, '-')",
    "project": "coalesce(u.project, '-')",
    # A passthrough record has no model: naming it keeps its row from passing for a model's.
    "model": (
        "coalesce(u.model_used, u.model_requested,"
        f" CASE WHEN u.api = '{PASSTHROUGH_API}' THEN '(passthrough)' ELSE '-' END)"
    ),
    "provider": "u.provider",
    "day": "to_char(date_trunc('day', u.ts AT TIME ZONE 'UTC'), 'YYYY-MM-DD')",
}

# Printed under a usage table that holds refused passthrough requests: nearly always an SDK whose
# base URL lacks /v1, so its POSTs arrive at paths Spendgate does not meter.
BASE_URL_HINT = (
    "an OpenAI SDK's base URL must end in /v1 (e.g. http://127.0.0.1:8080/v1); "
    'see README "Using it from an SDK"'
)


def usage_report(conn: psycopg.Connection[Any], by: str, since: dt.datetime) -> list[dict[str, Any]]:
    """Rows of requests, tokens and USD per group since a time.

    `unaccounted` counts the group's passthrough requests: forwarded or refused without being
    metered, so no model, tokens or cost stand behind them.
    """
    group = GROUPS[by]
    sql = f"""
        SELECT {group} AS {by}, count(*) AS requests,
               sum(u.input_tokens)::bigint AS input_tokens, sum(u.cached_input_tokens)::bigint AS cached_input_tokens,
               sum(u.cache_write_tokens)::bigint AS cache_write_tokens, sum(u.output_tokens)::bigint AS output_tokens,
               sum(u.reasoning_tokens)::bigint AS reasoning_tokens,
               coalesce(sum(u.cost_usd), 0) AS cost_usd,
               count(*) FILTER (WHERE u.estimated) AS estimated,
               count(*) FILTER (WHERE u.cost_usd IS NULL AND u.status < 400 AND u.api <> '{PASSTHROUGH_API}')
                   AS unpriced,
               count(*) FILTER (WHERE u.api = '{PASSTHROUGH_API}') AS unaccounted
        FROM usage_events u LEFT JOIN api_keys k ON k.id = u.key_id
        WHERE u.ts >= %s
        GROUP BY 1 ORDER BY cost_usd DESC, 1
    """
    return fetch_dicts(conn, sql, (since,))


def unaccounted_requests(conn: psycopg.Connection[Any], since: dt.datetime) -> dict[str, int]:
    """Passthrough requests since a time by outcome (`rejected`: refused, never forwarded)."""
    rows = conn.execute(
        "SELECT outcome, count(*) FROM usage_events WHERE ts >= %s AND api = %s GROUP BY 1 ORDER BY 1",
        (since, PASSTHROUGH_API),
    ).fetchall()
    return {str(outcome): int(n) for outcome, n in rows}


def unaccounted_note(by_outcome: dict[str, int]) -> str | None:
    """The line printed under a usage table about passthrough requests, or None when there are none."""
    total = sum(by_outcome.values())
    if not total:
        return None
    refused = by_outcome.get("rejected", 0)
    note = f"unaccounted (passthrough) requests: {total} ({refused} refused, {total - refused} forwarded)"
    note += ", with no model, tokens or cost recorded"
    if refused:
        note += f"; {BASE_URL_HINT}"
    return note


def budget_report(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Budget counters of the periods in progress: limit, spent, reserved (leases included), left."""
    return fetch_dicts(
        conn,
        "SELECT policy, scope, period, limit_usd, spent_usd, reserved_usd,"
        " greatest(limit_usd - spent_usd - reserved_usd, 0) AS left_usd, period_end AS resets"
        " FROM budget_counters WHERE period_end > now() ORDER BY policy, scope, period",
    )


def format_table(rows: list[dict[str, Any]], empty: str = "nothing to show") -> str:
    """A plain text table: text columns left-aligned, number columns right-aligned.

    `empty` is printed instead when there are no rows; it should say what is empty.
    """
    if not rows:
        return empty
    cols = list(rows[0])
    numeric = [_is_numeric_column([r.get(c) for r in rows]) for c in cols]
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(cols), *(line(row) for row in cells)])


def _is_numeric_column(values: list[Any]) -> bool:
    """A column is numeric when every value it has is a number (bool is a flag, not a number)."""
    present = [v for v in values if v is not None]
    return bool(present) and all(
        isinstance(v, int | float | Decimal) and not isinstance(v, bool) for v in present
    )


def _cell(v: Any) -> str:
    if isinstance(v, Decimal):
        return f"{v:.6f}"
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ", timespec="seconds")
    return "" if v is None else str(v)
