"""Per-provider parsing and usage extraction, on samples in each provider's real wire format."""

from __future__ import annotations

import json

import pytest

from extproc.providers import PROVIDERS
from extproc.providers.base import BadRequest
from extproc.usage import Usage

openai, anthropic, gemini = PROVIDERS["openai"], PROVIDERS["anthropic"], PROVIDERS["gemini"]


def sse(*docs: object) -> bytes:
    return b"".join(
        b"data: " + (d if isinstance(d, bytes) else json.dumps(d).encode()) + b"\n\n" for d in docs
    )


def feed_in_pieces(acc: object, data: bytes, size: int = 7) -> bytes:
    out = b""
    for i in range(0, len(data), size):
        r = acc.feed(data[i : i + size])  # type: ignore[attr-defined]
        out += data[i : i + size] if r is None else r
    return out


# -- OpenAI -----------------------------------------------------------------------------------
def test_openai_stream_request_gets_include_usage() -> None:
    req = openai.parse_request("chat.completions", "", b'{"model":"gpt-4o","stream":true,"messages":[]}')
    assert req.rewritten is not None
    assert json.loads(req.rewritten)["stream_options"] == {"include_usage": True}
    assert req.strip_usage


def test_openai_stream_request_that_asked_for_usage_is_not_rewritten() -> None:
    body = b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}'
    req = openai.parse_request("chat.completions", "", body)
    assert req.rewritten is None and not req.strip_usage


def test_openai_request_without_model_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="model"):
        openai.parse_request("chat.completions", "", b'{"messages":[]}')


def test_openai_request_that_is_not_json_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        openai.parse_request("chat.completions", "", b"{nope")


def test_openai_usage_includes_cached_and_reasoning_tokens() -> None:
    doc = {
        "model": "o3-2025",
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 40},
            "completion_tokens_details": {"reasoning_tokens": 30},
        },
    }
    assert openai.usage_from_response("chat.completions", doc) == (Usage(100, 40, 0, 50, 30), "o3-2025")


def test_openai_responses_api_usage_is_read_from_its_own_field_names() -> None:
    doc = {
        "model": "gpt-5",
        "usage": {
            "input_tokens": 12,
            "output_tokens": 7,
            "input_tokens_details": {"cached_tokens": 2},
            "output_tokens_details": {"reasoning_tokens": 3},
        },
    }
    assert openai.usage_from_response("responses", doc)[0] == Usage(12, 2, 0, 7, 3)


CHAT_STREAM = sse(
    {"id": "c", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "Hel"}}], "usage": None},
    {"id": "c", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "lo"}}], "usage": None},
    {"id": "c", "model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}},
    b"[DONE]",
)


def test_openai_stream_usage_comes_from_the_last_chunk_even_when_split_oddly() -> None:
    req = openai.parse_request(
        "chat.completions", "", b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}'
    )
    acc = openai.stream_accountant("chat.completions", req)
    assert feed_in_pieces(acc, CHAT_STREAM) == CHAT_STREAM
    assert acc.finish().usage == Usage(input_tokens=9, output_tokens=2)


def test_openai_stream_hides_the_usage_chunk_the_client_did_not_ask_for() -> None:
    req = openai.parse_request("chat.completions", "", b'{"model":"gpt-4o","stream":true}')
    acc = openai.stream_accountant("chat.completions", req)
    seen = feed_in_pieces(acc, CHAT_STREAM)
    assert b'"prompt_tokens"' not in seen
    assert seen.count(b"data: ") == 3 and seen.endswith(b"data: [DONE]\n\n")
    assert acc.finish().usage == Usage(input_tokens=9, output_tokens=2)


def test_openai_stream_cut_before_usage_keeps_the_text_for_counting() -> None:
    req = openai.parse_request("chat.completions", "", b'{"model":"gpt-4o","stream":true}')
    acc = openai.stream_accountant("chat.completions", req)
    acc.feed(CHAT_STREAM[: CHAT_STREAM.index(b'"choices": []')])
    result = acc.finish()
    assert result.usage is None and result.text == "Hello"


def test_openai_error_body_has_the_openai_shape() -> None:
    doc = json.loads(openai.error_body(401, "bad key"))
    assert doc["error"]["message"] == "bad key" and doc["error"]["code"] == "invalid_api_key"


