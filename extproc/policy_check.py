"""`spendgate policy check DIR`: validate a policy directory, naming file, line and reason."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from extproc.pricing import PriceTable


def _line_of(path: Path, key: str) -> int:
    """Best-effort line of a YAML key, for error messages."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith(f"{key}:"):
            return i
    return 1


def check_dir(directory: Path) -> list[str]:
    """Problems found, as `file:line: reason` strings; empty when the directory is valid."""
    pricing = directory / "pricing.yaml"
    if not pricing.exists():
        return [f"{pricing}:1: missing (every policy directory needs a price table)"]
    try:
        doc = yaml.safe_load(pricing.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        return [f"{pricing}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}"]
    try:
        PriceTable.model_validate(doc)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            loc = [str(x) for x in err["loc"]]
            anchor = loc[1] if len(loc) > 1 and loc[0] == "models" else loc[0] if loc else "version"
            out.append(f"{pricing}:{_line_of(pricing, anchor)}: {'.'.join(loc)}: {err['msg']}")
        return out
    return []
