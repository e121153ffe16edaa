"""Running wrk and reading its latency distribution."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


@dataclass
class Result:
    """One wrk run."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def ensure_wrk() -> str:
    """wrk from Debian's package; installed on first use when apt is there."""
    found = shutil.which("wrk")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("bench needs wrk: apt-get install wrk")
    return found


def script(path: Path, body: str, headers: dict[str, str]) -> Path:
    """A wrk Lua script that POSTs `body` with `headers` and counts non-2xx answers."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body)}"]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not m:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run(url: str, lua: Path, connections: int, seconds: int) -> Result:
    """Run wrk with its latency distribution and parse the result."""
    threads = 1 if connections == 1 else 2
    out = subprocess.run(
        [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(lua), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    pct = dict(re.findall(r"^\s+(\d+)%\s+(\S+)$", out, re.M))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    return Result(rps, _ms(pct["50"]), _ms(pct["99"]), total, errors)


def merge(runs: list[Result]) -> Result:
    """Windows of one target as one result: throughput over their total time, latency percentiles
    averaged (an approximation; wrk reports no histogram to combine)."""
    seconds = sum(r.requests / r.rps for r in runs)
    n = len(runs)
    return Result(
        sum(r.requests for r in runs) / seconds,
        sum(r.p50_ms for r in runs) / n,
        sum(r.p99_ms for r in runs) / n,
        sum(r.requests for r in runs),
        sum(r.errors for r in runs),
    )
