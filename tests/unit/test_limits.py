"""Rate limits: windows, charges, the in-process limiter, and the 429 an exchange answers."""

from __future__ import annotations

import datetime as dt

from extproc.policy.limits import Throttle, charges_for, window
from extproc.policy.schema import Policy
from extproc.ratelimit import LocalLimiter
from extproc.verdict import Throttled
from tests.unit.test_exchange import World, headers


def limited(**rl: object) -> Policy:
    return Policy.model_validate({"name": "rl", "applies_to": {"all": True}, "rate_limits": [rl]})


def test_window_is_the_minute_and_counts_down_to_its_end() -> None:
    w, reset = window(dt.datetime(2026, 11, 27, 10, 0, 45, tzinfo=dt.UTC))
    assert reset == 15 and window(dt.datetime(2026, 11, 27, 10, 1, 0, tzinfo=dt.UTC))[0] == w + 1


def test_request_and_token_limits_become_two_charges() -> None:
    p = limited(requests_per_minute=5, tokens_per_minute=100)
    charges = charges_for([(p, p.rate_limits[0])], "k", None, 42)
    assert [(c.kind, c.amount, c.limit) for c in charges] == [("requests", 1, 5), ("tokens", 42, 100)]


def test_team_limit_skips_a_key_without_a_team() -> None:
    p = limited(per="team", requests_per_minute=5)
    assert charges_for([(p, p.rate_limits[0])], "k", None, 1) == ()


async def test_local_limiter_refuses_past_the_limit_and_charges_nothing_then() -> None:
    p = limited(requests_per_minute=2, tokens_per_minute=10)
    lim = LocalLimiter()
    charges = charges_for([(p, p.rate_limits[0])], "k", None, 4)
    assert (await lim.take(charges, 1, 30)).throttle is None
    assert (await lim.take(charges, 1, 30)).throttle is None
    throttle = (await lim.take(charges, 1, 30)).throttle
    assert throttle is not None and throttle.charge.kind == "requests" and throttle.used == 2
    assert (await lim.take(charges, 2, 60)).throttle is None  # a new minute


async def test_token_correction_frees_what_a_request_did_not_use() -> None:
    p = limited(tokens_per_minute=10)
    lim = LocalLimiter()
    charges = charges_for([(p, p.rate_limits[0])], "k", None, 8)
    assert (await lim.take(charges, 1, 30)).throttle is None
    assert (await lim.take(charges, 1, 30)).throttle is not None
    lim.correct(charges[0].counter, 1, -6)  # it used 2 of the 8 it was charged
    assert (await lim.take(charges, 1, 30)).throttle is None


def test_throttle_answer_has_retry_after_and_openai_ratelimit_headers() -> None:
    w = World().with_policies(
        {"name": "rl", "applies_to": {"all": True}, "rate_limits": [{"requests_per_minute": 1}]}
    )
    ex = w.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
    adm = ex.on_request_body(b'{"model":"fake-openai-model","messages":[]}')
    charge = adm.charges[0]  # type: ignore[union-attr]
    reply = ex.apply(Throttled(Throttle(charge, 1, 17)))
    h = dict(reply.set_headers)
    assert reply.immediate_status == 429 and h["retry-after"] == "17"
    assert h["x-ratelimit-limit-requests"] == "1" and h["x-ratelimit-remaining-requests"] == "0"


async def test_shadow_limit_charges_and_reports_instead_of_refusing() -> None:
    p = Policy.model_validate(
        {
            "name": "sh",
            "applies_to": {"all": True},
            "shadow": True,
            "rate_limits": [{"requests_per_minute": 1}],
        }
    )
    lim = LocalLimiter()
    charges = charges_for([(p, p.rate_limits[0])], "k", None, 1)
    await lim.take(charges, 1, 30)
    verdict = await lim.take(charges, 1, 30)
    assert verdict.throttle is None and len(verdict.shadow) == 1
