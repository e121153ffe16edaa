"""The policy set in force, reloaded when the directory changes; a bad edit is refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from extproc.policy.loader import PolicyError, PolicySet, load_policy_dir
from extproc.supervise import describe_error

log = structlog.get_logger("spendgate.policy")


class PolicyStore:
    """Holds the last good PolicySet of a directory (None: the shipped prices and no policies)."""

    def __init__(self, directory: Path | None, current: PolicySet | None = None) -> None:
        self.directory = directory
        self.current = current if current is not None else load_policy_dir(directory)
        self.reload_failures = 0  # exported as a metric
        self.last_error: list[str] = []
        self._signature: tuple[tuple[str, int, int], ...] | None = self._stat()

    def _stat(self) -> tuple[tuple[str, int, int], ...]:
        if self.directory is None:
            return ()
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
        """Reload when any file changed; True when a new set went into force.

        A directory or file that cannot be read is refused like one that does not validate:
        the last good set stays in force, the failure is counted and `last_error` says why.
        """
        try:
            signature = self._stat()
            if signature == self._signature:
                return False
            self._signature = signature
            fresh = load_policy_dir(self.directory)
        except (PolicyError, OSError) as exc:
            problems = exc.problems if isinstance(exc, PolicyError) else [describe_error(exc)]
            # An unreadable directory is looked at every second: count and log it once per cause.
            if isinstance(exc, PolicyError) or problems != self.last_error:
                self.reload_failures += 1
                log.error(
                    "policy.reload_refused", problems=problems, kept_version=self.current.prices.version
                )
            self.last_error = problems
            if isinstance(exc, OSError):
                # Looked at again next time even if no file changes: a fixed permission or a
                # remounted volume changes no mtime, and the error may be passing anyway.
                self._signature = None
            return False
        self.current = fresh
        self.last_error = []
        log.info(
            "policy.reloaded",
            policies=len(fresh.policies),
            prices=fresh.prices.version,
            prices_file=str(fresh.prices_path),
        )
        return True

    async def run(self, interval: float = 1.0) -> None:
        """Watch the directory forever."""
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()
