"""Replies to pipelined commands (RFC 2920 §3.1) leave in one write, like
Postfix's smtpd: a reply is held while the client's next command is already
here, and every held reply goes out before the session waits for the client,
writes anything else, or closes.  A client that does not pipeline gets each
reply at once, in a write of its own."""

from __future__ import annotations

import asyncio

import pytest

from conftest import add_customer
from fermoposta.net.server_session import SessionLimits
from fermoposta.provider.mx import MXSession
from fermoposta.store import open_store
from support.wire import MemoryPeer

LIMITS = SessionLimits(command_timeout=5.0, data_timeout=5.0, max_errors=20,
                       max_message_size=100_000, max_recipients=5)


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "data")
    add_customer(s)
    yield s
    s.close()


async def _session(store) -> tuple[MemoryPeer, asyncio.Task[None]]:
    peer = MemoryPeer()
    session = MXSession(peer.connection, hostname="mx.provider.test", limits=LIMITS,
                        store=store)
    task = asyncio.create_task(session.run())
    await peer.expect(220)
    await peer.cmd("EHLO client.sender.test", 250)
    return peer, task


async def _settle(peer: MemoryPeer) -> None:
    """Let the session work through what it has (it answers, then waits)."""
    for _ in range(50):
        await asyncio.sleep(0.01)


async def test_a_pipelined_group_is_answered_in_one_write(store):
    peer, task = await _session(store)
    before = len(peer.transport.writes)
    peer.send(b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@example.org>\r\n"
              b"RCPT TO:<eve@elsewhere.test>\r\nDATA\r\n")
    await _settle(peer)
    group = peer.transport.writes[before:]
    assert len(group) == 1, group
    codes = [line[:3] for line in group[0].split(b"\r\n") if line]
    assert codes == [b"250", b"250", b"550", b"354"]  # in order; the relay refused
    for code in (250, 250, 550, 354):
        await peer.expect(code)
    await peer.cmd("Subject: x\r\n\r\nheld\r\n.", 250)
    assert len(store.held_message_ids(["example.org"])) == 1
    peer.send(b"QUIT\r\n")
    await peer.expect(221)
    await asyncio.wait_for(task, 5)


async def test_commands_one_at_a_time_get_a_write_each(store):
    peer, task = await _session(store)
    before = len(peer.transport.writes)
    await peer.cmd("MAIL FROM:<alice@sender.test>", 250)
    await peer.cmd("RCPT TO:<bob@example.org>", 250)
    await peer.cmd("NOOP", 250)
    assert len(peer.transport.writes) - before == 3
    peer.send(b"QUIT\r\n")
    await peer.expect(221)
    await asyncio.wait_for(task, 5)


async def test_held_replies_reach_a_client_that_half_closes(store):
    peer, task = await _session(store)
    peer.send(b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@example.org>\r\nRSET\r\n"
              b"NOOP\r\n")
    peer.shutdown_write()  # FIN right after the group: no QUIT
    await asyncio.wait_for(task, 5)
    for code in (250, 250, 250, 250):
        await peer.expect(code)


async def test_held_replies_go_out_before_the_closing_reply(store):
    peer, task = await _session(store)
    # The 221 is held too (a NOOP follows it) and goes out, after the 250,
    # when the session ends; the NOOP is never answered.
    peer.send(b"MAIL FROM:<alice@sender.test>\r\nQUIT\r\nNOOP\r\n")
    await asyncio.wait_for(task, 5)
    await peer.expect(250)
    await peer.expect(221)
    assert peer.server_closed
    assert bytes(peer.received) == b""


async def test_a_held_closing_reply_does_not_wait_for_the_session_to_finish(store):
    """finish() may be slow (leases, a local MTA); the 221 goes before it."""
    class SlowFinish(MXSession):
        async def finish(self) -> None:
            await asyncio.sleep(2.0)

    peer = MemoryPeer()
    task = asyncio.create_task(SlowFinish(peer.connection, hostname="mx.provider.test",
                                          limits=LIMITS, store=store).run())
    await peer.expect(220)
    loop = asyncio.get_running_loop()
    start = loop.time()
    peer.send(b"QUIT\r\nNOOP\r\n")
    await peer.expect(221, timeout=1.0)
    assert loop.time() - start < 1.0
    await asyncio.wait_for(task, 5)


