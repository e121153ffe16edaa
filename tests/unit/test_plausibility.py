"""What a request could have been billed: the bound on the usage an upstream reports."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.plausibility import MAX_INPUT_TOKENS, UsageBounds, bounds_for, draws_on_upstream_context, within
from extproc.usage import Usage


@pytest.mark.parametrize(
    "doc",
    [
        {"model": "m", "input": "hi", "previous_response_id": "resp_1"},
        {"model": "m", "prompt": {"id": "pmpt_1"}},
        {"contents": [], "cachedContent": "cachedContents/x"},
        {"model": "m", "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"model": "m", "tools": [{"type": "file_search"}]},
        {"contents": [], "tools": [{"googleSearch": {}}]},
        {"model": "m", "mcp_servers": [{"url": "https://example.invalid"}]},
    ],
)
def test_requests_that_bill_input_their_body_does_not_hold_are_recognised(doc: dict[str, object]) -> None:
    assert draws_on_upstream_context(doc)


@pytest.mark.parametrize(
    "doc",
    [
        {"model": "m", "prompt": "completions take their text here"},
        {"model": "m", "tools": [{"type": "function", "function": {"name": "f"}}]},
        {"model": "m", "tools": [{"name": "f", "input_schema": {"type": "object"}}]},
        {"model": "m", "tools": [{"type": "bash_20250124", "name": "bash"}]},
        {"model": "m", "tools": [{"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}]},
        {"contents": [], "tools": [{"functionDeclarations": [{"name": "f"}]}]},
    ],
)
def test_requests_whose_input_is_all_in_their_body_are_not(doc: dict[str, object]) -> None:
    assert not draws_on_upstream_context(doc)


def test_the_input_bound_is_the_body_plus_unseen_input_plus_a_template_allowance() -> None:
    b = bounds_for({"model": "m"}, body_bytes=1000, extra_input_tokens=500, multiplier=1, output_limit=100)
    assert 1500 < b.input_tokens < 1500 + 10_000 and b.output_tokens == 100


def test_every_completion_may_reach_the_output_limit() -> None:
    assert bounds_for({}, 10, 0, multiplier=4, output_limit=100).output_tokens == 400


def test_stored_context_lifts_the_input_bound_to_the_largest_window() -> None:
    assert bounds_for({"previous_response_id": "r"}, 10, 0, 1, 100).input_tokens == MAX_INPUT_TOKENS


_count = st.integers(min_value=-(2**40), max_value=2**40)


@settings(max_examples=300, deadline=None)
@given(_count, _count, _count, _count, _count, _count)
def test_clamped_usage_is_within_bounds_non_negative_and_consistent(
    inp: int, cached: int, write: int, write_1h: int, out: int, reasoning: int
) -> None:
    usage = Usage(inp, cached, write, out, reasoning, write_1h)
    clamped, changed = within(usage, UsageBounds(10_000, 500))
    assert 0 <= clamped.input_tokens <= 10_000 and 0 <= clamped.output_tokens <= 500
    assert clamped.cached_input_tokens + clamped.cache_write_tokens <= clamped.input_tokens
    assert clamped.cache_write_1h_tokens <= clamped.cache_write_tokens
    assert 0 <= clamped.reasoning_tokens <= clamped.output_tokens
    assert changed == (clamped != usage)
