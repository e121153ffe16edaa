"""A fake LLM provider that speaks the OpenAI, Anthropic and Gemini wire formats.

The official SDKs parse its answers, so the proxy under test sees exactly what
it would see from the real providers: the same paths, headers, JSON shapes,
SSE framing and usage accounting, with deterministic token counts that tests
can assert on.

Behaviour is chosen per request with the ``x-fake-scenario`` header (a
comma-separated list, e.g. ``"slow,gzip"``):

``error-NNN``
    Answer with status NNN in the provider's own error shape (429 also sends
    ``retry-after: 1``). ``error-429``, ``error-500`` and ``error-400`` are the
    usual ones; 401, 403, 404, 503 and Anthropic's 529 are mapped too.
``cut``
    Streams: send the headers and the first two content deltas, then abort the
    TCP connection (RST): no finish reason, no final usage, no ``[DONE]``.
    Anthropic's ``message_start`` (prompt usage, ``output_tokens: 1``) still
    comes first, as it opens every real stream; Gemini's cut chunks carry no
    ``usageMetadata``. Non-streams: send the headers (with the full
    Content-Length) and half of the JSON body, then abort.
``slow``
    Sleep ``x-fake-delay`` seconds (default 0.2) between stream events, or once
    before a non-streamed answer, so a client can hang up mid-stream.
``gzip``
    When the request accepts gzip, gzip the body and set ``content-encoding``.
``stream-error``
    Streams: two content deltas, then the provider's in-stream error (OpenAI
    ``{"error": ...}`` data, Responses ``error`` event, Anthropic
    ``event: error`` overloaded_error, Gemini ``{"error": ...}`` chunk), then a
    clean end of stream.

Unknown scenario names are answered with a 400 so a typo fails loudly instead
of silently running the normal path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import re
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Final

from aiohttp import web

__all__ = [
    "ANTHROPIC_COUNT_TOKENS",
    "ANTHROPIC_USAGE",
    "CUT_AFTER_DELTAS",
    "DEFAULT_DELAY",
    "DELAY_HEADER",
    "EMBEDDING_DIMENSIONS",
    "EMBEDDING_USAGE",
    "GEMINI_USAGE",
    "OPENAI_USAGE",
    "REPLY_DELTAS",
    "REPLY_TEXT",
    "SCENARIO_HEADER",
    "TOOL_ARGUMENTS",
    "TOOL_ARGUMENTS_JSON",
    "FakeProvider",
    "RecordedRequest",
    "RequestLog",
    "build_app",
    "serve",
]

# --------------------------------------------------------------------------
# Deterministic content and usage
# --------------------------------------------------------------------------

REPLY_DELTAS: Final[tuple[str, ...]] = ("Hello", " from", " the", " fake")
REPLY_TEXT: Final[str] = "".join(REPLY_DELTAS)

TOOL_ARGUMENTS: Final[Mapping[str, str]] = MappingProxyType({"city": "Paris"})
# Streamed in fragments that split keys and values, as real models do, so a
# consumer that parses each fragment on its own fails loudly.
_TOOL_ARGUMENT_FRAGMENTS: Final[tuple[str, ...]] = ('{"', "city", '":"', "Par", 'is"}')
TOOL_ARGUMENTS_JSON: Final[str] = "".join(_TOOL_ARGUMENT_FRAGMENTS)

# Numbers follow each provider's own accounting rules:
# - OpenAI: cached_tokens is part of prompt_tokens, reasoning_tokens is part of
#   completion_tokens, total = prompt + completion.
# - Anthropic: input_tokens excludes both cache buckets; no total is reported.
# - Gemini: cachedContentTokenCount is part of promptTokenCount, thoughts are
#   billed as output but reported apart from candidates, total = prompt +
#   candidates + thoughts.
OPENAI_USAGE: Final[Mapping[str, int]] = MappingProxyType(
    {
        "prompt_tokens": 57,
        "completion_tokens": 23,
        "total_tokens": 80,
        "cached_tokens": 11,
        "reasoning_tokens": 5,
    }
)
ANTHROPIC_USAGE: Final[Mapping[str, int]] = MappingProxyType(
    {
        "input_tokens": 41,
        "cache_creation_input_tokens": 7,
        "cache_read_input_tokens": 13,
        "output_tokens": 29,
    }
)
# count_tokens cannot know what will hit the cache, so it reports the whole prompt.
ANTHROPIC_COUNT_TOKENS: Final[int] = (
    ANTHROPIC_USAGE["input_tokens"]
    + ANTHROPIC_USAGE["cache_creation_input_tokens"]
    + ANTHROPIC_USAGE["cache_read_input_tokens"]
)
GEMINI_USAGE: Final[Mapping[str, int]] = MappingProxyType(
    {
        "promptTokenCount": 37,
        "cachedContentTokenCount": 9,
        "candidatesTokenCount": 19,
        "thoughtsTokenCount": 4,
        "totalTokenCount": 60,
    }
)
EMBEDDING_USAGE: Final[Mapping[str, int]] = MappingProxyType({"prompt_tokens": 8, "total_tokens": 8})
EMBEDDING_DIMENSIONS: Final[int] = 8

assert OPENAI_USAGE["total_tokens"] == OPENAI_USAGE["prompt_tokens"] + OPENAI_USAGE["completion_tokens"]
assert GEMINI_USAGE["totalTokenCount"] == (
    GEMINI_USAGE["promptTokenCount"]
    + GEMINI_USAGE["candidatesTokenCount"]
    + GEMINI_USAGE["thoughtsTokenCount"]
)

SCENARIO_HEADER: Final[str] = "x-fake-scenario"
DELAY_HEADER: Final[str] = "x-fake-delay"
DEFAULT_DELAY: Final[float] = 0.2
CUT_AFTER_DELTAS: Final[int] = 2
# Lets the deltas written before a cut reach the peer before the RST does;
# otherwise the kernel may discard them and the client sees no partial stream.
_CUT_GRACE_SECONDS: Final[float] = 0.05
_MAX_REQUEST_BYTES: Final[int] = 64 * 1024 * 1024
_SYSTEM_FINGERPRINT: Final[str] = "fp_fake0001"

_GEMINI_ROUTE: Final[re.Pattern[str]] = re.compile(
    r"^/(?:v1|v1beta|v1alpha)/models/(?P<model>[^/:]+):(?P<method>generateContent|streamGenerateContent|countTokens)$"
)

# --------------------------------------------------------------------------
# Request recording
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it, before it answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """Decode the body as JSON."""
        return json.loads(self.body)


class RequestLog:
    """Thread-safe, append-only list of recorded requests."""

    def __init__(self) -> None:
        """Create an empty log."""
        self._lock = threading.Lock()
        self._items: list[RecordedRequest] = []

    def append(self, item: RecordedRequest) -> None:
        """Record one request."""
        with self._lock:
            self._items.append(item)

    def snapshot(self) -> list[RecordedRequest]:
        """Return a copy of the recorded requests in arrival order."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        """Forget every recorded request."""
        with self._lock:
            self._items.clear()


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


class _UnknownScenarioError(ValueError):
    pass


@dataclass(frozen=True)
class _Scenario:
    error_status: int | None = None
    cut: bool = False
    slow: bool = False
    delay: float = 0.0
    gzip: bool = False
    stream_error: bool = False


def _parse_scenario(request: web.Request) -> _Scenario:
    raw = request.headers.get(SCENARIO_HEADER, "")
    tokens = [t.strip().lower() for t in raw.split(",") if t.strip()]
    error_status: int | None = None
    flags: set[str] = set()
    for token in tokens:
        match = re.fullmatch(r"error-([45]\d\d)", token)
        if match:
            error_status = int(match.group(1))
        elif token in {"normal", "cut", "slow", "gzip", "stream-error"}:
            flags.add(token)
        else:
            raise _UnknownScenarioError(token)
    delay = 0.0
    if "slow" in flags:
        try:
            delay = float(request.headers.get(DELAY_HEADER, DEFAULT_DELAY))
        except ValueError as exc:
            raise _UnknownScenarioError(f"{DELAY_HEADER}={request.headers.get(DELAY_HEADER)!r}") from exc
    # Only compress when the client said it can decode, like a real server.
    accepts_gzip = "gzip" in request.headers.get("accept-encoding", "").lower()
    return _Scenario(
        error_status=error_status,
        cut="cut" in flags,
        slow="slow" in flags,
        delay=delay,
        gzip="gzip" in flags and accepts_gzip,
        stream_error="stream-error" in flags,
    )


# --------------------------------------------------------------------------
# Provider error shapes
# --------------------------------------------------------------------------

_OPENAI_ERRORS: Final[Mapping[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request: the fake provider was asked to reject it."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported.",
    ),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model does not exist or you do not have access to it.",
    ),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM). Please try again in 1s.",
    ),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_ANTHROPIC_ERRORS: Final[Mapping[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "messages: the fake provider was asked to reject this request"),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "This request would exceed the rate limit for your organization."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}
_GEMINI_ERRORS: Final[Mapping[int, tuple[str, str]]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "Method doesn't allow unregistered callers. Please use an API Key."),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: (
        "INTERNAL",
        "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    ),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}


def _openai_error(status: int, message: str | None = None) -> dict[str, Any]:
    kind, code, default_message = _OPENAI_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, f"Fake error {status}.")
    )
    return {
        "error": {
            "message": message or default_message,
            "type": kind,
            "param": None,
            "code": code,
        }
    }


def _anthropic_error(status: int, request_id: str, message: str | None = None) -> dict[str, Any]:
    kind, default_message = _ANTHROPIC_ERRORS.get(
        status, ("api_error" if status >= 500 else "invalid_request_error", f"Fake error {status}.")
    )
    return {
        "type": "error",
        "error": {"type": kind, "message": message or default_message},
        "request_id": request_id,
    }


def _gemini_error(status: int, message: str | None = None) -> dict[str, Any]:
    kind, default_message = _GEMINI_ERRORS.get(
        status, ("INTERNAL" if status >= 500 else "FAILED_PRECONDITION", f"Fake error {status}.")
    )
    return {"error": {"code": status, "message": message or default_message, "status": kind}}


# --------------------------------------------------------------------------
# Per-request context and response writing
# --------------------------------------------------------------------------


def _new_id(prefix: str, length: int = 24) -> str:
    return prefix + uuid.uuid4().hex[:length]


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass
class _Call:
    """What a route handler needs to know about the request it answers."""

    request: web.Request
    body: dict[str, Any]
    scenario: _Scenario
    request_id: str
    response_headers: dict[str, str]
    created: int = field(default_factory=lambda: int(time.time()))


class _Gzipper:
    """Incremental gzip whose output is decodable after every flush.

    A sync flush per SSE event lets a client decompress and act on each event
    as it arrives instead of waiting for the end of the stream.
    """

    def __init__(self) -> None:
        self._compressor = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)

    def chunk(self, data: bytes) -> bytes:
        return self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._compressor.flush(zlib.Z_FINISH)


async def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    await asyncio.sleep(_CUT_GRACE_SECONDS)
    transport.abort()


async def _send_json(
    call: _Call, payload: Any, status: int = 200, content_type: str = "application/json"
) -> web.StreamResponse:
    """Answer with a whole JSON body, honouring the gzip/cut/slow scenarios."""
    body = _dumps(payload)
    headers = {**call.response_headers, "Content-Type": content_type}
    if status == 429:
        headers["retry-after"] = "1"
    if call.scenario.slow:
        await asyncio.sleep(call.scenario.delay)
    if call.scenario.gzip:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
        headers["Vary"] = "Accept-Encoding"
    if call.scenario.cut:
        # Promise the full length, deliver half, then drop the connection, so
        # the client can only notice by the body being short.
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(call.request)
        await response.write(body[: len(body) // 2])
        await _abort(call.request)
        return response
    return web.Response(status=status, body=body, headers=headers)


Encoder = Callable[[Any], bytes]


@dataclass
class _StreamPlan:
    """The events of one streamed answer, split so scenarios can truncate it.

    Items are dicts (encoded with ``encode``) or raw bytes sent verbatim.
    """

    head: Sequence[Any]
    deltas: Sequence[Any]
    tail: Sequence[Any]
    error: Any
    encode: Encoder
    closing: bytes = b""


async def _send_stream(
    call: _Call, plan: _StreamPlan, content_type: str = "text/event-stream; charset=utf-8"
) -> web.StreamResponse:
    """Stream a plan, applying the slow/cut/gzip/stream-error scenarios."""
    scenario = call.scenario
    headers = {
        **call.response_headers,
        "Content-Type": content_type,
        "Cache-Control": "no-cache",
    }
    gzipper = _Gzipper() if scenario.gzip else None
    if gzipper is not None:
        headers["Content-Encoding"] = "gzip"
        headers["Vary"] = "Accept-Encoding"
    response = web.StreamResponse(status=200, headers=headers)
    response.enable_chunked_encoding()
    await response.prepare(call.request)

    if scenario.cut:
        # Never include the last delta: it may carry the finish reason.
        keep = min(CUT_AFTER_DELTAS, max(len(plan.deltas) - 1, 0))
        items: list[Any] = [*plan.head, *plan.deltas[:keep]]
    elif scenario.stream_error:
        items = [*plan.head, *plan.deltas[:CUT_AFTER_DELTAS], plan.error]
    else:
        items = [*plan.head, *plan.deltas, *plan.tail]

    try:
        for index, item in enumerate(items):
            if index and scenario.slow:
                await asyncio.sleep(scenario.delay)
            data = item if isinstance(item, bytes) else plan.encode(item)
            await response.write(gzipper.chunk(data) if gzipper else data)
        if scenario.cut:
            await _abort(call.request)
            return response
        trailer = plan.closing
        if gzipper is not None:
            trailer = gzipper.chunk(trailer) + gzipper.finish() if trailer else gzipper.finish()
        if trailer:
            await response.write(trailer)
        await response.write_eof()
    except ConnectionError:
        # The client hung up mid-stream; that is a scenario, not a fault.
        pass
    return response


def _sse_data(payload: Any) -> bytes:
    return b"data: " + _dumps(payload) + b"\n\n"


def _sse_named(payload: dict[str, Any]) -> bytes:
    return b"event: " + str(payload["type"]).encode() + b"\ndata: " + _dumps(payload) + b"\n\n"


def _sse_gemini(payload: Any) -> bytes:
    # Gemini frames events with CRLF and spaced JSON; keep both so a proxy's
    # SSE parser is exercised on the real line endings.
    return b"data: " + json.dumps(payload).encode() + b"\r\n\r\n"


def _json_array_encoder() -> Encoder:
    """Gemini without ``alt=sse`` streams one JSON array, element by element."""
    first = True

    def encode(payload: Any) -> bytes:
        nonlocal first
        prefix = b"[" if first else b",\r\n"
        first = False
        return prefix + json.dumps(payload, indent=2).encode()

    return encode


def _sequenced_encoder() -> Encoder:
    """Responses API events carry a per-stream ``sequence_number``."""
    counter = 0

    def encode(payload: dict[str, Any]) -> bytes:
        nonlocal counter
        numbered = {**payload, "sequence_number": counter}
        counter += 1
        return _sse_named(numbered)

    return encode


# --------------------------------------------------------------------------
# OpenAI
# --------------------------------------------------------------------------


def _openai_tool_name(body: Mapping[str, Any]) -> str | None:
    """Name of the first declared function tool (Chat and Responses shapes).

    Built-in tools (web_search, file_search, ...) are not functions the model
    could call with arguments, so they get a plain text answer.
    """
    tools = body.get("tools")
    if not isinstance(tools, list):
        return None
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            continue
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else tool.get("name")
        return name if isinstance(name, str) and name else "tool"
    return None


def _openai_chat_usage() -> dict[str, Any]:
    return {
        "prompt_tokens": OPENAI_USAGE["prompt_tokens"],
        "completion_tokens": OPENAI_USAGE["completion_tokens"],
        "total_tokens": OPENAI_USAGE["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": OPENAI_USAGE["cached_tokens"], "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": OPENAI_USAGE["reasoning_tokens"],
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _openai_responses_usage() -> dict[str, Any]:
    return {
        "input_tokens": OPENAI_USAGE["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": OPENAI_USAGE["cached_tokens"], "cache_write_tokens": 0},
        "output_tokens": OPENAI_USAGE["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": OPENAI_USAGE["reasoning_tokens"]},
        "total_tokens": OPENAI_USAGE["total_tokens"],
    }


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _model(body: Mapping[str, Any], default: str) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else default


async def _openai_chat(call: _Call) -> web.StreamResponse:
    body = call.body
    model = _model(body, "gpt-4o-mini")
    completion_id = _new_id("chatcmpl-")
    tool_name = _openai_tool_name(body)
    call_id = _new_id("call_")
    finish_reason = "tool_calls" if tool_name else "stop"

    if not body.get("stream"):
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if tool_name else REPLY_TEXT,
            "refusal": None,
            "annotations": [],
        }
        if tool_name:
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": tool_name, "arguments": TOOL_ARGUMENTS_JSON},
                }
            ]
        return await _send_json(
            call,
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": call.created,
                "model": model,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
                ],
                "usage": _openai_chat_usage(),
                "service_tier": "default",
                "system_fingerprint": _SYSTEM_FINGERPRINT,
            },
        )

    include_usage = _include_usage(body)
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": call.created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": _SYSTEM_FINGERPRINT,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        payload = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        # With include_usage every chunk has an explicit null usage; only the
        # extra last chunk carries numbers.
        if include_usage:
            payload["usage"] = None
        return payload

    if tool_name:
        head = [
            chunk(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": call_id,
                            "type": "function",
                            "function": {"name": tool_name, "arguments": ""},
                        }
                    ],
                    "refusal": None,
                }
            )
        ]
        deltas = [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": f}}]})
            for f in _TOOL_ARGUMENT_FRAGMENTS
        ]
    else:
        head = [chunk({"role": "assistant", "content": "", "refusal": None})]
        deltas = [chunk({"content": text}) for text in REPLY_DELTAS]
    tail: list[Any] = [chunk({}, finish_reason)]
    if include_usage:
        tail.append({**base, "choices": [], "usage": _openai_chat_usage()})
    tail.append(b"data: [DONE]\n\n")
    return await _send_stream(call, _StreamPlan(head, deltas, tail, _openai_error(500), _sse_data))


async def _openai_completions(call: _Call) -> web.StreamResponse:
    body = call.body
    model = _model(body, "gpt-3.5-turbo-instruct")
    completion_id = _new_id("cmpl-")
    usage = {k: OPENAI_USAGE[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    base = {"id": completion_id, "object": "text_completion", "created": call.created, "model": model}

    if not body.get("stream"):
        return await _send_json(
            call,
            {
                **base,
                "choices": [{"text": REPLY_TEXT, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            },
        )

    include_usage = _include_usage(body)

    def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        payload = {**base, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            payload["usage"] = None
        return payload

    tail: list[Any] = [chunk("", "stop")]
    if include_usage:
        tail.append({**base, "choices": [], "usage": usage})
    tail.append(b"data: [DONE]\n\n")
    plan = _StreamPlan([], [chunk(t) for t in REPLY_DELTAS], tail, _openai_error(500), _sse_data)
    return await _send_stream(call, plan)


def _response_object(
    call: _Call,
    response_id: str,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    body = call.body
    return {
        "id": response_id,
        "object": "response",
        "created_at": call.created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


async def _openai_responses(call: _Call) -> web.StreamResponse:
    body = call.body
    model = _model(body, "gpt-4o-mini")
    response_id = _new_id("resp_", 32)
    tool_name = _openai_tool_name(body)
    usage = _openai_responses_usage()

    if tool_name:
        item_id = _new_id("fc_", 32)
        call_id = _new_id("call_")
        done_item: dict[str, Any] = {
            "id": item_id,
            "type": "function_call",
            "status": "completed",
            "arguments": TOOL_ARGUMENTS_JSON,
            "call_id": call_id,
            "name": tool_name,
        }
    else:
        item_id = _new_id("msg_", 32)
        done_part: dict[str, Any] = {
            "type": "output_text",
            "annotations": [],
            "logprobs": [],
            "text": REPLY_TEXT,
        }
        done_item = {
            "id": item_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [done_part],
        }

    if not body.get("stream"):
        return await _send_json(
            call, _response_object(call, response_id, model, "completed", [done_item], usage)
        )

    head: list[dict[str, Any]] = [
        {
            "type": "response.created",
            "response": _response_object(call, response_id, model, "in_progress", [], None),
        },
        {
            "type": "response.in_progress",
            "response": _response_object(call, response_id, model, "in_progress", [], None),
        },
    ]
    deltas: list[dict[str, Any]]
    tail: list[dict[str, Any]]
    if tool_name:
        head.append(
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**done_item, "status": "in_progress", "arguments": ""},
            }
        )
        deltas = [
            {
                "type": "response.function_call_arguments.delta",
                "item_id": item_id,
                "output_index": 0,
                "delta": f,
            }
            for f in _TOOL_ARGUMENT_FRAGMENTS
        ]
        tail = [
            {
                "type": "response.function_call_arguments.done",
                "item_id": item_id,
                "output_index": 0,
                "name": tool_name,
                "arguments": TOOL_ARGUMENTS_JSON,
            },
        ]
    else:
        empty_part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        head += [
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {
                    "id": item_id,
                    "type": "message",
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                },
            },
            {
                "type": "response.content_part.added",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "part": empty_part,
            },
        ]
        deltas = [
            {
                "type": "response.output_text.delta",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            }
            for text in REPLY_DELTAS
        ]
        tail = [
            {
                "type": "response.output_text.done",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "text": REPLY_TEXT,
                "logprobs": [],
            },
            {
                "type": "response.content_part.done",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "part": done_part,
            },
        ]
    tail += [
        {"type": "response.output_item.done", "output_index": 0, "item": done_item},
        {
            "type": "response.completed",
            "response": _response_object(call, response_id, model, "completed", [done_item], usage),
        },
    ]
    error = {"type": "error", "code": "server_error", "message": _OPENAI_ERRORS[500][2], "param": None}
    return await _send_stream(call, _StreamPlan(head, deltas, tail, error, _sequenced_encoder()))


def _embedding_vector(index: int, dimensions: int) -> list[float]:
    # Exactly representable in float32, so base64 and float answers agree.
    return [((index + 1) * (d + 1) % 16) / 16.0 for d in range(dimensions)]


async def _openai_embeddings(call: _Call) -> web.StreamResponse:
    body = call.body
    raw_input = body.get("input")
    if isinstance(raw_input, list) and raw_input and not isinstance(raw_input[0], int):
        count = len(raw_input)
    else:
        count = 1
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int) or dimensions <= 0:
        dimensions = EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index in range(count):
        vector = _embedding_vector(index, dimensions)
        embedding: list[float] | str = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return await _send_json(
        call,
        {
            "object": "list",
            "data": data,
            "model": _model(body, "text-embedding-3-small"),
            "usage": dict(EMBEDDING_USAGE),
        },
    )


_OPENAI_MODELS: Final[tuple[str, ...]] = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "o3-mini",
    "text-embedding-3-small",
)


async def _openai_models(call: _Call) -> web.StreamResponse:
    return await _send_json(
        call,
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 1715367049, "owned_by": "system"}
                for name in _OPENAI_MODELS
            ],
        },
    )


# --------------------------------------------------------------------------
# Anthropic
# --------------------------------------------------------------------------


def _anthropic_tool_name(body: Mapping[str, Any]) -> str | None:
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    name = tools[0].get("name")
    return name if isinstance(name, str) else "tool"


def _anthropic_usage(output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": ANTHROPIC_USAGE["input_tokens"],
        "cache_creation_input_tokens": ANTHROPIC_USAGE["cache_creation_input_tokens"],
        "cache_read_input_tokens": ANTHROPIC_USAGE["cache_read_input_tokens"],
        "cache_creation": {
            "ephemeral_5m_input_tokens": ANTHROPIC_USAGE["cache_creation_input_tokens"],
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


async def _anthropic_messages(call: _Call) -> web.StreamResponse:
    body = call.body
    model = _model(body, "claude-haiku-5-5")
    message_id = _new_id("msg_01")
    tool_name = _anthropic_tool_name(body)
    tool_id = _new_id("toolu_01")
    stop_reason = "tool_use" if tool_name else "end_turn"
    final_block: dict[str, Any] = (
        {"type": "tool_use", "id": tool_id, "name": tool_name, "input": dict(TOOL_ARGUMENTS)}
        if tool_name
        else {"type": "text", "text": REPLY_TEXT}
    )

    def message(content: list[dict[str, Any]], stop: str | None, output_tokens: int) -> dict[str, Any]:
        return {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": _anthropic_usage(output_tokens),
        }

    if not body.get("stream"):
        return await _send_json(call, message([final_block], stop_reason, ANTHROPIC_USAGE["output_tokens"]))

    # message_start reports the prompt side and a placeholder output count of
    # 1; message_delta then repeats the prompt side and gives the cumulative
    # output count. A consumer must take the last value, not add them up.
    start_block = {**final_block, "input": {}} if tool_name else {"type": "text", "text": ""}
    head = [
        {"type": "message_start", "message": message([], None, 1)},
        {"type": "content_block_start", "index": 0, "content_block": start_block},
        {"type": "ping"},
    ]
    if tool_name:
        deltas = [
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": fragment},
            }
            for fragment in _TOOL_ARGUMENT_FRAGMENTS
        ]
    else:
        deltas = [
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
            for text in REPLY_DELTAS
        ]
    final_usage = {
        "input_tokens": ANTHROPIC_USAGE["input_tokens"],
        "cache_creation_input_tokens": ANTHROPIC_USAGE["cache_creation_input_tokens"],
        "cache_read_input_tokens": ANTHROPIC_USAGE["cache_read_input_tokens"],
        "output_tokens": ANTHROPIC_USAGE["output_tokens"],
    }
    tail = [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": final_usage,
        },
        {"type": "message_stop"},
    ]
    error = {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": call.request_id,
    }
    return await _send_stream(call, _StreamPlan(head, deltas, tail, error, _sse_named))


async def _anthropic_count_tokens(call: _Call) -> web.StreamResponse:
    return await _send_json(call, {"input_tokens": ANTHROPIC_COUNT_TOKENS})


# --------------------------------------------------------------------------
# Gemini
# --------------------------------------------------------------------------


def _gemini_tool_name(body: Mapping[str, Any]) -> str | None:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return None
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        declarations = tool.get("functionDeclarations", tool.get("function_declarations"))
        if isinstance(declarations, list) and declarations and isinstance(declarations[0], dict):
            name = declarations[0].get("name")
            return name if isinstance(name, str) else "tool"
    return None


def _gemini_usage(candidates: int) -> dict[str, Any]:
    prompt = GEMINI_USAGE["promptTokenCount"]
    cached = GEMINI_USAGE["cachedContentTokenCount"]
    thoughts = GEMINI_USAGE["thoughtsTokenCount"]
    return {
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + candidates + thoughts,
        "cachedContentTokenCount": cached,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
        "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": cached}],
        "thoughtsTokenCount": thoughts,
    }


async def _gemini_generate(call: _Call, model: str, stream: bool) -> web.StreamResponse:
    tool_name = _gemini_tool_name(call.body)
    response_id = uuid.uuid4().hex[:22]

    def chunk(parts: list[dict[str, Any]], finish: bool, candidates_tokens: int | None) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish:
            candidate["finishReason"] = "STOP"
        payload: dict[str, Any] = {"candidates": [candidate]}
        if candidates_tokens is not None:
            payload["usageMetadata"] = _gemini_usage(candidates_tokens)
        payload["modelVersion"] = model
        payload["responseId"] = response_id
        return payload

    final_candidates = GEMINI_USAGE["candidatesTokenCount"]
    if tool_name:
        final_parts: list[dict[str, Any]] = [
            {"functionCall": {"name": tool_name, "args": dict(TOOL_ARGUMENTS)}}
        ]
    else:
        final_parts = [{"text": REPLY_TEXT}]

    if not stream:
        return await _send_json(
            call, chunk(final_parts, True, final_candidates), content_type="application/json; charset=UTF-8"
        )

    # A cut stream must not tell the client any usage: it never finished.
    with_usage = not call.scenario.cut
    if tool_name:
        deltas = [chunk(final_parts, True, final_candidates if with_usage else None)]
    else:
        count = len(REPLY_DELTAS)
        deltas = [
            chunk(
                [{"text": text}],
                index == count - 1,
                # Gemini repeats usageMetadata cumulatively; the last chunk is final.
                (final_candidates * (index + 1)) // count if with_usage else None,
            )
            for index, text in enumerate(REPLY_DELTAS)
        ]
    error = _gemini_error(500)
    if call.request.query.get("alt") == "sse":
        return await _send_stream(call, _StreamPlan([], deltas, [], error, _sse_gemini))
    return await _send_stream(
        call,
        _StreamPlan([], deltas, [], error, _json_array_encoder(), closing=b"]"),
        "application/json; charset=UTF-8",
    )


async def _gemini_count_tokens(call: _Call) -> web.StreamResponse:
    prompt = GEMINI_USAGE["promptTokenCount"]
    return await _send_json(
        call,
        {"totalTokens": prompt, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]},
        content_type="application/json; charset=UTF-8",
    )


# --------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------

Handler = Callable[[_Call], Any]


@dataclass(frozen=True)
class _Route:
    provider: str  # "openai" | "anthropic" | "gemini"
    handler: Handler
    needs_body: bool = True


_ROUTES: Final[Mapping[tuple[str, str], _Route]] = {
    ("POST", "/v1/chat/completions"): _Route("openai", _openai_chat),
    ("POST", "/v1/responses"): _Route("openai", _openai_responses),
    ("POST", "/v1/embeddings"): _Route("openai", _openai_embeddings),
    ("POST", "/v1/completions"): _Route("openai", _openai_completions),
    ("GET", "/v1/models"): _Route("openai", _openai_models, needs_body=False),
    ("POST", "/v1/messages"): _Route("anthropic", _anthropic_messages),
    ("POST", "/v1/messages/count_tokens"): _Route("anthropic", _anthropic_count_tokens),
}


def _bearer_token(request: web.Request) -> str:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _authorized(provider: str, request: web.Request) -> bool:
    if provider == "openai":
        return bool(_bearer_token(request))
    if provider == "anthropic":
        # The API documents x-api-key, but anthropic>=2 sends the key as a
        # Bearer token, so both must work.
        return bool(request.headers.get("x-api-key", "").strip() or _bearer_token(request))
    return bool(request.headers.get("x-goog-api-key", "").strip() or request.query.get("key", "").strip())


def _provider_headers(provider: str, request_id: str) -> dict[str, str]:
    if provider == "openai":
        return {"x-request-id": request_id, "openai-processing-ms": "7", "openai-version": "2020-10-01"}
    if provider == "anthropic":
        return {"request-id": request_id}
    # Google's front end sends no request id header.
    return {}


def _error_payload(provider: str, status: int, request_id: str, message: str | None = None) -> dict[str, Any]:
    if provider == "anthropic":
        return _anthropic_error(status, request_id, message)
    if provider == "gemini":
        return _gemini_error(status, message)
    return _openai_error(status, message)


def _missing_auth(provider: str, request_id: str) -> tuple[int, dict[str, Any]]:
    """Status and body each provider sends when no credential came with the request."""
    if provider == "openai":
        message = (
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
        return 401, {
            "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        }
    if provider == "anthropic":
        return 401, _anthropic_error(401, request_id, "x-api-key header is required")
    return 403, _gemini_error(403)


def _record(log: RequestLog | None, request: web.Request, body: bytes) -> None:
    if log is None:
        return
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    log.append(
        RecordedRequest(
            method=request.method,
            path=request.path,
            query={k: v for k, v in request.query.items()},
            headers=headers,
            body=body,
        )
    )


def build_app(log: RequestLog | None = None) -> web.Application:
    """Build the aiohttp application; requests are recorded into ``log`` if given."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        _record(log, request, body)

        route = _ROUTES.get((request.method, request.path))
        gemini_match = (
            _GEMINI_ROUTE.match(request.path) if route is None and request.method == "POST" else None
        )
        provider = route.provider if route else ("gemini" if gemini_match else "openai")
        request_id = _new_id("req_")
        headers = _provider_headers(provider, request_id)

        # Errors about the request itself are answered plainly, without the
        # scenario's gzip/cut/slow, as a real provider would reject it early.
        plain = _Call(request, {}, _Scenario(), request_id, headers)
        if route is None and gemini_match is None:
            message = f"Invalid URL ({request.method} {request.path})"
            payload = {
                "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
            }
            return await _send_json(plain, payload, status=404)

        if not _authorized(provider, request):
            status, payload = _missing_auth(provider, request_id)
            return await _send_json(plain, payload, status=status)

        try:
            scenario = _parse_scenario(request)
        except _UnknownScenarioError as exc:
            message = f"fake provider: unknown scenario {exc.args[0]!r}"
            return await _send_json(plain, _error_payload(provider, 400, request_id, message), status=400)

        parsed: Any = {}
        if (route is None or route.needs_body) and body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        if not isinstance(parsed, dict):
            message = "We could not parse the JSON body of your request."
            return await _send_json(plain, _error_payload(provider, 400, request_id, message), status=400)

        call = _Call(request, parsed, scenario, request_id, headers)
        if scenario.error_status is not None:
            return await _send_json(
                call,
                _error_payload(provider, scenario.error_status, request_id),
                status=scenario.error_status,
            )

        if route is not None:
            result: web.StreamResponse = await route.handler(call)
            return result
        assert gemini_match is not None
        model, method = gemini_match.group("model"), gemini_match.group("method")
        if method == "countTokens":
            return await _gemini_count_tokens(call)
        return await _gemini_generate(call, model, stream=method == "streamGenerateContent")

    app = web.Application(client_max_size=_MAX_REQUEST_BYTES)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


