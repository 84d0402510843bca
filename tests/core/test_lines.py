"""LineBuffer: framing, limits, overlong-line discard, take_all."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fermoposta.smtp.lines import HEAD_SIZE, LineBuffer, LineTooLong


def drain(buf: LineBuffer, limit: int) -> list[bytes | str]:
    """All complete lines; "TOO LONG" marks each LineTooLong raised."""
    out: list[bytes | str] = []
    while True:
        try:
            line = buf.next_line(limit)
        except LineTooLong:
            out.append("TOO LONG")
            continue
        if line is None:
            return out
        out.append(line)


def test_lines_keep_terminators_and_partial_waits() -> None:
    buf = LineBuffer()
    buf.feed(b"EHLO a\r\nNOOP\nQU")
    assert buf.next_line(512) == b"EHLO a\r\n"
    assert buf.next_line(512) == b"NOOP\n"
    assert buf.next_line(512) is None
    assert len(buf) == 2
    buf.feed(b"IT\r\n")
    assert buf.next_line(512) == b"QUIT\r\n"
    assert buf.next_line(512) is None
    assert len(buf) == 0


def test_line_exactly_at_limit_is_accepted() -> None:
    buf = LineBuffer()
    line = b"X" * 510 + b"\r\n"
    buf.feed(line)
    assert buf.next_line(512) == line


def test_line_one_over_limit_raises_once_then_resyncs() -> None:
    buf = LineBuffer()
    buf.feed(b"X" * 511 + b"\r\nNOOP\r\n")
    with pytest.raises(LineTooLong):
        buf.next_line(512)
    assert buf.next_line(512) == b"NOOP\r\n"
    assert buf.next_line(512) is None


def test_an_overlong_line_says_how_it_began() -> None:
    buf = LineBuffer()
    buf.feed(b"BDAT 30 LAST " + b"y" * 600 + b"\r\n")
    with pytest.raises(LineTooLong) as raised:
        buf.next_line(512)
    assert raised.value.head == (b"BDAT 30 LAST " + b"y" * 600)[:HEAD_SIZE]
    short = LineBuffer()
    short.feed(b"abcdefgh")
    with pytest.raises(LineTooLong) as raised:
        short.next_line(4)
    assert raised.value.head == b"abcd"  # never more than the limit


def test_overlong_discard_continues_across_feeds() -> None:
    buf = LineBuffer()
    buf.feed(b"A" * 600)
    with pytest.raises(LineTooLong):
        buf.next_line(512)
    assert buf.next_line(512) is None
    buf.feed(b"B" * 5000)
    assert buf.next_line(512) is None  # still discarding, no second exception
    assert len(buf) == 0
    buf.feed(b"BBB\r\nQUIT\r\n")
    assert buf.next_line(512) == b"QUIT\r\n"


def test_a_whole_line_in_one_read_is_the_line_itself_unless_it_ends_a_discard() -> None:
    # The usual command: one read, one line, into an empty buffer.
    buf = LineBuffer()
    line = b"MAIL FROM:<a@b.test>\r\n"
    buf.feed(line)
    assert buf.next_line(512) is line
    assert len(buf) == 0 and buf.next_line(512) is None
    # The end of an overlong line, read on its own after the buffer was
    # emptied by the discard, is still the overlong line's: skipped.
    buf.feed(b"A" * 600)
    with pytest.raises(LineTooLong):
        buf.next_line(512)
    assert buf.next_line(512) is None and len(buf) == 0
    buf.feed(b"AAA\r\n")
    assert buf.next_line(512) is None
    buf.feed(b"QUIT\r\n")
    assert buf.next_line(512) == b"QUIT\r\n"
    # A read with more than one line, or a line longer than the limit, goes
    # the long way: one line at a time, and LineTooLong.
    buf.feed(b"NOOP\r\nQUIT\r\n")
    assert buf.next_line(512) == b"NOOP\r\n"
    assert buf.next_line(512) == b"QUIT\r\n"
    buf.feed(b"x" * 20 + b"\r\n")
    with pytest.raises(LineTooLong):
        buf.next_line(10)


def test_partial_line_reaching_limit_raises_before_lf_arrives() -> None:
    buf = LineBuffer()
    buf.feed(b"A" * 511)
    assert buf.next_line(512) is None  # could still end with LF at byte 512
    buf.feed(b"A")
    with pytest.raises(LineTooLong):
        buf.next_line(512)


def test_take_all_returns_everything_buffered() -> None:
    buf = LineBuffer()
    buf.feed(b"STARTTLS\r\nEHLO evil\r\n")
    assert buf.next_line(512) == b"STARTTLS\r\n"
    assert buf.take_all() == b"EHLO evil\r\n"
    assert len(buf) == 0
    assert buf.next_line(512) is None


def test_many_lines_are_linear() -> None:
    buf = LineBuffer()
    buf.feed(b"RCPT TO:<a@b>\r\n" * 200_000)
    count = 0
    while buf.next_line(512) is not None:
        count += 1
    assert count == 200_000


def test_byte_at_a_time_long_partial_line() -> None:
    buf = LineBuffer()
    for _ in range(12000):
        buf.feed(b"a")
        assert buf.next_line(12288) is None
    buf.feed(b"\r\n")
    assert buf.next_line(12288) == b"a" * 12000 + b"\r\n"


def reference(data: bytes, limit: int) -> list[bytes | str]:
    out: list[bytes | str] = []
    pos = 0
    while True:
        lf = data.find(b"\n", pos, pos + limit)
        if lf >= 0:
            out.append(data[pos : lf + 1])
            pos = lf + 1
            continue
        if len(data) - pos >= limit:
            out.append("TOO LONG")
            lf = data.find(b"\n", pos + limit)
            if lf < 0:
                return out
            pos = lf + 1
            continue
        return out


@settings(max_examples=300)
@given(
    st.binary(max_size=300).map(lambda b: b.replace(b"\x00", b"\n")),
    st.lists(st.integers(min_value=0, max_value=300), max_size=8),
    st.integers(min_value=1, max_value=40),
)
def test_any_split_matches_reference(data: bytes, cuts: list[int], limit: int) -> None:
    buf = LineBuffer()
    out: list[bytes | str] = []
    points = [*sorted({min(c, len(data)) for c in cuts}), len(data)]
    prev = 0
    for point in points:
        buf.feed(data[prev:point])
        prev = point
        out.extend(drain(buf, limit))
    assert out == reference(data, limit)


def test_has_line_sees_only_a_whole_line_not_yet_taken() -> None:
    buf = LineBuffer()
    assert not buf.has_line()
    buf.feed(b"MAIL FROM:<a@b>")
    assert not buf.has_line()
    assert buf.next_line(100) is None  # scanned: the search resumes past it
    buf.feed(b"\r\nRCPT")
    assert buf.has_line()
    assert buf.next_line(100) == b"MAIL FROM:<a@b>\r\n"
    assert not buf.has_line()  # "RCPT" has no end yet
    buf.feed(b" TO:<c@d>\n")
    assert buf.has_line()
    assert buf.next_line(100) == b"RCPT TO:<c@d>\n"
    assert not buf.has_line()


def test_take_returns_at_most_n_bytes_and_framing_resumes_after_them() -> None:
    # A BDAT chunk (RFC 3030): counted octets, LFs inside are not line ends.
    buf = LineBuffer()
    buf.feed(b"BDAT 7 LAST\r\nab\ncd\r\nNO")
    assert buf.next_line(512) == b"BDAT 7 LAST\r\n"
    assert buf.take(5) == b"ab\ncd"
    assert buf.take(2) == b"\r\n"
    assert not buf.has_line()
    buf.feed(b"OP\r\n")
    assert buf.next_line(512) == b"NOOP\r\n"
    assert buf.take(10) == b"" and buf.take(0) == b"" and len(buf) == 0


def test_take_more_than_buffered_and_ending_a_discard() -> None:
    buf = LineBuffer()
    buf.feed(b"x" * 20)
    with pytest.raises(LineTooLong):
        buf.next_line(10)
    buf.feed(b"yy")
    assert buf.take(100) == b"x" * 10 + b"yy"  # a discard in progress ends
    buf.feed(b"z\n")
    assert buf.next_line(10) == b"z\n"


def test_bytes_fed_to_an_empty_buffer_are_handed_on_without_a_copy() -> None:
    # A DATA body's reads: the object received is the object the reader gets.
    buf = LineBuffer()
    piece = b"x" * 100_000 + b"\r\n"
    buf.feed(piece)
    assert len(buf) == len(piece)
    assert buf.take_all() is piece
    assert len(buf) == 0 and buf.take_all() == b""
    # Not kept as it is: a mutable object (the caller may change it), or bytes
    # fed behind others.
    source = bytearray(b"ab\r\n")
    buf.feed(source)
    source[:] = b"zz\r\n"
    assert buf.next_line(10) == b"ab\r\n"
    first, second = b"MAIL FROM:<a@b>", b"\r\nRCPT"
    buf.feed(first)
    buf.feed(second)
    assert buf.next_line(100) == b"MAIL FROM:<a@b>\r\n"
    assert buf.take_all() == b"RCPT"


@settings(max_examples=300)
@given(st.lists(st.one_of(
    st.tuples(st.just("feed"), st.binary(max_size=20).map(lambda b: b.replace(b"\x00", b"\n"))),
    st.tuples(st.just("feed_bytearray"), st.binary(max_size=20)),
    st.tuples(st.just("take"), st.integers(min_value=0, max_value=25)),
    st.tuples(st.just("take_all"), st.none()),
    st.tuples(st.just("line"), st.none()),
), max_size=25))
def test_any_mix_of_feeds_and_takes_matches_a_plain_buffer(
        ops: list[tuple[str, object]]) -> None:
    # Without overlong lines (the limit is above anything buffered), the
    # buffer is a plain byte string: what goes in comes out, once, in order.
    buf = LineBuffer()
    model = b""
    for op, arg in ops:
        if op == "feed":
            assert isinstance(arg, bytes)
            buf.feed(arg)
            model += arg
        elif op == "feed_bytearray":
            assert isinstance(arg, bytes)
            buf.feed(bytearray(arg))  # type: ignore[arg-type]
            model += arg
        elif op == "take":
            assert isinstance(arg, int)
            assert buf.take(arg) == model[:arg]
            model = model[arg:]
        elif op == "take_all":
            assert buf.take_all() == model
            model = b""
        else:
            lf = model.find(b"\n")
            assert buf.has_line() == (lf >= 0)
            assert buf.next_line(1000) == (model[: lf + 1] if lf >= 0 else None)
            if lf >= 0:
                model = model[lf + 1 :]
        assert len(buf) == len(model)
    assert buf.take_all() == model
