"""The official SDKs, pointed straight at the fake provider, parse every scenario it plays.

These tests pin the fake to the wire formats the real SDKs accept, so the
proxy tests that put Spendgate between an SDK and the fake can trust it.
"""

from __future__ import annotations

import base64
import gzip
import importlib
import json
import secrets
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from tests.fakeprovider import (
    ANTHROPIC_COUNT_TOKENS,
    ANTHROPIC_USAGE,
    CUT_AFTER_DELTAS,
    DELAY_HEADER,
    EMBEDDING_DIMENSIONS,
    EMBEDDING_USAGE,
    GEMINI_USAGE,
    OPENAI_USAGE,
    REPLY_DELTAS,
    REPLY_TEXT,
    SCENARIO_HEADER,
    TOOL_ARGUMENTS,
    FakeProvider,
    RecordedRequest,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Not on the SDK's deprecation list, so no DeprecationWarning noise.
ANTHROPIC_MODEL = "claude-haiku-5-5"
CUT_TEXT = "".join(REPLY_DELTAS[:CUT_AFTER_DELTAS])
USER_MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather?"}]
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
OPENAI_CHAT_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}
]
OPENAI_RESPONSES_TOOLS: list[Any] = [
    {"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}
]
ANTHROPIC_TOOLS: list[Any] = [{"name": "get_weather", "input_schema": WEATHER_SCHEMA}]
GEMINI_TOOLS = [
    genai_types.Tool(
        function_declarations=[
            genai_types.FunctionDeclaration(name="get_weather", parameters_json_schema=WEATHER_SCHEMA)
        ]
    )
]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the connection broke", whichever HTTP stack the SDKs use."""
    found: list[type[BaseException]] = [openai.APIConnectionError, anthropic.APIConnectionError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found.append(module.TransportError)
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


def scenario(name: str, **extra: str) -> dict[str, str]:
    """Headers selecting a fake-provider scenario."""
    return {SCENARIO_HEADER: name, **extra}


def gemini_config(
    headers: dict[str, str] | None = None, tools: list[genai_types.Tool] | None = None
) -> genai_types.GenerateContentConfig:
    """Per-request Gemini config; the SDK only takes extra headers through http_options."""
    return genai_types.GenerateContentConfig(
        http_options=genai_types.HttpOptions(headers=headers) if headers else None,
        tools=tools,  # type: ignore[arg-type]
    )


def raw_request(
    url: str, *, method: str = "POST", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Plain stdlib HTTP call, for what the SDKs hide (status, headers, raw bytes)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def requests_with_header(fp: FakeProvider, name: str, value: str) -> list[RecordedRequest]:
    """Recorded requests carrying a header value (keys are unique per test)."""
    return [r for r in fp.requests if r.headers.get(name) == value]


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp() -> Iterator[FakeProvider]:
    """One fake provider shared by the module's tests."""
    with FakeProvider() as provider:
        yield provider


@pytest.fixture
def openai_key() -> str:
    """A throwaway OpenAI-style key, unique to the test."""
    return "sk-test-" + secrets.token_hex(8)


@pytest.fixture
def anthropic_key() -> str:
    """A throwaway Anthropic-style key, unique to the test."""
    return "sk-ant-test-" + secrets.token_hex(8)


@pytest.fixture
def gemini_key() -> str:
    """A throwaway Gemini-style key, unique to the test."""
    return "gm-test-" + secrets.token_hex(8)


@pytest.fixture
def oai(fp: FakeProvider, openai_key: str) -> Iterator[openai.OpenAI]:
    """OpenAI SDK client talking to the fake directly."""
    client = openai.OpenAI(api_key=openai_key, base_url=fp.base_url + "/v1", max_retries=0, timeout=10)
    yield client
    client.close()


@pytest.fixture
def claude(fp: FakeProvider, anthropic_key: str) -> Iterator[anthropic.Anthropic]:
    """Anthropic SDK client talking to the fake directly."""
    client = anthropic.Anthropic(api_key=anthropic_key, base_url=fp.base_url, max_retries=0, timeout=10)
    yield client
    client.close()


@pytest.fixture
def gemini(fp: FakeProvider, gemini_key: str) -> Iterator[genai.Client]:
    """google-genai client talking to the fake directly (SDK default API version)."""
    client = genai.Client(
        api_key=gemini_key, http_options=genai_types.HttpOptions(base_url=fp.base_url, timeout=10_000)
    )
    yield client
    client.close()


# --------------------------------------------------------------------------
# OpenAI chat completions
# --------------------------------------------------------------------------


def test_openai_chat_returns_reply_text(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="gpt-4o-mini", messages=USER_MESSAGES)

    assert completion.choices[0].message.content == REPLY_TEXT
    assert completion.choices[0].finish_reason == "stop"


def test_openai_chat_echoes_requested_model(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="gpt-4.1-nano-2099", messages=USER_MESSAGES)

    assert completion.model == "gpt-4.1-nano-2099"


def test_openai_chat_reports_usage(oai: openai.OpenAI) -> None:
    usage = oai.chat.completions.create(model="gpt-4o-mini", messages=USER_MESSAGES).usage

    assert usage is not None
    assert usage.prompt_tokens == OPENAI_USAGE["prompt_tokens"]
    assert usage.completion_tokens == OPENAI_USAGE["completion_tokens"]
    assert usage.total_tokens == OPENAI_USAGE["prompt_tokens"] + OPENAI_USAGE["completion_tokens"]
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == OPENAI_USAGE["cached_tokens"]
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == OPENAI_USAGE["reasoning_tokens"]


def test_openai_chat_stream_concatenates_to_reply_text(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(model="gpt-4o-mini", messages=USER_MESSAGES, stream=True)

    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert text == REPLY_TEXT


def test_openai_chat_stream_reports_usage_when_include_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o-mini", messages=USER_MESSAGES, stream=True, stream_options={"include_usage": True}
    )

    chunks = list(stream)
    usage_chunks = [c for c in chunks if c.usage is not None]

    assert usage_chunks == [chunks[-1]]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        OPENAI_USAGE["prompt_tokens"],
        OPENAI_USAGE["completion_tokens"],
        OPENAI_USAGE["total_tokens"],
    )
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == OPENAI_USAGE["cached_tokens"]
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == OPENAI_USAGE["reasoning_tokens"]


def test_openai_chat_stream_omits_usage_without_include_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(model="gpt-4o-mini", messages=USER_MESSAGES, stream=True)

    assert all(c.usage is None for c in stream)


def test_openai_chat_tool_call_has_paris_arguments(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="gpt-4o-mini", messages=USER_MESSAGES, tools=OPENAI_CHAT_TOOLS
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == TOOL_ARGUMENTS


def test_openai_chat_stream_tool_call_fragments_reassemble(oai: openai.OpenAI) -> None:
    with oai.chat.completions.stream(
        model="gpt-4o-mini", messages=USER_MESSAGES, tools=OPENAI_CHAT_TOOLS
    ) as stream:
        completion = stream.get_final_completion()

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == TOOL_ARGUMENTS


@pytest.mark.parametrize(
    ("scenario_name", "error", "field", "value"),
    [
        ("error-429", openai.RateLimitError, "code", "rate_limit_exceeded"),
        ("error-500", openai.InternalServerError, "type", "server_error"),
        ("error-400", openai.BadRequestError, "type", "invalid_request_error"),
    ],
)
def test_openai_error_scenarios_raise_the_sdks_error_with_its_type(
    oai: openai.OpenAI, scenario_name: str, error: type[openai.APIStatusError], field: str, value: str
) -> None:
    with pytest.raises(error) as caught:
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=USER_MESSAGES, extra_headers=scenario(scenario_name)
        )

    assert getattr(caught.value, field) == value


def test_openai_rate_limit_carries_retry_after(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=USER_MESSAGES, extra_headers=scenario("error-429")
        )

    assert caught.value.response.headers["retry-after"] == "1"


def test_openai_cut_stream_raises_after_partial_text(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER_MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=scenario("cut"),
    )
    received: list[str] = []

    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            assert chunk.usage is None
            received.extend(c.delta.content or "" for c in chunk.choices)

    assert "".join(received) == CUT_TEXT


def test_openai_cut_non_stream_raises_connection_error(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=USER_MESSAGES, extra_headers=scenario("cut")
        )


def test_openai_stream_error_raises_api_error(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o-mini", messages=USER_MESSAGES, stream=True, extra_headers=scenario("stream-error")
    )

    with pytest.raises(openai.APIError) as caught:
        list(stream)

    assert caught.value.body == {
        "message": caught.value.message,
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_openai_gzip_scenario_compresses_and_still_parses(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=USER_MESSAGES, extra_headers=scenario("gzip")
    )

    assert raw.headers["content-encoding"] == "gzip"
    assert raw.parse().choices[0].message.content == REPLY_TEXT


def test_openai_gzip_stream_still_parses(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o-mini", messages=USER_MESSAGES, stream=True, extra_headers=scenario("gzip")
    )

    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == REPLY_TEXT


def test_openai_slow_stream_spaces_events_by_delay(oai: openai.OpenAI) -> None:
    delay = 0.05
    started = time.monotonic()
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER_MESSAGES,
        stream=True,
        extra_headers=scenario("slow", **{DELAY_HEADER: str(delay)}),
    )

    chunks = list(stream)

    # Every SSE event after the first waits; [DONE] is one of them.
    assert time.monotonic() - started >= delay * len(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY_TEXT


def test_openai_client_hanging_up_mid_slow_stream_leaves_server_healthy(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o-mini", messages=USER_MESSAGES, stream=True, extra_headers=scenario("slow")
    )
    next(iter(stream))
    stream.close()

    completion = oai.chat.completions.create(model="gpt-4o-mini", messages=USER_MESSAGES)

    assert completion.choices[0].message.content == REPLY_TEXT


def test_openai_unknown_scenario_is_rejected(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="unknown scenario"):
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=USER_MESSAGES, extra_headers=scenario("bogus")
        )


def test_openai_requests_are_recorded_with_bearer_auth(
    fp: FakeProvider, oai: openai.OpenAI, openai_key: str
) -> None:
    oai.chat.completions.create(model="gpt-4o-mini", messages=USER_MESSAGES)

    (recorded,) = requests_with_header(fp, "authorization", f"Bearer {openai_key}")
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.json()["messages"] == USER_MESSAGES


def test_openai_failing_requests_are_recorded(fp: FakeProvider, oai: openai.OpenAI, openai_key: str) -> None:
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=USER_MESSAGES, extra_headers=scenario("error-429")
        )

    (recorded,) = requests_with_header(fp, "authorization", f"Bearer {openai_key}")
    assert recorded.headers[SCENARIO_HEADER] == "error-429"


def test_openai_missing_auth_gets_401_in_openai_shape(fp: FakeProvider) -> None:
    status, _, body = raw_request(fp.base_url + "/v1/chat/completions", body={"model": "m", "messages": []})

    assert status == 401
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_unknown_path_gets_404_in_openai_shape(fp: FakeProvider, openai_key: str) -> None:
    status, headers, body = raw_request(
        fp.base_url + "/v1/no-such-endpoint", body={}, headers={"authorization": f"Bearer {openai_key}"}
    )

    assert status == 404
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body) == {
        "error": {
            "message": "Invalid URL (POST /v1/no-such-endpoint)",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


def test_unknown_path_is_recorded(fp: FakeProvider) -> None:
    marker = secrets.token_hex(8)
    raw_request(fp.base_url + f"/nowhere/{marker}", method="GET")

    assert [r.path for r in fp.requests if r.path.endswith(marker)] == [f"/nowhere/{marker}"]


def test_openai_responses_carry_request_id_header(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER_MESSAGES)

    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["content-type"] == "application/json"


# --------------------------------------------------------------------------
# OpenAI Responses, embeddings, legacy completions, models
# --------------------------------------------------------------------------


def test_openai_responses_returns_reply_text(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="gpt-4o-mini", input="hi")

    assert response.output_text == REPLY_TEXT
    assert response.status == "completed"
    assert response.model == "gpt-4o-mini"


def test_openai_responses_reports_usage(oai: openai.OpenAI) -> None:
    usage = oai.responses.create(model="gpt-4o-mini", input="hi").usage

    assert usage is not None
    assert usage.input_tokens == OPENAI_USAGE["prompt_tokens"]
    assert usage.output_tokens == OPENAI_USAGE["completion_tokens"]
    assert usage.total_tokens == OPENAI_USAGE["total_tokens"]
    assert usage.input_tokens_details.cached_tokens == OPENAI_USAGE["cached_tokens"]
    assert usage.output_tokens_details.reasoning_tokens == OPENAI_USAGE["reasoning_tokens"]


def test_openai_responses_stream_text_deltas_concatenate(oai: openai.OpenAI) -> None:
    stream = oai.responses.create(model="gpt-4o-mini", input="hi", stream=True)

    text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")

    assert text == REPLY_TEXT


def test_openai_responses_stream_completed_event_carries_usage(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model="gpt-4o-mini", input="hi", stream=True))

    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    usage = events[-1].response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
        OPENAI_USAGE["prompt_tokens"],
        OPENAI_USAGE["completion_tokens"],
        OPENAI_USAGE["total_tokens"],
    )
    assert usage.input_tokens_details.cached_tokens == OPENAI_USAGE["cached_tokens"]
    assert usage.output_tokens_details.reasoning_tokens == OPENAI_USAGE["reasoning_tokens"]


