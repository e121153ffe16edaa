"""Fail-open, per provider: while the filter is unreachable Envoy serves that provider itself.

Operators opt a provider in (`spendgate up --fail-open openai`) after storing a break-glass
credential for it (`spendgate breakglass set`). Envoy then holds that credential (an SDS secret
file, 0600) and, for requests the filter did not route, strips the caller's wrapped key, puts on
the break-glass key and logs the request (JSON lines, the key's visible prefix only).

`Importer` turns that log into usage records flagged `fail_open` once Postgres can take them:
it remembers how far it read (file identity and offset), copes with rotation and truncation,
skips and counts lines it cannot read, and inserts idempotently (request id and start time).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import structlog
import yaml

from extproc import envoy_config
from extproc.pricing import PriceTable, price_table_path
from extproc.upstreams import DEFAULT_BASE_URLS, upstream_for
from extproc.usage import Usage, UsageRecord

log = structlog.get_logger("spendgate.failopen")

PROVIDERS = ("openai", "anthropic", "gemini")
ACCESS_LOG = "failopen.log"
FLAG = "fail_open"
MIDSTREAM_FLAG = "filter_lost_midstream"  # the filter answered the headers, then failed
_BREAKGLASS_DIR = "breakglass"
_MAX_LINE = 64 * 1024  # longer lines are not Envoy's: skipped
_BATCH_LINES = 5000
_BYTES_PER_TOKEN = 4
# An SSE event wraps one token's delta in a JSON object of a few hundred bytes: counting its
# bytes as text would overstate a stream's output many times over.
_STREAM_BYTES_PER_TOKEN = 64
_PREFIX = re.compile(r"^sg-[0-9A-Za-z]{8}$")
_GEMINI_MODEL = re.compile(r"/models/([^/:]+):")


class BreakglassError(RuntimeError):
    """A break-glass credential is missing or unusable."""


# -- break-glass credentials ----------------------------------------------------------------------
def breakglass_dir(home: Path) -> Path:
    """Where the break-glass secret files live (0700)."""
    return home / _BREAKGLASS_DIR


def _check_provider(provider: str) -> None:
    if provider not in PROVIDERS:
        raise BreakglassError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")


def _write_private(path: Path, text: str) -> None:
    """Write a file only this user can read, by rename: Envoy watches the directory for moves."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def set_breakglass(home: Path, provider: str, key: str, base_url: str | None = None) -> Path:
    """Store a provider's break-glass key for Envoy (a running Envoy picks a change up by itself)."""
    _check_provider(provider)
    key = key.strip()
    if not key or any(c in key for c in "\r\n\0"):
        raise BreakglassError("the break-glass key is empty or contains a line break")
    url = base_url or DEFAULT_BASE_URLS[provider]
    upstream_for(url)  # refuse a malformed URL now rather than when Envoy starts
    d = breakglass_dir(home)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    secret = d / f"{provider}.yaml"
    _write_private(secret, yaml.safe_dump(envoy_config.breakglass_secret_document(provider, key)))
    _write_private(d / f"{provider}.json", json.dumps({"provider": provider, "base_url": url}) + "\n")
    return secret


def remove_breakglass(home: Path, provider: str) -> bool:
    """Forget a provider's break-glass key; True if there was one."""
    _check_provider(provider)
    d = breakglass_dir(home)
    found = (d / f"{provider}.yaml").exists()
    (d / f"{provider}.yaml").unlink(missing_ok=True)
    (d / f"{provider}.json").unlink(missing_ok=True)
    return found


def list_breakglass(home: Path) -> list[dict[str, str]]:
    """The stored break-glass credentials: provider, base URL and when set, never the key."""
    out = []
    for provider in PROVIDERS:
        meta = breakglass_dir(home) / f"{provider}.json"
        secret = breakglass_dir(home) / f"{provider}.yaml"
        if meta.exists() and secret.exists():
            base_url = str(json.loads(meta.read_text()).get("base_url", ""))
            when = dt.datetime.fromtimestamp(secret.stat().st_mtime, dt.UTC).isoformat(timespec="seconds")
            out.append({"provider": provider, "base_url": base_url, "set_at": when})
    return out


def failopen_config(home: Path, providers: Sequence[str]) -> list[envoy_config.FailOpen]:
    """The Envoy side of fail-open for `providers`; each needs a stored break-glass key."""
    out = []
    for provider in dict.fromkeys(providers):
        _check_provider(provider)
        meta = breakglass_dir(home) / f"{provider}.json"
        secret = breakglass_dir(home) / f"{provider}.yaml"
        if not (meta.exists() and secret.exists()):
            raise BreakglassError(
                f"fail-open for {provider} needs a break-glass key: "
                f"spendgate breakglass set --provider {provider} --secret-env VAR"
            )
        base_url = str(json.loads(meta.read_text())["base_url"])
        out.append(envoy_config.FailOpen(provider, upstream_for(base_url), str(secret)))
    return out


