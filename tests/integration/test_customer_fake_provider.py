"""The customer against a scripted fake provider: replies our provider never
sends (530, 502, garbage, slow ATRN) and a provider that drops mid-DATA."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import mailbox
from collections.abc import Awaitable, Callable

from fermoposta.customer.config import load_customer_config
from fermoposta.customer.pull import pull_once
from support.customer_config import write_customer_config

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_provider(after_auth: Script):
    handlers: list[asyncio.Task] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            writer.write(b"220 fake.provider ESMTP\r\n")
            await reader.readline()  # EHLO
            writer.write(b"250-fake.provider\r\n250-AUTH CRAM-MD5\r\n250 ATRN\r\n")
            await reader.readline()  # AUTH CRAM-MD5
            writer.write(b"334 " + base64.b64encode(b"<1.2@fake.provider>") + b"\r\n")
            await reader.readline()
            writer.write(b"235 2.7.0 ok\r\n")
            await after_auth(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        # Let each script finish reading what the customer sent last.
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await server.wait_closed()


def cfg_for(tmp_path, port, **kw):
    return load_customer_config(write_customer_config(
        tmp_path, port=port, password="pw", ca_file=None, tls="none",
        mechanisms=("CRAM-MD5",), **kw))


def atrn_reply(line: bytes, delay: float = 0.0) -> Script:
    async def script(reader, writer):
        assert (await reader.readline()).startswith(b"ATRN")
        await asyncio.sleep(delay)
        writer.write(line)
        await writer.drain()
        if (await reader.readline()).startswith(b"QUIT"):
            writer.write(b"221 bye\r\n")
            await writer.drain()
    return script


async def test_530_to_atrn_is_an_auth_failure(tmp_path):
    async with fake_provider(atrn_reply(b"530 5.7.0 Authentication required\r\n")) as port:
        summary = await pull_once(cfg := cfg_for(tmp_path, port), cfg.pulls[0])
    assert summary.exit_code == 77


async def test_502_to_atrn_is_a_protocol_failure(tmp_path):
    async with fake_provider(atrn_reply(b"502 5.5.1 no\r\n")) as port:
        summary = await pull_once(cfg := cfg_for(tmp_path, port), cfg.pulls[0])
    assert summary.exit_code == 76


async def test_garbage_reply_is_a_protocol_failure(tmp_path):
    async with fake_provider(atrn_reply(b"2x0 what\r\n")) as port:
        summary = await pull_once(cfg := cfg_for(tmp_path, port), cfg.pulls[0])
    assert summary.exit_code == 76


async def test_slow_atrn_reply_within_timeout_succeeds(tmp_path):
    async with fake_provider(atrn_reply(b"453 You have no mail\r\n", delay=1.5)) as port:
        summary = await pull_once(cfg := cfg_for(tmp_path, port, atrn_timeout="5s"),
                                  cfg.pulls[0])
    assert summary.exit_code == 0 and not summary.had_mail
    async with fake_provider(atrn_reply(b"453 You have no mail\r\n", delay=2.5)) as port:
        summary = await pull_once(cfg := cfg_for(tmp_path, port, atrn_timeout="1s"),
                                  cfg.pulls[0])
    assert summary.exit_code == 69 and "timeout" in str(summary.error)


def maildir_files(tmp_path):
    root = tmp_path / "mail"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def test_provider_dropping_mid_data_stores_nothing(tmp_path):
    async def script(reader, writer):
        await reader.readline()  # ATRN
        # Speak early: EHLO right behind the 250, before the customer's greeting.
        writer.write(b"250 OK reversing\r\nEHLO fake.provider\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"220 ")
        assert (await reader.readline()).startswith(b"250-")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        writer.write(b"MAIL FROM:<a@sender.test>\r\n")
        assert (await reader.readline()).startswith(b"250")
        writer.write(b"RCPT TO:<bob@example.org>\r\n")
        assert (await reader.readline()).startswith(b"250")
        writer.write(b"DATA\r\n")
        assert (await reader.readline()).startswith(b"354")
        writer.write(b"Subject: half\r\n\r\nthis message never ends\r\n")
        await writer.drain()
        writer.transport.abort()

    async with fake_provider(script) as port:
        summary = await pull_once(cfg := cfg_for(tmp_path, port), cfg.pulls[0])
    assert summary.exit_code == 0 and summary.received == []
    assert maildir_files(tmp_path) == []


async def test_reversed_session_refusals(tmp_path):
    transcript: list[bytes] = []

    async def script(reader, writer):
        await reader.readline()  # ATRN
        writer.write(b"250 OK\r\n")
        await reader.readline()  # 220
        for line in (b"MAIL FROM:<a@sender.test>", b"EHLO fake.provider",
                     b"MAIL FROM:<a@sender.test>", b"RCPT TO:<x@elsewhere.test>",
                     b"RCPT TO:<bob@example.org>", b"ATRN", b"TURN", b"ETRN example.org",
                     b"DATA"):
            writer.write(line + b"\r\n")
            while True:
                reply = await reader.readline()
                transcript.append(reply)
                if reply[3:4] == b" ":
                    break
        writer.write(b"Subject: ok\r\n\r\n..dotted\r\n.\r\nQUIT\r\n")
        transcript.append(await reader.readline())
        transcript.append(await reader.readline())

    async with fake_provider(script) as port:
        summary = await pull_once(cfg := cfg_for(tmp_path, port), cfg.pulls[0])
    codes = [line[:3] for line in transcript if line[3:4] == b" "]
    assert codes == [b"503", b"250", b"250", b"550", b"250", b"502", b"502", b"502", b"354",
                     b"250", b"221"]
    assert summary.exit_code == 0 and len(summary.received) == 1
    box = mailbox.Maildir(str(tmp_path / "mail/example.org/bob/Maildir"), create=False)
    [message] = list(box)
    assert message.get_payload() in (".dotted\n", ".dotted\r\n")
