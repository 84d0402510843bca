"""Real loopback pairs for `Connection` tests: the server side is our
`Connection` (accepted by `start_server`), the client side a plain asyncio
writer the test drives byte by byte."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fermoposta.net.connection import Connection, start_server


@contextlib.asynccontextmanager
async def server_pairs(count: int) -> AsyncIterator[
        list[tuple[Connection, asyncio.StreamReader, asyncio.StreamWriter]]]:
    """`count` accepted Connections, each with its raw client's reader and
    writer; all closed, and the listener with them, on exit."""
    accepted: asyncio.Queue[Connection] = asyncio.Queue()
    done = asyncio.Event()

    async def handler(conn: Connection) -> None:
        await accepted.put(conn)
        await done.wait()

    server = await start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pairs: list[tuple[Connection, asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            pairs.append((await asyncio.wait_for(accepted.get(), 5), reader, writer))
        yield pairs
    finally:
        done.set()
        for conn, _, writer in pairs:
            writer.close()
            await conn.close(1.0)
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def server_connections(count: int
                             ) -> AsyncIterator[list[tuple[Connection, asyncio.StreamWriter]]]:
    """`count` accepted Connections, each with its raw client writer; all
    closed, and the listener with them, on exit."""
    async with server_pairs(count) as pairs:
        yield [(conn, writer) for conn, _, writer in pairs]
