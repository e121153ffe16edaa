"""The request life cycle as plain data: credential swap, rejections, records."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from extproc import wrapped_keys
from extproc.exchange import Exchange, Limits, parse_tags
from extproc.keytable import KeyEntry, KeyTable
from extproc.policy.budgets import Settlement
from extproc.policy.loader import PolicySet, load_policy_dir
from extproc.policy.schema import Policy
from extproc.upstreams import upstream_for
from extproc.usage import Usage, UsageRecord

REPO = Path(__file__).resolve().parents[2]
PROVIDER_SECRET = "provider-secret-" + uuid.uuid4().hex


class World:
    def __init__(self, provider: str = "openai", base_url: str = "http://127.0.0.1:9999") -> None:
        self.key = wrapped_keys.generate()
        self.table = KeyTable()
        self.entry = KeyEntry(
            uuid.uuid4(),
            wrapped_keys.visible_prefix(self.key),
            "k",
            "team",
            "proj",
            None,
            None,
            provider,
            uuid.uuid4(),
            upstream_for(base_url),
            PROVIDER_SECRET,
        )
        self.table.replace({wrapped_keys.digest(self.key): self.entry})
        self.records: list[UsageRecord] = []
        self.current = PolicySet(load_policy_dir(REPO / "policies").prices, ())

    def with_policies(self, *docs: dict[str, object]) -> World:
        self.current = PolicySet(self.current.prices, tuple(Policy.model_validate(d) for d in docs))
        return self

    def exchange(
        self, limits: Limits | None = None, settle: Callable[[Settlement], None] | None = None
    ) -> Exchange:
        return Exchange(self.table, self, self.records.append, limits or Limits(), settle or (lambda _: None))


def headers(path: str, **extra: str) -> dict[str, str]:
    return {":method": "POST", ":path": path, **{k.replace("_", "-"): v for k, v in extra.items()}}


@pytest.fixture
def world() -> World:
    return World()


CHAT_BODY = b'{"model":"fake-openai-model","messages":[{"role":"user","content":"hi"}]}'


def test_wrapped_key_is_replaced_by_the_provider_key(world: World) -> None:
    ex = world.exchange()
    first = ex.on_request_headers(headers("/v1/chat/completions", authorization=f"Bearer {world.key}"), False)
    second = ex.on_request_body(CHAT_BODY)
    assert "authorization" in first.remove_headers  # type: ignore[union-attr]
    assert ("authorization", f"Bearer {PROVIDER_SECRET}") in second.set_headers  # type: ignore[union-attr]


def test_an_accounted_request_gets_its_credential_and_route_only_with_the_body_reply(world: World) -> None:
    ex = world.exchange()
    first = ex.on_request_headers(headers("/v1/chat/completions", authorization=f"Bearer {world.key}"), False)
    assert all(PROVIDER_SECRET not in v and k != "x-spendgate-upstream" for k, v in first.set_headers)  # type: ignore[union-attr]
    assert first.clear_route_cache  # type: ignore[union-attr]
    second = ex.on_request_body(CHAT_BODY)
    assert second.clear_route_cache and "x-spendgate-upstream" in dict(second.set_headers)  # type: ignore[union-attr]


def test_a_passthrough_request_gets_its_credential_with_the_headers_reply(world: World) -> None:
    reply = world.exchange().on_request_headers({**headers("/v1/models", x_api_key=world.key), ":method": "GET"}, True)
    assert ("authorization", f"Bearer {PROVIDER_SECRET}") in reply.set_headers  # type: ignore[union-attr]


def test_every_header_that_may_carry_a_credential_is_cleared(world: World) -> None:
    h = headers(
        "/v1/chat/completions",
        authorization=f"Bearer {world.key}",
        x_api_key=world.key,
        x_goog_api_key=world.key,
    )
    reply = world.exchange().on_request_headers(h, False)
    assert {"authorization", "x-api-key", "x-goog-api-key"} <= set(reply.remove_headers)
    assert all(world.key not in v for _, v in reply.set_headers)


def test_request_is_routed_to_the_credentials_cluster(world: World) -> None:
    ex = world.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    reply = ex.on_request_body(CHAT_BODY)
    cluster = upstream_for("http://127.0.0.1:9999").cluster
    assert ("x-spendgate-upstream", cluster) in reply.set_headers and reply.clear_route_cache  # type: ignore[union-attr]


def test_gemini_query_key_is_removed_from_the_path() -> None:
    w = World("gemini")
    path = f"/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key={w.key}"
    ex = w.exchange()
    reply = ex.on_request_headers(headers(path), False)
    new_path = dict(reply.set_headers)[":path"]  # type: ignore[union-attr]
    assert w.key not in new_path and "alt=sse" in new_path
    body = ex.on_request_body(b'{"contents":[{"parts":[{"text":"hi"}]}]}')
    assert ("x-goog-api-key", PROVIDER_SECRET) in body.set_headers  # type: ignore[union-attr]


def test_unknown_key_is_rejected_with_401_and_no_record(world: World) -> None:
    ex = world.exchange()
    reply = ex.on_request_headers(
        headers("/v1/chat/completions", authorization="Bearer " + wrapped_keys.generate()), False
    )
    assert reply.immediate_status == 401 and ex.finished and world.records == []


def test_rejection_of_an_anthropic_request_uses_the_anthropic_error_shape(world: World) -> None:
    reply = world.exchange().on_request_headers(
        headers("/v1/messages", x_api_key="sg-unknown-key-000000000"), False
    )
    assert json.loads(reply.body or b"")["error"]["type"] == "authentication_error"


def test_known_api_asks_for_the_request_body(world: World) -> None:
    reply = world.exchange().on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    assert reply.request_body_mode == "BUFFERED"


def test_other_paths_pass_through_without_body_processing(world: World) -> None:
    ex = world.exchange()
    reply = ex.on_request_headers(headers("/v1/files", x_api_key=world.key), False)
    assert reply.request_body_mode is None
    ex.on_response_headers({":status": "200", "content-type": "application/json"}, False)
    assert ex.finished and world.records[0].api == "passthrough" and world.records[0].usage == Usage()


def test_body_over_the_limit_is_rejected_with_413(world: World) -> None:
    ex = world.exchange(Limits(max_request_body_bytes=10))
    reply = ex.on_request_headers(
        headers("/v1/chat/completions", x_api_key=world.key, content_length="11"), False
    )
    assert reply.immediate_status == 413 and world.records[0].status == 413


def test_malformed_body_is_rejected_with_400_and_recorded(world: World) -> None:
    ex = world.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    reply = ex.on_request_body(b"{not json")
    assert reply.immediate_status == 400
    assert world.records[0].outcome == "rejected" and world.records[0].status == 400


def run_json(world: World, body: dict[str, object], response: dict[str, object]) -> UsageRecord:
    ex = world.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    ex.on_request_body(json.dumps(body).encode())
    reply = ex.on_response_headers({":status": "200", "content-type": "application/json"}, False)
    assert reply.response_body_mode == "BUFFERED"
    ex.on_response_body(json.dumps(response).encode(), True)
    assert len(world.records) == 1
    return world.records[0]


def test_json_response_yields_one_exact_record(world: World) -> None:
    rec = run_json(
        world,
        {"model": "fake-openai-model", "messages": []},
        {"model": "fake-openai-model", "usage": {"prompt_tokens": 1000, "completion_tokens": 100}},
    )
    assert rec.usage == Usage(input_tokens=1000, output_tokens=100) and not rec.estimated
    assert str(rec.cost_usd) == "0.0035" and rec.price_version == world.current.prices.version
    assert (rec.team, rec.project, rec.status, rec.outcome) == ("team", "proj", 200, "complete")


def test_stream_cut_short_is_counted_and_flagged_estimated(world: World) -> None:
    ex = world.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    ex.on_request_body(
        b'{"model":"fake-openai-model","stream":true,"messages":[{"role":"user","content":"hello world"}]}'
    )
    reply = ex.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    assert reply.response_body_mode == "STREAMED"
    ex.on_response_body(b'data: {"choices":[{"delta":{"content":"one two three"}}]}\n\n', False)
    ex.abandon()
    rec = world.records[0]
    assert rec.estimated and rec.outcome == "incomplete"
    assert rec.usage.output_tokens == 3 and rec.usage.input_tokens > 0


def test_upstream_error_is_recorded_with_its_status_and_no_tokens(world: World) -> None:
    ex = world.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    ex.on_request_body(b'{"model":"fake-openai-model","messages":[]}')
    ex.on_response_headers({":status": "429", "content-type": "application/json"}, False)
    rec = world.records[0]
    assert (rec.status, rec.outcome, rec.usage) == (429, "upstream_error", Usage())


def test_envoy_plain_text_error_is_rewritten_in_the_provider_format(world: World) -> None:
    ex = world.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    ex.on_request_body(b'{"model":"fake-openai-model","messages":[]}')
    assert ex.on_response_headers({":status": "503", "content-type": "text/plain"}, False).response_body_mode
    reply = ex.on_response_body(b"upstream connect error", True)
    assert reply is not None and json.loads(reply.body or b"")["error"]["message"].startswith(
        "upstream error"
    )
    assert world.records[0].status == 503


def test_finalize_runs_once_however_the_stream_ends(world: World) -> None:
    ex = world.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    ex.finalize("complete")
    ex.finalize("incomplete")
    ex.abandon()
    assert len(world.records) == 1


def test_tags_header_accepts_pairs_and_json() -> None:
    assert parse_tags("env=prod, app=web", 16) == {"env": "prod", "app": "web"}
    assert parse_tags('{"env": "prod"}', 16) == {"env": "prod"}


def test_expired_key_is_rejected(world: World) -> None:
    world.table.replace(
        {
            wrapped_keys.digest(world.key): KeyEntry(
                **{**world.entry.__dict__, "expires_at": dt.datetime.now(dt.UTC) - dt.timedelta(1)}
            )
        }
    )
    reply = world.exchange().on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    assert reply.immediate_status == 401


def test_rewritten_stream_drops_the_upstream_content_length(world: World) -> None:
    ex = world.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    ex.on_request_body(b'{"model":"fake-openai-model","stream":true,"messages":[]}')
    reply = ex.on_response_headers(
        {":status": "200", "content-type": "text/event-stream", "content-length": "99"}, False
    )
    assert "content-length" in reply.remove_headers


def test_chunked_body_over_the_limit_is_rejected_with_413(world: World) -> None:
    ex = world.exchange(Limits(max_request_body_bytes=10))
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    assert ex.on_request_body(b'{"model":"m","messages":[]}').immediate_status == 413


def test_envoy_plain_text_413_is_rewritten_in_the_provider_format(world: World) -> None:
    ex = world.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    ex.on_response_headers({":status": "413", "content-type": "text/plain"}, False)
    reply = ex.on_response_body(b"Payload Too Large", True)
    assert reply is not None and json.loads(reply.body or b"")["error"]["code"] == "request_too_large"


def test_stream_ended_by_the_provider_is_complete_even_if_the_client_leaves_first(world: World) -> None:
    ex = world.exchange()
    ex.on_request_headers(headers("/v1/chat/completions", x_api_key=world.key), False)
    ex.on_request_body(b'{"model":"fake-openai-model","stream":true,"messages":[]}')
    ex.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    ex.on_response_body(
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\ndata: [DONE]\n\n', False
    )
    ex.abandon()  # the client hung up before Envoy sent the empty end-of-stream chunk
    rec = world.records[0]
    assert rec.outcome == "complete" and not rec.estimated and rec.usage.output_tokens == 2
