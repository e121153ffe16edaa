"""The Redis limiter's script against a real Redis: all or nothing, and shadow limits."""

from __future__ import annotations

import socket
import uuid

import pytest

from extproc.policy.limits import charges_for
from extproc.policy.schema import Policy
from extproc.ratelimit import RedisLimiter


def _redis_up() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 6379)) == 0


pytestmark = pytest.mark.skipif(not _redis_up(), reason="no Redis at 127.0.0.1:6379 (.ci/run starts one)")


def policy(shadow: bool, **limit: int) -> Policy:
    return Policy.model_validate(
        {
            "name": f"p{uuid.uuid4().hex[:8]}",
            "applies_to": {"all": True},
            "shadow": shadow,
            "rate_limits": [limit],
        }
    )


async def test_a_full_limit_refuses_and_charges_no_other_counter() -> None:
    lim = RedisLimiter("redis://127.0.0.1:6379/0")
    p = policy(False, requests_per_minute=1, tokens_per_minute=1000)
    charges = charges_for([(p, p.rate_limits[0])], "k", None, 10)
    try:
        assert (await lim.take(charges, 7, 30)).throttle is None
        refused = (await lim.take(charges, 7, 30)).throttle
        assert refused is not None and refused.charge.kind == "requests"
        # The refused request did not take its 10 tokens: 990 are still there.
        tokens_only = tuple(c for c in charges if c.kind == "tokens")
        big = (tokens_only[0].__class__(**{**tokens_only[0].__dict__, "amount": 990}),)
        assert (await lim.take(big, 7, 30)).throttle is None
    finally:
        await lim.close()


async def test_shadow_limit_is_reported_not_enforced() -> None:
    lim = RedisLimiter("redis://127.0.0.1:6379/0")
    p = policy(True, requests_per_minute=1)
    charges = charges_for([(p, p.rate_limits[0])], "k", None, 1)
    try:
        await lim.take(charges, 7, 30)
        verdict = await lim.take(charges, 7, 30)
        assert verdict.throttle is None and [t.used for t in verdict.shadow] == [1]
    finally:
        await lim.close()
