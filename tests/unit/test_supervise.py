"""Supervision without processes or sockets: backoff, crash loops, background tasks, readiness,
and the two root causes that used to kill background tasks (a bad credential row, an unreadable
policy file)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from structlog.testing import capture_logs

from extproc.crypto import Keyring, generate_master_key, parse_master_key
from extproc.keystore import KeyStore, credential_aad
from extproc.keytable import KeyTable
from extproc.policy.store import PolicyStore
from extproc.pricing import SHIPPED_PRICES
from extproc.server import Readiness, bounded_dsn, without_password
from extproc.supervise import (
    Backoff,
    NotReady,
    RestartPolicy,
    TaskSupervisor,
    describe_error,
    retry_until,
)

REPO = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def until(condition: Callable[[], bool], seconds: float = 3.0) -> None:
    """Wait for `condition`, failing the test after `seconds`."""
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.005)


def fast(**kw: Any) -> TaskSupervisor:
    """A supervisor with millisecond delays, so a test takes a fraction of a second."""
    opts: dict[str, Any] = {"stable_after": 0.2, "dead_after": 5.0, "backoff": lambda: Backoff(0.01, 2, 0.04)}
    return TaskSupervisor(**{**opts, **kw})


class Flaky:
    """A background task that raises on its first `fails` runs, then runs until cancelled."""

    def __init__(self, fails: int, error: Exception | None = None) -> None:
        self.fails = fails
        self.runs = 0
        self.error = error or OSError("disk went away")

    async def __call__(self) -> None:
        self.runs += 1
        if self.runs <= self.fails:
            raise self.error
        await asyncio.Event().wait()


# -- backoff and restart policy (the children of `spendgate up`) --------------------------------
def test_backoff_doubles_from_half_a_second_to_thirty_and_starts_over_after_reset() -> None:
    b = Backoff()
    assert [b.next() for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    b.reset()
    assert b.next() == 0.5


def test_restart_policy_gives_up_on_a_child_that_needs_more_restarts_than_the_window_allows() -> None:
    policy = RestartPolicy(max_restarts=3, window=60)
    delays = [policy.on_exit(started=t, now=t + 1) for t in (0, 2, 4, 6)]
    assert delays == [0.5, 1, 2, None]


def test_restart_policy_forgets_restarts_older_than_the_window() -> None:
    policy = RestartPolicy(max_restarts=2, window=10, stable_after=1000)
    assert policy.on_exit(0, 1) is not None and policy.on_exit(1, 2) is not None
    assert policy.on_exit(20, 21) is not None  # the first two are over ten seconds old


def test_restart_policy_starts_the_backoff_afresh_after_a_run_that_lasted() -> None:
    policy = RestartPolicy(stable_after=30, max_restarts=100)
    assert [policy.on_exit(0, 1), policy.on_exit(1, 2), policy.on_exit(2, 3)] == [0.5, 1, 2]
    assert policy.on_exit(started=3, now=40) == 0.5


# -- naming what went wrong ---------------------------------------------------------------------
def test_describe_error_names_the_class_of_a_silent_error_and_follows_its_cause() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as inner:
            raise TimeoutError() from inner
    except TimeoutError as exc:
        text = describe_error(exc)
    assert text == "TimeoutError; caused by ConnectionRefusedError: [Errno 111] Connection refused"


def test_a_dsn_password_never_survives_into_an_error_message() -> None:
    for dsn in ("postgresql://app:s3cr3t-pw@db:5432/sg", "host=db user=app password=s3cr3t-pw dbname=sg"):
        assert "s3cr3t-pw" not in without_password(f"bad conninfo {dsn!r}", dsn)


def test_every_connection_gets_a_connect_timeout_unless_the_dsn_sets_one() -> None:
    assert "connect_timeout=5" in bounded_dsn("postgresql://app@db/sg")
    assert (
        bounded_dsn("postgresql://app@db/sg?connect_timeout=9") == "postgresql://app@db/sg?connect_timeout=9"
    )


# -- bounded start-up steps ---------------------------------------------------------------------
async def test_retry_until_retries_a_transient_error_until_the_step_succeeds() -> None:
    calls = []

    async def step() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("not yet")
        return "done"

    deadline = asyncio.get_running_loop().time() + 5
    assert await retry_until("keys", step, deadline, transient=(OSError,), backoff=Backoff(0.01)) == "done"
    assert len(calls) == 3


async def test_retry_until_gives_up_at_the_deadline_naming_the_last_cause() -> None:
    async def step() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(NotReady) as exc:
        await retry_until("database", step, start + 0.3, transient=(OSError,), backoff=Backoff(0.02))
    assert loop.time() - start < 1.0
    assert exc.value.step == "database" and "Connection refused" in exc.value.cause


async def test_retry_until_cuts_off_an_attempt_that_hangs_past_the_deadline() -> None:
    async def hangs() -> None:
        await asyncio.Event().wait()

    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(NotReady, match="still waiting at the deadline"):
        await retry_until("keys", hangs, start + 0.2, transient=(OSError, TimeoutError))
    assert loop.time() - start < 1.0


async def test_retry_until_raises_a_non_transient_error_at_once() -> None:
    calls = []

    async def step() -> None:
        calls.append(1)
        raise LookupError("relation api_keys does not exist")

    deadline = asyncio.get_running_loop().time() + 5
    with pytest.raises(LookupError):
        await retry_until("keys", step, deadline, transient=(OSError,))
    assert len(calls) == 1


# -- background tasks ---------------------------------------------------------------------------
async def test_a_task_that_raises_is_logged_with_its_class_counted_and_restarted() -> None:
    sup = fast()
    task = Flaky(fails=2, error=PermissionError(13, "Permission denied"))
    with capture_logs() as logs:
        sup.start("policy_reload", task)
        await until(lambda: task.runs == 3 and sup.is_up("policy_reload"))
        await sup.stop()
    assert sup.failures("policy_reload") == 2
    failed = [e for e in logs if e["event"] == "background_task.failed"]
    assert [e["consecutive"] for e in failed] == [1, 2]
    assert failed[0]["error"] == "PermissionError: [Errno 13] Permission denied"
    assert failed[0]["restart_in"] == 0.01 and failed[1]["restart_in"] == 0.02


async def test_health_turns_bad_after_three_failures_in_a_row_and_good_once_the_task_runs_stably() -> None:
    verdicts: list[bool] = []

    async def on_health(ok: bool) -> None:
        verdicts.append(ok)

    sup = fast(on_health=on_health)
    task = Flaky(fails=3)
    sup.start("key_refresh", task)
    await until(lambda: verdicts == [False])
    assert not sup.healthy
    await until(lambda: verdicts == [False, True])  # stable_after (0.2 s) after the fourth run began
    assert sup.healthy and task.runs == 4
    await sup.stop()


async def test_a_task_down_longer_than_dead_after_turns_health_bad_before_its_restart() -> None:
    verdicts: list[bool] = []

    async def on_health(ok: bool) -> None:
        verdicts.append(ok)

    sup = fast(on_health=on_health, dead_after=0.05, max_failures=100, backoff=lambda: Backoff(0.3))
    sup.start("usage_writer", Flaky(fails=1))
    await until(lambda: verdicts == [False])
    assert not sup.is_up("usage_writer")  # still waiting out its 0.3 s delay
    await sup.stop()


async def test_a_failing_non_critical_task_leaves_health_alone() -> None:
    sup = fast()
    task = Flaky(fails=5)
    sup.start("partition_keeper", task, critical=False)
    await until(lambda: task.runs == 6)
    assert sup.healthy and sup.failures("partition_keeper") == 5
    await sup.stop()


async def test_a_task_that_returns_counts_as_a_failure_and_is_restarted() -> None:
    runs = []

    async def returns() -> None:
        runs.append(1)

    sup = fast()
    sup.start("budget_settle", returns)
    await until(lambda: len(runs) >= 2)
    await sup.stop()
    assert sup.failures("budget_settle") >= 1


async def test_stopping_the_supervisor_cancels_its_tasks_without_counting_a_failure() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    sup = fast()
    sup.start("usage_writer", forever)
    await asyncio.sleep(0.01)
    await sup.stop()
    assert cancelled.is_set() and sup.failures("usage_writer") == 0 and sup.healthy


async def test_metrics_report_failures_and_whether_each_task_is_running() -> None:
    sup = fast(backoff=lambda: Backoff(10))
    sup.start("key_refresh", Flaky(fails=1))
    await until(lambda: sup.failures("key_refresh") == 1)
    samples = {(name, labels["task"]): value for name, _, labels, value in sup.samples()}
    assert samples[("spendgate_background_task_failures_total", "key_refresh")] == 1
    assert samples[("spendgate_background_task_up", "key_refresh")] == 0
    await sup.stop()


# -- readiness: the health status Envoy and `spendgate up` see ------------------------------------
async def check(health: HealthServicer) -> int:
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""), None)
    return int(resp.status)


async def test_health_is_not_serving_until_loaded_and_serving_with_a_ready_file_after(tmp_path: Path) -> None:
    health = HealthServicer()
    ready = Readiness(health, tmp_path / "ready")
    await ready.refresh()
    assert await check(health) == NOT_SERVING and not (tmp_path / "ready").exists()
    ready.loaded = True
    await ready.refresh()
    assert await check(health) == SERVING
    assert (tmp_path / "ready").read_text().strip() == str(os.getpid())


async def test_a_failing_background_task_takes_the_process_out_of_rotation_until_it_recovers(
    tmp_path: Path,
) -> None:
    health = HealthServicer()
    ready = Readiness(health, tmp_path / "ready")
    ready.loaded = True
    await ready.refresh()
    sup = fast(on_health=ready.tasks_healthy)
    sup.start("key_refresh", Flaky(fails=3))
    await until(lambda: not sup.healthy)
    assert await check(health) == NOT_SERVING and not (tmp_path / "ready").exists()
    await until(lambda: sup.healthy)
    assert await check(health) == SERVING and (tmp_path / "ready").exists()
    await sup.stop()


async def test_a_stopping_process_is_not_serving(tmp_path: Path) -> None:
    health = HealthServicer()
    ready = Readiness(health, tmp_path / "ready")
    ready.loaded = True
    await ready.refresh()
    ready.stopping = True
    await ready.refresh()
    assert await check(health) == NOT_SERVING and not (tmp_path / "ready").exists()


# -- root causes --------------------------------------------------------------------------------
class FakeConn:
    """Answers KeyStore's two queries with fixed rows."""

    def __init__(self, credentials: list[tuple[Any, ...]], keys: list[tuple[Any, ...]]) -> None:
        self.rows = {"provider_credentials": credentials, "api_keys": keys}

    async def execute(self, sql: str) -> FakeConn.Result:
        table = "api_keys" if "FROM api_keys" in sql else "provider_credentials"
        return FakeConn.Result(self.rows[table])

    class Result:
        def __init__(self, rows: list[tuple[Any, ...]]) -> None:
            self._rows = rows

        async def fetchall(self) -> list[tuple[Any, ...]]:
            return self._rows


