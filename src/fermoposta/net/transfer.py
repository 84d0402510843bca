"""Sending one queued message over SMTP as a client: the shared transaction.

Used by the three places that hand stored mail to a next hop: the ODMR drain
(provider → customer), outbound delivery (provider → the Internet) and the
customer's outbox push (site → provider submission).  Contract:
- `MessageTransfer.send()` refuses up front what the next hop cannot take
  (SIZE, SMTPUTF8 RFC 6531, 8BITMIME RFC 6152), then runs MAIL, RCPT... and
  DATA, pipelined in one group when PIPELINING is offered (RFC 2920 §3.1);
  DSN parameters (RFC 3461) are passed on when the next hop offers DSN.
- Every recipient's outcome is reported through `settle(message,
  recipients, reply, stage)` as soon as its reply is read, before the next
  reply is read: the caller records it durably.  With `pipeline_messages` (and PIPELINING offered),
  the reply to a message's final dot is read after the next message's
  MAIL, RCPT... and DATA have been sent: RFC 2920 §3.1 allows the message
  content as the first "command" of a group, so the next group follows the
  dot at once and the peer never waits for us between messages.  The reply
  is still read, and settled, before any reply of the next transaction;
  `finish()` reads the last one.  A connection lost in between leaves both
  messages' recipients in `unsettled` (kept queued).  Only a 2xx to the
  final dot means delivered; an
  out-of-place positive reply (252 to MAIL, 250 instead of 354) is turned
  into a 4xx, so it can never lose mail.
- Recipients refused with 452 go in a further transaction at once, as long
  as each makes progress (RFC 5321 §4.5.3.1.10); with no progress they are
  settled with that 452.
- Peer errors (connection lost, timeouts, malformed replies) propagate; then
  `unsettled` names the recipients whose outcome is unknown (after the final
  dot: possibly delivered; they must stay queued).  A pipelined DATA answered
  354 although no recipient was accepted raises `UnwantedData` (the caller
  drops the connection rather than risk an empty message); a refused RSET
  raises `ResetRefused`.
- CHUNKING (RFC 3030), only for a caller that passes `whole_body` (the
  drain, for bodies it has read ahead) and `window` > 1, and only when the
  next hop offers both CHUNKING and PIPELINING: a message whose whole body
  is at hand goes as MAIL, RCPT... and ``BDAT <n> LAST`` with its octets,
  all without waiting, and the next message follows at once; up to
  `window` such transactions are in flight, and their replies are read
  (and settled, in order) when the window is full or in `finish()`.  The
  octets are the body with its line ends made CRLF and a final CRLF (as the
  dot-stuffer would send it, less the stuffing): no bare CR or LF reaches
  the wire.  A 503 (out of sequence) to MAIL, RCPT or BDAT defers, never
  fails; after any transaction that did not deliver, the next group starts
  with RSET (a refused RSET raises `ResetRefused`).  The reply to BDAT LAST
  is settled before the RCPT refusals of its transaction.  452-postponed
  recipients go in a further transaction of their own (the same progress
  rule as DATA).  A message without its body at hand (a big one), or whose
  last line is too long for a TLS record of its own (`line_records`), goes
  with DATA once every transaction in flight is settled.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from fermoposta.net.client import SMTPClient
from fermoposta.smtp.data import crlf_lines
from fermoposta.smtp.reply import Reply
from fermoposta.store.base import MessageQueue, QueuedMessage, QueuedRecipient

Settle = Callable[[QueuedMessage, list[QueuedRecipient], Reply, str], Awaitable[None]]
Body = Callable[[str], AsyncIterator[bytes]]
# The whole body of a message if the caller has it at hand, else None.
WholeBody = Callable[[str], bytes | None]

STAGE_BEFORE = "before"  # refused without being sent
STAGE_MAIL = "MAIL"
STAGE_RCPT = "RCPT"
STAGE_DATA = "DATA"
STAGE_FINAL = "final"  # the reply to the final dot


def stored_body(store: MessageQueue) -> Body:
    """`body` for messages in `store`: chunks read in a worker thread, one at
    a time, so memory stays bounded and the event loop never blocks."""

    async def chunks(message_id: str) -> AsyncIterator[bytes]:
        reader = iter(await asyncio.to_thread(store.read_body, message_id))
        while True:
            chunk = await asyncio.to_thread(next, reader, None)
            if chunk is None:
                return
            yield chunk

    return chunks


class UnwantedData(Exception):
    """A pipelined DATA got 354 although no recipient was accepted."""


class ResetRefused(Exception):
    """The next hop refused RSET: the connection is no longer usable."""


@dataclass(frozen=True, slots=True)
class TransferTimeouts:
    command: float = 300.0  # RFC 5321 §4.5.3.2.2-3: MAIL, RCPT
    data_init: float = 120.0  # §4.5.3.2.4
    final_reply: float = 600.0  # §4.5.3.2.6


def not_final(reply: Reply, stage: str) -> Reply:
    """A positive reply where none belongs defers; it never delivers."""
    if reply.code < 400:
        return Reply(451, "4.5.0", f"Unexpected reply to {stage}: {reply}")
    return reply


def in_sequence(reply: Reply, stage: str) -> Reply:
    """A 503 to a pipelined command says the peer's state was not what we
    sent it for (RFC 5321 §4.2.4): that defers the message, never fails it."""
    if reply.code == 503:
        return Reply(451, "4.5.0", f"Out of sequence at {stage}: {reply}")
    return reply


def canonical_body(body: bytes) -> bytes:
    """`body` as BDAT octets: every line end CRLF and a final CRLF, the same
    bytes the dot-stuffer sends less the stuffing (RFC 3030 §2, RFC 5321
    §2.3.8).  Stored bodies already are (intake refuses bare CR and LF), so
    this only counts."""
    body = crlf_lines(body)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


@dataclass(slots=True)
class _InFlight:
    """A transaction whose replies are still to read: a DATA transaction's
    final reply (`body` None), or a whole BDAT transaction's."""

    message: QueuedMessage
    recipients: list[QueuedRecipient]
    body: bytes | None = None
    reset: bool = False  # the group began with RSET


