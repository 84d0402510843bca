"""Local delivery through a next hop that speaks SMTP (a local MTA) or LMTP.

Contract:
- `SMTPRelayDelivery((host, port), hostname=...)` relays to a local MTA
  (Postfix, Exchange, ...) and mirrors its replies; `RelayingDelivery` holds
  the dialogue shared with `LMTPDelivery` (lmtp.py).  `check_recipient()`
  accepts (returns None): the next hop validates.
- `transaction(LocalSender)` follows the provider's transaction step by step
  (one connection per transaction, opened at the first recipient): connect,
  greeting, EHLO (HELO on a 5xx; LMTP: LHLO), MAIL FROM with SIZE= (when
  the provider declared it), BODY=8BITMIME and SMTPUTF8 when the message
  needs them and the next hop offers them; then each `add_recipient()` is
  one RCPT TO whose refusal is mirrored at once (so the provider's RCPT gets
  the local verdict, RFC 5321 §3.3); `data()` sends DATA, streams the body
  with dot-stuffing (bounded memory) and reads the final reply (SMTP: one
  reply for every accepted recipient; LMTP: one reply per accepted
  recipient, RFC 2033 §4.2); `abort()` sends QUIT (a next hop that saw no
  final dot discards the transaction, RFC 5321 §3.8) and closes.
- `deliver(envelope)` (the retry spool, notices): one recipient through a
  transaction; an envelope with more than one recipient is answered
  451 4.5.3 without contacting the next hop (one reply could not say which
  recipient failed).
- SMTP only (RFC 6152, RFC 6531): an 8-bit message to a next hop without
  8BITMIME gets 554 5.6.3, an SMTPUTF8 message to one without SMTPUTF8
  553 5.6.7 (as the provider's drain does), at each RCPT.  LMTP is final
  delivery into a mailbox, so the parameters are left out and the message
  is offered anyway.
- Replies (`where` is "smtp:host:port", "lmtp:host:port" or
  "lmtp:/path/of/socket"):
  * next hop unreachable (connect refused, no socket, timeout), a greeting
    other than 220 or a refused EHLO/LHLO, or the connection lost or timed
    out before the end of EHLO/LHLO: 451 4.4.1 "local delivery unavailable"
    for every recipient of the transaction;
  * connection lost, timeout or a malformed reply during the transaction:
    451 4.4.2 for that command and everything after it (after the final dot
    a duplicate is possible, a loss is not; LMTP replies already read keep
    their value);
  * a MAIL, RCPT, DATA or final reply that refuses the message is mirrored:
    same code (5xx stays 5xx, 4xx stays 4xx), same enhanced code (else
    "c.0.0") and text; a MAIL refusal is given to every RCPT.  Exceptions
    that describe our dialogue rather than the message (421, 500, 502, 503,
    504, 530, a positive reply to DATA) become 451 4.3.0 with the next hop's
    text, so a local misconfiguration defers mail instead of bouncing it;
  * a final reply 2xx: 250 with the next hop's enhanced code and text.
- Peer errors never escape; programming errors do (the caller maps them to
  4xx).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from fermoposta.customer.delivery.base import (
    DeliveryOutcome,
    LocalEnvelope,
    LocalRecipient,
    LocalSender,
)
from fermoposta.net.client import PEER_ERRORS, SMTPClient
from fermoposta.net.connection import (
    Connection,
    open_connection,
    open_unix_connection,
)
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.reply_parser import parse_ehlo

__all__ = ["RelayTransaction", "RelayingDelivery", "SMTPRelayDelivery"]

log = logging.getLogger("fermoposta.delivery")

CHUNK = 64 * 1024
# Replies about our dialogue, not about the message: defer, never bounce.
NOT_ABOUT_THE_MESSAGE = frozenset({421, 500, 502, 503, 504, 530})

OPENING = frozenset({"greeting", "LHLO", "EHLO"})  # a failure here: the hop is unavailable
QUIT_TIMEOUT = 10.0  # the reply is known by then; do not keep the provider waiting

ONE_RECIPIENT = Reply(451, "4.5.3", "Local delivery takes one recipient per transaction")


class _Unavailable(Exception):
    """The next hop cannot take mail now (before any transaction started)."""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RelayingDelivery:
    """SMTP or LMTP hand-off, one next-hop transaction per provider transaction."""

    name = "smtp"
    max_recipients: int | None = None

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

    def transaction(self, start: LocalSender) -> RelayTransaction:
        return RelayTransaction(self, start)

    async def connect(self) -> Connection:
        if isinstance(self.address, tuple):
            host, port = self.address
            return await open_connection(host, port, timeout=self.connect_timeout)
        return await open_unix_connection(self.address, timeout=self.connect_timeout)

    async def deliver(self, envelope: LocalEnvelope, body: IO[bytes], size: int
                      ) -> DeliveryOutcome:
        if len(envelope.recipients) != 1:
            log.error("%s: %s delivery got %d recipients for one reply",
                      envelope.queue_hint, self.name, len(envelope.recipients))
            return DeliveryOutcome(ONE_RECIPIENT, self.where)
        txn = self.transaction(LocalSender(envelope.sender, envelope.smtputf8,
                                           envelope.body_8bit, size, envelope.queue_hint))
        try:
            refusal = await txn.add_recipient(envelope.recipients[0])
            if refusal is not None:
                return DeliveryOutcome(refusal, self.where)
            [reply] = await txn.data(body, size)
            return DeliveryOutcome(reply, self.where)
        finally:
            await txn.abort()

    def unavailable(self, reason: str) -> Reply:
        return Reply(451, "4.4.1", f"Local delivery unavailable ({self.where}: {reason})")

    async def hello(self, client: SMTPClient) -> Reply:
        if self.lmtp:
            reply = await client.command(f"LHLO {self.hostname}", self.command_timeout)
            client.capabilities = parse_ehlo(reply) if reply.code == 250 else {}
            return reply
        return await client.ehlo(self.hostname, self.command_timeout)

    def refusal(self, start: LocalSender, client: SMTPClient) -> Reply | None:
        """What the next hop cannot take (SMTP relaying rules; LMTP offers anyway)."""
        if self.lmtp:
            return None
        if start.smtputf8 and not client.has("SMTPUTF8"):
            return Reply(553, "5.6.7", "The local mail system does not support SMTPUTF8")
        if start.body_8bit and not client.has("8BITMIME"):
            return Reply(554, "5.6.3",
                         "8-bit message and the local mail system does not support 8BITMIME")
        return None

    def mail_command(self, start: LocalSender, client: SMTPClient) -> str:
        line = f"MAIL FROM:<{start.sender}>"
        if start.size is not None and client.has("SIZE"):
            line += f" SIZE={start.size}"
        if start.body_8bit and client.has("8BITMIME"):
            line += " BODY=8BITMIME"
        if start.smtputf8 and client.has("SMTPUTF8"):
            line += " SMTPUTF8"
        return line


class RelayTransaction:
    """One next-hop transaction that follows the provider's; see the module docstring."""

    def __init__(self, owner: RelayingDelivery, start: LocalSender) -> None:
        self.owner = owner
        self.start = start
        self.where = owner.where
        self.conn: Connection | None = None
        self.client: SMTPClient | None = None
        self.stage = "greeting"
        self.opened = False
        self.done = False
        # Once set, the reply for every further recipient (and for DATA):
        # the next hop is unavailable, refused MAIL or the dialogue broke.
        self.broken: Reply | None = None
        self.accepted: list[LocalRecipient] = []

    # --- the dialogue --------------------------------------------------------------------
    async def _open(self) -> None:
        owner, hint = self.owner, self.start.queue_hint
        try:
            self.conn = await owner.connect()
        except (OSError, TimeoutError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else str(exc)
            log.warning("%s: %s unreachable: %s", hint, self.where, reason)
            self.broken = owner.unavailable(reason)
            return
        client = self.client = SMTPClient(self.conn, write_timeout=owner.data_timeout)
        try:
            greeting = await client.read_reply(owner.command_timeout)
            if greeting.code != 220:
                raise _Unavailable(f"greeting {greeting}")
            self.stage = "LHLO" if owner.lmtp else "EHLO"
            hello = await owner.hello(client)
            if hello.code != 250:
                raise _Unavailable(f"{'LHLO' if owner.lmtp else 'EHLO/HELO'} refused: {hello}")
            refusal = owner.refusal(self.start, client)
            if refusal is not None:
                self.broken = refusal
                return
            self.stage = "MAIL"
            reply = await client.command(owner.mail_command(self.start, client),
                                         owner.command_timeout)
            if not reply.is_positive:
                self.broken = _mirror(reply, "MAIL")
        except _Unavailable as exc:
            log.warning("%s: %s unavailable: %s", hint, self.where, exc)
            self.broken = owner.unavailable(str(exc))
        except PEER_ERRORS as exc:
            self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        """The connection broke at `self.stage`: the reply for what is left."""
        stage, hint = self.stage, self.start.queue_hint
        reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if self.conn is not None:
            self.conn.abort()
            self.conn = None
        if stage in OPENING:
            log.warning("%s: %s unavailable: %s during %s", hint, self.where, reason, stage)
            self.broken = self.owner.unavailable(f"{reason} during {stage}")
            return
        if stage == "final":
            log.warning("%s: %s: connection lost after end of data (%s): "
                        "deferred, a duplicate is possible", hint, self.where, reason)
            text = "Connection to local delivery lost after end of data"
        else:
            log.warning("%s: %s: connection lost during %s (%s)", hint, self.where, stage,
                        reason)
            text = f"Connection to local delivery lost during {stage}"
        self.broken = Reply(451, "4.4.2", text)

    async def add_recipient(self, rcpt: LocalRecipient) -> Reply | None:
        if self.done:
            raise RuntimeError("add_recipient() after the end of the transaction")
        if not self.opened:
            self.opened = True
            await self._open()
        if self.broken is not None:
            return self.broken
        assert self.client is not None
        self.stage = "RCPT"
        try:
            reply = await self.client.command(f"RCPT TO:<{rcpt.address}>",
                                              self.owner.command_timeout)
        except PEER_ERRORS as exc:
            self._lost(exc)
            assert self.broken is not None
            return self.broken
        if not reply.is_positive:
            return _mirror(reply, "RCPT")
        self.accepted.append(rcpt)
        return None

    async def data(self, body: IO[bytes], size: int) -> list[Reply]:
        count = len(self.accepted)
        try:
            if count == 0:
                return []
            if self.broken is not None:
                return [self.broken] * count
            assert self.client is not None
            return await self._data(self.client, body, count)
        finally:
            await self.abort()

    async def _data(self, client: SMTPClient, body: IO[bytes], count: int) -> list[Reply]:
        owner = self.owner
        replies: list[Reply] = []
        try:
            self.stage = "DATA"
            reply = await client.command("DATA", owner.command_timeout)
            if reply.code != 354:
                return [_mirror(reply, "DATA")] * count
            self.stage = "message content"
            await client.send_body(_chunks(body))
            self.stage = "final"
            # LMTP: one reply per accepted recipient, in RCPT order (RFC 2033 §4.2).
            for _ in range(count if owner.lmtp else 1):
                replies.append(_mirror(await client.read_reply(owner.final_timeout),
                                       "end of data"))
        except PEER_ERRORS as exc:
            self._lost(exc)
            assert self.broken is not None
            replies += [self.broken] * ((count if owner.lmtp else 1) - len(replies))
        if not owner.lmtp:
            replies = replies * count
        return replies

    async def abort(self) -> None:
        if self.done:
            return
        self.done = True
        conn, client = self.conn, self.client
        self.conn = None
        if conn is None or client is None:
            return
        with contextlib.suppress(*PEER_ERRORS):
            await client.command("QUIT", min(self.owner.command_timeout, QUIT_TIMEOUT))
        with contextlib.suppress(*PEER_ERRORS):
            await conn.close(timeout=2.0)


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
