"""Issue 8, defect 6: overall deadlines for one message's DATA and for a whole
session, so a client dripping bytes just inside the per-read timeouts cannot
hold a connection for ever.  Tiny deadlines keep the tests fast."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest

import fermoposta.customer.outbox as outbox_module
from conftest import write_config
from fermoposta.config import load_provider_config
from fermoposta.customer.outbox import OutboxServer, open_outbox, outbox_message_ids
from fermoposta.net.connection import Connection, start_server
from fermoposta.net.server_session import ServerSession, SessionLimits
from fermoposta.provider.server import session_limits
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.server import VerbSpec, verb_table
from fermoposta.store import SQLiteStore
from support.dialog import Dialog, open_data
from support.outbox import site_config


async def drip(d: Dialog, data: bytes, every: float) -> None:
    """Send one byte every `every` seconds (until cancelled or done)."""
    with contextlib.suppress(ConnectionError, OSError):
        for i in range(len(data)):
            await d.raw(data[i:i + 1])
            await asyncio.sleep(every)


async def expect_closed(d: Dialog) -> None:
    assert await asyncio.wait_for(d.reader.read(), 5) == b""


async def test_slow_drip_data_gets_421_and_nothing_is_stored(provider_factory, caplog):
    # Each byte comes well inside data_timeout (5 s), the whole DATA does not
    # end within data_deadline.
    p = await provider_factory(extra="[limits]\ndata_timeout = 5\ndata_deadline = 0.6\n")
    d = await open_data("127.0.0.1", p.mx[1], helo="client.test")
    sender = asyncio.create_task(drip(d, b"Subject: slow\r\n\r\n" + b"x" * 200, 0.05))
    try:
        with caplog.at_level(logging.INFO, logger="fermoposta"):
            code, lines = await d.reply(timeout=3)
        assert code == 421 and lines[0].startswith("4.4.2"), lines
        assert "DATA time limit" in lines[0]
        await expect_closed(d)
    finally:
        sender.cancel()
        await d.close()
    assert p.store.held_message_ids(["example.org"]) == []
    assert any("DATA deadline passed" in r.getMessage() and "partial message discarded"
               in r.getMessage() for r in caplog.records)


async def test_message_within_data_deadline_is_stored(provider_factory):
    p = await provider_factory(extra="[limits]\ndata_deadline = 2\n")
    d = await open_data("127.0.0.1", p.mx[1], helo="client.test")
    await drip(d, b"Subject: ok\r\n\r\nfine\r\n.\r\n", 0.01)
    lines = await d.expect(250)
    assert lines[0].startswith("2.0.0 OK queued as ")
    # The deadline is per message: a second one gets its own.
    await d.cmd("MAIL FROM:<alice@sender.test>", 250)
    await d.cmd("RCPT TO:<bob@example.org>", 250)
    await d.cmd("DATA", 354)
    await drip(d, b"Subject: ok\r\n\r\nagain\r\n.\r\n", 0.01)
    await d.expect(250)
    await d.cmd("QUIT", 221)
    await d.close()
    assert len(p.store.held_message_ids(["example.org"])) == 2


async def test_session_deadline_between_commands(provider_factory):
    p = await provider_factory(extra="[limits]\nsession_deadline = 0.6\n")
    d = await Dialog.connect(*p.mx)
    await d.expect(220)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(AssertionError, match="expected 250, got 421"):
        for _ in range(100):  # busy, never idle long enough for command_timeout
            await d.cmd("NOOP", 250)
            await asyncio.sleep(0.05)
    assert loop.time() - start < 3
    await expect_closed(d)
    await d.close()


async def test_session_deadline_during_data(provider_factory):
    p = await provider_factory(extra="[limits]\nsession_deadline = 0.8\n")
    d = await open_data("127.0.0.1", p.mx[1], helo="client.test")
    sender = asyncio.create_task(drip(d, b"Subject: slow\r\n\r\n" + b"x" * 200, 0.05))
    try:
        code, lines = await d.reply(timeout=3)
        assert code == 421 and lines[0].startswith("4.4.2"), lines
        assert "Session time limit" in lines[0]
        await expect_closed(d)
    finally:
        sender.cancel()
        await d.close()
    assert p.store.held_message_ids(["example.org"]) == []


async def test_submission_and_odmr_have_the_session_deadline(provider_factory):
    p = await provider_factory(extra="[limits]\nsession_deadline = 0.3\n")
    for address in (p.submission, p.odmr):
        d = await Dialog.connect(*address)
        await d.expect(220)
        await d.cmd("EHLO client.example.org", 250)
        code, lines = await d.reply(timeout=3)  # idle: the deadline, not command_timeout
        assert code == 421 and lines[0].startswith("4.4.2"), lines
        await expect_closed(d)
        await d.close()


async def test_outbox_listener_data_deadline(provider, certs, tmp_path, monkeypatch):
    monkeypatch.setattr(outbox_module, "OUTBOX_DATA_DEADLINE", 0.5)
    config = site_config(tmp_path, provider, certs)
    store = open_outbox(config)
    server = OutboxServer(config, store)
    await server.start()
    try:
        assert server.limits.data_deadline == 0.5
        assert server.limits.session_deadline == outbox_module.OUTBOX_SESSION_DEADLINE
        assert server.address is not None
        d = await Dialog.connect(*server.address)
        await d.expect(220)
        await d.cmd("EHLO ws1.example.org", 250)
        await d.cmd("MAIL FROM:<bob@example.org>", 250)
        await d.cmd("RCPT TO:<friend@elsewhere.test>", 250)
        await d.cmd("DATA", 354)
        sender = asyncio.create_task(drip(d, b"Subject: slow\r\n\r\n" + b"x" * 200, 0.05))
        try:
            code, lines = await d.reply(timeout=3)
            assert code == 421 and lines[0].startswith("4.4.2"), lines
            await expect_closed(d)
        finally:
            sender.cancel()
            await d.close()
        with SQLiteStore(store.path) as fresh:
            assert outbox_message_ids(fresh) == []
    finally:
        await server.stop(1.0)
        store.close()


# --- the hand-off (ODMR drain) is not under the session deadline -----------------------------

class _FlipSession(ServerSession):
    seen: ClassVar[list[float | None]] = []

    async def smtp_flip(self, arg: str) -> Reply:
        async def handoff() -> None:
            _FlipSession.seen.append(self.conn.deadline)
            await asyncio.sleep(0.5)  # longer than the session deadline
            await self.conn.write(b"220 still here\r\n", 5)

        self.handoff = handoff
        self.closing = True
        return Reply(250, None, "flipping")

    VERBS: ClassVar[Mapping[str, VerbSpec]] = verb_table(VerbSpec("FLIP", "smtp_flip"),
                                                          base=ServerSession.VERBS)


async def test_handoff_runs_without_the_session_deadline():
    limits = SessionLimits(session_deadline=0.3)

    async def handle(conn: Connection) -> None:
        await _FlipSession(conn, hostname="test", limits=limits).run()

    server = await start_server(handle, "127.0.0.1", 0)
    try:
        d = await Dialog.connect("127.0.0.1", server.sockets[0].getsockname()[1])
        await d.expect(220)
        await d.cmd("FLIP", 250)
        await d.expect(220, timeout=3)
        await d.close()
        assert _FlipSession.seen == [None]
    finally:
        server.close()
        await server.wait_closed()


# --- configuration ------------------------------------------------------------------------------

def test_deadline_keys_defaults_zero_and_errors(tmp_path: Path):
    config = load_provider_config(write_config(tmp_path, None))
    assert (config.limits.data_deadline, config.limits.session_deadline) == (600.0, 3600.0)
    limits = session_limits(config)
    assert (limits.data_deadline, limits.session_deadline) == (600.0, 3600.0)

    other = tmp_path / "b"
    other.mkdir()
    config = load_provider_config(write_config(
        other, None, extra='[limits]\ndata_deadline = "20m"\nsession_deadline = 0\n'))
    limits = session_limits(config)
    assert (limits.data_deadline, limits.session_deadline) == (1200.0, None)

    bad = tmp_path / "c"
    bad.mkdir()
    with pytest.raises(Exception, match="data_deadline"):
        load_provider_config(write_config(bad, None, extra='[limits]\ndata_deadline = "-1m"\n'))
