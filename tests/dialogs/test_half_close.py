"""Issue 8, defect 1: a client that half-closes (FIN after its last command)
still gets every reply, on every listener, and its message is stored once.

The clients are raw blocking sockets (run in a thread): they send exactly the
bytes given, call shutdown(SHUT_WR) as a real MTA does after pipelining
".\\r\\nQUIT\\r\\n" (RFC 2920 §3.1), then read until the server closes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from conftest import PASSWORD
from fermoposta.customer.outbox import OutboxServer, open_outbox, outbox_message_ids
from fermoposta.net.client import SMTPClient
from fermoposta.net.connection import ConnectionClosed, open_connection
from fermoposta.store import SQLiteStore
from support.outbox import BODY as OUTBOX_BODY
from support.outbox import site_config

BODY = b"Subject: half-close\r\n\r\nsent, then FIN\r\n"


class RawClient:
    """A blocking socket client; every method is run through `asyncio.to_thread`."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.pending = b""

    def reply(self) -> str:
        """One (possibly multi-line) reply, as text."""
        lines = []
        while True:
            while b"\r\n" not in self.pending:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r} {self.pending!r}")
                self.pending += chunk
            line, self.pending = self.pending.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] == b" ":
                return "\n".join(lines)

    def cmd(self, line: bytes) -> str:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def finish(self, data: bytes) -> bytes:
        """Send `data`, half-close, and read everything until the server closes."""
        self.sock.sendall(data)
        self.sock.shutdown(socket.SHUT_WR)
        received = self.pending
        while True:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            received += chunk
        self.sock.close()
        return received


async def raw_client(port: int) -> RawClient:
    client = await asyncio.to_thread(RawClient, port)
    assert (await asyncio.to_thread(client.reply)).startswith("220 ")
    return client


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), 15)


def queue_id_of(tail: bytes) -> str:
    lines = tail.decode().split("\r\n")
    assert lines[0].startswith("250 2.0.0 OK queued as "), tail
    assert lines[1].startswith("221 "), tail
    assert lines[2:] == [""], tail  # nothing more, then the close
    return lines[0].rsplit(" ", 1)[1]


async def mail_then_half_close(client: RawClient, sender: str, rcpt: str,
                               body: bytes) -> bytes:
    assert (await call(client.cmd, f"MAIL FROM:<{sender}>".encode())).startswith("250")
    assert (await call(client.cmd, f"RCPT TO:<{rcpt}>".encode())).startswith("250")
    assert (await call(client.cmd, b"DATA")).startswith("354")
    tail: bytes = await call(client.finish, body + b".\r\nQUIT\r\n")
    return tail


async def test_mx_half_close_after_final_dot_and_quit(provider):
    client = await raw_client(provider.mx[1])
    assert (await call(client.cmd, b"EHLO mta.sender.test")).startswith("250")
    tail = await mail_then_half_close(client, "alice@sender.test", "bob@example.org", BODY)
    queue_id = queue_id_of(tail)
    assert provider.store.held_message_ids(["example.org"]) == [queue_id]  # exactly once
    assert b"".join(provider.store.read_body(queue_id)).endswith(BODY)


async def test_mx_whole_dialog_pipelined_then_half_close(provider):
    # Everything in one write (as after a PIPELINING EHLO), then FIN.
    client = await raw_client(provider.mx[1])
    assert (await call(client.cmd, b"EHLO mta.sender.test")).startswith("250")
    tail: bytes = await call(client.finish,
                             b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@example.org>\r\n"
                             b"DATA\r\n" + BODY + b".\r\nQUIT\r\n")
    lines = tail.decode().split("\r\n")
    assert [line[:3] for line in lines[:-1]] == ["250", "250", "354", "250", "221"], tail
    queue_id = lines[3].rsplit(" ", 1)[1]
    assert provider.store.held_message_ids(["example.org"]) == [queue_id]


