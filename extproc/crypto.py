"""Provider secrets at rest: AES-256-GCM under a master key, with a keyring for rotation.

A master key is 32 random bytes, written as url-safe base64. Its id is derived from the key
itself so that a ciphertext names the key that sealed it without storing anything secret.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
KEY_BYTES = 32


class MasterKeyError(Exception):
    """A master key is missing, malformed, or not the one a ciphertext was sealed with."""


def generate_master_key() -> str:
    """Return a new master key as url-safe base64 text."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def parse_master_key(text: str) -> bytes:
    """Decode a master key from its text form, refusing anything that is not 32 bytes."""
    try:
        raw = base64.urlsafe_b64decode(text.strip().encode())
    except (ValueError, TypeError) as exc:
        raise MasterKeyError("master key is not valid base64") from exc
    if len(raw) != KEY_BYTES:
        raise MasterKeyError(f"master key must be {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def master_key_id(raw: bytes) -> str:
    """A short public identifier of a master key (not reversible to the key)."""
    return hashlib.sha256(b"spendgate-master-key-id:" + raw).hexdigest()[:16]


@dataclass(frozen=True)
class Sealed:
    """A secret as stored: ciphertext (with GCM tag), nonce, and the id of the sealing key."""

    ciphertext: bytes
    nonce: bytes
    master_key_id: str


@dataclass
class Keyring:
    """The active master key plus older ones kept for decryption during a rotation."""

    active: bytes
    previous: list[bytes] = field(default_factory=list)

    @property
    def active_id(self) -> str:
        """Id of the key new secrets are sealed with."""
        return master_key_id(self.active)

    def _by_id(self) -> dict[str, bytes]:
        return {master_key_id(k): k for k in [self.active, *self.previous]}

    def seal(self, plaintext: str, associated: bytes) -> Sealed:
        """Encrypt a secret. `associated` binds the ciphertext to its row so rows can't be swapped."""
        nonce = os.urandom(NONCE_BYTES)
        ct = AESGCM(self.active).encrypt(nonce, plaintext.encode(), associated)
        return Sealed(ct, nonce, self.active_id)

    def open(self, sealed: Sealed, associated: bytes) -> str:
        """Decrypt a secret sealed by any key in the ring."""
        key = self._by_id().get(sealed.master_key_id)
        if key is None:
            raise MasterKeyError(f"master key {sealed.master_key_id} is not in the keyring")
        try:
            return AESGCM(key).decrypt(sealed.nonce, sealed.ciphertext, associated).decode()
        except Exception as exc:  # InvalidTag carries no message; keep the cause, name the key
            raise MasterKeyError(f"secret does not authenticate under key {sealed.master_key_id}") from exc


def load_keyring(home: Path, *, create: bool = False) -> Keyring:
    """Build the keyring from the environment or the key file under `home`.

    `SPENDGATE_MASTER_KEY` (or the file named by `SPENDGATE_MASTER_KEY_FILE`, or `home/master.key`)
    is the active key; `SPENDGATE_PREVIOUS_MASTER_KEYS` is a comma-separated list kept for
    decryption while a rotation is under way. With `create`, a missing key file is generated
    (mode 0600) so that a local stack works out of the box.
    """
    text = os.environ.get("SPENDGATE_MASTER_KEY")
    if not text:
        path = Path(os.environ.get("SPENDGATE_MASTER_KEY_FILE") or home / "master.key")
        if not path.exists():
            if not create:
                raise MasterKeyError(
                    f"no master key: set SPENDGATE_MASTER_KEY or create {path} (spendgate master-key generate)"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(generate_master_key() + "\n")
        text = path.read_text()
    previous = [
        parse_master_key(p)
        for p in os.environ.get("SPENDGATE_PREVIOUS_MASTER_KEYS", "").split(",")
        if p.strip()
    ]
    return Keyring(parse_master_key(text), previous)
