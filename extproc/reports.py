"""Reports: `spendgate usage` (spend and tokens by key, team, project, model, provider or day) and `spendgate budgets`."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import psycopg

from extproc.db import fetch_dicts

GROUPS = {
    "key": "coalesce(k.prefix, 'unknown')",
    "team": "coalesce(u.team, '-')",
    "project": "coalesce(u.project, '-')",
    "model": "coalesce(u.model_used, u.model_requested, '-')",
    "provider": "u.provider",
    "day": "to_char(date_trunc('day', u.ts AT TIME ZONE 'UTC'), 'YYYY-MM-DD')",
}


def usage_report(conn: psycopg.Connection[Any], by: str, since: dt.datetime) -> list[dict[str, Any]]:
    """Rows of requests, tokens and USD per group since a time."""
    group = GROUPS[by]
    sql = f"""
        SELECT {group} AS {by}, count(*) AS requests,
               sum(u.input_tokens)::bigint AS input_tokens, sum(u.cached_input_tokens)::bigint AS cached_input_tokens,
               sum(u.cache_write_tokens)::bigint AS cache_write_tokens, sum(u.output_tokens)::bigint AS output_tokens,
               sum(u.reasoning_tokens)::bigint AS reasoning_tokens,
               coalesce(sum(u.cost_usd), 0) AS cost_usd,
               count(*) FILTER (WHERE u.estimated) AS estimated,
               count(*) FILTER (WHERE u.cost_usd IS NULL AND u.status < 400 AND u.api <> 'passthrough') AS unpriced
        FROM usage_events u LEFT JOIN api_keys k ON k.id = u.key_id
        WHERE u.ts >= %s
        GROUP BY 1 ORDER BY cost_usd DESC, 1
    """
    return fetch_dicts(conn, sql, (since,))


def budget_report(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Budget counters of the periods in progress: limit, spent, reserved (leases included), left."""
    return fetch_dicts(
        conn,
        "SELECT policy, scope, period, limit_usd, spent_usd, reserved_usd,"
        " greatest(limit_usd - spent_usd - reserved_usd, 0) AS left_usd, period_end AS resets"
        " FROM budget_counters WHERE period_end > now() ORDER BY policy, scope, period",
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain aligned text table."""
    if not rows:
        return "no usage in that period"
    cols = list(rows[0])
    cells = [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += [
        "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, Decimal):
        return f"{v:.6f}"
    return "" if v is None else str(v)