def test_openai_responses_stream_helper_builds_final_response(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model="gpt-4o-mini", input="hi") as stream:
        response = stream.get_final_response()

    assert response.output_text == REPLY_TEXT


def test_openai_responses_tool_call_has_paris_arguments(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="gpt-4o-mini", input="hi", tools=OPENAI_RESPONSES_TOOLS)

    (call,) = response.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == TOOL_ARGUMENTS


def test_openai_responses_stream_tool_call_arguments_reassemble(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model="gpt-4o-mini", input="hi", tools=OPENAI_RESPONSES_TOOLS) as stream:
        response = stream.get_final_response()

    (call,) = response.output
    assert call.type == "function_call"
    assert json.loads(call.arguments) == TOOL_ARGUMENTS


def test_openai_responses_cut_stream_raises_before_completion(oai: openai.OpenAI) -> None:
    stream = oai.responses.create(model="gpt-4o-mini", input="hi", stream=True, extra_headers=scenario("cut"))
    types_seen: list[str] = []

    with pytest.raises(openai.APIConnectionError):
        types_seen.extend(e.type for e in stream)

    assert "response.completed" not in types_seen


def test_openai_responses_stream_error_sends_error_event(oai: openai.OpenAI) -> None:
    events = list(
        oai.responses.create(
            model="gpt-4o-mini", input="hi", stream=True, extra_headers=scenario("stream-error")
        )
    )

    assert events[-1].type == "error"
    assert all(e.type != "response.completed" for e in events)


