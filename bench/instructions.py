"""`python -m bench.instructions`: what policies cost extproc per request, counted, not timed.

Throughput on this VM drifts by about as much as the policy path costs, so this benchmark
counts CPU instructions with callgrind instead: the same figure for the same code on any run.
Each target runs Spendgate's real ext_proc servicer in one process, fed the protobuf messages
Envoy sends for a JSON chat completion (request headers, body, response headers, body), with the
real key table, policy files, rate limiter and budget store (leasing in Postgres); only the gRPC
transport, which both targets share, is left out. A target is run twice under callgrind, with
and without the measured requests after the same warm-up, and the difference is divided by
the number of requests, so that start-up and first-use costs cancel out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from bench import upstream
from bench.__main__ import BODY, POLICY_TEAM, bench_policies
from extproc import tokens, wrapped_keys
from extproc.admission import Gatekeeper
from extproc.budget_store import BudgetStore
from extproc.exchange import Exchange, Limits
from extproc.failover import UpstreamAttempt
from extproc.keytable import KeyEntry, KeyTable
from extproc.metrics import Metrics
from extproc.policy.store import PolicyStore
from extproc.ratelimit import LocalLimiter
from extproc.servicer import ExternalProcessor
from extproc.upstreams import upstream_for
from tests.support import migrated_database

TARGETS = {"spendgate": None, "policies": POLICY_TEAM}  # the key's team: none, or the bench policy's
WARM_UP = 300  # past the first budget lease, tiktoken's and fnmatch's first use


def _messages(key: str) -> list[bytes]:
    """What Envoy sends extproc for one JSON chat completion, serialised."""

    def headers(pairs: dict[str, str], end: bool) -> pb.HttpHeaders:
        hv = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
        return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=hv), end_of_stream=end)

    request = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        ":authority": "localhost",
        "content-type": "application/json",
        "content-length": str(len(BODY)),
        "authorization": f"Bearer {key}",
    }
    response = {":status": "200", "content-type": "application/json"}
    return [
        m.SerializeToString()
        for m in (
            pb.ProcessingRequest(request_headers=headers(request, False)),
            pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY.encode(), end_of_stream=True)),
            pb.ProcessingRequest(response_headers=headers(response, False)),
            pb.ProcessingRequest(
                response_body=pb.HttpBody(body=upstream.CHAT_JSON.encode(), end_of_stream=True)
            ),
        )
    ]


class _Context:
    """The one thing the servicer asks of gRPC's context: the stream's metadata."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


async def _stream(messages: list[bytes]) -> AsyncIterator[pb.ProcessingRequest]:
    for m in messages:
        yield pb.ProcessingRequest.FromString(m)


async def _drive(dsn: str, team: str | None, requests: int) -> int:
    """The inner run: WARM_UP requests, then `requests` more, through the real servicer.

    Returns how many of them completed with a 200 and a usage record.
    """
    tokens.warm_up()
    key = wrapped_keys.generate()
    entry = KeyEntry(
        uuid.uuid4(), wrapped_keys.visible_prefix(key), "bench", team, None, None, None, "openai",
        uuid.uuid4(), upstream_for("http://127.0.0.1:9"), "provider-secret",
    )  # fmt: skip
    table = KeyTable()
    table.replace({wrapped_keys.digest(key): entry})
    with tempfile.TemporaryDirectory() as tmp:
        policies = PolicyStore(bench_policies(Path(tmp)))
    budgets = BudgetStore(dsn)
    await budgets.open()
    gatekeeper = Gatekeeper(budgets, LocalLimiter())
    limits = Limits()
    records = []

    def new_exchange() -> Exchange:
        return Exchange(table, policies, records.append, limits, gatekeeper.settle)

    servicer = ExternalProcessor(new_exchange, gatekeeper, Metrics(), lambda: UpstreamAttempt(table))
    messages = _messages(key)
    completed = 0
    for _ in range(WARM_UP + requests):
        async for resp in servicer.Process(_stream(messages), _Context()):  # type: ignore[arg-type]
            resp.SerializeToString()
        completed += sum(1 for r in records if r.status == 200)
        records.clear()
    await budgets._pool.close()  # no hand-back: its Postgres round trip is not per request
    return completed


def _count(dsn: str, team: str | None, requests: int) -> int:
    """Instructions callgrind counted for one inner run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
                sys.executable, "-m", "bench.instructions", "--inner", dsn, team or "", str(requests),
            ],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )  # fmt: skip
    found = re.search(r"Collected : (\d+)", out.stderr)
    if not found:
        raise RuntimeError("callgrind printed no total:\n" + out.stderr[-2000:])
    return int(found.group(1))


def _per_request(dsn: str, team: str | None, requests: int) -> float:
    return (_count(dsn, team, requests) - _count(dsn, team, 0)) / requests


def main() -> None:
    """Count both targets and print the comparison."""
    if len(sys.argv) == 5 and sys.argv[1] == "--inner":
        asyncio.run(_drive(sys.argv[2], sys.argv[3] or None, int(sys.argv[4])))
        return
    ap = argparse.ArgumentParser(
        prog="python -m bench.instructions", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ap.add_argument("--requests", type=int, default=1000, help="measured requests per target (default 1000)")
    args = ap.parse_args()
    with migrated_database() as dsn:
        counted = {name: _per_request(dsn, team, args.requests) for name, team in TARGETS.items()}
    base, pol = counted["spendgate"], counted["policies"]
    print(f"extproc instructions per JSON chat completion (callgrind, {args.requests} requests)")
    print(f"  spendgate  {base:>12,.0f}")
    print(f"  policies   {pol:>12,.0f}   +{pol - base:,.0f} ({pol / base:.2f}x)")


if __name__ == "__main__":
    main()
