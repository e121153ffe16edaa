"""An Exchange under attack: path tricks, respelled models, hostile numbers, broken upstreams."""

from __future__ import annotations

import gzip
import json
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.exchange import MAX_INFLATED_BYTES, Exchange
from extproc.policy.budgets import Admission
from extproc.verdict import Granted
from tests.unit.test_exchange import World, headers

MINI_ONLY = {"name": "mini", "applies_to": {"all": True}, "models": {"allow": ["gpt-4o-mini*"]}}
CAPPED = {"name": "cap", "applies_to": {"all": True}, "budgets": [{"period": "day", "limit_usd": "100"}]}
CHAT_VARIANTS = [
    "/v1/chat/completions/",
    "//v1/chat/completions",
    "/v1//chat/completions",
    "/v1/./chat/completions",
    "/v1/x/../chat/completions",
    "/%76%31/chat/completions",
]


def body_phase(w: World, path: str, body: dict[str, object]) -> tuple[object, object]:
    ex = w.exchange()
    first = ex.on_request_headers(headers(path, x_api_key=w.key), False)
    if getattr(first, "immediate_status", None) is not None:
        return first, None
    return first, ex.on_request_body(json.dumps(body).encode())


@pytest.mark.parametrize("path", CHAT_VARIANTS)
def test_a_path_variant_is_accounted_and_checked_as_the_api_it_names(path: str) -> None:
    w = World().with_policies(MINI_ONLY)
    first, second = body_phase(w, path, {"model": "gpt-4o", "messages": []})
    assert getattr(first, "request_body_mode", None) == "BUFFERED"
    assert dict(first.set_headers)[":path"] == "/v1/chat/completions"  # type: ignore[attr-defined]
    assert getattr(second, "immediate_status", None) == 403


@pytest.mark.parametrize(
    "path",
    ["/v1/chat%2Fcompletions", "/v1/chat/completions;x=1", "/v1beta/models/gemini-2.5-pro%3AgenerateContent"],
)
def test_a_path_with_escaped_separators_is_refused_with_400_and_recorded(path: str) -> None:
    w = World().with_policies(MINI_ONLY)
    first, _ = body_phase(w, path, {})
    assert getattr(first, "immediate_status", None) == 400
    assert [r.status for r in w.records] == [400]


@pytest.mark.parametrize("path", ["/V1/Chat/Completions", "/v1/chat/completions2", "/v1/chat"])
def test_a_post_to_a_path_spendgate_does_not_meter_is_refused(path: str) -> None:
    w = World().with_policies(MINI_ONLY)
    first, _ = body_phase(w, path, {"model": "gpt-4o", "messages": []})
    assert getattr(first, "immediate_status", None) == 403


def test_gemini_dot_dot_is_checked_against_the_model_actually_served() -> None:
    w = World("gemini").with_policies(
        {"name": "flash", "applies_to": {"all": True}, "models": {"allow": ["gemini-2.5-flash*"]}}
    )
    path = "/v1beta/models/gemini-2.5-flash/../gemini-2.5-pro:generateContent"
    _, second = body_phase(w, path, {"contents": [{"parts": [{"text": "hi"}]}]})
    assert getattr(second, "immediate_status", None) == 403


@pytest.mark.parametrize("model", ["GPT-4O", " gpt-4o ", "models/gpt-4o", "Gpt-4o-2024-08-06", "  GPT-4o"])
def test_model_rules_compare_canonical_names(model: str) -> None:
    w = World().with_policies(MINI_ONLY)
    _, second = body_phase(w, "/v1/chat/completions", {"model": model, "messages": []})
    assert getattr(second, "immediate_status", None) == 403


@pytest.mark.parametrize("model", ["GPT-4o-mini", "models/gpt-4o-mini", " gpt-4o-mini-2024-07-18"])
def test_a_respelled_allowed_model_is_still_allowed(model: str) -> None:
    w = World().with_policies(MINI_ONLY)
    _, second = body_phase(w, "/v1/chat/completions", {"model": model, "messages": []})
    assert getattr(second, "immediate_status", None) is None


@pytest.mark.parametrize("model", ["gpt-4o-mini/../gpt-4o", "gpt-4o-mini/./x", "gpt-4o-mini\\..\\gpt-4o", "gpt-4o-mini\x00", "m" * 300])
def test_a_model_name_with_no_single_meaning_is_refused_with_400(model: str) -> None:
    w = World().with_policies(MINI_ONLY)
    _, second = body_phase(w, "/v1/chat/completions", {"model": model, "messages": []})
    assert getattr(second, "immediate_status", None) == 400


