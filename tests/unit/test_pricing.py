"""Prices: exact decimals, each token part at its own price, long-prompt tiers, snapshots by longest prefix."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from extproc.policy.budgets import ceiling
from extproc.policy.loader import load_policy_dir
from extproc.policy_check import check_dir
from extproc.pricing import ModelPrice, PriceTable
from extproc.usage import Usage

REPO = Path(__file__).resolve().parents[2]
SHIPPED = load_policy_dir(REPO / "policies").prices


def table_of(**models: dict[str, Any]) -> PriceTable:
    return PriceTable.model_validate({"version": "t1", "effective_date": "2026-01-01", "models": models})


def price(**fields: Any) -> ModelPrice:
    return ModelPrice.model_validate({"provider": "openai", "max_output_tokens": 1000, **fields})


@pytest.fixture
def table() -> PriceTable:
    return table_of(
        **{
            "gpt-4o": {
                "provider": "openai",
                "input": "2.50",
                "cached_input": "1.25",
                "output": "10",
                "max_output_tokens": 16384,
            },
            "gpt-4o-mini": {
                "provider": "openai",
                "input": "0.15",
                "cached_input": "0.075",
                "output": "0.6",
                "max_output_tokens": 16384,
            },
            "claude-x": {
                "provider": "anthropic",
                "input": "3",
                "cached_input": "0.30",
                "output": "15",
                "cache_write": "3.75",
                "max_output_tokens": 64000,
            },
            # Shaped like Claude Sonnet 4.5: 5-minute writes 1.25x input, 1-hour writes 2x, and
            # the 1M-context beta's card for prompts over 200K tokens.
            "claude-sonnet": {
                "provider": "anthropic",
                "input": "3.00",
                "cached_input": "0.30",
                "output": "15.00",
                "cache_write": "3.75",
                "cache_write_1h": "6.00",
                "max_output_tokens": 64000,
                "tiers": [
                    {
                        "above_input_tokens": 200000,
                        "input": "6.00",
                        "cached_input": "0.60",
                        "output": "22.50",
                        "cache_write": "7.50",
                        "cache_write_1h": "12.00",
                    }
                ],
            },
            # Shaped like Gemini 2.5 Pro: prompts over 200K tokens pay another card throughout.
            "gemini-pro": {
                "provider": "gemini",
                "input": "1.25",
                "cached_input": "0.125",
                "output": "10.00",
                "max_output_tokens": 65536,
                "tiers": [
                    {"above_input_tokens": 200000, "input": "2.50", "cached_input": "0.25", "output": "15.00"}
                ],
            },
            # Shaped like GPT-5.6 Terra: cache writes 1.25x input, long context over 272K tokens.
            "gpt-terra": {
                "provider": "openai",
                "input": "2.00",
                "cached_input": "0.20",
                "output": "12.00",
                "cache_write": "2.50",
                "max_output_tokens": 128000,
                "tiers": [
                    {
                        "above_input_tokens": 272000,
                        "input": "4.00",
                        "cached_input": "0.40",
                        "output": "18.00",
                        "cache_write": "5.00",
                    }
                ],
            },
        }
    )


# -- lookup and exactness --------------------------------------------------------------------------
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
    t = table_of(
        m={"provider": "openai", "input": 0.1, "cached_input": 0.1, "output": 0.3, "max_output_tokens": 1}
    )
    assert t.models["m"].input == Decimal("0.1")


# -- Gemini long-context tier ----------------------------------------------------------------------
def test_gemini_prompt_below_the_threshold_pays_the_base_card(table: PriceTable) -> None:
    usage = Usage(input_tokens=150_000, cached_input_tokens=50_000, output_tokens=2_000)
    # 100,000 uncached at $1.25/M  = $0.125
    #  50,000 cached   at $0.125/M = $0.00625
    #   2,000 output   at $10/M    = $0.02
    assert table.cost("gemini-pro", usage) == Decimal("0.15125")


def test_gemini_prompt_exactly_at_the_threshold_stays_on_the_base_card(table: PriceTable) -> None:
    usage = Usage(input_tokens=200_000, output_tokens=1_000)
    # 200,000 input at $1.25/M = $0.25
    #   1,000 output at $10/M  = $0.01
    assert table.cost("gemini-pro", usage) == Decimal("0.26")


def test_gemini_prompt_one_token_over_the_threshold_pays_the_tier_for_every_token(table: PriceTable) -> None:
    usage = Usage(input_tokens=200_001, output_tokens=1_000)
    # 200,001 input at $2.50/M = $0.5000025 (not just the one token past 200K)
    #   1,000 output at $15/M  = $0.015 (output follows the prompt's tier)
    assert table.cost("gemini-pro", usage) == Decimal("0.5150025")


def test_gemini_long_prompt_counts_its_cached_tokens_and_bills_them_at_the_tier_cache_price(
    table: PriceTable,
) -> None:
    # promptTokenCount includes the cached content: 150,000 fresh + 100,000 cached = 250,000 > 200K.
    usage = Usage(input_tokens=250_000, cached_input_tokens=100_000, output_tokens=4_000)
    # 150,000 uncached at $2.50/M = $0.375
    # 100,000 cached   at $0.25/M = $0.025
    #   4,000 output   at $15/M   = $0.06
    assert table.cost("gemini-pro", usage) == Decimal("0.46")


# -- Anthropic prompt caching ----------------------------------------------------------------------
def test_anthropic_5m_and_1h_cache_writes_and_cache_reads_each_at_their_own_price(table: PriceTable) -> None:
    # input_tokens = 2,000 fresh + 5,000 cache reads + 3,000 cache writes, 1,000 of them 1-hour
    usage = Usage(
        input_tokens=10_000,
        cached_input_tokens=5_000,
        cache_write_tokens=3_000,
        cache_write_1h_tokens=1_000,
        output_tokens=500,
    )
    # 2,000 uncached       at $3/M    = $0.006
    # 5,000 cache reads    at $0.30/M = $0.0015
    # 2,000 5-minute write at $3.75/M = $0.0075
    # 1,000 1-hour write   at $6/M    = $0.006
    #   500 output         at $15/M   = $0.0075
    assert table.cost("claude-sonnet", usage) == Decimal("0.0285")


def test_anthropic_long_prompt_prices_cache_reads_and_both_writes_on_the_tier(table: PriceTable) -> None:
    usage = Usage(
        input_tokens=300_000,
        cached_input_tokens=200_000,
        cache_write_tokens=50_000,
        cache_write_1h_tokens=20_000,
        output_tokens=1_000,
    )
    #  50,000 uncached       at $6/M     = $0.30
    # 200,000 cache reads    at $0.60/M  = $0.12
    #  30,000 5-minute write at $7.50/M  = $0.225
    #  20,000 1-hour write   at $12/M    = $0.24
    #   1,000 output         at $22.50/M = $0.0225
    assert table.cost("claude-sonnet", usage) == Decimal("0.9075")


def test_one_hour_writes_without_their_own_price_are_billed_as_cache_writes(table: PriceTable) -> None:
    usage = Usage(input_tokens=1_000, cache_write_tokens=1_000, cache_write_1h_tokens=400)
    # claude-x lists no cache_write_1h: all 1,000 written tokens at $3.75/M = $0.00375
    assert table.cost("claude-x", usage) == Decimal("0.00375")


# -- OpenAI cache writes ---------------------------------------------------------------------------
def test_openai_cache_writes_are_billed_at_the_cache_write_price(table: PriceTable) -> None:
    # prompt_tokens 10,000 of which prompt_tokens_details.cache_write_tokens 8,000
    usage = Usage(input_tokens=10_000, cache_write_tokens=8_000, output_tokens=200)
    # 2,000 uncached    at $2/M    = $0.004
    # 8,000 cache write at $2.50/M = $0.02
    #   200 output      at $12/M   = $0.0024
    assert table.cost("gpt-terra", usage) == Decimal("0.0264")


def test_openai_long_context_doubles_input_cache_and_write_prices_for_the_whole_request(
    table: PriceTable,
) -> None:
    usage = Usage(
        input_tokens=300_000, cached_input_tokens=250_000, cache_write_tokens=10_000, output_tokens=1_000
    )
    #  40,000 uncached    at $4/M    = $0.16
    # 250,000 cached      at $0.40/M = $0.10
    #  10,000 cache write at $5/M    = $0.05
    #   1,000 output      at $18/M   = $0.018
    assert table.cost("gpt-terra", usage) == Decimal("0.328")


def test_parts_reported_larger_than_the_total_are_fitted_inside_it(table: PriceTable) -> None:
    # An inconsistent record: 800 read + 800 written of 1,000 input tokens. The total is trusted,
    # reads first: 800 cached at $0.30/M = $0.00024, the remaining 200 as writes at $3.75/M = $0.00075.
    usage = Usage(input_tokens=1_000, cached_input_tokens=800, cache_write_tokens=800)
    assert table.cost("claude-x", usage) == Decimal("0.00099")


# -- schema ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["-0.01", "1000.01", "NaN", "Infinity", "2500"])
def test_negative_absurd_or_non_finite_prices_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        price(input="1", cached_input="0.1", output=bad)


def test_a_model_that_bills_output_needs_a_positive_max_output_tokens() -> None:
    with pytest.raises(ValidationError, match="max_output_tokens must be positive"):
        ModelPrice.model_validate({"provider": "openai", "input": "1", "cached_input": "1", "output": "2"})
    with pytest.raises(ValidationError):
        price(input="1", cached_input="1", output="2", max_output_tokens=-5)


def test_an_embedding_model_may_reserve_no_output() -> None:
    p = price(input="0.02", cached_input="0.02", output="0", max_output_tokens=0)
    assert p.max_output_tokens == 0


def test_a_cache_read_dearer_than_input_is_refused_as_swapped_fields() -> None:
    with pytest.raises(ValidationError, match="dearer than input"):
        price(input="0.30", cached_input="3.00", output="15")


def test_tiers_must_be_listed_smallest_threshold_first() -> None:
    tier = {"input": "2", "cached_input": "0.2", "output": "4"}
    with pytest.raises(ValidationError, match="smallest first"):
        price(
            input="1",
            cached_input="0.1",
            output="2",
            tiers=[{"above_input_tokens": 300_000, **tier}, {"above_input_tokens": 200_000, **tier}],
        )


def test_a_tier_must_price_every_cache_write_its_model_prices() -> None:
    with pytest.raises(ValidationError, match="needs cache_write_1h"):
        price(
            input="3",
            cached_input="0.3",
            output="15",
            cache_write="3.75",
            cache_write_1h="6",
            tiers=[
                {
                    "above_input_tokens": 200_000,
                    "input": "6",
                    "cached_input": "0.6",
                    "output": "22.5",
                    "cache_write": "7.5",
                }
            ],
        )


def test_unknown_keys_in_a_tier_are_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        price(
            input="1",
            cached_input="0.1",
            output="2",
            tiers=[
                {"above_input_tokens": 1000, "input": "2", "cached_input": "0.2", "output": "4", "ouput": "4"}
            ],
        )


def test_policy_check_names_file_and_line_of_a_bad_tier_price(tmp_path: Path) -> None:
    (tmp_path / "pricing.yaml").write_text(
        'version: "v"\n'
        "effective_date: 2026-12-01\n"
        "models:\n"
        "  m:\n"
        "    provider: gemini\n"
        '    input: "1.25"\n'
        '    cached_input: "0.125"\n'
        '    output: "10"\n'
        "    max_output_tokens: 65536\n"
        "    tiers:\n"
        "      - above_input_tokens: 200000\n"
        '        input: "-2.50"\n'
        '        cached_input: "0.25"\n'
        '        output: "15"\n'
    )
    (problem,) = check_dir(tmp_path)
    assert problem.startswith(f"{tmp_path / 'pricing.yaml'}:12: models.m.tiers.0.input: ")


# -- the shipped table -----------------------------------------------------------------------------
def test_shipped_price_table_loads_and_covers_each_provider() -> None:
    assert {m.provider for m in SHIPPED.models.values()} == {"openai", "anthropic", "gemini"}
    assert SHIPPED.lookup("gpt-4o") is not None
    assert SHIPPED.lookup("claude-sonnet-4-5-20250929") is not None
    assert SHIPPED.lookup("gemini-2.5-flash") is not None


def test_shipped_anthropic_models_price_one_hour_writes_at_twice_input_on_every_card() -> None:
    for name, p in SHIPPED.models.items():
        if p.provider == "anthropic" and not name.startswith("fake-"):
            assert all(c.cache_write_1h == 2 * c.input for c in p.cards()), name


def test_shipped_gemini_2_5_pro_changes_card_above_200k_prompt_tokens() -> None:
    usage = Usage(input_tokens=250_000, output_tokens=1_000)
    # 250,000 input at $2.50/M = $0.625; 1,000 output at $15/M = $0.015
    assert SHIPPED.cost("models/gemini-2.5-pro", usage) == Decimal("0.64")


# -- the reservation covers what can be billed -----------------------------------------------------
_THRESHOLDS = sorted(
    {t.above_input_tokens + d for p in SHIPPED.models.values() for t in p.tiers for d in (0, 1)}
)
_TOKENS = st.integers(min_value=0, max_value=2_000_000)


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(sorted(SHIPPED.models)),
    input_tokens=st.one_of(_TOKENS, st.sampled_from(_THRESHOLDS)),
    cached=_TOKENS,
    writes=_TOKENS,
    writes_1h=_TOKENS,
    output=st.integers(min_value=0, max_value=500_000),
)
def test_cost_is_never_negative_and_never_above_the_reservation(
    model: str, input_tokens: int, cached: int, writes: int, writes_1h: int, output: int
) -> None:
    usage = Usage(
        input_tokens=input_tokens,
        cached_input_tokens=cached,
        cache_write_tokens=writes,
        cache_write_1h_tokens=writes_1h,
        output_tokens=output,
    )
    cost = SHIPPED.cost(model, usage)
    reserved = ceiling(SHIPPED.models[model], input_tokens=usage.input_tokens, max_output=usage.output_tokens)
    assert cost is not None and reserved is not None
    assert Decimal(0) <= cost <= reserved
