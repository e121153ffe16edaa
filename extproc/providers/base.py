"""What every provider protocol module offers, as plain data in and plain data out."""

from __future__ import annotations

import functools
import json
import math
import re
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Protocol

from extproc import tokens
from extproc.sse import MAX_PENDING_BYTES, SSEDecoder
from extproc.usage import Usage, as_int

# API kinds, as stored in usage_events.api.
PASSTHROUGH = "passthrough"
# Methods that read or delete what exists and so start no paid work upstream.
FREE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})

# -- bounds on what a request may ask for -----------------------------------------------------
# Deepest JSON nesting accepted. Real requests stay far below (a chat message with a tool
# schema nests ~20 levels); without a bound, a body nested 100,000 levels deep exhausts the
# interpreter's recursion limit inside json.loads.
MAX_JSON_DEPTH = 128
# Largest JSON document decoded. Requests are capped by the exchange (8 MiB by default) before
# they get here; this bounds upstream answers, which are buffered whole.
MAX_JSON_BYTES = 64 << 20
# Largest output ceiling accepted in any max-tokens field. The largest documented today is
# 128k (Claude with the output-128k beta, GPT-5); every provider refuses more than its model's
# limit, so a value past this is a mistake or an attempt to overflow a reservation.
MAX_OUTPUT_TOKENS = 1_000_000
# Input no request can exceed: the largest context window of any model behind these APIs
# (Gemini 1.5 Pro, 2,097,152 tokens). Worst cases for unseen input are capped at it.
MAX_CONTEXT_TOKENS = 2_097_152
# Input a request pulls in upstream where no body shows it: a stored conversation
# (previous_response_id, conversation), a cached context (Gemini cachedContent), results of
# tools the provider runs itself (web search, URL fetch, file search). Its only bound is the
# model's context window, which the exchange reserves for such requests (see
# plausibility.draws_on_upstream_context); this smaller figure is what extra_input_tokens
# carries for them, so that no caller of the parsers takes one for a request with nothing unseen.
UPSTREAM_CONTEXT_TOKENS = 131_072


class BadRequest(Exception):
    """The client sent something the provider would refuse; answered 400 in its format."""


class JSONRejected(ValueError):
    """A JSON document Spendgate will not read: malformed, too large, too deep, or ambiguous.

    The message completes a sentence about the document ("is not valid JSON: ...").
    """


@dataclass
class ParsedRequest:
    """What accounting needs from a request body."""

    model: str | None
    stream: bool
    max_tokens: int | None = None
    # How many completions one request bills (OpenAI `n`, `best_of`; Gemini `candidateCount`):
    # the output ceiling is reserved this many times.
    multiplier: int = 1
    # A worst-case token count for input tiktoken cannot read (images, audio, files), added to
    # the counted text when a reservation is made.
    extra_input_tokens: int = 0
    body: Any = None  # the decoded JSON document, kept for a fallback token count
    rewritten: bytes | None = None  # a new body to send upstream, when the proxy changed it
    strip_usage: bool = False  # the proxy asked for usage the client did not: hide it again


@dataclass(frozen=True)
class Change:
    """What policies want changed in a request, whatever the provider's wire format."""

    model: str | None = None  # route to this model instead
    max_tokens: int | None = None  # clamp the output ceiling (set it when the request has none)
    system_prompt: str | None = None  # put first among the request's system instructions


def clamp(doc: dict[str, Any], key: str, ceiling: int) -> bool:
    """Lower doc[key] to `ceiling`, or set it when absent; True when the document changed."""
    current = doc.get(key)
    if isinstance(current, int) and not isinstance(current, bool) and current <= ceiling:
        return False
    doc[key] = ceiling
    return True


