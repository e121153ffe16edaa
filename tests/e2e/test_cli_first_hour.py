"""A new user's first hour with the command line, against the session stack and its database.

Every mistake a newcomer makes (no database, a malformed master key, a credential or key that
does not exist or was revoked, a duration without a unit, a policy name that the policy set does
not define) ends in one line on stderr that names the next step, with the documented status
(docs/configuration.md: 2), and never in a traceback. An SDK pointed at the proxy without `/v1`
gets its POSTs refused, and that shows: in a Prometheus counter and in `spendgate usage`.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from tests.e2e.helpers import seen_by_provider
from tests.fakeprovider import FakeProvider
from tests.support import REPO, Issued, Stack, add_credential, issue_key, usage_rows

MESSAGES = [{"role": "user", "content": "hi"}]
UNACCOUNTED = re.compile(
    r'^spendgate_unaccounted_requests_total\{outcome="rejected",provider="openai"\} (\S+)$', re.M
)


def spendgate(
    stack: Stack, *args: str, env: dict[str, str | None] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, in the stack's environment with `env` laid over it (None unsets)."""
    full = dict(stack.env)
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        env=full,
        input=input if input is not None else "",
        text=True,
        capture_output=True,
        timeout=60,
    )


def assert_one_line_error(res: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The failure is one stderr line, no traceback, the documented status; returns the line."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert res.returncode == status, (res.returncode, res.stderr)
    return lines[0]


@dataclass
class Case:
    """One mistake, what the command line must name in its answer, and how to set it up."""

    args: tuple[str, ...]
    says: tuple[str, ...]
    env: dict[str, str | None] = field(default_factory=dict)
    input: str | None = None


def _revoked_key(stack: Stack, fake: FakeProvider) -> str:
    issued = issue_key(stack, "openai", fake.base_url)
    spendgate(stack, "keys", "revoke", str(issued.key_id)).check_returncode()
    return str(issued.key_id)


def _revoked_credential(stack: Stack, fake: FakeProvider) -> str:
    name = "gone-" + secrets.token_hex(3)
    add_credential(stack, "openai", name, fake.base_url)
    spendgate(stack, "providers", "revoke", name).check_returncode()
    return name


def _cases(stack: Stack, fake: FakeProvider, tmp: Path) -> dict[str, Case]:
    revoked_key = _revoked_key(stack, fake)
    revoked_credential = _revoked_credential(stack, fake)
    live = "live-" + secrets.token_hex(3)
    add_credential(stack, "openai", live, fake.base_url)
    empty_home = tmp / "empty-home"
    empty_home.mkdir()
    password = "pw" + secrets.token_hex(8)
    return {
        "no database": Case(
            ("keys", "list"),
            ("DATABASE_URL", "spendgate up"),
            env={"DATABASE_URL": None, "SPENDGATE_HOME": str(empty_home)},
        ),
        "database down": Case(
            ("usage",),
            ("cannot connect to the database", "DATABASE_URL"),
            env={"DATABASE_URL": f"postgresql://spendgate:{password}@127.0.0.1:1/spendgate"},
        ),
        "malformed master key": Case(
            ("providers", "add", "--provider", "openai", "--name", "x-" + secrets.token_hex(3)),
            ("SPENDGATE_MASTER_KEY", "spendgate master-key generate"),
            env={"SPENDGATE_MASTER_KEY": "this-is-not-a-master-key"},
            input="sk-test-" + secrets.token_hex(16) + "\n",
        ),
        "no master key": Case(
            ("providers", "add", "--provider", "openai", "--name", "x-" + secrets.token_hex(3)),
            ("no master key", "spendgate up"),
            env={"SPENDGATE_HOME": str(empty_home)},
            input="sk-test-" + secrets.token_hex(16) + "\n",
        ),
        "empty provider secret": Case(
            ("providers", "add", "--provider", "openai", "--name", "x-" + secrets.token_hex(3)),
            ("secret is empty", "--secret-env"),
        ),
        "unset secret variable": Case(
            (
                "providers",
                "add",
                "--provider",
                "openai",
                "--name",
                "x",
                "--secret-env",
                "NO_SUCH_VARIABLE_SET",
            ),
            ("NO_SUCH_VARIABLE_SET",),
        ),
        "credential name taken": Case(
            ("providers", "add", "--provider", "openai", "--name", live),
            ("already exists", "--name"),
            input="sk-test-" + secrets.token_hex(16) + "\n",
        ),
        "missing provider credential": Case(
            ("keys", "create", "--name", "app", "--provider", "no-such-credential"),
            ("no provider credential named 'no-such-credential'", "spendgate providers add"),
        ),
        "provider kind instead of name": Case(
            ("keys", "create", "--name", "app", "--provider", "anthropic"),
            ("credential's name", "spendgate providers list"),
        ),
        "revoked provider credential": Case(
            ("keys", "create", "--name", "app", "--provider", revoked_credential),
            ("is revoked", "spendgate providers add"),
        ),
        "revoking a revoked credential": Case(
            ("providers", "revoke", revoked_credential),
            ("is revoked",),
        ),
        "unknown provider kind": Case(
            ("providers", "add", "--provider", "mistral", "--name", "m"),
            ("--provider", "--help"),
        ),
        "unknown key name": Case(
            ("keys", "revoke", "checkout-service"),
            ("neither a key id nor a key prefix", "spendgate keys list"),
        ),
        "unknown key prefix": Case(
            ("keys", "rotate", "sg-00000000"),
            ("no key 'sg-00000000'", "spendgate keys list"),
        ),
        "revoked key id": Case(
            ("keys", "revoke", revoked_key),
            ("already revoked", "keys list --all"),
        ),
        "rotating a revoked key": Case(
            ("keys", "rotate", revoked_key),
            ("already revoked",),
        ),
        "duration without a unit": Case(
            ("keys", "create", "--name", "app", "--provider", live, "--expires-in", "30"),
            ("--expires-in", "30s, 15m, 12h, 7d or 2w", "--help"),
        ),
        "absurd duration": Case(
            ("usage", "--since", "999999999999d"),
            ("100 years",),
        ),
        "bad grace": Case(
            ("keys", "rotate", revoked_key, "--grace", "soon"),
            ("--grace",),
        ),
        "unknown report grouping": Case(
            ("usage", "--by", "colour"),
            ("--by", "key", "model"),
        ),
        "policy check of a missing directory": Case(
            ("policy", "check", str(tmp / "no-such-dir")),
            ("not a directory",),
        ),
        "break-glass key for a malformed URL": Case(
            ("breakglass", "set", "--provider", "openai", "--base-url", "api.openai.com"),
            ("--base-url", "http(s)://"),
        ),
        "subcommand missing": Case(("keys",), ("keys --help",)),
    }


@pytest.mark.slow  # two dozen fresh interpreters: about 20 s on the 2-core machine
def test_every_mistake_is_one_line_with_the_next_step(
    stack: Stack, fake: FakeProvider, tmp_path: Path
) -> None:
    cases = _cases(stack, fake, tmp_path)

    def check(name: str, case: Case) -> str | None:
        res = spendgate(stack, *case.args, env=case.env, input=case.input)
        try:
            line = assert_one_line_error(res)
            for text in case.says:
                assert text in line, f"{text!r} not in {line!r}"
            for secret in stack.secrets:
                assert secret not in res.stderr + res.stdout
            assert re.search(r"pw[0-9a-f]{16}", res.stderr) is None, "a database password was printed"
        except AssertionError as exc:
            return f"{name}: spendgate {' '.join(case.args)}: {exc}"
        return None

    # Each case is a fresh interpreter; two at a time keeps both cores busy.
    with ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(lambda item: check(*item), cases.items()) if f]
    assert failures == [], "\n".join(failures)


