"""Failover through Envoy: the primary upstream dies mid-test and every request is still served."""

from __future__ import annotations

import json
import secrets
import uuid

from tests.e2e.helpers import auth_of, openai_client
from tests.fakeprovider import FakeProvider
from tests.support import Stack, add_credential, usage_rows, wait_until_key_live


def test_primary_killed_mid_test_every_request_is_served_by_the_fallback(
    stack: Stack, fake: FakeProvider
) -> None:
    primary = FakeProvider().start()
    tag = secrets.token_hex(3)
    fallback_secret = add_credential(stack, "openai", f"fallback-{tag}", fake.base_url)
    primary_secret = add_credential(
        stack, "openai", f"primary-{tag}", primary.base_url, "--fallback", f"fallback-{tag}"
    )
    out = json.loads(
        stack.cli("keys", "create", "--name", f"fo-{tag}", "--provider", f"primary-{tag}", "--json").stdout
    )
    stack.secrets.append(out["key"])
    wait_until_key_live(stack, out["key"])
    client = openai_client(stack, out["key"])
    try:
        served = []
        for i in range(30):
            if i == 10:
                primary.stop()  # the primary goes away in the middle of the traffic
            resp = client.chat.completions.create(
                model="fake-openai-model", messages=[{"role": "user", "content": "hi"}]
            )
            served.append(bool(resp.choices))
        assert all(served) and len(served) == 30
    finally:
        primary.stop()
    assert {auth_of(r) for r in primary.requests} == {primary_secret}
    to_fallback = [r for r in fake.requests if auth_of(r) == fallback_secret]
    assert to_fallback and all(out["key"] not in repr(r.headers) for r in to_fallback)
    assert all("x-spendgate-failover" not in r.headers for r in [*primary.requests, *to_fallback])
    rows = [r for r in usage_rows(stack, uuid.UUID(out["id"]), expect=30) if r["status"] == 200]
    upstreams = [r["upstream"] for r in rows]
    assert len(rows) == 30 and len(set(upstreams)) == 2  # both answered, and the record says which
    assert upstreams[-1] != upstreams[0]
