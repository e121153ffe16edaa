"""Shared expectations of the end-to-end tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import openai

from tests.fakeprovider import FakeProvider, RecordedRequest
from tests.support import Issued, Stack

# The fake models' list prices in extproc/pricing.yaml (USD per million tokens), restated here
# so that a wrong cost computation cannot pass by agreeing with itself.
PRICES = {
    "fake-openai-model": {"input": "2.50", "cached": "1.25", "output": "10.00", "write": "2.50"},
    "fake-anthropic-model": {"input": "3.00", "cached": "0.30", "output": "15.00", "write": "3.75"},
    "fake-gemini-model": {"input": "1.25", "cached": "0.3125", "output": "10.00", "write": "1.25"},
}


def openai_client(stack: Stack, key: str) -> openai.OpenAI:
    """The OpenAI SDK pointed at the proxy, with retries off so that every answer is seen."""
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0)


def wait_for(
    call: Callable[[], object], error: type[Exception], *, raised: bool, seconds: float, what: str
) -> None:
    """Repeat an SDK `call` until it raises `error` (raised=True) or stops raising it: for changes
    the proxy takes up asynchronously (policy reloads, revocations, rotations)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            call()
            if not raised:
                return
        except error:
            if raised:
                return
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def expected_cost(model: str, inp: int, cached: int, write: int, out: int) -> Decimal:
    """Each part of the usage at its own price."""
    p = {k: Decimal(v) for k, v in PRICES[model].items()}
    return (
        (inp - cached - write) * p["input"] + cached * p["cached"] + write * p["write"] + out * p["output"]
    ) / Decimal(1_000_000)


def auth_of(req: RecordedRequest) -> str:
    """Whatever credential a provider request carried."""
    h = req.headers
    return (
        h.get("authorization", "").removeprefix("Bearer ")
        or h.get("x-api-key")
        or h.get("x-goog-api-key")
        or req.query.get("key", "")
    )


def seen_by_provider(fake: FakeProvider, issued: Issued) -> list[RecordedRequest]:
    """The requests the fake received with this credential, the key probe excluded."""
    return [r for r in fake.requests if auth_of(r) == issued.provider_secret and r.path != "/v1/models"]


def assert_provider_saw_only_the_real_key(req: RecordedRequest, issued: Issued) -> None:
    """The real key arrived; the wrapped key is nowhere in what the provider saw."""
    assert auth_of(req) == issued.provider_secret
    blob = repr(req.headers) + repr(req.query) + req.path + req.body.decode(errors="replace")
    assert issued.key not in blob
    assert "x-spendgate-upstream" not in req.headers


def assert_record(
    row: dict[str, Any],
    model: str,
    *,
    inp: int,
    cached: int = 0,
    write: int = 0,
    out: int,
    reasoning: int = 0,
    stream: bool,
) -> None:
    """The one usage record matches the provider's figures to the token, and costs them exactly."""
    assert (
        row["input_tokens"],
        row["cached_input_tokens"],
        row["cache_write_tokens"],
        row["output_tokens"],
        row["reasoning_tokens"],
    ) == (inp, cached, write, out, reasoning)
    assert row["cost_usd"] == expected_cost(model, inp, cached, write, out)
    assert row["price_version"]
    assert row["estimated"] is False and row["status"] == 200 and row["outcome"] == "complete"
    assert row["stream"] is stream and row["model_requested"] == model


def ask(client: openai.OpenAI, prompt: str, max_tokens: int) -> int:
    """One chat completion; 200 if it was served, 429 if a budget or limit refused it."""
    try:
        client.chat.completions.create(
            model="fake-openai-model", max_tokens=max_tokens, messages=[{"role": "user", "content": prompt}]
        )
    except openai.RateLimitError:
        return 429
    return 200
