"""Failure paths on the shared stack: hang-ups, cut streams, revocation, compressed upstreams."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.e2e.helpers import openai_client, seen_by_provider, wait_for
from tests.fakeprovider import CUT_AFTER_DELTAS, FakeProvider
from tests.support import Issued, Stack, usage_rows

MESSAGES = [{"role": "user", "content": "tell me a long story about a lighthouse"}]


def test_client_hanging_up_mid_stream_still_yields_an_estimated_record(
    stack: Stack, openai_key: Issued
) -> None:
    stream = openai_client(stack, openai_key.key).chat.completions.create(
        model="fake-openai-model",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-scenario": "slow", "x-fake-delay": "0.5"},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # one word of the answer arrived: hang up now
    stream.close()
    (row,) = usage_rows(stack, openai_key.key_id)
    assert row["estimated"] is True and row["outcome"] == "incomplete"
    assert row["input_tokens"] > 0 and row["output_tokens"] >= 1 and row["cost_usd"] > 0


def test_upstream_stream_cut_short_raises_in_the_app_and_yields_an_estimated_record(
    stack: Stack, openai_key: Issued
) -> None:
    with pytest.raises((openai.APIError, Exception)):
        for _ in openai_client(stack, openai_key.key).chat.completions.create(
            model="fake-openai-model",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-scenario": "cut"},
        ):
            pass
    (row,) = usage_rows(stack, openai_key.key_id)
    assert row["estimated"] is True and row["outcome"] == "incomplete"
    assert row["output_tokens"] >= CUT_AFTER_DELTAS


def test_anthropic_stream_cut_short_keeps_the_reported_input_and_counts_the_output(
    stack: Stack, anthropic_key: Issued
) -> None:
    c = anthropic.Anthropic(base_url=stack.url, api_key=anthropic_key.key, max_retries=0)
    # The SDK lets the transport's own error through (httpx2.RemoteProtocolError), not an APIError.
    with (
        pytest.raises(Exception),  # noqa: B017
        c.messages.stream(
            model="fake-anthropic-model",
            max_tokens=100,
            messages=MESSAGES,
            extra_headers={"x-fake-scenario": "cut"},
        ) as s,
    ):
        s.until_done()
    (row,) = usage_rows(stack, anthropic_key.key_id)
    assert row["estimated"] is True
    assert row["input_tokens"] == 41 + 7 + 13 and row["output_tokens"] >= 1


def test_gzip_capable_upstream_is_still_accounted(
    stack: Stack, fake: FakeProvider, openai_key: Issued
) -> None:
    resp = openai_client(stack, openai_key.key).chat.completions.create(
        model="fake-openai-model", messages=MESSAGES, extra_headers={"x-fake-scenario": "gzip"}
    )
    assert resp.choices[0].message.content
    (row,) = usage_rows(stack, openai_key.key_id)
    assert row["estimated"] is False and row["output_tokens"] > 0


def test_revoked_key_stops_working_within_seconds(
    stack: Stack, fake: FakeProvider, openai_key: Issued
) -> None:
    c = openai_client(stack, openai_key.key)
    c.chat.completions.create(model="fake-openai-model", messages=MESSAGES)
    stack.cli("keys", "revoke", str(openai_key.key_id))
    wait_for(
        lambda: c.chat.completions.create(model="fake-openai-model", messages=MESSAGES),
        openai.AuthenticationError,
        raised=True,
        seconds=5,
        what="revoked key still accepted after 5 s",
    )
    seen = len(seen_by_provider(fake, openai_key))
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="fake-openai-model", messages=MESSAGES)
    assert len(seen_by_provider(fake, openai_key)) == seen


def test_rotated_key_replaces_the_old_one(stack: Stack, openai_key: Issued) -> None:
    import json

    new = json.loads(stack.cli("keys", "rotate", str(openai_key.key_id), "--json").stdout)
    stack.secrets.append(new["key"])
    wait_for(
        lambda: openai_client(stack, new["key"]).chat.completions.create(
            model="fake-openai-model", messages=MESSAGES
        ),
        openai.AuthenticationError,
        raised=False,
        seconds=5,
        what="rotated key not accepted after 5 s",
    )
    with pytest.raises(openai.AuthenticationError):
        openai_client(stack, openai_key.key).chat.completions.create(
            model="fake-openai-model", messages=MESSAGES
        )


def test_body_over_the_size_cap_gets_413_in_provider_format(stack: Stack, openai_key: Issued) -> None:
    import httpx

    big = (
        b'{"model":"fake-openai-model","messages":[{"role":"user","content":"'
        + b"x" * (9 * 1024 * 1024)
        + b'"}]}'
    )
    r = httpx.post(
        stack.url + "/v1/chat/completions",
        content=big,
        headers={"authorization": f"Bearer {openai_key.key}", "content-type": "application/json"},
    )
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
