"""Soak (issue 7): minutes of mixed traffic, then flat extproc memory and one record per request.

A stack of its own (fresh database, its own extproc workers, so their memory is this test's alone)
in front of the fake provider run as its own process (it records nothing, so it does not grow and
does not take the driver's GIL). A bounded pool of asyncio workers loops until the deadline over a
weighted mix (KINDS): JSON completions and SSE streams through the official async SDKs, upstream
errors (429/500/400), streams and bodies the upstream cuts short, clients that hang up mid-stream,
in-stream provider errors, malformed bodies and unknown keys, on OpenAI, Anthropic and Gemini.

Tracing: every request carries a unique `sid` in `x-spendgate-tags`, so its record is found even
when the client never saw a response header (an upstream that breaks before its headers gets
Envoy's own 502); wherever the client did see `x-spendgate-request-id`, the record must carry it.

Duration: SPENDGATE_SOAK_SECONDS; else 600 s when CI is set, 60 s on a developer's machine.
Concurrency: SPENDGATE_SOAK_CONCURRENCY (default 8). The test ends by itself within about
DURATION + 120 s: every request, the drain, the flush wait and the stop are bounded.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.types import MessageParam
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from openai.types.chat import ChatCompletionMessageParam

from tests.support import Issued, Stack, issue_key, scratch_database, start_stack

pytestmark = pytest.mark.soak


def _duration() -> float:
    raw = os.environ.get("SPENDGATE_SOAK_SECONDS")
    if raw:
        return float(raw)
    return 600.0 if os.environ.get("CI") else 60.0


DURATION = _duration()
CONCURRENCY = int(os.environ.get("SPENDGATE_SOAK_CONCURRENCY", "8"))
# Memory is compared from the end of the warm-up (caches, pools and allocator arenas filled).
WARMUP = min(max(15.0, DURATION / 5), DURATION / 2)
# Seconds between RSS samples (a file read per worker: no load to speak of), about 60 per run.
RSS_EVERY = max(5.0, DURATION / 60)
# Flat means: the end RSS is within 10% of the post-warm-up RSS, but never less than 5 MB of slack:
# a ~100 MB Python process moves by a few MB just from allocator arenas and in-flight buffers
# at the instant of the sample, which is noise, not a leak. Shrinking is never a failure.
RSS_TOLERANCE = 0.10
RSS_FLOOR_KB = 5 * 1024
REQUEST_TIMEOUT = 30.0  # per request, so that no single hung call can stall the test
# Set by the hard-timeout guard (DURATION + 120 s): the stack and the fake are stopped, workers quit.
EXPIRED = threading.Event()
HANGUP_DELAY = "0.05"  # seconds between the fake's stream events when a client is to hang up
MODELS = {"openai": "fake-openai-model", "anthropic": "fake-anthropic-model", "gemini": "fake-gemini-model"}
PROVIDERS = tuple(MODELS)
MESSAGES = [{"role": "user", "content": "soak"}]
OPENAI_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "soak"}]
ANTHROPIC_MESSAGES: list[MessageParam] = [{"role": "user", "content": "soak"}]
REQUEST_ID = "x-spendgate-request-id"
# Log events that mean a request's accounting went wrong, whatever the client saw.
BAD_LOG_EVENTS = ("exchange.failed", "usage.unreadable", "usage.dead_letter", "Traceback")


# -- one request -----------------------------------------------------------------------------
@dataclass
class Trace:
    """One request of the soak: what was asked, what the client saw."""

    kind: str
    provider: str
    sid: str
    want: frozenset[str]  # client-side labels that are correct for this request
    label: str = ""
    request_id: str | None = None
    error: str = ""

    def saw(self, headers: Mapping[str, str] | None) -> None:
        if not headers:
            return
        for name, value in headers.items():
            if name.lower() == REQUEST_ID:
                self.request_id = value


@dataclass
class Ctx:
    """Everything a request needs: the proxy, the keys and one client of each kind."""

    url: str
    run: str
    keys: dict[str, Issued]
    bogus_key: str
    openai: openai.AsyncOpenAI
    anthropic: anthropic.AsyncAnthropic
    gemini: genai.Client
    http: httpx.AsyncClient

    def headers(self, t: Trace, scenario: str | None = None) -> dict[str, str]:
        h = {"x-spendgate-tags": f"soak={self.run},kind={t.kind},sid={t.sid}"}
        if scenario:
            h["x-fake-scenario"] = scenario
            if "slow" in scenario:
                h["x-fake-delay"] = HANGUP_DELAY
        return h

    def wire(self, provider: str, key: str, stream: bool) -> tuple[str, dict[str, str], dict[str, Any]]:
        """Path, auth headers and body of a plain request, as each provider's API takes it."""
        if provider == "openai":
            body = {"model": MODELS["openai"], "messages": MESSAGES, "stream": stream}
            return "/v1/chat/completions", {"authorization": f"Bearer {key}"}, body
        if provider == "anthropic":
            body = {"model": MODELS["anthropic"], "max_tokens": 64, "messages": MESSAGES, "stream": stream}
            return "/v1/messages", {"x-api-key": key, "anthropic-version": "2023-06-01"}, body
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        body = {"contents": [{"role": "user", "parts": [{"text": "soak"}]}]}
        return f"/v1beta/models/{MODELS['gemini']}:{method}", {"x-goog-api-key": key}, body


