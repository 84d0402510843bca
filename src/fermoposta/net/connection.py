"""One SMTP byte stream over asyncio, usable in either SMTP role.

Contract:
- `Connection` owns its receive buffer (a `LineBuffer`), so the SMTP layer
  always knows exactly which bytes it has received and not yet consumed.
  That is what makes the two dangerous moments safe:
  * STARTTLS (RFC 3207 §4.2, CVE-2011-0411 class): `start_tls()` discards
    every plaintext byte received before the handshake and returns how many
    it dropped; nothing read before TLS is ever interpreted after it.
  * the ATRN role flip (RFC 2645 §5.3): the same `Connection` object, TLS
    state included, is handed from the server machine to the client machine;
    the ODMR layer checks `buffered()` before the flip.
- Every read and write takes a timeout (RFC 5321 §4.5.3.2); expiry raises
  `TimeoutError`.  A peer that closes raises `ConnectionClosed`.
- Reads are bounded: `read_line(limit)` raises `LineTooLong` for an overlong
  line (the rest of that line is skipped), and the receive buffer pauses the
  transport above a high-water mark, so a peer cannot make us buffer without
  bound.
- Only public asyncio APIs are used (`loop.create_server`,
  `loop.create_connection`, `loop.create_unix_connection`, `loop.start_tls`).
  `open_unix_connection()` reaches a unix-domain socket (an LMTP server);
  such a connection has no peer address (`peer_ip` is "unknown").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from fermoposta.smtp.data import DataReader
from fermoposta.smtp.lines import LineBuffer, LineTooLong

__all__ = [
    "Connection",
    "ConnectionClosed",
    "LineTooLong",
    "open_connection",
    "open_unix_connection",
    "start_server",
]

HIGH_WATER = 4 * 1024 * 1024  # pause reading above this many buffered bytes


class ConnectionClosed(Exception):
    """The peer closed the connection (or it was reset)."""


class _Protocol(asyncio.Protocol):
    """Feeds received bytes into the owning Connection; handles flow control."""

    def __init__(self) -> None:
        self.connection: Connection | None = None
        self.on_made: Callable[[_Protocol], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.connection = Connection(transport, self)
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.connection is not None:
            self.connection._received(data)

    def eof_received(self) -> bool:
        if self.connection is not None:
            self.connection._closed_by_peer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connection is not None:
            self.connection._closed_by_peer()
            self.connection._wake_writers()

    def pause_writing(self) -> None:
        if self.connection is not None:
            self.connection._write_paused = True

    def resume_writing(self) -> None:
        if self.connection is not None:
            self.connection._write_paused = False
            self.connection._wake_writers()


class Connection:
    """A bidirectional SMTP stream; see the module docstring."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._buffer = LineBuffer()
        self._eof = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._write_waiters: list[asyncio.Future[None]] = []
        self._reading_paused = False
        # A unix-domain socket's names are paths (str), not (host, port) tuples.
        peer = transport.get_extra_info("peername")
        peer = peer if isinstance(peer, tuple) else None
        self.peer_ip: str = str(peer[0]) if peer else "unknown"
        self.peer_port: int = int(peer[1]) if peer else 0
        sock = transport.get_extra_info("sockname")
        sock = sock if isinstance(sock, tuple) else None
        self.local_port: int = int(sock[1]) if sock else 0

    # --- state -----------------------------------------------------------------------
    @property
    def tls_active(self) -> bool:
        return self._transport.get_extra_info("ssl_object") is not None

    @property
    def tls_version(self) -> str | None:
        obj = self._transport.get_extra_info("ssl_object")
        return obj.version() if obj is not None else None

    @property
    def tls_cipher(self) -> str | None:
        obj = self._transport.get_extra_info("ssl_object")
        if obj is None:
            return None
        cipher = obj.cipher()
        return str(cipher[0]) if cipher else None

    def peer_certificate(self) -> bytes | None:
        """DER of the peer's certificate if TLS is up and it sent a verified one."""
        obj = self._transport.get_extra_info("ssl_object")
        if obj is None:
            return None
        der = obj.getpeercert(binary_form=True)
        return bytes(der) if der else None

    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buffer)

    def discard_buffer(self) -> bytes:
        return self._buffer.take_all()

    @property
    def closed(self) -> bool:
        return self._transport.is_closing()

    # --- protocol callbacks ----------------------------------------------------------
    def _received(self, data: bytes) -> None:
        self._buffer.feed(data)
        if len(self._buffer) > HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            with contextlib.suppress(RuntimeError, AttributeError):
                self._transport.pause_reading()
        self._wake_reader()

    def _closed_by_peer(self) -> None:
        self._eof = True
        self._wake_reader()

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writers(self) -> None:
        for waiter in self._write_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._write_waiters.clear()

    def _maybe_resume_reading(self) -> None:
        if self._reading_paused and len(self._buffer) < HIGH_WATER // 2:
            self._reading_paused = False
            with contextlib.suppress(RuntimeError, AttributeError):
                self._transport.resume_reading()

    async def _wait_for_data(self) -> None:
        if self._eof:
            raise ConnectionClosed("connection closed by peer")
        self._maybe_resume_reading()
        loop = asyncio.get_running_loop()
        self._read_waiter = loop.create_future()
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None

    # --- reading ---------------------------------------------------------------------
    async def read_line(self, limit: int, timeout: float) -> bytes:
        """Next line including its terminator; see LineBuffer.next_line."""
        async with asyncio.timeout(timeout):
            while True:
                line = self._buffer.next_line(limit)
                if line is not None:
                    self._maybe_resume_reading()
                    return line
                await self._wait_for_data()

    async def read_data(
        self, reader: DataReader, sink: Callable[[bytes], object], timeout: float
    ) -> None:
        """Feed DATA bytes through `reader` into `sink` until the end-of-data line.

        `timeout` applies to each wait for more bytes (the RFC 5321 §4.5.3.2.5
        data block timeout), not to the whole transfer."""
        while True:
            chunk = self._buffer.take_all()
            if chunk:
                payload, leftover = reader.feed(chunk)
                if payload:
                    sink(payload)
                if leftover is not None:
                    if leftover:
                        self._buffer.feed(leftover)
                    self._maybe_resume_reading()
                    return
            async with asyncio.timeout(timeout):
                await self._wait_for_data()

    # --- writing ---------------------------------------------------------------------
    async def write(self, data: bytes, timeout: float) -> None:
        if self._transport.is_closing():
            raise ConnectionClosed("connection is closed")
        self._transport.write(data)
        if self._write_paused:
            async with asyncio.timeout(timeout):
                while self._write_paused and not self._transport.is_closing():
                    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    self._write_waiters.append(waiter)
                    await waiter
            if self._transport.is_closing():
                raise ConnectionClosed("connection closed while writing")

    # --- TLS -------------------------------------------------------------------------
    async def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float = 60.0,
    ) -> int:
        """Upgrade to TLS on the same connection; returns plaintext bytes discarded.

        The buffer is emptied *before* the handshake: bytes a peer pipelined
        after STARTTLS (server) or after the 220 (client) are an injection
        attempt and must never be read as protected data (RFC 3207 §6)."""
        dropped = len(self._buffer.take_all())
        loop = asyncio.get_running_loop()
        new_transport = await loop.start_tls(
            self._transport,
            self._protocol,
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            ssl_handshake_timeout=timeout,
        )
        if new_transport is None:  # pragma: no cover - only when the transport closed
            raise ConnectionClosed("connection closed during TLS handshake")
        assert isinstance(new_transport, asyncio.Transport)
        self._transport = new_transport
        return dropped

    async def close(self, timeout: float = 5.0) -> None:
        if not self._transport.is_closing():
            self._transport.close()
        # Give the transport a moment to flush (and send TLS close_notify).
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                while not self._eof:
                    await self._wait_for_data()
                    self._buffer.take_all()

    def abort(self) -> None:
        self._transport.abort()


