"""The policy set in force, reloaded when the directory changes; a bad edit is refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from extproc.policy.loader import PolicyError, PolicySet, load_policy_dir

log = structlog.get_logger("spendgate.policy")


class PolicyStore:
    """Holds the last good PolicySet of a directory."""

    def __init__(self, directory: Path, current: PolicySet | None = None) -> None:
        self.directory = directory
        self.current = current if current is not None else load_policy_dir(directory)
        self.reload_failures = 0  # exported as a metric
        self.last_error: list[str] = []
        self._signature = self._stat()

    def _stat(self) -> tuple[tuple[str, int, int], ...]:
        files = sorted([*self.directory.glob("*.yaml"), *self.directory.glob("*.yml")])
        out = []
        for f in files:
            try:
                st = f.stat()
            except FileNotFoundError:  # removed between glob and stat: the next look sees it
                continue
            out.append((f.name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def reload_if_changed(self) -> bool:
        """Reload when any file changed; True when a new set went into force."""
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            fresh = load_policy_dir(self.directory)
        except PolicyError as exc:
            self.reload_failures += 1
            self.last_error = exc.problems
            log.error(
                "policy.reload_refused", problems=exc.problems, kept_version=self.current.prices.version
            )
            return False
        self.current = fresh
        self.last_error = []
        log.info("policy.reloaded", policies=len(fresh.policies), prices=fresh.prices.version)
        return True

    async def run(self, interval: float = 1.0) -> None:
        """Watch the directory forever."""
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()
