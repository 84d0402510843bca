"""BDAT (RFC 3030): the argument's syntax and ChunkReader, whose content and
verdicts must not depend on where the chunks are cut, and must be those of
DataReader on the same message sent with DATA."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fermoposta.smtp.chunking import Bdat, ChunkReader, parse_bdat
from fermoposta.smtp.data import DataReader

# --- parse_bdat -------------------------------------------------------------------------


@pytest.mark.parametrize(("arg", "expected"), [
    ("0", Bdat(0, False)),
    ("0 LAST", Bdat(0, True)),
    ("1000 last", Bdat(1000, True)),
    ("42 Last", Bdat(42, True)),
    ("007", Bdat(7, False)),
    ("999999999999 LAST", Bdat(999_999_999_999, True)),  # 12 digits: the most we take
    ("5\tLAST", Bdat(5, True)),
])
def test_parse_bdat_valid(arg: str, expected: Bdat) -> None:
    assert parse_bdat(arg) == expected


@pytest.mark.parametrize("arg", [
    "", "LAST", "abc", "-1", "+1", "1.5", "1e3", "0x10", "10 MORE", "10 LAST LAST",
    "10 LASTX", "10LAST", "1 2", "1234567890123", "1234567890123 LAST",
    "\u0661\u0662",  # Arabic-Indic digits: str.isdigit() says yes, RFC 3030 DIGIT no
])
def test_parse_bdat_invalid(arg: str) -> None:
    with pytest.raises(ValueError):
        parse_bdat(arg)


# --- ChunkReader: examples --------------------------------------------------------------


def read_chunks(chunks: list[bytes], max_size: int = 10**9, max_line: int = 1000
                ) -> tuple[ChunkReader, bytes]:
    reader = ChunkReader(max_size, max_line)
    content = b"".join(reader.feed(c) for c in chunks)
    return reader, content + reader.finish()


def verdict(reader: ChunkReader | DataReader) -> str | None:
    """The refusal the session would choose (smtp_data's order)."""
    return ("too_big" if reader.checks.too_big
            else "bare" if reader.checks.bare_line_ending
            else "long" if reader.checks.line_too_long
            else None)


def test_content_is_kept_as_sent_dots_included() -> None:
    reader, content = read_chunks([b".leading dot\r\n", b"..two\r\n.\r\n"])
    assert content == b".leading dot\r\n..two\r\n.\r\n"  # no un-stuffing: BDAT has none
    assert verdict(reader) is None and reader.checks.size == len(content)


def test_missing_final_crlf_is_added_as_data_would() -> None:
    reader, content = read_chunks([b"Subject: x\r\n\r\nno line end"])
    assert content == b"Subject: x\r\n\r\nno line end\r\n"
    assert reader.checks.size == len(content)


def test_empty_message() -> None:
    reader, content = read_chunks([])
    assert content == b"" and verdict(reader) is None and reader.checks.size == 0
    reader, content = read_chunks([b"", b""])
    assert content == b"" and verdict(reader) is None


def test_crlf_across_a_chunk_edge_is_not_bare() -> None:
    reader, content = read_chunks([b"a\r", b"\nb\r\n"])
    assert verdict(reader) is None and content == b"a\r\nb\r\n"


@pytest.mark.parametrize("chunks", [
    [b"a\nb\r\n"],  # bare LF inside a chunk
    [b"a\rb\r\n"],  # bare CR inside a chunk
    [b"a\r", b"b\r\n"],  # CR at a chunk's end, no LF after it
    [b"a\r\n", b"\nb\r\n"],  # LF first in a chunk, after a complete CRLF
    [b"a\r"],  # the message ends with a CR
    [b"a\r", b"\r\n"],
])
def test_bare_line_endings_are_refused_wherever_they_fall(chunks: list[bytes]) -> None:
    reader, content = read_chunks(chunks)
    assert verdict(reader) == "bare" and reader.refused
    assert not content.endswith(b"b\r\n")  # nothing kept once the verdict is known


def test_line_limit_across_chunks() -> None:
    ok = [b"x" * 24, b"y" * 24 + b"\r\n"]  # 50 octets with the CRLF
    assert verdict(read_chunks(ok, max_line=50)[0]) is None
    assert verdict(read_chunks([b"x" * 25, b"y" * 24 + b"\r\n"], max_line=50)[0]) == "long"
    # The CRLF a DATA transfer would add counts too.
    assert verdict(read_chunks([b"x" * 48], max_line=50)[0]) is None
    assert verdict(read_chunks([b"x" * 49], max_line=50)[0]) == "long"


def test_a_leading_dot_counts_as_datas_stuffing_dot_does() -> None:
    # DataReader counts the stuffing dot (it is on the wire): the same message
    # gets the same verdict sent either way.
    line = b"." + b"x" * 47 + b"\r\n"  # 50 octets, 51 on DATA's wire
    assert verdict(read_chunks([line], max_line=50)[0]) == "long"
    assert verdict(read_chunks([b"\r\n", line], max_line=50)[0]) == "long"
    assert verdict(read_chunks([b"x\r\n" + line], max_line=50)[0]) == "long"
    assert verdict(read_chunks([b"y" + line], max_line=51)[0]) is None  # not leading


def test_size_limit_counts_the_content_and_the_added_crlf() -> None:
    assert verdict(read_chunks([b"12345678\r\n"], max_size=10)[0]) is None
    assert verdict(read_chunks([b"1234567890"], max_size=10)[0]) == "too_big"  # +CRLF
    reader, content = read_chunks([b"12345", b"6789\r\n"], max_size=10)
    assert verdict(reader) == "too_big" and content == b"12345"  # kept before the verdict


def test_feed_after_finish_raises() -> None:
    reader = ChunkReader(100)
    reader.finish()
    with pytest.raises(RuntimeError):
        reader.feed(b"x")
    with pytest.raises(RuntimeError):
        reader.finish()


# --- ChunkReader: properties ------------------------------------------------------------

pieces = st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"a", b"..", b"\r\n.\r\n", b"\r\n.",
                          b"xxxxxxxx", b"\x00", b"\xff"])