def test_openai_embeddings_report_usage(oai: openai.OpenAI) -> None:
    result = oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"])

    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == EMBEDDING_DIMENSIONS for d in result.data)
    assert result.usage.prompt_tokens == EMBEDDING_USAGE["prompt_tokens"]
    assert result.usage.total_tokens == EMBEDDING_USAGE["total_tokens"]


def test_openai_embeddings_base64_decodes_to_same_vector(oai: openai.OpenAI) -> None:
    floats = oai.embeddings.create(model="text-embedding-3-small", input="a").data[0].embedding
    # The SDK hands base64 back undecoded when the caller asked for it explicitly.
    encoded = oai.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="base64")
    raw = encoded.data[0].embedding

    assert isinstance(raw, str)
    assert list(struct.unpack(f"<{EMBEDDING_DIMENSIONS}f", base64.b64decode(raw))) == floats


def test_openai_legacy_completion_returns_reply_text(oai: openai.OpenAI) -> None:
    completion = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")

    assert completion.choices[0].text == REPLY_TEXT
    assert completion.usage is not None
    assert completion.usage.total_tokens == OPENAI_USAGE["total_tokens"]


def test_openai_models_list_is_served(oai: openai.OpenAI) -> None:
    models = [m.id for m in oai.models.list()]

    assert "gpt-4o-mini" in models