def test_an_accounted_api_with_no_body_is_refused_not_forwarded() -> None:
    w = World()
    reply = w.exchange().on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), True)
    assert reply.immediate_status == 400  # type: ignore[union-attr]
    assert [r.outcome for r in w.records] == ["rejected"]


def test_every_completion_asked_for_is_reserved() -> None:
    def amount(n: int) -> Decimal:
        w = World().with_policies(CAPPED)
        _, adm = body_phase(w, "/v1/chat/completions", {"model": "fake-openai-model", "n": n, "max_tokens": 100, "messages": []})
        assert isinstance(adm, Admission)
        return adm.amount

    one, fifty = amount(1), amount(50)
    output_price = Decimal("10.00") / 1_000_000
    assert fifty - one == 49 * 100 * output_price


def test_a_max_tokens_past_the_models_limit_is_refused_with_400() -> None:
    w = World().with_policies(CAPPED)
    _, reply = body_phase(w, "/v1/chat/completions", {"model": "fake-openai-model", "max_tokens": 10**9, "messages": []})
    assert getattr(reply, "immediate_status", None) == 400


@pytest.mark.parametrize("name", ["key", "KEY", "api_key", "Api-Key", "apikey", "access_token"])
def test_a_credential_in_any_query_spelling_never_reaches_the_provider(name: str) -> None:
    w = World("gemini")
    path = f"/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&{name}={w.key}"
    reply = w.exchange().on_request_headers(headers(path, x_goog_api_key=w.key), False)
    new_path = dict(reply.set_headers)[":path"]  # type: ignore[union-attr]
    assert w.key not in new_path and name.lower() not in new_path.lower() and "alt=sse" in new_path


def served(w: World, response: bytes, *, content_type: str = "application/json", encoding: str = "") -> None:
    ex = w.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
    outcome = ex.on_request_body(b'{"model":"fake-openai-model","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}')
    if isinstance(outcome, Admission):
        ex.apply(Granted(budget_held=True))
    h = {":status": "200", "content-type": content_type}
    if encoding:
        h["content-encoding"] = encoding
    ex.on_response_headers(h, False)
    ex.on_response_body(response, True)


@pytest.mark.parametrize("tokens", [10**17, 2**63, 10**400])
def test_an_implausible_token_count_is_clamped_to_what_the_request_could_produce_and_flagged(tokens: int) -> None:
    w = World().with_policies(CAPPED)
    served(w, b'{"usage":{"prompt_tokens":%d,"completion_tokens":%d}}' % (tokens, tokens))
    (rec,) = w.records
    assert "implausible_usage" in rec.flags
    assert rec.usage.output_tokens <= 100 and rec.usage.input_tokens < 10_000
    assert rec.cost_usd is not None and rec.cost_usd < Decimal("1")


def test_a_deeply_nested_json_answer_still_yields_a_record() -> None:
    w = World()
    served(w, b"[" * 100_000 + b"]" * 100_000)
    (rec,) = w.records
    assert rec.status == 200 and rec.estimated


def test_a_gzip_bomb_is_inflated_only_up_to_the_bound() -> None:
    w = World()
    bomb = gzip.compress(b" " * (MAX_INFLATED_BYTES * 4))
    served(w, bomb, encoding="gzip")
    (rec,) = w.records
    assert "body_too_large_to_account" in rec.flags and rec.estimated


def test_a_defect_while_reading_a_response_passes_it_on_and_still_records_it() -> None:
    w = World()
    ex = w.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
    ex.on_request_body(b'{"model":"fake-openai-model","messages":[{"role":"user","content":"hi"}]}')
    ex.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    assert ex.fail("response_body") is None
    assert ex.on_response_body(b"data: anything\n\n", False) is None
    ex.on_response_body(b"", True)
    (rec,) = w.records
    assert "internal_error" in rec.flags and rec.estimated and rec.outcome == "complete"


def test_a_defect_before_the_request_went_up_refuses_it_with_500() -> None:
    w = World()
    ex = w.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
    reply = ex.fail("request_body")
    assert reply is not None and reply.immediate_status == 500
    assert [r.status for r in w.records] == [500]


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "null", "true", '"12"', "[]", "{}"]),
    ),
    st.sampled_from(["prompt_tokens", "completion_tokens"]),
)
def test_whatever_usage_an_upstream_reports_the_record_is_written_with_a_cost_that_is_not_negative(
    value: object, field: str
) -> None:
    w = World().with_policies(CAPPED)
    raw = value if isinstance(value, str) else json.dumps(value)
    served(w, b'{"usage":{"prompt_tokens":5,"completion_tokens":5,"%s":%s}}' % (field.encode(), str(raw).encode()))
    (rec,) = w.records
    assert rec.cost_usd is not None and rec.cost_usd >= 0
    assert 0 <= rec.usage.output_tokens <= 100 and rec.usage.input_tokens >= 0


