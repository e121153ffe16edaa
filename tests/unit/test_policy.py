"""Policies: schema and file errors with lines, binding, model rules, aliases and transforms."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from extproc.policy.budgets import Admission
from extproc.policy.evaluate import Binding, Subject, decide
from extproc.policy.loader import PolicyError, PolicySet, load_policy_dir
from extproc.policy.schema import Policy
from extproc.policy.store import PolicyStore
from extproc.pricing import SHIPPED_PRICES
from extproc.providers import PROVIDERS
from extproc.providers.base import Change
from tests.unit.test_exchange import World, headers

REPO = Path(__file__).resolve().parents[2]
WHO = Subject("key-1", "billing-svc", "sg-abcd1234", "payments", "checkout", None)


def policy(**kw: object) -> Policy:
    return Policy.model_validate({"name": "p", "applies_to": {"all": True}, **kw})


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    shutil.copy(SHIPPED_PRICES, tmp_path / "pricing.yaml")
    return tmp_path


# -- files --------------------------------------------------------------------------------------
def test_a_valid_directory_loads(pdir: Path) -> None:
    (pdir / "team.yaml").write_text("policies:\n  - name: t\n    applies_to: {team: payments}\n")
    assert [p.name for p in load_policy_dir(pdir).policies] == ["t"]


def test_an_error_names_file_line_and_field(pdir: Path) -> None:
    (pdir / "bad.yaml").write_text(
        "policies:\n  - name: t\n    applies_to: {all: true}\n    budgets:\n      - period: fortnight\n        limit_usd: 5\n"
    )
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(pdir)
    (problem,) = exc.value.problems
    assert problem.startswith(f"{pdir / 'bad.yaml'}:5: policies.0.budgets.0.period")


def test_broken_yaml_names_its_line(pdir: Path) -> None:
    (pdir / "bad.yaml").write_text("policies:\n  - name: [unclosed\n")
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(pdir)
    assert "bad.yaml:" in exc.value.problems[0] and "not valid YAML" in exc.value.problems[0]


def test_unknown_fields_are_refused(pdir: Path) -> None:
    (pdir / "bad.yaml").write_text("policies:\n  - name: t\n    applies_to: {all: true}\n    budgtes: []\n")
    with pytest.raises(PolicyError, match="budgtes"):
        load_policy_dir(pdir)


def test_duplicate_policy_names_are_refused(pdir: Path) -> None:
    for f in ("a.yaml", "b.yaml"):
        (pdir / f).write_text("policies:\n  - name: same\n    applies_to: {all: true}\n")
    with pytest.raises(PolicyError, match="already used"):
        load_policy_dir(pdir)


def test_applies_to_needs_exactly_one_target() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Policy.model_validate({"name": "p", "applies_to": {"team": "a", "project": "b"}})


def test_store_keeps_the_last_good_set_when_an_edit_is_broken(pdir: Path) -> None:
    (pdir / "p.yaml").write_text("policies:\n  - name: one\n    applies_to: {all: true}\n")
    store = PolicyStore(pdir)
    (pdir / "p.yaml").write_text("policies:\n  - name: one\n    applies_to: {}\n")
    assert store.reload_if_changed() is False
    assert [p.name for p in store.current.policies] == ["one"] and store.reload_failures == 1


def test_store_puts_a_good_edit_in_force(pdir: Path) -> None:
    store = PolicyStore(pdir)
    (pdir / "p.yaml").write_text("policies:\n  - name: two\n    applies_to: {all: true}\n")
    assert store.reload_if_changed() is True and [p.name for p in store.current.policies] == ["two"]


def test_shipped_policy_directory_is_valid() -> None:
    load_policy_dir(REPO / "policies")


# -- decisions ----------------------------------------------------------------------------------
def test_policy_for_another_team_does_not_bind() -> None:
    p = Policy.model_validate({"name": "p", "applies_to": {"team": "other"}, "models": {"deny": ["*"]}})
    assert decide(Binding((p,), WHO), "gpt-4o").reject is None


def test_policy_named_on_the_key_binds_it() -> None:
    p = Policy.model_validate({"name": "strict", "applies_to": {"team": "other"}, "models": {"deny": ["*"]}})
    who = Subject("key-2", "k", "sg-x", None, None, "strict")
    assert decide(Binding((p,), who), "gpt-4o").reject is not None


def test_a_policy_set_binds_each_caller_once() -> None:
    s = PolicySet(World().current.prices, (policy(transforms={"max_tokens": 10}),))
    assert s.binding(WHO) is s.binding(WHO)
    reloaded = PolicySet(s.prices, (policy(transforms={"max_tokens": 5}),))
    assert reloaded.binding(WHO).max_tokens == 5  # a reload binds afresh


def test_a_binding_remembers_model_verdicts_for_a_bounded_number_of_models() -> None:
    b = Binding((policy(models={"deny": ["m1*"]}),), WHO)
    verdicts = [b.verdict(f"m{i}") for i in range(1000)]  # model names are the caller's to choose
    assert len(b._verdicts) <= 64
    assert sum(1 for reject, _ in verdicts if reject is not None) == 111  # m1, m10-m19, m100-m199


def test_budget_counters_of_a_binding_follow_the_utc_date() -> None:
    b = Binding((policy(budgets=[{"period": "day", "limit_usd": "1", "per": "key"}]),), WHO)
    today = dt.datetime(2026, 11, 27, 23, 59, tzinfo=dt.UTC)
    assert [h.budget_key for h in b.holds(today)] == ["p/day/key:key-1/2026-11-27"]
    tomorrow = today + dt.timedelta(minutes=1)
    assert [h.budget_key for h in b.holds(tomorrow)] == ["p/day/key:key-1/2026-11-28"]


def test_denied_model_is_rejected_with_the_rule_named() -> None:
    d = decide(Binding((policy(models={"deny": ["gpt-4o*"]}),), WHO), "gpt-4o-mini")
    assert d.reject is not None and "gpt-4o*" in d.reject


def test_model_outside_the_allow_list_is_rejected() -> None:
    assert decide(Binding((policy(models={"allow": ["claude-*"]}),), WHO), "gpt-4o").reject is not None


def test_shadow_policy_records_but_does_not_reject() -> None:
    d = decide(Binding((policy(shadow=True, models={"deny": ["*"]}),), WHO), "gpt-4o")
    assert d.reject is None and len(d.shadow) == 1


def test_alias_routes_to_the_real_model_before_rules_apply() -> None:
    d = decide(
        Binding((policy(aliases={"fast": "gpt-4o-mini"}, models={"allow": ["gpt-4o-mini"]}),), WHO), "fast"
    )
    assert (d.model, d.reject) == ("gpt-4o-mini", None)


def test_max_tokens_clamps_combine_to_the_tightest() -> None:
    wide = policy(transforms={"max_tokens": 500})
    narrow = Policy.model_validate(
        {"name": "k", "applies_to": {"key": "billing-svc"}, "transforms": {"max_tokens": 900}}
    )
    assert decide(Binding((wide, narrow), WHO), "m").max_tokens == 500


def test_narrowest_system_prompt_wins() -> None:
    wide = policy(transforms={"system_prompt": "wide"})
    narrow = Policy.model_validate(
        {"name": "t", "applies_to": {"team": "payments"}, "transforms": {"system_prompt": "team"}}
    )
    assert decide(Binding((narrow, wide), WHO), "m").system_prompt == "team"


# -- transforms per provider --------------------------------------------------------------------
def test_openai_chat_gets_a_system_message_first_and_a_clamp() -> None:
    doc: dict[str, object] = {
        "model": "m",
        "max_tokens": 9000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    changed, _ = PROVIDERS["openai"].transform(
        "chat.completions", doc, "", Change(max_tokens=100, system_prompt="Be brief.")
    )
    assert changed and doc["max_tokens"] == 100
    assert doc["messages"][0] == {"role": "system", "content": "Be brief."}  # type: ignore[index]


def test_openai_request_without_a_ceiling_gets_max_completion_tokens() -> None:
    doc: dict[str, object] = {"model": "m", "messages": []}
    PROVIDERS["openai"].transform("chat.completions", doc, "", Change(max_tokens=100))
    assert doc["max_completion_tokens"] == 100


def test_anthropic_system_prompt_goes_before_the_callers_own() -> None:
    doc: dict[str, object] = {"model": "m", "max_tokens": 50, "system": "Caller's.", "messages": []}
    PROVIDERS["anthropic"].transform("messages", doc, "", Change(max_tokens=100, system_prompt="Ours."))
    assert doc["system"] == [{"type": "text", "text": "Ours."}, {"type": "text", "text": "Caller's."}]
    assert doc["max_tokens"] == 50  # already under the clamp


def test_gemini_model_route_rewrites_the_path_and_clamps_the_config() -> None:
    doc: dict[str, object] = {"contents": [], "generationConfig": {"maxOutputTokens": 4000}}
    changed, path = PROVIDERS["gemini"].transform(
        "generateContent", doc, "/v1beta/models/big:generateContent", Change(model="small", max_tokens=10)
    )
    assert changed and path == "/v1beta/models/small:generateContent"
    assert doc["generationConfig"] == {"maxOutputTokens": 10}


# -- in the exchange ----------------------------------------------------------------------------
def test_exchange_rejects_a_denied_model_with_403_in_provider_format() -> None:
    w = World().with_policies({"name": "p", "applies_to": {"all": True}, "models": {"deny": ["gpt-4o*"]}})
    ex = w.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
    reply = ex.on_request_body(b'{"model":"gpt-4o","messages":[]}')
    assert reply.immediate_status == 403 and "gpt-4o*" in json.loads(reply.body or b"")["error"]["message"]
    assert w.records[0].status == 403


def test_exchange_sends_the_transformed_body_with_its_length() -> None:
    w = World().with_policies({"name": "p", "applies_to": {"all": True}, "transforms": {"max_tokens": 7}})
    ex = w.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
    reply = ex.on_request_body(b'{"model":"fake-openai-model","max_tokens":999,"messages":[]}')
    assert reply.body is not None and json.loads(reply.body)["max_tokens"] == 7
    assert ("content-length", str(len(reply.body))) in reply.set_headers


def test_record_keeps_the_requested_and_the_routed_model() -> None:
    w = World().with_policies(
        {"name": "p", "applies_to": {"all": True}, "aliases": {"fast": "fake-openai-model"}}
    )
    ex = w.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
    ex.on_request_body(b'{"model":"fast","messages":[]}')
    ex.on_response_headers({":status": "200", "content-type": "application/json"}, False)
    ex.on_response_body(b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}', True)
    rec = w.records[0]
    assert (rec.model_requested, rec.model_used) == ("fast", "fake-openai-model") and rec.cost_usd


BUDGETED = {"name": "capped", "applies_to": {"all": True}, "budgets": [{"period": "day", "limit_usd": "5"}]}


def unmetered_call(w: World, method: str, path: str, **extra: str) -> int | None:
    h = {**headers(path, x_api_key=w.key, **extra), ":method": method}
    return w.exchange().on_request_headers(h, method == "GET").immediate_status


def test_a_budgeted_key_may_not_post_to_an_api_spendgate_cannot_price() -> None:
    w = World().with_policies(BUDGETED)
    reply = w.exchange().on_request_headers(headers("/v1/images/generations", x_api_key=w.key), False)
    assert reply.immediate_status == 403
    message = json.loads(reply.body or b"")["error"]["message"]
    assert "not metered" in message and "'capped'" in message


def test_a_budgeted_key_may_still_read_and_count_tokens() -> None:
    assert unmetered_call(World().with_policies(BUDGETED), "GET", "/v1/models") is None
    assert (
        unmetered_call(World("anthropic").with_policies(BUDGETED), "POST", "/v1/messages/count_tokens")
        is None
    )
    gemini = World("gemini").with_policies(BUDGETED)
    assert unmetered_call(gemini, "POST", "/v1beta/models/gemini-2.5-flash:countTokens") is None


OPEN_IMAGES = {"name": "images", "applies_to": {"all": True}, "passthrough": ["POST /v1/images/*"]}


def test_an_unmetered_post_is_refused_unless_a_policy_names_it() -> None:
    assert unmetered_call(World(), "POST", "/v1/images/generations") == 403


def test_a_passthrough_entry_opens_an_unmetered_post_to_keys_without_a_budget() -> None:
    w = World().with_policies(OPEN_IMAGES)
    assert unmetered_call(w, "POST", "/v1/images/generations") is None
    assert unmetered_call(w, "POST", "/v1/files") == 403


def test_a_passthrough_entry_does_not_open_an_unmetered_post_to_a_budgeted_key() -> None:
    w = World().with_policies(OPEN_IMAGES, BUDGETED)
    assert unmetered_call(w, "POST", "/v1/images/generations") == 403


def test_a_shadow_budget_only_logs_an_unpriced_call() -> None:
    w = World().with_policies({**BUDGETED, "shadow": True}, OPEN_IMAGES)
    assert unmetered_call(w, "POST", "/v1/images/generations") is None


@pytest.mark.parametrize("entry", ["post /v1/files", "POST v1/files", "POST", "/v1/files"])
def test_a_passthrough_entry_must_be_a_method_and_a_path(entry: str) -> None:
    with pytest.raises(ValidationError):
        Policy.model_validate({"name": "p", "applies_to": {"all": True}, "passthrough": [entry]})


def test_a_passthrough_request_is_charged_one_request_and_no_tokens() -> None:
    limits = [{"per": "key", "requests_per_minute": 5, "tokens_per_minute": 100}]
    w = World().with_policies({"name": "rl", "applies_to": {"all": True}, "rate_limits": limits})
    adm = w.exchange().on_request_headers({**headers("/v1/models", x_api_key=w.key), ":method": "GET"}, True)
    assert isinstance(adm, Admission) and [(c.kind, c.amount) for c in adm.charges] == [("requests", 1)]
    assert adm.holds == ()


def test_small_request_for_a_large_model_is_downgraded() -> None:
    p = policy(routing={"downgrade": [{"model": "gpt-4o", "to": "gpt-4o-mini", "max_input_tokens": 100}]})
    assert decide(Binding((p,), WHO), "gpt-4o", input_tokens=lambda: 99).model == "gpt-4o-mini"


def test_large_request_keeps_its_model() -> None:
    p = policy(routing={"downgrade": [{"model": "gpt-4o", "to": "gpt-4o-mini", "max_input_tokens": 100}]})
    assert decide(Binding((p,), WHO), "gpt-4o", input_tokens=lambda: 100).model == "gpt-4o"


def test_input_is_counted_only_when_a_downgrade_rule_matches() -> None:
    def refuse_to_count() -> int:
        raise AssertionError("counted")

    p = policy(routing={"downgrade": [{"model": "gpt-4o", "to": "gpt-4o-mini", "max_input_tokens": 100}]})
    assert decide(Binding((p,), WHO), "claude-x", input_tokens=refuse_to_count).model == "claude-x"


def test_weighted_split_follows_the_draw() -> None:
    p = policy(
        routing={
            "split": [
                {"model": "big", "to": [{"model": "big", "weight": 90}, {"model": "small", "weight": 10}]}
            ]
        }
    )
    assert decide(Binding((p,), WHO), "big", draw=0.5).model == "big"
    assert decide(Binding((p,), WHO), "big", draw=0.95).model == "small"


def test_model_rules_apply_to_the_routed_model() -> None:
    p = policy(
        routing={"downgrade": [{"model": "gpt-4o", "to": "gpt-4o-mini", "max_input_tokens": 100}]},
        models={"allow": ["gpt-4o-mini"]},
    )
    assert decide(Binding((p,), WHO), "gpt-4o", input_tokens=lambda: 5).reject is None


def test_example_policies_are_valid(pdir: Path) -> None:
    for example in (REPO / "policies" / "examples").glob("*.yaml"):
        shutil.copy(example, pdir / example.name)
    assert len(load_policy_dir(pdir).policies) >= 3
