"""SSE splitting: events split and merge across body chunks, and every byte is accounted for."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.sse import Event, SSEDecoder


def datas(events: list[Event]) -> list[str | None]:
    return [e.data for e in events]


def test_one_event_in_one_chunk_yields_its_data() -> None:
    assert datas(SSEDecoder().feed(b'data: {"a":1}\n\n')) == ['{"a":1}']


def test_many_events_in_one_chunk_yield_in_order() -> None:
    assert datas(SSEDecoder().feed(b"data: 1\n\ndata: 2\n\ndata: 3\n\n")) == ["1", "2", "3"]


def test_event_split_across_chunks_is_reassembled() -> None:
    d = SSEDecoder()
    assert d.feed(b'data: {"hel') == []
    assert d.feed(b'lo":1}\n') == []
    assert datas(d.feed(b"\ndata: x\n\n")) == ['{"hello":1}', "x"]


def test_crlf_separated_events_are_split() -> None:
    assert datas(SSEDecoder().feed(b"data: a\r\n\r\ndata: b\r\n\r\n")) == ["a", "b"]


def test_lone_cr_line_endings_are_split() -> None:
    assert datas(SSEDecoder().feed(b"data: a\r\rdata: b\rdata: c\r\r")) == ["a", "b\nc"]


def test_one_crlf_is_one_line_end_not_two() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: a\r\ndata: b\r\n") == []
    assert datas(d.feed(b"\r\n")) == ["a\nb"]


def test_crlf_split_between_chunks_still_ends_the_event() -> None:
    d = SSEDecoder()
    first = d.feed(b"data: a\r\n\r")  # the CR already makes the blank line
    second = d.feed(b"\ndata: b\r\n\r\n")
    assert datas(first) == ["a"] and datas(second) == ["b"]
    assert b"".join(e.raw for e in first + second) == b"data: a\r\n\r\ndata: b\r\n\r\n"


def test_event_and_comment_lines_are_ignored_but_kept_as_bytes() -> None:
    events = SSEDecoder().feed(b": ping\n\nevent: message_start\ndata: {}\n\n")
    assert datas(events) == [None, "{}"]
    assert events[0].raw == b": ping\n\n"
    assert events[1].name == "message_start"


def test_multiline_data_is_joined_with_newlines() -> None:
    assert datas(SSEDecoder().feed(b"data: a\ndata: b\n\n")) == ["a\nb"]


def test_data_without_a_space_and_bare_data_lines() -> None:
    assert datas(SSEDecoder().feed(b"data:x\ndata\n\n")) == ["x\n"]


def test_flush_returns_an_unterminated_last_event() -> None:
    d = SSEDecoder()
    d.feed(b"data: partial")
    events = d.flush()
    assert datas(events) == ["partial"] and events[0].raw == b"data: partial"
    assert d.flush() == []


def test_separator_split_between_chunks_is_found() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: a\n") == []
    assert datas(d.feed(b"\n")) == ["a"]


def test_a_partial_event_past_the_bound_is_given_up_and_passed_through() -> None:
    d = SSEDecoder(max_pending=64)
    first = d.feed(b"data: " + b"x" * 100)
    assert d.overflowed and len(first) == 1 and not first[0].parsed
    assert first[0].raw == b"data: " + b"x" * 100
    later = d.feed(b"\n\ndata: y\n\n")
    assert [e.raw for e in later] == [b"\n\ndata: y\n\n"] and not later[0].parsed
    assert d.pending == 0 and d.flush() == []


def test_a_long_event_in_many_small_chunks_is_not_rescanned_from_the_start() -> None:
    d = SSEDecoder()
    body = b"data: " + b"y" * 200_000 + b"\n\n"
    out: list[Event] = []
    for i in range(0, len(body), 10):
        out += d.feed(body[i : i + 10])
    assert datas(out) == ["y" * 200_000]


_LINE_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])
_LINE = st.one_of(
    st.builds(
        lambda v: b"data: " + v,
        st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    ),
    st.just(b": comment"),
    st.just(b"event: x"),
    st.just(b"id: 7"),
)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        for _ in range(draw(st.integers(1, 3))):
            out += draw(_LINE) + draw(_LINE_ENDS)
        out += draw(_LINE_ENDS)
    return out


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None, database=None)
@given(sse_streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_chunking_yields_the_same_events_and_every_byte(stream: bytes, cuts: list[int]) -> None:
    whole = SSEDecoder()
    expected = whole.feed(stream) + whole.flush()
    split = SSEDecoder()
    got: list[Event] = []
    for piece in pieces(stream, cuts):
        got += split.feed(piece)
    got += split.flush()
    assert b"".join(e.raw for e in got) == stream
    assert [e.data for e in got if e.data is not None] == [e.data for e in expected if e.data is not None]


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=8))
def test_arbitrary_bytes_never_raise_and_are_never_lost(data: bytes, cuts: list[int]) -> None:
    d = SSEDecoder(max_pending=128)
    got: list[Event] = []
    for piece in pieces(data, cuts):
        got += d.feed(piece)
    got += d.flush()
    assert b"".join(e.raw for e in got) == data