# --------------------------------------------------------------------------
# Anthropic
# --------------------------------------------------------------------------


def test_anthropic_returns_reply_text(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=ANTHROPIC_MODEL, max_tokens=64, messages=USER_MESSAGES)

    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == REPLY_TEXT  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.model == ANTHROPIC_MODEL


def test_anthropic_reports_usage(claude: anthropic.Anthropic) -> None:
    usage = claude.messages.create(model=ANTHROPIC_MODEL, max_tokens=64, messages=USER_MESSAGES).usage

    assert usage.input_tokens == ANTHROPIC_USAGE["input_tokens"]
    assert usage.cache_creation_input_tokens == ANTHROPIC_USAGE["cache_creation_input_tokens"]
    assert usage.cache_read_input_tokens == ANTHROPIC_USAGE["cache_read_input_tokens"]
    assert usage.output_tokens == ANTHROPIC_USAGE["output_tokens"]


def test_anthropic_stream_concatenates_to_reply_text(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model=ANTHROPIC_MODEL, max_tokens=64, messages=USER_MESSAGES) as stream:
        text = "".join(stream.text_stream)

    assert text == REPLY_TEXT


def test_anthropic_stream_start_has_input_usage_and_delta_has_final_output(
    claude: anthropic.Anthropic,
) -> None:
    events = list(
        claude.messages.create(model=ANTHROPIC_MODEL, max_tokens=64, messages=USER_MESSAGES, stream=True)
    )

    start = events[0]
    assert start.type == "message_start"
    assert start.message.usage.input_tokens == ANTHROPIC_USAGE["input_tokens"]
    assert start.message.usage.cache_creation_input_tokens == ANTHROPIC_USAGE["cache_creation_input_tokens"]
    assert start.message.usage.cache_read_input_tokens == ANTHROPIC_USAGE["cache_read_input_tokens"]
    assert start.message.usage.output_tokens == 1
    (delta,) = [e for e in events if e.type == "message_delta"]
    assert delta.usage.output_tokens == ANTHROPIC_USAGE["output_tokens"]
    assert events[-1].type == "message_stop"


