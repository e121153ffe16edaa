"""Policies through the real stack: model rules, routing, transforms, hot reload."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from extproc.pricing import SHIPPED_PRICES
from tests.e2e.helpers import openai_client, seen_by_provider, wait_for
from tests.fakeprovider import FakeProvider
from tests.support import Issued, Stack, issue_key, start_stack, usage_rows

POLICY = """
policies:
  - name: policy-team
    applies_to: {team: policy-team}
    models:
      deny: ["forbidden-*"]
    aliases:
      fast: fake-openai-model
    routing:
      downgrade:
        - {model: "big-model", to: "fake-openai-model", max_input_tokens: 50}
      split:
        - model: "either-model"
          to: [{model: "fake-openai-model", weight: 1}, {model: "fake-gemini-model", weight: 1}]
    transforms:
      max_tokens: 64
      system_prompt: "Answer in French."
      tags: {cost_center: cc-7}
  - name: policy-team-shadow
    applies_to: {team: policy-team}
    shadow: true
    models:
      deny: ["fake-openai-*"]
"""
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("policies")
    shutil.copy(SHIPPED_PRICES, d / "pricing.yaml")
    (d / "team.yaml").write_text(POLICY)
    return d


@pytest.fixture(scope="module")
def pstack(database: str, policy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(database, tmp_path_factory.mktemp("pstack"), policies=policy_dir)
    yield s
    s.stop()


@pytest.fixture
def key(pstack: Stack, fake: FakeProvider) -> Issued:
    return issue_key(pstack, "openai", fake.base_url, team="policy-team")


def oa(stack: Stack, issued: Issued) -> openai.OpenAI:
    return openai_client(stack, issued.key)


def test_denied_model_raises_permission_denied_and_never_reaches_the_provider(
    pstack: Stack, fake: FakeProvider, key: Issued
) -> None:
    with pytest.raises(openai.PermissionDeniedError, match="forbidden-\\*"):
        oa(pstack, key).chat.completions.create(model="forbidden-model", messages=MESSAGES)
    assert seen_by_provider(fake, key) == []
    (row,) = usage_rows(pstack, key.key_id)
    assert (row["status"], row["outcome"]) == (403, "rejected")


def test_denied_model_raises_permission_denied_in_the_anthropic_sdk(
    pstack: Stack, fake: FakeProvider
) -> None:
    issued = issue_key(pstack, "anthropic", fake.base_url, team="policy-team")
    c = anthropic.Anthropic(base_url=pstack.url, api_key=issued.key, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        c.messages.create(model="forbidden-model", max_tokens=10, messages=MESSAGES)  # type: ignore[arg-type]


def test_alias_is_routed_and_both_models_are_recorded(pstack: Stack, fake: FakeProvider, key: Issued) -> None:
    oa(pstack, key).chat.completions.create(model="fast", messages=MESSAGES)
    (req,) = seen_by_provider(fake, key)
    assert req.json()["model"] == "fake-openai-model"
    (row,) = usage_rows(pstack, key.key_id)
    assert (row["model_requested"], row["model_used"]) == ("fast", "fake-openai-model") and row[
        "cost_usd"
    ] > 0


def test_max_tokens_is_clamped_before_the_provider_sees_it(
    pstack: Stack, fake: FakeProvider, key: Issued
) -> None:
    oa(pstack, key).chat.completions.create(model="fake-openai-model", messages=MESSAGES, max_tokens=5000)
    (req,) = seen_by_provider(fake, key)
    assert req.json()["max_tokens"] == 64


def test_system_prompt_is_injected_first(pstack: Stack, fake: FakeProvider, key: Issued) -> None:
    oa(pstack, key).chat.completions.create(model="fake-openai-model", messages=MESSAGES)
    (req,) = seen_by_provider(fake, key)
    assert req.json()["messages"][0] == {"role": "system", "content": "Answer in French."}


def test_default_tags_are_recorded_and_request_tags_win(pstack: Stack, key: Issued) -> None:
    oa(pstack, key).chat.completions.create(
        model="fake-openai-model",
        messages=MESSAGES,
        extra_headers={"x-spendgate-tags": "cost_center=mine,app=x"},
    )
    (row,) = usage_rows(pstack, key.key_id)
    assert row["tags"] == {"cost_center": "mine", "app": "x"}


def test_keys_of_other_teams_are_not_bound(pstack: Stack, fake: FakeProvider) -> None:
    issued = issue_key(pstack, "openai", fake.base_url, team="someone-else")
    oa(pstack, issued).chat.completions.create(model="forbidden-model", messages=MESSAGES)


def test_policy_edit_takes_effect_without_restart_and_a_broken_edit_is_refused(
    pstack: Stack, policy_dir: Path, key: Issued
) -> None:
    client = oa(pstack, key)

    def ask() -> object:
        return client.chat.completions.create(model="fake-openai-model", messages=MESSAGES)

    ask()
    original = (policy_dir / "team.yaml").read_text()
    try:
        (policy_dir / "team.yaml").write_text(original.replace('"forbidden-*"', '"fake-openai-*"'))
        wait_for(
            ask,
            openai.PermissionDeniedError,
            raised=True,
            seconds=5,
            what="the edited policy did not take effect within 5 s",
        )
        (policy_dir / "team.yaml").write_text(
            original.replace("applies_to: {team: policy-team}", "applies_to: {}")
        )
        check = subprocess.run(
            [sys.executable, "-m", "extproc", "policy", "check", str(policy_dir)],
            capture_output=True,
            text=True,
        )
        assert check.returncode != 0 and "team.yaml:4:" in check.stderr
        time.sleep(2.5)  # two reload ticks: the broken file must have been seen and refused
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="fake-openai-model", messages=MESSAGES)
        assert "policy.reload_refused" in pstack.logs()
        metrics = pstack.metrics()
        assert "spendgate_policy_last_reload_ok 0" in metrics
        assert "spendgate_policy_reload_failures_total 0" not in metrics
    finally:
        (policy_dir / "team.yaml").write_text(original)
        # The restored policy back in force, so the tests after this one see it.
        wait_for(
            ask,
            openai.PermissionDeniedError,
            raised=False,
            seconds=10,
            what="the restored policy did not come back into force",
        )


def test_short_request_for_a_big_model_is_downgraded(pstack: Stack, fake: FakeProvider, key: Issued) -> None:
    oa(pstack, key).chat.completions.create(model="big-model", messages=MESSAGES)
    (req,) = seen_by_provider(fake, key)
    assert req.json()["model"] == "fake-openai-model"


def test_long_request_for_a_big_model_keeps_it(pstack: Stack, fake: FakeProvider, key: Issued) -> None:
    long = [{"role": "user", "content": " ".join(["word"] * 200)}]
    oa(pstack, key).chat.completions.create(model="big-model", messages=long)
    (req,) = seen_by_provider(fake, key)
    assert req.json()["model"] == "big-model"


def test_weighted_split_sends_requests_to_both_models(pstack: Stack, fake: FakeProvider, key: Issued) -> None:
    client = oa(pstack, key)
    for _ in range(30):
        client.chat.completions.create(model="either-model", messages=MESSAGES)
    assert {r.json()["model"] for r in seen_by_provider(fake, key)} == {
        "fake-openai-model",
        "fake-gemini-model",
    }


def test_shadow_policy_logs_what_it_would_refuse_and_refuses_nothing(pstack: Stack, key: Issued) -> None:
    oa(pstack, key).chat.completions.create(model="fake-openai-model", messages=MESSAGES)
    (row,) = usage_rows(pstack, key.key_id)
    assert row["status"] == 200
    assert "policy.shadow_rejection" in pstack.logs() and "policy-team-shadow" in pstack.logs()
