"""The filter fails closed: without its answer no request reaches a provider, wrapped key or not."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import certifi
import grpc
import httpx
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from extproc import envoy_config
from extproc.exchange import UPSTREAM_HEADER
from extproc.stack import envoy_binary
from extproc.upstreams import upstream_for
from tests.fakeprovider import FakeProvider
from tests.support import free_port

WRAPPED_LOOKING = "sg-" + "7" * 43


class SilentFilter(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Closes every stream without answering a single phase."""

    def Process(self, request_iterator: Iterator[object], context: grpc.ServicerContext) -> Iterator[object]:
        return iter(())


def run_envoy(tmp_path: Path, fake: FakeProvider, endpoint: str) -> tuple[subprocess.Popen[bytes], int]:
    port, admin = free_port(), free_port()
    cfg = envoy_config.bootstrap(
        envoy_config.BootstrapOptions(
            endpoints=[envoy_config.Endpoint(endpoint)],
            ca_file=certifi.where(),
            port=port,
            admin_port=admin,
            upstreams=[upstream_for(fake.base_url)],
        )
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [envoy_binary(), "-c", str(path), "--concurrency", "1", "--base-id", str(admin)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{admin}/ready").status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("envoy did not start")


def attempt(port: int, fake: FakeProvider) -> httpx.Response:
    """A request that tries everything: a wrapped-looking key and a forged route header."""
    cluster = upstream_for(fake.base_url).cluster
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": "m", "messages": []},
        headers={"authorization": f"Bearer {WRAPPED_LOOKING}", UPSTREAM_HEADER: cluster},
    )


@pytest.fixture
def silent_filter(tmp_path: Path) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_ExternalProcessorServicer_to_server(SilentFilter(), server)
    # It reports itself healthy, as a ready worker does: Envoy sends no request to one that is not.
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    sock = f"unix:{tmp_path}/silent.sock"
    server.add_insecure_port(sock)
    server.start()
    yield sock
    server.stop(0)


def test_unreachable_filter_answers_503_and_forwards_nothing(tmp_path: Path, fake: FakeProvider) -> None:
    proc, port = run_envoy(tmp_path, fake, f"unix:{tmp_path}/nobody-listens.sock")
    try:
        before = len(fake.requests)
        r = attempt(port, fake)
        assert r.status_code == 503
        assert len(fake.requests) == before
    finally:
        proc.terminate()
        proc.wait()


def test_filter_closing_its_stream_unanswered_forwards_nothing(
    tmp_path: Path, fake: FakeProvider, silent_filter: str
) -> None:
    proc, port = run_envoy(tmp_path, fake, silent_filter)
    try:
        before = len(fake.requests)
        r = attempt(port, fake)
        assert r.status_code == 503 and r.json()["error"]["code"] == "spendgate_unavailable"
        assert len(fake.requests) == before
    finally:
        proc.terminate()
        proc.wait()
