"""Reading a policy directory: every problem reported as `file:line: reason`, all or nothing.

The directory is optional, and so is its `pricing.yaml`: without them the shipped price table is
in force (extproc.pricing.price_table_path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from extproc.policy.evaluate import Binding, Subject
from extproc.policy.schema import Policy, PolicyFile
from extproc.pricing import PRICING_FILE, PriceTable, price_table_path

__all__ = ["PRICING_FILE", "PolicyError", "PolicySet", "load_policy_dir"]
_MAX_BINDINGS = 10_000


class PolicyError(Exception):
    """A policy directory that must not be put in force; `problems` are `file:line: reason`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class PolicySet:
    """Prices and policies that are in force together."""

    prices: PriceTable
    policies: tuple[Policy, ...]
    prices_path: Path | None = field(default=None, compare=False)  # where `prices` was read from
    _bindings: dict[Subject, Binding] = field(default_factory=dict, compare=False, repr=False)

    def binding(self, who: Subject) -> Binding:
        """The policies bound to `who`, merged once per set (a reload makes a new set)."""
        b = self._bindings.get(who)
        if b is None:
            if len(self._bindings) >= _MAX_BINDINGS:
                self._bindings.clear()  # many short-lived keys: start over rather than grow
            b = self._bindings[who] = Binding(self.policies, who)
        return b


def _line(node: yaml.Node | None, loc: Sequence[int | str]) -> int:
    """The line of the YAML node a pydantic error location points at (the deepest one found)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def _parse(path: Path, model: type[BaseModel]) -> tuple[Any, list[str]]:
    text = path.read_text()
    try:
        node = yaml.compose(text)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        return None, [f"{path}:{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}"]
    try:
        return model.model_validate(doc), []
    except ValidationError as exc:
        return None, [
            f"{path}:{_line(node, err['loc'])}: {'.'.join(str(p) for p in err['loc']) or 'file'}: {err['msg']}"
            for err in exc.errors()
        ]


def load_policy_dir(directory: Path | None) -> PolicySet:
    """Validate and load a policy directory; raise PolicyError naming every problem.

    With no directory (None), or a directory without `pricing.yaml`, the shipped price table is
    used. A directory that was named but is not there is a problem, not an empty set: a mistyped
    path or a missing mount must not silently lift every budget and model rule.
    """
    if directory is not None and not directory.is_dir():
        raise PolicyError([f"{directory}: no such policy directory"])
    pricing_path = price_table_path(directory)
    prices, problems = _parse(pricing_path, PriceTable)
    policies: list[Policy] = []
    seen: dict[str, Path] = {}
    files = [] if directory is None else sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    for path in files:
        if path.name == PRICING_FILE:
            continue
        parsed, errs = _parse(path, PolicyFile)
        problems += errs
        if parsed is None:
            continue
        for i, policy in enumerate(parsed.policies):
            if policy.name in seen:
                node = yaml.compose(path.read_text())
                problems.append(
                    f"{path}:{_line(node, ['policies', i, 'name'])}: policy name {policy.name!r} "
                    f"is already used in {seen[policy.name]}"
                )
            seen[policy.name] = path
            policies.append(policy)
    if problems or prices is None:
        raise PolicyError(problems)
    return PolicySet(prices, tuple(policies), pricing_path)