# -- JSON --------------------------------------------------------------------------------------
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def json_depth(data: bytes) -> int:
    """How deep the brackets of a JSON text nest, strings left out; a cheap scan in C loops.

    Escaped backslashes and quotes go first, so every quote left opens or closes a string; the
    text between string pairs keeps only its brackets, each turned into +1 or -1, and the
    deepest point is the largest running sum. Exact for valid JSON; for invalid JSON it may
    be off, which json.loads then refuses anyway.
    """
    outside = data.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2]
    steps = b"".join(outside).translate(None, _NOT_BRACKETS).translate(_BRACKET_STEPS)
    return max(accumulate(array("b", steps)), default=0)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONRejected(f"has the key {key[:64]!r} twice in one object")
            seen.add(key)
    return doc


def _refuse_constant(name: str) -> Any:
    raise JSONRejected(f"holds {name}, which is not a JSON number")


def _float_constant(name: str) -> float:
    return float(name)


# One decoder per policy, made once: json.loads builds a new one per call when given hooks.
_DECODERS = {
    (unique, constants): json.JSONDecoder(
        object_pairs_hook=_unique_pairs if unique else None,
        parse_constant=_float_constant if constants else _refuse_constant,
    )
    for unique in (False, True)
    for constants in (False, True)
}


def load_json(
    data: bytes | bytearray | str,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    max_bytes: int = MAX_JSON_BYTES,
    unique_keys: bool = True,
    allow_constants: bool = False,
) -> Any:
    """Decode a JSON document within bounds; every failure is a JSONRejected (a ValueError).

    Refuses a document over `max_bytes`, nested deeper than `max_depth` (checked before
    json.loads recurses), with a duplicate object key when `unique_keys` (two readers of the
    same body could take different values), or holding NaN/Infinity/-Infinity, which are not
    JSON, unless `allow_constants`: then they decode as floats, for callers that check every
    number they read (see `count_problem`). Never raises RecursionError or MemoryError.
    """
    if isinstance(data, str):
        text, raw = data, data.encode("utf-8", "surrogatepass")
    else:
        raw = bytes(data)
        if len(raw) > max_bytes:
            raise JSONRejected(f"is larger than {max_bytes} bytes")
        try:
            # UTF-8 only: json.loads would also take UTF-16 and UTF-32, which the depth scan
            # below cannot read.
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONRejected(f"is not UTF-8: {exc}"[:300]) from None
    if len(raw) > max_bytes:
        raise JSONRejected(f"is larger than {max_bytes} bytes")
    # Only a document with more opening brackets than the bound can nest past it.
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(raw) > max_depth:
        raise JSONRejected(f"nests deeper than {max_depth} levels")
    try:
        return _DECODERS[unique_keys, allow_constants].decode(text)
    except JSONRejected:
        raise
    except (ValueError, RecursionError, MemoryError) as exc:
        # ValueError covers JSONDecodeError and integers past Python's digit limit;
        # RecursionError can only come from invalid JSON the depth scan misread.
        raise JSONRejected(f"is not valid JSON: {exc}"[:300]) from None


