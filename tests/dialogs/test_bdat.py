"""CHUNKING (RFC 3030) in the customer's reversed session, over the
in-memory wire (`support.wire`): the test decides which bytes share a
segment, so BDAT commands, their octets and the next commands arrive back
to back in one read, and a chunk can stop anywhere.  The delivery is a
recorder: it keeps the exact body the session hands on (trace header
included), so BDAT and DATA can be compared byte for byte."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from typing import IO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import add_customer
from fermoposta.customer.delivery.base import LocalRecipient, LocalSender
from fermoposta.customer.delivery.maildir import MaildirDelivery
from fermoposta.customer.outbox import OutboxSession
from fermoposta.customer.serve import ReversedSession
from fermoposta.net import connection, incoming
from fermoposta.net.server_session import SessionLimits
from fermoposta.net.transaction import Transaction
from fermoposta.provider.mx import MXSession
from fermoposta.provider.submission import SubmissionSession
from fermoposta.smtp.data import dot_stuff
from fermoposta.smtp.reply import Reply
from fermoposta.store import open_store
from fermoposta.store.base import BodyStage
from support.wire import MemoryPeer

LIMITS = SessionLimits(command_timeout=5.0, data_timeout=5.0, max_errors=20,
                       max_message_size=1000, max_recipients=5, max_line_length=200)
MAIL = b"MAIL FROM:<alice@sender.test>\r\n"
RCPT = b"RCPT TO:<bob@example.org>\r\n"


class _Transaction:
    where = "recorder"

    def __init__(self, owner: Recorder, start: LocalSender) -> None:
        self.owner, self.start = owner, start
        self.recipients: list[str] = []
        owner.opened += 1

    async def add_recipient(self, rcpt: LocalRecipient) -> Reply | None:
        if rcpt.local == "unknown":
            return Reply(550, "5.1.1", "Recipient address rejected: user unknown")
        self.recipients.append(rcpt.address)
        return None

    async def data(self, body: IO[bytes], size: int) -> list[Reply]:
        data = body.read()
        assert len(data) == size
        self.owner.bodies.append(data)
        return [Reply(250, "2.0.0", "Delivered")] * len(self.recipients)

    async def abort(self) -> None:
        self.owner.aborted += 1


class Recorder:
    """A `Delivery` keeping every body it is given."""

    name = "recorder"
    max_recipients = None

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.opened = 0
        self.aborted = 0

    def transaction(self, start: LocalSender) -> _Transaction:
        return _Transaction(self, start)


def content(body: bytes) -> bytes:
    """`body` without our Received: header (the first field, folded)."""
    assert body.startswith(b"Received: from provider.test ([127.0.0.1])\r\n")
    rest = body[body.index(b"\r\n") + 2:]
    while rest[:1] in (b" ", b"\t"):
        rest = rest[rest.index(b"\r\n") + 2:]
    return rest


def bdat(data: bytes, last: bool = True) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


async def start(delivery: object | None = None, limits: SessionLimits = LIMITS
                ) -> tuple[MemoryPeer, ReversedSession, asyncio.Task[None]]:
    peer = MemoryPeer()
    session = ReversedSession(peer.connection, hostname="mail.example.org", limits=limits,
                              accept_domains=frozenset({"example.org"}),
                              delivery=delivery or Recorder(),  # type: ignore[arg-type]
                              session_id="BDATTEST")
    task = asyncio.create_task(session.run())
    await peer.expect(220)
    await peer.cmd("EHLO provider.test", 250)
    return peer, session, task


# --- EHLO ------------------------------------------------------------------------------


async def test_the_reversed_session_advertises_chunking() -> None:
    peer = MemoryPeer()
    task = asyncio.create_task(ReversedSession(
        peer.connection, hostname="mail.example.org", limits=LIMITS,
        accept_domains=frozenset({"example.org"}), delivery=Recorder(),  # type: ignore[arg-type]
        session_id="X").run())
    await peer.expect(220)
    assert "CHUNKING" in await peer.cmd("EHLO provider.test", 250)
    await peer.quit(task)


async def test_the_mx_neither_advertises_nor_takes_bdat(tmp_path) -> None:
    store = open_store(tmp_path / "data")
    add_customer(store)
    try:
        peer = MemoryPeer()
        task = asyncio.create_task(MXSession(peer.connection, hostname="mx.provider.test",
                                             limits=LIMITS, store=store).run())
        await peer.expect(220)
        assert "CHUNKING" not in await peer.cmd("EHLO client.sender.test", 250)
        peer.send(MAIL + RCPT)
        await peer.replies(2)
        assert (await peer.cmd("BDAT 6 LAST", 502))[0] == "5.5.1 Command not implemented"
        # BDAT is no verb of this dialog: an overlong one is just a line too
        # long, and the session goes on.
        peer.send(b"BDAT 5 LAST " + b"x" * 600 + b"\r\n")
        assert (await peer.replies(1))[0][0] == 500
        await peer.cmd("NOOP", 250)
        await peer.quit(task)
        assert store.held_message_ids(["example.org"]) == []
    finally:
        store.close()
    # Only the customer's reversed session turns it on.
    assert not MXSession.offer_chunking
    assert not SubmissionSession.offer_chunking
    assert not OutboxSession.offer_chunking
    assert ReversedSession.offer_chunking


# --- the happy paths -------------------------------------------------------------------


async def test_pipelined_messages_in_one_write_are_delivered_in_order() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    first = b"Subject: one\r\n\r\n.a line starting with a dot\r\n..two\r\n"
    second = b"Subject: two\r\n\r\nBDAT 5 LAST\r\nQUIT\r\n"  # commands in a body are content
    third = b"Subject: three\r\n\r\nno final line end"
    before = len(peer.transport.writes)
    peer.send(MAIL + RCPT + bdat(first) + MAIL + RCPT + bdat(second)
              + MAIL + RCPT + b"RCPT TO:<carol@example.org>\r\n" + bdat(third) + b"NOOP\r\n")
    replies = await peer.replies(11)
    assert [code for code, _ in replies] == [250] * 11
    assert [text for _, text in replies][2::3][:2] == ["2.0.0 Delivered", "2.0.0 Delivered"]
    assert replies[9] == (250, "2.0.0 Delivered") and replies[10] == (250, "2.0.0 OK")
    # Replies were batched, not written one by one.
    assert len(peer.transport.writes) - before < 11
    assert [content(b) for b in recorder.bodies] == [first, second, third + b"\r\n"]
    await peer.quit(task)


async def test_bdat_hands_on_the_bytes_data_would() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    message = b"Subject: same\r\n\r\n.\r\n..\r\n.x\r\nend"
    peer.send(MAIL + RCPT + b"DATA\r\n")
    await peer.replies(3)
    peer.send(b"".join(dot_stuff([message])))
    await peer.expect(250)
    peer.send(MAIL + RCPT + bdat(message[:17], last=False) + bdat(message[17:]))
    assert [c for c, _ in await peer.replies(4)] == [250] * 4
    via_data, via_bdat = recorder.bodies
    assert content(via_bdat) == content(via_data) == message + b"\r\n"
    await peer.quit(task)


STREAM = (MAIL + RCPT + bdat(b"Subject: a\r", last=False) + bdat(b"\n\r\n.dot\r\n")
          + MAIL + RCPT + bdat(b"x\nbare\r\n", last=False) + bdat(b"NOOP\r\n")
          + bdat(b"QUIT\r\n") + MAIL + RCPT + b"BDAT 0 LAST\r\n"
          + MAIL + RCPT + bdat(b"Subject: c\r\n", last=False) + b"RSET\r\n"
          + MAIL + RCPT + bdat(b"Subject: d\r\n\r\nend") + b"QUIT\r\n")
STREAM_REPLIES = [250, 250, 250, 250, 250, 250, 550, 503, 503, 250, 250, 250,
                  250, 250, 250, 250, 250, 250, 250, 221]
STREAM_BODIES = [b"Subject: a\r\n\r\n.dot\r\n", b"", b"Subject: d\r\n\r\nend\r\n"]


async def _segmented(points: list[int]) -> tuple[list[int], list[bytes]]:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    marks = [0, *sorted(set(points)), len(STREAM)]
    for a, b in itertools.pairwise(marks):
        if a < b:
            peer.send(STREAM[a:b])
            await asyncio.sleep(0)
    got = [code for code, _ in await peer.replies(len(STREAM_REPLIES))]
    await asyncio.wait_for(task, 5)
    return got, [content(b) for b in recorder.bodies]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, len(STREAM)), max_size=6))
def test_any_segmentation_of_a_pipelined_stream_gets_the_same_replies(points) -> None:
    got, bodies = asyncio.run(_segmented(points))
    assert got == STREAM_REPLIES
    assert bodies == STREAM_BODIES


async def test_a_message_in_several_chunks() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + RCPT + bdat(b"Subject: x\r", last=False))
    assert await peer.replies(3) == [(250, "2.1.0 Sender OK"), (250, "2.1.5 Recipient OK"),
                                    (250, "2.0.0 11 octets received")]
    peer.send(bdat(b"\n\r\nbody ", last=False) + bdat(b"", last=False))
    assert await peer.replies(2) == [(250, "2.0.0 8 octets received"),
                                    (250, "2.0.0 0 octets received")]
    peer.send(bdat(b"goes on\r\n"))
    await peer.expect(250)
    assert [content(b) for b in recorder.bodies] == [b"Subject: x\r\n\r\nbody goes on\r\n"]
    await peer.quit(task)


async def test_bdat_0_last_ends_the_message() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + RCPT + bdat(b"Subject: x\r\n\r\nhi\r\n", last=False) + b"BDAT 0 LAST\r\n")
    assert [c for c, _ in await peer.replies(4)] == [250] * 4
    peer.send(MAIL + RCPT + b"BDAT 0 LAST\r\n")  # an empty message: only our trace header
    assert [c for c, _ in await peer.replies(3)] == [250] * 3
    assert [content(b) for b in recorder.bodies] == [b"Subject: x\r\n\r\nhi\r\n", b""]
    await peer.quit(task)


async def test_a_real_maildir_gets_the_same_file_either_way(tmp_path) -> None:
    maildir = MaildirDelivery(str(tmp_path / "{domain}" / "{local}"), create=True, aliases={},
                              catch_all=None, hostname="mail.example.org")
    peer, _session, task = await start(maildir)
    message = b"Subject: m\r\n\r\n.dot\r\nline\r\n"
    peer.send(MAIL + RCPT + b"DATA\r\n")
    await peer.replies(3)
    peer.send(b"".join(dot_stuff([message])) + MAIL + RCPT + bdat(message))
    assert [c for c, _ in await peer.replies(4)] == [250] * 4
    await peer.quit(task)
    files = sorted((tmp_path / "example.org" / "bob" / "new").iterdir())
    assert len(files) == 2
    texts = [f.read_bytes() for f in files]
    assert all(t.endswith(b"\nSubject: m\n\n.dot\nline\n") for t in texts)
    assert texts[0].split(b"\nSubject: m\n")[1] == texts[1].split(b"\nSubject: m\n")[1]


# --- limits and content checks ---------------------------------------------------------


async def test_a_last_chunk_over_the_size_limit_is_552_and_the_next_message_goes() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    big = b"x" * 998 + b"\r\n" + b"y" * 8 + b"\r\n"  # 1010 > 1000
    peer.send(MAIL + RCPT + bdat(big) + b"NOOP\r\n")
    replies = await peer.replies(4)
    assert replies[2] == (552, "5.3.4 Message size exceeds fixed maximum message size")
    assert replies[3] == (250, "2.0.0 OK")  # the octets were read: NOOP is the next command
    # A chunk that crosses the limit before LAST is refused at once.
    lines = (b"a" * 98 + b"\r\n") * 6
    peer.send(MAIL + RCPT + bdat(lines, last=False) + bdat(lines, last=False)
              + bdat(b"c" * 10))
    assert [c for c, _ in await peer.replies(5)] == [250, 250, 250, 552, 503]
    # Exactly the limit, but the CRLF DATA would add makes it 1002: refused too.
    peer.send(MAIL + RCPT + bdat(b"z" * 100 + (b"\r\n" + b"z" * 98) * 9))
    assert [c for c, _ in await peer.replies(3)] == [250, 250, 552]
    assert recorder.bodies == []
    peer.send(MAIL + RCPT + bdat(b"Subject: small\r\n\r\nok\r\n"))
    assert [c for c, _ in await peer.replies(3)] == [250, 250, 250]
    assert len(recorder.bodies) == 1
    await peer.quit(task)


@pytest.mark.parametrize("chunks", [
    [b"Subject: x\r\n\r\nbare\nLF\r\n"],  # inside one chunk
    [b"Subject: x\r\n\r\nbare\r", b"CR\r\n"],  # a CR ending a chunk, no LF after it
    [b"Subject: x\r\n\r\nline\r\n", b"\nLF first\r\n"],  # an LF starting a chunk, alone
])
async def test_bare_line_endings_are_refused_across_chunks(chunks: list[bytes]) -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    wire = b"".join(bdat(c, last=False) for c in chunks[:-1]) + bdat(chunks[-1])
    peer.send(MAIL + RCPT + wire + b"NOOP\r\n")
    replies = await peer.replies(2 + len(chunks) + 1)
    assert replies[-2] == (550, "5.5.2 Message refused: bare CR or LF in message data "
                                "(RFC 5321 section 2.3.8)")
    assert replies[-1] == (250, "2.0.0 OK")
    assert recorder.bodies == [] and recorder.aborted >= 1
    await peer.quit(task)


async def test_a_crlf_straddling_chunks_is_fine() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + RCPT + bdat(b"Subject: x\r", last=False) + bdat(b"\n\r\nbody\r\n"))
    assert [c for c, _ in await peer.replies(4)] == [250] * 4
    assert len(recorder.bodies) == 1
    await peer.quit(task)


async def test_a_bare_lf_in_an_early_chunk_refuses_at_once_and_later_chunks_get_503() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + RCPT + bdat(b"a\nb\r\n", last=False) + bdat(b"QUIT\r\n", last=False)
              + bdat(b"RSET\r\n") + MAIL + RCPT + bdat(b"fine\r\n"))
    replies = await peer.replies(8)
    assert [c for c, _ in replies] == [250, 250, 550, 503, 503, 250, 250, 250]
    assert replies[3][1] == ("5.5.1 Transaction failed earlier, send RSET or MAIL "
                             "(BDAT chunk discarded)")
    assert [content(b) for b in recorder.bodies] == [b"fine\r\n"]
    await peer.quit(task)


async def test_a_long_line_straddling_chunks_is_refused() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)  # max_line_length 200 with the CRLF
    peer.send(MAIL + RCPT + bdat(b"x" * 150, last=False) + bdat(b"y" * 49 + b"\r\n"))
    replies = await peer.replies(4)
    assert replies[3] == (500, "5.5.6 Message refused: line too long "
                               "(RFC 5321 section 4.5.3.1.6)")
    peer.send(MAIL + RCPT + bdat(b"x" * 150, last=False) + bdat(b"y" * 48 + b"\r\n"))
    assert [c for c, _ in await peer.replies(4)] == [250] * 4  # 200 exactly
    assert [content(b) for b in recorder.bodies] == [b"x" * 150 + b"y" * 48 + b"\r\n"]
    await peer.quit(task)


# --- sequence ---------------------------------------------------------------------------


async def test_bdat_without_mail_is_503_and_its_octets_are_not_commands() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(bdat(b"QUIT\r\n") + b"NOOP\r\n")
    assert await peer.replies(2) == [(503, "5.5.1 Need MAIL command first (BDAT chunk "
                                          "discarded)"), (250, "2.0.0 OK")]
    assert not peer.server_closed  # the QUIT in the chunk was not obeyed
    await peer.quit(task)


async def test_bdat_without_recipients_is_554_and_mail_follows_at_once() -> None:
    # 554 as DATA gets (and Postfix gives): refused recipients are not the
    # provider's protocol errors, so they never count towards max_errors.
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + b"RCPT TO:<unknown@example.org>\r\nRCPT TO:<x@elsewhere.test>\r\n"
              + bdat(b"RSET\r\n", last=False) + bdat(b"QUIT\r\n") + MAIL + RCPT
              + bdat(b"ok\r\n"))
    replies = await peer.replies(8)
    assert [c for c, _ in replies] == [250, 550, 550, 554, 503, 250, 250, 250]
    assert replies[3][1] == "5.5.1 No valid recipients (BDAT chunk discarded)"
    assert [content(b) for b in recorder.bodies] == [b"ok\r\n"]
    await peer.quit(task)


async def test_data_after_bdat_is_503_and_ends_the_transaction() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + RCPT + bdat(b"Subject: x\r\n", last=False) + b"DATA\r\n"
              + bdat(b"\r\nrest\r\n") + MAIL + RCPT + bdat(b"other\r\n"))
    replies = await peer.replies(8)
    assert [c for c, _ in replies] == [250, 250, 250, 503, 503, 250, 250, 250]
    assert replies[3][1] == ("5.5.1 DATA not allowed after BDAT in one transaction; "
                             "transaction ended")
    assert [content(b) for b in recorder.bodies] == [b"other\r\n"]
    assert recorder.aborted >= 2  # the first local transaction was ended at the 503
    await peer.quit(task)


async def test_bdat_after_a_refused_data_is_554() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + b"RCPT TO:<x@elsewhere.test>\r\nDATA\r\n" + bdat(b"QUIT\r\n")
              + b"NOOP\r\n")
    replies = await peer.replies(5)
    assert [c for c, _ in replies] == [250, 550, 554, 554, 250]
    await peer.quit(task)


async def test_rset_drops_the_chunks_received() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + RCPT + bdat(b"Subject: old\r\n", last=False) + b"RSET\r\n"
              + MAIL + RCPT + bdat(b"Subject: new\r\n"))
    assert [c for c, _ in await peer.replies(7)] == [250] * 7
    assert [content(b) for b in recorder.bodies] == [b"Subject: new\r\n"]
    await peer.quit(task)


@pytest.mark.parametrize("line", [
    b"BDAT", b"BDAT abc LAST", b"BDAT 5 MORE", b"BDAT -5", b"BDAT 1234567890123 LAST",
    b"BDAT 5 \xff", b"BDAT 5\x00 LAST",
])
async def test_an_unparsable_bdat_is_501_then_421_and_close(line: bytes) -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + RCPT + line + b"\r\nQUIT\r\nNOOP\r\n")
    replies = await peer.replies(4)
    assert replies[2] == (501, "5.5.4 Syntax: BDAT chunk-size [LAST]")
    assert replies[3] == (421, "4.5.0 Cannot tell where that BDAT chunk ends, closing "
                               "connection")
    await asyncio.wait_for(task, 5)
    assert peer.server_closed and bytes(peer.received) == b""  # QUIT, NOOP: no reply
    assert recorder.bodies == [] and recorder.aborted == recorder.opened == 1


@pytest.mark.parametrize("line", [
    b"BDAT 30 LAST " + b"x" * 600,  # the size is there, the rest is not a BDAT line
    b"bdat " + b"9" * 600,
])
async def test_an_overlong_bdat_line_is_501_then_421_and_its_octets_are_never_commands(
        line: bytes) -> None:
    """A BDAT line over 512 octets: its chunk follows, and its size cannot be
    trusted.  Read as commands, octets that look like MAIL, RCPT and BDAT
    would make a message the provider never sent."""
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    smuggled = MAIL + RCPT + bdat(b"forged\r\n")
    peer.send(MAIL + RCPT + line + b"\r\n" + smuggled + b"QUIT\r\n")
    replies = await peer.replies(4)
    assert replies[2] == (501, "5.5.4 Syntax: BDAT chunk-size [LAST]")
    assert replies[3][0] == 421
    await asyncio.wait_for(task, 5)
    assert peer.server_closed and bytes(peer.received) == b""
    assert recorder.bodies == []


async def test_an_overlong_line_of_another_verb_is_500_and_the_session_goes_on() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(b"NOOP " + b"x" * 600 + b"\r\n")
    assert (await peer.replies(1))[0][0] == 500
    peer.send(MAIL + RCPT + bdat(b"Subject: ok\r\n\r\nbody\r\n"))
    assert [code for code, _ in await peer.replies(3)] == [250, 250, 250]
    await peer.quit(task)
    assert len(recorder.bodies) == 1


# --- the connection ---------------------------------------------------------------------


async def test_a_connection_dropped_mid_chunk_stores_nothing() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + RCPT + b"BDAT 100 LAST\r\n" + b"x" * 60)
    await peer.replies(2)
    peer.shutdown_write()
    await asyncio.wait_for(task, 5)
    assert recorder.bodies == [] and recorder.aborted == 1
    assert bytes(peer.received) == b""  # no reply to the BDAT


async def test_a_connection_dropped_between_chunks_stores_nothing() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + RCPT + bdat(b"Subject: x\r\n\r\nall there\r\n", last=False))
    await peer.replies(3)
    peer.transport.close()
    await asyncio.wait_for(task, 5)
    assert recorder.bodies == [] and recorder.aborted == 1


async def test_a_stall_mid_chunk_times_out() -> None:
    recorder = Recorder()
    limits = SessionLimits(command_timeout=5.0, data_timeout=0.3, max_message_size=1000)
    peer, _session, task = await start(recorder, limits)
    peer.send(MAIL + RCPT + b"BDAT 100 LAST\r\n" + b"x" * 10)
    await peer.replies(2)
    lines = await peer.expect(421, timeout=2.0)
    assert lines == ["4.4.2 Timeout exceeded, closing connection"]
    await asyncio.wait_for(task, 5)
    assert recorder.bodies == []


async def test_the_data_deadline_spans_the_chunks_and_the_waits_between_them(caplog) -> None:
    recorder = Recorder()
    limits = SessionLimits(command_timeout=5.0, data_timeout=5.0, max_message_size=1000,
                           data_deadline=0.5)
    peer, _session, task = await start(recorder, limits)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    peer.send(MAIL + RCPT + bdat(b"a", last=False))
    await peer.replies(3)
    for _ in range(2):  # chunks keep coming, each well within data_timeout
        await asyncio.sleep(0.1)
        peer.send(bdat(b"b", last=False))
        await peer.expect(250)
    with caplog.at_level(logging.WARNING, logger="fermoposta"):
        # No more chunks: the wait for the next command ends at the deadline,
        # not after command_timeout.
        lines = await peer.expect(421, timeout=2.0)
        await asyncio.wait_for(task, 5)
    assert lines == ["4.4.2 DATA time limit exceeded, closing connection"]
    assert loop.time() - begin < 1.5
    assert "partial message discarded" in caplog.text
    assert recorder.bodies == []


async def test_a_reply_is_never_held_while_the_session_waits_for_a_chunk(monkeypatch) -> None:
    # Held replies would otherwise still leave after HOLD_DELAY: make it long,
    # so only the flush before a wait can send them.
    monkeypatch.setattr(connection, "HOLD_DELAY", 30.0)
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + RCPT + b"BDAT 20 LAST\r\n" + b"x" * 5)  # the chunk is incomplete
    assert [c for c, _ in await peer.replies(2)] == [250, 250]  # not held back
    peer.send(b"x" * 13 + b"\r\n")
    await peer.expect(250, timeout=2.0)
    assert [content(b) for b in recorder.bodies] == [b"x" * 18 + b"\r\n"]
    await peer.quit(task)


# --- a body staged while it arrives (the MX's SQLite store does that) --------------------


class FakeStage:
    def __init__(self) -> None:
        self.size = 0
        self.failed = False
        self.discarded = threading.Event()

    def append(self, data: bytes) -> None:
        self.size += len(data)

    def discard(self) -> None:
        self.discarded.set()


class StagingSession(ReversedSession):
    """A receiver that stores big bodies while they arrive."""

    stages: list[FakeStage]

    def body_stage(self, txn: Transaction, spool: IO[bytes]) -> BodyStage | None:
        stage = FakeStage()
        self.stages.append(stage)
        return stage


@pytest.mark.parametrize("end", ["drop", "rset", "refused"])
async def test_what_was_staged_goes_when_the_chunked_message_does(monkeypatch, end) -> None:
    monkeypatch.setattr(incoming, "SPOOL_MEMORY", 100)  # stage from the 101st byte on
    peer = MemoryPeer()
    session = StagingSession(peer.connection, hostname="mail.example.org", limits=LIMITS,
                             accept_domains=frozenset({"example.org"}),
                             delivery=Recorder(),  # type: ignore[arg-type]
                             session_id="STAGE")
    session.stages = []
    task = asyncio.create_task(session.run())
    await peer.expect(220)
    await peer.cmd("EHLO provider.test", 250)
    peer.send(MAIL + RCPT + bdat((b"s" * 98 + b"\r\n") * 3, last=False))
    await peer.replies(3)
    assert len(session.stages) == 1 and not session.stages[0].discarded.is_set()
    if end == "drop":
        peer.transport.close()
        await asyncio.wait_for(task, 5)
    elif end == "rset":
        await peer.cmd("RSET", 250)
    else:
        peer.send(bdat(b"bare\nLF\r\n"))
        await peer.expect(550)
    assert await asyncio.to_thread(session.stages[0].discarded.wait, 5)
    if end != "drop":
        await peer.quit(task)


# --- Connection.read_chunk ---------------------------------------------------------------


async def test_read_chunk_hands_octets_on_as_they_arrive_and_leaves_the_rest() -> None:
    peer = MemoryPeer()
    pieces: list[bytes] = []
    reading = asyncio.create_task(peer.connection.read_chunk(100, pieces.append, 5.0))
    peer.send(b"a" * 30)
    await asyncio.sleep(0.01)
    assert pieces == [b"a" * 30] and not reading.done()  # not held until the chunk is whole
    peer.send(b"b" * 70 + b"NOOP\r\n")
    await asyncio.wait_for(reading, 1)
    assert b"".join(pieces) == b"a" * 30 + b"b" * 70
    assert await peer.connection.read_line(512, 1.0) == b"NOOP\r\n"


async def test_read_chunk_raises_when_the_peer_closes_first() -> None:
    peer = MemoryPeer()
    reading = asyncio.create_task(peer.connection.read_chunk(10, lambda _: None, 5.0))
    peer.send(b"abc")
    peer.shutdown_write()
    with pytest.raises(connection.ConnectionClosed):
        await asyncio.wait_for(reading, 1)


async def test_rcpt_between_chunks_is_503_and_the_message_goes_to_the_first_only() -> None:
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    peer.send(MAIL + RCPT + bdat(b"Subject: one\r\n", last=False)
              + b"RCPT TO:<carol@example.org>\r\n" + bdat(b"\r\nbody\r\n"))
    replies = await peer.replies(5)
    assert [c for c, _ in replies] == [250, 250, 250, 503, 250]
    assert replies[3][1] == "5.5.1 RCPT not allowed after BDAT in one transaction"
    assert len(recorder.bodies) == 1 and b"for <bob@example.org>" in recorder.bodies[0]
    await peer.quit(task)


async def test_a_refused_chunk_too_big_to_skip_closes_without_reading_it() -> None:
    """Reading a refused chunk to find the next command is bounded (Postfix
    stops at 1.5 times its limit): past it, the refusal, 421 and close."""
    recorder = Recorder()
    peer, _session, task = await start(recorder)
    huge = LIMITS.max_message_size * 2 + 1024 * 1024
    peer.send(b"BDAT %d LAST\r\n" % huge + b"NOOP\r\n")  # no MAIL: refused
    replies = await peer.replies(2)
    assert replies[0][0] == 503 and "Need MAIL" in replies[0][1]
    assert replies[1] == (421, "4.5.0 BDAT chunk too big to skip, closing connection")
    await asyncio.wait_for(task, 5)
    assert peer.server_closed and recorder.bodies == []
