"""DataReader / DotStuffer: end-of-data, smuggling, limits, round trips."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fermoposta.smtp.data import DataReader, DotStuffer, PassThrough, dot_stuff, in_wire_form


def read_all(
    data: bytes, cuts: list[int] | None = None, **kw: int
) -> tuple[DataReader, bytes, bytes | None]:
    reader = DataReader(kw.get("max_size", 10**9), kw.get("max_line", 1000))
    points = [*sorted({min(c, len(data)) for c in cuts or []}), len(data)]
    payload, leftover, prev = b"", None, 0
    for point in points:
        if reader.done:
            leftover = (leftover or b"") + data[prev:point]
        else:
            part, left = reader.feed(data[prev:point])
            payload += part
            if left is not None:
                leftover = left
        prev = point
    return reader, payload, leftover


def normalize(content: bytes) -> bytes:
    """What the receiver must see for `content` sent through DotStuffer."""
    out = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def test_immediate_terminator_is_empty_content() -> None:
    reader, payload, leftover = read_all(b".\r\nQUIT\r\n")
    assert (payload, leftover, reader.done, reader.size) == (b"", b"QUIT\r\n", True, 0)


def test_content_includes_crlf_before_dot_and_leftover_is_pipelined() -> None:
    reader, payload, leftover = read_all(b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<>\r\n")
    assert payload == b"Subject: x\r\n\r\nbody\r\n"
    assert leftover == b"MAIL FROM:<>\r\n"
    assert reader.size == len(payload)
    assert not reader.bare_line_ending and not reader.line_too_long and not reader.too_big


def test_leftover_empty_when_nothing_follows() -> None:
    assert read_all(b"a\r\n.\r\n")[2] == b""


def test_incomplete_data_has_no_leftover() -> None:
    reader, payload, leftover = read_all(b"a\r\n.\r")
    assert leftover is None and not reader.done
    assert payload == b"a\r"  # the possible terminator start is held back
    assert not reader.bare_line_ending


def test_dot_unstuffing() -> None:
    _, payload, _ = read_all(b"..hidden\r\n...\r\n. x\r\n.\r\n")
    assert payload == b".hidden\r\n..\r\n x\r\n"


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"],
)
def test_smuggling_sequences_do_not_end_data(smuggle: bytes) -> None:
    data = b"x" + smuggle + b"MAIL FROM:<evil@x>\r\n"
    reader, _payload, leftover = read_all(data)
    assert not reader.done and leftover is None
    assert reader.bare_line_ending
    reader2, payload2, leftover2 = read_all(data + b".\r\n")
    assert reader2.done and leftover2 == b""
    assert b"MAIL FROM:<evil@x>" in payload2


def test_bare_lf_at_start_is_not_terminator() -> None:
    reader, _payload, leftover = read_all(b".\nQUIT\r\n")
    assert not reader.done and leftover is None and reader.bare_line_ending


def test_crlf_only_data_has_no_bare_flag() -> None:
    reader, _, _ = read_all(b"a\r\nb\r\n\r\n.\r\n")
    assert not reader.bare_line_ending


@pytest.mark.parametrize("data", [b"a\rb\r\n.\r\n", b"a\nb\r\n.\r\n", b"ab\r\r\n.\r\n"])
def test_bare_cr_or_lf_flagged(data: bytes) -> None:
    assert read_all(data)[0].bare_line_ending


def test_line_exactly_max_line_ok_one_over_flagged() -> None:
    ok = b"a" * 998 + b"\r\n"
    assert not read_all(ok + b".\r\n")[0].line_too_long
    assert read_all(b"a" * 999 + b"\r\n.\r\n")[0].line_too_long
    # the stuffing dot counts (it is on the wire)
    assert read_all(b"." * 999 + b"\r\n.\r\n")[0].line_too_long
    assert not read_all(ok * 50 + b".\r\n", cuts=list(range(0, 50_000, 7)))[0].line_too_long


def test_too_big_at_and_over_limit() -> None:
    reader, payload, leftover = read_all(b"12345678\r\n.\r\nQUIT\r\n", max_size=10)
    assert not reader.too_big and payload == b"12345678\r\n" and reader.size == 10
    reader, payload, leftover = read_all(b"123456789\r\n.\r\nQUIT\r\n", max_size=10)
    assert reader.too_big and payload == b"" and reader.size == 11
    assert leftover == b"QUIT\r\n"  # reading continued to the terminator


def test_too_big_across_chunks_withholds_later_payload() -> None:
    reader = DataReader(max_size=100)
    first, _ = reader.feed(b"a" * 50 + b"\r\n")
    later, left = reader.feed(b"b" * 200 + b"\r\n.\r\n")
    assert first and later == b"" and reader.too_big and left == b""
    assert reader.size == 50 + 2 + 200 + 2


def test_feed_after_done_raises() -> None:
    reader = DataReader(100)
    reader.feed(b".\r\n")
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


def test_terminator_split_at_every_position() -> None:
    data = b"hello\r\n.\r\nNOOP\r\n"
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            _reader, payload, leftover = read_all(data, [i, j])
            assert (payload, leftover) == (b"hello\r\n", b"NOOP\r\n"), (i, j)


def test_byte_at_a_time() -> None:
    data = b"..a\r\n\r\n..\r\n.x\r\n.\r\nRSET\r\n"
    _reader, payload, leftover = read_all(data, list(range(len(data))))
    assert payload == b".a\r\n\r\n.\r\nx\r\n" and leftover == b"RSET\r\n"


def test_large_input_is_fast() -> None:
    body = (b"x" * 78 + b"\r\n") * (50 * 1024 * 1024 // 80)
    wire = b"".join(dot_stuff([body]))
    start = time.process_time()
    reader = DataReader(10**10)
    size = 0
    for i in range(0, len(wire), 1 << 16):
        payload, _leftover = reader.feed(wire[i : i + (1 << 16)])
        size += len(payload)
    elapsed = time.process_time() - start
    assert reader.done and size == len(body)
    assert elapsed < 2.0  # 50 MB; 200 MB measured at ~1.2 s


# --- DotStuffer -------------------------------------------------------------------------


def test_stuffer_examples() -> None:
    assert b"".join(dot_stuff([])) == b".\r\n"
    assert b"".join(dot_stuff([b"abc"])) == b"abc\r\n.\r\n"
    assert b"".join(dot_stuff([b".a\n.\r\n"])) == b"..a\r\n..\r\n.\r\n"
    assert b"".join(dot_stuff([b"a\r", b"\n", b".b"])) == b"a\r\n..b\r\n.\r\n"
    assert b"".join(dot_stuff([b"a\r", b".b\r"])) == b"a\r\n..b\r\n.\r\n"
    assert b"".join(dot_stuff([b"x\n.\n"])) == b"x\r\n..\r\n.\r\n"  # no smuggling out


def test_stuffer_state_across_feeds() -> None:
    stuffer = DotStuffer()
    assert stuffer.feed(b".") == b".."
    assert stuffer.feed(b"a\r") == b"a"  # CR held until its successor is known
    assert stuffer.feed(b"") == b""
    assert stuffer.feed(b".") == b"\r\n.."  # bare CR became a line end
    assert stuffer.finish() == b"\r\n.\r\n"


def test_stuffer_never_emits_bare_line_endings() -> None:
    out = b"".join(dot_stuff([b"\r\r\n\n\r", b"\n\r", b""]))
    assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")


chunked_bytes = st.lists(st.binary(max_size=40), max_size=12)
linebytes = st.lists(
    st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"a", b"\x00", b"\xff", b"..", b"\r\n.\r\n"]),
    max_size=30,
).map(b"".join)


@settings(max_examples=400)
@given(st.one_of(chunked_bytes, st.lists(linebytes, max_size=6)), st.data())
def test_round_trip_any_content_any_split(chunks: list[bytes], data: st.DataObject) -> None:
    content = b"".join(chunks)
    wire = b"".join(dot_stuff(chunks)) + b"QUIT\r\n"
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    reader, payload, leftover = read_all(wire, cuts)
    assert reader.done and leftover == b"QUIT\r\n"
    assert payload == normalize(content)
    assert not reader.bare_line_ending
    assert reader.size == len(payload)


@settings(max_examples=300)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_reader_arbitrary_bytes_no_surprises(data: bytes, cuts: list[int]) -> None:
    reader, payload, leftover = read_all(data, cuts, max_size=50, max_line=20)
    end = (b"\r\n" + data).find(b"\r\n.\r\n")
    assert reader.done == (end >= 0)
    content = data[:end] if end >= 0 else data
    expected = (b"\r\n" + content).replace(b"\r\n.", b"\r\n")[2:]
    if end >= 0:
        assert leftover == data[end + 3 :]
        crlf = content.count(b"\r\n")
        bare = content.count(b"\n") != crlf or content.count(b"\r") != crlf
        assert reader.bare_line_ending == bare
        assert reader.size == len(expected)
        assert reader.too_big == (len(expected) > 50)
        longest = max(len(line) + 1 for line in content.split(b"\n")[:-1]) if content else 0
        assert reader.line_too_long == (longest > 20)
    if reader.too_big:
        assert len(payload) <= 50
    else:
        assert expected.startswith(payload)
        if end >= 0:
            assert payload == expected



@settings(max_examples=500)
@given(st.text(alphabet="a.\r\n", max_size=120).map(str.encode),
       st.lists(st.integers(0, 120), max_size=8))
def test_reader_on_dots_and_line_ends_cut_anywhere(data: bytes, cuts: list[int]) -> None:
    # The pieces without a line-leading dot are passed on as they are, the
    # others framed and un-stuffed: the same content, checks and end, for
    # any cut (a "." or CRLF "." on either side of an edge).
    reader, payload, leftover = read_all(data, cuts, max_line=6)
    end = (b"\r\n" + data).find(b"\r\n.\r\n")
    assert reader.done == (end >= 0)
    content = data[:end] if end >= 0 else data
    expected = (b"\r\n" + content).replace(b"\r\n.", b"\r\n")[2:]
    assert expected.startswith(payload)
    if end >= 0:
        assert payload == expected and leftover == data[end + 3 :]
        crlf = content.count(b"\r\n")
        assert reader.bare_line_ending == (content.count(b"\n") != crlf
                                           or content.count(b"\r") != crlf)
        longest = max(len(line) + 1 for line in content.split(b"\n")[:-1]) if content else 0
        assert reader.line_too_long == (longest > 6)
        assert reader.checks.leading_dots == (b"\r\n." in b"\r\n" + content)
    else:
        # Held back: at most the bytes that may yet turn out to be the end.
        assert len(expected) - len(payload) <= 3


def test_a_piece_without_a_line_leading_dot_is_passed_on_without_a_copy() -> None:
    reader = DataReader(10**9)
    first = b"Subject: a.b\r\n\r\n" + b"QUJD" * 1000 + b"\r\n"  # dots, none line-leading
    assert reader.feed(first)[0] is first
    second = b"x" * 50_000 + b"\r\n"
    assert reader.feed(second)[0] is second
    third = b".dot\r\n.\r\nQUIT\r\n"  # after the CRLF above: a stuffed dot, then the end
    assert reader.feed(third) == (b"dot\r\n", b"QUIT\r\n")
    assert reader.done and reader.checks.leading_dots
    assert reader.size == len(first) + len(second) + len(b"dot\r\n")


def _stuff_reference(content: bytes) -> bytes:
    """What the wire must carry for `content`, by the rules alone: every bare
    CR or LF made a CRLF, every line-leading dot doubled, a final CRLF, the dot."""
    text = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    text = (b"\r\n" + text).replace(b"\r\n.", b"\r\n..")[2:]
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text + b".\r\n"


@settings(max_examples=500)
@given(st.one_of(chunked_bytes, st.lists(linebytes, max_size=6)))
def test_stuffer_matches_the_rules_for_any_split(chunks: list[bytes]) -> None:
    """The fast path (a chunk already in CRLF form is only searched for dots)
    and the rewriting path give the same wire as the rules, however the
    content is cut."""
    assert b"".join(dot_stuff(chunks)) == _stuff_reference(b"".join(chunks))


@pytest.mark.parametrize(("body", "octets"), [
    (b"", b""),
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),  # already canonical: the same bytes
    (b"a\nb", b"a\r\nb\r\n"),  # bare LF, no final line end
    (b"a\rb\r", b"a\r\nb\r\n"),  # bare CRs, one at the very end
    (b".x\r\n..y\r\n", b".x\r\n..y\r\n"),  # BDAT has no dot-stuffing
])
def test_bdat_octets_are_the_body_in_crlf_lines(body: bytes, octets: bytes) -> None:
    from fermoposta.net.transfer import canonical_body

    assert canonical_body(body) == octets


@given(st.binary(max_size=300) | st.text(alphabet="ab.\r\n", max_size=200).map(str.encode))
@settings(max_examples=400, deadline=None)
def test_bdat_octets_are_what_data_carries_less_the_stuffing(body: bytes) -> None:
    """The drain's BDAT octets and its DATA form deliver the same message:
    un-stuffing the DATA form (what the receiver does) gives the octets."""
    from fermoposta.net.transfer import canonical_body

    wire = b"".join(dot_stuff([body]))
    assert wire.endswith(b".\r\n")
    content = wire[:-3]
    unstuffed = b"".join(
        line[1:] if line.startswith(b".") else line
        for line in content.splitlines(keepends=True))
    assert unstuffed == canonical_body(body)


# --- bodies already in wire form: DataReader.leading_dots, PassThrough, in_wire_form --------

def pass_through(chunks: list[bytes]) -> tuple[bytes, bool]:
    """The PassThrough's output for `chunks`, and whether it had to divert."""
    sender = PassThrough()
    out = b"".join(sender.feed(c) for c in chunks) + sender.finish()
    return out, sender.diverted is not None


