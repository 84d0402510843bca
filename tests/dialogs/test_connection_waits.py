"""`Connection`'s waits for the peer: one lazily armed timer per connection
bounds them (see `Connection._watch`).  Each wait still ends at its own
time, whether the timer was armed for a later or an earlier wait, and a
closed connection leaves no timer behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from fermoposta.net import connection as connection_module
from fermoposta.net.connection import (
    Connection,
    ConnectionClosed,
    DeadlineExceeded,
    open_connection,
    start_server,
)
from support.connections import server_connections


@contextlib.asynccontextmanager
async def pair() -> AsyncIterator[tuple[Connection, asyncio.StreamWriter]]:
    """Our Connection (the server side) and a raw client writer."""
    async with server_connections(1) as [(conn, writer)]:
        yield conn, writer


def write_later(writer: asyncio.StreamWriter, data: bytes, delay: float
                ) -> asyncio.Task[None]:
    async def later() -> None:
        await asyncio.sleep(delay)
        writer.write(data)

    return asyncio.create_task(later())


def timers_of(conn: Connection) -> list[asyncio.TimerHandle]:
    """The loop's live timers whose callback belongs to `conn`."""
    loop = asyncio.get_running_loop()
    return [h for h in loop._scheduled  # type: ignore[attr-defined]
            if not h.cancelled() and getattr(h._callback, "__self__", None) is conn]


async def test_a_wait_ends_at_its_timeout_with_timeout_error() -> None:
    async with pair() as (conn, _):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError) as info:
            await conn.read_line(512, 0.2)
        assert not isinstance(info.value, DeadlineExceeded)
        assert 0.19 <= loop.time() - started < 1.0


async def test_a_short_wait_after_a_long_one_still_ends_on_time() -> None:
    # The timer armed for the long wait (60 s) must be brought forward.
    async with pair() as (conn, writer):
        writer.write(b"NOOP\r\n")
        assert await conn.read_line(512, 60.0) == b"NOOP\r\n"
        assert len(timers_of(conn)) <= 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await conn.read_line(512, 0.2)
        assert loop.time() - started < 1.0


async def test_a_long_wait_after_a_short_one_outlives_the_early_timer() -> None:
    # The first wait armed the timer for 0.3 s; the second wait ends later:
    # the timer fires early, re-arms, and the bytes that come at 0.5 s are read.
    async with pair() as (conn, writer):
        writer.write(b"A\r\n")
        assert await conn.read_line(512, 0.3) == b"A\r\n"

        sender = write_later(writer, b"B\r\n", 0.5)
        assert await conn.read_line(512, 5.0) == b"B\r\n"
        await sender


async def test_many_waits_share_one_timer() -> None:
    async with pair() as (conn, writer):
        for i in range(50):
            writer.write(b"X\r\n")
            await conn.read_line(512, 30.0 + i)  # each wait ends later
        assert len(timers_of(conn)) == 1


async def test_commands_then_data_arm_one_timer_at_most_a_step_ahead() -> None:
    # An SMTP session's waits: 300 s for commands, then 180 s for DATA.  The
    # timer, armed at most _WATCH_STEP ahead, is early enough for both: it
    # is armed once, not brought forward for DATA.
    async with pair() as (conn, writer):
        loop = asyncio.get_running_loop()
        writer.write(b"MAIL\r\n")
        await conn.read_line(512, 300.0)
        [first] = timers_of(conn)
        assert first.when() <= loop.time() + connection_module._WATCH_STEP
        writer.write(b"data\r\n")
        await conn.read_line(512, 180.0)
        assert timers_of(conn) == [first]


async def test_a_wait_longer_than_a_step_still_ends_at_its_own_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The timer fires every step and re-arms until the wait's own end.
    monkeypatch.setattr(connection_module, "_WATCH_STEP", 0.05)
    async with pair() as (conn, writer):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await conn.read_line(512, 0.3)
        assert 0.29 <= loop.time() - started < 1.0
        sender = write_later(writer, b"LATE\r\n", 0.2)  # after several steps
        assert await conn.read_line(512, 5.0) == b"LATE\r\n"
        await sender


async def test_a_deadline_ends_the_wait_with_its_name() -> None:
    async with pair() as (conn, writer):
        loop = asyncio.get_running_loop()
        writer.write(b"Subject: x\r\n")  # DATA that never ends
        with pytest.raises(DeadlineExceeded) as info:
            await conn.read_data(_Reader(), lambda _: None, 60.0, deadline=loop.time() + 0.2)
        assert info.value.what == "DATA"
        conn.deadline = loop.time() + 0.2
        with pytest.raises(DeadlineExceeded) as info:
            await conn.read_line(512, 60.0)
        assert info.value.what == "session"


async def test_bytes_that_come_in_time_are_read() -> None:
    async with pair() as (conn, writer):
        sender = write_later(writer, b"QUIT\r\n", 0.1)
        assert await conn.read_line(512, 1.0) == b"QUIT\r\n"
        await sender


async def test_a_closed_connection_leaves_no_timer() -> None:
    async with pair() as (conn, writer):
        writer.write(b"X\r\n")
        await conn.read_line(512, 300.0)
        assert len(timers_of(conn)) == 1
        writer.close()
        with pytest.raises(ConnectionClosed):
            await conn.read_line(512, 300.0)
        await conn.close(1.0)
        assert timers_of(conn) == []


async def test_a_client_connection_times_out_too() -> None:
    async def silent(conn: Connection) -> None:
        await asyncio.sleep(5)

    server = await start_server(silent, "127.0.0.1", 0)
    try:
        conn = await open_connection("127.0.0.1", server.sockets[0].getsockname()[1],
                                     timeout=5)
        with pytest.raises(TimeoutError):
            await conn.read_line(512, 0.2)
        conn.abort()
    finally:
        server.close()


class _Reader:
    """A DATA reader that never sees the end of data."""

    def feed(self, chunk: bytes) -> tuple[bytes, bytes | None]:
        return chunk, None
