"""What the command line prints, without a database: tables, empty listings, help and errors.

Tables: text columns left-aligned, number columns right-aligned, in every listing. Empty
listings say what there is none of. Every subcommand and flag has a help line, `--help` lists
each subcommand, and `spendgate --help` ends with the README's quick start. A user error is one
line on stderr naming the next step, with the documented exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import re
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from extproc import admin, cli, reports
from extproc.cli import build_parser, main
from extproc.providers.base import PASSTHROUGH

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


# -- tables ---------------------------------------------------------------------------------------
def _columns(line: str, widths: list[int]) -> list[str]:
    """Cut a table line into its cells (two spaces between columns) without stripping them."""
    out, pos = [], 0
    for w in widths:
        out.append(line[pos : pos + w])
        pos += w + 2
    return out


def test_text_columns_are_left_aligned_and_numbers_right_aligned() -> None:
    rows = [
        {"model": "gpt-4o", "requests": 3, "cost_usd": Decimal("1.5"), "team": None, "stream": True},
        {
            "model": "a-much-longer-model",
            "requests": 12345,
            "cost_usd": Decimal("0.25"),
            "team": "x",
            "stream": False,
        },
    ]
    text = reports.format_table(rows)
    header, *lines = text.splitlines()
    widths = [len("a-much-longer-model"), len("requests"), len("1.500000"), len("team"), len("stream")]
    head = _columns(header.ljust(sum(widths) + 8), widths)
    assert head[0] == "model".ljust(widths[0])  # a text column's header on the left
    assert head[1] == "requests" and head[2] == "cost_usd"  # as wide as their header or wider
    first = _columns(lines[0].ljust(sum(widths) + 8), widths)
    second = _columns(lines[1].ljust(sum(widths) + 8), widths)
    assert first[0] == "gpt-4o".ljust(widths[0]) and second[0] == "a-much-longer-model"
    assert first[1] == "3".rjust(widths[1]) and second[1] == "12345".rjust(widths[1])
    assert first[2] == "1.500000" and second[2] == "0.250000"
    assert first[3] == " " * widths[3] and second[3] == "x".ljust(widths[3])  # None is blank, text left
    assert first[4] == "True".ljust(widths[4])  # a flag is not a number
    assert all(line == line.rstrip() for line in text.splitlines()), "no trailing blanks"


def test_number_headers_are_right_aligned_over_wide_numbers() -> None:
    text = reports.format_table([{"name": "k", "n": 1234567}, {"name": "kk", "n": 5}])
    header, one, two = text.splitlines()
    assert header.endswith("      n") and one.endswith("1234567") and two.endswith("      5")
    assert header.startswith("name") and one.startswith("k   ") and two.startswith("kk  ")


def test_a_number_column_with_gaps_stays_right_aligned_and_times_are_readable() -> None:
    when = dt.datetime(2026, 12, 1, 9, 30, 5, 123456, tzinfo=dt.UTC)
    rows = [
        {"id": uuid.UUID(int=1), "left_usd": None, "resets": when},
        {"id": uuid.UUID(int=2), "left_usd": Decimal(7), "resets": None},
    ]
    lines = reports.format_table(rows).splitlines()
    assert "2026-12-01 09:30:05+00:00" in lines[1]  # to the second, with its offset
    col = lines[0].index("left_usd")
    assert lines[2][col : col + len("left_usd")].strip() == "" or lines[2].find("7.000000") >= col
    assert lines[2].split()[1] == "7.000000"


@pytest.mark.parametrize(
    "values, numeric",
    [
        ([1, 2, None], True),
        ([Decimal("1"), 2.5], True),
        ([None, None], False),
        ([True, False], False),
        (["1", 2], False),
    ],
)
def test_which_columns_count_as_numbers(values: list[Any], numeric: bool) -> None:
    assert reports._is_numeric_column(values) is numeric


def test_an_empty_table_says_what_is_empty() -> None:
    assert reports.format_table([], "no keys") == "no keys"
    assert reports.format_table([]) != "no usage in that period"


# -- empty listings, through the commands -----------------------------------------------------
@pytest.fixture
def no_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The commands' connection replaced by a stand-in; every query function is patched per test."""
    monkeypatch.setattr(cli, "_connect", lambda: contextlib.nullcontext(object()))
    monkeypatch.setenv("SPENDGATE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return tmp_path


@pytest.mark.parametrize(
    "argv, patch, expected",
    [
        (
            ["providers", "list"],
            (admin, "list_providers"),
            "no provider credentials; add one with `spendgate providers add`",
        ),
        (
            ["keys", "list"],
            (admin, "list_keys"),
            "no live keys (--all includes revoked ones); issue one with `spendgate keys create`",
        ),
        (["keys", "list", "--all"], (admin, "list_keys"), "no keys; issue one with `spendgate keys create`"),
        (["budgets"], (reports, "budget_report"), "no budget counters yet"),
        (["usage"], (reports, "usage_report"), "no usage in the last 30d"),
        (["usage", "--since", "2w"], (reports, "usage_report"), "no usage in the last 2w"),
        (["breakglass", "list"], None, "no break-glass keys; store one with `spendgate breakglass set`"),
    ],
)
def test_empty_listings_name_what_is_empty(
    no_database: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    patch: tuple[object, str] | None,
    expected: str,
) -> None:
    if patch is not None:
        monkeypatch.setattr(patch[0], patch[1], lambda *a, **k: [])
    monkeypatch.setattr(reports, "unaccounted_requests", lambda *a, **k: {})
    if argv[:2] == ["keys", "list"]:
        argv = [*argv, "--policies", str(no_database / "nowhere")]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out.startswith(expected), out.out
    assert "no usage in that period" not in out.out and out.err == ""


def test_empty_listings_in_json_are_empty_arrays(
    no_database: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(admin, "list_providers", lambda *a: [])
    assert main(["providers", "list", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"


# -- usage: unaccounted requests ----------------------------------------------------------------
def test_the_passthrough_api_name_is_the_one_records_carry() -> None:
    assert reports.PASSTHROUGH_API == PASSTHROUGH


def test_unaccounted_note_points_at_the_base_url_when_requests_were_refused() -> None:
    assert reports.unaccounted_note({}) is None
    note = reports.unaccounted_note({"rejected": 2, "complete": 1})
    assert note is not None
    assert note.startswith("unaccounted (passthrough) requests: 3 (2 refused, 1 forwarded)")
    assert "/v1" in note and "README" in note
    forwarded = reports.unaccounted_note({"complete": 4})
    assert forwarded is not None and "/v1" not in forwarded and "4 (0 refused, 4 forwarded)" in forwarded


def test_usage_prints_the_unaccounted_line_under_the_table(
    no_database: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    row = {"model": "(passthrough)", "requests": 1, "cost_usd": Decimal(0), "unaccounted": 1}
    monkeypatch.setattr(reports, "usage_report", lambda *a: [row])
    monkeypatch.setattr(reports, "unaccounted_requests", lambda *a: {"rejected": 1})
    assert main(["usage", "--by", "model"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["model", "requests", "cost_usd", "unaccounted"]
    assert out[-1].startswith("unaccounted (passthrough) requests: 1 (1 refused, 0 forwarded)")
    assert main(["usage", "--by", "model", "--json"]) == 0
    assert "unaccounted (passthrough)" not in capsys.readouterr().out  # JSON stays parseable: a field per row


def test_the_model_grouping_names_passthrough_rows() -> None:
    assert "(passthrough)" in reports.GROUPS["model"]


# -- help -------------------------------------------------------------------------------------------
def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _missing_help(parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if (a.help or "").strip()}
            missing += [f"subcommand {name}" for name in action.choices if name not in helped]
        elif not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            missing.append("/".join(action.option_strings) or action.dest)
    return missing


def test_every_subcommand_and_flag_has_a_help_line() -> None:
    missing = {
        " ".join(("spendgate", *path)): m
        for path, parser in _parsers(build_parser())
        if path[:1] != ("up",) and (m := _missing_help(parser))
    }
    assert missing == {}


# Kept apart from the test above because `up` has the most flags and changes most often.
def test_every_flag_of_up_has_a_help_line() -> None:
    missing = {
        " ".join(("spendgate", *path)): m
        for path, parser in _parsers(build_parser())
        if path[:1] == ("up",) and (m := _missing_help(parser))
    }
    assert missing == {}


@pytest.mark.parametrize(
    "group, actions",
    [
        ("providers", ["add", "list", "revoke"]),
        ("keys", ["create", "list", "revoke", "rotate"]),
        ("breakglass", ["set", "list", "remove"]),
        ("master-key", ["generate", "rotate"]),
        ("envoy", ["render", "clusters"]),
        ("policy", ["check"]),
    ],
)
def test_group_help_lists_every_subcommand_with_its_help(group: str, actions: list[str]) -> None:
    (parser,) = [p for path, p in _parsers(build_parser()) if path == (group,)]
    text = parser.format_help()
    for action in actions:
        assert re.search(rf"^\s+{re.escape(action)}\s+\S", text, re.M), (
            f"{group} --help lacks {action}:\n{text}"
        )


def test_policy_check_help_shows_its_own_usage() -> None:
    (parser,) = [p for path, p in _parsers(build_parser()) if path == ("policy", "check")]
    assert parser.format_usage().split() == ["usage:", "spendgate", "policy", "check", "[-h]", "DIR"]


def _readme_quick_start() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.splitlines():
            for m in re.finditer(r"(?:\S*/)?(spendgate(?: [^#&|]*)?)", line):
                commands.append(" ".join(m.group(1).split()))
    return commands


def test_top_level_help_ends_with_the_readme_quick_start() -> None:
    text = build_parser().format_help()
    tail = text[text.index("getting started") :]
    assert text.rstrip().endswith(tail.rstrip())  # the last block of the help
    quick = _readme_quick_start()
    assert quick, "README.md's Quick start shows no spendgate command"
    flat = " ".join(tail.split())
    for command in quick:
        assert command in flat, f"`{command}` (README quick start) is not in `spendgate --help`"
    assert "/v1" in tail  # where an SDK's base URL points


# -- errors ---------------------------------------------------------------------------------------
def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own exits
        status = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return status, err.strip()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["keys", "create", "--name", "a", "--provider", "p", "--expires-in", "5x"], "--expires-in"),
        (["keys", "create", "--name", "a", "--provider", "p", "--expires-in", "999999999w"], "100 years"),
        (["keys", "create", "--name", "a"], "--provider"),
        (["keys", "rotate", "k", "--grace", "soon"], "--grace"),
        (["usage", "--since", "10"], "--since"),
        (["usage", "--by", "colour"], "--by"),
        (["providers", "add", "--provider", "mistral", "--name", "m"], "--provider"),
        (["providers"], "providers"),
        (["serve", "--metrics-listen", "nine"], "host:port"),
        (["probe", "--key-env", "K", "--timeout", "-1"], "--timeout"),
        (["policy", "check"], "DIR"),
        (["bogus"], "bogus"),
        ([], "COMMAND"),
    ],
)
def test_bad_arguments_are_one_line_that_points_at_help(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _fails(argv, capsys)
    assert status == 2 and says in err and "--help" in err


def test_no_database_is_one_line_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("SPENDGATE_HOME", str(tmp_path))
    for argv in (
        ["keys", "list"],
        ["providers", "list"],
        ["usage"],
        ["budgets"],
        ["keys", "revoke", "sg-12345678"],
    ):
        status, err = _fails(argv, capsys)
        assert status == 2 and "DATABASE_URL" in err and "spendgate up" in err


def test_a_malformed_master_key_names_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPENDGATE_HOME", str(tmp_path))
    monkeypatch.setenv("SPENDGATE_MASTER_KEY", "not-a-key")
    secret = "sk-test-" + uuid.uuid4().hex  # made at run time: no key-shaped literal in the repo
    monkeypatch.setenv("SECRET", secret)
    status, err = _fails(
        ["providers", "add", "--provider", "openai", "--name", "n", "--secret-env", "SECRET"], capsys
    )
    assert status == 2 and "SPENDGATE_MASTER_KEY" in err and "master-key generate" in err
    monkeypatch.delenv("SPENDGATE_MASTER_KEY")
    status, err = _fails(
        ["providers", "add", "--provider", "openai", "--name", "n", "--secret-env", "SECRET"], capsys
    )
    assert status == 2 and "no master key" in err and "spendgate up" in err
    assert secret not in err


def test_an_unknown_policy_is_refused_before_the_database_is_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    for name in ("pricing.yaml",):
        for src in (REPO / "extproc" / name, REPO / "policies" / name):
            if src.exists():
                (policies / name).write_text(src.read_text())
                break
    (policies / "team.yaml").write_text(
        "policies:\n  - name: payments\n    applies_to: {team: payments}\n"
        "  - name: search\n    applies_to: {team: search}\n"
    )
    monkeypatch.delenv("DATABASE_URL", raising=False)  # were the database asked, this would fail differently
    monkeypatch.setenv("SPENDGATE_HOME", str(tmp_path))
    argv = ["keys", "create", "--name", "k", "--provider", "p", "--policies", str(policies)]
    status, err = _fails([*argv, "--policy", "paymnets"], capsys)
    assert (
        status == 2 and "'paymnets'" in err and "payments, search" in err and "--allow-unknown-policy" in err
    )
    monkeypatch.setenv("SPENDGATE_POLICIES", str(tmp_path / "missing"))
    status, err = _fails(["keys", "create", "--name", "k", "--provider", "p", "--policy", "payments"], capsys)
    assert status == 2 and "--policies" in err and "SPENDGATE_POLICIES" in err


def test_a_policy_with_no_policy_directory_to_check_it_against_is_refused() -> None:
    with pytest.raises(admin.AdminError) as refused:
        cli._check_policy_name("payments", None)
    assert "no policy directory" in str(refused.value) and "--policies" in str(refused.value)


def test_policy_check_of_a_path_that_is_no_directory_is_a_bad_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _fails(["policy", "check", str(tmp_path / "nope")], capsys)
    assert status == 2 and "not a directory" in err


@pytest.mark.parametrize(
    "exc, says",
    [
        (OSError(13, "Permission denied", "/etc/x"), "Permission denied: /etc/x"),
        (
            RuntimeError("no database: set DATABASE_URL\nsecond line"),
            "no database: set DATABASE_URL second line",
        ),
        (admin.AdminError("refused; do this"), "refused; do this"),
    ],
)
def test_user_errors_become_one_line(exc: Exception, says: str) -> None:
    text = cli._user_error(exc)
    assert text is not None and says in text and "\n" not in text


def test_a_bug_keeps_its_traceback() -> None:
    assert cli._user_error(KeyError("x")) is None


def test_a_whole_key_is_never_echoed_back() -> None:
    key = "sg-" + "A" * 43
    assert admin.shown(key) == "sg-AAAAAAAA..." and admin.shown("sg-AAAAAAAA") == "sg-AAAAAAAA"
    assert admin.shown("0f1e") == "0f1e"


# -- arguments ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, seconds", [("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 604800), ("2w", 1209600)]
)
def test_durations(text: str, seconds: int) -> None:
    assert cli._duration(text) == dt.timedelta(seconds=seconds)
    assert cli._duration_text(cli._duration(text)) == text


@pytest.mark.parametrize("text", ["", "5", "5x", "-1d", "1.5h", "99999999w"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli._duration(text)


@pytest.mark.parametrize("text", ["nine", "host:", "host:0", "host:70000", ":x"])
def test_bad_host_ports(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli._host_port(text)


def test_host_port_defaults_the_host() -> None:
    assert cli._host_port(":9464") == ("127.0.0.1", 9464) and cli._host_port("0.0.0.0:1") == ("0.0.0.0", 1)