async def sdk_json(ctx: Ctx, t: Trace, scenario: str | None = None) -> str:
    """A whole answer through the provider's own SDK."""
    h = ctx.headers(t, scenario)
    if t.provider == "openai":
        raw = await ctx.openai.chat.completions.with_raw_response.create(
            model=MODELS["openai"], messages=OPENAI_MESSAGES, extra_headers=h
        )
        t.saw(raw.headers)
        assert raw.parse().choices
    elif t.provider == "anthropic":
        araw = await ctx.anthropic.messages.with_raw_response.create(
            model=MODELS["anthropic"], max_tokens=64, messages=ANTHROPIC_MESSAGES, extra_headers=h
        )
        t.saw(araw.headers)
        assert (await araw.parse()).content
    else:
        resp = await ctx.gemini.aio.models.generate_content(
            model=MODELS["gemini"],
            contents="soak",
            config=genai_types.GenerateContentConfig(http_options=genai_types.HttpOptions(headers=h)),
        )
        t.saw(resp.sdk_http_response.headers if resp.sdk_http_response else None)
        assert resp.text
    return "ok"


async def sdk_stream(ctx: Ctx, t: Trace, scenario: str | None = None, hangup_after: int = 0) -> str:
    """A streamed answer through the SDK, read to the end or until the client hangs up."""
    h = ctx.headers(t, scenario)
    n = 0
    if t.provider == "openai":
        ostream = await ctx.openai.chat.completions.create(
            model=MODELS["openai"], messages=OPENAI_MESSAGES, stream=True, extra_headers=h
        )
        assert isinstance(ostream, openai.AsyncStream)
        t.saw(ostream.response.headers)
        async for _ in ostream:
            n += 1
            if hangup_after and n >= hangup_after:
                await ostream.close()
                return "hangup"
        return "ok"
    if t.provider == "anthropic":
        astream = await ctx.anthropic.messages.create(
            model=MODELS["anthropic"],
            max_tokens=64,
            messages=ANTHROPIC_MESSAGES,
            stream=True,
            extra_headers=h,
        )
        assert isinstance(astream, anthropic.AsyncStream)
        t.saw(astream.response.headers)
        async for _ in astream:
            n += 1
            if hangup_after and n >= hangup_after:
                await astream.close()
                return "hangup"
        return "ok"
    assert not hangup_after, "Gemini hang-ups go through httpx, where closing is explicit"
    chunks = await ctx.gemini.aio.models.generate_content_stream(
        model=MODELS["gemini"],
        contents="soak",
        config=genai_types.GenerateContentConfig(http_options=genai_types.HttpOptions(headers=h)),
    )
    async for chunk in chunks:
        t.saw(chunk.sdk_http_response.headers if chunk.sdk_http_response else None)
    return "ok"


