"""The extproc process: gRPC server, key refresher, price reloader and usage writer together."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from extproc import db, tokens
from extproc.admission import Gatekeeper
from extproc.budget_store import BudgetStore
from extproc.crypto import load_keyring
from extproc.exchange import Exchange, Limits
from extproc.failover import UpstreamAttempt
from extproc.keystore import KeyStore
from extproc.keytable import KeyTable
from extproc.metrics import Metrics, Sample
from extproc.metrics import serve as serve_metrics
from extproc.policy.store import PolicyStore
from extproc.providers.base import PASSTHROUGH
from extproc.ratelimit import Limiter, LocalLimiter, RedisLimiter
from extproc.servicer import ExternalProcessor
from extproc.supervise import NotReady, TaskSupervisor, describe_error, retry_until
from extproc.usage import UsageRecord
from extproc.writer import UsageWriter

log = structlog.get_logger("spendgate.server")


@dataclass
class ServeOptions:
    """Everything `spendgate serve` needs to know."""

    listen: str  # grpc address: "unix:/path.sock" or "127.0.0.1:50051"
    dsn: str
    home: Path
    policies: Path | None  # policy files and an optional pricing.yaml; None: the shipped prices only
    spool: Path
    key_refresh_seconds: float = 2.0
    redis_url: str | None = None  # rate-limit counters shared by replicas; in process without it
    metrics: tuple[str, int] | None = None  # host and port of the Prometheus endpoint
    limits: Limits | None = None
    grace_seconds: float = 5.0
    ready_timeout: float = 30.0  # start-up finishes within this many seconds, or the process exits
    ready_file: Path | None = None  # holds the pid while health is SERVING (`spendgate up` watches it)
    termination_log: Path | None = None  # why start-up failed, for the supervisor (as in Kubernetes)


class StartupError(RuntimeError):
    """The process did not become ready within its bound; the message names the step and cause."""


# Errors worth another attempt while starting: Postgres not up yet, a refused or timed-out
# connection, a pool that could not connect in time. A missing table or a wrong master key is not.
_TRANSIENT: tuple[type[BaseException], ...] = (psycopg.OperationalError, OSError, TimeoutError)
# How long one connection attempt may take, unless the DSN (or PGCONNECT_TIMEOUT) says otherwise:
# libpq waits forever by default and psycopg over two minutes, which is a start-up that hangs.
CONNECT_TIMEOUT = 5
# Past the ready bound by this much, a start-up stuck outside the event loop's reach is ended.
_HANG_MARGIN = 10.0


class Readiness:
    """What Envoy, probes and `spendgate up` are told: SERVING only while everything is loaded,
    no critical background task is failing, and the process is not stopping."""

    def __init__(self, health: HealthServicer, ready_file: Path | None) -> None:
        self._health = health
        self._ready_file = ready_file
        self._lock = asyncio.Lock()
        self._serving: bool | None = None
        self.loaded = False
        self.tasks_ok = True
        self.stopping = False

    @property
    def serving(self) -> bool:
        """Whether the last status set was SERVING."""
        return bool(self._serving)

    async def tasks_healthy(self, ok: bool) -> None:
        """The TaskSupervisor's verdict changed."""
        self.tasks_ok = ok
        await self.refresh()

    async def refresh(self) -> None:
        """Publish the status the flags call for, if it changed."""
        async with self._lock:  # supervised tasks report concurrently; the last word must win
            serving = self.loaded and self.tasks_ok and not self.stopping
            before, self._serving = self._serving, serving
            if serving == before:
                return
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self._health.set("", status)
            if self._ready_file is not None:
                if serving:
                    _write_atomically(self._ready_file, f"{os.getpid()}\n")
                else:
                    self._ready_file.unlink(missing_ok=True)
            if before is not None:  # the first NOT_SERVING, before anything is loaded, says nothing
                log.info(
                    "extproc.health",
                    status="SERVING" if serving else "NOT_SERVING",
                    tasks_ok=self.tasks_ok,
                    stopping=self.stopping,
                )


def bounded_dsn(dsn: str, seconds: int = CONNECT_TIMEOUT) -> str:
    """`dsn` with a connect_timeout, unless it (or PGCONNECT_TIMEOUT) already has one."""
    if os.environ.get("PGCONNECT_TIMEOUT"):
        return dsn
    try:
        if "connect_timeout" in conninfo_to_dict(dsn):
            return dsn
        return make_conninfo(dsn, connect_timeout=seconds)
    except psycopg.Error:
        return dsn  # unparsable: the first connection attempt reports it, without the DSN