def load_json_object(body: bytes) -> dict[str, Any]:
    """Decode a request body that must be one JSON object, without duplicate keys at any depth."""
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        doc = load_json(body)
    except JSONRejected as exc:
        raise BadRequest(f"request body {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


# -- request fields ----------------------------------------------------------------------------
def optional_str(doc: dict[str, Any], key: str) -> str | None:
    """A string field, or None; a field of another type is a client error."""
    value = doc.get(key)
    if value is None or isinstance(value, str):
        return value
    raise BadRequest(f"'{key}' must be a string")


def stream_flag(doc: dict[str, Any]) -> bool:
    """The `stream` field; anything but a boolean would be refused by the provider too."""
    value = doc.get("stream")
    if value is None or isinstance(value, bool):
        return value is True
    raise BadRequest("'stream' must be a boolean")


def optional_object(doc: dict[str, Any], key: str) -> dict[str, Any] | None:
    """An object field, or None; a field of another type is a client error."""
    value = doc.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise BadRequest(f"'{key}' must be an object")


def count_field(
    doc: dict[str, Any],
    key: str,
    *,
    minimum: int = 1,
    maximum: int = MAX_OUTPUT_TOKENS,
    strings: bool = False,
) -> int | None:
    """A whole-number field that feeds a reservation, or None when absent or null.

    Anything Spendgate could read differently from the provider is refused rather than
    guessed: booleans, fractions, non-finite numbers, and strings (unless `strings`: protobuf's
    JSON mapping, which Gemini speaks, accepts decimal strings for integers). A float with no
    fractional part (5.0) reads as that integer wherever a provider accepts it at all, so it is
    accepted. Values outside [minimum, maximum] are refused.
    """
    value = doc.get(key)
    if value is None:
        return None
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        number = int(value) if math.isfinite(value) and value.is_integer() else None
    elif strings and isinstance(value, str):
        digits = value[1:] if value.startswith("-") else value
        if digits.isascii() and digits.isdigit() and len(digits) <= 19:
            number = int(value)
    if number is None:
        raise BadRequest(f"'{key}' must be an integer")
    if not minimum <= number <= maximum:
        raise BadRequest(f"'{key}' must be between {minimum} and {maximum}, got {number}")
    return number


def spelling(doc: dict[str, Any], *spellings: str) -> str | None:
    """Which spelling of a field a document uses, for fields protobuf's JSON mapping lets a
    client spell two ways (camelCase, snake_case); None when it has none.

    Both present is refused: Spendgate and the provider might each read a different one.
    """
    present = [s for s in spellings if doc.get(s) is not None]
    if len(present) > 1:
        raise BadRequest(f"'{present[0]}' and '{present[1]}' are the same field; send one")
    return present[0] if present else None


def either(doc: dict[str, Any], *spellings: str) -> Any:
    """The value of a field spelt either way (see `spelling`), or None."""
    key = spelling(doc, *spellings)
    return doc[key] if key is not None else None


# -- text for counting -------------------------------------------------------------------------
def collect_text(node: Any, keys: frozenset[str]) -> list[str]:
    """Every string under one of `keys` anywhere in a JSON tree, in document order."""
    out: list[str] = []
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for k, v in reversed(list(cur.items())):
                if isinstance(v, str):
                    if k in keys:
                        out.append(v)
                else:
                    stack.append(v)
        elif isinstance(cur, list):
            stack.extend(reversed(cur))
        elif isinstance(cur, str):
            out.append(cur)
    return out


# Values that are not text the model reads: binary payloads, references, opaque signatures,
# and the small enums of the wire format itself.
SKIP_KEYS = frozenset(
    {
        "data",
        "url",
        "image_url",
        "file_data",
        "file_id",
        "file_url",
        "fileUri",
        "file_uri",
        "mimeType",
        "mime_type",
        "media_type",
        "signature",
        "thoughtSignature",
        "thought_signature",
        "encrypted_content",
        "id",
        "call_id",
        "tool_use_id",
        "type",
        "role",
        "detail",
        "format",
        "cache_control",
    }
)
# Values that are free-form JSON the model reads as JSON text: tool-call arguments and results.
JSON_KEYS = frozenset({"input", "args", "response", "arguments", "output", "content"})


def visible_text(node: Any) -> list[str]:
    """The text a model reads in a message tree, in document order.

    Every string counts except those under SKIP_KEYS; a text document's `data` counts (an
    Anthropic `{"type": "text", "data": ...}` source). Objects and arrays under JSON_KEYS that
    are not message parts (tool inputs, function-call arguments and results) count as their JSON.
    """
    out: list[str] = []
    stack: list[Any] = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, str):
            out.append(cur)
        elif isinstance(cur, list):
            stack.extend(reversed(cur))
        elif isinstance(cur, dict):
            is_text_source = cur.get("type") == "text"
            for k, v in reversed(list(cur.items())):
                if k in SKIP_KEYS and not (k == "data" and is_text_source):
                    continue
                if k in JSON_KEYS and isinstance(v, dict) and "type" not in v:
                    out.append(json_text(v))
                else:
                    stack.append(v)
    return out


def json_text(value: Any) -> str:
    """A JSON value as the compact text a provider puts in front of the model (tool schemas)."""
    if value is None:
        return ""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return ""


