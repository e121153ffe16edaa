"""The benchmarks' own drivers still run Spendgate's real path (their figures are read elsewhere)."""

from __future__ import annotations

import asyncio

from bench.__main__ import POLICY_TEAM
from bench.instructions import WARM_UP, _drive
from tests.support import migrated_database


def test_the_instruction_benchmark_completes_every_request_with_and_without_policies() -> None:
    with migrated_database() as dsn:
        for team in (None, POLICY_TEAM):
            assert asyncio.run(_drive(dsn, team, 20)) == WARM_UP + 20
