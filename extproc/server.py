"""The extproc process: gRPC server, key refresher, price reloader and usage writer together."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer

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
from extproc.ratelimit import Limiter, LocalLimiter, RedisLimiter
from extproc.servicer import ExternalProcessor
from extproc.usage import UsageRecord
from extproc.writer import UsageWriter

log = structlog.get_logger("spendgate.server")


@dataclass
class ServeOptions:
    """Everything `spendgate serve` needs to know."""

    listen: str  # grpc address: "unix:/path.sock" or "127.0.0.1:50051"
    dsn: str
    home: Path
    policies: Path  # the policy directory: pricing.yaml and policy files
    spool: Path
    key_refresh_seconds: float = 2.0
    redis_url: str | None = None  # rate-limit counters shared by replicas; in process without it
    metrics: tuple[str, int] | None = None  # host and port of the Prometheus endpoint
    limits: Limits | None = None
    grace_seconds: float = 5.0


async def serve(opts: ServeOptions) -> None:
    """Run until SIGTERM or SIGINT; then stop taking streams, finish open ones, flush usage."""
    keyring = load_keyring(opts.home)
    policies = PolicyStore(opts.policies)
    table = KeyTable()
    keystore = KeyStore(opts.dsn, keyring, table, opts.key_refresh_seconds)
    await keystore.refresh()
    tokens.warm_up()
    writer = UsageWriter(opts.dsn, opts.spool)
    budgets = BudgetStore(opts.dsn)
    await budgets.open()
    limiter: Limiter = RedisLimiter(opts.redis_url) if opts.redis_url else LocalLimiter()
    gatekeeper = Gatekeeper(budgets, limiter)
    limits = opts.limits or Limits()

    metrics = Metrics()
    metrics.collect(lambda: _gauges(table, policies, writer, budgets, gatekeeper))

    def emit(record: UsageRecord) -> None:
        metrics.inc("spendgate_requests_total", outcome=record.outcome, status=str(record.status))
        writer.enqueue(record)

    def new_exchange() -> Exchange:
        return Exchange(table, policies, emit, limits, gatekeeper.settle)

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    pb_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessor(new_exchange, gatekeeper, metrics, lambda: UpstreamAttempt(table)), server
    )
    # Envoy health-checks each extproc process, so a restarting one is taken out of rotation
    # instead of answering its share of requests with 503s.
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if opts.listen.startswith("unix:"):
        sock = Path(opts.listen[5:])
        sock.unlink(missing_ok=True)
        server.add_insecure_port(opts.listen)
    else:
        server.add_insecure_port(opts.listen)
    await server.start()
    metrics_server = await serve_metrics(metrics, *opts.metrics) if opts.metrics else None
    tasks = [
        asyncio.create_task(writer.run()),
        asyncio.create_task(keystore.run()),
        asyncio.create_task(policies.run()),
        asyncio.create_task(budgets.run()),
        asyncio.create_task(_partition_keeper(opts.dsn)),
    ]
    log.info(
        "extproc.started",
        listen=opts.listen,
        keys=len(table),
        prices=policies.current.prices.version,
        policies=len(policies.current.policies),
        pid=os.getpid(),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("extproc.stopping")
    await health.enter_graceful_shutdown()
    await server.stop(opts.grace_seconds)
    if metrics_server is not None:
        metrics_server.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await writer.close()
    await budgets.close()
    if isinstance(limiter, RedisLimiter):
        await limiter.close()
    log.info("extproc.stopped", written=writer.written, spooled=writer.spooled())


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
            log.warning("partitions.ensure_failed", error=str(exc))


def run(opts: ServeOptions) -> None:
    """Entry point: uvloop when available."""
    try:
        import uvloop

        uvloop.run(serve(opts))
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms working
        asyncio.run(serve(opts))