def without_password(text: str, dsn: str) -> str:
    """`text` with the DSN's password (if any) replaced: error messages may quote the DSN."""
    secrets = []
    with contextlib.suppress(psycopg.Error):
        password = conninfo_to_dict(dsn).get("password")
        if password:
            secrets.append(str(password))
    m = re.search(r"://[^:/@]*:([^@]+)@", dsn)
    if m:
        secrets.append(m.group(1))
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


async def _probe_database(dsn: str) -> None:
    """Prove that Postgres takes connections and has the budget schema the pool will use."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT 1 FROM budget_counters LIMIT 0")


async def serve(opts: ServeOptions) -> None:
    """Run until SIGTERM or SIGINT; then stop taking streams, finish open ones, flush usage.

    Start-up (keys, prices, policies, a working database) finishes within `opts.ready_timeout`
    seconds, or the process logs `extproc.start_failed` with the cause, writes it to
    `opts.termination_log`, and raises StartupError. The gRPC health status is NOT_SERVING
    until then, so Envoy sends it nothing.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + opts.ready_timeout
    # What the event loop cannot cut short (a blocking read, a stuck DNS lookup) is bounded too:
    # past the margin every thread's stack goes to stderr and the process exits with status 1.
    faulthandler.dump_traceback_later(opts.ready_timeout + _HANG_MARGIN, exit=True)
    if opts.termination_log is not None:
        opts.termination_log.unlink(missing_ok=True)
    dsn = bounded_dsn(opts.dsn)
    health = HealthServicer()
    readiness = Readiness(health, opts.ready_file)
    await readiness.refresh()  # NOT_SERVING: the servicer's own default is SERVING
    stop = asyncio.Event()
    main = asyncio.current_task()

    def on_signal() -> None:
        stop.set()
        if not readiness.loaded and main is not None:
            main.cancel()  # nothing to drain yet: stop waiting for Postgres and go

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    step = "configuration"
    server: grpc.aio.Server | None = None
    metrics_server: asyncio.Server | None = None
    budgets: BudgetStore | None = None
    try:
        keyring = load_keyring(opts.home)
        policies = PolicyStore(opts.policies)
        table = KeyTable()
        keystore = KeyStore(dsn, keyring, table, opts.key_refresh_seconds)
        writer = UsageWriter(dsn, opts.spool)
        budgets = BudgetStore(dsn)
        limiter: Limiter = RedisLimiter(opts.redis_url) if opts.redis_url else LocalLimiter()
        gatekeeper = Gatekeeper(budgets, limiter)
        limits = opts.limits or Limits()
        metrics = Metrics()
        supervisor = TaskSupervisor(readiness.tasks_healthy)
        metrics.collect(lambda: _gauges(table, policies, writer, budgets, gatekeeper))
        metrics.collect(supervisor.samples)
        metrics.collect(lambda: [("spendgate_ready", "gauge", {}, 1 if readiness.serving else 0)])

        def emit(record: UsageRecord) -> None:
            metrics.inc("spendgate_requests_total", outcome=record.outcome, status=str(record.status))
            for flag in record.flags:  # a fixed vocabulary set by Spendgate, never caller text
                metrics.inc("spendgate_flagged_records_total", flag=flag)
            if record.api == PASSTHROUGH:
                # Requests no tokens or cost stand behind, most often an SDK base URL without /v1.
                # Provider kind and outcome only: the path is caller text and stays out of labels.
                metrics.inc(
                    "spendgate_unaccounted_requests_total", provider=record.provider, outcome=record.outcome
                )
            writer.enqueue(record)

        def new_exchange() -> Exchange:
            return Exchange(table, policies, emit, limits, gatekeeper.settle)

        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        pb_grpc.add_ExternalProcessorServicer_to_server(
            ExternalProcessor(new_exchange, gatekeeper, metrics, lambda: UpstreamAttempt(table)), server
        )
        # Envoy health-checks each extproc process, so one that is starting, failing or stopping
        # is out of rotation instead of answering its share of requests with 401s or 503s.
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        step = "listen"
        if opts.listen.startswith("unix:"):
            Path(opts.listen[5:]).unlink(missing_ok=True)
        server.add_insecure_port(opts.listen)
        await server.start()
        metrics_server = await serve_metrics(metrics, *opts.metrics) if opts.metrics else None
        step = "keys"
        await retry_until(step, keystore.refresh, deadline, transient=_TRANSIENT)
        step = "database"
        await retry_until(step, lambda: _probe_database(dsn), deadline, transient=_TRANSIENT)
        await budgets.open()
        step = "tokenizer"
        await asyncio.to_thread(tokens.warm_up)
        supervisor.start("usage_writer", writer.run)
        supervisor.start("key_refresh", keystore.run)
        supervisor.start("policy_reload", policies.run)
        supervisor.start("budget_settle", budgets.run)
        supervisor.start("partition_keeper", lambda: _partition_keeper(dsn), critical=False)
        readiness.loaded = True
        await readiness.refresh()
    except asyncio.CancelledError:
        await _abandon(server, metrics_server, budgets)
        if not stop.is_set():
            raise
        log.info("extproc.stopped_during_startup", step=step)
        return
    except Exception as exc:
        cause = without_password(exc.cause if isinstance(exc, NotReady) else describe_error(exc), opts.dsn)
        log.error(
            "extproc.start_failed", step=step, error=cause, ready_timeout=opts.ready_timeout, pid=os.getpid()
        )
        if opts.termination_log is not None:
            with contextlib.suppress(OSError):
                _write_atomically(opts.termination_log, f"{step}: {cause}\n")
        await _abandon(server, metrics_server, budgets)
        raise StartupError(f"extproc not ready ({step}): {cause}") from None
    finally:
        faulthandler.cancel_dump_traceback_later()
    log.info(
        "extproc.started",
        listen=opts.listen,
        keys=len(table),
        prices=policies.current.prices.version,
        policies=len(policies.current.policies),
        pid=os.getpid(),
        seconds=round(loop.time() - (deadline - opts.ready_timeout), 3),
    )

    await stop.wait()
    log.info("extproc.stopping")
    readiness.stopping = True
    await readiness.refresh()
    await health.enter_graceful_shutdown()
    await server.stop(opts.grace_seconds)
    if metrics_server is not None:
        metrics_server.close()
    await supervisor.stop()
    await writer.close()
    await budgets.close()
    if isinstance(limiter, RedisLimiter):
        await limiter.close()
    log.info("extproc.stopped", written=writer.written, spooled=writer.spooled())


