"""The docs and the command line agree, both ways.

Every `spendgate ...` command the README and docs/*.md show (in code blocks and inline code) is
walked through the real argparse tree of `extproc.cli`: each subcommand must exist, each flag
must be one that subcommand accepts, each positional choice (`envoy render`) must be offered,
and a flag value must be one of its choices when it has some. The other way round, every
subcommand, flag and positional choice the parser has must appear in docs/configuration.md,
the reference. The parser is built live, so a flag added or renamed in cli.py fails here until
the docs follow.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from extproc.cli import build_parser

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
REFERENCE = REPO / "docs" / "configuration.md"

# What runs the `spendgate` program: the console script (any path to it), `python -m extproc`, and
# the compose file's extproc service, whose image has `spendgate` as its entrypoint.
_PROGRAM = re.compile(
    r"(?<![\w.-])"
    r"(?:spendgate|python3? -m extproc|docker[ -]compose run(?:\s+-{1,2}[\w-]+)*\s+extproc)"
    r"(?=\s|$)"
)
# Where a command ends inside a line of shell.
_SHELL_STOP = {"|", "||", "&&", ";", ">", ">>", "<", "2>", "2>&1", "&"}
# Flags written bare in inline code (`--mode`) that belong to other programs, not to spendgate.
FOREIGN_FLAGS = {
    "--base-id": "envoy",
    "--concurrency": "envoy",
    "--log-level": "envoy",
    "--file-flush-interval-msec": "envoy",
    "--mode": "envoy",
}


@dataclass(frozen=True)
class Snippet:
    """A piece of code in a doc: one fenced line (continuations joined) or one inline span."""

    doc: Path
    line: int
    text: str

    def where(self) -> str:
        name = self.doc.relative_to(REPO) if self.doc.is_relative_to(REPO) else self.doc.name
        return f"{name}:{self.line}"


@dataclass(frozen=True)
class Use:
    """A subcommand path the docs name, and a flag or positional choice used with it."""

    path: tuple[str, ...]
    flag: str | None = None  # an option string, or None for the command itself
    choice: str | None = None  # a value given to a positional with choices


def snippets(doc: Path) -> Iterator[Snippet]:
    """Code in a markdown file: fenced lines (with their continuation lines) and inline spans."""
    lines = doc.read_text().splitlines()
    prose: list[tuple[int, str]] = []
    fenced = False
    block: list[tuple[int, str]] = []
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            if fenced:
                yield from _fenced(doc, block)
                block = []
            fenced = not fenced
            continue
        (block if fenced else prose).append((n, line))
    # Inline spans may wrap across lines of a paragraph: read the prose as one text.
    text = "\n".join(line for _, line in prose)
    starts = []
    offset = 0
    for n, line in prose:
        starts.append((offset, n))
        offset += len(line) + 1
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        line_no = max(n for off, n in starts if off <= m.start())
        yield Snippet(doc, line_no, " ".join(m.group(1).split()))


def _fenced(doc: Path, block: list[tuple[int, str]]) -> Iterator[Snippet]:
    """Lines of a code block; a trailing backslash, or an argparse usage line's indented `[...`
    continuation, joins the next line to the command."""
    current: tuple[int, str] | None = None
    for n, line in block:
        if current is not None:
            start, text = current
            if text.endswith("\\"):
                current = (start, text[:-1] + " " + line.strip())
                continue
            if line.startswith(" ") and line.strip().startswith(("[", "{")) and _PROGRAM.search(text):
                current = (start, text + " " + line.strip())
                continue
            yield Snippet(doc, start, text)
        current = (n, line.rstrip())
    if current is not None:
        yield Snippet(doc, *current)


def commands(snippet: Snippet) -> Iterator[list[str]]:
    """The argument words of every spendgate command in a snippet."""
    for m in _PROGRAM.finditer(snippet.text):
        words = []
        rest = re.sub(r"<[^<>]*>", "<value>", snippet.text[m.end() :])  # `<that file>` is one value
        for raw in rest.split():
            if raw in _SHELL_STOP or raw.startswith("#"):
                break
            word = raw.strip("[]()`,.;:")
            if word.startswith("-") and "=" in word:
                word = word.split("=", 1)[0]
            if word:
                words.append(word)
        yield words


def _alternatives(word: str) -> list[str]:
    """`{a,b}` and `a|b` name several values at once."""
    if word.startswith("{") and word.endswith("}"):
        return [w for w in word[1:-1].split(",") if w]
    if "|" in word:
        return [w for w in word.split("|") if w]
    return [word]


def _placeholder(word: str) -> bool:
    """A stand-in for a value (`KEY`, `DIR`, `<new>`, `$VAR`, `...`, `sg-...`), not a literal."""
    return (
        "..." in word
        or word.startswith(("<", "$", '"', "'"))
        or re.fullmatch(r"[A-Z][A-Z0-9_-]*", word) is not None
    )


def _subparsers(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
    ]


def walk(words: list[str], root: argparse.ArgumentParser) -> tuple[list[Use], list[str]]:
    """Follow `words` through the parser: what they use, and what the parser would refuse."""
    uses: list[Use] = []
    problems: list[str] = []

    def go(parser: argparse.ArgumentParser, path: tuple[str, ...], rest: list[str], pos: int) -> None:
        uses.append(Use(path))
        shown = " ".join(("spendgate", *path))
        i = 0
        while i < len(rest):
            word = rest[i]
            if word.startswith("-") and len(word) > 1 and not word.startswith("-{"):
                i += 1
                if word in ("-h", "--help"):
                    continue
                action = parser._option_string_actions.get(word)
                if action is None:
                    problems.append(f"`{shown}` has no flag {word}")
                    continue
                uses.append(Use(path, flag=word))
                if action.nargs == 0:
                    continue
                if i < len(rest) and not rest[i].startswith("-"):
                    value = rest[i]
                    i += 1
                    if action.choices and not _placeholder(value):
                        bad = [v for v in _alternatives(value) if v not in action.choices]
                        if bad:
                            problems.append(f"`{shown} {word}` does not accept {', '.join(bad)}")
                continue
            sub = _subparsers(parser)
            if sub is not None:
                if _placeholder(word):
                    return
                names = _alternatives(word)
                unknown = [n for n in names if n not in sub.choices]
                if unknown:
                    problems.append(f"`{shown}` has no subcommand {', '.join(unknown)}")
                    return
                for n in names:
                    go(sub.choices[n], (*path, n), rest[i + 1 :], 0)
                return
            positionals = _positionals(parser)
            if pos >= len(positionals):
                problems.append(f"`{shown}` takes no argument {word!r}")
                return
            action = positionals[pos]
            pos += 1
            i += 1
            if action.choices and not _placeholder(word):
                for value in _alternatives(word):
                    if value in action.choices:
                        uses.append(Use(path, choice=value))
                    else:
                        problems.append(
                            f"`{shown}` does not accept {value!r} (choices: {list(action.choices)})"
                        )

    go(root, (), words, 0)
    return uses, problems


def _headed_tables(
    doc: Path, root: argparse.ArgumentParser
) -> Iterator[tuple[Snippet, tuple[str, ...], str]]:
    """Flag tables under a heading that names one command (`### \\`spendgate up\\``): each row whose
    first cell is a flag, with the command it documents."""
    path: tuple[str, ...] | None = None
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        if line.startswith("#"):
            path = None
            spans = re.findall(r"`([^`]+)`", line)
            if len(spans) == 1 and not re.search(r"[|{]", spans[0]):
                for words in commands(Snippet(doc, n, spans[0])):
                    uses, problems = walk(words, root)
                    paths = {u.path for u in uses}
                    if not problems and len(paths) > 0:
                        path = max(paths, key=len)
            continue
        m = re.match(r"\|\s*`(--?[a-z][a-z0-9-]*)[^`]*`\s*\|", line)
        if m and path is not None:
            yield Snippet(doc, n, line), path, m.group(1)


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    sub = _subparsers(parser)
    if sub is None:
        yield path, parser
        return
    for name, child in sub.choices.items():
        yield from _leaves(child, (*path, name))


def documented(doc: Path, root: argparse.ArgumentParser) -> tuple[set[Use], list[str]]:
    """Everything `doc` uses, and every problem the parser finds with it."""
    found: set[Use] = set()
    problems: list[str] = []
    for snippet in snippets(doc):
        for words in commands(snippet):
            uses, errs = walk(words, root)
            found.update(uses)
            problems += [f"{snippet.where()}: {e}" for e in errs]
        bare = re.fullmatch(r"(--[a-z][a-z0-9-]*)(?:[ =].*)?", snippet.text)
        if bare and bare.group(1) not in FOREIGN_FLAGS and bare.group(1) not in _all_flags(root):
            problems.append(f"{snippet.where()}: no spendgate command has a flag {bare.group(1)}")
    for snippet, path, flag in _headed_tables(doc, root):
        parser = dict(_leaves(root)).get(path)
        if parser is None or flag not in parser._option_string_actions:
            problems.append(f"{snippet.where()}: `spendgate {' '.join(path)}` has no flag {flag}")
        else:
            found.add(Use(path, flag=flag))
    return found, problems


def _all_flags(root: argparse.ArgumentParser) -> set[str]:
    return {s for _, p in _leaves(root) for a in p._actions for s in a.option_strings}


def undocumented(doc: Path, root: argparse.ArgumentParser) -> list[str]:
    """Every subcommand, flag and positional choice of the parser that `doc` does not show."""
    found, _ = documented(doc, root)
    missing = []
    for path, sub in _leaves(root):
        shown = " ".join(("spendgate", *path))
        if Use(path) not in found:
            missing.append(f"`{shown}` is not shown")
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                if not any(Use(path, flag=s) in found for s in action.option_strings):
                    missing.append(f"`{shown}` {'/'.join(action.option_strings)} is not documented")
            elif action.choices:
                missing += [
                    f"`{shown} {c}` is not shown" for c in action.choices if Use(path, choice=c) not in found
                ]
    return missing


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def test_the_docs_are_found() -> None:
    assert REFERENCE in DOCS and len(DOCS) >= 5, DOCS


def _toy_parser() -> argparse.ArgumentParser:
    """A parser of both shapes the CLI uses: nested subcommands, and a positional with choices."""
    p = argparse.ArgumentParser(prog="spendgate")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up")
    up.add_argument("--home")
    up.add_argument("--port", type=int)
    sub.add_parser("serve").add_argument("--listen")
    sub.add_parser("usage").add_argument("--by", choices=["key", "model"])
    keys = sub.add_parser("keys").add_subparsers(dest="action", required=True)
    rotate = keys.add_parser("rotate")
    rotate.add_argument("key")
    rotate.add_argument("--grace")
    keys.add_parser("create").add_argument("--name")
    envoy = sub.add_parser("envoy")
    envoy.add_argument("action", choices=["render", "clusters"])
    envoy.add_argument("--out")
    providers = sub.add_parser("providers").add_subparsers(dest="action", required=True)
    add = providers.add_parser("add")
    add.add_argument("--provider", choices=["openai", "anthropic"])
    add.add_argument("--name")
    glass = sub.add_parser("breakglass").add_subparsers(dest="action", required=True)
    glass.add_parser("set").add_argument("--json", action="store_true")
    glass.add_parser("list")
    return p


def test_the_extractor_reads_usage_lines_wrapped_commands_and_inline_code(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "Run `spendgate keys rotate KEY [--grace GRACE]` or\n`spendgate envoy\nrender --out OUT`.\n\n"
        "```\nspendgate up [-h] [--home HOME]\n             [--port PORT]\n"
        "ExecStart=/opt/x/bin/spendgate serve \\\n    --listen unix:/s.sock\n"
        "spendgate usage --by model   # or --by nothing\n"
        "docker compose run --rm -T extproc providers add --provider openai --name x\n"
        "spendgate breakglass set|list\nspendgate nosuch --x\nspendgate keys create --bogus\n"
        "spendgate usage --by weekday\nspendgate envoy spin\n```\n\n"
        "| Flag | Meaning |\n|---|---|\n| `--home HOME` | ... |\n"
    )
    parser = _toy_parser()
    found, problems = documented(doc, parser)
    for path, flag in [
        (("keys", "rotate"), "--grace"),
        (("envoy",), "--out"),
        (("up",), "--home"),
        (("up",), "--port"),
        (("serve",), "--listen"),
        (("usage",), "--by"),
        (("providers", "add"), "--provider"),
    ]:
        assert Use(path, flag=flag) in found, (path, flag)
    assert Use(("envoy",), choice="render") in found
    assert {Use(("breakglass", "set")), Use(("breakglass", "list"))} <= found
    assert len(problems) == 4, problems
    assert any("no subcommand nosuch" in p for p in problems)
    assert any("no flag --bogus" in p for p in problems)
    assert any("does not accept weekday" in p for p in problems)
    assert any("'spin'" in p for p in problems)
    assert undocumented(doc, parser) == [
        "`spendgate keys create` --name is not documented",
        "`spendgate envoy clusters` is not shown",
        "`spendgate breakglass set` --json is not documented",
    ]


def test_a_flag_table_under_a_command_heading_belongs_to_that_command(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "### `spendgate up`\n\n| Flag | Meaning |\n|---|---|\n| `--home HOME` | state |\n"
        "| `--listen L` | wrong command |\n\n### Other\n\n| `--home` | not a command's table |\n"
    )
    found, problems = documented(doc, _toy_parser())
    assert Use(("up",), flag="--home") in found
    assert problems == ["doc.md:6: `spendgate up` has no flag --listen"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_every_command_and_flag_in_the_docs_is_one_the_cli_accepts(
    doc: Path, parser: argparse.ArgumentParser
) -> None:
    _, problems = documented(doc, parser)
    assert not problems, "\n".join(problems)


def test_every_command_flag_and_choice_of_the_cli_is_in_the_configuration_reference(
    parser: argparse.ArgumentParser,
) -> None:
    missing = undocumented(REFERENCE, parser)
    assert not missing, f"{REFERENCE.relative_to(REPO)} lacks:\n" + "\n".join(missing)
