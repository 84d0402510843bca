"""SMTP relay delivery against Postfix's smtp-sink (a real local MTA front end)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from fermoposta.customer.delivery.base import DeliveryOutcome, LocalEnvelope, LocalRecipient
from fermoposta.customer.delivery.smtp import SMTPRelayDelivery
from peers import free_port, sink_messages, smtp_sink

pytestmark = pytest.mark.peers

HOSTNAME = "mail.example.org"
BODY = (b"Received: from mx.provider.test by mail.example.org; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
        b"From: alice@sender.test\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\n"
        b"Hello.\r\n.dot line\r\n")


async def deliver(delivery: SMTPRelayDelivery, address: str = "bob@example.org",
                  body: bytes = BODY, **flags: bool) -> DeliveryOutcome:
    local, domain = address.rsplit("@", 1)
    envelope = LocalEnvelope("alice@sender.test", (LocalRecipient(address, local, domain),),
                             queue_hint="TESTQ", **flags)
    return await delivery.deliver(envelope, io.BytesIO(body), len(body))


async def test_relayed_and_mirrored(tmp_path: Path) -> None:
    sink = tmp_path / "sink"
    with smtp_sink(sink) as port:
        delivery = SMTPRelayDelivery(("127.0.0.1", port), hostname=HOSTNAME)
        assert delivery.max_recipients is None  # the session bounds it (100)
        assert await delivery.check_recipient(LocalRecipient("x@y.z", "x", "y.z")) is None
        outcome = await deliver(delivery, body_8bit=True)
        await delivery.close()
    assert (outcome.reply.code, outcome.reply.enhanced) == (250, "2.0.0")
    assert outcome.where == f"smtp:127.0.0.1:{port}"
    [dumped] = sink_messages(sink)
    assert b"X-Client-Proto: ESMTP" in dumped
    assert b"X-Helo-Args: mail.example.org\n" in dumped
    assert b"X-Mail-Args: <alice@sender.test> BODY=8BITMIME\n" in dumped
    assert b"X-Rcpt-Args: <bob@example.org>\n" in dumped
    assert BODY.replace(b"\r\n", b"\n") in dumped  # dot-stuffing undone exactly


async def test_hard_bounce_on_rcpt_is_mirrored(tmp_path: Path) -> None:
    with smtp_sink(tmp_path / "sink", "-f", "RCPT", "-B", "550 5.1.1 no such user") as port:
        outcome = await deliver(SMTPRelayDelivery(("127.0.0.1", port), hostname=HOSTNAME))
    assert (outcome.reply.code, outcome.reply.enhanced) == (550, "5.1.1")
    assert outcome.reply.text == "5.1.1 no such user"
    assert not any(sink_messages(tmp_path / "sink"))  # nothing but empty dump files


async def test_soft_refusal_of_the_message_stays_temporary(tmp_path: Path) -> None:
    with smtp_sink(tmp_path / "sink", "-r", ".") as port:
        outcome = await deliver(SMTPRelayDelivery(("127.0.0.1", port), hostname=HOSTNAME))
    assert outcome.reply.is_temporary


async def test_target_down_is_451_441(tmp_path: Path) -> None:
    outcome = await deliver(SMTPRelayDelivery(("127.0.0.1", free_port()), hostname=HOSTNAME,
                                              connect_timeout=2))
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.1")
    assert "unavailable" in outcome.reply.text


async def test_greeting_refused_is_unavailable(tmp_path: Path) -> None:
    with smtp_sink(tmp_path / "sink", "-f", "CONNECT", "-B", "554 5.3.2 go away") as port:
        outcome = await deliver(SMTPRelayDelivery(("127.0.0.1", port), hostname=HOSTNAME))
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.1")


async def test_helo_fallback(tmp_path: Path) -> None:
    with smtp_sink(tmp_path / "sink", "-f", "EHLO") as port:
        outcome = await deliver(SMTPRelayDelivery(("127.0.0.1", port), hostname=HOSTNAME))
    assert outcome.reply.code == 250
    [dumped] = sink_messages(tmp_path / "sink")
    assert b"X-Client-Proto: SMTP\n" in dumped


async def test_dropped_after_final_dot_is_451(tmp_path: Path) -> None:
    with smtp_sink(tmp_path / "sink", "-q", ".") as port:
        outcome = await deliver(SMTPRelayDelivery(("127.0.0.1", port), hostname=HOSTNAME))
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.2")


async def test_dropped_at_rcpt_is_451(tmp_path: Path) -> None:
    with smtp_sink(tmp_path / "sink", "-q", "RCPT") as port:
        outcome = await deliver(SMTPRelayDelivery(("127.0.0.1", port), hostname=HOSTNAME))
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.2")
    assert "RCPT" in outcome.reply.text


async def test_unsupported_extensions(tmp_path: Path) -> None:
    # smtp-sink offers no SMTPUTF8; with -8 no 8BITMIME either (RFC 6531, RFC 6152).
    with smtp_sink(tmp_path / "sink", "-8") as port:
        delivery = SMTPRelayDelivery(("127.0.0.1", port), hostname=HOSTNAME)
        utf8 = await deliver(delivery, smtputf8=True)
        eight = await deliver(delivery, body_8bit=True)
        plain = await deliver(delivery)
    assert (utf8.reply.code, utf8.reply.enhanced) == (553, "5.6.7")
    assert (eight.reply.code, eight.reply.enhanced) == (554, "5.6.3")
    assert plain.reply.code == 250
    assert len(sink_messages(tmp_path / "sink")) == 1


async def test_too_many_recipients_untouched() -> None:
    delivery = SMTPRelayDelivery(("127.0.0.1", free_port()), hostname=HOSTNAME)
    recipients = tuple(LocalRecipient(f"{u}@example.org", u, "example.org") for u in "ab")
    outcome = await delivery.deliver(LocalEnvelope("", recipients), io.BytesIO(BODY), len(BODY))
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.5.3")


async def test_dropped_or_silent_before_ehlo_is_unavailable(tmp_path: Path) -> None:
    with smtp_sink(tmp_path / "sink", "-q", "CONNECT") as port:
        outcome = await deliver(SMTPRelayDelivery(("127.0.0.1", port), hostname=HOSTNAME))
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.1")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never greets
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        outcome = await deliver(SMTPRelayDelivery(("127.0.0.1", port), hostname=HOSTNAME,
                                                  command_timeout=0.3))
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.1")
    assert "TimeoutError during greeting" in outcome.reply.text


async def test_garbage_reply_mid_transaction_is_451_442() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-fake\r\n250 8BITMIME\r\n")
        await reader.readline()
        writer.write(b"I am not an SMTP reply\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        outcome = await deliver(SMTPRelayDelivery(("127.0.0.1", port), hostname=HOSTNAME))
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.2")
    assert "during MAIL" in outcome.reply.text
