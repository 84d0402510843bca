"""`Connection`'s reads go through one receive buffer per thread
(`connection.RECEIVE_SIZE`, a `BufferedProtocol`): every read is copied out
before the next one can reuse it, on plain TCP and under TLS, so what one
connection received is never overwritten by another's bytes, and data
larger than the buffer arrives whole and in order."""

from __future__ import annotations

import asyncio
import os
import ssl
import threading

import pytest

from conftest import Certs
from fermoposta.net import connection as connection_module
from fermoposta.net.connection import Connection, open_connection, start_server
from support.connections import server_connections


async def until_buffered(conn: Connection, size: int) -> None:
    for _ in range(500):
        if conn.buffered() >= size:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {conn.buffered()} of {size} bytes arrived")


async def test_a_kept_partial_line_survives_another_connections_reads() -> None:
    async with server_connections(2) as [(first, first_client), (second, second_client)]:
        first_client.write(b"MAIL FROM:<a@example.org>")  # no line end yet: kept as fed
        await until_buffered(first, 25)
        # The other connection's reads fill the shared buffer from its start.
        filler = os.urandom(connection_module.RECEIVE_SIZE // 2)
        second_client.write(filler)
        await until_buffered(second, len(filler))
        got = bytearray()
        await second.read_chunk(len(filler), got.extend, 5.0)
        assert bytes(got) == filler
        first_client.write(b" SIZE=10\r\n")
        assert await first.read_line(1000, 5.0) == b"MAIL FROM:<a@example.org> SIZE=10\r\n"


async def test_more_than_the_buffer_arrives_whole_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The transport reads into our buffer (asyncio's plain path would
    # allocate 256 KiB for every read instead).
    lent: list[int] = []
    get_buffer = connection_module._Protocol.get_buffer

    def counted(self: connection_module._Protocol, sizehint: int) -> memoryview:
        lent.append(sizehint)
        return get_buffer(self, sizehint)

    monkeypatch.setattr(connection_module._Protocol, "get_buffer", counted)
    data = os.urandom(4 * connection_module.RECEIVE_SIZE + 12345)
    async with server_connections(1) as [(conn, client)]:
        client.write(data + b"NEXT\r\n")
        got = bytearray()
        await conn.read_chunk(len(data), got.extend, 10.0)
        assert bytes(got) == data
        assert await conn.read_line(100, 5.0) == b"NEXT\r\n"
    assert len(lent) >= 5  # at least one read a buffer's worth


async def test_reads_under_tls_arrive_whole(certs: Certs) -> None:
    data = os.urandom(3 * connection_module.RECEIVE_SIZE + 777)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(certs.cert_file), str(certs.key_file))
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handler(conn: Connection) -> None:
        await conn.start_tls(server_context, server_side=True, timeout=5.0)
        got = bytearray()
        await conn.read_chunk(len(data), got.extend, 10.0)
        line = await conn.read_line(100, 5.0)
        received.set_result(bytes(got) + line)
        await conn.close(1.0)

    server = await start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await open_connection("127.0.0.1", port, timeout=5.0)
    try:
        await client.start_tls(certs.client_context(), server_side=False,
                               server_hostname="localhost", timeout=5.0)
        await client.write(data + b"NEXT\r\n", 10.0)
        assert await asyncio.wait_for(received, 10) == data + b"NEXT\r\n"
    finally:
        await client.close(1.0)
        server.close()
        await server.wait_closed()


def test_each_thread_has_its_own_buffer() -> None:
    # Two event loops in two threads (the tests' providers and customers
    # sometimes do) must never read into one buffer at the same time.
    views: list[memoryview] = []

    def look() -> None:
        views.append(connection_module._Protocol().get_buffer(-1))

    thread = threading.Thread(target=look)
    thread.start()
    thread.join()
    look()
    assert len(views) == 2
    assert views[0].obj is not views[1].obj
    assert all(len(view) == connection_module.RECEIVE_SIZE for view in views)
