"""Anthropic SDK through the proxy: transparent answers, key swap, exact usage records."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.e2e.helpers import assert_provider_saw_only_the_real_key, assert_record, seen_by_provider
from tests.fakeprovider import ANTHROPIC_USAGE, REPLY_TEXT, TOOL_ARGUMENTS, FakeProvider
from tests.support import Issued, Stack, usage_rows

MODEL = "fake-anthropic-model"
U = ANTHROPIC_USAGE
MESSAGES = [{"role": "user", "content": "hi"}]
TOOLS = [
    {
        "name": "get_weather",
        "description": "weather",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def client(stack: Stack, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=key, max_retries=0)


def expect_exact(stack: Stack, issued: Issued, stream: bool) -> None:
    (row,) = usage_rows(stack, issued.key_id)
    total_input = U["input_tokens"] + U["cache_creation_input_tokens"] + U["cache_read_input_tokens"]
    assert_record(
        row,
        MODEL,
        inp=total_input,
        cached=U["cache_read_input_tokens"],
        write=U["cache_creation_input_tokens"],
        out=U["output_tokens"],
        stream=stream,
    )
    assert row["api"] == "messages" and row["provider"] == "anthropic"


def test_message_answer_reaches_the_app(stack: Stack, anthropic_key: Issued) -> None:
    msg = client(stack, anthropic_key.key).messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert msg.content[0].type == "text" and msg.content[0].text == REPLY_TEXT


def test_message_reaches_the_provider_with_the_real_key_only(
    stack: Stack, fake: FakeProvider, anthropic_key: Issued
) -> None:
    client(stack, anthropic_key.key).messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    (req,) = seen_by_provider(fake, anthropic_key)
    assert_provider_saw_only_the_real_key(req, anthropic_key)
    assert "authorization" not in req.headers


def test_message_writes_one_exact_record(stack: Stack, anthropic_key: Issued) -> None:
    client(stack, anthropic_key.key).messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    expect_exact(stack, anthropic_key, stream=False)


def test_wrapped_key_sent_as_bearer_token_works_too(
    stack: Stack, fake: FakeProvider, anthropic_key: Issued
) -> None:
    c = anthropic.Anthropic(base_url=stack.url, auth_token=anthropic_key.key, api_key=None, max_retries=0)
    c.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    (req,) = seen_by_provider(fake, anthropic_key)
    assert_provider_saw_only_the_real_key(req, anthropic_key)


def test_streamed_message_reaches_the_app(stack: Stack, anthropic_key: Issued) -> None:
    with client(stack, anthropic_key.key).messages.stream(
        model=MODEL, max_tokens=100, messages=MESSAGES
    ) as s:
        assert "".join(s.text_stream) == REPLY_TEXT


def test_streamed_message_writes_one_exact_record(stack: Stack, anthropic_key: Issued) -> None:
    with client(stack, anthropic_key.key).messages.stream(
        model=MODEL, max_tokens=100, messages=MESSAGES
    ) as s:
        s.until_done()
    expect_exact(stack, anthropic_key, stream=True)


def test_streamed_tool_use_arrives_whole_and_is_accounted(stack: Stack, anthropic_key: Issued) -> None:
    with client(stack, anthropic_key.key).messages.stream(
        model=MODEL,
        max_tokens=100,
        messages=MESSAGES,
        tools=TOOLS,  # type: ignore[arg-type]
    ) as s:
        final = s.get_final_message()
    tool = next(b for b in final.content if b.type == "tool_use")
    assert tool.input == dict(TOOL_ARGUMENTS)
    expect_exact(stack, anthropic_key, stream=True)


def test_tool_use_without_streaming_is_accounted(stack: Stack, anthropic_key: Issued) -> None:
    msg = client(stack, anthropic_key.key).messages.create(
        model=MODEL,
        max_tokens=100,
        messages=MESSAGES,
        tools=TOOLS,  # type: ignore[arg-type]
    )
    assert any(b.type == "tool_use" for b in msg.content)
    expect_exact(stack, anthropic_key, stream=False)


def test_count_tokens_passes_through(stack: Stack, anthropic_key: Issued) -> None:
    n = client(stack, anthropic_key.key).messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert n.input_tokens > 0
    (row,) = usage_rows(stack, anthropic_key.key_id)
    assert row["api"] == "passthrough" and row["input_tokens"] == 0


def test_unknown_key_raises_authentication_error_and_never_reaches_the_provider(
    stack: Stack, fake: FakeProvider
) -> None:
    before = len(fake.requests)
    with pytest.raises(anthropic.AuthenticationError):
        client(stack, "sg-" + "1" * 43).messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert len(fake.requests) == before


def test_malformed_body_gets_400_in_anthropic_format(stack: Stack, anthropic_key: Issued) -> None:
    r = httpx.post(
        stack.url + "/v1/messages",
        content=b"[1, 2",
        headers={"x-api-key": anthropic_key.key, "content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"


def test_upstream_429_raises_rate_limit_error_and_is_recorded(stack: Stack, anthropic_key: Issued) -> None:
    with pytest.raises(anthropic.RateLimitError):
        client(stack, anthropic_key.key).messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES, extra_headers={"x-fake-scenario": "error-429"}
        )
    (row,) = usage_rows(stack, anthropic_key.key_id)
    assert (row["status"], row["outcome"]) == (429, "upstream_error")


def test_upstream_500_raises_server_error_and_is_recorded(stack: Stack, anthropic_key: Issued) -> None:
    with pytest.raises(anthropic.InternalServerError):
        client(stack, anthropic_key.key).messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES, extra_headers={"x-fake-scenario": "error-500"}
        )
    (row,) = usage_rows(stack, anthropic_key.key_id)
    assert (row["status"], row["outcome"]) == (500, "upstream_error")
