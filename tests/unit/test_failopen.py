"""The fail-open importer's reading of Envoy's log: hostile lines, offsets, rotation, records."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import envoy_config, failopen, wrapped_keys
from extproc.failopen import Entry, Importer, KeyInfo, parse_line, to_record

PREFIX = "sg-Abcdefgh"


def line(**over: Any) -> bytes:
    doc: dict[str, Any] = {
        "v": "1",
        "ts": "2026-12-01T10:00:00.123Z",
        "request_id": str(uuid.uuid4()),
        "method": "POST",
        "path": "/v1/chat/completions",
        "route": "spendgate_failopen_openai_5",
        "cluster": "spendgate_failopen_openai",
        "model": "fake-openai-model",
        "stream": None,
        "status": 200,
        "details": "via_upstream",
        "flags": "-",
        "bytes_received": 400,
        "bytes_sent": 800,
        "duration_ms": 12,
        "content_type": "application/json",
        "key_prefix_authorization": PREFIX,
        "key_prefix_path": None,
    }
    doc.update(over)
    return json.dumps(doc).encode()


def test_a_good_line_parses() -> None:
    e = parse_line(line())
    assert e is not None
    assert e.key_prefix == PREFIX and e.provider == "openai" and e.status == 200 and not e.stream
    assert e.ts == dt.datetime(2026, 12, 1, 10, 0, 0, 123000, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"not json",
        b"[]",
        b'"v"',
        line(v="2"),
        line(ts="yesterday"),
        line(ts="2026-12-01T10:00:00"),  # no zone: ambiguous
        line(status="two hundred"),
        line(status=-1),
        line(method=None),
        line(path="no-slash"),
        b"\xff\xfe\x00",
        b"{" * 100_000,
    ],
)
def test_bad_lines_are_none(bad: bytes) -> None:
    assert parse_line(bad) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_no_byte_string_raises(data: bytes) -> None:
    parse_line(data)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
_FIELDS = ["v", "ts", "request_id", "method", "path", "route", "status", "bytes_sent", "model", "stream"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*_FIELDS, "key_prefix_authorization"]), _json, max_size=12))
def test_no_json_object_raises_and_what_parses_is_sane(doc: dict[str, Any]) -> None:
    entry = parse_line(json.dumps({"v": "1", **doc}).encode())
    if entry is not None:
        assert entry.path.startswith("/") and entry.status >= 0 and entry.ts.tzinfo is not None
        assert entry.key_prefix is None or re.fullmatch(r"sg-[0-9A-Za-z]{8}", entry.key_prefix)


def test_a_full_key_in_a_prefix_field_is_not_taken_as_a_prefix() -> None:
    key = wrapped_keys.generate()
    e = parse_line(line(key_prefix_authorization=key))
    assert e is not None and e.key_prefix is None


def test_a_record_is_estimated_flagged_and_priced() -> None:
    e = parse_line(line())
    assert e is not None
    key = KeyInfo(uuid.uuid4(), "team-a", "proj", "openai")
    r = to_record(e, key, None)
    assert r.flags == (failopen.FLAG,) and r.estimated and r.outcome == "complete"
    assert r.key_id == key.id and r.team == "team-a" and r.api == "chat.completions"
    assert r.usage.input_tokens == 100 and r.usage.output_tokens == 200
    assert r.tags["key_prefix"] == PREFIX


def test_upstream_errors_and_midstream_failures() -> None:
    e = parse_line(line(status=502, route="spendgate_routed"))
    assert e is not None and e.provider is None
    r = to_record(e, KeyInfo(uuid.uuid4(), None, None, "anthropic"), None)
    assert r.outcome == "upstream_error" and r.usage.output_tokens == 0
    assert r.flags == (failopen.FLAG, failopen.MIDSTREAM_FLAG) and r.provider == "anthropic"


def test_gemini_model_comes_from_the_path_and_a_prefix_is_stripped() -> None:
    e = parse_line(
        line(
            route="spendgate_failopen_gemini_0",
            path="/gw/v1beta/models/gemini-x:streamGenerateContent",
            model=None,
            content_type="text/event-stream",
        )
    )
    assert e is not None and e.stream
    r = to_record(e, None, None, {"gemini": "/gw"})
    assert r.model_requested == "gemini-x" and r.provider == "gemini" and r.key_id is None


class FakeImporter(Importer):
    """The importer with its Postgres side replaced by a list."""

    def __init__(self, log_path: Path) -> None:
        super().__init__(log_path, "postgresql://unused")
        self.written: list[str] = []

    def _write(self, entries: list[Entry], stats: failopen.ImportStats) -> None:
        self.written += [e.request_id for e in entries]
        stats.imported += len(entries)


def ids(n: int) -> list[bytes]:
    return [line(request_id=f"r{i}") for i in range(n)]


def test_offset_resumes_and_a_partial_line_waits(tmp_path: Path) -> None:
    log = tmp_path / "failopen.log"
    log.write_bytes(b"\n".join(ids(3)) + b"\n" + line(request_id="r3")[:20])
    imp = FakeImporter(log)
    stats = imp.run()
    assert imp.written == ["r0", "r1", "r2"] and stats.lines == 3
    with log.open("ab") as f:
        f.write(line(request_id="r3")[20:] + b"\n")
    imp.run()
    assert imp.written == ["r0", "r1", "r2", "r3"]
    assert imp.run().lines == 0


def test_rotation_by_rename_finishes_the_old_file_first(tmp_path: Path) -> None:
    log = tmp_path / "failopen.log"
    log.write_bytes(b"\n".join(ids(2)) + b"\n")
    imp = FakeImporter(log)
    imp.run()
    with log.open("ab") as f:
        f.write(line(request_id="late") + b"\n")  # written after the last run, before rotation
    os.rename(log, tmp_path / "failopen.log.1")
    log.write_bytes(line(request_id="new") + b"\n")
    imp.run()
    assert imp.written == ["r0", "r1", "late", "new"]


def test_truncation_starts_over(tmp_path: Path) -> None:
    log = tmp_path / "failopen.log"
    log.write_bytes(b"\n".join(ids(3)) + b"\n")
    imp = FakeImporter(log)
    imp.run()
    log.write_bytes(line(request_id="after") + b"\n")  # truncated in place, then written
    imp.run()
    assert imp.written[-1] == "after" and len(imp.written) == 4


def test_hostile_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    log = tmp_path / "failopen.log"
    log.write_bytes(b"garbage\n" + line(request_id="ok") + b"\n" + b"x" * 200_000 + b"\n{}\n")
    imp = FakeImporter(log)
    stats = imp.run()
    assert imp.written == ["ok"] and stats.unreadable == 3 and stats.lines == 4


def test_postgres_down_leaves_the_position_where_it_was(tmp_path: Path) -> None:
    log = tmp_path / "failopen.log"
    log.write_bytes(b"\n".join(ids(2)) + b"\n")
    with pytest.raises(failopen.ImportDeferred):
        Importer(log, "postgresql://nobody@127.0.0.1:1/none").run()
    imp = FakeImporter(log)
    imp.run()
    assert imp.written == ["r0", "r1"]


def test_breakglass_files_are_private_and_listing_shows_no_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = "sk-test-" + "9" * 40
    path = failopen.set_breakglass(home, "anthropic", key, "https://gw.example.com/anthropic/v1")
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    doc = json.loads(json.dumps(__import__("yaml").safe_load(path.read_text())))
    assert doc["resources"][0]["generic_secret"]["secret"]["inline_string"] == key  # x-api-key: no Bearer
    assert key not in json.dumps(failopen.list_breakglass(home))
    (fo,) = failopen.failopen_config(home, ["anthropic"])
    assert fo.upstream.path_prefix == "/anthropic" and failopen.path_prefixes(home) == {
        "anthropic": "/anthropic"
    }
    with pytest.raises(failopen.BreakglassError):
        failopen.failopen_config(home, ["openai"])
    assert failopen.remove_breakglass(home, "anthropic") and failopen.list_breakglass(home) == []


def test_openai_secret_is_a_whole_authorization_value() -> None:
    doc = envoy_config.breakglass_secret_document("openai", "sk-x")
    assert doc["resources"][0]["generic_secret"]["secret"]["inline_string"] == "Bearer sk-x"


def test_wrapped_key_shape_matches_generated_keys() -> None:
    for _ in range(50):
        key = wrapped_keys.generate()
        assert re.fullmatch(envoy_config.WRAPPED_KEY, key)
        m = re.fullmatch(envoy_config.KEY_PREFIX_SOURCES["authorization"], "Bearer " + key)
        assert m and m.group(1) == wrapped_keys.visible_prefix(key)
        q = re.fullmatch(envoy_config.KEY_PREFIX_SOURCES[":path"], f"/v1beta/x?alt=sse&key={key}")
        assert q and q.group(1) == wrapped_keys.visible_prefix(key)
    provider_key = "sk-proj-" + secrets.token_hex(8)  # made at run time: no key-shaped literal
    for value in (f"Bearer {provider_key}", "sg-short", "", "Bearer "):
        m = re.fullmatch(envoy_config.KEY_PREFIX_SOURCES["authorization"], value)
        assert m and m.group(1) is None  # matched, and nothing captured: the value is not kept
