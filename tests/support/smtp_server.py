"""A scripted SMTP server for outbound tests (independent of fermoposta's code).

It listens on 127.0.0.1, answers EHLO with chosen extensions, optionally
offers STARTTLS (with a trustme certificate) and AUTH PLAIN/LOGIN, answers
RCPT and the end of data by policies, records every transaction, and counts
concurrent connections (also across servers sharing a `Gauge`), so tests
can check concurrency limits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Gauge:
    current: int = 0
    peak: int = 0

    def up(self) -> None:
        self.current += 1
        self.peak = max(self.peak, self.current)

    def down(self) -> None:
        self.current -= 1


@dataclass
class Transaction:
    mail: str  # the whole MAIL FROM argument
    rcpts: list[str] = field(default_factory=list)  # whole RCPT TO arguments
    data: bytes = b""
    tls: bool = False
    user: str | None = None

    @property
    def sender(self) -> str:
        return self.mail.split(">", 1)[0].lstrip("<")

    @property
    def recipients(self) -> list[str]:
        return [r.split(">", 1)[0].lstrip("<") for r in self.rcpts]


@dataclass
class ScriptedSMTP:
    name: str = "sink.test"
    extensions: tuple[str, ...] = ("PIPELINING", "SIZE 10240000", "8BITMIME",
                                   "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN")
    tls: ssl.SSLContext | None = None  # offer STARTTLS with this context
    auth: tuple[str, str] | None = None  # require AUTH with these credentials
    greeting: str = "220 sink.test ESMTP"
    rcpt_policy: Callable[[str], str] = lambda rcpt: "250 2.1.5 Ok"
    data_policy: Callable[[Transaction], str] = lambda t: "250 2.0.0 Ok: queued"
    delay: float = 0.0  # before answering the end of data
    gauge: Gauge = field(default_factory=Gauge)  # this server's connections
    shared: Gauge | None = None  # connections to this and other servers
    max_sessions: int = 0  # beyond this many at once: "421 too many connections" (0 = no limit)
    refused: int = 0  # sessions refused that way
    received: list[Transaction] = field(default_factory=list)  # accepted with 2xx
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> ScriptedSMTP:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.gauge.up()
        if self.shared is not None:
            self.shared.up()
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError,
                asyncio.CancelledError):
            pass
        finally:
            self.gauge.down()
            if self.shared is not None:
                self.shared.down()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def say(text: str) -> None:
            writer.write(text.encode() + b"\r\n")
            await writer.drain()

        async def line() -> str:
            raw = await asyncio.wait_for(reader.readline(), 30)
            if not raw:
                raise ConnectionError("client gone")
            return raw.decode("utf-8", "replace").rstrip("\r\n")

        tls = False
        user: str | None = None
        txn: Transaction | None = None
        if self.max_sessions and self.gauge.current > self.max_sessions:
            self.refused += 1
            await say("421 4.7.0 sink.test Error: too many connections")
            return
        await say(self.greeting)
        if not self.greeting.startswith("2"):
            return
        while True:
            cmd = await line()
            verb = cmd.split(" ", 1)[0].upper()
            arg = cmd[len(verb):].strip()
            if verb == "EHLO":
                ext = list(self.extensions)
                if self.tls is not None and not tls:
                    ext.append("STARTTLS")
                if self.auth is not None and tls:
                    ext.append("AUTH PLAIN LOGIN")
                lines = [self.name, *ext]
                for i, text in enumerate(lines):
                    await say(f"250{'-' if i < len(lines) - 1 else ' '}{text}")
            elif verb == "HELO":
                await say(f"250 {self.name}")
            elif verb == "STARTTLS" and self.tls is not None and not tls:
                await say("220 2.0.0 Ready to start TLS")
                await writer.start_tls(self.tls)
                tls = True
            elif verb == "AUTH" and self.auth is not None:
                user = await self._auth(arg, say, line)
                if user is None:
                    await say("535 5.7.8 Authentication credentials invalid")
                else:
                    await say("235 2.7.0 Authentication successful")
            elif verb == "MAIL":
                if self.auth is not None and user is None:
                    await say("530 5.7.0 Authentication required")
                    continue
                txn = Transaction(mail=arg.split(":", 1)[1].strip(), tls=tls, user=user)
                await say("250 2.1.0 Ok")
            elif verb == "RCPT":
                if txn is None:
                    await say("503 5.5.1 Error: need MAIL command")
                    continue
                target = arg.split(":", 1)[1].strip()
                reply = self.rcpt_policy(target.split(">", 1)[0].lstrip("<"))
                if reply.startswith("2"):
                    txn.rcpts.append(target)
                await say(reply)
            elif verb == "DATA":
                if txn is None or not txn.rcpts:
                    await say("554 5.5.1 Error: no valid recipients")
                    continue
                await say("354 End data with <CR><LF>.<CR><LF>")
                chunks = []
                while True:
                    raw = await asyncio.wait_for(reader.readline(), 30)
                    if not raw:
                        raise ConnectionError("client gone in DATA")
                    if raw == b".\r\n":
                        break
                    chunks.append(raw[1:] if raw.startswith(b".") else raw)
                txn.data = b"".join(chunks)
                if self.delay:
                    await asyncio.sleep(self.delay)
                reply = self.data_policy(txn)
                if reply.startswith("2"):
                    self.received.append(txn)
                txn = None
                await say(reply)
            elif verb == "RSET":
                txn = None
                await say("250 2.0.0 Ok")
            elif verb == "NOOP":
                await say("250 2.0.0 Ok")
            elif verb == "QUIT":
                await say("221 2.0.0 Bye")
                return
            else:
                await say("502 5.5.2 Error: command not recognized")

    async def _auth(self, arg: str, say: Callable[[str], Awaitable[None]],
                    line: Callable[[], Awaitable[str]]) -> str | None:
        assert self.auth is not None
        parts = arg.split()
        mech = parts[0].upper() if parts else ""
        if mech == "PLAIN":
            if len(parts) > 1:
                blob = parts[1]
            else:
                await say("334 ")
                blob = await line()
            try:
                _, user, password = base64.b64decode(blob).decode().split("\0")
            except ValueError:
                return None
        elif mech == "LOGIN":
            await say("334 VXNlcm5hbWU6")
            user = base64.b64decode(await line()).decode()
            await say("334 UGFzc3dvcmQ6")
            password = base64.b64decode(await line()).decode()
        else:
            return None
        return user if (user, password) == self.auth else None