bodies = st.one_of(st.binary(max_size=120), st.lists(pieces, max_size=40).map(b"".join))


def cut(body: bytes, points: list[int]) -> list[bytes]:
    marks = [0, *sorted({min(p, len(body)) for p in points}), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(marks)]


def data_form(body: bytes) -> bytes:
    """`body` as DATA carries it, by the rules alone: every line-leading dot
    doubled, a final CRLF if it has none, the end-of-data line.  No line
    ending is rewritten: DataReader must see the bare ones BDAT sees."""
    stuffed = (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


@settings(max_examples=500)
@given(bodies, st.lists(st.integers(0, 120), max_size=8), st.integers(5, 150),
       st.integers(3, 40))
@example(b"a\r\nb", [2], 100, 10)
def test_any_split_gives_the_verdict_and_content_of_one_chunk(
        body: bytes, points: list[int], max_size: int, max_line: int) -> None:
    whole, whole_content = read_chunks([body], max_size, max_line)
    split, split_content = read_chunks(cut(body, points), max_size, max_line)
    assert verdict(split) == verdict(whole)
    if verdict(whole) is None:  # else what was kept before the verdict may differ
        assert split_content == whole_content == body + (
            b"\r\n" if body and not body.endswith(b"\r\n") else b"")
    assert split.checks.size == whole.checks.size
    assert (split.checks.bare_line_ending, split.checks.line_too_long) == (
        whole.checks.bare_line_ending, whole.checks.line_too_long)


@settings(max_examples=500)
@given(bodies, st.lists(st.integers(0, 120), max_size=8), st.integers(5, 150),
       st.integers(3, 40))
@example(b"." * 9 + b"\r\n", [], 100, 10)
@example(b"x\r\n.", [3], 100, 10)
def test_same_verdict_and_bytes_as_data_reader_on_the_data_form(
        body: bytes, points: list[int], max_size: int, max_line: int) -> None:
    chunked, content = read_chunks(cut(body, points), max_size, max_line)
    data = DataReader(max_size, max_line)
    payload, leftover = data.feed(data_form(body))
    assert leftover == b""
    assert verdict(chunked) == verdict(data)
    assert chunked.checks.size == data.size
    if verdict(chunked) is None:
        assert content == payload
    if not data.bare_line_ending:  # a bare LF makes a line of its own only here
        assert chunked.checks.line_too_long == data.line_too_long
