"""SSE splitting: events split and merge across body chunks."""

from extproc.sse import SSEDecoder


def test_one_event_in_one_chunk_yields_its_data() -> None:
    assert SSEDecoder().feed(b'data: {"a":1}\n\n') == ['{"a":1}']


def test_many_events_in_one_chunk_yield_in_order() -> None:
    assert SSEDecoder().feed(b"data: 1\n\ndata: 2\n\ndata: 3\n\n") == ["1", "2", "3"]


def test_event_split_across_chunks_is_reassembled() -> None:
    d = SSEDecoder()
    assert d.feed(b'data: {"hel') == []
    assert d.feed(b'lo":1}\n') == []
    assert d.feed(b"\ndata: x\n\n") == ['{"hello":1}', "x"]


def test_crlf_separated_events_are_split() -> None:
    assert SSEDecoder().feed(b"data: a\r\n\r\ndata: b\r\n\r\n") == ["a", "b"]


def test_event_and_comment_lines_are_ignored() -> None:
    assert SSEDecoder().feed(b": ping\n\nevent: message_start\ndata: {}\n\n") == ["{}"]


def test_multiline_data_is_joined_with_newlines() -> None:
    assert SSEDecoder().feed(b"data: a\ndata: b\n\n") == ["a\nb"]


def test_flush_returns_an_unterminated_last_event() -> None:
    d = SSEDecoder()
    d.feed(b"data: partial")
    assert d.flush() == ["partial"]


def test_separator_split_between_chunks_is_found() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: a\n") == []
    assert d.feed(b"\n") == ["a"]
