"""Reading a policy directory: every problem reported as `file:line: reason`, all or nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from extproc.policy.evaluate import Binding, Subject
from extproc.policy.schema import Policy, PolicyFile
from extproc.pricing import PriceTable

PRICING_FILE = "pricing.yaml"
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


def load_policy_dir(directory: Path) -> PolicySet:
    """Validate and load a policy directory; raise PolicyError naming every problem."""
    problems: list[str] = []
    pricing_path = directory / PRICING_FILE
    prices: PriceTable | None = None
    if pricing_path.exists():
        prices, errs = _parse(pricing_path, PriceTable)
        problems += errs
    else:
        problems.append(f"{pricing_path}:1: missing (every policy directory needs a price table)")
    policies: list[Policy] = []
    seen: dict[str, Path] = {}
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
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
    return PolicySet(prices, tuple(policies))