async def test_key_refresh_skips_a_credential_row_it_cannot_use_and_loads_every_other_key() -> None:
    keyring = Keyring(parse_master_key(generate_master_key()))
    good, bad_url, bad_cipher = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    secret = "sk-test-" + os.urandom(8).hex()

    def row(cid: uuid.UUID, base_url: str) -> tuple[Any, ...]:
        sealed = keyring.seal(secret, credential_aad(cid))
        return (cid, "openai", base_url, sealed.ciphertext, sealed.nonce, sealed.master_key_id, None)

    credentials = [
        row(bad_url, "ftp://not-a-provider"),
        (bad_cipher, "openai", "https://api.openai.com", b"garbage", b"\0" * 12, keyring.active_id, None),
        row(good, "https://api.openai.com"),
    ]
    keys = [
        (
            uuid.uuid4(),
            f"sg-key{n}",
            hashlib.sha256(f"k{n}".encode()).digest(),
            "n",
            "t",
            "p",
            None,
            None,
            cid,
        )
        for n, cid in enumerate((bad_url, bad_cipher, good))
    ]
    table = KeyTable()
    store = KeyStore("postgresql://unused", keyring, table)
    with capture_logs() as logs:
        await store.refresh(FakeConn(credentials, keys))  # type: ignore[arg-type]
    assert len(table) == 1
    skipped = [e for e in logs if e["event"] == "credential.skipped"]
    assert [e["credential_id"] for e in skipped] == [str(bad_url)] and "ValueError" in skipped[0]["error"]
    assert secret not in repr(logs)


def test_policy_reload_keeps_the_last_good_set_when_a_file_cannot_be_read(tmp_path: Path) -> None:
    shutil.copy(SHIPPED_PRICES, tmp_path / "pricing.yaml")
    (tmp_path / "p.yaml").write_text("policies:\n  - name: one\n    applies_to: {all: true}\n")
    store = PolicyStore(tmp_path)
    (tmp_path / "p.yaml").unlink()
    (tmp_path / "p.yaml").mkdir()  # reading it now raises IsADirectoryError, even as root
    assert store.reload_if_changed() is False
    assert [p.name for p in store.current.policies] == ["one"]
    assert store.reload_failures == 1 and "IsADirectoryError" in store.last_error[0]
    assert store.reload_if_changed() is False and store.reload_failures == 1  # counted once per cause
    (tmp_path / "p.yaml").rmdir()
    (tmp_path / "p.yaml").write_text("policies:\n  - name: two\n    applies_to: {all: true}\n")
    assert store.reload_if_changed() is True and store.last_error == []