def walk_dicts(*roots: Any) -> Iterator[dict[str, Any]]:
    """Every object in the given JSON trees (iteratively: no recursion limit to hit)."""
    stack = [r for r in roots if r is not None]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            yield cur
            stack.extend(v for v in cur.values() if isinstance(v, dict | list))
        elif isinstance(cur, list):
            stack.extend(v for v in cur if isinstance(v, dict | list))


def count_prompt(provider: Provider, api: str, doc: Any) -> int:
    """Fallback input token count of a request document (the text only; see extra_input_tokens)."""
    return tokens.count(provider.prompt_text(api, doc)) if doc is not None else 0


def capped(total: int) -> int:
    """A worst case for unseen input, no more than any context window holds."""
    return min(max(total, 0), MAX_CONTEXT_TOKENS)


# -- usage from upstream -----------------------------------------------------------------------
def count_problem(value: Any) -> str | None:
    """Why an upstream token count is not a plain count, or None when it is one (or absent).

    The counterpart of `as_int`: whenever this names a problem, as_int has replaced the value
    (by 0, or by its ceiling when too large).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "not finite"
        if not value.is_integer():
            return "fractional"
    elif isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            return "not a number"
        return "too large" if len(value) > 20 or as_int(value) != int(value) else None
    elif not isinstance(value, int):
        return "not a number"
    if value < 0:
        return "negative"
    return "too large" if as_int(value) != value else None


class UsageReader:
    """Reads token counts from upstream usage objects, noting every value that is not a plain count.

    Counts come out as non-negative ints whatever the upstream sent (see `as_int`); what was
    wrong with them is kept in `anomalies` for the record's flags.
    """

    def __init__(self) -> None:
        self.anomalies: list[str] = []

    def get(self, raw: Any, key: str) -> int:
        """raw[key] as a count; 0 when absent, null or unusable (noted)."""
        if not isinstance(raw, dict):
            return 0
        value = raw.get(key)
        problem = count_problem(value)
        if problem is not None:
            self.anomalies.append(f"{key} {problem}")
        return as_int(value)

    def obj(self, raw: Any, key: str) -> dict[str, Any]:
        """raw[key] when it is an object; {} when absent or null, {} and noted when anything else."""
        value = raw.get(key) if isinstance(raw, dict) else None
        if isinstance(value, dict):
            return value
        if value is not None:
            self.anomalies.append(f"{key} not an object")
        return {}

    def usage(self, usage: Usage) -> Usage:
        """`usage` made consistent (see `consistent`), its corrections noted."""
        fixed, problems = consistent(usage)
        self.anomalies.extend(problems)
        return fixed

    def reported(self, usage: Usage | None, model: Any) -> Reported:
        """What was read, with every anomaly noted on the way."""
        return Reported(usage, model if isinstance(model, str) and model else None, tuple(self.anomalies))


def consistent(usage: Usage) -> tuple[Usage, tuple[str, ...]]:
    """`usage` with each part no larger than what contains it, and what had to be lowered.

    cache writes and cache reads are parts of input (together no more than it), one-hour writes
    a part of cache writes, reasoning a part of output.
    """
    problems: list[str] = []
    write = usage.cache_write_tokens
    if write > usage.input_tokens:
        problems.append("cache_write_tokens exceed input_tokens")
        write = usage.input_tokens
    cached = usage.cached_input_tokens
    if cached > usage.input_tokens - write:
        problems.append("cached_input_tokens exceed input_tokens")
        cached = usage.input_tokens - write
    one_hour = usage.cache_write_1h_tokens
    if one_hour > write:
        problems.append("cache_write_1h_tokens exceed cache_write_tokens")
        one_hour = write
    reasoning = usage.reasoning_tokens
    if reasoning > usage.output_tokens:
        problems.append("reasoning_tokens exceed output_tokens")
        reasoning = usage.output_tokens
    if not problems:
        return usage, ()
    return (
        Usage(
            input_tokens=usage.input_tokens,
            cached_input_tokens=cached,
            cache_write_tokens=write,
            output_tokens=usage.output_tokens,
            reasoning_tokens=reasoning,
            cache_write_1h_tokens=one_hour,
        ),
        tuple(problems),
    )


@dataclass(frozen=True)
class Reported:
    """What an upstream answer said about its usage."""

    usage: Usage | None = None  # None: the answer carried no usage at all
    model: str | None = None  # the model that answered, when it said
    # What was wrong with the figures (negative, non-finite, inconsistent, unreadable...): each
    # was replaced by 0 or clamped, so a record built from them deserves a flag.
    anomalies: tuple[str, ...] = ()


def last_usage(
    docs: list[Any], model_key: str, usage_key: str, read: Callable[[dict[str, Any], UsageReader], Usage]
) -> Reported:
    """The last usage object among a stream's events, and the last model named.

    OpenAI puts usage in its final chunk only and Gemini repeats it cumulatively, so for both
    the last one seen is the figure to bill; its anomalies come with it.
    """
    usage: Usage | None = None
    model: str | None = None
    anomalies: tuple[str, ...] = ()
    for d in docs:
        if not isinstance(d, dict):
            continue
        if isinstance(d.get(model_key), str) and d[model_key]:
            model = d[model_key]
        reader = UsageReader()
        raw = reader.obj(d, usage_key)
        if raw:
            usage, anomalies = read(raw, reader), tuple(reader.anomalies)
    return Reported(usage, model, anomalies)


@dataclass
class StreamResult:
    """What a finished (or abandoned) response stream yielded."""

    usage: Usage | None
    model: str | None
    text: str  # output text seen, kept for a fallback count (bounded: MAX_TEXT_CHARS)
    anomalies: tuple[str, ...] = ()  # see Reported.anomalies; also "stream not parseable" and such
    # Output seen but not kept as text (past the text bound, or bytes the parser gave up on),
    # as a token estimate to add to the count of `text`.
    extra_output_tokens: int = 0
    # Part of the stream could not be parsed: the usage may be missing or an early partial
    # figure, so the record must be estimated whatever `usage` says.
    lossy: bool = False


class StreamAccountant(Protocol):
    """Consumes a response stream chunk by chunk."""

    ended: bool  # the provider's own end-of-stream event has been seen
    failed: bool  # the provider sent an error event in the stream

    def feed(self, chunk: bytes, end_of_stream: bool = False) -> bytes | None:
        """Take one body chunk; return replacement bytes for the client, or None to pass it as is.

        When the accountant rewrites the stream it holds back a partial event until its end
        arrives; `end_of_stream=True` on the last chunk makes it hand back everything it still
        holds, byte for byte, so nothing sent upstream is lost to the client.
        """

    def finish(self) -> StreamResult:
        """Everything learned from the stream so far."""


class Provider(Protocol):
    """One provider wire protocol: recognising its APIs, reading usage, writing its errors."""

    name: str

    def api_for(self, method: str, path: str) -> str | None:
        """The API kind of a request, or None when the path is not one Spendgate accounts."""

    def is_free(self, method: str, path: str) -> bool:
        """Whether an unaccounted request costs nothing upstream (reads, token counting).

        A key under a budget may make only these besides the accounted APIs: anything else
        would spend money the budget cannot see.
        """

    def auth_headers(self, secret: str) -> list[tuple[str, str]]:
        """The headers that carry a real credential to this provider."""

    def parse_request(self, api: str, path: str, body: bytes) -> ParsedRequest:
        """Read a request body; raise BadRequest (and nothing else) when it is malformed."""

    def response_usage(self, api: str, doc: Any) -> Reported:
        """Usage, the model that answered and any anomalies, from a complete JSON response."""

    def usage_from_response(self, api: str, doc: Any) -> tuple[Usage | None, str | None]:
        """Usage and the model that answered, from a complete JSON response (no anomalies)."""

    def stream_accountant(self, api: str, request: ParsedRequest) -> StreamAccountant:
        """A fresh incremental parser for one SSE response."""

    def prompt_text(self, api: str, doc: Any) -> str:
        """The text of a request's input, tool definitions included, for a token count."""

    def transform(self, api: str, doc: dict[str, Any], path: str, change: Change) -> tuple[bool, str | None]:
        """Apply routing and transforms to a request document in place.

        Returns whether the document changed and, when the model lives in the path (Gemini),
        the new path.
        """

    def error_body(self, status: int, message: str) -> bytes:
        """An error document in this provider's own format."""


