"""Sessions over an in-memory wire (`support.wire`): the segment boundaries
are the test's, so the ATRN boundary is tested both ways deterministically,
and a bounded fuzzer runs dialogs drawn from a corpus through the MX and
ODMR sessions, checking that every reply is well formed, nothing escapes
the session and nothing is stored but what got a 250."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import sqlite3

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import PASSWORD, add_customer
from fermoposta.net.server_session import SessionLimits
from fermoposta.provider.drain import DrainSettings
from fermoposta.provider.mx import MXSession
from fermoposta.provider.odmr import ODMRSession, ODMRSettings
from fermoposta.store import SQLiteStore, open_store
from fermoposta.store.base import MessageOrigin, NewMessage, NewRecipient, RecipientState
from support.wire import MemoryPeer

LIMITS = SessionLimits(command_timeout=5.0, data_timeout=5.0, max_errors=20,
                       max_message_size=100_000, max_recipients=5)
PLAIN = "AUTH PLAIN " + base64.b64encode(f"\0acme\0{PASSWORD}".encode()).decode()


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "data")
    add_customer(s)
    yield s
    s.close()


def odmr_session(peer: MemoryPeer, store: SQLiteStore) -> ODMRSession:
    return ODMRSession(peer.connection, hostname="mx.provider.test", limits=LIMITS, store=store,
                       settings=ODMRSettings(allow_plaintext_auth=True),
                       drain_settings=DrainSettings(greeting_timeout=5.0, command_timeout=5.0,
                                                    final_reply_timeout=5.0))


def hold_one(store: SQLiteStore) -> None:
    rcpt = NewRecipient("bob@example.org", "example.org", RecipientState.HELD)
    store.enqueue(NewMessage(sender="alice@sender.test", origin=MessageOrigin.MX,
                             client="test", recipients=(rcpt,)),
                  io.BytesIO(b"Subject: x\r\n\r\nheld\r\n"))


async def _authenticated(peer: MemoryPeer) -> None:
    await peer.expect(220)
    await peer.cmd("EHLO customer.example.org", 250)
    await peer.cmd(PLAIN, 235)


async def test_bytes_in_the_atrn_segment_get_503_and_the_session_stays(store):
    hold_one(store)
    peer = MemoryPeer()
    task = asyncio.create_task(odmr_session(peer, store).run())
    await _authenticated(peer)
    peer.send(b"ATRN example.org\r\n220 fake greeting\r\n")  # one segment
    lines = await peer.expect(503)
    assert lines[0].startswith("5.5.1")
    # Still authenticated; a clean ATRN reverses and the drain starts.
    await peer.cmd("ATRN example.org", 250)
    peer.send(b"220 customer.example.org ESMTP\r\n")
    ehlo = await peer.read_line()
    assert ehlo == "EHLO mx.provider.test"
    peer.send(b"250 customer.example.org\r\n")
    assert (await peer.read_line()).startswith("MAIL FROM:<alice@sender.test>")
    peer.transport.close()
    await asyncio.wait_for(task, 10)
    # The connection went before the message was taken: still held.
    assert store.held_message_ids(["example.org"]) != []


async def test_a_greeting_in_its_own_segment_after_the_250_is_the_customers(store):
    hold_one(store)
    peer = MemoryPeer()
    task = asyncio.create_task(odmr_session(peer, store).run())
    await _authenticated(peer)
    peer.send(b"ATRN example.org\r\n")
    await peer.expect(250)
    peer.send(b"220 customer.example.org ESMTP\r\n")  # after the 250: the greeting
    assert await peer.read_line() == "EHLO mx.provider.test"
    peer.transport.close()
    await asyncio.wait_for(task, 10)


# --- the fuzzer ------------------------------------------------------------------------------

CORPUS = [
    b"EHLO client.test", b"HELO client.test", b"EHLO", b"EHLO [127.0.0.1]", b"MAIL FROM:<a@b.test>",
    b"MAIL FROM:<> BODY=8BITMIME", b"MAIL FROM:<a@b.test> SIZE=999999999",
    b"MAIL FROM:<a@b.test> SMTPUTF8", b"MAIL FROM:<0@00--0.xn--bcher-kva>",
    b"RCPT TO:<bob@example.org>", b"RCPT TO:<eve@elsewhere.test>", b"RCPT TO:<postmaster>",
    b"RCPT TO:<bob@example\xe2\x80\x8b.org>", b"RCPT TO:<bob@example.org> NOTIFY=NEVER",
    b"RCPT TO:<x@example.org> ORCPT=bad", b"DATA", b"BDAT 10 LAST", b"RSET", b"NOOP", b"QUIT",
    b"VRFY bob", b"EXPN list", b"HELP", b"STARTTLS", b"AUTH PLAIN", b"AUTH PLAIN AGFjbWUAeA==",
    PLAIN.encode(), b"AUTH CRAM-MD5", b"*", b"ATRN", b"ATRN example.org", b"ATRN other.test",
    b"ATRN bad..domain", b"ETRN example.org", b"TURN", b"\x00\xff", b"MAIL", b"RCPT",
    b"MAIL FROM:<" + b"a" * 300 + b"@b.test>", b"X" * 600, b"Subject: hi", b".", b"..",
    b"", b"\r", b"foo\nbar", b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bob@example.org>\r\nDATA",
    b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.",
]

lines = st.one_of(st.sampled_from(CORPUS),
                  st.binary(max_size=40).filter(lambda b: b"\n" not in b))
dialogs = st.lists(st.tuples(lines, st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n"])),
                   min_size=1, max_size=25)
segmentations = st.integers(min_value=1, max_value=4)


def _well_formed(data: bytes) -> None:
    assert data.endswith(b"\r\n") or not data, data[-80:]
    for line in data.split(b"\r\n")[:-1]:
        assert len(line) >= 3 and line[:3].isdigit() and line[:1] in b"2345", line
        assert len(line) == 3 or line[3:4] in (b" ", b"-"), line
        assert len(line) <= 512, line


async def _fuzz_once(store: SQLiteStore, kind: str, dialog: list[tuple[bytes, bytes]],
                     pieces: int) -> int:
    peer = MemoryPeer()
    session = (MXSession(peer.connection, hostname="mx.provider.test", limits=LIMITS,
                         store=store)
               if kind == "mx" else odmr_session(peer, store))
    task = asyncio.create_task(session.run())
    data = b"".join(line + end for line, end in dialog)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        if peer.transport.is_closing():
            break  # the session ended it (QUIT, 421)
        peer.send(data[i:i + step])
        await asyncio.sleep(0)
    if not peer.transport.is_closing():
        # The client is done sending (a TCP half-close), whatever state it
        # left: it must still get a reply to every complete command.
        peer.shutdown_write()
    await asyncio.wait_for(task, 10)  # run() never raises
    _well_formed(bytes(peer.received))
    return bytes(peer.received).count(b" OK queued as ")


@pytest.mark.parametrize("kind", ["mx", "odmr"])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(dialog=dialogs, pieces=segmentations)
@example(dialog=[(b"EHLO c.test", b"\r\n"), (CORPUS[-1], b"\r\n"), (b"QUIT", b"\r\n")],
         pieces=3)
def test_fuzzed_dialogs_get_well_formed_replies_and_store_nothing_unacknowledged(
        tmp_path_factory, kind, dialog, pieces):
    quiet = logging.getLogger("fermoposta")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # hostile dialogs log a lot; restored below
    store = open_store(tmp_path_factory.mktemp("fuzz"))
    add_customer(store)
    try:
        queued = asyncio.run(_fuzz_once(store, kind, dialog, pieces))
        # Exactly the messages whose final dot got "250 ... queued as" are
        # held, and only for the hosted domain.
        assert len(store.held_message_ids(["example.org"])) == queued
        summary = {state: count for state, count, *_ in store.queue_summary()}
        assert sum(summary.values()) == queued, summary
        if kind == "odmr":
            assert queued == 0
    finally:
        store.close()
        quiet.setLevel(level)


async def test_bytes_that_come_while_atrn_decides_get_503_and_the_leases_go(store, monkeypatch):
    """The check for pipelined bytes is made again right before the 250: a
    line that arrived while ATRN was deciding (a worker thread, the store)
    is never read as the customer's greeting, and the leases taken for that
    ATRN are given back at once, so the next ATRN gets the domain."""
    import time

    hold_one(store)
    decide = ODMRSession._decide

    def slow_decide(self, requested, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        return decide(self, requested, **kwargs)

    monkeypatch.setattr(ODMRSession, "_decide", slow_decide)
    peer = MemoryPeer()
    task = asyncio.create_task(odmr_session(peer, store).run())
    await _authenticated(peer)
    peer.send(b"ATRN example.org\r\n")
    await asyncio.sleep(0.1)  # ATRN is deciding now
    peer.send(b"220 fake greeting\r\n")
    lines = await peer.expect(503)
    assert lines[0].startswith("5.5.1")
    monkeypatch.setattr(ODMRSession, "_decide", decide)
    # The lease of the refused ATRN is given back at once (not at the end
    # of the session): the leases table is empty again.
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0
    finally:
        conn.close()
    # Still authenticated: a clean ATRN reverses.
    await peer.cmd("ATRN example.org", 250)
    peer.send(b"220 customer.example.org ESMTP\r\n")
    assert await peer.read_line() == "EHLO mx.provider.test"
    peer.transport.close()
    await asyncio.wait_for(task, 10)
