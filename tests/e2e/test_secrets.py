"""Key material never reaches a log line, an error body or a CLI listing."""

from __future__ import annotations

import time

import anthropic
import httpx
import pytest

from tests.e2e.helpers import openai_client
from tests.fakeprovider import FakeProvider
from tests.support import Stack, issue_key


def test_logs_and_error_bodies_contain_no_key_material(stack: Stack, fake: FakeProvider) -> None:
    keys = [issue_key(stack, p, fake.base_url) for p in ("openai", "anthropic", "gemini")]
    oa = openai_client(stack, keys[0].key)
    oa.chat.completions.create(model="fake-openai-model", messages=[{"role": "user", "content": "hi"}])
    for scenario in ("error-429", "error-500", "cut"):
        with pytest.raises(Exception):  # noqa: B017 - each scenario fails differently, on purpose
            list(
                oa.chat.completions.create(
                    model="fake-openai-model",
                    messages=[],
                    stream=True,
                    extra_headers={"x-fake-scenario": scenario},
                )
            )
    an = anthropic.Anthropic(base_url=stack.url, api_key=keys[1].key, max_retries=0)
    an.messages.create(
        model="fake-anthropic-model", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    bodies = []
    # Rejections that echo nothing back: a revoked key, a raw provider key, a malformed body.
    stack.cli("keys", "revoke", str(keys[2].key_id))
    time.sleep(0.5)
    for auth in (keys[2].key, keys[0].provider_secret, keys[0].key[:-4] + "AAAA"):
        r = httpx.post(
            stack.url + "/v1/chat/completions", headers={"authorization": f"Bearer {auth}"}, content=b"{"
        )
        bodies.append(r.text)
    r = httpx.post(f"{stack.url}/v1beta/models/m:generateContent?key={keys[2].key}", json={"contents": []})
    bodies.append(r.text)
    listings = (
        stack.cli("keys", "list", "--all", "--json").stdout + stack.cli("providers", "list", "--json").stdout
    )
    time.sleep(0.5)  # let the workers' log lines land
    assert '"request.rejected"' in stack.logs()  # the workers' log lines are really in the capture
    haystacks = {
        "metrics": stack.metrics(),
        "logs": stack.logs(),
        "error bodies": "\n".join(bodies),
        "listings": listings,
    }
    for secret in stack.secrets:
        for where, text in haystacks.items():
            assert secret not in text, f"a secret ({secret[:6]}…) appears in the {where}"
