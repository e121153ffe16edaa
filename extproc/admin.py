"""Administrative actions on credentials and wrapped keys; each one is written to the audit log."""

from __future__ import annotations

import datetime as dt
import getpass
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from extproc import wrapped_keys
from extproc.crypto import Keyring, MasterKeyError, Sealed, master_key_id
from extproc.db import fetch_dicts
from extproc.keystore import CHANGES_CHANNEL, credential_aad
from extproc.upstreams import DEFAULT_BASE_URLS, upstream_for


class AdminError(Exception):
    """A refused administrative action, with a message for the operator that says what to do next."""


_LIST_PROVIDERS = "see `spendgate providers list`"
_LIST_KEYS = "see `spendgate keys list`"


def shown(ref: str) -> str:
    """`ref` as it may be echoed back: a whole wrapped key is cut to its visible prefix."""
    if ref.startswith(wrapped_keys.PREFIX) and len(ref) > len(wrapped_keys.visible_prefix(ref)):
        return wrapped_keys.visible_prefix(ref) + "..."
    return ref


def _audit(conn: psycopg.Connection[Any], action: str, target: str, **details: Any) -> None:
    # Every audited action changes what proxies should serve; the notification is delivered
    # when the surrounding transaction commits.
    conn.execute(f"NOTIFY {CHANGES_CHANNEL}".encode())
    conn.execute(
        "INSERT INTO audit_log (actor, action, target, details) VALUES (%s, %s, %s, %s)",
        (getpass.getuser(), action, target, Jsonb(details)),
    )


def add_provider(
    conn: psycopg.Connection[Any],
    keyring: Keyring,
    provider: str,
    name: str,
    secret: str,
    base_url: str | None,
    fallback: str | None = None,
) -> uuid.UUID:
    """Store a provider credential, encrypted; `fallback` names the credential to fail over to."""
    if provider not in DEFAULT_BASE_URLS:
        raise AdminError(f"unknown provider {provider!r}; expected one of {', '.join(DEFAULT_BASE_URLS)}")
    if not name.strip():
        raise AdminError("--name is empty; give the credential a name that wrapped keys can refer to")
    if not secret.strip():
        raise AdminError(
            "the provider secret is empty: pipe it on stdin, or name a set environment variable with --secret-env"
        )
    url = (base_url or DEFAULT_BASE_URLS[provider]).rstrip("/")
    try:
        upstream_for(url)
    except ValueError as exc:
        raise AdminError(f"--base-url: {exc}, e.g. http://127.0.0.1:8000/v1") from None
    cid = uuid.uuid4()
    sealed = keyring.seal(secret.strip(), credential_aad(cid))
    with conn.transaction():
        exists = conn.execute("SELECT 1 FROM provider_credentials WHERE name = %s", (name,)).fetchone()
        if exists:
            raise AdminError(
                f"a provider credential named {name!r} already exists (revoked ones keep their name); "
                f"choose another --name, {_LIST_PROVIDERS}"
            )
        fallback_id = _fallback_id(conn, provider, fallback) if fallback is not None else None
        conn.execute(
            "INSERT INTO provider_credentials (id, provider, name, base_url, ciphertext, nonce, master_key_id,"
            " fallback_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (cid, provider, name, url, sealed.ciphertext, sealed.nonce, sealed.master_key_id, fallback_id),
        )
        _audit(
            conn,
            "provider.add",
            name,
            provider=provider,
            base_url=url,
            credential_id=str(cid),
            fallback=fallback,
        )
    return cid


def _fallback_id(conn: psycopg.Connection[Any], provider: str, fallback: str) -> uuid.UUID:
    row = conn.execute(
        "SELECT id, provider FROM provider_credentials WHERE name = %s AND revoked_at IS NULL", (fallback,)
    ).fetchone()
    if row is None:
        raise AdminError(
            f"--fallback: no live provider credential named {fallback!r}; add it first or {_LIST_PROVIDERS}"
        )
    if row[1] != provider:
        raise AdminError(
            f"--fallback: {fallback!r} speaks {row[1]}, not {provider}; failover needs a credential of the "
            f"same --provider, {_LIST_PROVIDERS}"
        )
    return row[0]  # type: ignore[no-any-return]