def mail_command(client: SMTPClient, message: QueuedMessage) -> str:
    line = f"MAIL FROM:<{message.sender}>"
    if client.has("SIZE"):
        line += f" SIZE={message.size}"
    if message.body_8bit and client.has("8BITMIME"):
        line += " BODY=8BITMIME"
    if message.smtputf8 and client.has("SMTPUTF8"):
        line += " SMTPUTF8"
    if client.has("DSN"):
        if message.ret:
            line += f" RET={message.ret.upper()}"
        if message.envid:
            line += f" ENVID={message.envid}"
    return line


def rcpt_command(client: SMTPClient, rcpt: QueuedRecipient) -> str:
    line = f"RCPT TO:<{rcpt.address}>"
    if client.has("DSN"):
        if rcpt.notify:
            line += f" NOTIFY={rcpt.notify.upper()}"
        if rcpt.orcpt:
            line += f" ORCPT={rcpt.orcpt}"
    return line


def refusal_before_sending(client: SMTPClient, message: QueuedMessage, peer: str
                           ) -> Reply | None:
    """What the next hop said it cannot take, as a permanent failure."""
    limit = client.max_size()
    if limit is not None and message.size > limit:
        return Reply(552, "5.3.4", f"Message size {message.size} exceeds the limit of "
                     f"{limit} bytes of {peer}")
    if message.smtputf8 and not client.has("SMTPUTF8"):
        return Reply(553, "5.6.7", f"{peer} does not support SMTPUTF8")
    if message.body_8bit and not client.has("8BITMIME"):
        return Reply(554, "5.6.3", f"8-bit message and {peer} does not support 8BITMIME")
    return None


