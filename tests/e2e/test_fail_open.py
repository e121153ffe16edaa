"""Fail-open per provider: with the filter unreachable, Envoy serves an opted-in provider itself
with its break-glass key, logs the request with the key's prefix only, and the importer turns
the log into usage records flagged fail_open. Every other provider still gets a 503."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import anthropic
import certifi
import grpc
import httpx
import openai
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from extproc import envoy_config, failopen, wrapped_keys
from extproc import envoy_messages as msg
from extproc.exchange import CREDENTIAL_HEADERS, REQUEST_ID_HEADER, UPSTREAM_HEADER, Reply
from extproc.stack import envoy_binary
from extproc.upstreams import upstream_for
from tests.e2e.helpers import auth_of
from tests.e2e.test_stack import processes_of
from tests.fakeprovider import FakeProvider, RecordedRequest
from tests.support import REPO, Issued, Stack, free_port, issue_key, start_stack

MESSAGES: Any = [{"role": "user", "content": "hi"}]


def breakglass_secret() -> str:
    return "sk-breakglass-" + secrets.token_hex(16)


def fail_open_rows(
    stack: Stack, issued: Issued, expect: int = 1, timeout: float = 20
) -> list[dict[str, Any]]:
    """The key's usage records flagged fail_open, waiting until `expect` of them are in."""
    deadline = time.monotonic() + timeout
    while True:
        with stack.connect() as conn:
            cur = conn.execute(
                "SELECT * FROM usage_events WHERE key_id = %s AND %s = ANY(flags) ORDER BY ts",
                (issued.key_id, failopen.FLAG),
            )
            cols = [c.name for c in cur.description or []]
            rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def assert_only_breakglass_went_up(reqs: list[RecordedRequest], issued: Issued, secret: str) -> None:
    assert reqs, "the provider saw nothing"
    for req in reqs:
        assert auth_of(req) == secret
        blob = repr(req.headers) + repr(req.query) + req.path + req.body.decode(errors="replace")
        assert issued.key not in blob and wrapped_keys.visible_prefix(issued.key) not in blob
        assert issued.provider_secret not in blob  # nor the key the filter would have used


