"""UsageRecord.sanitized: every value made fit for its usage_events column before the writer sees it."""

from __future__ import annotations

import copy
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.usage import COST_OUT_OF_RANGE, VALUE_OUT_OF_RANGE, Usage
from tests.support import usage_record

COST_MAX = Decimal("999999999999.999999999999999999")


def test_clean_record_comes_back_equal_and_unflagged() -> None:
    r = usage_record(model_used="gpt-4o", team="a\tb", latency_ms=12, ttft_ms=3)
    assert r.sanitized() == r


def test_sanitized_leaves_its_input_alone() -> None:
    r = usage_record(model_used="m\x00", cost_usd=Decimal("1e20"), tags={"k\x00": "v"})
    before = copy.deepcopy(r)
    r.sanitized()
    assert r == before


def test_nul_and_control_characters_are_removed_but_tab_kept() -> None:
    r = usage_record(model_requested="gpt\x00-4o", model_used="a\r\nb\x1b[31m\tc", team="\x7fteam")
    s = r.sanitized()
    assert (s.model_requested, s.model_used, s.team) == ("gpt-4o", "ab[31m\tc", "\x7fteam")


def test_every_text_field_is_cleaned() -> None:
    dirty = "x\x00"
    r = usage_record(
        request_id=dirty,
        provider=dirty,
        api=dirty,
        team=dirty,
        project=dirty,
        model_requested=dirty,
        model_used=dirty,
        upstream=dirty,
        price_version=dirty,
        outcome=dirty,
        tags={dirty: dirty},
        flags=(dirty,),
    )
    s = r.sanitized()
    texts = [s.request_id, s.provider, s.api, s.team, s.project, s.model_requested, s.model_used]
    texts += [s.upstream, s.price_version, s.outcome, *s.tags, *s.tags.values(), *s.flags]
    assert texts == ["x"] * len(texts)


def test_lone_surrogates_become_replacement_characters() -> None:
    s = usage_record(model_used="a\ud800b", tags={"k": "\udfff"}).sanitized()
    assert (s.model_used, s.tags) == ("a\ufffdb", {"k": "\ufffd"})


def test_text_is_cut_to_256_characters_and_tag_keys_to_64() -> None:
    s = usage_record(model_used="m" * 1000, tags={"k" * 100: "v" * 1000}).sanitized()
    assert s.model_used == "m" * 256 and s.tags == {"k" * 64: "v" * 256}


def test_cost_past_numeric_30_18_is_clamped_to_its_maximum_and_flagged() -> None:
    s = usage_record(cost_usd=Decimal("1e17")).sanitized()
    assert (s.cost_usd, s.flags) == (COST_MAX, (COST_OUT_OF_RANGE,))


def test_cost_that_would_round_up_past_the_column_is_clamped() -> None:
    s = usage_record(cost_usd=COST_MAX + Decimal("1e-19")).sanitized()
    assert (s.cost_usd, s.flags) == (COST_MAX, (COST_OUT_OF_RANGE,))


def test_infinite_cost_is_clamped_and_flagged() -> None:
    s = usage_record(cost_usd=Decimal("Infinity")).sanitized()
    assert (s.cost_usd, s.flags) == (COST_MAX, (COST_OUT_OF_RANGE,))


def test_negative_cost_is_clamped_to_zero_and_flagged() -> None:
    s = usage_record(cost_usd=Decimal("-0.5")).sanitized()
    assert (s.cost_usd, s.flags) == (Decimal(0), (COST_OUT_OF_RANGE,))


def test_nan_cost_becomes_unknown_and_flagged() -> None:
    s = usage_record(cost_usd=Decimal("NaN")).sanitized()
    assert s.cost_usd is None and s.flags == (COST_OUT_OF_RANGE,)


def test_cost_beyond_18_decimal_places_is_rounded_unflagged() -> None:
    s = usage_record(cost_usd=Decimal("0.0000000000000000014")).sanitized()
    assert (s.cost_usd, s.flags) == (Decimal("0.000000000000000001"), ())


def test_tokens_past_bigint_are_clamped_and_flagged() -> None:
    s = usage_record(usage=Usage(input_tokens=2**70, output_tokens=-1)).sanitized()
    assert (s.usage.input_tokens, s.usage.output_tokens) == (2**63 - 1, 0)
    assert s.flags == (VALUE_OUT_OF_RANGE,)


def test_latency_ttft_and_status_past_integer_are_clamped_and_flagged() -> None:
    s = usage_record(latency_ms=2**31, ttft_ms=-5, status=10**12).sanitized()
    assert (s.latency_ms, s.ttft_ms, s.status, s.flags) == (2**31 - 1, 0, 2**31 - 1, (VALUE_OUT_OF_RANGE,))


def test_existing_flags_are_kept_ahead_of_new_ones() -> None:
    s = usage_record(flags=("estimated_usage",), cost_usd=Decimal(-1), latency_ms=-1).sanitized()
    assert s.flags == ("estimated_usage", COST_OUT_OF_RANGE, VALUE_OUT_OF_RANGE)


def test_spool_line_is_the_sanitized_record() -> None:
    r = usage_record(model_used="m\x00", cost_usd=Decimal("1e13"))
    line = r.to_json()
    assert line["model_used"] == "m" and line["cost_usd"] == str(COST_MAX)
    assert line["flags"] == [COST_OUT_OF_RANGE]


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(),
    tag_value=st.text(),
    tokens=st.integers(),
    cost=st.one_of(st.none(), st.decimals(allow_nan=True, allow_infinity=True)),
    latency=st.one_of(st.none(), st.integers()),
)
def test_sanitizing_twice_changes_nothing_more(
    text: str, tag_value: str, tokens: int, cost: Decimal | None, latency: int | None
) -> None:
    r = usage_record(
        model_used=text, team=text, tags={text: tag_value}, usage=Usage(tokens, tokens), cost_usd=cost
    )
    r.latency_ms = latency
    once = r.sanitized()
    assert once.sanitized() == once
