"""`spendgate policy check DIR`: validate a policy directory, naming file, line and reason."""

from __future__ import annotations

from pathlib import Path

from extproc.policy.loader import PolicyError, load_policy_dir


def check_dir(directory: Path) -> list[str]:
    """Problems found, as `file:line: reason` strings; empty when the directory is valid."""
    try:
        load_policy_dir(directory)
    except PolicyError as exc:
        return exc.problems
    return []