async def test_held_replies_are_capped_and_a_flood_is_answered_in_order(store):
    peer, task = await _session(store)
    before = len(peer.transport.writes)
    peer.send(b"NOOP\r\n" * 3000)  # ~45 KB of replies to one segment
    for _ in range(3000):
        await peer.expect(250)
    writes = peer.transport.writes[before:]
    assert len(writes) >= 3  # never one unbounded blob
    assert max(len(w) for w in writes) <= 16 * 1024 + 100
    peer.send(b"QUIT\r\n")
    await peer.expect(221)
    await asyncio.wait_for(task, 5)


async def test_a_held_reply_does_not_wait_for_slow_work_on_the_next_command(store):
    """A RCPT that takes long (a local MTA asked, a busy store) does not keep
    the reply to the MAIL before it: held replies leave within milliseconds."""
    class SlowRcpt(MXSession):
        async def check_recipient(self, txn, rcpt):  # type: ignore[no-untyped-def]
            await asyncio.sleep(1.5)
            return await super().check_recipient(txn, rcpt)

    peer = MemoryPeer()
    task = asyncio.create_task(SlowRcpt(peer.connection, hostname="mx.provider.test",
                                        limits=LIMITS, store=store).run())
    await peer.expect(220)
    await peer.cmd("EHLO client.sender.test", 250)
    loop = asyncio.get_running_loop()
    start = loop.time()
    peer.send(b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@example.org>\r\n")
    await peer.expect(250, timeout=1.0)  # the MAIL's, long before the RCPT's
    assert loop.time() - start < 0.5
    await peer.expect(250, timeout=5.0)
    peer.send(b"QUIT\r\n")
    await peer.expect(221)
    await asyncio.wait_for(task, 5)


async def test_a_held_reply_is_flushed_by_close():
    peer = MemoryPeer()
    peer.connection.hold(b"250 held\r\n")
    assert peer.received == b""
    await peer.connection.close(timeout=1.0)
    assert bytes(peer.received) == b"250 held\r\n"


async def test_a_held_reply_goes_before_the_next_write():
    peer = MemoryPeer()
    peer.connection.hold(b"250 first\r\n")
    await peer.connection.write(b"354 second\r\n", 1.0)
    assert peer.transport.writes == [b"250 first\r\n354 second\r\n"]


async def test_the_drain_sends_the_dot_with_the_next_group_in_one_write():
    """The client side (net/client.py): the last piece of a body and its dot
    are held and leave with the next message's pipelined MAIL, RCPT and
    DATA; with nothing to follow they still leave at once when we wait for
    the reply, or within milliseconds."""
    from fermoposta.net.client import SMTPClient

    async def body(*parts: bytes):  # type: ignore[no-untyped-def]
        for part in parts:
            yield part

    peer = MemoryPeer()
    client = SMTPClient(peer.connection)
    await client.send_body(body(b"Subject: a\r\n\r\n", b"first\r\n"))
    await client.send_group(["MAIL FROM:<a@sender.test>", "RCPT TO:<b@example.org>", "DATA"],
                            5.0)
    assert peer.transport.writes == [
        b"Subject: a\r\n\r\n",
        b"first\r\n.\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"]
    # The last message: nothing follows its dot, which still goes out.
    await client.send_body(body(b"Subject: b\r\n\r\nlast\r\n"))
    await asyncio.sleep(0.05)
    assert peer.transport.writes[-1] == b"Subject: b\r\n\r\nlast\r\n.\r\n"
    # A body bigger than the hold limit is written, not held.
    before = len(peer.transport.writes)
    await client.send_body(body(b"x" * 40_000 + b"\r\n"))
    assert peer.transport.writes[before:] == [b"x" * 40_000 + b"\r\n.\r\n"]