class DeadFilterEnvoy:
    """Envoy from envoy_config with fail-open for openai and its filter at a socket nobody serves."""

    def __init__(self, tmp: Path, fake: FakeProvider, secret: str, endpoint: str = "") -> None:
        self.secret = secret
        self.home = tmp / "home"
        failopen.set_breakglass(self.home, "openai", secret, fake.base_url)
        self.port, self.admin = free_port(), free_port()
        cfg = envoy_config.bootstrap(
            envoy_config.BootstrapOptions(
                endpoints=[envoy_config.Endpoint(endpoint or f"unix:{tmp}/nobody-listens.sock")],
                ca_file=certifi.where(),
                port=self.port,
                admin_port=self.admin,
                upstreams=[upstream_for(fake.base_url)],
                **failopen.bootstrap_options(self.home, ["openai"]),
            )
        )
        self.log = self.home / failopen.ACCESS_LOG
        path = tmp / "envoy.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.output = tmp / "envoy.out"
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(path), "--concurrency", "1", "--base-id", str(self.admin)],
            stdout=self.output.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.admin}/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("envoy did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM: Envoy flushes its access log on the way out."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


@pytest.fixture
def dead_filter_envoy(tmp_path: Path, fake: FakeProvider, stack: Stack) -> Iterator[DeadFilterEnvoy]:
    secret = breakglass_secret()
    stack.secrets.append(secret)
    envoy = DeadFilterEnvoy(tmp_path, fake, secret)
    yield envoy
    envoy.stop()


def test_unreachable_filter_fails_open_for_the_opted_in_provider_only(
    stack: Stack, fake: FakeProvider, dead_filter_envoy: DeadFilterEnvoy
) -> None:
    envoy = dead_filter_envoy
    secret = envoy.secret
    oa_key = issue_key(stack, "openai", fake.base_url)
    an_key = issue_key(stack, "anthropic", fake.base_url)
    before = len(fake.requests)

    client = openai.OpenAI(base_url=envoy.url + "/v1", api_key=oa_key.key, max_retries=0)
    answer = client.chat.completions.with_raw_response.create(model="fake-openai-model", messages=MESSAGES)
    assert answer.parse().choices[0].message.content
    assert REQUEST_ID_HEADER not in answer.headers  # served by Envoy alone
    chunks = list(client.chat.completions.create(model="fake-openai-model", messages=MESSAGES, stream=True))
    assert chunks
    assert_only_breakglass_went_up(fake.requests[before:], oa_key, secret)

    # Anthropic is not opted in: fail closed as before.
    seen = len(fake.requests)
    with pytest.raises(anthropic.APIStatusError) as exc:
        anthropic.Anthropic(base_url=envoy.url, api_key=an_key.key, max_retries=0).messages.create(
            model="fake-anthropic-model", max_tokens=10, messages=MESSAGES
        )
    assert exc.value.status_code == 503
    # Nor does the break-glass route serve a request without a wrapped key, or with a raw key.
    for auth in ("", f"Bearer {oa_key.provider_secret}", f"Bearer {oa_key.key}x"):
        r = httpx.post(
            envoy.url + "/v1/chat/completions",
            json={"model": "fake-openai-model", "messages": MESSAGES},
            headers={"authorization": auth} if auth else {},
        )
        assert r.status_code == 503, auth[:12]
    assert len(fake.requests) == seen

    envoy.stop()
    lines = envoy.log.read_text().splitlines()
    assert len(lines) == 2, lines
    for line in lines:
        entry = json.loads(line)
        assert entry["key_prefix_authorization"] == wrapped_keys.visible_prefix(oa_key.key)
        assert entry["route"].startswith(envoy_config.FAILOPEN_ROUTE_PREFIX + "openai")
        assert entry["model"] == "fake-openai-model" and entry["status"] == 200
        assert entry["method"] == "POST" and entry["path"] == "/v1/chat/completions"
        assert int(entry["bytes_sent"]) > 0
    text = envoy.log.read_text() + envoy.output.read_text(errors="replace")
    for s in (oa_key.key, an_key.key, secret, oa_key.provider_secret):
        assert s not in text, f"{s[:6]}... is in Envoy's log or output"

    # Import: one record per request, flagged, estimated, attributed to the key; twice is once.
    res = stack.cli("failopen", "import", "--log", str(envoy.log), "--policies", str(REPO / "policies"))
    assert json.loads(res.stdout)["imported"] == 2
    rows = fail_open_rows(stack, oa_key, expect=2)
    assert len(rows) == 2
    for row in rows:
        assert row["flags"] == [failopen.FLAG] and row["estimated"] is True
        assert row["outcome"] == "complete" and row["status"] == 200 and row["provider"] == "openai"
        assert row["model_requested"] == "fake-openai-model" and row["api"] == "chat.completions"
        assert row["input_tokens"] > 0 and row["output_tokens"] > 0 and row["cost_usd"] > 0
    assert sorted(r["stream"] for r in rows) == [False, True]
    res = stack.cli("failopen", "import", "--log", str(envoy.log), "--policies", str(REPO / "policies"))
    assert json.loads(res.stdout)["imported"] == 0
    assert len(fail_open_rows(stack, oa_key, expect=3, timeout=1)) == 2


def test_import_skips_and_counts_lines_it_cannot_read(stack: Stack, tmp_path: Path) -> None:
    log = tmp_path / failopen.ACCESS_LOG
    log.write_bytes(b'not json\n{"v": "1"}\n\xff\xfe\n[1, 2]\n{"v":"1","ts":"yesterday"}\n')
    res = stack.cli("failopen", "import", "--log", str(log))
    stats = json.loads(res.stdout)
    assert stats == {**stats, "lines": 5, "imported": 0, "unreadable": 5}


@pytest.fixture(scope="module")
def fo_stack(
    database: str, tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider
) -> Iterator[tuple[Stack, str]]:
    """`spendgate up --fail-open openai`, its break-glass key pointed at the fake."""
    workdir = tmp_path_factory.mktemp("fo-stack")
    secret = breakglass_secret()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SPENDGATE_MASTER_KEY")}
    subprocess.run(
        [
            str(REPO / ".venv/bin/python"),
            "-m",
            "extproc",
            "breakglass",
            "set",
            "--provider",
            "openai",
            "--base-url",
            fake.base_url,
            "--secret-env",
            "BG",
        ],
        env={**env, "SPENDGATE_HOME": str(workdir / "home"), "BG": secret},
        check=True,
        capture_output=True,
        timeout=60,
    )
    s = start_stack(database, workdir, "--workers", "1", "--fail-open", "openai")
    s.secrets.append(secret)
    yield s, secret
    s.stop()


def test_breakglass_secret_file_is_private(fo_stack: tuple[Stack, str]) -> None:
    stack, secret = fo_stack
    path = failopen.breakglass_dir(stack.home) / "openai.yaml"
    assert path.stat().st_mode & 0o777 == 0o600
    assert failopen.breakglass_dir(stack.home).stat().st_mode & 0o777 == 0o700
    listing = stack.cli("breakglass", "list", "--json").stdout
    assert json.loads(listing)[0]["provider"] == "openai" and secret not in listing


def test_frozen_worker_fails_open_and_the_stack_imports_the_record(
    fo_stack: tuple[Stack, str], fake: FakeProvider
) -> None:
    stack, secret = fo_stack
    issued = issue_key(stack, "openai", fake.base_url)
    (worker,) = [p for p in processes_of(stack.home) if "serve" in p.cmdline()]
    before = len(fake.requests)
    worker.send_signal(signal.SIGSTOP)
    try:
        client = openai.OpenAI(base_url=stack.url + "/v1", api_key=issued.key, max_retries=0)
        answer = client.chat.completions.create(model="fake-openai-model", messages=MESSAGES)
        assert answer.choices
    finally:
        worker.send_signal(signal.SIGCONT)
    assert_only_breakglass_went_up(
        [r for r in fake.requests[before:] if r.path == "/v1/chat/completions"], issued, secret
    )
    # The stack's own importer picks the line up (Envoy flushes its log each second).
    (row,) = fail_open_rows(stack, issued)
    assert row["flags"] == [failopen.FLAG] and row["estimated"] is True and row["outcome"] == "complete"
    # And with the worker back, the filter serves the key again, with the real key.
    completions = openai.OpenAI(
        base_url=stack.url + "/v1", api_key=issued.key, max_retries=0
    ).chat.completions
    raw = completions.with_raw_response.create(model="fake-openai-model", messages=MESSAGES)
    assert REQUEST_ID_HEADER in raw.headers
    assert auth_of(fake.requests[-1]) == issued.provider_secret
    text = stack.logs() + (stack.home / failopen.ACCESS_LOG).read_text()
    for s in (issued.key, secret, issued.provider_secret):
        assert s not in text


def filter_server(servicer: pb_grpc.ExternalProcessorServicer, tmp_path: Path) -> grpc.Server:
    """A stand-in filter at unix:tmp_path/filter.sock that reports itself healthy, as a ready
    worker does (Envoy sends nothing to one that is not)."""
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    server.add_insecure_port(f"unix:{tmp_path}/filter.sock")
    server.start()
    return server


class HalfFilter(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Lets the request headers through with the provider key and a route, then hangs up."""

    def __init__(self, route: str, secret: str) -> None:
        self.route, self.secret = route, secret

    def Process(
        self, requests: Iterator[pb.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[object]:
        for req in requests:
            if not req.HasField("request_headers"):
                return  # the response phase: the stream ends unanswered
            headers = [
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
                for k, v in (("authorization", f"Bearer {self.secret}"), (UPSTREAM_HEADER, self.route))
            ]
            yield pb.ProcessingResponse(
                request_headers=pb.HeadersResponse(
                    response=pb.CommonResponse(
                        header_mutation=pb.HeaderMutation(set_headers=headers), clear_route_cache=True
                    )
                )
            )


def test_a_request_the_filter_dropped_midway_is_logged_and_flagged(
    tmp_path: Path, stack: Stack, fake: FakeProvider
) -> None:
    issued = issue_key(stack, "openai", fake.base_url)
    server = filter_server(HalfFilter(upstream_for(fake.base_url).cluster, issued.provider_secret), tmp_path)
    sock = f"unix:{tmp_path}/filter.sock"
    envoy = DeadFilterEnvoy(tmp_path, fake, breakglass_secret(), endpoint=sock)
    try:
        before = len(fake.requests)
        client = openai.OpenAI(base_url=envoy.url + "/v1", api_key=issued.key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="fake-openai-model", messages=MESSAGES)
        assert REQUEST_ID_HEADER not in raw.headers
        (req,) = fake.requests[before:]
        assert auth_of(req) == issued.provider_secret  # the filter's key swap went through
    finally:
        envoy.stop()
        server.stop(0)
    (entry,) = [json.loads(x) for x in envoy.log.read_text().splitlines()]
    assert entry["route"] == "spendgate_routed" and entry["status"] == 200
    assert entry["key_prefix_authorization"] == wrapped_keys.visible_prefix(issued.key)
    stack.cli("failopen", "import", "--log", str(envoy.log), "--policies", str(REPO / "policies"))
    (row,) = fail_open_rows(stack, issued)
    assert row["flags"] == [failopen.FLAG, failopen.MIDSTREAM_FLAG] and row["provider"] == "openai"


class FailsAtTheBody(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Answers the request headers as Spendgate does for an accounted API (the wrapped key
    removed, the body asked for, no credential or route yet), then dies before the body reply."""

    def Process(
        self, requests: Iterator[pb.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[object]:
        for req in requests:
            if not req.HasField("request_headers"):
                context.abort(grpc.StatusCode.INTERNAL, "the filter broke")
            yield msg.request_headers(
                Reply(remove_headers=list(CREDENTIAL_HEADERS), clear_route_cache=True, request_body_mode="BUFFERED")
            )


def test_a_filter_failing_at_the_body_phase_under_fail_open_forwards_nothing(
    tmp_path: Path, stack: Stack, fake: FakeProvider
) -> None:
    issued = issue_key(stack, "openai", fake.base_url)
    server = filter_server(FailsAtTheBody(), tmp_path)
    envoy = DeadFilterEnvoy(tmp_path, fake, breakglass_secret(), endpoint=f"unix:{tmp_path}/filter.sock")
    try:
        before = len(fake.requests)
        client = openai.OpenAI(base_url=envoy.url + "/v1", api_key=issued.key, max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="fake-openai-model", messages=MESSAGES)
        assert caught.value.status_code == 503
        assert fake.requests[before:] == []
    finally:
        envoy.stop()
        server.stop(0)
