"""OpenAI SDK through the proxy: transparent answers, key swap, exact usage records."""

from __future__ import annotations

import json
import secrets

import httpx
import openai
import pytest

from tests.e2e.helpers import (
    assert_provider_saw_only_the_real_key,
    assert_record,
    openai_client,
    seen_by_provider,
)
from tests.fakeprovider import EMBEDDING_USAGE, OPENAI_USAGE, REPLY_TEXT, TOOL_ARGUMENTS_JSON, FakeProvider
from tests.support import Issued, Stack, usage_rows

MODEL = "fake-openai-model"
U = OPENAI_USAGE
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def expect_exact(stack: Stack, issued: Issued, stream: bool, api: str = "chat.completions") -> None:
    (row,) = usage_rows(stack, issued.key_id)
    assert_record(
        row,
        MODEL,
        inp=U["prompt_tokens"],
        cached=U["cached_tokens"],
        out=U["completion_tokens"],
        reasoning=U["reasoning_tokens"],
        stream=stream,
    )
    assert row["api"] == api and row["team"] == "team-a" and row["project"] == "proj-x"


def test_chat_completion_answer_reaches_the_app(stack: Stack, openai_key: Issued) -> None:
    resp = openai_client(stack, openai_key.key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert resp.choices[0].message.content == REPLY_TEXT
    assert resp.usage is not None and resp.usage.prompt_tokens == U["prompt_tokens"]


def test_chat_completion_reaches_the_provider_with_the_real_key_only(
    stack: Stack, fake: FakeProvider, openai_key: Issued
) -> None:
    openai_client(stack, openai_key.key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    (req,) = seen_by_provider(fake, openai_key)
    assert_provider_saw_only_the_real_key(req, openai_key)
    assert "accept-encoding" not in req.headers or "gzip" not in req.headers["accept-encoding"]


def test_chat_completion_writes_one_exact_record(stack: Stack, openai_key: Issued) -> None:
    openai_client(stack, openai_key.key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    expect_exact(stack, openai_key, stream=False)


def test_streamed_chat_reaches_the_app_chunk_by_chunk(stack: Stack, openai_key: Issued) -> None:
    chunks = list(
        openai_client(stack, openai_key.key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY_TEXT


def test_streamed_chat_hides_the_usage_chunk_the_app_did_not_ask_for(
    stack: Stack, openai_key: Issued
) -> None:
    chunks = list(
        openai_client(stack, openai_key.key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_streamed_chat_asks_the_provider_for_usage(
    stack: Stack, fake: FakeProvider, openai_key: Issued
) -> None:
    list(
        openai_client(stack, openai_key.key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    (req,) = seen_by_provider(fake, openai_key)
    assert req.json()["stream_options"] == {"include_usage": True}


def test_streamed_chat_writes_one_exact_record(stack: Stack, openai_key: Issued) -> None:
    list(
        openai_client(stack, openai_key.key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    expect_exact(stack, openai_key, stream=True)


def test_streamed_chat_that_asked_for_usage_still_gets_it(stack: Stack, openai_key: Issued) -> None:
    chunks = list(
        openai_client(stack, openai_key.key).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == U["completion_tokens"]
    expect_exact(stack, openai_key, stream=True)


def test_streamed_tool_call_arrives_whole_and_is_accounted(stack: Stack, openai_key: Issued) -> None:
    stream = openai_client(stack, openai_key.key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, stream=True
    )
    args = "".join(
        tc.function.arguments or ""
        for c in stream
        if c.choices
        for tc in c.choices[0].delta.tool_calls or []
        if tc.function
    )
    assert json.loads(args) == json.loads(TOOL_ARGUMENTS_JSON)
    expect_exact(stack, openai_key, stream=True)


def test_tool_call_without_streaming_is_accounted(stack: Stack, openai_key: Issued) -> None:
    resp = openai_client(stack, openai_key.key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=TOOLS
    )
    assert resp.choices[0].message.tool_calls
    expect_exact(stack, openai_key, stream=False)


def test_responses_api_writes_one_exact_record(stack: Stack, openai_key: Issued) -> None:
    resp = openai_client(stack, openai_key.key).responses.create(model=MODEL, input="hi")
    assert resp.output_text == REPLY_TEXT
    expect_exact(stack, openai_key, stream=False, api="responses")


def test_streamed_responses_api_writes_one_exact_record(stack: Stack, openai_key: Issued) -> None:
    with openai_client(stack, openai_key.key).responses.stream(model=MODEL, input="hi") as s:
        text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
    assert text == REPLY_TEXT
    expect_exact(stack, openai_key, stream=True, api="responses")


def test_embeddings_write_one_exact_record(stack: Stack, openai_key: Issued) -> None:
    resp = openai_client(stack, openai_key.key).embeddings.create(model=MODEL, input="hello")
    assert len(resp.data) == 1
    (row,) = usage_rows(stack, openai_key.key_id)
    assert_record(row, MODEL, inp=EMBEDDING_USAGE["prompt_tokens"], out=0, stream=False)
    assert row["api"] == "embeddings"


def test_unknown_key_raises_authentication_error_and_never_reaches_the_provider(
    stack: Stack, fake: FakeProvider
) -> None:
    before = len(fake.requests)
    with pytest.raises(openai.AuthenticationError):
        openai_client(stack, "sg-" + "0" * 43).chat.completions.create(model=MODEL, messages=[])
    assert len(fake.requests) == before


def test_raw_provider_key_is_refused_not_forwarded(stack: Stack, fake: FakeProvider) -> None:
    before = len(fake.requests)
    with pytest.raises(openai.AuthenticationError):
        openai_client(stack, "sk-test-" + secrets.token_hex(16)).chat.completions.create(
            model=MODEL, messages=[]
        )
    assert len(fake.requests) == before


def test_malformed_body_gets_400_in_openai_format(
    stack: Stack, fake: FakeProvider, openai_key: Issued
) -> None:
    r = httpx.post(
        stack.url + "/v1/chat/completions",
        content=b'{"model": "x", ',
        headers={"authorization": f"Bearer {openai_key.key}", "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert seen_by_provider(fake, openai_key) == []
    (row,) = usage_rows(stack, openai_key.key_id)
    assert (row["status"], row["outcome"]) == (400, "rejected")


def test_malformed_body_raises_the_sdks_bad_request_error(stack: Stack, openai_key: Issued) -> None:
    with pytest.raises(openai.BadRequestError):
        openai_client(stack, openai_key.key).chat.completions.create(model=MODEL, messages=[], stream="yes")  # type: ignore[call-overload]


def test_upstream_429_is_passed_through_and_recorded(stack: Stack, openai_key: Issued) -> None:
    with pytest.raises(openai.RateLimitError) as exc:
        openai_client(stack, openai_key.key).chat.completions.create(
            model=MODEL, messages=[], extra_headers={"x-fake-scenario": "error-429"}
        )
    assert exc.value.response.headers.get("retry-after") == "1"
    (row,) = usage_rows(stack, openai_key.key_id)
    assert (row["status"], row["outcome"], row["input_tokens"]) == (429, "upstream_error", 0)


def test_upstream_500_is_passed_through_and_recorded(stack: Stack, openai_key: Issued) -> None:
    with pytest.raises(openai.InternalServerError):
        openai_client(stack, openai_key.key).chat.completions.create(
            model=MODEL, messages=[], extra_headers={"x-fake-scenario": "error-500"}
        )
    (row,) = usage_rows(stack, openai_key.key_id)
    assert (row["status"], row["outcome"]) == (500, "upstream_error")


def test_every_response_carries_a_request_id_matching_its_record(stack: Stack, openai_key: Issued) -> None:
    raw = openai_client(stack, openai_key.key).chat.completions.with_raw_response.create(
        model=MODEL, messages=[]
    )
    (row,) = usage_rows(stack, openai_key.key_id)
    assert raw.headers["x-spendgate-request-id"] == row["request_id"]


def test_tags_header_is_stored_and_not_forwarded(
    stack: Stack, fake: FakeProvider, openai_key: Issued
) -> None:
    openai_client(stack, openai_key.key).chat.completions.create(
        model=MODEL, messages=[], extra_headers={"x-spendgate-tags": "feature=search,env=prod"}
    )
    (row,) = usage_rows(stack, openai_key.key_id)
    assert row["tags"] == {"feature": "search", "env": "prod"}
    assert "x-spendgate-tags" not in seen_by_provider(fake, openai_key)[0].headers
