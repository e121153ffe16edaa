"""The code gates: ruff and mypy --strict on extproc/ run with the tests, so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    res = run("ruff", "check", "extproc", "tests", "bench")
    assert res.returncode == 0, res.stdout[-4000:]


def test_ruff_format_is_applied() -> None:
    res = run("ruff", "format", "--check", "extproc")
    assert res.returncode == 0, res.stdout[-4000:]


def test_mypy_strict_is_clean_on_extproc() -> None:
    res = run("mypy", "--strict", "extproc")
    assert res.returncode == 0, res.stdout[-4000:]
