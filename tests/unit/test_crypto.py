"""Provider secrets at rest: AES-256-GCM, bound to their row, readable across a rotation."""

import pytest

from extproc.crypto import Keyring, MasterKeyError, generate_master_key, parse_master_key


def ring() -> Keyring:
    return Keyring(parse_master_key(generate_master_key()))


def test_sealed_secret_opens_to_the_original() -> None:
    r = ring()
    assert r.open(r.seal("sk-secret-value", b"row-1"), b"row-1") == "sk-secret-value"


def test_ciphertext_does_not_contain_the_secret() -> None:
    sealed = ring().seal("sk-secret-value", b"row-1")
    assert b"sk-secret-value" not in sealed.ciphertext


def test_secret_moved_to_another_row_does_not_open() -> None:
    r = ring()
    with pytest.raises(MasterKeyError):
        r.open(r.seal("x", b"row-1"), b"row-2")


def test_secret_sealed_by_an_unknown_key_does_not_open() -> None:
    with pytest.raises(MasterKeyError, match="not in the keyring"):
        ring().open(ring().seal("x", b"r"), b"r")


def test_previous_keys_open_secrets_during_a_rotation() -> None:
    old = ring()
    new = Keyring(parse_master_key(generate_master_key()), previous=[old.active])
    assert new.open(old.seal("x", b"r"), b"r") == "x"
    assert new.seal("x", b"r").master_key_id == new.active_id != old.active_id


def test_master_key_of_wrong_length_is_refused() -> None:
    with pytest.raises(MasterKeyError, match="32 bytes"):
        parse_master_key("c2hvcnQ=")
