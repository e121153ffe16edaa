"""Incremental server-sent-events splitting: events may split or merge across body chunks.

Each event comes back with its exact bytes, so a caller that rewrites a stream can forward
everything it does not mean to change byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A partial event held while waiting for its end. Past this the stream is not SSE as Spendgate
# knows it (or is hostile): stop splitting and let the bytes through unparsed.
MAX_PENDING_BYTES = 1 << 20

# A line ends in CRLF, LF or CR, and an event at an empty line: two line ends in a row. The
# groups are atomic so that one CRLF is never read as a CR and then an LF (two line ends).
_EVENT_END = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
# The longest event end is CRLF CRLF: one that a new chunk completes starts at most 3 bytes
# before the chunk.
_END_REACH = 3


@dataclass(slots=True)
class Event:
    """One event as it went by."""

    raw: bytes  # its exact bytes, the blank line that ended it included
    data: str | None  # its `data` lines joined by LF; None when it had none (comments, keep-alives)
    name: str | None = None  # its `event:` field
    parsed: bool = True  # False for bytes let through unsplit after the decoder gave up


class SSEDecoder:
    """Feed raw bytes, get each complete event with its exact bytes.

    A partial event is held until its end arrives, up to `max_pending` bytes. Past that the
    decoder gives up for good (`overflowed`): what it held comes back as one unparsed Event, and
    so does every later chunk, so no byte is ever held back or lost.
    """

    __slots__ = ("_buf", "_max_pending", "_scan", "overflowed")

    def __init__(self, max_pending: int = MAX_PENDING_BYTES) -> None:
        self._buf = bytearray()
        self._scan = 0  # where the search for the next event end resumes
        self._max_pending = max_pending
        self.overflowed = False

    @property
    def pending(self) -> int:
        """Bytes held: a partial event waiting for its end."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[Event]:
        """Every event completed by `chunk`, in order."""
        if self.overflowed:
            return [Event(bytes(chunk), None, parsed=False)] if chunk else []
        # Most chunks hold whole events: they are split in place, and only a partial event is
        # copied into the buffer (a bytearray, so a long one grows without quadratic copying).
        held = bool(self._buf)
        if held:
            self._buf += chunk
        buf: bytes | bytearray = self._buf if held else chunk
        out: list[Event] = []
        start = 0
        for end in _event_ends(buf, self._scan if held else 0):
            out.append(_event(bytes(buf[start:end])))
            start = end
        if held:
            del self._buf[:start]
        elif start < len(chunk):
            self._buf = bytearray(chunk[start:])
        self._scan = max(0, len(self._buf) - _END_REACH)
        if len(self._buf) > self._max_pending:
            self.overflowed = True
            out.append(Event(bytes(self._buf), None, parsed=False))
            self._buf = bytearray()
            self._scan = 0
        return out

    def flush(self) -> list[Event]:
        """A final event that ended without a blank line (a stream cut short, or a sloppy server)."""
        if not self._buf:
            return []
        rest = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return [_event(rest)]


def _event_ends(buf: bytes | bytearray, scan: int) -> list[int]:
    """Where each complete event in `buf` ends, looking from `scan` on."""
    if buf.find(b"\r", scan) < 0:
        # LF-only line ends (OpenAI, Anthropic): a blank line is LF LF, which find() locates
        # several times faster than the general pattern.
        ends = []
        i = buf.find(b"\n\n", scan)
        while i >= 0:
            ends.append(i + 2)
            i = buf.find(b"\n\n", i + 2)
        return ends
    return [m.end() for m in _EVENT_END.finditer(buf, scan)]


def _event(raw: bytes) -> Event:
    body = raw.rstrip(b"\r\n")
    if body.startswith(b"data:") and b"\n" not in body and b"\r" not in body:
        # The usual event, one data line: no need to split lines.
        value = body[6:] if body[5:6] == b" " else body[5:]
        return Event(raw, value.decode("utf-8", "replace"))
    data: list[bytes] = []
    name: bytes | None = None
    for line in _LINE_END.split(raw):
        if not line or line.startswith(b":"):
            continue
        field, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
    return Event(
        raw,
        b"\n".join(data).decode("utf-8", "replace") if data else None,
        name.decode("utf-8", "replace") if name is not None else None,
    )