async def raw(
    ctx: Ctx,
    t: Trace,
    *,
    stream: bool,
    scenario: str | None = None,
    hangup_after: int = 0,
    body: bytes | None = None,
    key: str | None = None,
) -> str:
    """A request on the wire, for what the SDKs hide: bad bodies, bad keys, exact hang-ups."""
    path, headers, payload = ctx.wire(t.provider, key or ctx.keys[t.provider].key, stream)
    headers = {**headers, **ctx.headers(t, scenario), "content-type": "application/json"}
    content = json.dumps(payload).encode() if body is None else body
    n = 0
    async with ctx.http.stream("POST", ctx.url + path, headers=headers, content=content) as r:
        t.saw(r.headers)
        if r.status_code != 200:
            await r.aread()
            return f"http-{r.status_code}"
        async for _ in r.aiter_raw():
            n += 1
            if hangup_after and n >= hangup_after:
                return "hangup"  # leaving the block before the end closes the connection
    return "ok"


# -- the mix ---------------------------------------------------------------------------------
Call = Callable[[Ctx, Trace, random.Random], Awaitable[str]]


@dataclass(frozen=True)
class Kind:
    name: str
    weight: int
    call: Call
    want: frozenset[str]  # client-side labels that are correct (upstream_error narrows it per request)
    outcomes: frozenset[str] | None  # usage_events.outcome its record may have; None: any
    billed: bool = True  # False: no record by design (no valid key)


async def _json(ctx: Ctx, t: Trace, rng: random.Random) -> str:
    return await sdk_json(ctx, t)


async def _stream(ctx: Ctx, t: Trace, rng: random.Random) -> str:
    return await sdk_stream(ctx, t)


async def _upstream_error(ctx: Ctx, t: Trace, rng: random.Random) -> str:
    status = rng.choice((429, 500, 400))
    t.want = frozenset({f"http-{status}"})
    scenario = f"error-{status}"
    return await (sdk_stream(ctx, t, scenario) if rng.random() < 0.5 else sdk_json(ctx, t, scenario))


async def _cut_stream(ctx: Ctx, t: Trace, rng: random.Random) -> str:
    if t.provider == "gemini":
        return await raw(ctx, t, stream=True, scenario="cut")
    return await sdk_stream(ctx, t, "cut")


async def _cut_json(ctx: Ctx, t: Trace, rng: random.Random) -> str:
    return await raw(ctx, t, stream=False, scenario="cut")


async def _stream_error(ctx: Ctx, t: Trace, rng: random.Random) -> str:
    return await raw(ctx, t, stream=True, scenario="stream-error")


async def _hangup(ctx: Ctx, t: Trace, rng: random.Random) -> str:
    if t.provider == "gemini":
        return await raw(ctx, t, stream=True, scenario="slow", hangup_after=2)
    return await sdk_stream(ctx, t, "slow", hangup_after=2)


async def _malformed(ctx: Ctx, t: Trace, rng: random.Random) -> str:
    return await raw(ctx, t, stream=False, body=b'{"model": ')


async def _unknown_key(ctx: Ctx, t: Trace, rng: random.Random) -> str:
    return await raw(ctx, t, stream=False, key=ctx.bogus_key)


def _labels(*names: str) -> frozenset[str]:
    return frozenset(names)


KINDS = (
    Kind("json", 22, _json, _labels("ok"), _labels("complete")),
    Kind("stream", 22, _stream, _labels("ok"), _labels("complete")),
    Kind("upstream_error", 14, _upstream_error, _labels(), _labels("upstream_error")),
    # The client saw the headers, then the connection broke.
    Kind("cut_stream", 8, _cut_stream, _labels("broken"), _labels("incomplete")),
    # Envoy buffers a JSON answer for the filter, so a body cut short becomes Envoy's own 502.
    Kind("cut_json", 4, _cut_json, _labels("http-502"), _labels("incomplete")),
    # A provider error inside a 200 stream: one record, whatever outcome it is given.
    Kind("stream_error", 6, _stream_error, _labels("ok"), _labels("upstream_error")),
    # A hang-up that reaches Envoy after the provider's end event is a delivered answer: complete.
    Kind("hangup", 12, _hangup, _labels("hangup"), _labels("incomplete", "client_disconnect", "complete")),
    Kind("malformed", 8, _malformed, _labels("http-400"), _labels("rejected")),
    Kind("unknown_key", 4, _unknown_key, _labels("http-401"), None, billed=False),
)
BY_NAME = {k.name: k for k in KINDS}
# Client-visible answers Envoy makes up itself: no filter reply, so no request id header.
ENVOY_LOCAL = {"http-502", "http-503", "http-504", "timeout"}