@pytest.mark.parametrize(
    "extra",
    [
        {"previous_response_id": "resp_123"},
        {"tools": [{"type": "web_search"}]},
        {"conversation": "conv_1"},
    ],
    ids=["stored-response", "server-tool", "conversation"],
)
def test_a_request_drawing_on_upstream_context_reserves_a_whole_context_window(extra: dict[str, object]) -> None:
    w = World().with_policies(CAPPED)
    ex = w.exchange()
    ex.on_request_headers(headers("/v1/responses", x_api_key=w.key), False)
    adm = ex.on_request_body(json.dumps({"model": "fake-openai-model", "input": "hi", "max_output_tokens": 10, **extra}).encode())
    assert isinstance(adm, Admission)
    assert adm.amount >= Decimal(1_000_000) * Decimal("2.50") / 1_000_000


def answering(w: World, content_type: str, *, stream: bool = False) -> Exchange:
    """An exchange for an unbudgeted chat completion whose 200 answer has just begun."""
    ex = w.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=w.key), False)
    body = {"model": "fake-openai-model", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    ex.on_request_body(json.dumps(body).encode())
    ex.on_response_headers({":status": "200", "content-type": content_type}, False)
    return ex


def test_a_buffered_answer_cut_short_is_recorded_with_the_502_the_client_got() -> None:
    w = World()
    ex = answering(w, "application/json")
    ex.on_response_body(b'{"id":"x","usage":', False)
    ex.abandon()
    (rec,) = w.records
    assert (rec.status, rec.outcome, rec.estimated) == (502, "incomplete", True)


@pytest.mark.parametrize(
    "error_event",
    [
        b'data: {"error":{"message":"boom","type":"server_error"}}\n\n',
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n',
        b'data: {"type": "response.failed", "response": {"status": "failed"}}\n\n',
    ],
    ids=["openai-chat", "anthropic", "responses"],
)
def test_an_error_event_inside_a_200_stream_is_recorded_as_an_upstream_error(error_event: bytes) -> None:
    w = World()
    ex = answering(w, "text/event-stream", stream=True)
    ex.on_response_body(b'data: {"choices":[{"delta":{"content":"Hello there"}}]}\n\n', False)
    ex.on_response_body(error_event, True)
    (rec,) = w.records
    assert (rec.status, rec.outcome, rec.estimated) == (200, "upstream_error", True)
    assert rec.usage.output_tokens > 0


def test_a_delta_that_mentions_error_is_not_an_error_event() -> None:
    w = World()
    ex = answering(w, "text/event-stream", stream=True)
    ex.on_response_body(b'data: {"choices":[{"delta":{"content":"{\\"error\\": 1}"}}]}\n\n', False)
    ex.on_response_body(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\ndata: [DONE]\n\n', True)
    (rec,) = w.records
    assert (rec.outcome, rec.estimated) == ("complete", False)


def test_another_providers_sdk_with_this_key_is_told_which_credential_the_key_is_for() -> None:
    w = World("openai")
    reply = w.exchange().on_request_headers(
        headers("/v1/messages", x_api_key=w.key, anthropic_version="2023-06-01"), False
    )
    assert reply.immediate_status == 403  # type: ignore[union-attr]
    doc = json.loads(reply.body or b"")  # type: ignore[union-attr]
    assert doc["type"] == "error" and "openai credential" in doc["error"]["message"]
    assert [r.provider for r in w.records] == ["openai"]


def test_a_gemini_chunk_with_a_null_finish_reason_does_not_mark_a_cut_stream_delivered() -> None:
    w = World("gemini")
    ex = w.exchange()
    ex.on_request_headers(headers("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", x_goog_api_key=w.key), False)
    ex.on_request_body(b'{"contents":[{"parts":[{"text":"hi"}]}]}')
    ex.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    chunk = b'data: {"candidates":[{"content":{"parts":[{"text":"Hello"}]},"finishReason":null}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1}}\n\n'
    ex.on_response_body(chunk, False)
    ex.abandon()
    (rec,) = w.records
    assert (rec.outcome, rec.estimated) == ("incomplete", True)
