"""`spendgate probe`: a synthetic request through the whole path, as a health signal.

Each probe lists the models of the provider behind a wrapped key (a free call on every provider)
through Envoy, the filter and the upstream. It is healthy when the provider answered 200 and the
filter saw the answer (it adds `x-spendgate-request-id`): a request served by a fail-open route
answers 200 without that header, and counts as unhealthy (the filter is down).

Results go to stdout (one JSON object per probe), to Prometheus text (on a port, or a textfile
for node_exporter's textfile collector) and to the exit status of a one-shot run.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from extproc.exchange import REQUEST_ID_HEADER, TAGS_HEADER

# The free model listing of each provider.
PATHS = {"openai": "/v1/models", "anthropic": "/v1/models", "gemini": "/v1beta/models"}


def _headers(provider: str, key: str) -> dict[str, str]:
    if provider == "anthropic":
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    if provider == "gemini":
        return {"x-goog-api-key": key}
    return {"authorization": f"Bearer {key}"}


@dataclass(frozen=True)
class Result:
    """One probe."""

    ok: bool
    filtered: bool  # the filter saw the response
    status: int  # 0: no HTTP answer
    seconds: float
    error: str
    at: float  # unix time

    def as_dict(self) -> dict[str, object]:
        """For the JSON line on stdout."""
        return {
            "ok": self.ok,
            "filtered": self.filtered,
            "status": self.status,
            "seconds": round(self.seconds, 4),
            "error": self.error,
            "at": round(self.at, 3),
        }


def probe_once(url: str, key: str, provider: str = "openai", timeout: float = 10.0) -> Result:
    """Send one probe through the proxy at `url`; never raises."""
    start, at = time.monotonic(), time.time()
    try:
        r = httpx.get(
            url.rstrip("/") + PATHS[provider],
            headers={**_headers(provider, key), TAGS_HEADER: "probe=1"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        return Result(False, False, 0, time.monotonic() - start, type(exc).__name__, at)
    filtered = REQUEST_ID_HEADER in r.headers
    ok = r.status_code == 200 and filtered
    error = (
        ""
        if ok
        else ("not seen by the filter (fail-open?)" if r.status_code == 200 else f"HTTP {r.status_code}")
    )
    return Result(ok, filtered, r.status_code, time.monotonic() - start, error, at)


class Metrics:
    """Prometheus text of the probe results so far."""

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self._lock = threading.Lock()
        self._last: Result | None = None
        self._last_ok = 0.0
        self._runs = 0
        self._failures = 0

    def record(self, result: Result) -> None:
        """Count one probe."""
        with self._lock:
            self._last = result
            self._runs += 1
            if result.ok:
                self._last_ok = result.at
            else:
                self._failures += 1

    def text(self) -> str:
        """The exposition format."""
        label = f'{{provider="{self._provider}"}}'
        with self._lock:
            last = self._last
            lines = [
                ("spendgate_probe_success", "gauge", "1 if the last probe passed through the filter with a 200", int(bool(last and last.ok))),
                ("spendgate_probe_filtered", "gauge", "1 if the filter saw the last probe's response", int(bool(last and last.filtered))),
                ("spendgate_probe_status_code", "gauge", "HTTP status of the last probe (0: no answer)", last.status if last else 0),
                ("spendgate_probe_duration_seconds", "gauge", "Duration of the last probe", round(last.seconds, 6) if last else 0),
                ("spendgate_probe_last_success_timestamp_seconds", "gauge", "Unix time of the last passing probe", round(self._last_ok, 3)),
                ("spendgate_probe_runs_total", "counter", "Probes sent", self._runs),
                ("spendgate_probe_failures_total", "counter", "Probes that did not pass", self._failures),
            ]  # fmt: skip
        out = []
        for name, kind, help_text, value in lines:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{label} {value}"]
        return "\n".join(out) + "\n"

    def write_textfile(self, path: Path) -> None:
        """Replace `path` atomically (the textfile collector must never read half a file)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.text())
        os.replace(tmp, path)

    def serve(self, host: str, port: int) -> http.server.ThreadingHTTPServer:
        """Serve /metrics on a background thread."""
        metrics = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = metrics.text().encode()
                self.send_response(200 if self.path.startswith("/metrics") else 404)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=server.serve_forever, name="probe-metrics", daemon=True).start()
        return server


def run(
    url: str,
    key: str,
    *,
    provider: str = "openai",
    every: float | None = None,
    timeout: float = 10.0,
    textfile: Path | None = None,
    listen: tuple[str, int] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Probe once (exit status 0 if it passed, 1 if not), or every `every` seconds until `stop`."""
    metrics = Metrics(provider)
    server = metrics.serve(*listen) if listen else None
    stop = stop or threading.Event()
    try:
        while True:
            result = probe_once(url, key, provider, timeout)
            metrics.record(result)
            print(json.dumps(result.as_dict()), flush=True)
            if textfile:
                metrics.write_textfile(textfile)
            if every is None or stop.wait(every):
                return 0 if result.ok else 1
    finally:
        if server is not None:
            server.shutdown()