class MessageTransfer:
    """Sends messages on one client connection; see the module docstring."""

    def __init__(self, client: SMTPClient, *, peer: str, body: Body, settle: Settle,
                 timeouts: TransferTimeouts | None = None,
                 pipeline_messages: bool = False, whole_body: WholeBody | None = None,
                 window: int = 1) -> None:
        self.client = client
        self.peer = peer
        self.body = body
        self.settle = settle
        self.timeouts = timeouts or TransferTimeouts()
        self.pipeline_messages = pipeline_messages
        self.whole_body = whole_body
        self.window = max(1, window)
        self._current: list[QueuedRecipient] = []  # of the transaction under way
        # Sent transactions whose replies are still to read, oldest first.
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        self._reset_due = False  # a BDAT transaction did not deliver: RSET first

    @property
    def unsettled(self) -> list[QueuedRecipient]:
        """Recipients whose outcome is unknown if the connection fails now."""
        earlier = [r for sent in self._in_flight for r in sent.recipients]
        return [*earlier, *self._current]

    def _chunking(self) -> bool:
        return (self.whole_body is not None and self.window > 1 and self.pipeline_messages
                and self.client.has("CHUNKING") and self.client.has("PIPELINING"))

    async def finish(self) -> None:
        """Read and settle the replies still due, oldest first."""
        while self._in_flight:
            await self._read_oldest()

    async def _read_oldest(self) -> None:
        sent = self._in_flight[0]
        if sent.body is None:
            final = await self.client.read_reply(self.timeouts.final_reply)
            self._in_flight.popleft()
            await self.settle(sent.message, sent.recipients, final, STAGE_FINAL)
            return
        # All of a BDAT transaction's replies first: until they are read,
        # its recipients stay in `unsettled`.
        t = self.timeouts
        reset = await self.client.read_reply(t.command) if sent.reset else None
        mail_reply = await self.client.read_reply(t.command)
        rcpt_replies = [await self.client.read_reply(t.command) for _ in sent.recipients]
        final = await self.client.read_reply(t.final_reply)
        self._in_flight.popleft()
        if reset is not None and reset.code != 250:
            self._in_flight.appendleft(sent)  # unsettled: kept queued
            raise ResetRefused(f"{self.peer} refused RSET: {reset}")
        await self._settle_chunked(sent, mail_reply, rcpt_replies, final)

    async def _settle_chunked(self, sent: _InFlight, mail_reply: Reply,
                              rcpt_replies: list[Reply], final: Reply) -> None:
        message, recipients, body = sent.message, sent.recipients, sent.body
        assert body is not None
        if mail_reply.code != 250:
            self._reset_due = True
            await self.settle(message, recipients,
                              not_final(in_sequence(mail_reply, STAGE_MAIL), STAGE_MAIL),
                              STAGE_MAIL)
            return
        accepted = [r for r, reply in zip(recipients, rcpt_replies, strict=True)
                    if 200 <= reply.code < 300]
        if accepted:
            # The reply to BDAT LAST is the reply to the whole message; settled
            # first, so a refusal settled after it (a 421 ends the drain)
            # cannot leave a delivery unrecorded.
            await self.settle(message, accepted, in_sequence(final, STAGE_FINAL), STAGE_FINAL)
        if not accepted or final.code >= 300:
            self._reset_due = True
        postponed: list[tuple[QueuedRecipient, Reply]] = []
        for rcpt, reply in zip(recipients, rcpt_replies, strict=True):
            if reply.code == 452:
                postponed.append((rcpt, reply))
            elif not 200 <= reply.code < 300:
                await self.settle(message, [rcpt],
                                  not_final(in_sequence(reply, STAGE_RCPT), STAGE_RCPT),
                                  STAGE_RCPT)
        if not postponed:
            return
        if len(postponed) < len(recipients):
            # Progress: the rest in a further transaction (RFC 5321 §4.5.3.1.10).
            await self._send_chunked(message, [rcpt for rcpt, _ in postponed], body)
            return
        for rcpt, reply in postponed:
            await self.settle(message, [rcpt], reply, STAGE_RCPT)

    async def send(self, message: QueuedMessage, recipients: Sequence[QueuedRecipient]) -> None:
        pending = list(recipients)
        refusal = refusal_before_sending(self.client, message, self.peer)
        if refusal is not None:
            await self.settle(message, pending, refusal, STAGE_BEFORE)
            return
        if self._chunking():
            assert self.whole_body is not None
            body = self.whole_body(message.id)
            if body is not None and self.client.fits_chunk_records(body):
                octets = (body if message.wire_ready and body.endswith(b"\r\n")
                          else canonical_body(body))
                await self._send_chunked(message, pending, octets)
                while len(self._in_flight) >= self.window:
                    await self._read_oldest()
                return
        if any(sent.body is not None for sent in self._in_flight):
            # A BDAT transaction's replies (and its further transactions for
            # postponed recipients) all come before a DATA group goes out.
            await self.finish()
        if self._reset_due:
            await self._rset()
        while pending:
            postponed = await self._transaction(message, pending)
            if not postponed:
                return
            if len(postponed) == len(pending):  # no progress: keep them for later
                for rcpt, reply in postponed:
                    await self.settle(message, [rcpt], reply, STAGE_RCPT)
                return
            pending = [rcpt for rcpt, _ in postponed]

    async def _send_chunked(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                            body: bytes) -> None:
        """MAIL, RCPT... and BDAT <n> LAST with the octets, without waiting;
        after a transaction that did not deliver, RSET first, in the same
        group (RFC 2920 §3.1 lets RSET go anywhere in one)."""
        reset, self._reset_due = self._reset_due, False
        lines = [*(["RSET"] if reset else []), mail_command(self.client, message),
                 *(rcpt_command(self.client, r) for r in recipients)]
        self._in_flight.append(_InFlight(message, list(recipients), body, reset))
        await self.client.send_chunk_transaction(lines, body, self.timeouts.command)

    async def _transaction(self, message: QueuedMessage, recipients: list[QueuedRecipient]
                           ) -> list[tuple[QueuedRecipient, Reply]]:
        """One transaction; returns the recipients postponed by a 452 to RCPT."""
        client, t = self.client, self.timeouts
        self._current = list(recipients)
        mail_line = mail_command(client, message)
        rcpt_lines = [rcpt_command(client, r) for r in recipients]
        data_reply: Reply | None = None
        if client.has("PIPELINING"):
            await client.send_group([mail_line, *rcpt_lines, "DATA"], t.command)
            await self.finish()  # the previous message's final reply comes first
            mail_reply = await client.read_reply(t.command)
            rcpt_replies = [await client.read_reply(t.command) for _ in rcpt_lines]
            data_reply = await client.read_reply(t.data_init)
        else:
            await self.finish()
            mail_reply = await client.command(mail_line, t.command)
            rcpt_replies = []
            if mail_reply.code == 250:
                for line in rcpt_lines:
                    rcpt_replies.append(await client.command(line, t.command))
        if mail_reply.code != 250:
            # The RCPT replies (if pipelined) are moot: the transaction failed.
            await self.settle(message, recipients, not_final(mail_reply, STAGE_MAIL),
                              STAGE_MAIL)
            self._current = []
            self._refuse_unwanted_data(data_reply)
            await self._rset()
            return []
        accepted: list[QueuedRecipient] = []
        postponed: list[tuple[QueuedRecipient, Reply]] = []
        for rcpt, reply in zip(recipients, rcpt_replies, strict=True):
            if 200 <= reply.code < 300:  # 250, 251 and 252 accept the recipient
                accepted.append(rcpt)
            elif reply.code == 452:
                postponed.append((rcpt, reply))
            else:
                await self.settle(message, [rcpt], not_final(reply, STAGE_RCPT), STAGE_RCPT)
        self._current = list(accepted)
        if not accepted:
            self._refuse_unwanted_data(data_reply)
            await self._rset()
            return postponed
        if data_reply is None:
            data_reply = await client.command("DATA", t.data_init)
        if data_reply.code != 354:
            await self.settle(message, accepted, not_final(data_reply, STAGE_DATA),
                              STAGE_DATA)
            self._current = []
            await self._rset()
            return postponed
        await client.send_body(self.body(message.id), wire_ready=message.wire_ready)
        self._in_flight.append(_InFlight(message, accepted))
        self._current = []
        if not (self.pipeline_messages and client.has("PIPELINING")):
            await self.finish()  # read now: no next group goes first
        return postponed

    def _refuse_unwanted_data(self, data_reply: Reply | None) -> None:
        if data_reply is not None and data_reply.code == 354:
            raise UnwantedData(f"{self.peer} accepted DATA without recipients")

    async def _rset(self) -> None:
        await self.finish()
        reply = await self.client.command("RSET", self.timeouts.command)
        if reply.code != 250:
            raise ResetRefused(f"{self.peer} refused RSET: {reply}")
        self._reset_due = False