async def test_mx_half_close_mid_data_stores_nothing(provider):
    # The FIN ends the input before the final dot: nothing is kept and the
    # session just closes (RFC 5321 §3.8), even though it could still write.
    client = await raw_client(provider.mx[1])
    assert (await call(client.cmd, b"EHLO mta.sender.test")).startswith("250")
    assert (await call(client.cmd, b"MAIL FROM:<alice@sender.test>")).startswith("250")
    assert (await call(client.cmd, b"RCPT TO:<bob@example.org>")).startswith("250")
    assert (await call(client.cmd, b"DATA")).startswith("354")
    assert await call(client.finish, b"Subject: cut\r\n\r\nno end") == b""
    assert provider.store.held_message_ids(["example.org"]) == []


def cram_md5(challenge_line: str) -> bytes:
    assert challenge_line.startswith("334 "), challenge_line
    challenge = base64.b64decode(challenge_line[4:])
    digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
    return base64.b64encode(f"acme {digest}".encode())


async def test_submission_half_close(provider):
    # Cleartext submission with CRAM-MD5 (PLAIN and LOGIN need TLS).
    client = await raw_client(provider.submission[1])
    assert (await call(client.cmd, b"EHLO ws1.example.org")).startswith("250")
    challenge = await call(client.cmd, b"AUTH CRAM-MD5")
    assert (await call(client.cmd, cram_md5(challenge))).startswith("235")
    tail = await mail_then_half_close(client, "bob@example.org", "x@other.test", BODY)
    queue_id = queue_id_of(tail)
    assert provider.store.held_message_ids(["other.test"]) == [queue_id]


async def test_odmr_ehlo_quit_pipelined_then_half_close(provider):
    client = await raw_client(provider.odmr[1])
    tail: bytes = await call(client.finish, b"EHLO mail.example.org\r\nQUIT\r\n")
    lines = tail.decode().split("\r\n")
    assert lines[0].startswith("250-"), tail
    assert "ATRN" in tail.decode() or "AUTH" in tail.decode()
    assert lines[-2].startswith("221 "), tail
    assert lines[-1] == ""


async def test_odmr_auth_then_half_close_gets_every_reply(provider):
    client = await raw_client(provider.odmr[1])
    assert (await call(client.cmd, b"EHLO mail.example.org")).startswith("250")
    challenge = await call(client.cmd, b"AUTH CRAM-MD5")
    tail: bytes = await call(client.finish, cram_md5(challenge) + b"\r\nNOOP\r\nQUIT\r\n")
    assert [line[:3] for line in tail.decode().split("\r\n")[:-1]] == ["235", "250", "221"]


@pytest.fixture
async def outbox_server(provider, certs, tmp_path) -> AsyncIterator[OutboxServer]:
    config = site_config(tmp_path, provider, certs)
    store = open_outbox(config)
    server = OutboxServer(config, store)
    await server.start()
    yield server
    await server.stop(1.0)
    store.close()


async def test_outbox_listener_half_close(outbox_server):
    assert outbox_server.address is not None
    client = await raw_client(outbox_server.address[1])
    assert (await call(client.cmd, b"EHLO ws1.example.org")).startswith("250")
    tail = await mail_then_half_close(client, "bob@example.org", "friend@elsewhere.test",
                                      OUTBOX_BODY)
    queue_id = queue_id_of(tail)
    with SQLiteStore(outbox_server.store.path) as fresh:
        assert outbox_message_ids(fresh) == [queue_id]


# --- TLS: asyncio cannot write after the peer's EOF; then nothing is stored ------------------