def _status_error(exc: BaseException) -> tuple[int, Mapping[str, str] | None] | None:
    """Status and headers of an SDK's HTTP error, None for anything else."""
    if isinstance(exc, (openai.APIStatusError, anthropic.APIStatusError)):
        return exc.status_code, exc.response.headers
    if isinstance(exc, genai_errors.APIError):
        resp = getattr(exc, "response", None)
        return exc.code, getattr(resp, "headers", None)
    return None


async def one_request(ctx: Ctx, kind: Kind, t: Trace, rng: random.Random) -> None:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            t.label = await kind.call(ctx, t, rng)
    except TimeoutError:
        t.label = "timeout"
    except Exception as exc:
        se = _status_error(exc)
        if se is not None:
            t.label = f"http-{se[0]}"
            t.saw(se[1])
        else:
            t.label = "broken"
        t.error = f"{type(exc).__name__}: {exc}"[:300]


# -- the stack and its processes ------------------------------------------------------------
def start_fake() -> tuple[subprocess.Popen[str], str]:
    """`python -m tests.fakeprovider` in a process of its own; its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakeprovider"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    if not ready:
        proc.kill()
        raise RuntimeError("fake provider did not start within 30 s")
    return proc, proc.stdout.readline().strip()


def extproc_workers(stack: Stack) -> list[int]:
    """Pids of the `python -m extproc serve` descendants of this stack's `spendgate up` (from /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                # The fields after the parenthesised command name: state, ppid, ...
                parent[int(d.name)] = int((d / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    mine, grew = {stack.proc.pid}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in mine} - mine
        mine |= more
        grew = bool(more)
    pids = []
    for pid in mine - {stack.proc.pid}:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"extproc" in cmd and b"serve" in cmd:
            pids.append(pid)
    return sorted(pids)


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in kB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Run:
    traces: list[Trace] = field(default_factory=list)
    rss: list[tuple[float, dict[int, int]]] = field(default_factory=list)  # (seconds into the load, kB)
    baseline: dict[int, int] = field(default_factory=dict)
    end: dict[int, int] = field(default_factory=dict)
    stuck: int = 0  # workers still busy after the drain, cancelled
    seconds: float = 0.0


async def drive(ctx: Ctx, pids: list[int], seed: str) -> Run:
    """CONCURRENCY workers until DURATION is up; RSS sampled along the way."""
    run = Run()
    t0 = time.monotonic()
    stop_at = t0 + DURATION

    async def worker(i: int) -> None:
        rng = random.Random(f"{seed}-{i}")
        weights = [k.weight for k in KINDS]
        n = 0
        while time.monotonic() < stop_at and not EXPIRED.is_set():
            kind = rng.choices(KINDS, weights)[0]
            t = Trace(kind.name, rng.choice(PROVIDERS), f"{i}-{n}", kind.want)
            n += 1
            run.traces.append(t)
            await one_request(ctx, kind, t, rng)

    tasks = [asyncio.create_task(worker(i)) for i in range(CONCURRENCY)]
    while (left := stop_at - time.monotonic()) > 0 and not EXPIRED.is_set():
        await asyncio.sleep(min(RSS_EVERY, left))
        elapsed = time.monotonic() - t0
        sample = {pid: rss_kb(pid) for pid in pids}
        run.rss.append((elapsed, sample))
        if not run.baseline and elapsed >= WARMUP:
            run.baseline = sample
    run.end = run.rss[-1][1] if run.rss else {}
    run.seconds = time.monotonic() - t0
    _, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT + 5)
    for task in pending:
        task.cancel()
    run.stuck = len(pending)
    await asyncio.gather(*tasks, return_exceptions=True)
    return run


