"""google-genai SDK through the proxy: transparent answers, key swap, exact usage records."""

from __future__ import annotations

import httpx
import pytest
from google import genai
from google.genai import errors, types

from tests.e2e.helpers import assert_provider_saw_only_the_real_key, assert_record, seen_by_provider
from tests.fakeprovider import GEMINI_USAGE, REPLY_TEXT, TOOL_ARGUMENTS, FakeProvider
from tests.support import Issued, Stack, usage_rows

MODEL = "fake-gemini-model"
U = GEMINI_USAGE
WEATHER = types.Tool(
    function_declarations=[
        types.FunctionDeclaration(
            name="get_weather",
            parameters=types.Schema(
                type=types.Type.OBJECT, properties={"city": types.Schema(type=types.Type.STRING)}
            ),
        )
    ]
)


# google-genai closes its HTTP client when the Client object is collected, so a chained
# `client(...).models.x()` would use a closed client: keep them alive for the module.
_CLIENTS: dict[str, genai.Client] = {}


def client(stack: Stack, key: str) -> genai.Client:
    if key not in _CLIENTS:
        _CLIENTS[key] = genai.Client(
            api_key=key,
            http_options=types.HttpOptions(
                base_url=stack.url, retry_options=types.HttpRetryOptions(attempts=1)
            ),
        )
    return _CLIENTS[key]


def expect_exact(stack: Stack, issued: Issued, stream: bool) -> None:
    (row,) = usage_rows(stack, issued.key_id)
    out = U["candidatesTokenCount"] + U["thoughtsTokenCount"]
    assert_record(
        row,
        MODEL,
        inp=U["promptTokenCount"],
        cached=U["cachedContentTokenCount"],
        out=out,
        reasoning=U["thoughtsTokenCount"],
        stream=stream,
    )
    assert row["provider"] == "gemini"


def test_generate_content_answer_reaches_the_app(stack: Stack, gemini_key: Issued) -> None:
    assert (
        client(stack, gemini_key.key).models.generate_content(model=MODEL, contents="hi").text == REPLY_TEXT
    )


def test_generate_content_reaches_the_provider_with_the_real_key_only(
    stack: Stack, fake: FakeProvider, gemini_key: Issued
) -> None:
    client(stack, gemini_key.key).models.generate_content(model=MODEL, contents="hi")
    (req,) = seen_by_provider(fake, gemini_key)
    assert_provider_saw_only_the_real_key(req, gemini_key)


def test_generate_content_writes_one_exact_record(stack: Stack, gemini_key: Issued) -> None:
    client(stack, gemini_key.key).models.generate_content(model=MODEL, contents="hi")
    expect_exact(stack, gemini_key, stream=False)


def test_streamed_content_reaches_the_app(stack: Stack, gemini_key: Issued) -> None:
    chunks = client(stack, gemini_key.key).models.generate_content_stream(model=MODEL, contents="hi")
    assert "".join(c.text or "" for c in chunks) == REPLY_TEXT


def test_streamed_content_writes_one_exact_record(stack: Stack, gemini_key: Issued) -> None:
    list(client(stack, gemini_key.key).models.generate_content_stream(model=MODEL, contents="hi"))
    expect_exact(stack, gemini_key, stream=True)


def test_function_call_is_returned_and_accounted(stack: Stack, gemini_key: Issued) -> None:
    resp = client(stack, gemini_key.key).models.generate_content(
        model=MODEL, contents="weather?", config=types.GenerateContentConfig(tools=[WEATHER])
    )
    assert resp.function_calls and resp.function_calls[0].args == dict(TOOL_ARGUMENTS)
    expect_exact(stack, gemini_key, stream=False)


def test_streamed_function_call_is_returned_and_accounted(stack: Stack, gemini_key: Issued) -> None:
    chunks = list(
        client(stack, gemini_key.key).models.generate_content_stream(
            model=MODEL, contents="weather?", config=types.GenerateContentConfig(tools=[WEATHER])
        )
    )
    calls = [fc for c in chunks for fc in c.function_calls or []]
    assert calls and calls[0].args == dict(TOOL_ARGUMENTS)
    expect_exact(stack, gemini_key, stream=True)


def test_key_in_the_query_string_is_swapped_and_removed(
    stack: Stack, fake: FakeProvider, gemini_key: Issued
) -> None:
    r = httpx.post(
        f"{stack.url}/v1beta/models/{MODEL}:generateContent?key={gemini_key.key}",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
    )
    assert r.status_code == 200
    (req,) = seen_by_provider(fake, gemini_key)
    assert_provider_saw_only_the_real_key(req, gemini_key)
    assert "key" not in req.query


def test_unknown_key_raises_client_error_401_and_never_reaches_the_provider(
    stack: Stack, fake: FakeProvider
) -> None:
    before = len(fake.requests)
    with pytest.raises(errors.ClientError) as exc:
        client(stack, "sg-" + "2" * 43).models.generate_content(model=MODEL, contents="hi")
    assert exc.value.code == 401 and exc.value.status == "UNAUTHENTICATED"
    assert len(fake.requests) == before


def test_malformed_body_gets_400_in_google_format(stack: Stack, gemini_key: Issued) -> None:
    r = httpx.post(
        f"{stack.url}/v1beta/models/{MODEL}:generateContent",
        content=b"{{",
        headers={"x-goog-api-key": gemini_key.key, "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_upstream_429_is_passed_through_and_recorded(stack: Stack, gemini_key: Issued) -> None:
    with pytest.raises(errors.ClientError) as exc:
        client(stack, gemini_key.key).models.generate_content(
            model=MODEL,
            contents="hi",
            config=types.GenerateContentConfig(
                http_options=types.HttpOptions(headers={"x-fake-scenario": "error-429"})
            ),
        )
    assert exc.value.code == 429
    (row,) = usage_rows(stack, gemini_key.key_id)
    assert (row["status"], row["outcome"]) == (429, "upstream_error")


def test_upstream_500_is_passed_through_and_recorded(stack: Stack, gemini_key: Issued) -> None:
    with pytest.raises(errors.ServerError):
        client(stack, gemini_key.key).models.generate_content(
            model=MODEL,
            contents="hi",
            config=types.GenerateContentConfig(
                http_options=types.HttpOptions(headers={"x-fake-scenario": "error-500"})
            ),
        )
    (row,) = usage_rows(stack, gemini_key.key_id)
    assert (row["status"], row["outcome"]) == (500, "upstream_error")
