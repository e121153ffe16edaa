"""`python -m bench`: plain Envoy, the ext_proc floor and the full Spendgate path, in one run.

All three targets proxy to the same in-memory upstream (bench/upstream.py):
- envoy: Envoy with no filter;
- floor: Envoy with a do-nothing ext_proc server answering the same phases (bench/noop_filter.py);
- spendgate: `spendgate up`, a usage record per request, with a key no policy binds;
- policies: the same stack with a key bound by a policy with every kind of rule (model rules,
  aliases, transforms, a budget reserved in Postgres per request, rate limits).
For JSON and SSE answers at concurrency 1 and 32 it prints requests per second, the latency
each filtered target adds over plain Envoy (p50, p99) and its throughput ratio, and checks that
every Spendgate request left a usage record. The two Spendgate targets are measured in
alternating windows (see SCHEDULE) so that the policy ratio is not skewed by drift.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import certifi
import httpx
import psycopg
import yaml

from bench import upstream, wrk
from extproc import envoy_config
from extproc.pricing import SHIPPED_PRICES
from extproc.stack import envoy_binary
from extproc.upstreams import upstream_for
from tests.support import Stack, free_port, issue_key, scratch_database, start_stack

BODY = json.dumps(
    {"model": upstream.MODEL, "messages": [{"role": "user", "content": "Say hello to the benchmark."}]}
)
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True})
POLICY_TEAM = "bench-governed"
# Every kind of rule on the request path: a model rule, an alias table, transforms, a budget
# reserved in Postgres per request, and rate limits; set high enough never to refuse.
BENCH_POLICY = f"""
policies:
  - name: bench
    applies_to: {{team: {POLICY_TEAM}}}
    models: {{allow: ["fake-*"], deny: ["*-preview"]}}
    aliases: {{fast: {upstream.MODEL}}}
    transforms: {{max_tokens: 256, tags: {{bench: "yes"}}}}
    budgets:
      - {{period: day, limit_usd: "1000000", per: key}}
    rate_limits:
      - {{per: key, requests_per_minute: 100000000, tokens_per_minute: 1000000000}}
"""
ENVOY_CONCURRENCY = os.environ.get("BENCH_ENVOY_CONCURRENCY", "1")
# The order of the measured windows. The two Spendgate targets, whose ratio is the policy bar,
# take turns in short A-B-B-A windows, so that a drift or a slow spell of the machine (this VM
# has plenty) weighs on both alike instead of on whichever ran at the time.
SCHEDULE = ("envoy", "floor", *("spendgate", "policies", "policies", "spendgate") * 2)


@contextlib.contextmanager
def envoy(config: dict[str, Any], workdir: Path, name: str) -> Iterator[None]:
    """An Envoy of the benchmark's own, ready when the block starts."""
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    admin = config["admin"]["address"]["socket_address"]["port_value"]
    proc = subprocess.Popen(
        [
            envoy_binary(),
            "-c",
            str(path),
            "--concurrency",
            ENVOY_CONCURRENCY,
            "--base-id",
            str(admin),
            "--log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{admin}/ready").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} envoy did not start")
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def floor(workdir: Path, upstream_port: int) -> Iterator[int]:
    """Envoy with Spendgate's filter config pointed at the do-nothing ext_proc server."""
    target = upstream_for(f"http://127.0.0.1:{upstream_port}")
    sock = f"unix:{workdir}/noop.sock"
    proc = subprocess.Popen([sys.executable, "-m", "bench.noop_filter", sock, target.cluster])
    port = free_port()
    cfg = envoy_config.bootstrap(
        envoy_config.BootstrapOptions(
            endpoints=[envoy_config.Endpoint(sock)],
            ca_file=certifi.where(),
            port=port,
            admin_port=free_port(),
            upstreams=[target],
        )
    )
    try:
        while not Path(sock[5:]).exists():
            time.sleep(0.05)
        with envoy(cfg, workdir, "floor"):
            yield port
    finally:
        proc.terminate()
        proc.wait()


def records_of(stack: Stack, key_id: object, at_least: int) -> int:
    """Usage records of the bench key, waiting for the writer to catch up."""
    deadline = time.monotonic() + 30
    n = 0
    while time.monotonic() < deadline:
        with psycopg.connect(stack.dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM usage_events WHERE key_id = %s AND NOT tags ? 'probe'", (key_id,)
            ).fetchone()
        n = row[0] if row else 0
        if n >= at_least:
            break
        time.sleep(0.5)
    return n


