"""Wrapped keys: the `sg-...` secrets Spendgate hands to applications instead of provider keys.

Only a SHA-256 hash of a wrapped key is stored; the key itself is shown once at creation.
"""

from __future__ import annotations

import hashlib
import secrets
import string

PREFIX = "sg-"
_ALPHABET = string.digits + string.ascii_letters
_SECRET_BYTES = 32
VISIBLE_CHARS = 8  # characters after "sg-" kept in clear to recognise a key in listings


def _base62(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out)).rjust(43, "0")


def generate() -> str:
    """A new wrapped key: `sg-` followed by 32 random bytes in base62."""
    return PREFIX + _base62(secrets.token_bytes(_SECRET_BYTES))


def digest(key: str) -> bytes:
    """The stored form of a wrapped key."""
    return hashlib.sha256(key.encode()).digest()


def visible_prefix(key: str) -> str:
    """The part of a key that may be shown and logged (`sg-` plus a few characters)."""
    return key[: len(PREFIX) + VISIBLE_CHARS]


def looks_wrapped(value: str) -> bool:
    """Cheap syntactic check before hashing."""
    return value.startswith(PREFIX) and 20 <= len(value) <= 128