class TLSRawClient(RawClient):
    """STARTTLS, then the same dialog; `finish` sends a bare TCP FIN (no
    close_notify) and goes on reading TLS records."""

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.cmd(b"STARTTLS").startswith("220")
        assert not self.pending
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def finish(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        # socket.socket.shutdown on the SSL socket's descriptor: SSLSocket's
        # own shutdown() would drop the TLS state we still want to read with.
        socket.socket.shutdown(self.sock, socket.SHUT_WR)
        received = self.pending
        try:
            while chunk := self.sock.recv(4096):
                received += chunk
        except (OSError, ssl.SSLError):
            pass
        self.sock.close()
        return received


async def test_starttls_half_close_with_bare_fin(provider, certs):
    """Over TLS a bare FIN (no close_notify) is a half-close too: asyncio's SSL
    protocol would shut down on it and drop the 250 and the 221; the
    connection holds it back until the replies are written."""
    client = await asyncio.to_thread(TLSRawClient, provider.mx[1])
    assert (await call(client.reply)).startswith("220 ")
    assert (await call(client.cmd, b"EHLO mta.sender.test")).startswith("250")
    await call(client.starttls, certs.client_context())
    tail = await mail_then_half_close_after_ehlo(client)
    queue_id = queue_id_of(tail)
    assert provider.store.held_message_ids(["example.org"]) == [queue_id]


async def test_implicit_tls_odmr_half_close(provider_factory, certs):
    p = await provider_factory(odmr_tls=True)
    assert p.odmr_tls is not None

    def dialog() -> bytes:
        raw = socket.create_connection(p.odmr_tls, timeout=10)
        sock = certs.client_context().wrap_socket(raw, server_hostname="localhost")
        sock.sendall(b"EHLO mail.example.org\r\nQUIT\r\n")
        socket.socket.shutdown(sock, socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except (OSError, ssl.SSLError):
            pass
        sock.close()
        return received

    lines = (await call(dialog)).decode().split("\r\n")
    assert lines[0].startswith("220 "), lines
    assert lines[1].startswith("250-"), lines
    assert lines[-2].startswith("221 ") and lines[-1] == "", lines


async def mail_then_half_close_after_ehlo(client: RawClient) -> bytes:
    assert (await call(client.cmd, b"EHLO mta.sender.test")).startswith("250")
    return await mail_then_half_close(client, "alice@sender.test", "bob@example.org", BODY)


# --- the client role: a server that replies and closes is still read -------------------------

async def _serve_once(payload: bytes, *, half_close: bool) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        if half_close:
            writer.write_eof()
            await reader.read()  # read what the client sends after our FIN
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("half_close", [False, True])
async def test_client_reads_reply_sent_with_fin(half_close):
    server, port = await _serve_once(b"220 hi\r\n421 4.3.2 bye\r\n", half_close=half_close)
    try:
        conn = await open_connection("127.0.0.1", port, timeout=5)
        client = SMTPClient(conn)
        assert (await client.read_reply(5)).code == 220
        assert (await client.read_reply(5)).code == 421
        with pytest.raises(ConnectionClosed):
            await client.read_reply(5)
        assert conn.closed
        await asyncio.wait_for(conn.close(2.0), 3)
    finally:
        server.close()
        await server.wait_closed()


async def test_close_flushes_to_a_half_closed_peer_and_is_bounded():
    """close() waits for what was written to go out; a peer that never reads
    cannot make it wait beyond its timeout."""
    got = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write_eof()
        got.set_result(await reader.read())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        conn = await open_connection("127.0.0.1", server.sockets[0].getsockname()[1], timeout=5)
        with pytest.raises(ConnectionClosed):
            await conn.read_line(512, 5)
        big = b"x" * (2 * 1024 * 1024)
        await conn.write(big, 5)  # after the peer's FIN: still writable
        await conn.close(5.0)
        assert len(await asyncio.wait_for(got, 5)) == len(big)
    finally:
        server.close()
        await server.wait_closed()

    stalled = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stalled.wait()
        writer.close()

    server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
    try:
        conn = await open_connection("127.0.0.1", server.sockets[0].getsockname()[1], timeout=5)
        with pytest.raises(TimeoutError):
            await conn.write(b"y" * (64 * 1024 * 1024), 0.5)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await conn.close(0.5)
        assert loop.time() - start < 2.0
    finally:
        stalled.set()
        server.close()
        await server.wait_closed()


async def test_implicit_tls_bad_handshake_is_dropped_and_logged(provider_factory, caplog):
    # Implicit TLS is now a plain accept plus start_tls: a client speaking
    # plaintext SMTP gets no greeting, the failure is logged, the socket closed.
    p = await provider_factory(odmr_tls=True)
    assert p.odmr_tls is not None
    reader, writer = await asyncio.open_connection(*p.odmr_tls)
    try:
        with caplog.at_level(logging.INFO, logger="fermoposta"):
            writer.write(b"EHLO plaintext.example\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            await asyncio.sleep(0.05)
    finally:
        writer.close()
    assert any("TLS handshake failed from [127.0.0.1]" in r.getMessage()
               for r in caplog.records)
