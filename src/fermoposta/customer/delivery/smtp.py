"""Local delivery through a next hop that speaks SMTP (a local MTA) or LMTP.

Contract:
- `SMTPRelayDelivery((host, port), hostname=...)` relays each message
  synchronously to a local MTA (Postfix, Exchange, ...) and mirrors its
  replies; `RelayingDelivery` holds the dialogue shared with `LMTPDelivery`
  (lmtp.py).  `max_recipients = 1`: the reversed session takes one recipient
  per transaction (452 4.5.3 to the others, which the provider sends in
  further transactions), so the next hop's reply maps exactly onto the one
  DATA reply we give the provider: no recipient is lost or duplicated
  because another one failed.  `check_recipient()` accepts (returns None):
  the next hop validates at delivery.
- One connection per message: connect, greeting, EHLO (HELO on a 5xx;
  LMTP: LHLO), MAIL FROM with SIZE=, BODY=8BITMIME and SMTPUTF8 when the
  message needs them and the next hop offers them, RCPT TO, DATA, the body
  streamed with dot-stuffing (bounded memory), the final reply, QUIT.
- SMTP only (RFC 6152, RFC 6531): an 8-bit message to a next hop without
  8BITMIME gets 554 5.6.3, an SMTPUTF8 message to one without SMTPUTF8
  553 5.6.7 (as the provider's drain does).  LMTP is final delivery into a
  mailbox, so the parameters are left out and the message is offered anyway.
- Replies (the value `deliver()` returns; `where` is "smtp:host:port",
  "lmtp:host:port" or "lmtp:/path/of/socket"):
  * next hop unreachable (connect refused, no socket, timeout), a greeting
    other than 220 or a refused EHLO/LHLO, or the connection lost or timed
    out before the end of EHLO/LHLO: 451 4.4.1 "local delivery unavailable";
  * connection lost, timeout or a malformed reply during the transaction:
    451 4.4.2 (after the final dot a duplicate is possible, a loss is not);
  * a MAIL, RCPT, DATA or final reply that refuses the message is mirrored:
    same code (5xx stays 5xx, 4xx stays 4xx), same enhanced code (else
    "c.0.0") and text.  Exceptions that describe our dialogue rather than the
    message (421, 500, 502, 503, 504, 530, a positive reply to DATA) become
    451 4.3.0 with the next hop's text, so a local misconfiguration defers
    mail instead of bouncing it;
  * the final reply 2xx: 250 with the next hop's enhanced code and text.
- A transaction with more than one recipient (a caller ignoring
  `max_recipients`) is answered 451 4.5.3 without contacting the next hop.
- Peer errors never escape `deliver()`; programming errors do (the caller
  maps them to 4xx).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from fermoposta.customer.delivery.base import DeliveryOutcome, LocalEnvelope, LocalRecipient
from fermoposta.net.client import ReplyProtocolError, SMTPClient
from fermoposta.net.connection import (
    Connection,
    ConnectionClosed,
    open_connection,
    open_unix_connection,
)
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.reply_parser import parse_ehlo

__all__ = ["RelayingDelivery", "SMTPRelayDelivery"]

log = logging.getLogger("fermoposta.delivery")

CHUNK = 64 * 1024
PEER_ERRORS = (ConnectionClosed, TimeoutError, ReplyProtocolError, OSError)
# Replies about our dialogue, not about the message: defer, never bounce.
NOT_ABOUT_THE_MESSAGE = frozenset({421, 500, 502, 503, 504, 530})

OPENING = frozenset({"greeting", "LHLO", "EHLO"})  # a failure here: the hop is unavailable
QUIT_TIMEOUT = 10.0  # the reply is known by then; do not keep the provider waiting

ONE_RECIPIENT = Reply(451, "4.5.3", "Local delivery takes one recipient per transaction")


class _Unavailable(Exception):
    """The next hop cannot take mail now (before any transaction started)."""


class _Progress:
    """Where the dialogue is, to tell what a lost connection means."""

    def __init__(self) -> None:
        self.stage = "greeting"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RelayingDelivery:
    """SMTP or LMTP hand-off of one single-recipient transaction; see the docstring."""

    name = "smtp"
    max_recipients: int | None = 1

    def __init__(
        self,
        address: Path | tuple[str, int],
        *,
        hostname: str,
        lmtp: bool,
        connect_timeout: float = 30.0,
        command_timeout: float = 120.0,
        data_timeout: float = 180.0,
        final_timeout: float = 300.0,
    ) -> None:
        self.address = address
        self.hostname = hostname
        self.lmtp = lmtp
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.final_timeout = final_timeout
        protocol = "lmtp" if lmtp else "smtp"
        if isinstance(address, tuple):
            self.where = f"{protocol}:{_hostport(*address)}"
        else:
            self.where = f"{protocol}:{address}"

    async def check_recipient(self, rcpt: LocalRecipient) -> Reply | None:
        return None

    async def close(self) -> None:
        return None

    # --- one message ---------------------------------------------------------------------
    async def _connect(self) -> Connection:
        if isinstance(self.address, tuple):
            host, port = self.address
            return await open_connection(host, port, timeout=self.connect_timeout)
        return await open_unix_connection(self.address, timeout=self.connect_timeout)

    async def deliver(self, envelope: LocalEnvelope, body: IO[bytes], size: int
                      ) -> DeliveryOutcome:
        if len(envelope.recipients) != 1:
            log.error("%s: %s delivery got %d recipients in one transaction",
                      envelope.queue_hint, self.name, len(envelope.recipients))
            return DeliveryOutcome(ONE_RECIPIENT, self.where)
        try:
            conn = await self._connect()
        except (OSError, TimeoutError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else str(exc)
            log.warning("%s: %s unreachable: %s", envelope.queue_hint, self.where, reason)
            return DeliveryOutcome(self._unavailable(reason), self.where)
        client = SMTPClient(conn, write_timeout=self.data_timeout)
        progress = _Progress()
        clean = False
        try:
            try:
                reply = await self._transaction(client, envelope, body, size, progress)
                clean = True
                return DeliveryOutcome(reply, self.where)
            except _Unavailable as exc:
                log.warning("%s: %s unavailable: %s", envelope.queue_hint, self.where, exc)
                clean = True
                return DeliveryOutcome(self._unavailable(str(exc)), self.where)
            except PEER_ERRORS as exc:
                stage = progress.stage
                reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
                if stage in OPENING:
                    log.warning("%s: %s unavailable: %s during %s", envelope.queue_hint,
                                self.where, reason, stage)
                    return DeliveryOutcome(self._unavailable(f"{reason} during {stage}"),
                                           self.where)
                if stage == "final":
                    log.warning("%s: %s: connection lost after end of data (%s): "
                                "deferred, a duplicate is possible",
                                envelope.queue_hint, self.where, reason)
                    text = "Connection to local delivery lost after end of data"
                else:
                    log.warning("%s: %s: connection lost during %s (%s)",
                                envelope.queue_hint, self.where, stage, reason)
                    text = f"Connection to local delivery lost during {stage}"
                return DeliveryOutcome(Reply(451, "4.4.2", text), self.where)
        finally:
            if clean:
                with contextlib.suppress(*PEER_ERRORS):
                    await client.command("QUIT", min(self.command_timeout, QUIT_TIMEOUT))
                await conn.close(timeout=2.0)
            else:
                conn.abort()

    def _unavailable(self, reason: str) -> Reply:
        return Reply(451, "4.4.1", f"Local delivery unavailable ({self.where}: {reason})")

    async def _hello(self, client: SMTPClient) -> Reply:
        if self.lmtp:
            reply = await client.command(f"LHLO {self.hostname}", self.command_timeout)
            client.capabilities = parse_ehlo(reply) if reply.code == 250 else {}
            return reply
        return await client.ehlo(self.hostname, self.command_timeout)

    def _refusal(self, envelope: LocalEnvelope, client: SMTPClient) -> Reply | None:
        """What the next hop cannot take (SMTP relaying rules; LMTP offers anyway)."""
        if self.lmtp:
            return None
        if envelope.smtputf8 and not client.has("SMTPUTF8"):
            return Reply(553, "5.6.7", "The local mail system does not support SMTPUTF8")
        if envelope.body_8bit and not client.has("8BITMIME"):
            return Reply(554, "5.6.3",
                         "8-bit message and the local mail system does not support 8BITMIME")
        return None

    def _mail_command(self, envelope: LocalEnvelope, client: SMTPClient, size: int) -> str:
        line = f"MAIL FROM:<{envelope.sender}>"
        if client.has("SIZE"):
            line += f" SIZE={size}"
        if envelope.body_8bit and client.has("8BITMIME"):
            line += " BODY=8BITMIME"
        if envelope.smtputf8 and client.has("SMTPUTF8"):
            line += " SMTPUTF8"
        return line

    async def _transaction(self, client: SMTPClient, envelope: LocalEnvelope, body: IO[bytes],
                           size: int, progress: _Progress) -> Reply:
        def at(stage: str) -> None:
            progress.stage = stage

        at("greeting")
        greeting = await client.read_reply(self.command_timeout)
        if greeting.code != 220:
            raise _Unavailable(f"greeting {greeting}")
        at("LHLO" if self.lmtp else "EHLO")
        hello = await self._hello(client)
        if hello.code != 250:
            raise _Unavailable(f"{'LHLO' if self.lmtp else 'EHLO/HELO'} refused: {hello}")
        refusal = self._refusal(envelope, client)
        if refusal is not None:
            return refusal
        at("MAIL")
        reply = await client.command(self._mail_command(envelope, client, size),
                                     self.command_timeout)
        if not reply.is_positive:
            return _mirror(reply, "MAIL")
        at("RCPT")
        rcpt = envelope.recipients[0]
        reply = await client.command(f"RCPT TO:<{rcpt.address}>", self.command_timeout)
        if not reply.is_positive:
            return _mirror(reply, "RCPT")
        at("DATA")
        reply = await client.command("DATA", self.command_timeout)
        if reply.code != 354:
            return _mirror(reply, "DATA")
        at("message content")
        await client.send_body(_chunks(body))
        at("final")
        final = await client.read_reply(self.final_timeout)
        return _mirror(final, "end of data")


def _mirror(reply: Reply, stage: str) -> Reply:
    """The reply for the provider that mirrors the next hop's `reply` (see docstring)."""
    code = reply.code
    if stage == "end of data" and 200 <= code < 300:
        return Reply(250, reply.enhanced or "2.0.0", *reply.lines)
    if code in NOT_ABOUT_THE_MESSAGE or code < 400:
        log.warning("local delivery: unexpected reply to %s: %s", stage, reply)
        return Reply(451, "4.3.0", f"Local delivery failed at {stage}: {reply}")
    return Reply(code, reply.enhanced or f"{code // 100}.0.0", *reply.lines)


async def _chunks(body: IO[bytes]) -> AsyncIterator[bytes]:
    await asyncio.to_thread(body.seek, 0)
    while True:
        chunk = await asyncio.to_thread(body.read, CHUNK)
        if not chunk:
            return
        yield chunk


class SMTPRelayDelivery(RelayingDelivery):
    """Relay to a local MTA over SMTP and mirror its replies."""

    name = "smtp"

    def __init__(
        self,
        address: tuple[str, int],
        *,
        hostname: str,
        connect_timeout: float = 30.0,
        command_timeout: float = 120.0,
        data_timeout: float = 180.0,
        final_timeout: float = 300.0,
    ) -> None:
        super().__init__(address, hostname=hostname, lmtp=False,
                         connect_timeout=connect_timeout, command_timeout=command_timeout,
                         data_timeout=data_timeout, final_timeout=final_timeout)
