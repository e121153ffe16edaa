"""Upstream usage: hostile figures become non-negative, consistent counts, and say what was wrong."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.providers import PROVIDERS, base
from extproc.providers.base import ParsedRequest, consistent, count_problem, usage_from_body
from extproc.usage import Usage, as_int

openai, anthropic, gemini = PROVIDERS["openai"], PROVIDERS["anthropic"], PROVIDERS["gemini"]


@pytest.mark.parametrize(
    ("value", "expected", "problem"),
    [
        (None, 0, None),
        (12, 12, None),
        (12.0, 12, None),
        ("12", 12, None),
        (0, 0, None),
        (True, 0, "a boolean"),
        (-5, 0, "negative"),
        (-5.0, 0, "negative"),
        (float("nan"), 0, "not finite"),
        (float("inf"), 0, "not finite"),
        (float("-inf"), 0, "not finite"),
        (2.5, 0, "fractional"),
        ("-3", 0, "not a number"),
        ("12a", 0, "not a number"),
        ("٣", 0, "not a number"),  # a digit, but not an ASCII one
        ([1], 0, "not a number"),
        ({"n": 1}, 0, "not a number"),
        (2**60, 2**53, "too large"),
        (1e300, 2**53, "too large"),
        ("9" * 5000, 2**53, "too large"),
    ],
)
def test_as_int_and_count_problem_agree_on_every_kind_of_value(
    value: Any, expected: int, problem: str | None
) -> None:
    assert as_int(value) == expected
    assert count_problem(value) == problem


def test_consistent_clamps_each_part_to_what_contains_it() -> None:
    fixed, problems = consistent(Usage(10, 8, 5, 3, 9, 7))
    assert fixed == Usage(10, 5, 5, 3, 3, 5)
    assert len(problems) == 3
    assert consistent(Usage(10, 2, 5, 3, 1, 4)) == (Usage(10, 2, 5, 3, 1, 4), ())


def test_openai_negative_and_non_finite_counts_are_zeroed_and_flagged() -> None:
    body = b'{"model":"m","usage":{"prompt_tokens":-100,"completion_tokens":NaN,"prompt_tokens_details":{"cached_tokens":Infinity}}}'
    reported = usage_from_body(openai, "chat.completions", body)
    assert reported.usage == Usage()
    assert reported.model == "m"
    assert {"prompt_tokens negative", "completion_tokens not finite", "cached_tokens not finite"} <= set(
        reported.anomalies
    )


def test_openai_cached_above_prompt_is_clamped_and_flagged() -> None:
    doc = {
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 50}}
    }
    reported = openai.response_usage("chat.completions", doc)
    assert reported.usage == Usage(10, 10, 0, 2, 0)
    assert reported.anomalies == ("cached_input_tokens exceed input_tokens",)


def test_openai_details_that_are_not_objects_do_not_crash() -> None:
    doc = {"usage": {"prompt_tokens": 3, "completion_tokens": 1, "prompt_tokens_details": [1, 2]}}
    reported = openai.response_usage("chat.completions", doc)
    assert reported.usage == Usage(3, 0, 0, 1, 0) and reported.anomalies == (
        "prompt_tokens_details not an object",
    )


def test_anthropic_one_hour_cache_writes_are_read() -> None:
    doc = {
        "model": "claude-x",
        "usage": {
            "input_tokens": 20,
            "cache_creation_input_tokens": 12,
            "cache_read_input_tokens": 7,
            "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 8},
            "output_tokens": 3,
        },
    }
    reported = anthropic.response_usage("messages", doc)
    assert reported.usage == Usage(39, 7, 12, 3, 0, 8) and reported.anomalies == ()


def test_anthropic_breakdown_without_a_total_gives_the_total() -> None:
    doc = {
        "usage": {
            "input_tokens": 1,
            "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 6},
        }
    }
    assert anthropic.response_usage("messages", doc).usage == Usage(11, 0, 10, 0, 0, 6)


def test_anthropic_one_hour_writes_above_the_total_are_clamped_and_flagged() -> None:
    doc = {
        "usage": {
            "input_tokens": 1,
            "cache_creation_input_tokens": 2,
            "cache_creation": {"ephemeral_1h_input_tokens": 9},
        }
    }
    reported = anthropic.response_usage("messages", doc)
    assert reported.usage == Usage(3, 0, 2, 0, 0, 2)
    assert reported.anomalies == ("cache_write_1h_tokens exceed cache_write_tokens",)


def test_anthropic_stream_reads_one_hour_writes_from_message_start() -> None:
    stream = sse(
        {
            "type": "message_start",
            "message": {
                "model": "claude-x",
                "usage": {
                    "input_tokens": 5,
                    "cache_creation_input_tokens": 10,
                    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 10},
                    "output_tokens": 1,
                },
            },
        },
        {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 30}},
        {"type": "message_stop"},
    )
    acc = anthropic.stream_accountant("messages", ParsedRequest("claude-x", True))
    acc.feed(stream, True)
    assert acc.finish().usage == Usage(15, 0, 10, 30, 0, 10)


def test_gemini_tool_use_prompt_tokens_are_input() -> None:
    doc = {
        "usageMetadata": {
            "promptTokenCount": 70,
            "candidatesTokenCount": 53,
            "thoughtsTokenCount": 199,
            "toolUsePromptTokenCount": 79,
            "totalTokenCount": 401,
        }
    }
    assert gemini.response_usage("generateContent", doc).usage == Usage(149, 0, 0, 252, 199)


def test_gemini_hostile_metadata_is_flagged() -> None:
    body = b'{"usageMetadata":{"promptTokenCount":-1,"candidatesTokenCount":1e400,"cachedContentTokenCount":"x"}}'
    reported = usage_from_body(gemini, "generateContent", body)
    assert reported.usage == Usage()
    assert set(reported.anomalies) == {
        "promptTokenCount negative",
        "candidatesTokenCount not finite",
        "cachedContentTokenCount not a number",
    }


@pytest.mark.parametrize("provider", [openai, anthropic, gemini])
@pytest.mark.parametrize(
    "body", [b"[" * 100_000 + b"]" * 100_000, b"<html>bad gateway</html>", b"", b'{"usage":', b'{"a":' * 5000]
)
def test_an_unreadable_answer_is_an_anomaly_not_an_exception(provider: Any, body: bytes) -> None:
    reported = usage_from_body(provider, "chat.completions", body)
    assert reported.usage is None and reported.anomalies


@pytest.mark.parametrize("provider", [openai, anthropic, gemini])
@pytest.mark.parametrize(
    "doc", [None, 3, "x", [], [None, 1], {"usage": 5}, {"usageMetadata": []}, {"model": 7}]
)
def test_odd_documents_read_as_no_usage(provider: Any, doc: Any) -> None:
    reported = provider.response_usage("chat.completions", doc)
    assert reported.usage is None and reported.model is None


# -- streams -----------------------------------------------------------------------------------
def sse(*docs: object, end: bytes = b"\n\n") -> bytes:
    return b"".join(b"data: " + (d if isinstance(d, bytes) else json.dumps(d).encode()) + end for d in docs)


def chat_request(strip: bool) -> ParsedRequest:
    body = (
        b'{"model":"gpt-4o","stream":true}'
        if strip
        else (b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}')
    )
    return openai.parse_request("chat.completions", "", body)


USAGE_CHUNK = {"id": "c", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
DELTA = {"id": "c", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}


@pytest.mark.parametrize("strip", [False, True])
def test_a_plain_json_body_on_an_event_stream_passes_through_and_its_usage_is_read(strip: bool) -> None:
    body = json.dumps(
        {"model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6}}
    ).encode()
    acc = openai.stream_accountant("chat.completions", chat_request(strip))
    out = [acc.feed(body[:7]), acc.feed(body[7:]), acc.feed(b"", True)]
    assert all(o is None for o in out)
    result = acc.finish()
    assert result.usage == Usage(4, 0, 0, 6, 0) and result.model == "gpt-4o" and not result.lossy


def test_a_json_body_without_usage_on_an_event_stream_is_estimated_from_its_size() -> None:
    acc = gemini.stream_accountant("streamGenerateContent", ParsedRequest("m", True))
    acc.feed(b'{"error": "' + b"x" * 300 + b'"}', True)
    result = acc.finish()
    assert result.usage is None and result.lossy and result.extra_output_tokens > 0


def test_a_final_event_with_no_blank_line_reaches_the_client_when_the_stream_is_rewritten() -> None:
    stream = sse(DELTA, USAGE_CHUNK) + b"data: [DONE]"
    acc = openai.stream_accountant("chat.completions", chat_request(strip=True))
    out = b"".join(acc.feed(stream[i : i + 5]) or b"" for i in range(0, len(stream), 5))
    out += acc.feed(b"", end_of_stream=True) or b""
    assert out == sse(DELTA) + b"data: [DONE]"
    result = acc.finish()
    assert result.usage == Usage(9, 0, 0, 2, 0) and acc.ended


def test_the_rewritten_stream_keeps_every_byte_but_the_usage_chunk() -> None:
    keep = b": keep-alive\r\n\r\nevent: x\r\ndata: " + json.dumps(DELTA).encode() + b"\r\n\r\n"
    stream = keep + sse(USAGE_CHUNK, end=b"\r\n\r\n") + b"data: [DONE]\r\n\r\n"
    acc = openai.stream_accountant("chat.completions", chat_request(strip=True))
    out = b"".join(acc.feed(bytes([b])) or b"" for b in stream) + (acc.feed(b"", True) or b"")
    assert out == keep + b"data: [DONE]\r\n\r\n"


def test_a_stream_past_the_event_bound_passes_through_and_is_marked_lossy() -> None:
    huge = {"choices": [{"delta": {"content": "x" * (base.MAX_TEXT_CHARS + 600_000)}}]}
    stream = sse(DELTA) + sse(huge) + sse(USAGE_CHUNK) + b"data: [DONE]\n\n"
    acc = openai.stream_accountant("chat.completions", chat_request(strip=True))
    out = b"".join(acc.feed(stream[i : i + 65536]) or b"" for i in range(0, len(stream), 65536))
    out += acc.feed(b"", True) or b""
    assert out == stream  # nothing hidden once the parser gave up, nothing lost either
    result = acc.finish()
    assert result.lossy and result.usage is None and result.anomalies
    assert result.extra_output_tokens > 500_000 // 3


def test_a_long_stream_keeps_bounded_state() -> None:
    acc = openai.stream_accountant("chat.completions", chat_request(strip=False))
    chunk = sse({"choices": [{"delta": {"content": "word " * 200}}]})
    for _ in range(3000):  # ~3 MB of deltas
        acc.feed(chunk)
    acc.feed(sse(USAGE_CHUNK) + b"data: [DONE]\n\n", True)
    assert acc._kept_chars <= base.MAX_KEPT_EVENT_CHARS  # type: ignore[attr-defined]
    assert acc._text_chars <= base.MAX_TEXT_CHARS  # type: ignore[attr-defined]
    assert len(acc._last_usage) <= 4  # type: ignore[attr-defined]
    assert acc.finish().usage == Usage(9, 0, 0, 2, 0)


def test_a_long_stream_without_usage_is_estimated_from_bounded_text_plus_the_rest() -> None:
    acc = openai.stream_accountant("chat.completions", chat_request(strip=False))
    chunk = sse({"choices": [{"delta": {"content": "word " * 200}}]})
    for _ in range(3000):
        acc.feed(chunk)
    result = acc.finish()
    assert result.usage is None and len(result.text) == base.MAX_TEXT_CHARS
    assert result.extra_output_tokens == -(-(3000 * 1000 - base.MAX_TEXT_CHARS) // 3)


def test_stream_usage_anomalies_are_reported() -> None:
    acc = gemini.stream_accountant("streamGenerateContent", ParsedRequest("m", True))
    acc.feed(
        sse({"usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": -9}, "modelVersion": "g"}), True
    )
    result = acc.finish()
    assert result.usage == Usage(5, 0, 0, 0, 0) and result.anomalies == ("candidatesTokenCount negative",)
    assert result.model == "g"


def test_an_oversized_answer_has_its_usage_read_from_its_end() -> None:
    vectors = {"object": "list", "data": [{"embedding": [0.25] * 500}] * 40, "model": "e"}
    body = json.dumps({**vectors, "usage": {"prompt_tokens": 8, "total_tokens": 8}}).encode()
    reported = usage_from_body(openai, "embeddings", body, max_bytes=len(body) // 2)
    assert reported.usage == Usage(8, 0, 0, 0, 0) and "usage read from its end" in reported.anomalies[0]
    chunks = [{"candidates": []}, {"usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4}}]
    body = b" " * 500 + json.dumps(chunks).encode()
    assert usage_from_body(gemini, "streamGenerateContent", body, max_bytes=100).usage == Usage(3, 0, 0, 4, 0)
    crafted = b'{"usage":{' * 100_000
    reported = usage_from_body(openai, "chat.completions", crafted, max_bytes=100)
    assert reported.usage is None and "no usage" in reported.anomalies[0]


def test_the_responses_api_final_event_may_exceed_the_usual_event_bound() -> None:
    text = "é" * 600_000  # escaped as \\u00e9: 3.6 MB of JSON in one event
    done = {
        "type": "response.completed",
        "response": {
            "model": "gpt-5",
            "output": [{"content": [{"text": text}]}],
            "usage": {"input_tokens": 5, "output_tokens": 9},
        },
    }
    acc = openai.stream_accountant("responses", ParsedRequest("gpt-5", True))
    stream = sse(done)
    for i in range(0, len(stream), 65536):
        acc.feed(stream[i : i + 65536])
    result = acc.finish()
    assert result.usage == Usage(5, 0, 0, 9, 0) and not result.lossy and acc.ended


def test_an_oversized_json_body_on_an_event_stream_has_its_usage_read_from_its_end() -> None:
    filler = {"object": "list", "data": [{"embedding": [0.5] * 1000}] * 1700}  # ~ 8.5 MB
    usage = {"prompt_tokens": 3, "completion_tokens": 0}
    body = json.dumps({**filler, "model": "e", "usage": usage}).encode()
    assert len(body) > base.MAX_JSON_BODY_BYTES
    acc = openai.stream_accountant("chat.completions", chat_request(strip=True))
    outs = [acc.feed(body[i : i + (1 << 20)]) for i in range(0, len(body), 1 << 20)]
    assert all(o is None for o in outs)
    result = acc.finish()
    assert result.usage == Usage(3, 0, 0, 0, 0) and "usage read from its end" in result.anomalies[0]