@pytest.mark.parametrize(("wire", "dots"), [
    (b"Subject: x\r\n\r\nno dots at all\r\n.\r\n", False),
    (b"a.b\r\nc. d\r\n.\r\n", False),  # dots, none leading a line
    (b"..hidden\r\n.\r\n", True),  # the content's first line is ".hidden"
    (b"a\r\n..\r\n.\r\n", True),  # a line "." in the content
    (b"a\r\n.unstuffed\r\n.\r\n", True),  # a client that did not stuff: be careful
])
def test_the_reader_says_whether_a_content_line_may_begin_with_a_dot(wire: bytes,
                                                                     dots: bool) -> None:
    for cuts in ([], list(range(len(wire)))):  # whole, and one byte at a time
        reader, _, _ = read_all(wire, cuts)
        assert reader.done and reader.checks.leading_dots is dots


@settings(max_examples=400)
@given(st.one_of(chunked_bytes, st.lists(linebytes, max_size=6)), st.data())
def test_content_the_reader_calls_dotless_is_in_wire_form(chunks: list[bytes],
                                                          data: st.DataObject) -> None:
    """What `leading_dots` = False promises, for any content and any split:
    the un-stuffed content goes out unchanged, exactly as the stuffer would
    send it."""
    wire = b"".join(dot_stuff(chunks))
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    reader, payload, _ = read_all(wire, cuts)
    if not reader.checks.leading_dots and not reader.bare_line_ending:
        assert in_wire_form(payload)
        assert pass_through([payload]) == (b"".join(dot_stuff([payload])), False)


