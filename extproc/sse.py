"""Incremental server-sent-events splitting: events may split or merge across body chunks."""

from __future__ import annotations

import re

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SSEDecoder:
    """Feed raw bytes, get the `data` payload of each complete event."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        """Return the data of every event completed by `chunk`, in order."""
        buf = self._buf + chunk if self._buf else chunk
        out: list[str] = []
        start = 0
        for m in _EVENT_END.finditer(buf):
            data = _event_data(buf[start : m.start()])
            if data is not None:
                out.append(data)
            start = m.end()
        self._buf = buf[start:]
        return out

    def flush(self) -> list[str]:
        """Data of a final event that ended without a blank line (a stream cut short)."""
        rest, self._buf = self._buf, b""
        data = _event_data(rest) if rest.strip() else None
        return [data] if data is not None else []


def _event_data(raw: bytes) -> str | None:
    parts = []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    if not parts:
        return None
    return b"\n".join(parts).decode("utf-8", "replace")