# -- Anthropic --------------------------------------------------------------------------------
MESSAGES_STREAM = (
    b"event: message_start\n"
    + sse(
        {
            "type": "message_start",
            "message": {
                "model": "claude-x",
                "usage": {
                    "input_tokens": 20,
                    "cache_creation_input_tokens": 5,
                    "cache_read_input_tokens": 7,
                    "output_tokens": 1,
                },
            },
        }
    )
    + b"event: content_block_delta\n"
    + sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi there"}})
    + b"event: message_delta\n"
    + sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 12}})
    + b"event: message_stop\n"
    + sse({"type": "message_stop"})
)


def test_anthropic_input_counts_fresh_cache_write_and_cache_read_tokens() -> None:
    doc = {
        "model": "claude-x",
        "usage": {
            "input_tokens": 20,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 7,
            "output_tokens": 3,
        },
    }
    assert anthropic.usage_from_response("messages", doc)[0] == Usage(32, 7, 5, 3, 0)


def test_anthropic_stream_takes_input_from_message_start_and_output_from_message_delta() -> None:
    req = anthropic.parse_request("messages", "", b'{"model":"claude-x","messages":[],"stream":true}')
    acc = anthropic.stream_accountant("messages", req)
    feed_in_pieces(acc, MESSAGES_STREAM, 11)
    assert acc.finish().usage == Usage(32, 7, 5, 12, 0)


def test_anthropic_stream_cut_after_message_start_does_not_trust_the_placeholder_output() -> None:
    req = anthropic.parse_request("messages", "", b'{"model":"claude-x","messages":[],"stream":true}')
    acc = anthropic.stream_accountant("messages", req)
    acc.feed(MESSAGES_STREAM[: MESSAGES_STREAM.index(b"event: message_delta")])
    result = acc.finish()
    assert result.usage == Usage(32, 7, 5, 0, 0) and result.text == "Hi there"


def test_anthropic_request_without_messages_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="messages"):
        anthropic.parse_request("messages", "", b'{"model":"claude-x"}')


def test_anthropic_error_body_has_the_anthropic_shape() -> None:
    doc = json.loads(anthropic.error_body(429, "slow down"))
    assert doc == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}


# -- Gemini -----------------------------------------------------------------------------------
def test_gemini_model_and_stream_flag_come_from_the_path() -> None:
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    api = gemini.api_for("POST", path)
    req = gemini.parse_request(api, path, b'{"contents":[{"parts":[{"text":"hi"}]}]}')
    assert (api, req.model, req.stream) == ("streamGenerateContent", "gemini-2.5-flash", True)


def test_gemini_output_counts_candidates_and_thoughts() -> None:
    doc = {
        "modelVersion": "gemini-2.5-pro",
        "usageMetadata": {
            "promptTokenCount": 10,
            "cachedContentTokenCount": 4,
            "candidatesTokenCount": 6,
            "thoughtsTokenCount": 5,
        },
    }
    assert gemini.usage_from_response("generateContent", doc) == (Usage(10, 4, 0, 11, 5), "gemini-2.5-pro")


def test_gemini_stream_uses_the_last_cumulative_usage() -> None:
    def chunk(n: int) -> dict[str, object]:
        return {
            "candidates": [{"content": {"parts": [{"text": "x"}]}}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": n},
        }

    data = b"".join(b"data: " + json.dumps(chunk(n)).encode() + b"\r\n\r\n" for n in (1, 2, 3))
    acc = gemini.stream_accountant(
        "streamGenerateContent",
        gemini.parse_request(
            "streamGenerateContent", "/v1beta/models/m:streamGenerateContent", b'{"contents":[]}'
        ),
    )
    feed_in_pieces(acc, data, 5)
    assert acc.finish().usage == Usage(input_tokens=10, output_tokens=3)


def test_gemini_request_without_contents_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="contents"):
        gemini.parse_request("generateContent", "/v1beta/models/m:generateContent", b"{}")


def test_gemini_error_body_has_the_google_shape() -> None:
    doc = json.loads(gemini.error_body(401, "no"))
    assert doc == {"error": {"code": 401, "message": "no", "status": "UNAUTHENTICATED"}}