@settings(max_examples=600)
@given(st.lists(linebytes, max_size=8), st.data())
def test_pass_through_never_ends_the_data_early(chunks: list[bytes],
                                                data: st.DataObject) -> None:
    """Whatever the body (the flag may lie), the data ends exactly once, at
    the end; a body in wire form goes out byte for byte as the stuffer would
    send it, without the stuffer."""
    body = b"".join(chunks)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=4)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    out, diverted = pass_through(pieces)
    wire = b"\r\n" + out  # the CRLF that ended the DATA command
    assert wire.find(b"\r\n.\r\n") == len(wire) - 5
    if in_wire_form(body):
        assert (out, diverted) == (b"".join(dot_stuff([body])), False)


def test_pass_through_hands_over_to_the_stuffer_when_the_body_lied() -> None:
    out, diverted = pass_through([b"a\r\n", b".\r\nMAIL FROM:<x@y>\r\n"])
    assert diverted and out == b"a\r\n..\r\nMAIL FROM:<x@y>\r\n.\r\n"
    # A line-leading dot cut at the chunk edge, with its CR held back.
    out, diverted = pass_through([b"a\r\n.\r", b"\nb\r\n"])
    assert diverted and out == b"a\r\n..\r\nb\r\n.\r\n"
    out, diverted = pass_through([b"no final line end"])
    assert not diverted and out == b"no final line end\r\n.\r\n"
    assert pass_through([]) == (b".\r\n", False)


def test_in_wire_form() -> None:
    assert in_wire_form(b"") and in_wire_form(b"Received: x\r\n\tby y;\r\n")
    for text in (b"a\r\n.b\r\n", b".a\r\n", b"a\nb\r\n", b"a\rb\r\n", b"a\r\nb"):
        assert not in_wire_form(text)