def foreign_master_keys(conn: psycopg.Connection[Any], keyring: Keyring) -> list[str]:
    """Ids of master keys that seal live credentials here but are not in `keyring`.

    A non-empty answer means this command and the proxies may hold different master keys: a
    secret sealed now could be unreadable to them (or theirs to this keyring).
    """
    known = {master_key_id(k) for k in [keyring.active, *keyring.previous]}
    rows = conn.execute(
        "SELECT DISTINCT master_key_id FROM provider_credentials WHERE revoked_at IS NULL ORDER BY 1"
    ).fetchall()
    return [str(r[0]) for r in rows if r[0] not in known]


def list_providers(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Credentials without their secrets."""
    return fetch_dicts(
        conn,
        "SELECT c.id, c.provider, c.name, c.base_url, f.name AS fallback, c.master_key_id, c.created_at,"
        " c.revoked_at FROM provider_credentials c LEFT JOIN provider_credentials f ON f.id = c.fallback_id"
        " ORDER BY c.created_at",
    )


def revoke_provider(conn: psycopg.Connection[Any], name: str) -> None:
    """Revoke a credential; every wrapped key on it stops working."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE provider_credentials SET revoked_at = now() WHERE name = %s AND revoked_at IS NULL RETURNING id",
            (name,),
        ).fetchone()
        if row is None:
            raise AdminError(_missing_credential(conn, name))
        _audit(conn, "provider.revoke", name, credential_id=str(row[0]))


def _missing_credential(conn: psycopg.Connection[Any], name: str) -> str:
    """Why `name` is not a live credential, and what to do about it."""
    revoked = conn.execute(
        "SELECT 1 FROM provider_credentials WHERE name = %s AND revoked_at IS NOT NULL", (name,)
    ).fetchone()
    if revoked:
        return (
            f"provider credential {name!r} is revoked; add a new one with `spendgate providers add` "
            f"under another name, {_LIST_PROVIDERS}"
        )
    hint = ""
    if name in DEFAULT_BASE_URLS:
        # The commonest slip: the provider kind where a credential name is expected.
        hint = f" (--provider takes a credential's name, not the kind {name!r})"
    return (
        f"no provider credential named {name!r}{hint}; {_LIST_PROVIDERS}, "
        "or add one with `spendgate providers add`"
    )


@dataclass
class NewKey:
    """A freshly issued wrapped key; `secret` is shown once and never stored."""

    id: uuid.UUID
    prefix: str
    secret: str


def create_key(
    conn: psycopg.Connection[Any],
    name: str,
    credential: str,
    *,
    team: str | None = None,
    project: str | None = None,
    policy: str | None = None,
    expires_at: dt.datetime | None = None,
) -> NewKey:
    """Issue a wrapped key bound to a provider credential (by name)."""
    if not name.strip():
        raise AdminError("--name is empty; name the key after the application that will use it")
    with conn.transaction():
        row = conn.execute(
            "SELECT id FROM provider_credentials WHERE name = %s AND revoked_at IS NULL", (credential,)
        ).fetchone()
        if row is None:
            raise AdminError(_missing_credential(conn, credential))
        key = _insert_key(conn, name, row[0], team, project, policy, expires_at)
        _audit(
            conn,
            "key.create",
            key.prefix,
            key_id=str(key.id),
            name=name,
            credential=credential,
            team=team,
            project=project,
            policy=policy,
        )
    return key


def _insert_key(
    conn: psycopg.Connection[Any],
    name: str,
    credential_id: uuid.UUID,
    team: str | None,
    project: str | None,
    policy: str | None,
    expires_at: dt.datetime | None,
) -> NewKey:
    secret = wrapped_keys.generate()
    kid = uuid.uuid4()
    prefix = wrapped_keys.visible_prefix(secret)
    conn.execute(
        "INSERT INTO api_keys (id, prefix, secret_hash, name, team, project, credential_id, policy, expires_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (kid, prefix, wrapped_keys.digest(secret), name, team, project, credential_id, policy, expires_at),
    )
    return NewKey(kid, prefix, secret)


def list_keys(conn: psycopg.Connection[Any], include_revoked: bool = False) -> list[dict[str, Any]]:
    """Keys with their visible prefix only."""
    return fetch_dicts(
        conn,
        "SELECT k.id, k.prefix, k.name, k.team, k.project, c.name AS provider_credential, k.policy,"
        " k.created_at, k.expires_at, k.revoked_at FROM api_keys k JOIN provider_credentials c"
        " ON c.id = k.credential_id"
        + ("" if include_revoked else " WHERE k.revoked_at IS NULL")
        + " ORDER BY k.created_at",
    )


