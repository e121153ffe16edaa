"""`spendgate probe` against a tiny local HTTP server standing in for the proxy."""

from __future__ import annotations

import http.server
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc import probe
from tests.support import free_port


class Proxy(http.server.BaseHTTPRequestHandler):
    status = 200
    filtered = True
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        Proxy.seen.append(dict(self.headers))
        self.send_response(Proxy.status)
        if Proxy.filtered:
            self.send_header("x-spendgate-request-id", "r1")
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[str]:
    Proxy.status, Proxy.filtered, Proxy.seen = 200, True, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_one_shot_passes_and_tags_itself(proxy: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert probe.run(proxy, "sg-key") == 0
    assert (
        Proxy.seen[0]["authorization"] == "Bearer sg-key" and Proxy.seen[0]["x-spendgate-tags"] == "probe=1"
    )
    out = capsys.readouterr().out
    assert '"ok": true' in out and "sg-key" not in out


def test_a_200_the_filter_never_saw_is_a_failure(proxy: str) -> None:
    Proxy.filtered = False  # what a fail-open route answers
    result = probe.probe_once(proxy, "k")
    assert not result.ok and result.status == 200 and "fail-open" in result.error
    assert probe.run(proxy, "k") == 1


def test_errors_and_no_answer_fail(proxy: str) -> None:
    Proxy.status = 503
    assert probe.probe_once(proxy, "k").status == 503
    result = probe.probe_once(f"http://127.0.0.1:{free_port()}", "k", timeout=2)
    assert not result.ok and result.status == 0 and result.error


def test_provider_headers(proxy: str) -> None:
    probe.probe_once(proxy, "k", provider="anthropic")
    probe.probe_once(proxy, "k", provider="gemini")
    assert Proxy.seen[0]["x-api-key"] == "k" and Proxy.seen[1]["x-goog-api-key"] == "k"


def test_schedule_writes_a_textfile_and_serves_metrics(proxy: str, tmp_path: Path) -> None:
    stop = threading.Event()
    textfile = tmp_path / "probe.prom"
    port = free_port()
    t = threading.Thread(
        target=probe.run,
        args=(proxy, "k"),
        kwargs={"every": 0.05, "textfile": textfile, "listen": ("127.0.0.1", port), "stop": stop},
    )
    t.start()
    try:
        deadline = threading.Event()
        while len(Proxy.seen) < 3 and not deadline.wait(0.05):
            pass
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            served = r.read().decode()
    finally:
        stop.set()
        t.join(5)
    text = textfile.read_text()
    for body in (served, text):
        assert 'spendgate_probe_success{provider="openai"} 1' in body
        assert "# TYPE spendgate_probe_runs_total counter" in body
