"""The short ways the intake takes when nothing has to wait (issue 10):
`Connection.write_now` writes at once unless the transport pushes back, a
plain connection with nothing left to send closes without a timer, a body
stays in memory until it outgrows `SPOOL_MEMORY`, and a reply sent again
and again (a greeting, a returning client's EHLO reply) is rendered once."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import ssl
import threading
from collections.abc import AsyncIterator

import pytest

from fermoposta.net import connection as connection_module
from fermoposta.net import incoming
from fermoposta.net.connection import Connection, ConnectionClosed, start_server
from fermoposta.net.incoming import IncomingBody
from fermoposta.smtp.reply import Reply, cached_reply
from support.connections import server_pairs


@contextlib.asynccontextmanager
async def pair() -> AsyncIterator[tuple[Connection, asyncio.StreamReader,
                                        asyncio.StreamWriter]]:
    """Our Connection (the server side) and the raw client's reader and writer."""
    async with server_pairs(1) as [(conn, reader, writer)]:
        yield conn, reader, writer


async def test_write_now_writes_at_once_and_says_so() -> None:
    async with pair() as (conn, reader, _):
        assert conn.hold(b"250 held\r\n")
        assert conn.write_now(b"250 now\r\n")
        # The held reply goes first, in the same write.
        assert await asyncio.wait_for(reader.readexactly(19), 5) == b"250 held\r\n250 now\r\n"


async def test_write_now_leaves_a_pushed_back_write_to_write() -> None:
    async with pair() as (conn, _, writer):
        # The client never reads: the transport's buffer fills and pushes back.
        with pytest.raises(TimeoutError):
            await conn.write(b"x" * (64 * 1024 * 1024), 0.5)
        buffered = conn._transport.get_write_buffer_size()
        assert not conn.write_now(b"250 late\r\n")
        assert conn._transport.get_write_buffer_size() == buffered  # nothing written
        writer.transport.abort()


async def test_write_now_refuses_once_the_connection_is_closing() -> None:
    async with pair() as (conn, _, _):
        conn._transport.close()
        assert not conn.write_now(b"250 too late\r\n")
        with pytest.raises(ConnectionClosed):
            await conn.write(b"250 too late\r\n", 1.0)


async def test_a_plain_close_with_nothing_to_send_needs_no_timer(monkeypatch) -> None:
    def no_timer(delay: float | None) -> None:
        raise AssertionError("close() armed a timer")

    async with pair() as (conn, reader, _):
        assert conn.write_now(b"221 Bye\r\n")
        await asyncio.sleep(0.05)  # the kernel took it: nothing left in the transport
        monkeypatch.setattr(connection_module.asyncio, "timeout", no_timer)
        await asyncio.wait_for(conn.close(5.0), 2)
        monkeypatch.undo()
        assert conn.closed
        assert await asyncio.wait_for(reader.read(), 5) == b"221 Bye\r\n"  # then EOF


