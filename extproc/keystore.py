"""Loading wrapped keys and decrypted credentials from Postgres into the KeyTable."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import structlog

from extproc.crypto import Keyring, MasterKeyError, Sealed
from extproc.keytable import Credential, KeyEntry, KeyTable
from extproc.supervise import describe_error
from extproc.upstreams import follow_chain, upstream_for

log = structlog.get_logger("spendgate.keystore")

# Administrative changes NOTIFY this channel so running proxies refresh at once.
CHANGES_CHANNEL = "spendgate_keys"

_LIVE_KEYS = """
SELECT k.id, k.prefix, k.secret_hash, k.name, k.team, k.project, k.policy, k.expires_at, k.credential_id
FROM api_keys k
WHERE k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
"""
_LIVE_CREDENTIALS = """
SELECT id, provider, base_url, ciphertext, nonce, master_key_id, fallback_id
FROM provider_credentials WHERE revoked_at IS NULL
"""


def credential_aad(credential_id: uuid.UUID) -> bytes:
    """Associated data binding a ciphertext to its credential row."""
    return b"spendgate:provider_credentials:" + credential_id.bytes


class KeyStore:
    """Refreshes a KeyTable from Postgres; decrypts each credential once per ciphertext."""

    def __init__(self, dsn: str, keyring: Keyring, table: KeyTable, interval: float = 2.0) -> None:
        self._dsn = dsn
        self._keyring = keyring
        self.table = table
        self._interval = interval
        # (credential id, nonce) -> plaintext. Kept across refreshes so that a proxy whose
        # keyring lacks a new master key still serves with the secret it already had.
        self._secrets: dict[uuid.UUID, tuple[bytes, str]] = {}
        self._warned: set[tuple[uuid.UUID, bytes]] = set()
        self._skipped: set[tuple[uuid.UUID, str]] = set()

    async def refresh(self, conn: psycopg.AsyncConnection[Any] | None = None) -> None:
        """Load the live keys now, on `conn` or on a connection of its own."""
        if conn is None:
            async with await psycopg.AsyncConnection.connect(self._dsn, connect_timeout=3) as own:
                await self._load(own)
        else:
            await self._load(conn)

    async def _load(self, conn: psycopg.AsyncConnection[Any]) -> None:
        creds: dict[uuid.UUID, Credential] = {}
        fallback: dict[uuid.UUID, uuid.UUID] = {}
        for cid, provider, base_url, ct, nonce, mkid, fallback_id in await (
            await conn.execute(_LIVE_CREDENTIALS)
        ).fetchall():
            try:
                secret = self._secret(cid, Sealed(bytes(ct), bytes(nonce), mkid))
                if secret is None:
                    continue
                creds[cid] = Credential(cid, provider, upstream_for(base_url), secret)
            except Exception as exc:
                # One unusable row (a base URL that does not parse, a ciphertext of the wrong
                # shape) must not abort the whole refresh: that would freeze the key table, and
                # revocations with it. Its keys are refused. The message names no secret.
                self._skip(cid, exc)
                continue
            if fallback_id is not None:
                fallback[cid] = fallback_id

        def same_protocol(primary: Credential) -> Callable[[uuid.UUID], bool]:
            return lambda c: c in creds and creds[c].provider == primary.provider

        entries: dict[bytes, KeyEntry] = {}
        for kid, prefix, digest, name, team, project, policy, expires, cid in await (
            await conn.execute(_LIVE_KEYS)
        ).fetchall():
            cred = creds.get(cid)
            if cred is None:  # revoked, or its secret would not open
                continue
            entries[bytes(digest)] = KeyEntry(
                key_id=kid,
                prefix=prefix,
                name=name,
                team=team,
                project=project,
                policy=policy,
                expires_at=expires,
                provider=cred.provider,
                credential_id=cid,
                upstream=cred.upstream,
                secret=cred.secret,
                chain=tuple(creds[c] for c in follow_chain(cid, fallback, same_protocol(cred))),
            )
        self.table.replace(entries)

    def _skip(self, cid: uuid.UUID, exc: Exception) -> None:
        reason = describe_error(exc)
        if (cid, reason) not in self._skipped:  # once per cause, not at every refresh
            self._skipped.add((cid, reason))
            log.error("credential.skipped", credential_id=str(cid), error=reason)

    def _secret(self, cid: uuid.UUID, sealed: Sealed) -> str | None:
        cached = self._secrets.get(cid)
        if cached is not None and cached[0] == sealed.nonce:
            return cached[1]
        try:
            plain = self._keyring.open(sealed, credential_aad(cid))
        except MasterKeyError as exc:
            if cached is not None:
                if (cid, sealed.nonce) not in self._warned:
                    self._warned.add((cid, sealed.nonce))
                    log.warning("credential.kept_previous_secret", credential_id=str(cid), reason=str(exc))
                return cached[1]
            log.error("credential.undecryptable", credential_id=str(cid), reason=str(exc))
            return None
        self._secrets[cid] = (sealed.nonce, plain)
        return plain

    async def run(self) -> None:
        """Refresh on every change notification, and every interval as a fallback.

        A failed refresh keeps the last good table in force: a Postgres outage must not turn
        into an authentication outage.
        """
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, connect_timeout=3
                ) as conn:
                    await conn.execute(f"LISTEN {CHANGES_CHANNEL}".encode())
                    await self.refresh(conn)
                    while True:
                        async for _ in conn.notifies(timeout=self._interval, stop_after=1):
                            pass
                        await self.refresh(conn)
            except (psycopg.Error, OSError) as exc:
                log.warning("keys.refresh_failed", error=describe_error(exc))
                await asyncio.sleep(self._interval)