def test_anthropic_stream_final_message_usage_matches_constants(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model=ANTHROPIC_MODEL, max_tokens=64, messages=USER_MESSAGES) as stream:
        usage = stream.get_final_message().usage

    assert (
        usage.input_tokens,
        usage.cache_creation_input_tokens,
        usage.cache_read_input_tokens,
        usage.output_tokens,
    ) == (
        ANTHROPIC_USAGE["input_tokens"],
        ANTHROPIC_USAGE["cache_creation_input_tokens"],
        ANTHROPIC_USAGE["cache_read_input_tokens"],
        ANTHROPIC_USAGE["output_tokens"],
    )


def test_anthropic_tool_use_has_paris_input(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=64, messages=USER_MESSAGES, tools=ANTHROPIC_TOOLS
    )

    (block,) = message.content
    assert block.type == "tool_use"
    assert block.name == "get_weather"
    assert block.input == TOOL_ARGUMENTS
    assert message.stop_reason == "tool_use"


def test_anthropic_stream_tool_input_json_reassembles(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=64, messages=USER_MESSAGES, tools=ANTHROPIC_TOOLS
    ) as stream:
        partial_json = "".join(
            e.delta.partial_json
            for e in stream
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        )
        message = stream.get_final_message()

    assert json.loads(partial_json) == TOOL_ARGUMENTS
    (block,) = message.content
    assert block.type == "tool_use"
    assert block.input == TOOL_ARGUMENTS
    assert message.stop_reason == "tool_use"


@pytest.mark.parametrize(
    ("scenario_name", "error", "error_type"),
    [
        ("error-429", anthropic.RateLimitError, "rate_limit_error"),
        ("error-500", anthropic.InternalServerError, "api_error"),
        ("error-529", anthropic.OverloadedError, "overloaded_error"),
        ("error-400", anthropic.BadRequestError, "invalid_request_error"),
    ],
)
def test_anthropic_error_scenarios_raise_the_sdks_error_with_its_type(
    claude: anthropic.Anthropic, scenario_name: str, error: type[anthropic.APIStatusError], error_type: str
) -> None:
    with pytest.raises(error) as caught:
        claude.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=64,
            messages=USER_MESSAGES,
            extra_headers=scenario(scenario_name),
        )

    assert caught.value.body["error"]["type"] == error_type  # type: ignore[index]


