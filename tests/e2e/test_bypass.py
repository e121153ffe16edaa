"""Probes that tried to get a refused model served, or a request forwarded unaccounted.

Each case is sent raw (an SDK would tidy the path) through the real Envoy and filter to the
fake provider. Whatever the path spelling, the forbidden model never reaches the provider, and
every request that did reach it was accounted as the API it named.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extproc.pricing import SHIPPED_PRICES
from tests.e2e.helpers import seen_by_provider
from tests.fakeprovider import FakeProvider
from tests.support import Issued, Stack, issue_key, start_stack, usage_rows

POLICY = """
policies:
  - name: allow-fake-only
    applies_to: {team: bypass-team}
    models:
      allow: ["fake-*"]
"""

CHAT_VARIANTS = [
    "/v1/chat/completions/",
    "//v1/chat/completions",
    "/v1//chat/completions",
    "/v1/./chat/completions",
    "/v1/x/../chat/completions",
    "/v1/chat/completions/.",
    "/%76%31/chat/completions",
    "/v1/chat%2Fcompletions",
    "/v1/chat%2fcompletions",
    "/v1/chat/completions;x=1",
    "/V1/Chat/Completions",
    "/v1/chat/completions%20",
    "/v1/CHAT/completions/",
]
MODEL_SPELLINGS = ["forbidden-model", "FAKE-OPENAI-MODEL/../forbidden-model", "Forbidden-Model", " forbidden-model "]


@pytest.fixture(scope="module")
def bstack(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d: Path = tmp_path_factory.mktemp("bypass-policies")
    shutil.copy(SHIPPED_PRICES, d / "pricing.yaml")
    (d / "bypass.yaml").write_text(POLICY)
    s = start_stack(database, tmp_path_factory.mktemp("bstack"), policies=d)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def okey(bstack: Stack, fake: FakeProvider) -> Issued:
    return issue_key(bstack, "openai", fake.base_url, team="bypass-team")


@pytest.fixture(scope="module")
def gkey(bstack: Stack, fake: FakeProvider) -> Issued:
    return issue_key(bstack, "gemini", fake.base_url, team="bypass-team")


def post(stack: Stack, path: str, key: str, body: bytes, **headers: str) -> httpx.Response:
    with httpx.Client(timeout=10) as client:
        return client.post(stack.url + path, content=body, headers={"authorization": f"Bearer {key}", **headers})


def forbidden_seen(fake: FakeProvider, issued: Issued) -> list[str]:
    models = []
    for r in seen_by_provider(fake, issued):
        model = r.json().get("model") if r.body else None
        if "forbidden" in (model or "").lower() or "forbidden" in r.path.lower():
            models.append(f"{r.path} {model}")
    return models


@pytest.mark.parametrize("path", CHAT_VARIANTS)
@pytest.mark.parametrize("model", MODEL_SPELLINGS)
def test_no_path_or_model_spelling_gets_a_refused_model_served(
    bstack: Stack, fake: FakeProvider, okey: Issued, path: str, model: str
) -> None:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    resp = post(bstack, path, okey.key, body, content_type="application/json")
    assert resp.status_code in (400, 403, 404), resp.text
    assert forbidden_seen(fake, okey) == []


def test_a_path_variant_of_an_allowed_call_is_accounted_as_the_api_it_names(
    bstack: Stack, fake: FakeProvider
) -> None:
    own = issue_key(bstack, "openai", fake.base_url, team="bypass-team")
    body = json.dumps({"model": "fake-openai-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
    resp = post(bstack, "//v1/chat/completions/", own.key, body, content_type="application/json")
    assert resp.status_code == 200, resp.text
    (row,) = usage_rows(bstack, own.key_id, expect=1)
    assert row["api"] == "chat.completions" and row["input_tokens"] > 0 and row["status"] == 200


def test_gemini_dot_dot_in_the_model_path_cannot_reach_a_refused_model(
    bstack: Stack, fake: FakeProvider, gkey: Issued
) -> None:
    body = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()
    for path in (
        "/v1beta/models/fake-gemini-model/../forbidden-model:generateContent",
        "/v1beta/models/fake-gemini-model/%2E%2E/forbidden-model:generateContent",
        "/v1beta/models/forbidden-model%3AgenerateContent",
    ):
        resp = post(bstack, path, gkey.key, body, content_type="application/json", x_goog_api_key=gkey.key)
        assert resp.status_code in (400, 403, 404), (path, resp.text)
    assert forbidden_seen(fake, gkey) == []


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b'{"model":"fake-openai-model","model":"forbidden-model","messages":[]}',
        b'{"model":"forbidden-model","messages":[],"model":"fake-openai-model"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model":"fake-openai-model","messages":[],"max_tokens":-5}',
        b'{"model":"fake-openai-model","messages":[],"n":0}',
        b'{"model":"fake-openai-model","messages":[],"max_tokens":NaN}',
    ],
    ids=["empty", "duplicate-key-first", "duplicate-key-last", "deep", "negative-max-tokens", "zero-n", "nan"],
)
def test_a_body_the_filter_cannot_read_safely_is_refused_with_a_provider_400(
    bstack: Stack, fake: FakeProvider, okey: Issued, body: bytes
) -> None:
    before = len(seen_by_provider(fake, okey))
    resp = post(bstack, "/v1/chat/completions", okey.key, body, content_type="application/json")
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert len(seen_by_provider(fake, okey)) == before


def test_an_unmetered_post_is_refused_without_a_passthrough_entry(
    bstack: Stack, fake: FakeProvider, okey: Issued
) -> None:
    resp = post(bstack, "/v1/images/generations", okey.key, b'{"prompt":"x"}', content_type="application/json")
    assert resp.status_code == 403
    assert not [r for r in seen_by_provider(fake, okey) if "images" in r.path]
