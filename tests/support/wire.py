"""An in-memory wire for dialog tests: no sockets, exact segments.

`MemoryPeer` is the test's end of a wire whose other end is a real
fermoposta `Connection` (the same class the listeners use), so a session
runs unchanged.  What the test writes arrives at the session the way a
socket transport hands it over (the protocol's `get_buffer`, then
`buffer_updated`), as ONE read per `send()` (up to the protocol's buffer,
256 KiB), so a test decides exactly which bytes
share a segment (the ATRN boundary, STARTTLS injection) instead of hoping
the kernel does.  `shutdown_write()` is a TCP half-close (FIN): the session
can still write.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fermoposta.net.connection import Connection, _Protocol


class _ServerTransport(asyncio.Transport):
    """The session's transport: writes go to the test's buffer."""

    def __init__(self, peer: MemoryPeer) -> None:
        super().__init__()
        self._peer = peer
        self._closing = False
        self.writes: list[bytes] = []  # each write() call, for tests of batching

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        self.writes.append(bytes(data))
        self._peer._incoming(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._peer._server_closed()
        loop = asyncio.get_running_loop()
        loop.call_soon(self._peer.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}.get(
            name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class MemoryPeer:
    """The test's end of the wire; `connection` is the session's end."""

    def __init__(self) -> None:
        self.protocol = _Protocol()
        self.transport = _ServerTransport(self)
        self.protocol.connection_made(self.transport)
        assert self.protocol.connection is not None
        self.connection: Connection = self.protocol.connection
        self.received = bytearray()
        self.server_closed = False
        self._changed = asyncio.Event()
        self._eof_sent = False

    # --- test -> session --------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Deliver `data` to the session as one segment."""
        assert not self._eof_sent, "already half-closed"
        rest = memoryview(data)
        while rest and not self.transport.is_closing():
            buffer = self.protocol.get_buffer(len(rest))
            size = min(len(buffer), len(rest))
            buffer[:size] = rest[:size]
            self.protocol.buffer_updated(size)
            rest = rest[size:]

    def shutdown_write(self) -> None:
        """A TCP half-close: the session sees EOF but may still write."""
        self._eof_sent = True
        if not self.transport.is_closing() and not self.protocol.eof_received():
            self.transport.close()

    # --- session -> test --------------------------------------------------------------
    def _incoming(self, data: bytes) -> None:
        self.received += data
        self._changed.set()

    def _server_closed(self) -> None:
        self.server_closed = True
        self._changed.set()

    async def read_reply(self, timeout: float = 5.0) -> tuple[int, list[str]]:
        """The next complete reply (all its lines) the session wrote."""
        lines: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                end = self.received.find(b"\r\n")
                if end < 0:
                    if self.server_closed:
                        raise ConnectionError(f"closed after {lines!r}")
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                text = bytes(self.received[:end]).decode("utf-8", "replace")
                del self.received[: end + 2]
                lines.append(text[4:])
                if len(text) < 4 or text[3] == " ":
                    return int(text[:3]), lines

    async def expect(self, code: int, timeout: float = 5.0) -> list[str]:
        got, lines = await self.read_reply(timeout)
        assert got == code, f"expected {code}, got {got} {lines}"
        return lines

    async def cmd(self, line: str, code: int) -> list[str]:
        self.send(line.encode() + b"\r\n")
        return await self.expect(code)

    async def read_line(self, timeout: float = 5.0) -> str:
        """The next line the session wrote (the provider's commands after a flip)."""
        async with asyncio.timeout(timeout):
            while b"\r\n" not in self.received:
                if self.server_closed:
                    raise ConnectionError(f"closed after {bytes(self.received)!r}")
                self._changed.clear()
                await self._changed.wait()
        end = self.received.find(b"\r\n")
        text = bytes(self.received[:end]).decode("utf-8", "replace")
        del self.received[: end + 2]
        return text

    async def replies(self, n: int) -> list[tuple[int, str]]:
        """The next `n` replies: (code, last line) each."""
        out = []
        for _ in range(n):
            code, lines = await self.read_reply()
            out.append((code, lines[-1]))
        return out

    async def quit(self, task: asyncio.Task[None]) -> None:
        """QUIT, its 221, and the session's end."""
        self.send(b"QUIT\r\n")
        await self.expect(221)
        await asyncio.wait_for(task, 5)
