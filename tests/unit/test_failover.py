"""Failover's upstream half: per attempt, the credential of the cluster Envoy picked."""

from __future__ import annotations

import uuid

from extproc import wrapped_keys
from extproc.exchange import FAILOVER_HEADER, SERVED_BY_HEADER
from extproc.failover import UpstreamAttempt
from extproc.keytable import Credential, KeyEntry, KeyTable
from extproc.upstreams import follow_chain, upstream_for

PRIMARY = Credential(
    uuid.uuid4(), "openai", upstream_for("https://primary.example.com/v1"), "sk-primary-secret"
)
BACKUP = Credential(
    uuid.uuid4(), "openai", upstream_for("https://backup.example.com/proxy/v1"), "sk-backup-secret"
)


def table() -> KeyTable:
    t = KeyTable()
    entry = KeyEntry(
        uuid.uuid4(),
        "sg-x",
        "k",
        None,
        None,
        None,
        None,
        "openai",
        PRIMARY.id,
        PRIMARY.upstream,
        PRIMARY.secret,
        chain=(PRIMARY, BACKUP),
    )
    t.replace({wrapped_keys.digest(wrapped_keys.generate()): entry})
    return t


def metadata(cluster: str) -> str:
    return f'filter_metadata {{ key: "spendgate" value {{ fields {{ key: "cluster" value {{ string_value: "{cluster}" }} }} }} }} '


def attempt_on(
    cluster: str, path: str = "/v1/chat/completions"
) -> tuple[UpstreamAttempt, dict[str, str], list[str]]:
    a = UpstreamAttempt(table())
    headers = {":path": path, "authorization": f"Bearer {PRIMARY.secret}", FAILOVER_HEADER: str(PRIMARY.id)}
    reply = a.on_request_headers(headers, metadata(cluster))
    return a, dict(reply.set_headers), reply.remove_headers


def test_attempt_on_the_backup_cluster_carries_the_backups_key() -> None:
    _, set_headers, removed = attempt_on(BACKUP.upstream.cluster)
    assert set_headers["authorization"] == f"Bearer {BACKUP.secret}"
    assert FAILOVER_HEADER in removed


def test_attempt_on_the_backup_cluster_moves_the_path_to_its_prefix() -> None:
    _, set_headers, _ = attempt_on(BACKUP.upstream.cluster)
    assert set_headers[":path"] == "/proxy/v1/chat/completions"


def test_attempt_on_an_unknown_cluster_is_refused() -> None:
    a = UpstreamAttempt(table())
    reply = a.on_request_headers({FAILOVER_HEADER: str(PRIMARY.id)}, metadata("somewhere_else"))
    assert reply.immediate_status == 503


def test_forged_failover_header_finds_no_chain() -> None:
    reply = UpstreamAttempt(table()).on_request_headers(
        {FAILOVER_HEADER: str(uuid.uuid4())}, metadata(PRIMARY.upstream.cluster)
    )
    assert reply.immediate_status == 503


def test_response_names_the_cluster_that_answered() -> None:
    a, _, _ = attempt_on(BACKUP.upstream.cluster)
    assert (SERVED_BY_HEADER, BACKUP.upstream.cluster) in a.on_response_headers().set_headers


def test_chain_stops_at_cycles_and_unusable_links() -> None:
    assert follow_chain("a", {"a": "b", "b": "a"}, lambda _: True) == ["a", "b"]
    assert follow_chain("a", {"a": "b"}, lambda c: c != "b") == []