def test_anthropic_rate_limit_carries_retry_after(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.RateLimitError) as caught:
        claude.messages.create(
            model=ANTHROPIC_MODEL, max_tokens=64, messages=USER_MESSAGES, extra_headers=scenario("error-429")
        )

    assert caught.value.response.headers["retry-after"] == "1"


def test_anthropic_cut_stream_raises_after_partial_text(claude: anthropic.Anthropic) -> None:
    stream = claude.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=64,
        messages=USER_MESSAGES,
        stream=True,
        extra_headers=scenario("cut"),
    )
    received: list[str] = []
    types_seen: list[str] = []

    # anthropic's Stream lets the raw transport error through instead of
    # wrapping it in APIConnectionError, so accept either.
    with pytest.raises(TRANSPORT_ERRORS):
        for event in stream:
            types_seen.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                received.append(event.delta.text)

    assert "".join(received) == CUT_TEXT
    assert "message_delta" not in types_seen


def test_anthropic_stream_error_event_raises_overloaded(claude: anthropic.Anthropic) -> None:
    stream = claude.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=64,
        messages=USER_MESSAGES,
        stream=True,
        extra_headers=scenario("stream-error"),
    )

    with pytest.raises(anthropic.APIStatusError) as caught:
        list(stream)

    assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_anthropic_count_tokens_reports_whole_prompt(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model=ANTHROPIC_MODEL, messages=USER_MESSAGES)

    assert counted.input_tokens == ANTHROPIC_COUNT_TOKENS


def test_anthropic_sdk_sends_key_as_bearer_and_is_recorded(
    fp: FakeProvider, claude: anthropic.Anthropic, anthropic_key: str
) -> None:
    claude.messages.create(model=ANTHROPIC_MODEL, max_tokens=64, messages=USER_MESSAGES)

    (recorded,) = requests_with_header(fp, "authorization", f"Bearer {anthropic_key}")
    assert recorded.path == "/v1/messages"
    assert "anthropic-version" in recorded.headers


def test_anthropic_x_api_key_is_accepted(fp: FakeProvider, anthropic_key: str) -> None:
    status, headers, body = raw_request(
        fp.base_url + "/v1/messages",
        body={"model": ANTHROPIC_MODEL, "max_tokens": 64, "messages": USER_MESSAGES},
        headers={"x-api-key": anthropic_key, "anthropic-version": "2023-06-01"},
    )

    assert status == 200
    assert headers["request-id"].startswith("req_")
    assert json.loads(body)["content"][0]["text"] == REPLY_TEXT


def test_anthropic_missing_auth_gets_401_in_anthropic_shape(fp: FakeProvider) -> None:
    status, _, body = raw_request(fp.base_url + "/v1/messages", body={"model": "m", "messages": []})

    assert status == 401
    payload = json.loads(body)
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "authentication_error"


# --------------------------------------------------------------------------
# Gemini
# --------------------------------------------------------------------------


def test_gemini_returns_reply_text(gemini: genai.Client) -> None:
    response = gemini.models.generate_content(model="gemini-2.5-flash", contents="hi")

    assert response.text == REPLY_TEXT
    assert response.candidates is not None
    assert response.candidates[0].finish_reason == genai_types.FinishReason.STOP
    assert response.model_version == "gemini-2.5-flash"


def test_gemini_reports_usage(gemini: genai.Client) -> None:
    usage = gemini.models.generate_content(model="gemini-2.5-flash", contents="hi").usage_metadata

    assert usage is not None
    assert usage.prompt_token_count == GEMINI_USAGE["promptTokenCount"]
    assert usage.cached_content_token_count == GEMINI_USAGE["cachedContentTokenCount"]
    assert usage.candidates_token_count == GEMINI_USAGE["candidatesTokenCount"]
    assert usage.thoughts_token_count == GEMINI_USAGE["thoughtsTokenCount"]
    assert usage.total_token_count == (
        GEMINI_USAGE["promptTokenCount"]
        + GEMINI_USAGE["candidatesTokenCount"]
        + GEMINI_USAGE["thoughtsTokenCount"]
    )