def _policy_dir(tmp: Path) -> Path:
    d = tmp / "policies"
    d.mkdir()
    for src in (REPO / "extproc" / "pricing.yaml", REPO / "policies" / "pricing.yaml"):
        if src.exists():  # wherever the shipped price table lives, the directory carries a copy
            (d / "pricing.yaml").write_text(src.read_text())
            break
    (d / "teams.yaml").write_text(
        "policies:\n"
        "  - name: payments\n    applies_to: {team: payments}\n    models: {allow: ['fake-*']}\n"
        "  - name: search\n    applies_to: {team: search}\n"
    )
    return d


def test_keys_create_refuses_a_policy_the_policy_set_does_not_define(
    stack: Stack, fake: FakeProvider, tmp_path: Path
) -> None:
    policies = _policy_dir(tmp_path)
    credential = "pol-" + secrets.token_hex(3)
    add_credential(stack, "openai", credential, fake.base_url)
    name = "typo-" + secrets.token_hex(3)
    create = ("keys", "create", "--name", name, "--provider", credential, "--json")

    # The typo is refused, naming what exists; nothing is stored.
    refused = spendgate(stack, *create, "--policy", "paymnets", "--policies", str(policies))
    line = assert_one_line_error(refused)
    assert "'paymnets'" in line and "payments, search" in line and "--allow-unknown-policy" in line
    assert refused.stdout == ""
    # The directory comes from SPENDGATE_POLICIES too, as for `serve`.
    refused = spendgate(stack, *create, "--policy", "paymnets", env={"SPENDGATE_POLICIES": str(policies)})
    assert "payments, search" in assert_one_line_error(refused)
    # A policy directory that is not there cannot vouch for any name.
    missing = spendgate(stack, *create, "--policy", "payments", "--policies", str(tmp_path / "nowhere"))
    assert "--policies" in assert_one_line_error(missing)
    listing = json.loads(spendgate(stack, "keys", "list", "--json").stdout)
    assert not [k for k in listing if k["name"] == name]

    # The right name is taken; a deliberate unknown one is stored with a loud warning, and
    # `keys list` keeps warning about it.
    ok = spendgate(stack, *create, "--policy", "payments", "--policies", str(policies))
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    stack.secrets.append(json.loads(ok.stdout)["key"])
    forced = spendgate(
        stack, *create, "--policy", "not-yet", "--policies", str(policies), "--allow-unknown-policy"
    )
    assert forced.returncode == 0, forced.stderr
    key = json.loads(forced.stdout)
    stack.secrets.append(key["key"])
    assert "warning" in forced.stderr and "'not-yet'" in forced.stderr
    listed = spendgate(stack, "keys", "list", "--policies", str(policies))
    assert listed.returncode == 0
    warnings = [w for w in listed.stderr.splitlines() if key["prefix"] in w]
    assert len(warnings) == 1 and "'not-yet'" in warnings[0] and "without" in warnings[0]
    assert key["key"] not in listed.stdout + listed.stderr


