"""Fuzzing the three providers' parsers: requests, usage and streams, valid and hostile.

- parse_request lets nothing but BadRequest escape, and what it accepts is within bounds;
- usage readers never raise, and what they report is non-negative and consistent;
- stream accountants never raise, read the same usage however a stream is split, and when they
  rewrite a stream, drop nothing but the usage chunk they mean to hide.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.providers import PROVIDERS
from extproc.providers.base import (
    MAX_CONTEXT_TOKENS,
    MAX_OUTPUT_TOKENS,
    BadRequest,
    ParsedRequest,
    StreamResult,
    consistent,
    count_prompt,
    usage_from_body,
)
from extproc.usage import Usage

openai, anthropic, gemini = PROVIDERS["openai"], PROVIDERS["anthropic"], PROVIDERS["gemini"]
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

APIS = [
    (openai, "chat.completions", ""),
    (openai, "completions", ""),
    (openai, "responses", ""),
    (openai, "embeddings", ""),
    (anthropic, "messages", ""),
    (gemini, "generateContent", "/v1beta/models/gemini-2.5-flash:generateContent"),
    (gemini, "streamGenerateContent", "/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
]

# Numbers of every awkward kind, as JSON text (NaN and Infinity included: hostile upstreams send them).
HOSTILE_NUMBER = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.sampled_from(["12", "-3", "x", "", "1e5"]),
    st.just([1]),
    st.just({"n": 1}),
)
SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=8)
)
JSON = st.recursive(
    SCALAR,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.sampled_from(
                ["type", "text", "content", "data", "parts", "image_url", "inlineData", "usage", "x"]
            ),
            children,
            max_size=4,
        ),
    ),
    max_leaves=20,
)


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def check_request(req: ParsedRequest) -> None:
    assert req.max_tokens is None or 1 <= req.max_tokens <= MAX_OUTPUT_TOKENS
    assert isinstance(req.multiplier, int) and req.multiplier >= 1
    assert isinstance(req.extra_input_tokens, int) and 0 <= req.extra_input_tokens <= MAX_CONTEXT_TOKENS


def no_internal_error(anomalies: tuple[str, ...]) -> None:
    # The catch-alls in usage_from_body and finish() must never be what kept a test green.
    assert not any("unreadable:" in a for a in anomalies), anomalies


def check_usage(usage: Usage | None) -> None:
    if usage is None:
        return
    for value in (
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.cache_write_1h_tokens,
        usage.output_tokens,
        usage.reasoning_tokens,
    ):
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 0
    assert consistent(usage) == (usage, ())


# -- requests ----------------------------------------------------------------------------------
@st.composite
def request_like(draw: st.DrawFn) -> dict[str, Any]:
    """A request body with the fields that feed reservations, each of any type or value."""
    doc: dict[str, Any] = {}
    for key in draw(
        st.lists(
            st.sampled_from(
                [
                    "model",
                    "messages",
                    "contents",
                    "prompt",
                    "input",
                    "stream",
                    "max_tokens",
                    "max_completion_tokens",
                    "max_output_tokens",
                    "n",
                    "best_of",
                    "stream_options",
                    "tools",
                    "thinking",
                    "generationConfig",
                    "generation_config",
                    "system",
                    "systemInstruction",
                    "previous_response_id",
                    "cachedContent",
                ]
            ),
            unique=True,
            max_size=8,
        )
    ):
        if key == "model":
            doc[key] = draw(st.one_of(st.just("gpt-4o"), st.just("gpt-4o-mini"), SCALAR))
        elif key in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n", "best_of"):
            doc[key] = draw(HOSTILE_NUMBER)
        elif key in ("generationConfig", "generation_config"):
            doc[key] = draw(
                st.dictionaries(
                    st.sampled_from(
                        [
                            "maxOutputTokens",
                            "max_output_tokens",
                            "candidateCount",
                            "candidate_count",
                            "thinkingConfig",
                        ]
                    ),
                    st.one_of(HOSTILE_NUMBER, st.fixed_dictionaries({"thinkingBudget": HOSTILE_NUMBER})),
                    max_size=3,
                )
            )
        elif key == "thinking":
            doc[key] = draw(st.one_of(SCALAR, st.fixed_dictionaries({"budget_tokens": HOSTILE_NUMBER})))
        elif key == "stream":
            doc[key] = draw(st.one_of(st.booleans(), SCALAR))
        else:
            doc[key] = draw(JSON)
    return doc


@FUZZ
@given(st.sampled_from(APIS), st.one_of(request_like().map(dumps), JSON.map(dumps), st.binary(max_size=200)))
def test_parse_request_raises_only_bad_request(api: tuple[Any, str, str], body: bytes) -> None:
    provider, kind, path = api
    try:
        req = provider.parse_request(kind, path, body)
    except BadRequest:
        return
    check_request(req)
    assert count_prompt(provider, kind, req.body) >= 0
    if req.rewritten is not None:
        provider.parse_request(kind, path, req.rewritten)  # what goes upstream parses the same way


@FUZZ
@given(st.sampled_from(APIS), st.integers(1, 3000), st.sampled_from([b"[", b'{"a":', b'{"a":[']))
def test_deep_nesting_is_refused_never_a_recursion_error(
    api: tuple[Any, str, str], depth: int, opener: bytes
) -> None:
    provider, kind, path = api
    closer = {b"[": b"]", b'{"a":': b"}", b'{"a":[': b"]}"}[opener]
    body = opener * depth + b"1" + closer * depth
    with contextlib.suppress(BadRequest):
        check_request(provider.parse_request(kind, path, body))


# -- usage in JSON answers -----------------------------------------------------------------------
@st.composite
def hostile_answers(draw: st.DrawFn) -> dict[str, Any]:
    usage_keys = [
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    meta_keys = [
        "promptTokenCount",
        "candidatesTokenCount",
        "thoughtsTokenCount",
        "cachedContentTokenCount",
        "toolUsePromptTokenCount",
    ]
    usage = draw(st.dictionaries(st.sampled_from(usage_keys), HOSTILE_NUMBER, max_size=6))
    for details, key in (
        ("prompt_tokens_details", "cached_tokens"),
        ("completion_tokens_details", "reasoning_tokens"),
        ("cache_creation", "ephemeral_1h_input_tokens"),
    ):
        if draw(st.booleans()):
            usage[details] = draw(st.one_of(st.fixed_dictionaries({key: HOSTILE_NUMBER}), SCALAR))
    return {
        "model": draw(st.one_of(st.just("m"), SCALAR)),
        "usage": draw(st.one_of(st.just(usage), SCALAR)),
        "usageMetadata": draw(st.dictionaries(st.sampled_from(meta_keys), HOSTILE_NUMBER, max_size=5)),
        "response": {"usage": usage},
    }


@FUZZ
@given(st.sampled_from(APIS), st.one_of(hostile_answers(), JSON))
def test_usage_readers_never_raise_and_report_non_negative_consistent_usage(
    api: tuple[Any, str, str], doc: Any
) -> None:
    provider, kind, _ = api
    body = dumps(doc)
    reported = usage_from_body(provider, kind, body)
    check_usage(reported.usage)
    no_internal_error(reported.anomalies)
    assert reported.model is None or isinstance(reported.model, str)


# -- streams -----------------------------------------------------------------------------------
ENDS = st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n"])


def event(doc: Any, end: bytes, name: bytes | None = None) -> bytes:
    head = b"event: " + name + b"\n" if name else b""
    data = doc if isinstance(doc, bytes) else dumps(doc)
    return head + b"data: " + data + end


@st.composite
def openai_stream(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A chat stream and what the client should see when the usage chunk is hidden."""
    out, seen = b"", b""
    for _ in range(draw(st.integers(0, 5))):
        piece = draw(
            st.one_of(
                st.builds(
                    lambda t, e: event({"choices": [{"delta": {"content": t}}]}, e),
                    st.text(max_size=10),
                    ENDS,
                ),
                st.builds(lambda e: b": keep-alive" + e, ENDS),
                # Any other event, so long as it is not a usage chunk itself.
                st.builds(
                    lambda d, e: event(d, e),
                    JSON.filter(lambda d: not isinstance(d, dict) or "usage" not in d),
                    ENDS,
                ),
            )
        )
        out, seen = out + piece, seen + piece
    usage = draw(
        st.fixed_dictionaries({"prompt_tokens": HOSTILE_NUMBER, "completion_tokens": HOSTILE_NUMBER})
    )
    out += event({"id": "c", "choices": [], "usage": usage}, draw(ENDS))
    done = b"data: [DONE]" + draw(st.sampled_from([b"", b"\n\n", b"\r\n\r\n"]))
    return out + done, seen + done


