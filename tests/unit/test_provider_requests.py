"""Request parsing: what each provider's parse_request refuses, and what it reserves for."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc import tokens
from extproc.providers import PROVIDERS
from extproc.providers import anthropic as anthropic_mod
from extproc.providers import gemini as gemini_mod
from extproc.providers import openai as openai_mod
from extproc.providers.base import (
    MAX_CONTEXT_TOKENS,
    UPSTREAM_CONTEXT_TOKENS,
    BadRequest,
    JSONRejected,
    ParsedRequest,
    count_prompt,
    json_depth,
    load_json,
)

openai, anthropic, gemini = PROVIDERS["openai"], PROVIDERS["anthropic"], PROVIDERS["gemini"]
GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"


def chat(**fields: Any) -> ParsedRequest:
    return openai.parse_request("chat.completions", "", json.dumps({"model": "gpt-4o", **fields}).encode())


def messages(**fields: Any) -> ParsedRequest:
    body = {"model": "claude-x", "messages": [], **fields}
    return anthropic.parse_request("messages", "", json.dumps(body).encode())


def generate(**fields: Any) -> ParsedRequest:
    body = {"contents": [], **fields}
    return gemini.parse_request("generateContent", GEMINI_PATH, json.dumps(body).encode())


ALL = [
    (openai, "chat.completions", "", b'{"model":"gpt-4o","messages":[]}'),
    (anthropic, "messages", "", b'{"model":"claude-x","messages":[]}'),
    (gemini, "generateContent", GEMINI_PATH, b'{"contents":[]}'),
]


# -- the JSON itself ---------------------------------------------------------------------------
@pytest.mark.parametrize(("provider", "api", "path", "_body"), ALL)
def test_a_body_nested_100000_levels_deep_is_a_bad_request(
    provider: Any, api: str, path: str, _body: bytes
) -> None:
    with pytest.raises(BadRequest, match="nests deeper"):
        provider.parse_request(api, path, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(BadRequest):
        provider.parse_request(api, path, b'{"a":' * 100_000 + b"1" + b"}" * 100_000)


@pytest.mark.parametrize(("provider", "api", "path", "body"), ALL)
def test_a_duplicate_key_at_any_depth_is_a_bad_request(
    provider: Any, api: str, path: str, body: bytes
) -> None:
    doc = body[:-1] + b',"x":{"y":1,"y":2}}'
    with pytest.raises(BadRequest, match="twice"):
        provider.parse_request(api, path, doc)
    first_key = next(iter(json.loads(body)))
    with pytest.raises(BadRequest, match="twice"):
        provider.parse_request(api, path, body[:-1] + b',"' + first_key.encode() + b'":"other"}')


@pytest.mark.parametrize(("provider", "api", "path", "body"), ALL)
@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(
    provider: Any, api: str, path: str, body: bytes, constant: bytes
) -> None:
    with pytest.raises(BadRequest, match="not a JSON number"):
        provider.parse_request(api, path, body[:-1] + b',"temperature":' + constant + b"}")


@pytest.mark.parametrize(("provider", "api", "path", "_body"), ALL)
@pytest.mark.parametrize("body", [b"", b"[]", b"3", b'"s"', b"null", b"\xff\xfe", b"{"])
def test_empty_non_object_and_broken_bodies_are_bad_requests(
    provider: Any, api: str, path: str, _body: bytes, body: bytes
) -> None:
    with pytest.raises(BadRequest):
        provider.parse_request(api, path, body)


def test_depth_scan_ignores_brackets_and_escapes_inside_strings() -> None:
    assert json_depth(b'{"a":"[[[[\\"[[[","b":[1,[2]]}') == 3
    assert json_depth(b'["\\\\",[["\\\\\\"]"]]]') == 3


def test_load_json_bounds_size_and_depth_and_never_recurses_out() -> None:
    with pytest.raises(JSONRejected, match="larger"):
        load_json(b"[1]", max_bytes=2)
    assert load_json(b"[" * 128 + b"]" * 128) is not None
    with pytest.raises(JSONRejected, match="deeper"):
        load_json(b"[" * 129 + b"]" * 129)
    # Invalid JSON the depth scan misreads still ends in JSONRejected, not RecursionError.
    with pytest.raises(JSONRejected):
        load_json(b'"' + b"[" * 50_000)
    with pytest.raises(JSONRejected):
        load_json(b"1" * 5000)  # past Python's int digit limit


def test_responses_may_repeat_keys_and_carry_nan_for_the_readers_to_flag() -> None:
    from extproc.providers.base import load_response_json

    assert load_response_json(b'{"a":1,"a":2}') == {"a": 2}
    doc = load_response_json(b'{"n":NaN}')
    assert doc["n"] != doc["n"]


# -- numbers that feed a reservation ------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [b"0", b"-1", b"true", b"false", b"5.5", b'"5"', b"[5]", b'{"n":5}', b"10000000", b"1e400", b"1e-5"],
)
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
def test_openai_output_ceilings_must_be_positive_integers_in_range(field: str, value: bytes) -> None:
    body = b'{"model":"m","' + field.encode() + b'":' + value + b"}"
    with pytest.raises(BadRequest, match=field):
        openai.parse_request("chat.completions", "", body)


def test_an_integral_float_reads_as_its_integer() -> None:
    assert chat(max_tokens=5.0).max_tokens == 5
    assert messages(max_tokens=7.0).max_tokens == 7
    assert generate(generationConfig={"maxOutputTokens": 9.0}).max_tokens == 9


def test_openai_takes_the_largest_of_several_ceilings() -> None:
    assert chat(max_tokens=10, max_completion_tokens=300).max_tokens == 300


@pytest.mark.parametrize(("field", "value"), [("n", 0), ("n", 129), ("n", 2.5), ("n", True), ("n", "3")])
def test_openai_n_must_be_in_its_documented_range(field: str, value: Any) -> None:
    with pytest.raises(BadRequest, match="'n'"):
        chat(**{field: value})


def test_openai_chat_reserves_every_completion_n_asks_for() -> None:
    assert chat(n=4, max_tokens=10).multiplier == 4
    assert chat().multiplier == 1


def test_openai_completions_bill_best_of_candidates_for_every_prompt() -> None:
    def completions(**fields: Any) -> ParsedRequest:
        return openai.parse_request("completions", "", json.dumps({"model": "m", **fields}).encode())

    assert completions(prompt="x", n=2, best_of=5).multiplier == 5
    assert completions(prompt="x", n=3).multiplier == 3
    assert completions(prompt=["a", "b", "c"], n=2).multiplier == 6
    assert completions(prompt=[[1, 2], [3]], best_of=4).multiplier == 8
    assert completions(prompt=[1, 2, 3]).multiplier == 1  # one prompt given as token ids
    with pytest.raises(BadRequest, match="best_of"):
        completions(prompt="x", best_of=21)


def test_token_id_prompts_count_as_unseen_input() -> None:
    req = openai.parse_request("completions", "", b'{"model":"m","prompt":[[1,2,3],[4,5]]}')
    assert req.extra_input_tokens == 5
    req = openai.parse_request("embeddings", "", b'{"model":"m","input":[7,8,9,10]}')
    assert req.extra_input_tokens == 4 and req.max_tokens is None


def test_anthropic_max_tokens_and_thinking_budget_are_validated() -> None:
    assert messages(max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 1024}).max_tokens == 2000
    for bad in (0, -5, 1.5, True, "100", 10**8):
        with pytest.raises(BadRequest, match="max_tokens"):
            messages(max_tokens=bad)
        with pytest.raises(BadRequest, match="budget_tokens"):
            messages(max_tokens=2000, thinking={"type": "enabled", "budget_tokens": bad})
    with pytest.raises(BadRequest, match="thinking"):
        messages(thinking="on")


def test_gemini_max_output_tokens_is_validated_not_ignored() -> None:
    assert generate(generationConfig={"maxOutputTokens": 100}).max_tokens == 100
    assert generate(generation_config={"max_output_tokens": "250"}).max_tokens == 250  # protobuf JSON
    for bad in (0, -1, 1.5, True, "many", [1], 10**8):
        with pytest.raises(BadRequest, match="maxOutputTokens"):
            generate(generationConfig={"maxOutputTokens": bad})


def test_gemini_candidate_count_multiplies_and_is_bounded() -> None:
    assert generate(generationConfig={"candidateCount": 3, "maxOutputTokens": 10}).multiplier == 3
    assert generate(generationConfig={"candidate_count": "2"}).multiplier == 2
    assert generate().multiplier == 1
    for bad in (0, 9, 2.5, False):
        with pytest.raises(BadRequest, match="candidateCount"):
            generate(generationConfig={"candidateCount": bad})


def test_gemini_thinking_budget_allows_dynamic_and_off() -> None:
    for budget in (-1, 0, 1024, "2048"):
        generate(generationConfig={"thinkingConfig": {"thinkingBudget": budget}})
    for bad in (-2, 1.5, True, 10**8):
        with pytest.raises(BadRequest, match="thinkingBudget"):
            generate(generationConfig={"thinkingConfig": {"thinkingBudget": bad}})


@pytest.mark.parametrize(
    "fields",
    [
        {"generationConfig": {}, "generation_config": {}},
        {"generationConfig": {"maxOutputTokens": 10, "max_output_tokens": 5000}},
        {"generationConfig": {"candidateCount": 1, "candidate_count": 8}},
        {"generationConfig": {"thinkingConfig": {"thinkingBudget": 1, "thinking_budget": 99}}},
        {"contents": [{"parts": [{"inlineData": {}, "inline_data": {}}]}]},
    ],
)
def test_gemini_refuses_a_field_spelt_both_ways(fields: dict[str, Any]) -> None:
    with pytest.raises(BadRequest, match="same field"):
        generate(**fields)


# -- input tiktoken cannot read ------------------------------------------------------------------
def test_openai_images_audio_and_files_are_reserved_at_their_worst_case() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
    audio = {"type": "input_audio", "input_audio": {"data": "A" * 1600, "format": "mp3"}}
    req = chat(messages=[{"role": "user", "content": [image, image, audio]}])
    assert (
        req.extra_input_tokens == 2 * openai_mod.IMAGE_TOKENS + 1600 // openai_mod.AUDIO_B64_CHARS_PER_TOKEN
    )
    mini = openai.parse_request(
        "chat.completions",
        "",
        json.dumps({"model": "gpt-4o-mini", "messages": [{"content": [image]}]}).encode(),
    )
    assert mini.extra_input_tokens == openai_mod.IMAGE_TOKENS_4O_MINI
    files = chat(messages=[{"content": [{"type": "file", "file": {"file_id": "f"}}] * 3}])
    per_request = openai_mod.PDF_PAGES_PER_REQUEST * (
        openai_mod.IMAGE_TOKENS + openai_mod.PDF_TEXT_TOKENS_PER_PAGE
    )
    assert files.extra_input_tokens == per_request


def test_openai_stored_context_and_server_tools_are_reserved() -> None:
    def responses(**fields: Any) -> ParsedRequest:
        return openai.parse_request("responses", "", json.dumps({"model": "gpt-5", **fields}).encode())

    assert responses(input="hi").extra_input_tokens == 0
    assert responses(input="hi", previous_response_id="resp_1").extra_input_tokens == UPSTREAM_CONTEXT_TOKENS
    assert responses(input="hi", tools=[{"type": "web_search"}]).extra_input_tokens == UPSTREAM_CONTEXT_TOKENS
    assert responses(input="hi", tools=[{"type": "function", "name": "f"}]).extra_input_tokens == 0
    image = {"type": "input_image", "image_url": "data:image/png;base64,AA"}
    assert (
        responses(input=[{"role": "user", "content": [image]}]).extra_input_tokens == openai_mod.IMAGE_TOKENS
    )


def test_anthropic_images_documents_and_tool_prompts_are_reserved() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "AA"}}
    text_doc = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "plain words"},
    }
    in_tool_result = {"type": "tool_result", "tool_use_id": "t", "content": [image]}
    req = messages(messages=[{"role": "user", "content": [image, in_tool_result, text_doc]}])
    assert req.extra_input_tokens == 2 * anthropic_mod.IMAGE_TOKENS
    with_pdf = messages(messages=[{"role": "user", "content": [pdf, pdf]}])
    pages = anthropic_mod.PDF_PAGES_PER_REQUEST * (
        anthropic_mod.IMAGE_TOKENS + anthropic_mod.PDF_TEXT_TOKENS_PER_PAGE
    )
    assert with_pdf.extra_input_tokens == pages
    tools = messages(tools=[{"name": "f", "input_schema": {"type": "object"}}])
    assert tools.extra_input_tokens == anthropic_mod.TOOL_SYSTEM_PROMPT_TOKENS
    search = messages(tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert search.extra_input_tokens == anthropic_mod.TOOL_SYSTEM_PROMPT_TOKENS + UPSTREAM_CONTEXT_TOKENS
    assert "plain words" in anthropic.prompt_text("messages", req.body)


def test_gemini_inline_and_referenced_media_are_reserved() -> None:
    image = {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}
    audio = {"inline_data": {"mime_type": "audio/mp3", "data": "A" * 40_000}}
    video = {"fileData": {"mimeType": "video/mp4", "fileUri": "files/abc"}}
    req = generate(contents=[{"parts": [image, audio]}])
    assert req.extra_input_tokens == gemini_mod.IMAGE_TOKENS + 40_000 // gemini_mod.INLINE_B64_CHARS_PER_TOKEN
    assert generate(contents=[{"parts": [video]}]).extra_input_tokens == gemini_mod.MEDIA_REFERENCE_TOKENS
    assert generate(contents=[{"parts": [video] * 5}]).extra_input_tokens == MAX_CONTEXT_TOKENS
    assert generate(cachedContent="cachedContents/x").extra_input_tokens == UPSTREAM_CONTEXT_TOKENS
    assert generate(tools=[{"googleSearch": {}}]).extra_input_tokens == UPSTREAM_CONTEXT_TOKENS
    assert generate(tools=[{"functionDeclarations": [{"name": "f"}]}]).extra_input_tokens == 0


# -- tool definitions are counted as text --------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "description": "zanzibar quokka"}}}


def test_tool_schemas_are_counted_as_their_full_json() -> None:
    oa = chat(
        messages=[{"role": "user", "content": "hi"}],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": SCHEMA}}],
        response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA}},
    )
    text = openai.prompt_text("chat.completions", oa.body)
    assert text.count("zanzibar quokka") == 2 and '"properties"' in text
    an = messages(tools=[{"name": "weather", "input_schema": SCHEMA}])
    assert '"properties"' in anthropic.prompt_text("messages", an.body)
    ge = generate(
        tools=[{"functionDeclarations": [{"name": "weather", "parameters": SCHEMA}]}],
        generationConfig={"responseSchema": SCHEMA},
    )
    assert gemini.prompt_text("generateContent", ge.body).count("zanzibar quokka") == 2


def test_tool_calls_and_results_in_the_conversation_are_counted() -> None:
    an = messages(
        messages=[
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"q": "quokka"}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "wallaby"}]},
        ]
    )
    text = anthropic.prompt_text("messages", an.body)
    assert "quokka" in text and "wallaby" in text
    ge = generate(
        contents=[
            {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"q": "numbat"}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"r": "bilby"}}}]},
        ]
    )
    text = gemini.prompt_text("generateContent", ge.body)
    assert "numbat" in text and "bilby" in text


def test_binary_payloads_are_not_counted_as_text() -> None:
    blob = "QUJD" * 10_000
    oa = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": blob}}]}])
    assert count_prompt(openai, "chat.completions", oa.body) < 50
    ge = generate(contents=[{"parts": [{"inlineData": {"mimeType": "audio/wav", "data": blob}}]}])
    assert count_prompt(gemini, "generateContent", ge.body) < 50


# -- token counting stays bounded ------------------------------------------------------------------
def test_count_is_exact_below_its_limit_and_estimated_above() -> None:
    short = "hello world " * 100
    assert tokens.count(short) == len(tokens._encoding().encode(short))
    long = "x" * (tokens.EXACT_CHARS + 3_000_000)
    n = tokens.count(long)
    exact_head = tokens.count(long[: tokens.EXACT_CHARS])
    assert n >= exact_head + 1_000_000  # the rest at no less than one token per 3 bytes
    assert tokens.approx(9) == 3 and tokens.approx(10) == 4 and tokens.approx(-1) == 0