async def soak(stack: Stack, keys: dict[str, Issued], bogus: str, pids: list[int], seed: str) -> Run:
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY * 2)
    gem = genai.Client(
        api_key=keys["gemini"].key,
        http_options=genai_types.HttpOptions(
            base_url=stack.url, retry_options=genai_types.HttpRetryOptions(attempts=1)
        ),
    )
    ctx = Ctx(
        url=stack.url,
        run=seed,
        keys=keys,
        bogus_key=bogus,
        openai=openai.AsyncOpenAI(
            base_url=stack.url + "/v1", api_key=keys["openai"].key, max_retries=0, timeout=REQUEST_TIMEOUT
        ),
        anthropic=anthropic.AsyncAnthropic(
            base_url=stack.url, api_key=keys["anthropic"].key, max_retries=0, timeout=REQUEST_TIMEOUT
        ),
        gemini=gem,
        http=httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits),
    )
    try:
        return await drive(ctx, pids, seed)
    finally:
        await ctx.openai.close()
        await ctx.anthropic.close()
        await gem.aio.aclose()
        await ctx.http.aclose()


# -- after the run ---------------------------------------------------------------------------
def records(stack: Stack, run_tag: str, expect: int, deadline: float) -> list[tuple[Any, ...]]:
    """The run's usage records, once the writer has flushed them: the count reached what was
    expected and held still for 2 s, or held still for 10 s, or the deadline came."""
    query = (
        "SELECT tags->>'sid', request_id, outcome, status, tags->>'kind' FROM usage_events"
        " WHERE tags->>'soak' = %s"
    )
    last, still_since = -1, time.monotonic()
    rows: list[tuple[Any, ...]] = []
    while True:
        with stack.connect() as conn:
            rows = conn.execute(query, (run_tag,)).fetchall()
        now = time.monotonic()
        if len(rows) != last:
            last, still_since = len(rows), now
        elif (len(rows) >= expect and now - still_since >= 2) or now - still_since >= 10:
            return rows
        if now > deadline:
            return rows
        time.sleep(0.5)


def _example(traces: list[Trace]) -> str:
    t = traces[0]
    return f"e.g. sid={t.sid} provider={t.provider} request_id={t.request_id} {t.error}".strip()


def analyse(run: Run, rows: list[tuple[Any, ...]], logs: str) -> tuple[list[str], str]:
    """Every problem found, and a summary of the run (printed either way)."""
    problems: list[str] = []
    by_sid: dict[str, list[tuple[Any, ...]]] = collections.defaultdict(list)
    for row in rows:
        by_sid[row[0]].append(row)
    sids = {t.sid for t in run.traces}

    groups: dict[tuple[str, ...], list[Trace]] = collections.defaultdict(list)

    def flag(what: str, t: Trace, *detail: str) -> None:
        groups[(what, t.kind, t.label, *detail)].append(t)

    for t in run.traces:
        kind = BY_NAME[t.kind]
        if t.label not in t.want:
            flag("unexpected client outcome", t, f"wanted {'/'.join(sorted(t.want))}")
        if t.request_id is None and t.label not in ENVOY_LOCAL:
            flag("no x-spendgate-request-id on a Spendgate answer", t)
        mine = by_sid.get(t.sid, [])
        if not kind.billed:
            if mine:
                flag("record for a request without a valid key", t)
            continue
        if not mine:
            flag("no usage record", t)
            continue
        if len(mine) > 1:
            flag("duplicate usage records", t, f"{len(mine)} records")
        _, rid, outcome, status, _ = mine[0]
        if t.request_id is not None and str(rid) != t.request_id:
            flag("record carries another request id", t)
        if kind.outcomes is not None and outcome not in kind.outcomes:
            flag("record outcome", t, f"outcome={outcome}")
        if t.label.startswith("http-") and t.label not in ENVOY_LOCAL and status != int(t.label[5:]):
            flag("record status differs from what the client saw", t, f"status={status}")
    for (what, kind_name, label, *detail), ts in sorted(groups.items()):
        problems.append(
            f"{what}: {len(ts)} x kind={kind_name} client={label} {' '.join(detail)} ({_example(ts)})"
        )

    stray = [r for r in rows if r[0] not in sids]
    if stray:
        problems.append(f"{len(stray)} records of no request sent, e.g. {stray[:3]}")
    rids = collections.Counter(str(r[1]) for r in rows)
    if dup := {rid: n for rid, n in rids.items() if n > 1}:
        problems.append(f"{len(dup)} request ids on more than one record, e.g. {list(dup.items())[:3]}")
    if run.stuck:
        problems.append(f"{run.stuck} workers still waiting on a request after the drain")

    for pid, base in run.baseline.items():
        end = run.end.get(pid, 0)
        allowed = max(base * RSS_TOLERANCE, RSS_FLOOR_KB)
        if end == 0:
            problems.append(f"extproc worker {pid} is gone by the end of the run")
        elif end - base > allowed:
            problems.append(
                f"extproc worker {pid} RSS grew from {base} kB to {end} kB (+{end - base} kB, allowed {allowed:.0f} kB)"
            )
    if not run.baseline:
        problems.append("no RSS sample after the warm-up: the run was too short")

    bad_lines = [ln for ln in logs.splitlines() if any(ev in ln for ev in BAD_LOG_EVENTS)]
    if bad_lines:
        problems.append(
            f"{len(bad_lines)} log lines of failed accounting, e.g.\n  " + "\n  ".join(bad_lines[:5])
        )

    # The summary: requests by kind, client outcome and record outcome.
    table: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for t in run.traces:
        mine = by_sid.get(t.sid, [])
        table[(t.kind, t.label, ",".join(sorted({str(r[2]) for r in mine})) or "-")] += 1
    n = len(run.traces)
    lines = [
        f"soak: {n} requests in {run.seconds:.0f} s ({n / max(run.seconds, 1):.1f}/s), "
        f"{CONCURRENCY} workers, {len(rows)} records",
        f"{'kind':<15} {'client':<10} {'record outcome':<32} {'count':>6}",
    ]
    lines += [f"{k:<15} {c:<10} {o:<32} {v:>6}" for (k, c, o), v in sorted(table.items())]
    lines.append(f"RSS (kB) per extproc worker, warm-up {WARMUP:.0f} s:")
    lines += [f"  t={t:5.0f}s {sample}" for t, sample in run.rss]
    lines.append(f"  baseline {run.baseline}  end {run.end}")
    return problems, "\n".join(lines)