def load_response_json(body: bytes | bytearray | str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Decode an upstream answer: bounded like a request, but duplicate keys are tolerated (the
    last wins, as in the provider's own SDKs) and NaN/Infinity decode as floats, for the usage
    readers to flag. Raises JSONRejected."""
    return load_json(body, max_bytes=max_bytes, unique_keys=False, allow_constants=True)


# How far from the end of an answer too large to decode its usage object is looked for.
_TAIL_BYTES = 64 << 10
# A usage object as the last field of an answer: "usage" or "usageMetadata", then an object
# nesting at most two levels (the token details).
_TAIL_USAGE = re.compile(rb'"(usage|usageMetadata)"\s*:\s*(\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\})')


def usage_from_body(
    provider: Provider, api: str, body: bytes | bytearray, max_bytes: int = MAX_JSON_BYTES
) -> Reported:
    """Usage from a buffered JSON answer, never raising: an unreadable body is an anomaly.

    An answer over `max_bytes` (a large batch of embeddings) is not decoded whole: its usage
    object, which every provider puts last, is looked for in its last 64 KiB.
    """
    if len(body) > max_bytes:
        return usage_from_tail(
            functools.partial(provider.response_usage, api), bytes(body[-_TAIL_BYTES:]), max_bytes
        )
    try:
        doc = load_response_json(body, max_bytes)
    except JSONRejected as exc:
        return Reported(anomalies=(f"response body {exc}",))
    return _read(functools.partial(provider.response_usage, api), doc)


def usage_from_tail(read: Callable[[Any], Reported], tail: bytes, max_bytes: int) -> Reported:
    """Usage from the last bytes of an answer of more than `max_bytes`, too large to decode."""
    # Only the last mention is tried: one linear match, however the tail was crafted.
    found = _TAIL_USAGE.match(tail, tail.rfind(b'"usage')) if b'"usage' in tail else None
    if found is None:
        return Reported(anomalies=(f"response body is larger than {max_bytes} bytes and ends with no usage",))
    key, raw = found.group(1).decode(), found.group(2)
    try:
        usage = load_response_json(raw)
    except JSONRejected as exc:
        return Reported(anomalies=(f"usage at the end of an oversized body {exc}",))
    reported = _read(read, {key: usage})
    note = f"response body is larger than {max_bytes} bytes; usage read from its end"
    return Reported(reported.usage, reported.model, (note, *reported.anomalies))


def _read(read: Callable[[Any], Reported], doc: Any) -> Reported:
    try:
        return read(doc)
    except Exception as exc:  # a reader bug must not cost the record; the anomaly says so
        return Reported(anomalies=(f"usage unreadable: {type(exc).__name__}",))


# -- streams ----------------------------------------------------------------------------------
# Raw event data kept before it is reduced to text: the hot path only splits events, and JSON
# is decoded once this much has piled up (or at the end), not per event.
MAX_KEPT_EVENT_CHARS = 256 << 10
# Output text kept for the fallback count; past it, text is only measured (tokens.approx).
MAX_TEXT_CHARS = 1 << 20
# A non-SSE answer on an event-stream response (a plain JSON document) kept to read its usage.
MAX_JSON_BODY_BYTES = 8 << 20
# Usage events kept besides the first: every reduction reads the first one (Anthropic's
# message_start) and the last ones (the final chunk, message_delta, the last usageMetadata).
_LAST_USAGE_EVENTS = 4


# How far into an event's data the marker of an error event must appear to be looked at.
_ERROR_REACH = 48


def is_error_event(data: str) -> bool:
    """Whether a stream event is the provider's error: OpenAI and Gemini `{"error": {...}}`,
    Anthropic and the Responses API `{"type": "error", ...}`, or `response.failed`."""
    try:
        doc = load_response_json(data.encode("utf-8", "replace"))
    except JSONRejected:
        return False
    if not isinstance(doc, dict):
        return False
    return isinstance(doc.get("error"), dict) or doc.get("type") in ("error", "response.failed")


class SSEAccountant:
    """Shared skeleton of the per-provider stream parsers.

    Memory is bounded whatever the stream's length: the first usage-bearing event and the last
    few, raw event data up to MAX_KEPT_EVENT_CHARS (then reduced to its delta text), and delta
    text up to MAX_TEXT_CHARS (past that only its size is kept). A body that is a plain JSON
    document rather than events passes through untouched and is read whole at the end.
    """

    def __init__(
        self,
        wants: Callable[[str], bool],
        reduce: Callable[[list[Any]], Reported],
        text_of: Callable[[Any], list[str]],
        is_end: Callable[[str], bool],
        drop: Callable[[str], bool] | None = None,
        whole: Callable[[Any], Reported] | None = None,
        max_event_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        self.ended = False
        self.failed = False
        self._is_end = is_end
        self._decoder = SSEDecoder(max_event_bytes)
        self._max_event_bytes = max_event_bytes
        self._wants = wants
        self._reduce = reduce
        self._text_of = text_of
        self._drop = drop
        self._whole = whole
        self._mode: str | None = None  # "sse" or "json", from the first non-blank byte
        self._json = bytearray()
        self._json_overflow = False
        self._json_tail = b""  # the last bytes of a JSON body too large to keep whole
        self._json_seen = 0
        self._first_usage: str | None = None
        self._last_usage: deque[str] = deque(maxlen=_LAST_USAGE_EVENTS)
        self._kept: list[str] = []
        self._kept_chars = 0
        self._text: list[str] = []
        self._text_chars = 0
        self._unkept_bytes = 0  # output seen but not kept as text
        self._flushed = False
        self._lf_of_dropped = False

    def feed(self, chunk: bytes, end_of_stream: bool = False) -> bytes | None:
        """See StreamAccountant.feed."""
        if self._mode is None and chunk.strip():
            self._mode = "json" if chunk.lstrip()[:1] in (b"{", b"[") else "sse"
        if self._mode != "sse":
            # A JSON document (or blanks before anything): the client gets it as sent.
            if self._mode == "json":
                self._keep_json(chunk)
            return None
        events = self._decoder.feed(chunk)
        if end_of_stream:
            events.extend(self._decoder.flush())
            self._flushed = True
        out = bytearray() if self._drop is not None else None
        for ev in events:
            drop = False
            if not ev.parsed:
                self._unkept_bytes += len(ev.raw)
            elif ev.data is not None:
                drop = self._take(ev.data)
            if out is None:
                continue
            raw = ev.raw
            if self._lf_of_dropped and raw.startswith(b"\n"):
                raw = raw[1:]  # the LF of a CRLF that ended the hidden event
            self._lf_of_dropped = False
            if drop:
                # Only the event itself goes: line ends before it close the event before, and a
                # final CR may be half of a CRLF whose LF comes with the next event.
                out += raw[: len(raw) - len(raw.lstrip(b"\r\n"))]
                self._lf_of_dropped = raw.endswith(b"\r")
            else:
                out += raw
        return bytes(out) if out is not None else None

    def _take(self, data: str) -> bool:
        """Note one event; True when it is to be hidden from the client."""
        if '"error"' in data[:_ERROR_REACH] or '"response.failed"' in data[:_ERROR_REACH]:
            self.failed = self.failed or is_error_event(data)
        if self._is_end(data):
            # A client may hang up once it has this event, before Envoy sends the
            # empty end-of-stream chunk; the answer was still delivered whole.
            self.ended = True
        hide = False
        if self._wants(data):
            if self._first_usage is None:
                self._first_usage = data
            else:
                self._last_usage.append(data)
            hide = self._drop is not None and self._drop(data)
        self._kept.append(data)
        self._kept_chars += len(data)
        if self._kept_chars > MAX_KEPT_EVENT_CHARS:
            self._reduce_kept()
        return hide

    def _reduce_kept(self) -> None:
        """Turn the raw events kept so far into their delta text."""
        for raw in self._kept:
            for part in _text_parts(self._text_of, raw):
                room = MAX_TEXT_CHARS - self._text_chars
                if len(part) <= room:
                    self._text.append(part)
                    self._text_chars += len(part)
                else:
                    if room > 0:
                        self._text.append(part[:room])
                        self._text_chars += room
                    self._unkept_bytes += len(part[max(room, 0) :].encode("utf-8", "replace"))
        self._kept.clear()
        self._kept_chars = 0

    def _keep_json(self, chunk: bytes) -> None:
        self._json_seen += len(chunk)
        if not self._json_overflow and len(self._json) + len(chunk) <= MAX_JSON_BODY_BYTES:
            self._json += chunk
            return
        if not self._json_overflow:
            self._json_overflow = True
            self._json_tail = bytes(self._json[-_TAIL_BYTES:])
            self._json = bytearray()
        self._json_tail = (self._json_tail + chunk)[-_TAIL_BYTES:]

    def finish(self) -> StreamResult:
        """See StreamAccountant.finish. Never raises, whatever the stream held."""
        try:
            return self._finish()
        except Exception as exc:  # a reader bug must not cost the record; the anomaly says so
            return StreamResult(
                None,
                None,
                "",
                (f"stream unreadable: {type(exc).__name__}",),
                tokens.approx(self._unkept_bytes + self._kept_chars),
                lossy=True,
            )

    def _finish(self) -> StreamResult:
        if self._mode == "json":
            return self._finish_json()
        if not self._flushed:
            self._flushed = True
            for ev in self._decoder.flush():
                if ev.data is not None:
                    self._take(ev.data)
        usage_events = ([self._first_usage] if self._first_usage is not None else []) + list(self._last_usage)
        docs = [d for d in (_loads(e) for e in usage_events) if d is not None]
        reported = self._reduce(docs)
        anomalies = list(reported.anomalies)
        lossy = self._decoder.overflowed
        if lossy:
            anomalies.append(f"stream not parseable past an event of more than {self._max_event_bytes} bytes")
        text = ""
        if reported.usage is None or reported.usage.output_tokens == 0 or lossy:
            self._reduce_kept()
            text = "".join(self._text)
        return StreamResult(
            reported.usage,
            reported.model,
            text,
            tuple(anomalies),
            tokens.approx(self._unkept_bytes),
            lossy,
        )

    def _finish_json(self) -> StreamResult:
        if self._json_overflow:
            read = self._whole if self._whole is not None else (lambda _: Reported())
            tail = usage_from_tail(read, self._json_tail, MAX_JSON_BODY_BYTES)
            extra = tokens.approx(self._json_seen) if tail.usage is None else 0
            return StreamResult(tail.usage, tail.model, "", tail.anomalies, extra, tail.usage is None)
        try:
            doc = load_response_json(self._json)
        except JSONRejected as exc:
            # Neither events nor a document: all that can be said is how much went by.
            return StreamResult(
                None,
                None,
                "",
                (f"event stream body {exc}",),
                tokens.approx(len(self._json)),
                lossy=True,
            )
        reported = self._whole(doc) if self._whole is not None else Reported()
        extra = tokens.approx(len(self._json)) if reported.usage is None else 0
        return StreamResult(
            reported.usage, reported.model, "", reported.anomalies, extra, reported.usage is None
        )


def _text_parts(text_of: Callable[[Any], list[str]], raw: str) -> Iterable[str]:
    doc = _loads(raw)
    if doc is None:
        return ()
    return [p for p in text_of(doc) if isinstance(p, str)]


def _loads(data: str) -> Any:
    try:
        return load_response_json(data)
    except JSONRejected:
        return None