def bootstrap_options(home: Path, providers: Sequence[str]) -> dict[str, Any]:
    """Keyword arguments for envoy_config.BootstrapOptions (none when fail-open is off)."""
    if not providers:
        return {}
    return {"fail_open": failopen_config(home, providers), "failopen_log": str(home / ACCESS_LOG)}


def path_prefixes(home: Path) -> dict[str, str]:
    """The path prefix of each provider's break-glass base URL, which Envoy puts before the path."""
    out = {}
    for entry in list_breakglass(home):
        prefix = upstream_for(entry["base_url"]).path_prefix
        if prefix:
            out[entry["provider"]] = prefix
    return out


# -- the log --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One request Envoy forwarded without the filter, as its access log line told it."""

    request_id: str
    ts: dt.datetime
    method: str
    path: str
    route: str
    cluster: str
    status: int
    bytes_received: int
    bytes_sent: int
    duration_ms: int | None
    model: str | None
    stream: bool
    key_prefix: str | None

    @property
    def provider(self) -> str | None:
        """The provider whose break-glass route served it (None for a mid-request failure)."""
        rest = self.route.removeprefix(envoy_config.FAILOPEN_ROUTE_PREFIX)
        if rest == self.route:
            return None
        name = rest.split("_", 1)[0]
        return name if name in PROVIDERS else None


def _text(doc: Mapping[str, Any], name: str, limit: int = 2048) -> str | None:
    value = doc.get(name)
    if not isinstance(value, str) or not value or value == "-" or len(value) > limit:
        return None
    return value