@st.composite
def anthropic_stream(draw: st.DrawFn) -> bytes:
    start = {
        "type": "message_start",
        "message": {
            "model": "claude-x",
            "usage": draw(
                st.fixed_dictionaries(
                    {
                        "input_tokens": HOSTILE_NUMBER,
                        "cache_read_input_tokens": HOSTILE_NUMBER,
                        "cache_creation_input_tokens": HOSTILE_NUMBER,
                        "cache_creation": st.fixed_dictionaries(
                            {"ephemeral_1h_input_tokens": HOSTILE_NUMBER}
                        ),
                    }
                )
            ),
        },
    }
    out = event(start, draw(ENDS), b"message_start")
    for text in draw(st.lists(st.text(max_size=10), max_size=4)):
        out += event(
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": text}}, draw(ENDS)
        )
    if draw(st.booleans()):
        delta = {"type": "message_delta", "usage": {"output_tokens": draw(HOSTILE_NUMBER)}}
        out += event(delta, draw(ENDS), b"message_delta")
    return out + event({"type": "message_stop"}, draw(st.sampled_from([b"", b"\n\n"])))


@st.composite
def gemini_stream(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        meta = draw(
            st.fixed_dictionaries(
                {"promptTokenCount": HOSTILE_NUMBER, "candidatesTokenCount": HOSTILE_NUMBER},
                optional={"thoughtsTokenCount": HOSTILE_NUMBER, "cachedContentTokenCount": HOSTILE_NUMBER},
            )
        )
        chunk = {
            "candidates": [{"content": {"parts": [{"text": draw(st.text(max_size=8))}]}}],
            "usageMetadata": meta,
        }
        out += event(chunk, draw(ENDS))
    return out


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


def run(acc: Any, pieces: list[bytes]) -> tuple[bytes, StreamResult]:
    out = b""
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        replaced = acc.feed(piece, last)
        out += piece if replaced is None else replaced
    if not pieces:
        out += acc.feed(b"", True) or b""
    return out, acc.finish()


def same_reading(a: StreamResult, b: StreamResult) -> bool:
    return (a.usage, a.model, a.text, a.anomalies, a.lossy) == (
        b.usage,
        b.model,
        b.text,
        b.anomalies,
        b.lossy,
    )


CUTS = st.lists(st.integers(0, 100_000), max_size=10)


@FUZZ
@given(openai_stream(), CUTS, st.booleans())
def test_openai_streams_split_anywhere_read_the_same_and_hide_only_usage(
    stream: tuple[bytes, bytes], cuts: list[int], strip: bool
) -> None:
    data, seen = stream
    req = ParsedRequest("gpt-4o", True, strip_usage=strip)
    whole_out, whole = run(openai.stream_accountant("chat.completions", req), [data])
    split_out, split = run(openai.stream_accountant("chat.completions", req), cut(data, cuts))
    check_usage(split.usage)
    no_internal_error(split.anomalies)
    assert same_reading(whole, split)
    assert whole_out == split_out == (seen if strip else data)


@FUZZ
@given(anthropic_stream(), CUTS)
def test_anthropic_streams_split_anywhere_read_the_same(data: bytes, cuts: list[int]) -> None:
    req = ParsedRequest("claude-x", True)
    whole_out, whole = run(anthropic.stream_accountant("messages", req), [data])
    split_out, split = run(anthropic.stream_accountant("messages", req), cut(data, cuts))
    check_usage(split.usage)
    no_internal_error(split.anomalies)
    assert same_reading(whole, split) and whole_out == split_out == data


@FUZZ
@given(gemini_stream(), CUTS)
def test_gemini_streams_split_anywhere_read_the_same(data: bytes, cuts: list[int]) -> None:
    req = ParsedRequest("g", True)
    whole_out, whole = run(gemini.stream_accountant("streamGenerateContent", req), [data])
    split_out, split = run(gemini.stream_accountant("streamGenerateContent", req), cut(data, cuts))
    check_usage(split.usage)
    no_internal_error(split.anomalies)
    assert same_reading(whole, split) and whole_out == split_out == data


@FUZZ
@given(
    st.sampled_from(APIS),
    st.booleans(),
    st.one_of(
        st.binary(max_size=400), JSON.map(dumps), st.lists(JSON.map(dumps), max_size=4).map(b"\n\n".join)
    ),
    CUTS,
)
def test_hostile_streams_never_raise_and_lose_no_byte(
    api: tuple[Any, str, str], strip: bool, data: bytes, cuts: list[int]
) -> None:
    provider, kind, _ = api
    req = ParsedRequest("m", True, strip_usage=strip)
    out, result = run(provider.stream_accountant(kind, req), cut(data, cuts))
    check_usage(result.usage)
    no_internal_error(result.anomalies)
    assert result.extra_output_tokens >= 0
    if b'"usage"' not in data:
        assert out == data
    else:
        assert len(out) <= len(data)
