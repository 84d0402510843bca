"""ReplyAssembler (RFC 5321 §4.2) and EHLO capability parsing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fermoposta.smtp.reply import Reply
from fermoposta.smtp.reply_parser import ReplyAssembler, ReplyProtocolError, parse_ehlo


def assemble(data: bytes) -> list[Reply]:
    assembler = ReplyAssembler()
    out = []
    for line in data.splitlines(keepends=True):
        reply = assembler.feed_line(line)
        if reply is not None:
            out.append(reply)
    return out


def test_single_and_multi_line() -> None:
    assert assemble(b"220 mx.example ESMTP ready\r\n") == [
        Reply(220, None, "mx.example ESMTP ready")
    ]
    ehlo = assemble(b"250-mx.example\r\n250-SIZE 1000\r\n250 PIPELINING\r\n")
    assert ehlo == [Reply(250, None, "mx.example", "SIZE 1000", "PIPELINING")]


def test_code_only_and_empty_text() -> None:
    assert assemble(b"250\r\n") == [Reply(250, None, "")]
    assert assemble(b"250 \r\n") == [Reply(250, None, "")]
    assert assemble(b"250-\r\n250\n") == [Reply(250, None, "", "")]


def test_enhanced_code_extracted_only_when_consistent() -> None:
    assert assemble(b"250 2.1.0 Sender OK\r\n") == [Reply(250, "2.1.0", "Sender OK")]
    assert assemble(b"550-5.1.1 no\r\n550 5.1.1 such user\r\n") == [
        Reply(550, "5.1.1", "no", "such user")
    ]
    assert assemble(b"250 2.0.0\r\n") == [Reply(250, "2.0.0", "")]
    # class digit differs from the reply code: keep as text
    assert assemble(b"250 5.0.0 odd\r\n") == [Reply(250, None, "5.0.0 odd")]
    # not on every line: keep as text
    assert assemble(b"250-2.0.0 a\r\n250 b\r\n") == [Reply(250, None, "2.0.0 a", "b")]
    assert assemble(b"250-2.0.0 a\r\n250 2.0.1 b\r\n") == [Reply(250, None, "2.0.0 a", "2.0.1 b")]
    assert assemble(b"250 2.0.0x\r\n") == [Reply(250, None, "2.0.0x")]
    assert assemble(b"452 4.5.3 Too many recipients\r\n")[0].enhanced == "4.5.3"


def test_assembler_reusable_for_next_reply() -> None:
    replies = assemble(b"220 hi\r\n250-a\r\n250 b\r\n354 go\r\n")
    assert [r.code for r in replies] == [220, 250, 354]


@pytest.mark.parametrize(
    "lines",
    [
        [b"2x0 garbage\r\n"],
        [b"\r\n"],
        [b"25\r\n"],
        [b"150 preliminary\r\n"],
        [b"650 nope\r\n"],
        [b"250x text\r\n"],
        [b"250_text\r\n"],
        [b" 250 text\r\n"],
        [b"\xd9\xa2\xd9\xa5\xd9\xa0 arabic digits\r\n"],
        [b"250-a\r\n", b"251 b\r\n"],
        [b"250-a\r\n", b"550 b\r\n"],
        [b"250 " + b"x" * 2045 + b"\r\n"],
        [b"250-x\r\n"] * 100 + [b"250 x\r\n"],
    ],
)
def test_protocol_errors(lines: list[bytes]) -> None:
    assembler = ReplyAssembler()
    with pytest.raises(ReplyProtocolError):
        for line in lines:
            assembler.feed_line(line)
    assert assembler.feed_line(b"250 ok\r\n") == Reply(250, None, "ok")  # reset after error


def test_limits_exactly_at() -> None:
    line = b"250 " + b"x" * 2042 + b"\r\n"
    assert len(line) == 2048
    assert assemble(line)[0].lines == ("x" * 2042,)
    replies = assemble(b"250-x\r\n" * 99 + b"250 x\r\n")
    assert len(replies[0].lines) == 100


def test_non_utf8_text_is_replaced() -> None:
    assert assemble(b"220 caf\xe9\r\n") == [Reply(220, None, "caf\ufffd")]


def test_parse_ehlo() -> None:
    reply = Reply(
        250,
        None,
        "mx.example greets you",
        "SIZE 52428800",
        "pipelining",
        "AUTH PLAIN CRAM-MD5",
        "AUTH=LOGIN",
        "8BITMIME",
        "",
        "AUTH LOGIN",
    )
    assert parse_ehlo(reply) == {
        "SIZE": "52428800",
        "PIPELINING": "",
        "AUTH": "PLAIN CRAM-MD5",
        "AUTH=LOGIN": "",
        "8BITMIME": "",
    }
    assert parse_ehlo(Reply(250, None, "only greeting")) == {}


text_line = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=30
).filter(lambda s: not s.endswith(" "))


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    code = draw(st.integers(200, 599))
    enhanced = draw(
        st.none()
        | st.tuples(st.integers(0, 999), st.integers(0, 999)).map(
            lambda t: f"{str(code)[0]}.{t[0]}.{t[1]}"
        )
    )
    lines = draw(st.lists(text_line, min_size=1, max_size=5))
    if enhanced is None:  # text that looks like an enhanced code is ambiguous by design
        lines = [line for line in lines if not line[:1].isdigit()] or [""]
    return Reply(code, enhanced, *lines)


@settings(max_examples=300)
@given(replies())
def test_round_trip(reply: Reply) -> None:
    assert assemble(reply.to_bytes()) == [reply]


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_arbitrary_lines_only_protocol_error(lines: list[bytes]) -> None:
    assembler = ReplyAssembler()
    for line in lines:
        try:
            reply = assembler.feed_line(line)
        except ReplyProtocolError:
            continue
        if reply is not None:
            assert 200 <= reply.code <= 599 and len(reply.lines) >= 1


@settings(max_examples=200)
@given(replies())
def test_wire_form_is_the_same_every_time_with_or_without_enhanced_codes(
        reply: Reply) -> None:
    # to_bytes() keeps its first rendering; a rendering without the
    # enhanced codes never comes from (or goes into) that cache.
    plain = reply.to_bytes(enhanced_codes=False)
    first = reply.to_bytes()
    assert reply.to_bytes() is first
    assert reply.to_bytes(enhanced_codes=False) == plain
    fresh = Reply(reply.code, reply.enhanced, *reply.lines)
    assert fresh.to_bytes(enhanced_codes=False) == plain and fresh.to_bytes() == first
    assert fresh == reply and hash(fresh) == hash(reply)
    if reply.enhanced:
        assert all(line.startswith(f"{reply.code}".encode()) and
                   reply.enhanced.encode() in line for line in first.splitlines())
        assert reply.enhanced.encode() not in plain or any(
            reply.enhanced in text for text in reply.lines)
