"""Supervision with real processes: `spendgate up` restarts a worker or Envoy that dies, traffic
moves to the surviving worker meanwhile, a restarted worker replays its predecessor's spool,
only a child that keeps dying stops the stack, and a start-up that cannot finish fails loudly
within its bound instead of hanging."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import openai
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.helpers import openai_client, wait_for
from tests.fakeprovider import FakeProvider
from tests.support import REPO, Issued, Stack, free_port, issue_key, start_stack, usage_record

MESSAGES = [{"role": "user", "content": "hi"}]
# Envoy health-checks each worker every 2 s with a 1 s timeout and takes a failing one out at the
# first failure; after this long a killed worker no longer gets requests.
SETTLE = 3.5


def deadline_loop(seconds: float, what: str) -> Iterator[None]:
    """Iterate until the caller breaks out; fail the test after `seconds`."""
    end = time.monotonic() + seconds
    while True:
        assert time.monotonic() < end, f"gave up after {seconds} s waiting for {what}"
        yield
        time.sleep(0.1)


def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    for _ in deadline_loop(seconds, what):
        if check():
            return


def worker(stack: Stack, i: int) -> psutil.Process | None:
    """The live extproc process listening on worker i's socket, if any."""
    sock = f"unix:{stack.home / 'run' / f'extproc-{i}.sock'}"
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = p.info["cmdline"] or []
            if "serve" in cmd and sock in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def envoy(stack: Stack) -> psutil.Process | None:
    """The live Envoy of this stack, if any."""
    boot = str(stack.home / "run" / "envoy.yaml")
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if boot in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def health(stack: Stack, i: int) -> str:
    """Worker i's grpc.health.v1 status, asked the way Envoy asks it."""
    sock = stack.home / "run" / f"extproc-{i}.sock"
    try:
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    except grpc.RpcError as exc:
        return f"no answer ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def all_ready(stack: Stack) -> None:
    """Both workers serving: each test starts from (and may leave) a whole stack."""
    wait_until(lambda: all(health(stack, i) == "SERVING" for i in (0, 1)), 40, "both workers SERVING")


