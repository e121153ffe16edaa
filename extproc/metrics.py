"""Prometheus metrics of one extproc process, served as text on a small HTTP endpoint.

Labels never carry key material or key ids: outcome, status and provider only.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterable

import structlog

log = structlog.get_logger("spendgate.metrics")

Sample = tuple[str, str, dict[str, str], float]  # name, type, labels, value
_HELP = {
    "spendgate_requests_total": "Requests finalised, by outcome and HTTP status.",
    "spendgate_unauthenticated_total": "Requests refused for a missing, unknown, revoked or expired wrapped key.",
}


class Metrics:
    """Counters incremented on the request path, plus gauges read from components when scraped."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._collectors: list[Callable[[], Iterable[Sample]]] = []

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add to a counter."""
        self._counters[(name, tuple(sorted(labels.items())))] += value

    def collect(self, collector: Callable[[], Iterable[Sample]]) -> None:
        """Register a function that reports samples at scrape time."""
        self._collectors.append(collector)

    def render(self) -> str:
        """The Prometheus text exposition format."""
        samples: list[Sample] = [(n, "counter", dict(lbl), v) for (n, lbl), v in self._counters.items()]
        for c in self._collectors:
            samples.extend(c())
        lines: list[str] = []
        seen: set[str] = set()
        for name, kind, labels, value in sorted(samples, key=lambda s: (s[0], sorted(s[2].items()))):
            if name not in seen:
                seen.add(name)
                if name in _HELP:
                    lines.append(f"# HELP {name} {_HELP[name]}")
                lines.append(f"# TYPE {name} {kind}")
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def serve(metrics: Metrics, host: str, port: int) -> asyncio.Server:
    """Answer every HTTP request on (host, port) with the current metrics."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = metrics.render().encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n"
                + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics.listening", host=host, port=port)
    return server