def test_gemini_stream_concatenates_to_reply_text(gemini: genai.Client) -> None:
    chunks = list(gemini.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"))

    assert "".join(c.text or "" for c in chunks) == REPLY_TEXT


def test_gemini_stream_usage_is_cumulative_and_ends_final(gemini: genai.Client) -> None:
    chunks = list(gemini.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"))

    usages = [c.usage_metadata for c in chunks]
    assert all(u is not None for u in usages)
    candidates = [u.candidates_token_count or 0 for u in usages if u is not None]
    assert candidates == sorted(candidates)
    last = usages[-1]
    assert last is not None
    assert last.prompt_token_count == GEMINI_USAGE["promptTokenCount"]
    assert last.cached_content_token_count == GEMINI_USAGE["cachedContentTokenCount"]
    assert last.candidates_token_count == GEMINI_USAGE["candidatesTokenCount"]
    assert last.thoughts_token_count == GEMINI_USAGE["thoughtsTokenCount"]
    assert last.total_token_count == GEMINI_USAGE["totalTokenCount"]


def test_gemini_function_call_has_paris_args(gemini: genai.Client) -> None:
    response = gemini.models.generate_content(
        model="gemini-2.5-flash", contents="hi", config=gemini_config(tools=GEMINI_TOOLS)
    )

    assert response.function_calls is not None
    (call,) = response.function_calls
    assert call.name == "get_weather"
    assert call.args == TOOL_ARGUMENTS


def test_gemini_stream_function_call_has_paris_args(gemini: genai.Client) -> None:
    chunks = list(
        gemini.models.generate_content_stream(
            model="gemini-2.5-flash", contents="hi", config=gemini_config(tools=GEMINI_TOOLS)
        )
    )

    calls = [call for c in chunks for call in (c.function_calls or [])]
    assert [(c.name, c.args) for c in calls] == [("get_weather", TOOL_ARGUMENTS)]


@pytest.mark.parametrize(
    ("scenario_name", "error", "code", "status"),
    [
        ("error-429", genai_errors.ClientError, 429, "RESOURCE_EXHAUSTED"),
        ("error-500", genai_errors.ServerError, 500, "INTERNAL"),
        ("error-400", genai_errors.ClientError, 400, "INVALID_ARGUMENT"),
    ],
)
def test_gemini_error_scenarios_raise_the_sdks_error_with_code_and_status(
    gemini: genai.Client, scenario_name: str, error: type[genai_errors.APIError], code: int, status: str
) -> None:
    with pytest.raises(error) as caught:
        gemini.models.generate_content(
            model="gemini-2.5-flash", contents="hi", config=gemini_config(headers=scenario(scenario_name))
        )

    assert (caught.value.code, caught.value.status) == (code, status)


def test_gemini_cut_stream_raises_after_partial_text(gemini: genai.Client) -> None:
    stream = gemini.models.generate_content_stream(
        model="gemini-2.5-flash", contents="hi", config=gemini_config(headers=scenario("cut"))
    )
    received: list[str] = []

    with pytest.raises(TRANSPORT_ERRORS):
        for chunk in stream:
            assert chunk.usage_metadata is None
            received.append(chunk.text or "")

    assert "".join(received) == CUT_TEXT


def test_gemini_stream_error_chunk_raises_server_error(gemini: genai.Client) -> None:
    stream = gemini.models.generate_content_stream(
        model="gemini-2.5-flash", contents="hi", config=gemini_config(headers=scenario("stream-error"))
    )

    with pytest.raises(genai_errors.ServerError) as caught:
        list(stream)

    assert caught.value.code == 500


def test_gemini_count_tokens_reports_prompt(gemini: genai.Client) -> None:
    counted = gemini.models.count_tokens(model="gemini-2.5-flash", contents="hi")

    assert counted.total_tokens == GEMINI_USAGE["promptTokenCount"]


def test_gemini_v1beta_path_is_served(fp: FakeProvider, gemini_key: str) -> None:
    with genai.Client(
        api_key=gemini_key, http_options=genai_types.HttpOptions(base_url=fp.base_url, api_version="v1beta")
    ) as client:
        chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"))

    assert "".join(c.text or "" for c in chunks) == REPLY_TEXT
    (recorded,) = requests_with_header(fp, "x-goog-api-key", gemini_key)
    assert recorded.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert recorded.query == {"alt": "sse"}


def test_gemini_sse_events_use_crlf_framing(fp: FakeProvider, gemini_key: str) -> None:
    status, headers, body = raw_request(
        fp.base_url + "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        body={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
        headers={"x-goog-api-key": gemini_key},
    )

    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.split(b"\r\n\r\n") if e]
    assert len(events) == len(REPLY_DELTAS)
    assert all(e.startswith(b"data: ") for e in events)


def test_gemini_stream_without_alt_sse_is_a_json_array(fp: FakeProvider, gemini_key: str) -> None:
    status, _, body = raw_request(
        fp.base_url + "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        body={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
        headers={"x-goog-api-key": gemini_key},
    )

    assert status == 200
    chunks = json.loads(body)
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == REPLY_TEXT


def test_gemini_key_query_param_is_accepted(fp: FakeProvider, gemini_key: str) -> None:
    status, _, body = raw_request(
        fp.base_url + f"/v1beta/models/gemini-2.5-flash:generateContent?key={gemini_key}",
        body={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
    )

    assert status == 200
    assert json.loads(body)["usageMetadata"]["totalTokenCount"] == GEMINI_USAGE["totalTokenCount"]


def test_gemini_missing_key_gets_403_in_gemini_shape(fp: FakeProvider) -> None:
    status, _, body = raw_request(
        fp.base_url + "/v1beta/models/gemini-2.5-flash:generateContent", body={"contents": []}
    )

    assert status == 403
    assert json.loads(body)["error"]["status"] == "PERMISSION_DENIED"


def test_gemini_requests_are_recorded_with_api_key_header(
    fp: FakeProvider, gemini: genai.Client, gemini_key: str
) -> None:
    gemini.models.generate_content(model="gemini-2.5-flash", contents="hi")

    (recorded,) = requests_with_header(fp, "x-goog-api-key", gemini_key)
    assert recorded.path.endswith("/models/gemini-2.5-flash:generateContent")
    assert recorded.json()["contents"][0]["parts"][0]["text"] == "hi"


# --------------------------------------------------------------------------
# Raw gzip behaviour, lifecycle and the standalone process
# --------------------------------------------------------------------------


def test_gzip_scenario_without_accept_encoding_answers_plainly(fp: FakeProvider, openai_key: str) -> None:
    status, headers, body = raw_request(
        fp.base_url + "/v1/models",
        method="GET",
        headers={"authorization": f"Bearer {openai_key}", **scenario("gzip")},
    )

    assert status == 200
    assert "content-encoding" not in headers
    assert json.loads(body)["object"] == "list"


def test_gzip_scenario_compresses_sse_stream(fp: FakeProvider, anthropic_key: str) -> None:
    status, headers, body = raw_request(
        fp.base_url + "/v1/messages",
        body={"model": ANTHROPIC_MODEL, "max_tokens": 64, "messages": USER_MESSAGES, "stream": True},
        headers={"x-api-key": anthropic_key, "accept-encoding": "gzip", **scenario("gzip")},
    )

    assert status == 200
    assert headers["content-encoding"] == "gzip"
    text = gzip.decompress(body).decode()
    assert text.startswith("event: message_start\n")
    assert text.endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_reset_clears_recorded_requests() -> None:
    with FakeProvider() as provider:
        raw_request(provider.base_url + "/v1/models", method="GET")
        assert len(provider.requests) == 1

        provider.reset()

        assert provider.requests == []


def test_standalone_process_prints_base_url_and_stops_on_sigterm(openai_key: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakeprovider", "--port", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        with openai.OpenAI(
            api_key=openai_key, base_url=base_url + "/v1", max_retries=0, timeout=10
        ) as client:
            assert client.chat.completions.create(model="m", messages=USER_MESSAGES).choices[
                0
            ].message.content == (REPLY_TEXT)

        process.send_signal(signal.SIGTERM)

        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