# -- the test --------------------------------------------------------------------------------
def test_soak_mixed_traffic_keeps_memory_flat_and_records_every_request_once(tmp_path: Path) -> None:
    started = time.monotonic()
    deadline = started + DURATION + 120
    EXPIRED.clear()
    fake, fake_url = start_fake()
    guard: threading.Timer | None = None
    try:
        with scratch_database() as dsn:
            stack = start_stack(dsn, tmp_path)

            def expire() -> None:
                # Whatever hangs then fails fast: no proxy, no provider, workers told to stop.
                EXPIRED.set()
                if stack.proc.poll() is None:
                    stack.proc.send_signal(signal.SIGINT)
                fake.terminate()

            guard = threading.Timer(deadline - time.monotonic(), expire)
            guard.daemon = True
            guard.start()
            try:
                keys = {p: issue_key(stack, p, fake_url) for p in PROVIDERS}
                bogus = "sg-" + secrets.token_urlsafe(32)  # never issued: every use is a 401
                stack.secrets.append(bogus)
                pids = extproc_workers(stack)
                assert pids, "no extproc worker found under spendgate up"
                seed = secrets.token_hex(4)
                run = asyncio.run(soak(stack, keys, bogus, pids, seed))
                expect = sum(1 for t in run.traces if BY_NAME[t.kind].billed)
                rows = records(stack, seed, expect, min(deadline - 30, time.monotonic() + 60))
                alive = stack.proc.poll() is None
            finally:
                status = stack.stop()
            logs = stack.logs()
    finally:
        if guard is not None:
            guard.cancel()
        fake.terminate()
        try:
            fake.wait(10)
        except subprocess.TimeoutExpired:
            fake.kill()
    problems, summary = analyse(run, rows, logs)
    print(summary)
    if not alive or status != 0:
        problems.append(f"spendgate up died or stopped badly (status {status}):\n{logs[-3000:]}")
    if EXPIRED.is_set():
        problems.append(f"hard timeout: the test was still running {DURATION + 120:.0f} s after it started")
    for secret in stack.secrets:
        if secret in logs:
            problems.append(f"a secret ({secret[:6]}…) appears in the stack logs")
    took = time.monotonic() - started
    assert not problems, "\n".join([*problems, "", summary, f"(took {took:.0f} s, seed {seed})"])