async def _abandon(
    server: grpc.aio.Server | None, metrics_server: asyncio.Server | None, budgets: BudgetStore | None
) -> None:
    """Let go of what a failed or interrupted start-up had opened; nothing was served yet."""
    if metrics_server is not None:
        metrics_server.close()
    if server is not None:
        await server.stop(0)
    if budgets is not None:
        with contextlib.suppress(Exception):  # the pool may never have opened
            await asyncio.wait_for(budgets.close(), 5)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _gauges(
    table: KeyTable, policies: PolicyStore, writer: UsageWriter, budgets: BudgetStore, gate: Gatekeeper
) -> list[Sample]:
    """Figures read from the components at scrape time."""
    return [
        ("spendgate_keys_loaded", "gauge", {}, len(table)),
        ("spendgate_policy_reload_failures_total", "counter", {}, policies.reload_failures),
        ("spendgate_policy_last_reload_ok", "gauge", {}, 0 if policies.last_error else 1),
        ("spendgate_usage_records_written_total", "counter", {}, writer.written),
        ("spendgate_usage_records_pending", "gauge", {}, writer.pending),
        ("spendgate_usage_dead_letters_total", "counter", {}, writer.dead_letters),
        ("spendgate_usage_writer_failures_total", "counter", {}, writer.failures),
        ("spendgate_budget_reservations_total", "counter", {}, budgets.reservations),
        ("spendgate_budget_refusals_total", "counter", {}, budgets.refusals),
        ("spendgate_budget_threshold_crossings_total", "counter", {}, budgets.threshold_crossings),
        ("spendgate_ratelimit_throttles_total", "counter", {}, gate.throttles),
    ]


async def _partition_keeper(dsn: str) -> None:
    """Keep next months' usage partitions in place on a long-running proxy."""
    while True:
        await asyncio.sleep(6 * 3600)
        try:
            await asyncio.to_thread(db.ensure_partitions_now, dsn)
        except Exception as exc:  # retention housekeeping must never take the proxy down
            log.warning("partitions.ensure_failed", error=describe_error(exc))


def run(opts: ServeOptions) -> None:
    """Entry point: uvloop when available."""
    try:
        import uvloop

        uvloop.run(serve(opts))
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms working
        asyncio.run(serve(opts))