def _find_key(conn: psycopg.Connection[Any], ref: str) -> tuple[Any, ...]:
    """A live key by id or visible prefix; an ambiguous prefix is refused."""
    where: str
    param: uuid.UUID | str
    try:
        where, param = "id = %s", uuid.UUID(ref)
    except ValueError:
        if (
            not ref.startswith(wrapped_keys.PREFIX)
            or len(ref) < len(wrapped_keys.PREFIX) + wrapped_keys.VISIBLE_CHARS
        ):
            raise AdminError(
                f"{shown(ref)!r} is neither a key id nor a key prefix (sg- and 8 more characters); {_LIST_KEYS}"
            ) from None
        where, param = "prefix = %s", wrapped_keys.visible_prefix(ref)
    rows = conn.execute(
        "SELECT id, prefix, name, team, project, credential_id, policy, revoked_at IS NOT NULL FROM api_keys"
        f" WHERE {where}".encode(),
        (param,),
    ).fetchall()
    live = [r[:-1] for r in rows if not r[-1]]
    if len(live) > 1:
        raise AdminError(f"{shown(ref)!r} matches {len(live)} keys; use the key id, {_LIST_KEYS}")
    if live:
        return tuple(live[0])
    if rows:
        raise AdminError(f"key {shown(ref)!r} is already revoked; `spendgate keys list --all` shows it")
    raise AdminError(f"no key {shown(ref)!r}; {_LIST_KEYS} for ids and prefixes")


def revoke_key(conn: psycopg.Connection[Any], ref: str) -> uuid.UUID:
    """Revoke a key by id or prefix; running proxies drop it on their next refresh."""
    with conn.transaction():
        kid, prefix, *_ = _find_key(conn, ref)
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (kid,))
        _audit(conn, "key.revoke", prefix, key_id=str(kid))
    return kid  # type: ignore[no-any-return]


def rotate_key(conn: psycopg.Connection[Any], ref: str, grace: dt.timedelta = dt.timedelta(0)) -> NewKey:
    """Issue a replacement with the same attributes; the old key expires after `grace`."""
    with conn.transaction():
        kid, prefix, name, team, project, credential_id, policy = _find_key(conn, ref)
        new = _insert_key(conn, name, credential_id, team, project, policy, None)
        if grace > dt.timedelta(0):
            conn.execute("UPDATE api_keys SET expires_at = now() + %s WHERE id = %s", (grace, kid))
        else:
            conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (kid,))
        _audit(
            conn,
            "key.rotate",
            prefix,
            old_key_id=str(kid),
            new_key_id=str(new.id),
            grace_seconds=grace.total_seconds(),
        )
    return new


def rotate_master_key(conn: psycopg.Connection[Any], keyring: Keyring) -> int:
    """Re-encrypt every credential under the keyring's active key, one row at a time.

    Each row is re-sealed in its own short transaction, so proxies keep reading consistent rows
    throughout; a proxy that has not been given the new key keeps the secret it already holds.
    """
    count = 0
    ids = conn.execute(
        "SELECT id FROM provider_credentials WHERE master_key_id <> %s", (keyring.active_id,)
    ).fetchall()
    for (cid,) in ids:
        with conn.transaction():
            row = conn.execute(
                "SELECT ciphertext, nonce, master_key_id FROM provider_credentials WHERE id = %s FOR UPDATE",
                (cid,),
            ).fetchone()
            if row is None or row[2] == keyring.active_id:
                continue
            aad = credential_aad(cid)
            try:
                plain = keyring.open(Sealed(bytes(row[0]), bytes(row[1]), row[2]), aad)
            except MasterKeyError:
                raise AdminError(
                    f"credential {cid} is sealed under master key {row[2]}, which is neither the active key "
                    "nor in SPENDGATE_PREVIOUS_MASTER_KEYS; add the old key there and run again "
                    f"({count} re-encrypted so far)"
                ) from None
            sealed = keyring.seal(plain, aad)
            conn.execute(
                "UPDATE provider_credentials SET ciphertext = %s, nonce = %s, master_key_id = %s WHERE id = %s",
                (sealed.ciphertext, sealed.nonce, sealed.master_key_id, cid),
            )
            _audit(conn, "master_key.reencrypt", str(cid), old_key=row[2], new_key=sealed.master_key_id)
            count += 1
    return count