@pytest.fixture(scope="module")
def two(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own with two workers: these tests kill its processes."""
    s = start_stack(database, tmp_path_factory.mktemp("supervised"), "--workers", "2")
    yield s
    status = s.stop()
    assert status == 0, s.logs()[-3000:]


@pytest.fixture
def key(two: Stack, fake: FakeProvider) -> Issued:
    all_ready(two)
    return issue_key(two, "openai", fake.base_url)


def test_requests_keep_succeeding_on_the_other_worker_while_a_killed_one_restarts(
    two: Stack, key: Issued
) -> None:
    client = openai_client(two, key.key)
    stop = threading.Event()
    killed_at: list[float] = []
    results: list[tuple[float, str]] = []  # (start time, "ok" or the error)
    streams: list[tuple[float, str]] = []

    def burst() -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                client.chat.completions.create(model="fake-openai-model", messages=MESSAGES)
                results.append((t, "ok"))
            except openai.APIError as exc:
                results.append((t, f"{type(exc).__name__} {getattr(exc, 'status_code', '')}"))

    def stream() -> None:
        t = time.monotonic()
        try:
            chunks = client.chat.completions.create(
                model="fake-openai-model",
                messages=MESSAGES,
                stream=True,
                extra_headers={"x-fake-scenario": "slow", "x-fake-delay": "0.2"},
            )
            n = sum(1 for _ in chunks)
            streams.append((t, f"ok {n}"))
        except Exception as exc:  # a stream on the killed worker may end any way the transport likes
            streams.append((t, type(exc).__name__))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        loops = [pool.submit(burst) for _ in range(4)]
        opened = [pool.submit(stream) for _ in range(6)]
        time.sleep(0.5)  # the streams are open, the burst is running
        victim = worker(two, 0)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())
        time.sleep(SETTLE + 1.0)
        later = [pool.submit(stream) for _ in range(4)]  # opened after the worker was gone
        time.sleep(2.0)
        stop.set()
        for f in [*loops, *opened, *later]:
            f.result(timeout=60)

    assert two.proc.poll() is None, "spendgate up went down with its worker"
    settled = killed_at[0] + SETTLE
    after = [r for t, r in results if t > settled]
    assert len(after) > 10 and all(r == "ok" for r in after), sorted(set(after))
    # Requests caught by the kill fail closed: a 503 from Envoy, never a forwarded request.
    during = {r for t, r in results if killed_at[0] - 1 < t <= settled and r != "ok"}
    assert during <= {"InternalServerError 503", "APIStatusError 503"}, during
    assert all(r.startswith("ok") for t, r in streams if t > settled), streams
    assert any(r.startswith("ok") for t, r in streams if t < killed_at[0]), streams  # the survivor's


def test_up_restarts_a_killed_worker_on_the_same_socket_and_it_becomes_ready_with_a_new_pid(
    two: Stack,
) -> None:
    all_ready(two)
    old = worker(two, 1)
    assert old is not None
    old.send_signal(signal.SIGKILL)
    for _ in deadline_loop(30, "the restarted worker to be SERVING"):
        new = worker(two, 1)
        if new is not None and new.pid != old.pid and health(two, 1) == "SERVING":
            break
    assert two.proc.poll() is None
    logs = two.logs()
    assert f"extproc-1 (pid {old.pid}) was killed by SIGKILL; restarting in" in logs
    wait_until(lambda: f"extproc-1 restarted (pid {new.pid}) and ready" in two.logs(), 5, "the notice")
    assert '"event": "child.restarted"' in logs


def test_a_restarted_worker_replays_the_records_its_predecessor_spooled(two: Stack, key: Issued) -> None:
    victim = worker(two, 0)
    assert victim is not None
    # Frozen first, so that the record below can only reach Postgres through the replay of the
    # worker `up` starts in its place (a live worker would replay it on its next flush).
    victim.send_signal(signal.SIGSTOP)
    try:
        record = usage_record(key_id=key.key_id, tags={"spooled": "by-the-dead-worker"})
        spool = two.home / "spool-0.jsonl"
        with spool.open("a") as f:
            f.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
    finally:
        victim.send_signal(signal.SIGKILL)
    for _ in deadline_loop(30, "the spooled record in usage_events"):
        with two.connect() as conn:
            row = conn.execute(
                "SELECT key_id, cost_usd FROM usage_events WHERE request_id = %s", (record.request_id,)
            ).fetchone()
        if row is not None:
            break
    assert row == (key.key_id, record.cost_usd)
    wait_until(
        lambda: not spool.exists() or spool.stat().st_size == 0, 10, "the spool to be emptied by its replay"
    )


def test_up_restarts_envoy_when_it_dies_and_the_proxy_answers_again(two: Stack, key: Issued) -> None:
    old = envoy(two)
    assert old is not None
    old.send_signal(signal.SIGKILL)
    client = openai_client(two, key.key)
    for _ in deadline_loop(30, "the proxy to answer through a new Envoy"):
        try:
            client.chat.completions.create(model="fake-openai-model", messages=MESSAGES)
            break
        except openai.APIConnectionError:
            continue
    new = envoy(two)
    assert new is not None and new.pid != old.pid and two.proc.poll() is None
    assert f"envoy (pid {old.pid}) was killed by SIGKILL; restarting in" in two.logs()


def test_a_credential_row_that_cannot_be_used_does_not_stop_revocations(two: Stack, key: Issued) -> None:
    import uuid

    from extproc.crypto import load_keyring
    from extproc.keystore import credential_aad

    cid = uuid.uuid4()
    # Properly sealed, so that only its base URL is wrong: written by hand, as a migration or an
    # older version might have done; the CLI would refuse it.
    sealed = load_keyring(two.home).seal("sk-test-" + uuid.uuid4().hex, credential_aad(cid))
    with two.connect() as conn:
        conn.execute(
            "INSERT INTO provider_credentials (id, provider, name, base_url, ciphertext, nonce, master_key_id)"
            " VALUES (%s, 'openai', %s, 'ftp://not-a-provider', %s, %s, %s)",
            (cid, f"broken-{cid.hex[:6]}", sealed.ciphertext, sealed.nonce, sealed.master_key_id),
        )
        conn.execute("NOTIFY spendgate_keys")
    try:
        client = openai_client(two, key.key)
        wait_until(lambda: '"event": "credential.skipped"' in two.logs(), 10, "the row to be skipped")
        two.cli("keys", "revoke", str(key.key_id))
        wait_for(
            lambda: client.chat.completions.create(model="fake-openai-model", messages=MESSAGES),
            openai.AuthenticationError,
            raised=True,
            seconds=10,
            what="the revoked key to be refused",
        )
        assert two.proc.poll() is None
        assert 'spendgate_background_task_failures_total{task="key_refresh"} 0' in two.metrics()
    finally:
        with two.connect() as conn:
            conn.execute("UPDATE provider_credentials SET revoked_at = now() WHERE id = %s", (cid,))


def test_up_stops_with_a_message_naming_a_worker_that_keeps_dying(database: str, workdir: Path) -> None:
    stack = start_stack(database, workdir, "--workers", "1")
    try:
        last = None
        # Killed as soon as each successor appears: six deaths within the minute, one too many.
        for _ in deadline_loop(60, "spendgate up to give up on its worker"):
            if stack.proc.poll() is not None:
                break
            p = worker(stack, 0)
            if p is not None and (last is None or p.pid != last):
                last = p.pid
                p.send_signal(signal.SIGKILL)
        assert stack.proc.wait(timeout=30) == 1
        assert (
            f"extproc-0 keeps dying (5 restarts within 60 s); its last run (pid {last}) was killed by SIGKILL"
            in stack.logs()
        )
    finally:
        stack.stop()
    wait_until(lambda: worker(stack, 0) is None and envoy(stack) is None, 20, "nothing left behind")


# -- start-ups that cannot finish ---------------------------------------------------------------
def spendgate(*args: str, env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str, float]:
    """Run the spendgate command; its status, its output and how long it took."""
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        env={k: v for k, v in {**os.environ, **env}.items() if k != "SPENDGATE_MASTER_KEY"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return res.returncode, res.stdout + res.stderr, time.monotonic() - start


def test_a_worker_that_cannot_reach_its_database_exits_nonzero_within_its_bound_naming_the_cause(
    workdir: Path,
) -> None:
    dsn = "postgresql://postgres:never-logged-pw@127.0.0.1:1/spendgate"
    key = spendgate("master-key", "generate", env={}, cwd=workdir, timeout=30)[1].strip()
    (workdir / "master.key").write_text(key + "\n")
    status, out, took = spendgate(
        "serve",
        "--listen",
        f"unix:{workdir / 'w.sock'}",
        "--policies",
        str(REPO / "policies"),
        "--ready-timeout",
        "3",
        "--termination-log",
        str(workdir / "exit"),
        env={"DATABASE_URL": dsn, "SPENDGATE_HOME": str(workdir)},
        cwd=workdir,
        timeout=30,
    )
    assert status != 0 and took < 3 + 5, (status, took, out[-2000:])
    assert '"event": "extproc.start_failed"' in out and "Connection refused" in out
    assert "Connection refused" in (workdir / "exit").read_text()
    assert "never-logged-pw" not in out


def test_up_with_its_database_on_a_closed_port_exits_nonzero_with_the_cause(workdir: Path) -> None:
    status, out, took = spendgate(
        "up",
        "--port",
        str(free_port()),
        "--admin-port",
        str(free_port()),
        "--policies",
        str(REPO / "policies"),
        env={
            "DATABASE_URL": "postgresql://postgres:never-logged-pw@127.0.0.1:1/x",
            "SPENDGATE_HOME": str(workdir),
        },
        cwd=workdir,
        timeout=60,
    )
    assert status != 0 and took < 30, (status, took)
    assert "Connection refused" in out and "never-logged-pw" not in out


class SilentAfterFirst:
    """A TCP front for Postgres that passes the first connection through (`up` migrating) and
    then accepts connections without ever answering: the start-up that used to hang."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        first = True
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if first:
                first = False
                upstream = socket.create_connection(self.target)
                for a, b in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
            else:
                self.held.append(conn)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


def test_up_exits_nonzero_naming_a_worker_whose_database_never_answers(database: str, workdir: Path) -> None:
    front = SilentAfterFirst(("127.0.0.1", 5432))
    try:
        dsn = database.replace("127.0.0.1:5432", f"127.0.0.1:{front.port}")
        status, out, took = spendgate(
            "up",
            "--port",
            str(free_port()),
            "--admin-port",
            str(free_port()),
            "--policies",
            str(REPO / "policies"),
            "--workers",
            "1",
            "--ready-timeout",
            "5",
            env={"DATABASE_URL": dsn, "SPENDGATE_HOME": str(workdir / "home")},
            cwd=workdir,
            timeout=60,
        )
    finally:
        front.close()
    assert status != 0 and took < 5 + 15, (status, took, out[-3000:])
    assert "spendgate: extproc-0 failed to start: it exited with status 2: keys:" in out, out[-3000:]
    assert "connection timeout expired" in out