# --------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------


def _base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    sock: socket.socket | None = None,
    log: RequestLog | None = None,
    ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the fake provider until ``stop`` is set or the task is cancelled.

    Binds ``host:port`` (port 0 picks a free one) unless an already bound
    ``sock`` is given, then calls ``ready`` with the base URL.
    """
    if sock is None:
        sock = socket.create_server((host, port), backlog=1024)
    runner = web.AppRunner(build_app(log), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.SockSite(runner, sock, backlog=1024)
        await site.start()
        if ready is not None:
            ready(_base_url(sock))
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()
        sock.close()


class FakeProvider:
    """The fake provider served from a background thread with its own event loop.

    The port is bound at construction, so ``base_url`` is valid before
    ``start()``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind ``host:port``; port 0 picks a free port."""
        self._sock = socket.create_server((host, port), backlog=1024)
        self._base_url = _base_url(self._sock)
        self._log = RequestLog()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def base_url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:PORT`` (append ``/v1`` for OpenAI SDKs)."""
        return self._base_url

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every request received so far, in arrival order."""
        return self._log.snapshot()

    def reset(self) -> None:
        """Forget the recorded requests."""
        self._log.clear()

    def start(self) -> FakeProvider:
        """Start serving in a background thread; returns self once it accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FakeProvider can only be started once")
        self._thread = threading.Thread(target=self._run, name="fake-provider", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=10)
        if self._failure is not None:
            raise RuntimeError("fake provider failed to start") from self._failure
        if not self._ready.is_set():
            raise RuntimeError("fake provider did not start within 10s")
        return self

    def stop(self) -> None:
        """Stop serving and release the port. Safe to call more than once."""
        loop, stop_event, thread = self._loop, self._stop_event, self._thread
        if loop is not None and stop_event is not None and not loop.is_closed():
            # The loop may close between the check and the call: already stopped.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_event.set)
        if thread is not None:
            thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> FakeProvider:
        """Start on entering the context."""
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop on leaving the context."""
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            # Reported by start() instead of the thread dying silently.
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        await serve(
            sock=self._sock, log=self._log, ready=lambda _url: self._ready.set(), stop=self._stop_event
        )
