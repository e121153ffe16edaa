"""Budget arithmetic and the exchange's part in admission; the race itself is tested end to end."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from extproc.policy.budgets import Admission, Refusal, Settlement, ceiling, crossed, holds_for, period_bounds
from extproc.policy.schema import Policy
from extproc.pricing import ModelPrice
from extproc.usage import Usage
from extproc.verdict import Granted, OverBudget
from tests.unit.test_exchange import World, headers

NOW = dt.datetime(2026, 11, 27, 15, 30, tzinfo=dt.UTC)  # a Friday


def test_day_period_is_the_utc_calendar_day() -> None:
    assert period_bounds("day", NOW) == (
        dt.datetime(2026, 11, 27, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 28, tzinfo=dt.UTC),
    )


def test_week_period_starts_on_monday() -> None:
    assert period_bounds("week", NOW)[0] == dt.datetime(2026, 11, 23, tzinfo=dt.UTC)


def test_december_month_ends_in_january() -> None:
    assert period_bounds("month", NOW.replace(month=12))[1] == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)


def policy(*budgets: dict[str, object], name: str = "p") -> Policy:
    return Policy.model_validate({"name": name, "applies_to": {"all": True}, "budgets": list(budgets)})


def test_each_scope_gets_its_own_counter_per_period() -> None:
    p = policy(
        {"period": "day", "limit_usd": "1", "per": "key"},
        {"period": "month", "limit_usd": "9", "per": "team"},
    )
    holds = holds_for([(p, b) for b in p.budgets], "k1", "payments", None, NOW)
    assert [h.budget_key for h in holds] == ["p/day/key:k1/2026-11-27", "p/month/team:payments/2026-11-01"]


def test_team_budget_does_not_cover_a_key_without_a_team() -> None:
    p = policy({"period": "day", "limit_usd": "1", "per": "team"})
    assert holds_for([(p, p.budgets[0])], "k1", None, None, NOW) == ()


def test_ceiling_is_input_at_the_dearest_input_rate_plus_the_output_ceiling() -> None:
    prices = World().current.prices
    # fake-anthropic-model: input 3.00, cache write 3.75, output 15.00 per million
    assert ceiling(prices.lookup("fake-anthropic-model"), 1000, 100) == Decimal("0.00525")


def test_ceiling_without_max_tokens_uses_the_models_maximum_output() -> None:
    prices = World().current.prices
    assert (
        ceiling(prices.lookup("fake-openai-model"), 0, None) == Decimal(4096) * Decimal("10.00") / 1_000_000
    )


def test_unpriced_model_has_no_ceiling() -> None:
    assert ceiling(World().current.prices.lookup("no-such-model"), 10, 10) is None


def tiered(tier: dict[str, str], **base: str) -> ModelPrice:
    return ModelPrice.model_validate(
        {
            "provider": "gemini",
            "max_output_tokens": 65536,
            **base,
            "tiers": [{"above_input_tokens": 200000, **tier}],
        }
    )


def test_ceiling_of_a_short_prompt_still_uses_the_dearest_tier() -> None:
    # Gemini 2.5 Pro's cards: the counted prompt is short, but the provider's own count (another
    # tokenizer, files, a cachedContent the body only names) may land in the long-prompt tier.
    price = tiered(
        {"input": "2.50", "cached_input": "0.25", "output": "15.00"},
        input="1.25",
        cached_input="0.125",
        output="10.00",
    )
    # 1,000 input at $2.50/M = $0.0025; 100 output at $15/M = $0.0015
    assert ceiling(price, 1000, 100) == Decimal("0.004")


def test_ceiling_is_safe_when_a_tier_is_cheaper_than_the_base_card() -> None:
    price = tiered(
        {"input": "1.00", "cached_input": "0.10", "output": "5.00"},
        input="3.00",
        cached_input="0.30",
        output="15.00",
    )
    # Whatever card the request lands on, the base card's rates bound it:
    # 500,000 input at $3/M = $1.50; 1,000 output at $15/M = $0.015
    assert ceiling(price, 500_000, 1000) == Decimal("1.515")
    # and a long prompt is in fact billed on the cheaper tier, well inside that:
    # 500,000 input at $1/M = $0.50; 1,000 output at $5/M = $0.005
    assert price.cost(Usage(input_tokens=500_000, output_tokens=1000)) == Decimal("0.505")


def test_ceiling_prices_input_at_the_one_hour_cache_write_rate() -> None:
    price = ModelPrice.model_validate(
        {
            "provider": "anthropic",
            "input": "3.00",
            "cached_input": "0.30",
            "output": "15.00",
            "cache_write": "3.75",
            "cache_write_1h": "6.00",
            "max_output_tokens": 64000,
        }
    )
    # Every input token could be a 1-hour write: 1,000 at $6/M = $0.006; 100 output at $15/M = $0.0015
    assert ceiling(price, 1000, 100) == Decimal("0.0075")


def test_thresholds_crossed_by_a_settlement_are_reported_once() -> None:
    assert crossed((0.5, 0.8), Decimal(100), Decimal(70), Decimal(85)) == [0.8]
    assert crossed((0.5, 0.8), Decimal(100), Decimal(85), Decimal(90)) == []


def budgeted_world() -> World:
    return World().with_policies(
        {"name": "cap", "applies_to": {"all": True}, "budgets": [{"period": "day", "limit_usd": "1"}]}
    )


def test_budgeted_request_asks_for_admission_before_forwarding() -> None:
    w = budgeted_world()
    ex = w.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
    adm = ex.on_request_body(
        b'{"model":"fake-openai-model","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}'
    )
    assert isinstance(adm, Admission) and len(adm.holds) == 1 and adm.amount > 0


def test_refused_admission_is_a_429_naming_the_budget_with_retry_after() -> None:
    w = budgeted_world()
    ex = w.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
    adm = ex.on_request_body(b'{"model":"fake-openai-model","max_tokens":10,"messages":[]}')
    assert isinstance(adm, Admission)
    reply = ex.apply(OverBudget(Refusal(adm.holds[0], Decimal("0.99"), Decimal(0))))
    assert reply.immediate_status == 429 and b"policy 'cap'" in (reply.body or b"")
    assert any(k == "retry-after" and int(v) > 0 for k, v in reply.set_headers)


def test_finished_request_settles_its_reservation_at_the_real_cost() -> None:
    w = budgeted_world()
    settled: list[Settlement] = []
    ex = w.exchange(settle=settled.append)
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
    # max_tokens covers the reported output: more would be flagged implausible and clamped to it.
    adm = ex.on_request_body(b'{"model":"fake-openai-model","max_tokens":100,"messages":[]}')
    assert isinstance(adm, Admission)
    ex.apply(Granted(budget_held=True))
    ex.on_response_headers({":status": "200", "content-type": "application/json"}, False)
    ex.on_response_body(b'{"usage":{"prompt_tokens":1000,"completion_tokens":100}}', True)
    (s,) = settled
    # 1,000 input at $2.50/M = $0.0025; 100 output at $10/M = $0.001
    assert s.admission is adm and s.cost == Decimal("0.0035")


def test_failed_request_releases_its_reservation() -> None:
    w = budgeted_world()
    settled: list[Settlement] = []
    ex = w.exchange(settle=settled.append)
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
    ex.on_request_body(b'{"model":"fake-openai-model","max_tokens":10,"messages":[]}')
    ex.apply(Granted(budget_held=True))
    ex.on_response_headers({":status": "500", "content-type": "application/json"}, False)
    assert settled[0].cost == 0


async def test_unreachable_postgres_refuses_a_budgeted_request_with_503() -> None:
    from extproc.admission import Gatekeeper
    from extproc.budget_store import BudgetStore
    from extproc.ratelimit import LocalLimiter

    store = BudgetStore("postgresql://nobody@127.0.0.1:1/none")
    await store.open()
    try:
        w = budgeted_world()
        ex = w.exchange()
        ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
        adm = ex.on_request_body(b'{"model":"fake-openai-model","max_tokens":10,"messages":[]}')
        assert isinstance(adm, Admission)
        reply = ex.apply(await Gatekeeper(store, LocalLimiter()).admit(adm))
        assert reply.immediate_status == 503 and w.records[0].status == 503
    finally:
        await store._pool.close()
