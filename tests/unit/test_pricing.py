"""Prices: exact decimals, each token part at its own price, snapshots by longest prefix."""

from decimal import Decimal
from pathlib import Path

import pytest

from extproc.policy.loader import load_policy_dir
from extproc.pricing import PriceTable
from extproc.usage import Usage

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def table() -> PriceTable:
    return PriceTable.model_validate(
        {
            "version": "t1",
            "effective_date": "2026-01-01",
            "models": {
                "gpt-4o": {"provider": "openai", "input": "2.50", "cached_input": "1.25", "output": "10"},
                "gpt-4o-mini": {
                    "provider": "openai",
                    "input": "0.15",
                    "cached_input": "0.075",
                    "output": "0.6",
                },
                "claude-x": {
                    "provider": "anthropic",
                    "input": "3",
                    "cached_input": "0.30",
                    "output": "15",
                    "cache_write": "3.75",
                },
            },
        }
    )


def test_dated_snapshot_matches_its_model_by_longest_prefix(table: PriceTable) -> None:
    assert table.lookup("gpt-4o-mini-2024-07-18") is table.models["gpt-4o-mini"]
    assert table.lookup("gpt-4o-2024-08-06") is table.models["gpt-4o"]


def test_unknown_model_has_no_cost(table: PriceTable) -> None:
    assert table.cost("llama-3", Usage(input_tokens=10)) is None


def test_cached_input_is_billed_at_the_cached_price(table: PriceTable) -> None:
    cost = table.cost("gpt-4o", Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=100))
    # 600 * 2.50 + 400 * 1.25 + 100 * 10, per million
    assert cost == Decimal("0.003")


def test_cache_writes_are_billed_at_the_cache_write_price(table: PriceTable) -> None:
    usage = Usage(input_tokens=100, cached_input_tokens=20, cache_write_tokens=30, output_tokens=10)
    # 50 * 3 + 20 * 0.30 + 30 * 3.75 + 10 * 15, per million
    assert table.cost("claude-x", usage) == Decimal("0.0004185")


def test_cost_is_an_exact_decimal_not_a_float(table: PriceTable) -> None:
    cost = table.cost("gpt-4o-mini", Usage(input_tokens=1, output_tokens=1))
    assert cost == Decimal("0.00000075")


def test_float_prices_in_yaml_are_read_as_their_decimal_text() -> None:
    t = PriceTable.model_validate(
        {
            "version": "v",
            "effective_date": "2026-01-01",
            "models": {"m": {"provider": "openai", "input": 0.1, "cached_input": 0.1, "output": 0.3}},
        }
    )
    assert t.models["m"].input == Decimal("0.1")


def test_shipped_price_table_loads_and_covers_each_provider() -> None:
    t = load_policy_dir(REPO / "policies").prices
    assert {m.provider for m in t.models.values()} == {"openai", "anthropic", "gemini"}
    assert t.lookup("gpt-4o") is not None
    assert t.lookup("claude-sonnet-4-5-20250929") is not None
    assert t.lookup("gemini-2.5-flash") is not None
