"""What every provider protocol module offers, as plain data in and plain data out."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from extproc import tokens
from extproc.sse import SSEDecoder
from extproc.usage import Usage

# API kinds, as stored in usage_events.api.
PASSTHROUGH = "passthrough"
# Methods that read or delete what exists and so start no paid work upstream.
FREE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


class BadRequest(Exception):
    """The client sent something the provider would refuse; answered 400 in its format."""


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


@dataclass
class StreamResult:
    """What a finished (or abandoned) response stream yielded."""

    usage: Usage | None
    model: str | None
    text: str


class StreamAccountant(Protocol):
    """Consumes a response stream chunk by chunk."""

    ended: bool  # the provider's own end-of-stream event has been seen

    def feed(self, chunk: bytes) -> bytes | None:
        """Take one body chunk; return replacement bytes for the client, or None to pass it as is."""

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
        """Read a request body; raise BadRequest when it is malformed."""

    def usage_from_response(self, api: str, doc: Any) -> tuple[Usage | None, str | None]:
        """Usage and the model that answered, from a complete JSON response."""

    def stream_accountant(self, api: str, request: ParsedRequest) -> StreamAccountant:
        """A fresh incremental parser for one SSE response."""

    def prompt_text(self, api: str, doc: Any) -> str:
        """The text of a request's input, for a fallback token count."""

    def transform(self, api: str, doc: dict[str, Any], path: str, change: Change) -> tuple[bool, str | None]:
        """Apply routing and transforms to a request document in place.

        Returns whether the document changed and, when the model lives in the path (Gemini),
        the new path.
        """

    def error_body(self, status: int, message: str) -> bytes:
        """An error document in this provider's own format."""


def load_json_object(body: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object."""
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


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


def optional_int(doc: dict[str, Any], *keys: str) -> int | None:
    """The first present integer field among `keys`."""
    for key in keys:
        value = doc.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"'{key}' must be an integer")
        return value
    return None


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


def count_prompt(provider: Provider, api: str, doc: Any) -> int:
    """Fallback input token count of a request document."""
    return tokens.count(provider.prompt_text(api, doc)) if doc is not None else 0


class SSEAccountant:
    """Shared skeleton of the per-provider stream parsers.

    The hot path only splits events and keeps their raw data; JSON is decoded for the few
    events that carry usage, and text is extracted only when a fallback count is needed.
    """

    def __init__(
        self,
        wants: Callable[[str], bool],
        reduce: Callable[[list[Any]], tuple[Usage | None, str | None]],
        text_of: Callable[[Any], list[str]],
        is_end: Callable[[str], bool],
        drop: Callable[[str], bool] | None = None,
    ) -> None:
        self.ended = False
        self._is_end = is_end
        self._decoder = SSEDecoder()
        self._wants = wants
        self._reduce = reduce
        self._text_of = text_of
        self._drop = drop
        self._usage_events: list[str] = []
        self._events: list[str] = []

    def feed(self, chunk: bytes) -> bytes | None:
        """See StreamAccountant.feed."""
        events = self._decoder.feed(chunk)
        dropped = False
        for data in events:
            self._events.append(data)
            if self._is_end(data):
                # A client may hang up once it has this event, before Envoy sends the
                # empty end-of-stream chunk; the answer was still delivered whole.
                self.ended = True
            if self._wants(data):
                self._usage_events.append(data)
                if self._drop is not None and self._drop(data):
                    dropped = True
        if self._drop is None:
            return None
        # Rewriting the stream: forward complete events only, and not the hidden one.
        kept = [d for d in events if not (dropped and self._drop(d))]
        return b"".join(b"data: " + d.encode() + b"\n\n" for d in kept)

    def finish(self) -> StreamResult:
        """See StreamAccountant.finish."""
        for data in self._decoder.flush():
            self._events.append(data)
            if self._wants(data):
                self._usage_events.append(data)
        docs = [d for d in (_loads(e) for e in self._usage_events) if d is not None]
        usage, model = self._reduce(docs)
        text = ""
        if usage is None or usage.output_tokens == 0:
            parts: list[str] = []
            for raw in self._events:
                doc = _loads(raw)
                if doc is not None:
                    parts.extend(self._text_of(doc))
            text = "".join(parts)
        return StreamResult(usage, model, text)


def _loads(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None
