"""The in-memory table of live wrapped keys, each resolved to its provider credential."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from functools import cached_property

from extproc import wrapped_keys
from extproc.policy.evaluate import Subject
from extproc.upstreams import Upstream, failover_cluster


@dataclass(frozen=True)
class Credential:
    """A provider credential, decrypted: where it goes and the key it sends."""

    id: uuid.UUID
    provider: str
    upstream: Upstream
    secret: str = field(repr=False)  # never logged, never repr'd


@dataclass(frozen=True)
class KeyEntry:
    """A wrapped key that may be used, with everything a request needs from it."""

    key_id: uuid.UUID
    prefix: str
    name: str
    team: str | None
    project: str | None
    policy: str | None
    expires_at: dt.datetime | None
    provider: str
    credential_id: uuid.UUID
    upstream: Upstream
    secret: str = field(repr=False)  # the real provider key: never logged, never repr'd
    # The credentials to try in order when the primary fails (primary first); empty without
    # failover. Requests then route to the chain's aggregate cluster.
    chain: tuple[Credential, ...] = ()

    @cached_property
    def subject(self) -> Subject:
        """The caller, as policies see it."""
        return Subject(str(self.key_id), self.name, self.prefix, self.team, self.project, self.policy)

    @cached_property
    def route(self) -> str:
        """The Envoy cluster requests on this key are routed to."""
        return (
            failover_cluster([c.upstream.cluster for c in self.chain])
            if self.chain
            else self.upstream.cluster
        )


class KeyTable:
    """Lookup by hash; replaced whole on refresh so readers never see a half-built table."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, KeyEntry] = {}
        self._chains: dict[uuid.UUID, tuple[Credential, ...]] = {}

    def replace(self, entries: dict[bytes, KeyEntry]) -> None:
        """Swap in a freshly loaded table."""
        self._by_digest = entries
        self._chains = {e.credential_id: e.chain for e in entries.values() if e.chain}

    def chain(self, credential_id: uuid.UUID) -> tuple[Credential, ...]:
        """The failover chain of a primary credential (empty if it has none)."""
        return self._chains.get(credential_id, ())

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, presented: str, now: dt.datetime) -> KeyEntry | None:
        """The live entry for a presented wrapped key, or None if unknown, revoked or expired."""
        if not wrapped_keys.looks_wrapped(presented):
            return None
        entry = self._by_digest.get(wrapped_keys.digest(presented))
        if entry is None or (entry.expires_at is not None and entry.expires_at <= now):
            return None
        return entry
