"""Envoy's own error replies (the HCM's local_reply_config, extproc.envoy_config.local_reply_config).

A 5xx that Envoy makes itself (the filter unreachable or too slow, the catch-all route, an upstream
that cannot be reached or cuts its answer short) reaches the client in the calling provider's error
JSON, with its status kept and, where the filter had set one on the request, the request id. The
filter's own replies (any status) and a provider's own errors pass byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import grpc
import httpx
import openai
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google import genai
from google.genai import errors, types

from extproc import envoy_messages
from extproc.exchange import REQUEST_ID_HEADER, Reply
from extproc.providers import PROVIDERS, guess_from_request
from tests.e2e.test_fail_closed import SilentFilter, run_envoy
from tests.e2e.test_fail_open import filter_server
from tests.fakeprovider import FakeProvider
from tests.support import Issued, Stack, add_credential, free_port, usage_rows

MESSAGES = [{"role": "user", "content": "hi"}]
WRAPPED_LOOKING = "sg-" + "5" * 43
JSON = "application/json"


# -- the three SDKs, each returning the error it raised -----------------------------------------
def openai_error(url: str, key: str, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="fake-openai-model", messages=MESSAGES, extra_headers=headers)  # type: ignore[arg-type]
    return exc.value


def anthropic_error(url: str, key: str, headers: dict[str, str] | None = None) -> anthropic.APIStatusError:
    client = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as exc:
        client.messages.create(
            model="fake-anthropic-model",
            max_tokens=10,
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_headers=headers,
        )
    return exc.value


def gemini_error(url: str, key: str, headers: dict[str, str] | None = None) -> errors.APIError:
    client = genai.Client(
        api_key=key,
        http_options=types.HttpOptions(base_url=url, retry_options=types.HttpRetryOptions(attempts=1)),
    )
    with pytest.raises(errors.APIError) as exc:
        client.models.generate_content(
            model="fake-gemini-model",
            contents="hi",
            config=types.GenerateContentConfig(http_options=types.HttpOptions(headers=headers or {})),
        )
    return exc.value


def headers_of(exc: Any) -> httpx.Headers:
    return httpx.Headers(dict(exc.response.headers))


def assert_openai_shape(exc: openai.APIStatusError, status: int, message: str, code: str | None) -> None:
    assert isinstance(exc, openai.InternalServerError) and exc.status_code == status
    assert isinstance(exc.body, dict) and set(exc.body) == {"message", "type", "param", "code"}
    assert (exc.type, exc.param, exc.code) == ("api_error", None, code)
    assert message in exc.body["message"]
    assert headers_of(exc)["content-type"] == JSON


def assert_anthropic_shape(exc: anthropic.APIStatusError, status: int, message: str) -> None:
    assert isinstance(exc, anthropic.InternalServerError) and exc.status_code == status
    assert isinstance(exc.body, dict) and exc.body["type"] == "error"
    assert exc.body["error"]["type"] == "api_error" and message in exc.body["error"]["message"]
    assert headers_of(exc)["content-type"] == JSON


def assert_gemini_shape(exc: errors.APIError, status: int, name: str, message: str) -> None:
    assert isinstance(exc, errors.ServerError) and (exc.code, exc.status) == (status, name)
    assert exc.message is not None and message in exc.message
    assert headers_of(exc)["content-type"] == JSON


# -- Envoy without a working filter --------------------------------------------------------------
class StallingFilter(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Reads the request headers, then answers nothing within Envoy's message_timeout (2 s)."""

    def Process(
        self, requests: Iterator[pb.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[object]:
        next(requests, None)
        time.sleep(3)
        return iter(())


class RejectingFilter(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Rejects every request as the real filter does (envoy_messages.immediate), with the status
    the client asks for in `x-status`, in the format of the provider the request is for."""

    def Process(
        self, requests: Iterator[pb.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[object]:
        for req in requests:
            h = {x.key: x.raw_value.decode() for x in req.request_headers.headers.headers}
            status = int(h["x-status"])
            provider = guess_from_request(h[":path"], set(h))
            yield envoy_messages.immediate(
                Reply(
                    immediate_status=status,
                    body=rejection(provider.name, status),
                    set_headers=[("content-type", JSON), (REQUEST_ID_HEADER, "rid-from-the-filter")],
                )
            )
            return


def rejection(provider: str, status: int) -> bytes:
    return PROVIDERS[provider].error_body(status, f"the filter refuses this with {status}")


@contextlib.contextmanager
def envoy(tmp_path: Path, fake: FakeProvider, endpoint: str) -> Iterator[str]:
    """Envoy from envoy_config (local_reply_config included) with its filter at `endpoint`."""
    proc, port = run_envoy(tmp_path, fake, endpoint)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def envoy_with_filter(
    tmp_path: Path, fake: FakeProvider, servicer: pb_grpc.ExternalProcessorServicer
) -> Iterator[str]:
    server = filter_server(servicer, tmp_path)
    try:
        with envoy(tmp_path, fake, f"unix:{tmp_path}/filter.sock") as url:
            yield url
    finally:
        server.stop(0)


def test_unreachable_filter_answers_503_in_the_callers_format_without_forwarding(
    tmp_path: Path, fake: FakeProvider
) -> None:
    with envoy(tmp_path, fake, f"unix:{tmp_path}/nobody-listens.sock") as url:
        before = len(fake.requests)
        said = "Spendgate's filter is unavailable; the request was not forwarded"
        oa = openai_error(url, WRAPPED_LOOKING)
        assert_openai_shape(oa, 503, said, "spendgate_unavailable")
        an = anthropic_error(url, WRAPPED_LOOKING)
        assert_anthropic_shape(an, 503, said)
        ge = gemini_error(url, WRAPPED_LOOKING)
        assert_gemini_shape(ge, 503, "UNAVAILABLE", said)
        # The filter never answered, so there is no request id; a client's own is never echoed.
        for exc in (oa, an, ge):
            assert REQUEST_ID_HEADER not in headers_of(exc)
        r = httpx.post(url + "/v1/chat/completions", json={}, headers={REQUEST_ID_HEADER: "made-up"})
        assert r.status_code == 503 and REQUEST_ID_HEADER not in r.headers
        assert len(fake.requests) == before


def test_filter_too_slow_is_a_504_in_the_callers_format(tmp_path: Path, fake: FakeProvider) -> None:
    with envoy_with_filter(tmp_path, fake, StallingFilter()) as url:
        ge = gemini_error(url, WRAPPED_LOOKING)
    assert_gemini_shape(ge, 504, "DEADLINE_EXCEEDED", "Spendgate's filter did not answer in time")
    assert "per-message_timeout" in (ge.message or "")


def test_catch_all_route_answers_in_the_callers_format(tmp_path: Path, fake: FakeProvider) -> None:
    """A filter that closes its stream unanswered leaves the request unrouted: the catch-all 503."""
    with envoy_with_filter(tmp_path, fake, SilentFilter()) as url:
        said = "request was not authorised by the Spendgate filter"
        assert_openai_shape(openai_error(url, WRAPPED_LOOKING), 503, said, "spendgate_unavailable")
        assert_anthropic_shape(anthropic_error(url, WRAPPED_LOOKING), 503, said)
        assert_gemini_shape(gemini_error(url, WRAPPED_LOOKING), 503, "UNAVAILABLE", said)


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/chat/completions", {"authorization": f"Bearer {WRAPPED_LOOKING}"}),
        ("/v1/messages", {"x-api-key": WRAPPED_LOOKING, "anthropic-version": "2023-06-01"}),
        ("/v1beta/models/fake-gemini-model:generateContent", {"x-goog-api-key": WRAPPED_LOOKING}),
    ],
)
def test_the_filters_own_5xx_replies_pass_byte_for_byte(
    tmp_path: Path, fake: FakeProvider, path: str, headers: dict[str, str]
) -> None:
    """The filter's immediate responses go through Envoy's local reply path too: the mappers must
    leave them alone whatever their status, 5xx included."""
    provider = guess_from_request(path, set(headers)).name
    with envoy_with_filter(tmp_path, fake, RejectingFilter()) as url:
        for status in (500, 502, 503, 504, 429, 401):
            r = httpx.post(url + path, json={}, headers={**headers, "x-status": str(status)})
            assert r.status_code == status
            assert r.content == rejection(provider, status)
            assert r.headers["content-type"] == JSON
            assert r.headers[REQUEST_ID_HEADER] == "rid-from-the-filter"


# -- the real stack -----------------------------------------------------------------------------
def test_upstream_cutting_a_json_answer_short_is_a_502_in_the_providers_format_with_its_request_id(
    stack: Stack, openai_key: Issued, anthropic_key: Issued, gemini_key: Issued
) -> None:
    """Headers with the full content-length, half the body, then a reset: Envoy answers 502 itself
    (the filter holds a JSON answer until it is whole), carrying the request's record id."""
    cut = {"x-fake-scenario": "cut"}
    said = "upstream error: "
    oa = openai_error(stack.url, openai_key.key, cut)
    assert_openai_shape(oa, 502, said, None)
    an = anthropic_error(stack.url, anthropic_key.key, cut)
    assert_anthropic_shape(an, 502, said)
    ge = gemini_error(stack.url, gemini_key.key, cut)
    assert_gemini_shape(ge, 502, json.loads(PROVIDERS["gemini"].error_body(502, ""))["error"]["status"], said)
    for exc, issued in ((oa, openai_key), (an, anthropic_key), (ge, gemini_key)):
        (row,) = usage_rows(stack, issued.key_id)
        assert headers_of(exc)[REQUEST_ID_HEADER] == row["request_id"]
        assert row["status"] == 502


def dead_key(stack: Stack) -> tuple[str, uuid.UUID]:
    """A wrapped key on an OpenAI credential whose base URL is a port nobody listens on, once
    Envoy has that base URL's cluster (before, the answer is cluster_not_found)."""
    credential = "closed-" + secrets.token_hex(3)
    add_credential(stack, "openai", credential, f"http://127.0.0.1:{free_port()}")
    out = json.loads(
        stack.cli("keys", "create", "--name", f"key-{credential}", "--provider", credential, "--json").stdout
    )
    stack.secrets.append(out["key"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = httpx.get(
            stack.url + "/v1/models",
            headers={"authorization": f"Bearer {out['key']}", "x-spendgate-tags": "probe=1"},
        )
        if r.status_code == 503 and "cluster_not_found" not in r.text:
            return out["key"], uuid.UUID(out["id"])
        time.sleep(0.1)
    raise AssertionError(f"the closed base URL never got its cluster: {r.status_code} {r.text}")


def test_upstream_connect_failure_is_a_503_in_the_providers_format_with_its_request_id(
    stack: Stack,
) -> None:
    key, key_id = dead_key(stack)
    exc = openai_error(stack.url, key)
    assert_openai_shape(exc, 503, "upstream error: upstream connect error", None)
    assert "connection failure" in exc.body["message"]  # type: ignore[index]
    (row,) = usage_rows(stack, key_id)
    assert headers_of(exc)[REQUEST_ID_HEADER] == row["request_id"]
    assert (row["status"], row["outcome"]) == (503, "upstream_error")


def test_every_filter_rejection_is_unchanged(
    stack: Stack, openai_key: Issued, anthropic_key: Issued, gemini_key: Issued
) -> None:
    """401, 400, 403 and 413 from the real filter, byte for byte as the provider module makes them."""
    bad_key = "Incorrect API key provided. Spendgate needs a valid wrapped key (sg-...)."
    cases: list[tuple[str, int, str, str, dict[str, str], bytes]] = [
        ("openai", 401, bad_key, "/v1/chat/completions", {}, b"{}"),
        ("anthropic", 401, bad_key, "/v1/messages", {"anthropic-version": "2023-06-01"}, b"{}"),
        ("gemini", 401, bad_key, "/v1beta/models/fake-gemini-model:generateContent", {}, b"{}"),
        (
            "openai",
            400,
            "request body is empty; expected a JSON object",
            "/v1/chat/completions",
            {"authorization": f"Bearer {openai_key.key}"},
            b"",
        ),
        (
            "anthropic",
            403,
            "POST /v1/files is not an API Spendgate meters; a policy's passthrough list must name it "
            "before it is forwarded",
            "/v1/files",
            {"x-api-key": anthropic_key.key},
            b"{}",
        ),
        (
            "gemini",
            413,
            "request body exceeds 8388608 bytes",
            "/v1beta/models/fake-gemini-model:generateContent",
            {"x-goog-api-key": gemini_key.key},
            b"x" * (8 * 1024 * 1024 + 1),
        ),
    ]
    for provider, status, message, path, headers, body in cases:
        r = httpx.post(stack.url + path, content=body, headers=headers, timeout=30)
        assert r.status_code == status, (provider, status, r.text)
        assert r.content == PROVIDERS[provider].error_body(status, message), (provider, status)
        assert r.headers["content-type"] == JSON and r.headers[REQUEST_ID_HEADER]


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_a_providers_own_5xx_passes_unchanged(
    stack: Stack, fake: FakeProvider, provider: str, request: pytest.FixtureRequest
) -> None:
    issued: Issued = request.getfixturevalue(f"{provider}_key")
    path, auth, body = {
        "openai": (
            "/v1/chat/completions",
            "authorization",
            {"model": "fake-openai-model", "messages": MESSAGES},
        ),
        "gemini": (
            "/v1beta/models/fake-gemini-model:generateContent",
            "x-goog-api-key",
            {"contents": [{"parts": [{"text": "hi"}]}]},
        ),
    }[provider]
    scenario = {"x-fake-scenario": "error-503"}
    bearer = "Bearer " if auth == "authorization" else ""
    through = httpx.post(stack.url + path, json=body, headers={**scenario, auth: bearer + issued.key})
    direct = httpx.post(fake.base_url + path, json=body, headers={**scenario, auth: bearer + "direct"})
    assert through.status_code == direct.status_code == 503
    assert through.content == direct.content
    assert through.headers[REQUEST_ID_HEADER]