def _unaccounted(stack: Stack) -> float:
    m = UNACCOUNTED.search(stack.metrics())
    return float(m.group(1)) if m else 0.0


def _eventually(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_base_url_without_v1_is_refused_counted_and_reported(stack: Stack, fake: FakeProvider) -> None:
    team = "first-hour-" + secrets.token_hex(3)
    issued: Issued = issue_key(stack, "openai", fake.base_url, team=team)
    before = _unaccounted(stack)

    # The commonest first-hour mistake: the SDK's base URL without /v1.
    client = openai.OpenAI(base_url=stack.url, api_key=issued.key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="fake-openai-model", messages=MESSAGES)
    assert "not an API Spendgate meters" in str(refused.value)
    assert seen_by_provider(fake, issued) == []

    (row,) = usage_rows(stack, issued.key_id)
    assert (row["api"], row["outcome"], row["status"]) == ("passthrough", "rejected", 403)

    # Counted, by provider and outcome only: never the path the caller sent.
    _eventually(lambda: _unaccounted(stack) == before + 1, 10, "the unaccounted counter did not move")
    metrics = stack.metrics()
    assert "/chat/completions" not in metrics
    assert "# TYPE spendgate_unaccounted_requests_total counter" in metrics

    # `usage` shows them as such: a row of its own by model, a count per row, a line with the fix.
    text = spendgate(stack, "usage", "--by", "model")
    assert text.returncode == 0, text.stderr
    assert re.search(r"^\(passthrough\)\s", text.stdout, re.M)
    note = text.stdout.strip().splitlines()[-1]
    assert note.startswith("unaccounted (passthrough) requests: ") and "refused" in note
    assert "/v1" in note and "README" in note
    by_team = json.loads(spendgate(stack, "usage", "--by", "team", "--json").stdout)
    mine = next(r for r in by_team if r["team"] == team)
    with stack.connect() as conn:
        (expected,) = conn.execute(
            "SELECT count(*) FROM usage_events WHERE key_id = %s AND api = 'passthrough'", (issued.key_id,)
        ).fetchone() or (0,)
    assert mine["unaccounted"] == expected >= 1


def test_listings_align_numbers_right_and_text_left(stack: Stack, openai_key: Issued) -> None:
    openai.OpenAI(base_url=stack.url + "/v1", api_key=openai_key.key, max_retries=0).chat.completions.create(
        model="fake-openai-model", messages=MESSAGES
    )
    usage_rows(stack, openai_key.key_id)
    out = spendgate(stack, "usage", "--by", "key").stdout.splitlines()
    header = out[0]
    assert header.startswith("key ")
    row = next(line for line in out[1:] if line.startswith(openai_key.key[:11]))
    # Each number ends where its header ends; the key prefix starts where its header starts.
    for col in ("requests", "input_tokens", "cost_usd"):
        end = header.index(col) + len(col)
        assert row[end - 1] != " " and (end == len(row) or row[end] == " "), (col, header, row)
    for listing in (("keys", "list"), ("providers", "list")):
        lines = spendgate(stack, *listing).stdout.splitlines()
        assert lines[0].startswith("id ") and all(re.match(r"^[0-9a-f-]{36}  ", line) for line in lines[1:])


def test_help_ends_with_how_to_get_started(stack: Stack) -> None:
    res = spendgate(stack, "--help")
    assert res.returncode == 0 and res.stderr == ""
    tail = res.stdout[res.stdout.index("getting started") :]
    assert "spendgate up" in tail and "spendgate keys create" in tail and "/v1" in tail
    assert "\n\n" not in tail.strip()  # one block, the last one
