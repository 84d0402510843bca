"""LMTP delivery against a real Dovecot (and Postfix's smtp-sink in LMTP mode)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from dovecot import Dovecot, dovecot, dovecot_server, running_dovecot
from fermoposta.customer.delivery.base import (
    Delivery,
    DeliveryOutcome,
    LocalEnvelope,
    LocalRecipient,
)
from fermoposta.customer.delivery.factory import make_delivery
from fermoposta.customer.delivery.lmtp import LMTPDelivery
from peers import free_port, need, sink_messages, smtp_sink

pytestmark = pytest.mark.peers
__all__ = ["dovecot", "dovecot_server"]  # fixtures

HOSTNAME = "mail.example.org"


def message(body: bytes = b"Hello Bob.\r\n.leading dot\r\n") -> bytes:
    return (b"Received: from mx.provider.test by mail.example.org; "
            b"Thu, 1 Jan 2026 00:00:00 +0000\r\n"
            b"From: alice@sender.test\r\nTo: bob@example.org\r\n"
            b"Subject: test\r\nMessage-ID: <1@sender.test>\r\n\r\n" + body)


def envelope(*addresses: str, smtputf8: bool = False, body_8bit: bool = False
             ) -> LocalEnvelope:
    recipients = tuple(LocalRecipient(a, *a.split("@")) for a in addresses)
    return LocalEnvelope("alice@sender.test", recipients, smtputf8=smtputf8,
                         body_8bit=body_8bit, queue_hint="TESTQ")


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


async def deliver(delivery: Delivery, data: bytes, *addresses: str, **flags: bool
                  ) -> DeliveryOutcome:
    return await delivery.deliver(envelope(*addresses, **flags), io.BytesIO(data), len(data))


async def test_deliver_to_bob_over_the_unix_socket(dovecot: Dovecot) -> None:
    delivery = LMTPDelivery(dovecot.socket, hostname=HOSTNAME)
    assert delivery.max_recipients is None  # the session bounds it (100)
    assert await delivery.check_recipient(LocalRecipient("x@example.org", "x", "example.org")) \
        is None
    data = message()
    outcome = await deliver(delivery, data, "bob@example.org")
    assert outcome.reply.code == 250, outcome
    assert outcome.reply.enhanced == "2.0.0"
    assert outcome.where == f"lmtp:{dovecot.socket}"
    [stored] = dovecot.messages("bob@example.org")
    assert stored.endswith(lf(data))  # Dovecot prepends Return-Path and its Received
    assert b"Return-Path: <alice@sender.test>" in stored
    assert dovecot.messages("carol@example.org") == []
    await delivery.close()


async def test_deliver_over_tcp_via_the_factory(dovecot: Dovecot) -> None:
    delivery = make_delivery("lmtp", hostname=HOSTNAME, hostport=("127.0.0.1", dovecot.port))
    data = message(b"8-bit: caf\xc3\xa9\r\n")
    outcome = await deliver(delivery, data, "carol@example.org", body_8bit=True)
    assert outcome.reply.code == 250, outcome
    assert outcome.where == f"lmtp:127.0.0.1:{dovecot.port}"
    [stored] = dovecot.messages("carol@example.org")
    assert stored.endswith(lf(data))


async def test_unknown_user_gets_dovecots_550_mirrored(dovecot: Dovecot) -> None:
    delivery = LMTPDelivery(dovecot.socket, hostname=HOSTNAME)
    outcome = await deliver(delivery, message(), "nosuchuser@example.org")
    assert outcome.reply.code == 550
    assert outcome.reply.enhanced == "5.1.1"
    assert "nosuchuser@example.org" in outcome.reply.text
    assert dovecot.files() == []


async def test_one_refused_recipient_never_affects_the_others(dovecot: Dovecot) -> None:
    """`deliver()` (retry spool, notices) takes one recipient: each its own outcome."""
    delivery = LMTPDelivery(dovecot.socket, hostname=HOSTNAME)
    data = message()
    replies = [(await deliver(delivery, data, rcpt)).reply.code
               for rcpt in ("bob@example.org", "nobody@example.org", "carol@example.org")]
    assert replies == [250, 550, 250]
    assert len(dovecot.messages("bob@example.org")) == 1
    assert len(dovecot.messages("carol@example.org")) == 1


async def test_more_recipients_than_max_are_deferred_untouched(dovecot: Dovecot) -> None:
    delivery = LMTPDelivery(dovecot.socket, hostname=HOSTNAME)
    outcome = await deliver(delivery, message(), "bob@example.org", "carol@example.org")
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.5.3")
    assert dovecot.files() == []


async def test_dovecot_stopped_gives_451_and_writes_nothing() -> None:
    with running_dovecot() as server:
        unix = LMTPDelivery(server.socket, hostname=HOSTNAME, connect_timeout=2)
        tcp = LMTPDelivery(("127.0.0.1", server.port), hostname=HOSTNAME, connect_timeout=2)
        assert (await deliver(unix, message(), "bob@example.org")).reply.code == 250
        server.stop()
        for delivery in (unix, tcp):
            outcome = await deliver(delivery, message(), "carol@example.org")
            assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.1"), outcome
            assert "unavailable" in outcome.reply.text
        assert len(server.messages("bob@example.org")) == 1
        assert server.messages("carol@example.org") == []


async def test_socket_missing_gives_451(tmp_path: Path) -> None:
    delivery = LMTPDelivery(tmp_path / "no" / "lmtp", hostname=HOSTNAME)
    outcome = await deliver(delivery, message(), "bob@example.org")
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.1")
    closed = LMTPDelivery(("127.0.0.1", free_port()), hostname=HOSTNAME)
    outcome = await deliver(closed, message(), "bob@example.org")
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.1")


class _CountingBody(io.BytesIO):
    largest_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.largest_read = max(self.largest_read, len(data))
        return data


async def test_five_megabytes_streamed(dovecot: Dovecot) -> None:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/=-_.\r\n"
    lines = [line if i % 7 else b"." + line for i in range(5 * 1024 * 1024 // len(line))]
    data = message(b"".join(lines))
    body = _CountingBody(data)
    delivery = LMTPDelivery(dovecot.socket, hostname=HOSTNAME)
    outcome = await delivery.deliver(envelope("bob@example.org"), body, len(data))
    assert outcome.reply.code == 250, outcome
    assert body.largest_read <= 64 * 1024  # streamed, never read whole
    [stored] = dovecot.messages("bob@example.org")
    assert stored.endswith(lf(data))  # dot-stuffing undone exactly


# --- reply mapping, against Postfix's smtp-sink in LMTP mode -------------------------------

async def test_final_reply_refusal_is_mirrored(tmp_path: Path) -> None:
    with smtp_sink(tmp_path / "sink", "-L", "-f", ".", "-B", "552 5.2.2 Mailbox full") as port:
        delivery = LMTPDelivery(("127.0.0.1", port), hostname=HOSTNAME)
        outcome = await deliver(delivery, message(), "bob@example.org")
    assert (outcome.reply.code, outcome.reply.enhanced) == (552, "5.2.2")
    assert outcome.reply.text == "5.2.2 Mailbox full"


async def test_soft_rcpt_refusal_stays_temporary(tmp_path: Path) -> None:
    with smtp_sink(tmp_path / "sink", "-L", "-r", "RCPT") as port:
        delivery = LMTPDelivery(("127.0.0.1", port), hostname=HOSTNAME)
        outcome = await deliver(delivery, message(), "bob@example.org")
    assert outcome.reply.is_temporary and outcome.reply.code != 421
    assert not any(sink_messages(tmp_path / "sink"))  # nothing but empty dump files


async def test_connection_lost_after_final_dot_is_451(tmp_path: Path) -> None:
    with smtp_sink(tmp_path / "sink", "-L", "-q", ".") as port:
        delivery = LMTPDelivery(("127.0.0.1", port), hostname=HOSTNAME, final_timeout=5)
        outcome = await deliver(delivery, message(), "bob@example.org")
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.2")
    assert "after end of data" in outcome.reply.text


async def test_421_is_not_passed_on(tmp_path: Path) -> None:
    with smtp_sink(tmp_path / "sink", "-L", "-Q", "MAIL") as port:
        delivery = LMTPDelivery(("127.0.0.1", port), hostname=HOSTNAME)
        outcome = await deliver(delivery, message(), "bob@example.org")
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.3.0")


async def test_body_parameters_passed_when_offered(tmp_path: Path) -> None:
    need("smtp-sink")
    with smtp_sink(tmp_path / "sink", "-L") as port:
        delivery = LMTPDelivery(("127.0.0.1", port), hostname=HOSTNAME)
        data = message(b"caf\xc3\xa9\r\n")
        outcome = await deliver(delivery, data, "bob@example.org", body_8bit=True)
        assert outcome.reply.code == 250
        # smtp-sink offers no SMTPUTF8: LMTP offers the message without the parameter.
        outcome = await deliver(delivery, data, "bob@example.org", smtputf8=True)
        assert outcome.reply.code == 250
    dumped = sink_messages(tmp_path / "sink")
    assert len(dumped) == 2
    assert all(b"X-Client-Proto: LMTP" in m and lf(data) in m for m in dumped)
    mail_args = sorted(line for m in dumped for line in m.splitlines()
                       if line.startswith(b"X-Mail-Args:"))
    assert mail_args == [b"X-Mail-Args: <alice@sender.test>",
                         b"X-Mail-Args: <alice@sender.test> BODY=8BITMIME"]