def _count(doc: Mapping[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit() and len(value) <= 18:
        value = int(value)
    if isinstance(value, int) and 0 <= value < 2**62:
        return value
    return None


def parse_line(line: bytes) -> Entry | None:
    """An Envoy fail-open log line, or None for anything else (never raises)."""
    try:
        if len(line) > _MAX_LINE:
            return None
        doc = json.loads(line)
        if not isinstance(doc, dict) or str(doc.get("v")) != str(envoy_config.FAILOPEN_LOG_VERSION):
            return None
        raw_ts = _text(doc, "ts", 64)
        if raw_ts is None:
            return None
        ts = dt.datetime.fromisoformat(raw_ts.replace("Z", "+00:00"))
        if ts.tzinfo is None:
            return None
        status = _count(doc, "status")
        method = _text(doc, "method", 32)
        path = _text(doc, "path")
        if status is None or method is None or path is None or not path.startswith("/"):
            return None
        prefix = next(
            (
                p
                for s in envoy_config.KEY_PREFIX_SOURCES
                if (p := _text(doc, envoy_config.key_prefix_field(s), 16)) and _PREFIX.match(p)
            ),
            None,
        )
        request_id = _text(doc, "request_id", 128) or "fo-" + hashlib.sha256(line).hexdigest()[:32]
        stream = doc.get("stream") is True or (_text(doc, "content_type", 256) or "").startswith(
            "text/event-stream"
        )
        return Entry(
            request_id=request_id,
            ts=ts.astimezone(dt.UTC),
            method=method,
            path=path,
            route=_text(doc, "route", 128) or "",
            cluster=_text(doc, "cluster", 256) or "",
            status=status,
            bytes_received=_count(doc, "bytes_received") or 0,
            bytes_sent=_count(doc, "bytes_sent") or 0,
            duration_ms=_count(doc, "duration_ms"),
            model=_text(doc, "model", 256),
            stream=stream,
            key_prefix=prefix,
        )
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None


# -- reading the log from where we left off -------------------------------------------------------
@dataclass
class _State:
    dev: int = 0
    ino: int = 0
    offset: int = 0

    @classmethod
    def load(cls, path: Path) -> _State:
        try:
            doc = json.loads(path.read_text())
            return cls(int(doc["dev"]), int(doc["ino"]), int(doc["offset"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"dev": self.dev, "ino": self.ino, "offset": self.offset}))
        os.replace(tmp, path)


def _rotated(log_path: Path, dev: int, ino: int) -> Path | None:
    """The file the log was renamed to (`failopen.log.1`, ...), found by its identity."""
    for candidate in sorted(log_path.parent.glob(log_path.name + ".*")):
        with contextlib.suppress(OSError):
            st = candidate.stat()
            if (st.st_dev, st.st_ino) == (dev, ino):
                return candidate
    return None


def _lines(path: Path, offset: int, limit: int) -> tuple[list[bytes], int]:
    """Complete lines from `offset` (at most `limit`), and the offset after the last one."""
    out: list[bytes] = []
    with path.open("rb") as f:
        f.seek(offset)
        while len(out) < limit:
            line = f.readline(_MAX_LINE + 2)
            if not line:
                break
            if not line.endswith(b"\n"):
                if len(line) <= _MAX_LINE:
                    break  # a line Envoy is still writing: the next run reads it whole
                # An overlong line: skip to its end.
                while line and not line.endswith(b"\n"):
                    offset += len(line)
                    line = f.readline(_MAX_LINE + 2)
                offset += len(line)
                out.append(b"")  # counted as unreadable
                continue
            offset += len(line)
            out.append(line.rstrip(b"\n"))
    return out, offset


# -- turning lines into usage records -------------------------------------------------------------
@dataclass(frozen=True)
class KeyInfo:
    """What the importer needs of a wrapped key."""

    id: Any
    team: str | None
    project: str | None
    provider: str


def lookup_keys(conn: psycopg.Connection[Any], prefixes: set[str]) -> dict[str, KeyInfo]:
    """Keys by visible prefix; a prefix shared by several keys maps to none of them."""
    if not prefixes:
        return {}
    rows = conn.execute(
        "SELECT k.prefix, k.id, k.team, k.project, c.provider FROM api_keys k"
        " JOIN provider_credentials c ON c.id = k.credential_id WHERE k.prefix = ANY(%s)",
        (sorted(prefixes),),
    ).fetchall()
    found: dict[str, list[KeyInfo]] = {}
    for prefix, kid, team, project, provider in rows:
        found.setdefault(prefix, []).append(KeyInfo(kid, team, project, provider))
    return {p: infos[0] for p, infos in found.items() if len(infos) == 1}


def to_record(
    entry: Entry,
    key: KeyInfo | None,
    prices: PriceTable | None,
    prefixes: Mapping[str, str] | None = None,
) -> UsageRecord:
    """A usage record for one forwarded request: estimated from byte counts, flagged fail_open."""
    from extproc.providers import PROVIDERS as IMPLS
    from extproc.providers import guess_from_request
    from extproc.providers.base import PASSTHROUGH

    provider = entry.provider or (key.provider if key else None) or guess_from_request(entry.path, set()).name
    path = entry.path
    prefix = (prefixes or {}).get(provider, "")
    if prefix and path.startswith(prefix + "/"):
        path = path[len(prefix) :]
    impl = IMPLS.get(provider)
    api = (impl.api_for(entry.method, path) if impl else None) or PASSTHROUGH
    model = entry.model
    if model is None and (m := _GEMINI_MODEL.search(path)):
        model = m.group(1)
    ok = 200 <= entry.status < 400
    usage = Usage()
    if ok and api != PASSTHROUGH:
        out_rate = _STREAM_BYTES_PER_TOKEN if entry.stream else _BYTES_PER_TOKEN
        usage = Usage(
            input_tokens=math.ceil(entry.bytes_received / _BYTES_PER_TOKEN),
            output_tokens=math.ceil(entry.bytes_sent / out_rate),
        )
    cost = prices.cost(model, usage) if prices is not None and model else None
    flags = (FLAG,) if entry.provider else (FLAG, MIDSTREAM_FLAG)
    tags = {"request_bytes": str(entry.bytes_received), "response_bytes": str(entry.bytes_sent)}
    if entry.key_prefix:
        tags["key_prefix"] = entry.key_prefix
    return UsageRecord(
        request_id=entry.request_id,
        ts=entry.ts,
        provider=provider,
        api=api,
        key_id=key.id if key else None,
        team=key.team if key else None,
        project=key.project if key else None,
        model_requested=model,
        model_used=model,
        upstream=entry.cluster or None,
        usage=usage,
        cost_usd=cost,
        price_version=prices.version if prices is not None and cost is not None else None,
        latency_ms=entry.duration_ms,
        status=entry.status,
        outcome="complete" if ok else "upstream_error",
        stream=entry.stream,
        estimated=True,
        tags=tags,
        flags=flags,
    )


@dataclass
class ImportStats:
    """What one import run did."""

    lines: int = 0
    imported: int = 0
    unreadable: int = 0
    unknown_key: int = 0
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """For `spendgate failopen import --json` and the log."""
        return {
            "lines": self.lines,
            "imported": self.imported,
            "unreadable": self.unreadable,
            "unknown_key": self.unknown_key,
            "files": self.files,
        }


class Importer:
    """Reads the fail-open log from where it stopped and writes what it finds as usage records."""

    def __init__(
        self,
        log_path: Path,
        dsn: str,
        *,
        spool: Path | None = None,
        prices: PriceTable | None = None,
        prefixes: Mapping[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        self.state_path = log_path.with_name(log_path.name + ".offset")
        self.spool = spool or log_path.with_name(log_path.name + ".spool.jsonl")
        self._dsn = dsn
        self._prices = prices
        self._prefixes = dict(prefixes or {})

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # One importer at a time (the stack's and a cron job's), or both would read the same lines.
        fd = os.open(self.log_path.with_name(self.log_path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def run(self) -> ImportStats:
        """Import every complete line written since the last run."""
        stats = ImportStats()
        if not self.log_path.parent.exists():
            return stats
        with self._locked():
            state = _State.load(self.state_path)
            try:
                st = self.log_path.stat()
            except FileNotFoundError:
                return stats
            if (st.st_dev, st.st_ino) != (state.dev, state.ino):
                if state.ino:
                    # Rotated by rename: finish the old file first, if it is still there.
                    old = _rotated(self.log_path, state.dev, state.ino)
                    if old is not None:
                        self._drain(old, state, stats)
                state = _State(st.st_dev, st.st_ino, 0)
            elif st.st_size < state.offset:
                state.offset = 0  # truncated in place (copytruncate)
            self._drain(self.log_path, state, stats)
        if stats.lines:
            log.info("failopen.imported", **stats.as_dict())
        return stats

    def _drain(self, path: Path, state: _State, stats: ImportStats) -> None:
        stats.files.append(str(path))
        while True:
            lines, offset = _lines(path, state.offset, _BATCH_LINES)
            if not lines:
                return
            entries = []
            for line in lines:
                entry = parse_line(line) if line else None
                if entry is None:
                    stats.unreadable += 1
                else:
                    entries.append(entry)
            stats.lines += len(lines)
            if entries:
                self._write(entries, stats)
            # Only now is the position saved: a crash before this line re-reads the batch, and
            # the inserts skip what is already there.
            state.offset = offset
            state.save(self.state_path)

    def _write(self, entries: list[Entry], stats: ImportStats) -> None:
        from extproc.writer import UsageWriter

        keys: dict[str, KeyInfo] = {}
        prefixes = {e.key_prefix for e in entries if e.key_prefix}
        try:
            with psycopg.connect(self._dsn, connect_timeout=3, autocommit=True) as conn:
                keys = lookup_keys(conn, prefixes)
        except psycopg.Error as exc:
            # Without the key table the records cannot be attributed; leave the lines for later.
            raise ImportDeferred(f"Postgres is unavailable: {type(exc).__name__}") from exc
        records = []
        for entry in entries:
            key = keys.get(entry.key_prefix) if entry.key_prefix else None
            if key is None:
                stats.unknown_key += 1
            records.append(to_record(entry, key, self._prices, self._prefixes))

        async def write() -> None:
            writer = UsageWriter(self._dsn, self.spool)
            for r in records:
                writer.enqueue(r)
            await writer.close()  # what Postgres refuses now is spooled, and replayed next run

        asyncio.run(write())
        stats.imported += len(records)


class ImportDeferred(RuntimeError):
    """The import cannot go on now (Postgres is down); the log position did not move."""


def load_prices(policies: Path | None) -> PriceTable | None:
    """The price table in force for a policy directory (its own, else the shipped one), to
    estimate fail-open costs; None if unreadable."""
    try:
        return PriceTable.model_validate(yaml.safe_load(price_table_path(policies).read_text()))
    except (OSError, ValueError, yaml.YAMLError):
        return None


def import_in_background(importer: Importer, stop: threading.Event, every: float = 5.0) -> threading.Thread:
    """Run `importer` every `every` seconds until `stop` is set (for `spendgate up`)."""

    def loop() -> None:
        while not stop.wait(every):
            try:
                importer.run()
            except ImportDeferred as exc:
                log.warning("failopen.import_deferred", reason=str(exc))
            except Exception as exc:  # the import must never take the stack down
                log.error("failopen.import_failed", error=type(exc).__name__, detail=str(exc)[:200])

    thread = threading.Thread(target=loop, name="failopen-import", daemon=True)
    thread.start()
    return thread


def start_stack_import(
    home: Path, dsn: str, policies: Path | None, stop: threading.Event
) -> threading.Thread:
    """The importer `spendgate up --fail-open` runs beside Envoy, until `stop` is set."""
    importer = Importer(
        home / ACCESS_LOG,
        dsn,
        spool=home / "spool-failopen.jsonl",
        prices=load_prices(policies),
        prefixes=path_prefixes(home),
    )
    return import_in_background(importer, stop)