def main() -> None:
    """Run the benchmark and print the comparison."""
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--seconds",
        type=int,
        default=12,
        help="measured seconds per target (default 12; the two Spendgate targets in four windows each)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="extproc processes in the Spendgate stack (default: cores/2, as spendgate up)",
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    wrk.ensure_wrk()

    results: list[dict[str, Any]] = []
    measured = 0
    with tempfile.TemporaryDirectory(prefix="spendgate-bench-") as tmp, scratch_database() as dsn:
        work = Path(tmp)
        up_port, base_port = free_port(), free_port()
        with (
            envoy(upstream.bootstrap(up_port, free_port()), work, "upstream"),
            envoy(upstream.plain_proxy(base_port, free_port(), up_port), work, "baseline"),
            floor(work, up_port) as floor_port,
        ):
            stack = start_stack(dsn, work, "--workers", str(args.workers), policies=bench_policies(work))
            try:
                plain = issue_key(stack, "openai", f"http://127.0.0.1:{up_port}")
                governed = issue_key(stack, "openai", f"http://127.0.0.1:{up_port}", team=POLICY_TEAM)
                targets = {
                    "envoy": (base_port, plain.key),
                    "floor": (floor_port, plain.key),
                    "spendgate": (stack.port, plain.key),
                    "policies": (stack.port, governed.key),
                }
                for mode, body, extra in (
                    ("json", BODY, {}),
                    ("stream", STREAM_BODY, {upstream.STREAM_HEADER: "1"}),
                ):
                    for conns in (1, 32):
                        runs: dict[str, list[wrk.Result]] = {name: [] for name in targets}
                        calls = {}
                        for name, (port, key) in targets.items():
                            headers = {
                                "content-type": "application/json",
                                "authorization": f"Bearer {key}",
                                **extra,
                            }
                            lua = wrk.script(work / f"{name}-{mode}.lua", body, headers)
                            url = f"http://127.0.0.1:{port}/v1/chat/completions"
                            calls[name] = (url, lua)
                            wrk.run(url, lua, conns, 2)  # warm-up
                        for name in SCHEDULE:
                            url, lua = calls[name]
                            windows = SCHEDULE.count(name)
                            runs[name].append(wrk.run(url, lua, conns, max(1, args.seconds // windows)))
                        row: dict[str, Any] = {"mode": mode, "connections": conns}
                        row.update({name: wrk.merge(r).__dict__ for name, r in runs.items()})
                        measured += row["spendgate"]["requests"]
                        results.append(row)
                        print(_progress(row), flush=True)
                written = records_of(stack, plain.key_id, measured)
            finally:
                stack.stop()
    print()
    print(_table(results))
    print(
        f"\nusage records for the plain Spendgate key: {written} (measured requests: {measured}; warm-ups are "
        "recorded too)"
    )
    if args.json:
        print(json.dumps(results, indent=2))


def bench_policies(work: Path) -> Path:
    """The shipped prices plus a policy with every kind of rule, none of which ever refuses."""
    d = work / "policies"
    d.mkdir()
    shutil.copy(SHIPPED_PRICES, d / "pricing.yaml")
    (d / "bench.yaml").write_text(BENCH_POLICY)
    return d


def _progress(row: dict[str, Any]) -> str:
    parts = [f"{row['mode']:6} c={row['connections']:<3}"]
    parts += [
        f"{name} {row[name]['rps']:7.0f} rps p50 {row[name]['p50_ms']:6.2f} ms errors {row[name]['errors']}"
        for name in ("envoy", "floor", "spendgate", "policies")
    ]
    return " | ".join(parts)


def _table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'mode':6} {'conns':>5} {'envoy rps':>9} {'floor rps':>9} {'sg rps':>7} {'sg+pol rps':>10} "
        f"{'sg/envoy':>8} {'sg/floor':>8} {'pol/sg':>6} {'sg +p50 ms':>10} {'sg +p99 ms':>10} {'pol +p50 ms':>11} "
        f"{'floor +p50':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        e, f, s, p = r["envoy"], r["floor"], r["spendgate"], r["policies"]
        lines.append(
            f"{r['mode']:6} {r['connections']:>5} {e['rps']:>9.0f} {f['rps']:>9.0f} {s['rps']:>7.0f} {p['rps']:>10.0f} "
            f"{s['rps'] / e['rps']:>8.2f} {s['rps'] / f['rps']:>8.2f} {p['rps'] / s['rps']:>6.2f} "
            f"{s['p50_ms'] - e['p50_ms']:>10.2f} {s['p99_ms'] - e['p99_ms']:>10.2f} {p['p50_ms'] - e['p50_ms']:>11.2f} "
            f"{f['p50_ms'] - e['p50_ms']:>10.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