async def test_a_close_with_bytes_still_to_send_stays_bounded() -> None:
    async with pair() as (conn, _, writer):
        with pytest.raises(TimeoutError):
            await conn.write(b"y" * (64 * 1024 * 1024), 0.5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # The client never reads: aborted after the bound.
        await asyncio.wait_for(conn.close(0.3), 5)
        assert loop.time() - started < 2.0
        assert conn.closed
        writer.transport.abort()


async def test_a_body_stays_in_memory_until_it_outgrows_the_limit(monkeypatch) -> None:
    monkeypatch.setattr(incoming, "SPOOL_MEMORY", 100)
    body = IncomingBody(lambda spool: None)
    body.write(b"a" * 60)
    body.write(b"b" * 40)  # exactly the limit: still in memory
    assert isinstance(body.spool, io.BytesIO)
    body.write(b"c" * 10)
    assert not isinstance(body.spool, io.BytesIO)
    assert body.spool.fileno() >= 0  # a file of its own now
    body.write(b"d" * 5)
    spool, size = await body.ready()
    assert size == 115
    assert spool.read() == b"a" * 60 + b"b" * 40 + b"c" * 10 + b"d" * 5
    await body.close()
    assert spool.closed


async def test_a_body_in_memory_is_read_whole() -> None:
    body = IncomingBody(lambda spool: None)
    body.write(b"Subject: x\r\n\r\nhello\r\n")
    spool, size = await body.ready()
    assert isinstance(spool, io.BytesIO)
    assert (size, spool.read()) == (21, b"Subject: x\r\n\r\nhello\r\n")
    await body.close()


async def test_the_stage_is_asked_for_once_the_body_is_in_a_file(monkeypatch) -> None:
    monkeypatch.setattr(incoming, "SPOOL_MEMORY", 10)
    asked: list[object] = []

    def stage_for(spool: object) -> None:
        asked.append(spool)

    body = IncomingBody(stage_for)
    body.write(b"x" * 10)
    assert asked == []
    body.write(b"y")
    assert asked == [body.spool] and not isinstance(body.spool, io.BytesIO)
    body.write(b"z" * 100)
    assert len(asked) == 1  # once
    await body.close()


def test_a_reply_made_again_is_the_same_rendered_reply() -> None:
    first = cached_reply(250, None, "mx.example Hello c.example [192.0.2.1]", "SIZE 10",
                         "PIPELINING")
    again = cached_reply(250, None, "mx.example Hello c.example [192.0.2.1]", "SIZE 10",
                         "PIPELINING")
    assert again is first
    assert first == Reply(250, None, "mx.example Hello c.example [192.0.2.1]", "SIZE 10",
                          "PIPELINING")
    assert first.to_bytes() == (b"250-mx.example Hello c.example [192.0.2.1]\r\n"
                                b"250-SIZE 10\r\n250 PIPELINING\r\n")
    other = cached_reply(250, None, "mx.example Hello d.example [192.0.2.1]", "SIZE 10",
                         "PIPELINING")
    assert other is not first and other.lines[0].endswith("d.example [192.0.2.1]")


@pytest.mark.parametrize(
    ("reply", "wire", "plain"),
    [
        (Reply(250, None, "a", "b ", "c"), b"250-a\r\n250-b\r\n250 c\r\n",
         b"250-a\r\n250-b\r\n250 c\r\n"),
        (Reply(250, "2.0.0", ""), b"250 2.0.0\r\n", b"250 \r\n"),
        (Reply(250, "2.0.0", "x", "y"), b"250-2.0.0 x\r\n250 2.0.0 y\r\n",
         b"250-x\r\n250 y\r\n"),
        (Reply(550, None, "\u00e9\udc80"), b"550 \xc3\xa9?\r\n", b"550 \xc3\xa9?\r\n"),
    ],
)
def test_replies_render_each_line_with_its_separator(reply: Reply, wire: bytes,
                                                     plain: bytes) -> None:
    assert reply.to_bytes(enhanced_codes=False) == plain
    assert reply.to_bytes() == wire
    assert reply.to_bytes() == wire  # the kept rendering


async def test_a_tls_close_stays_bounded_when_the_peer_never_answers(certs) -> None:
    """TLS's close waits for the peer's close_notify (asyncio allows it 30 s):
    no short way there, the close is bounded as before."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(certs.cert_file), str(certs.key_file))
    accepted: asyncio.Queue[Connection] = asyncio.Queue()
    done = asyncio.Event()

    async def handler(conn: Connection) -> None:
        await accepted.put(conn)
        await done.wait()

    server = await start_server(handler, "127.0.0.1", 0, ssl_context=server_ctx)
    port = server.sockets[0].getsockname()[1]
    release = threading.Event()

    def silent_client() -> None:  # handshakes, then neither reads nor closes
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                certs.client_context().wrap_socket(raw, server_hostname="localhost"):
            release.wait(10)

    client = asyncio.create_task(asyncio.to_thread(silent_client))
    try:
        conn = await asyncio.wait_for(accepted.get(), 5)
        assert conn.tls_active
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(conn.close(0.3), 5)
        assert loop.time() - started < 2.0
    finally:
        release.set()
        done.set()
        await client
        server.close()
        await server.wait_closed()
