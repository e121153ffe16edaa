"""Wrapped keys: format, hashing, lookup."""

import datetime as dt
import uuid

from extproc import wrapped_keys
from extproc.keytable import KeyEntry, KeyTable
from extproc.upstreams import upstream_for


def test_generated_key_has_the_sg_prefix_and_256_bits() -> None:
    key = wrapped_keys.generate()
    assert key.startswith("sg-") and len(key) == 46


def test_two_generated_keys_differ() -> None:
    assert wrapped_keys.generate() != wrapped_keys.generate()


def _entry(expires: dt.datetime | None = None) -> KeyEntry:
    return KeyEntry(
        uuid.uuid4(),
        "sg-x",
        "n",
        None,
        None,
        None,
        expires,
        "openai",
        uuid.uuid4(),
        upstream_for("https://api.openai.com"),
        "sk-secret",
    )


def test_key_table_finds_a_key_by_its_hash() -> None:
    key, table, entry = wrapped_keys.generate(), KeyTable(), _entry()
    table.replace({wrapped_keys.digest(key): entry})
    assert table.lookup(key, dt.datetime.now(dt.UTC)) is entry


def test_key_table_refuses_an_expired_key() -> None:
    key, table = wrapped_keys.generate(), KeyTable()
    now = dt.datetime.now(dt.UTC)
    table.replace({wrapped_keys.digest(key): _entry(now - dt.timedelta(seconds=1))})
    assert table.lookup(key, now) is None


def test_entry_repr_does_not_show_the_provider_secret() -> None:
    assert "sk-secret" not in repr(_entry())


def test_upstream_of_a_custom_base_url_keeps_its_path_prefix() -> None:
    up = upstream_for("https://llm.example.com:8443/openai/v1")
    assert (up.path_prefix, up.tls) == ("/openai", True)
    assert up.cluster.startswith("up_llm_example_com_8443_tls_")


def test_hosts_that_differ_only_in_punctuation_get_different_clusters() -> None:
    assert upstream_for("https://a-b.example.com").cluster != upstream_for("https://a.b.example.com").cluster


def test_public_provider_base_url_uses_the_shipped_cluster() -> None:
    assert upstream_for("https://api.anthropic.com").cluster == "anthropic"
