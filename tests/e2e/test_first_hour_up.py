"""`spendgate up` in a user's first hour: one stack per home, a second home without flags, hang-ups
and kills that leave nothing running, the shipped price table outside a checkout, and errors that
say what to do. Real `up` processes throughout, on the embedded Postgres where that is the point."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psutil
import pytest

from extproc.pricing import SHIPPED_PRICES
from tests.e2e.helpers import openai_client
from tests.e2e.test_stack import processes_of
from tests.fakeprovider import FakeProvider
from tests.support import REPO, Stack, free_port, issue_key, start_stack, usage_rows

MESSAGES = [{"role": "user", "content": "hi"}]
BANNER = "Spendgate is up"
# Output no user can act on (issue 8, item 7).
NOISE = (
    "RuntimeDirWarning",
    "XDG_RUNTIME_DIR",
    "no configured limit to the number of allowed active downstream",
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory outside pytest's base directory.

    The embedded Postgres runs as its own user (`pgserver` under root), which must be able to
    reach its data directory; any pytest session started meanwhile makes /tmp/pytest-of-<user>
    private again, and a Postgres started after that could not open its own files.
    """
    d = Path(tempfile.mkdtemp(prefix="sg-first-hour-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(home: Path, **extra: str) -> dict[str, str]:
    drop = ("DATABASE_URL", "SPENDGATE_MASTER_KEY", "SPENDGATE_POLICIES", "XDG_RUNTIME_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SPENDGATE_")}
    return {**env, "SPENDGATE_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


def _launch(
    workdir: Path, name: str, *args: str, env: dict[str, str], cwd: Path | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    """`spendgate up ARGS` as a user types it, its output in workdir/NAME.log."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc", "up", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd or workdir,
        )
    return proc, log


def _banner(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while BANNER not in (text := log.read_text(errors="replace")) or "Ctrl-C stops" not in text:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"spendgate up did not come up:\n{text[-4000:]}")
        time.sleep(0.1)
    return text


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return proc.returncode


def _row(banner: str, name: str) -> str:
    m = re.search(rf"^  {name}:\s+(.*)$", banner, re.M)
    assert m, f"no {name} line in:\n{banner}"
    return m.group(1)


def _port_of(url_line: str) -> int:
    m = re.match(r"https?://[^:]+:(\d+)", url_line)
    assert m, url_line
    return int(m.group(1))


def _postmaster(home: Path) -> int:
    return int((home / "pgdata" / "postmaster.pid").read_text().splitlines()[0])


def _gone(home: Path, timeout: float = 15) -> list[psutil.Process]:
    """The processes still naming `home` once `timeout` is over (or sooner, when none are)."""
    deadline = time.monotonic() + timeout
    while (left := processes_of(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _no_noise(text: str) -> None:
    for noise in NOISE:
        assert noise not in text, f"{noise!r} in up's output:\n{text[-3000:]}"


def test_a_second_up_on_the_same_home_refuses_at_once_and_leaves_the_first_serving(
    workdir: Path, fake: FakeProvider
) -> None:
    first = start_stack(None, workdir)
    try:
        pg_pid = _postmaster(first.home)
        url_file = (first.home / "database_url").read_text()
        t0 = time.monotonic()
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "extproc",
                "up",
                "--port",
                str(free_port()),
                "--admin-port",
                str(free_port()),
            ],
            env={k: v for k, v in first.env.items() if k != "DATABASE_URL"},  # as the first was started
            capture_output=True,
            text=True,
            timeout=30,
            cwd=workdir,
        )
        took = time.monotonic() - t0
        assert second.returncode == 1, second
        err = second.stderr.strip()
        assert str(first.proc.pid) in err and first.url in err, err
        assert "--home" in err and "SPENDGATE_HOME" in err and "Traceback" not in err
        assert BANNER not in second.stdout
        assert took < 10, took  # refused before starting anything

        # The first stack lost nothing: its URL file, its Postgres, its recording.
        assert (first.home / "database_url").read_text() == url_file
        assert _postmaster(first.home) == pg_pid and psutil.pid_exists(pg_pid)
        issued = issue_key(first, "openai", fake.base_url)
        openai_client(first, issued.key).chat.completions.create(model="fake-openai-model", messages=MESSAGES)
        assert len(usage_rows(first, issued.key_id)) == 1
        assert all(p.stat().st_size == 0 for p in first.home.glob("spool-*.jsonl"))  # nothing spooled
    finally:
        assert first.stop() == 0
    assert _gone(first.home) == []


def test_a_second_home_starts_without_port_flags_and_prints_the_ports_it_took(workdir: Path) -> None:
    a_home, b_home = workdir / "a", workdir / "b"
    a, a_log = _launch(workdir, "a", "--port", str(free_port()), env=_env(a_home))
    try:
        a_banner = _banner(a, a_log)
        b, b_log = _launch(workdir, "b", "--port", str(free_port()), env=_env(b_home))
        try:
            b_banner = _banner(b, b_log)
            ports = {}
            for name, banner in (("a", a_banner), ("b", b_banner)):
                ports[name] = (_port_of(_row(banner, "admin")), _port_of(_row(banner, "metrics")))
                admin, metrics = ports[name]
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=5) as r:
                    assert r.status == 200
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                    assert b"spendgate_" in r.read()
            assert ports["a"][0] != ports["b"][0] and ports["a"][1] != ports["b"][1]
            if ports["a"] == (9901, 9464):  # else something else on this machine holds the defaults
                assert "(9901 is in use)" in _row(b_banner, "admin")
                assert "(9464 is in use)" in _row(b_banner, "metrics")
            # Envoy's --base-id follows the admin port, so the two Envoys share no memory region.
            envoys = [p for h in (a_home, b_home) for p in processes_of(h) if "--base-id" in p.cmdline()]
            ids = {p.cmdline()[p.cmdline().index("--base-id") + 1] for p in envoys}
            assert len(envoys) == 2 and len(ids) == 2
        finally:
            assert _stop(b) == 0
    finally:
        assert _stop(a) == 0
    assert _gone(a_home) == [] and _gone(b_home) == []


def test_sighup_stops_everything_as_ctrl_c_does(workdir: Path) -> None:
    stack = start_stack(None, workdir)
    pg_pid = _postmaster(stack.home)
    assert _stop(stack.proc, signal.SIGHUP) == 0, stack.logs()[-3000:]
    assert _gone(stack.home) == []
    assert not psutil.pid_exists(pg_pid) or psutil.Process(pg_pid).status() == psutil.STATUS_ZOMBIE
    assert not (stack.home / "pgdata" / "postmaster.pid").exists()
    assert not (stack.home / "database_url").exists()


def test_a_killed_up_leaves_a_postgres_that_the_next_up_stops_and_says_so(workdir: Path) -> None:
    stack = start_stack(None, workdir)
    orphan = _postmaster(stack.home)
    stack.proc.kill()  # SIGKILL: no handler runs; the children go with PR_SET_PDEATHSIG, Postgres stays
    stack.proc.wait()
    deadline = time.monotonic() + 20
    while any(p.name() != "postgres" for p in processes_of(stack.home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {p.name() for p in processes_of(stack.home)} == {"postgres"}
    assert psutil.pid_exists(orphan)

    again = start_stack(None, workdir)
    try:
        assert f"stopped an embedded Postgres (pid {orphan})" in again.logs()
        assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
        assert _postmaster(again.home) != orphan
        with again.connect() as conn:
            assert conn.execute("SELECT count(*) FROM api_keys").fetchone() is not None
    finally:
        assert again.stop() == 0
    assert _gone(again.home) == []


def test_a_stop_signal_during_start_up_leaves_nothing_running(workdir: Path) -> None:
    home = workdir / "home"
    proc, log = _launch(workdir, "up", "--port", str(free_port()), env=_env(home))
    deadline = time.monotonic() + 30
    while "embedded_postgres.started" not in log.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        time.sleep(0.02)
    status = _stop(proc, signal.SIGTERM)
    text = log.read_text()
    # Usually caught mid-start (128 + SIGTERM); on a fast run the stack may have come up first.
    assert status in (0, 128 + signal.SIGTERM), text[-3000:]
    assert "Traceback" not in text
    if status:
        assert "stopped by SIGTERM before the stack was up" in text
    assert _gone(home) == []


def test_up_outside_a_checkout_without_policies_uses_the_shipped_prices_and_prints_no_noise(
    workdir: Path, database: str, fake: FakeProvider
) -> None:
    tmp_path = workdir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert not (elsewhere / "policies").exists() and REPO not in elsewhere.parents
    home = tmp_path / "home"
    proc, log = _launch(
        tmp_path, "up", "--port", str(free_port()), env=_env(home, DATABASE_URL=database), cwd=elsewhere
    )
    try:
        banner = _banner(proc, log)
        assert _row(banner, "policies").startswith("none")
        assert _row(banner, "prices").startswith("the shipped price table, version ")
        stack = Stack(
            proc, home, _env(home, DATABASE_URL=database), _port_of(_row(banner, "proxy")), 0, log, database
        )
        issued = issue_key(stack, "openai", fake.base_url)
        openai_client(stack, issued.key).chat.completions.create(model="fake-openai-model", messages=MESSAGES)
        (row,) = usage_rows(stack, issued.key_id)
        assert row["cost_usd"] > 0 and row["price_version"] in banner
    finally:
        assert _stop(proc) == 0
    _no_noise(log.read_text())


USER_PRICES = """\
version: "user-prices-1"
effective_date: 2026-01-01
models:
  fake-openai-model: {provider: openai, input: "100", cached_input: "50", output: "200", max_output_tokens: 1000}
"""


def test_a_pricing_yaml_in_the_policy_directory_replaces_the_shipped_table(
    workdir: Path, database: str, fake: FakeProvider
) -> None:
    policies = workdir / "policies"
    policies.mkdir()
    (policies / "pricing.yaml").write_text(USER_PRICES)
    stack = start_stack(database, workdir, policies=policies)
    try:
        banner = stack.logs()
        assert _row(banner, "prices") == f"{policies / 'pricing.yaml'}, version user-prices-1"
        assert _row(banner, "policies").startswith(f"{policies} (0 policies)")
        issued = issue_key(stack, "openai", fake.base_url)
        openai_client(stack, issued.key).chat.completions.create(model="fake-openai-model", messages=MESSAGES)
        (row,) = usage_rows(stack, issued.key_id)
        assert row["price_version"] == "user-prices-1"
        cached, uncached = row["cached_input_tokens"], row["input_tokens"] - row["cached_input_tokens"]
        expected = Decimal(uncached * 100 + cached * 50 + row["output_tokens"] * 200) / 10**6
        assert row["output_tokens"] > 0 and row["cost_usd"] == expected
    finally:
        assert stack.stop() == 0
    assert SHIPPED_PRICES.exists()


@pytest.mark.parametrize(
    ("how", "knob"),
    [("flag", "pass --port or set SPENDGATE_PORT"), ("env", "pass --admin-port or set SPENDGATE_ADMIN_PORT")],
)
def test_a_busy_port_is_one_line_naming_its_flag_and_variable_and_exit_1(
    workdir: Path, how: str, knob: str
) -> None:
    home = workdir / "home"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        if how == "flag":
            args, env = ["--port", str(port)], _env(home)
        else:
            args, env = ["--port", str(free_port())], _env(home, SPENDGATE_ADMIN_PORT=str(port))
        res = subprocess.run(
            [sys.executable, "-m", "extproc", "up", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=workdir,
        )
    assert res.returncode == 1, res
    assert res.stderr.strip().splitlines() == [
        f"spendgate: port {port} ({'proxy' if how == 'flag' else 'admin'}) is in use: {knob}"
    ]
    assert not (home / "pgdata").exists()  # refused before starting anything
    assert _gone(home, timeout=1) == []