async def open_connection(
    host: str,
    port: int,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Connection:
    """Connect as a client (implicit TLS when `ssl_context` is given)."""
    loop = asyncio.get_running_loop()
    kwargs: dict[str, Any] = {}
    if ssl_context is not None:
        kwargs["ssl"] = ssl_context
        kwargs["server_hostname"] = server_hostname or host
        kwargs["ssl_handshake_timeout"] = timeout
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_connection(_Protocol, host, port, **kwargs)
    assert protocol.connection is not None
    return protocol.connection


async def open_unix_connection(path: str | os.PathLike[str], *, timeout: float) -> Connection:
    """Connect as a client to a unix-domain stream socket (e.g. an LMTP server)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_unix_connection(_Protocol, os.fspath(path))
    assert protocol.connection is not None
    return protocol.connection


async def _run(handler: Callable[[Connection], Awaitable[None]], conn: Connection) -> None:
    await handler(conn)


async def start_server(
    handler: Callable[[Connection], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    tls_handshake_timeout: float = 60.0,
) -> asyncio.Server:
    """Listen; run `handler(connection)` as a task for every accepted peer."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def factory() -> _Protocol:
        protocol = _Protocol()

        def made(p: _Protocol) -> None:
            assert p.connection is not None
            task: asyncio.Task[None] = loop.create_task(_run(handler, p.connection))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        protocol.on_made = made
        return protocol

    kwargs: dict[str, Any] = {}
    if ssl_context is not None:
        kwargs["ssl"] = ssl_context
        kwargs["ssl_handshake_timeout"] = tls_handshake_timeout
    return await loop.create_server(factory, host, port, reuse_address=True, **kwargs)
