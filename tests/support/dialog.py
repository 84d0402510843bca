"""A deliberately independent raw-socket SMTP client for dialog tests.

It does not use fermoposta's engine, so a bug there cannot hide itself: it
writes exactly the bytes a test gives and parses replies by hand.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl


class Dialog:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                      server_hostname: str | None = None) -> Dialog:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl_context, server_hostname=server_hostname if ssl_context else None
        )
        return cls(reader, writer)

    async def raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode()
        await self.raw(data + b"\r\n")

    async def reply(self, timeout: float = 10.0) -> tuple[int, list[str]]:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionError(f"closed after {lines!r}")
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if len(text) < 4 or text[3] == " ":
                return int(text[:3]), lines

    async def expect(self, code: int, timeout: float = 10.0) -> list[str]:
        got, lines = await self.reply(timeout)
        assert got == code, f"expected {code}, got {got} {lines}"
        return lines

    async def cmd(self, line: str | bytes, code: int, timeout: float = 10.0) -> list[str]:
        await self.send(line)
        return await self.expect(code, timeout)

    async def starttls(self, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        await self.cmd("STARTTLS", 220)
        await self.writer.start_tls(context, server_hostname=server_hostname)

    async def auth_plain(self, user: str, password: str, code: int = 235) -> None:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        await self.cmd(f"AUTH PLAIN {token}", code)

    async def closed(self, timeout: float = 10.0) -> bool:
        """True once the server has closed the connection (EOF)."""
        data = await asyncio.wait_for(self.reader.read(), timeout)
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


async def open_data(host: str, port: int, *, sender: str = "alice@sender.test",
                    recipient: str = "bob@example.org",
                    helo: str = "client.sender.test") -> Dialog:
    """A dialog up to DATA's 354, for a test that sends the data itself."""
    d = await Dialog.connect(host, port)
    await d.expect(220)
    await d.cmd(f"EHLO {helo}", 250)
    await d.cmd(f"MAIL FROM:<{sender}>", 250)
    await d.cmd(f"RCPT TO:<{recipient}>", 250)
    await d.cmd("DATA", 354)
    return d


async def send_mail(host: str, port: int, sender: str, recipients: list[str], body: bytes,
                    *, helo: str = "client.test") -> tuple[int, list[str]]:
    """One SMTP transaction; returns the final reply to the DATA dot."""
    d = await Dialog.connect(host, port)
    try:
        await d.expect(220)
        await d.cmd(f"EHLO {helo}", 250)
        await d.cmd(f"MAIL FROM:<{sender}>", 250)
        for rcpt in recipients:
            await d.cmd(f"RCPT TO:<{rcpt}>", 250)
        await d.cmd("DATA", 354)
        stuffed = body.replace(b"\r\n.", b"\r\n..")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        await d.raw(stuffed + b".\r\n")
        result = await d.reply()
        await d.cmd("QUIT", 221)
        return result
    finally:
        await d.close()
