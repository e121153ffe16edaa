"""Odd but legal HTTP at the listener gets a prompt answer, as a plain Envoy gives it.

Envoy runs the replies to requests it cannot parse through the encoder filters; an ext_proc
filter that processed their response headers held each one until the connection closed (after
the 1 s delayed-close timeout), so the client got nothing at all. Sent over raw sockets: an HTTP
client library would refuse to send most of these.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from tests.fakeprovider import FakeProvider
from tests.support import Issued, Stack

BODY = b'{"model":"fake-openai-model","messages":[{"role":"user","content":"hi"}]}'
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: spendgate\r\nContent-Type: application/json\r\n"
PROMPT = 3.0  # seconds; the failure this guards against answered nothing after 1 s


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send `data` raw; the status line and the seconds until it arrived (b"" if none came)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        start = time.monotonic()
        # Envoy may answer and close before it has read everything (a 431).
        with contextlib.suppress(OSError):
            s.sendall(data)
        buf = b""
        try:
            while b"\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except OSError:
            pass
        return buf.partition(b"\r\n")[0], time.monotonic() - start


def length(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


CASES = {
    # Headers past Envoy's 60 KiB default: 431.
    "100 KB header": (HEAD + b"X-Big: " + b"a" * 100_000 + b"\r\n" + length(BODY), b"431"),
    # More than Envoy's default of 100 headers: 431.
    "10,000 headers": (HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)) + length(BODY), b"431"),
    # Both framings at once is a request-smuggling shape: refused with 400.
    "content-length and transfer-encoding": (
        HEAD
        + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(BODY)
        + b"%x\r\n" % len(BODY)
        + BODY
        + b"\r\n0\r\n\r\n",
        b"400",
    ),
    "two content-lengths": (HEAD + b"Content-Length: 3\r\n" + length(BODY), b"400"),
    "NUL in a header value": (HEAD + b"X-Bad: a\x00b\r\n" + length(BODY), b"400"),
    "space in a header name": (HEAD + b"X Bad: b\r\n" + length(BODY), b"400"),
    "not HTTP at all": (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"400"),
    # HTTP/1.0 is served (nginx proxies with it by default): without a key, the filter's 401.
    "HTTP/1.0 without a key": (
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n" + length(BODY),
        b"401",
    ),
    # An escaped slash or backslash in the path is refused by Envoy before routing.
    "escaped slash in the path": (HEAD.replace(b"/chat/", b"/chat%2F") + length(BODY), b"400"),
    "escaped backslash in the path": (HEAD.replace(b"/chat/", b"/chat%5C") + length(BODY), b"400"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_odd_request_gets_a_prompt_answer(stack: Stack, case: str) -> None:
    data, status = CASES[case]
    line, seconds = exchange(stack.port, data)
    assert line.split(b" ")[1:2] == [status], f"{case}: got {line!r} after {seconds:.2f}s"
    assert seconds < PROMPT, f"{case}: the answer took {seconds:.2f}s"


def test_http_1_0_request_with_a_key_is_served(stack: Stack, openai_key: Issued) -> None:
    auth = b"Authorization: Bearer " + openai_key.key.encode() + b"\r\n"
    line, seconds = exchange(
        stack.port,
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n" + auth + length(BODY),
    )
    assert line.startswith(b"HTTP/1.0 200"), line
    assert seconds < PROMPT


@pytest.mark.parametrize(
    "path",
    ["//v1/chat/completions", "/v1//chat/completions", "/v1/./chat/completions", "/v1/x/../chat/completions"],
)
def test_dot_segments_and_repeated_slashes_are_normalised_before_routing(
    stack: Stack, openai_key: Issued, fake: FakeProvider, path: str
) -> None:
    auth = b"Authorization: Bearer " + openai_key.key.encode() + b"\r\n"
    before = len(fake.requests)
    line, _ = exchange(stack.port, HEAD.replace(b"/v1/chat/completions", path.encode()) + auth + length(BODY))
    assert line.startswith(b"HTTP/1.1 200"), line
    assert [r.path for r in fake.requests[before:]] == ["/v1/chat/completions"]


def test_escaped_slash_is_refused_before_the_provider(
    stack: Stack, openai_key: Issued, fake: FakeProvider
) -> None:
    auth = b"Authorization: Bearer " + openai_key.key.encode() + b"\r\n"
    before = len(fake.requests)
    line, _ = exchange(stack.port, HEAD.replace(b"/v1/chat/", b"/v1%2Fchat/") + auth + length(BODY))
    assert line.startswith(b"HTTP/1.1 400"), line
    assert len(fake.requests) == before
