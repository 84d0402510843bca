"""The provider's reversed session, phase 2: deliver held mail to the customer.

After the 250 to ATRN the provider becomes the SMTP client on the same
connection (RFC 2645 §5.3).  Contract:
- Waits for the customer's 220 (RFC 5321 §4.5.3.2.1 timeout); EHLO with HELO
  fallback; then delivers every message that had HELD recipients in the
  leased domains when the drain started (oldest first), each with only the
  recipients of those domains: other recipients stay queued.
- A recipient leaves the queue only on a 2xx to the final dot (or is failed
  with a DSN to the sender on a 5xx, never to `<>`, built by
  `fermoposta.provider.dsn.build_dsn`, which honours NOTIFY and RET); a 4xx
  keeps it.  If the
  connection drops or times out after the final dot the outcome is unknown:
  the recipients stay queued (a duplicate is possible, a loss is not; RFC
  1047).  Each outcome is committed before the next command is sent.
- Uses PIPELINING (MAIL and all RCPTs in one write), SIZE, 8BITMIME and
  SMTPUTF8 when the customer offers them; a message the customer cannot take
  (too big for its SIZE, 8-bit without 8BITMIME, UTF-8 without SMTPUTF8) is
  failed with a DSN without being sent.
- Renews the domain leases between messages; ends with QUIT.  Never raises
  for peer misbehaviour: it returns a `DrainResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fermoposta.net.client import ReplyProtocolError, SMTPClient
from fermoposta.net.connection import Connection, ConnectionClosed, LineTooLong
from fermoposta.ops.log import event
from fermoposta.provider.dsn import Action, RecipientReport, build_dsn
from fermoposta.smtp.reply import Reply
from fermoposta.store.base import QueuedMessage, QueuedRecipient, RecipientState, Store, StoreError

log = logging.getLogger("fermoposta.drain")

PEER_ERRORS = (ConnectionClosed, TimeoutError, ReplyProtocolError, LineTooLong, OSError)


@dataclass(frozen=True, slots=True)
class DrainSettings:
    greeting_timeout: float = 300.0  # RFC 5321 §4.5.3.2.1
    command_timeout: float = 300.0  # MAIL and RCPT, §4.5.3.2.2-3
    data_init_timeout: float = 120.0  # §4.5.3.2.4
    data_block_timeout: float = 180.0  # §4.5.3.2.5
    final_reply_timeout: float = 600.0  # §4.5.3.2.6
    quit_timeout: float = 30.0
    lease_ttl: float = 600.0
    max_messages: int = 0  # 0 = no cap per session


@dataclass(slots=True)
class DrainResult:
    delivered: int = 0  # recipients accepted by the customer
    deferred: int = 0
    failed: int = 0
    messages: int = 0  # messages attempted
    aborted: str | None = None  # why the session ended early, if it did
    relay: str = ""


class _Abort(Exception):
    pass


class Drain:
    def __init__(self, conn: Connection, store: Store, *, domains: Sequence[str], hostname: str,
                 session_id: str, settings: DrainSettings) -> None:
        self.conn = conn
        self.client = SMTPClient(conn, write_timeout=settings.data_block_timeout)
        self.store = store
        self.domains = frozenset(domains)
        self.hostname = hostname
        self.session_id = session_id
        self.settings = settings
        self.result = DrainResult(relay=f"unknown[{conn.peer_ip}]")

    async def _heartbeat(self) -> None:
        """Renew the domain leases while the drain runs, so a slow message
        (up to the 10-minute final-reply timeout) never outlives its lease."""
        while True:
            await asyncio.sleep(self.settings.lease_ttl / 3)
            try:
                await asyncio.to_thread(self.store.renew_leases, self.session_id,
                                        self.settings.lease_ttl)
            except StoreError as exc:
                log.warning("%s: cannot renew leases: %s", self.session_id, exc)

    async def run(self) -> DrainResult:
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            if await self._open():
                await self._deliver_all()
                await self._quit()
        except _Abort:
            pass
        except PEER_ERRORS as exc:
            self.result.aborted = f"{type(exc).__name__}: {exc}".rstrip(": ")
        except StoreError as exc:
            self.result.aborted = f"store error: {exc}"
            log.warning("%s: drain stopped: store error: %s", self.session_id, exc)
        finally:
            heartbeat.cancel()
        event("drain", None, session=self.session_id, relay=self.result.relay,
              messages=self.result.messages, delivered=self.result.delivered,
              deferred=self.result.deferred, failed=self.result.failed,
              status="done" if self.result.aborted is None else "aborted",
              reason=self.result.aborted)
        return self.result

    async def _open(self) -> bool:
        greeting = await self.client.read_reply(self.settings.greeting_timeout)
        if greeting.code != 220:
            self.result.aborted = f"customer greeting: {greeting}"
            if greeting.code == 554:
                await self._quit()
            return False
        reply = await self.client.ehlo(self.hostname, self.settings.command_timeout)
        if reply.code != 250:
            self.result.aborted = f"customer refused EHLO/HELO: {reply}"
            await self._quit()
            return False
        name = reply.lines[0].split(" ", 1)[0] if reply.lines and reply.lines[0] else "unknown"
        self.result.relay = f"{name}[{self.conn.peer_ip}]"
        return True

    async def _quit(self) -> None:
        with contextlib.suppress(*PEER_ERRORS):
            await self.client.command("QUIT", self.settings.quit_timeout)

    async def _deliver_all(self) -> None:
        if not self.domains:
            return
        ids = await asyncio.to_thread(self.store.held_message_ids, self.domains)
        for message_id in ids:
            if self.settings.max_messages and self.result.messages >= self.settings.max_messages:
                break
            message = await asyncio.to_thread(self.store.get_message, message_id)
            if message is None:
                continue
            recipients = [r for r in message.recipients
                          if r.state == RecipientState.HELD and r.domain in self.domains]
            if recipients:
                self.result.messages += 1
                await self._deliver_in_transactions(message, recipients)

    # --- one message ---------------------------------------------------------------------
    def _refusal_before_sending(self, message: QueuedMessage) -> Reply | None:
        limit = self.client.max_size()
        if limit is not None and message.size > limit:
            return Reply(552, "5.3.4", f"Message size {message.size} exceeds the customer's "
                         f"limit of {limit} bytes")
        if message.smtputf8 and not self.client.has("SMTPUTF8"):
            return Reply(553, "5.6.7", "The customer does not support SMTPUTF8")
        if message.body_8bit and not self.client.has("8BITMIME"):
            return Reply(554, "5.6.3", "8-bit message and the customer does not support 8BITMIME")
        return None

    def _mail_command(self, message: QueuedMessage) -> str:
        line = f"MAIL FROM:<{message.sender}>"
        if self.client.has("SIZE"):
            line += f" SIZE={message.size}"
        if message.body_8bit and self.client.has("8BITMIME"):
            line += " BODY=8BITMIME"
        if message.smtputf8 and self.client.has("SMTPUTF8"):
            line += " SMTPUTF8"
        return line

    async def _deliver_in_transactions(self, message: QueuedMessage,
                                       recipients: list[QueuedRecipient]) -> None:
        """RFC 5321 §4.5.3.1.10: recipients refused with 452 (too many recipients)
        go in a further transaction at once, as long as each one makes progress.
        This lets a customer take one recipient per transaction (as an LMTP
        hand-off must, to map per-recipient outcomes exactly)."""
        refusal = self._refusal_before_sending(message)
        if refusal is not None:
            await self._fail(message, recipients, refusal)
            return
        while recipients:
            postponed = await self._deliver(message, recipients)
            if not postponed:
                return
            if len(postponed) == len(recipients):  # no progress: keep them for later
                for rcpt, reply in postponed:
                    await self._settle(message, [rcpt], reply)
                return
            recipients = [rcpt for rcpt, _ in postponed]

    async def _deliver(self, message: QueuedMessage, recipients: list[QueuedRecipient]
                       ) -> list[tuple[QueuedRecipient, Reply]]:
        """One transaction; returns the recipients postponed by a 452 to RCPT."""
        mail_line = self._mail_command(message)
        rcpt_lines = [f"RCPT TO:<{r.address}>" for r in recipients]
        timeout = self.settings.command_timeout
        data_reply: Reply | None = None
        if self.client.has("PIPELINING"):
            # RFC 2920 §3.1: MAIL, the RCPTs and DATA in one group, one round trip.
            await self.conn.write(
                ("\r\n".join([mail_line, *rcpt_lines, "DATA"]) + "\r\n").encode("utf-8"),
                timeout,
            )
            mail_reply = await self.client.read_reply(timeout)
            rcpt_replies = [await self.client.read_reply(timeout) for _ in rcpt_lines]
            data_reply = await self.client.read_reply(self.settings.data_init_timeout)
        else:
            mail_reply = await self.client.command(mail_line, timeout)
            rcpt_replies = []
            if mail_reply.code == 250:
                for line in rcpt_lines:
                    rcpt_replies.append(await self.client.command(line, timeout))
        if mail_reply.code != 250:
            # The RCPT replies (if pipelined) are moot: the transaction failed.
            await self._settle(message, recipients, self._not_final(mail_reply))
            await self._end_unwanted_data(data_reply)
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
                await self._settle(message, [rcpt], self._not_final(reply))
        if not accepted:
            await self._end_unwanted_data(data_reply)
            await self._rset()
            return postponed
        if data_reply is None:
            data_reply = await self.client.command("DATA", self.settings.data_init_timeout)
        if data_reply.code != 354:
            await self._settle(message, accepted, self._not_final(data_reply))
            await self._rset()
            return postponed
        await self.client.send_body(self._body(message.id))
        try:
            final = await self.client.read_reply(self.settings.final_reply_timeout)
        except PEER_ERRORS:
            for rcpt in accepted:
                event("drain", message.id, to=f"<{rcpt.address}>", relay=self.result.relay,
                      status="deferred",
                      reason="connection lost after end of data: kept, possible duplicate")
            self.result.deferred += len(accepted)
            raise
        await self._settle(message, accepted, final)
        return postponed

    async def _body(self, message_id: str) -> AsyncIterator[bytes]:
        chunks = iter(await asyncio.to_thread(self.store.read_body, message_id))
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                return
            yield chunk

    async def _end_unwanted_data(self, data_reply: Reply | None) -> None:
        """A pipelined DATA answered 354 although the transaction has no
        accepted recipient (a real server answers 503 or 554 there).  Ending
        it with "." could deliver an empty message, so drop the connection
        instead: the server discards the open transaction (RFC 5321 §3.8),
        and everything not yet delivered stays queued."""
        if data_reply is not None and data_reply.code == 354:
            self.result.aborted = "customer accepted DATA without recipients; connection dropped"
            log.warning("%s: %s", self.session_id, self.result.aborted)
            self.conn.abort()
            raise _Abort()

    async def _rset(self) -> None:
        reply = await self.client.command("RSET", self.settings.command_timeout)
        if reply.code != 250:
            raise _Abort()

    @staticmethod
    def _not_final(reply: Reply) -> Reply:
        """A reply that is not the answer to the final dot can never mean
        "delivered": an out-of-place positive reply (252 to MAIL, 250 to DATA)
        defers the recipients instead of losing them."""
        if reply.code < 400:
            return Reply(451, "4.5.0", f"Unexpected reply from the customer: {reply}")
        return reply

    async def _settle(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                      reply: Reply) -> None:
        """Record the outcome of `reply` for `recipients`, durably, before going on.
        Only a 2xx to the final dot delivers; 5xx fails with a DSN; anything
        else (4xx, or a stray 3xx) keeps the recipients queued."""
        if 200 <= reply.code < 300:
            ids = [r.id for r in recipients]
            await asyncio.to_thread(self.store.record_delivered, ids, str(reply))
            self.result.delivered += len(recipients)
            self._log(message, recipients, reply, "sent")
        elif reply.is_permanent:
            await self._fail(message, recipients, reply)
        else:
            await asyncio.to_thread(self.store.record_deferred, [r.id for r in recipients],
                                    str(reply))
            self.result.deferred += len(recipients)
            self._log(message, recipients, reply, "deferred")
        if reply.code == 421:
            self.result.aborted = f"customer closing: {reply}"
            raise _Abort()

    async def _fail(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                    reply: Reply) -> None:
        remote_mta = self.result.relay.split("[", 1)[0]
        status = reply.enhanced or f"{reply.code // 100}.0.0"
        dsn = await asyncio.to_thread(
            build_dsn,
            self.store,
            hostname=self.hostname,
            message=message,
            action=Action.FAILED,
            reports=[RecipientReport(r, status, reply, remote_mta) for r in recipients],
            sender_domain_hosted=await self._sender_domain_hosted(message.sender),
        )
        try:
            dsn_id = await asyncio.to_thread(
                self.store.record_failed, [r.id for r in recipients], str(reply), dsn
            )
        finally:
            if dsn is not None:
                dsn[1].close()  # a spooled temporary file
        self.result.failed += len(recipients)
        self._log(message, recipients, reply, "bounced")
        if dsn_id is not None:
            event("drain", message.id, status="dsn",
                  reason=f"sender non-delivery notification: {dsn_id}")

    async def _sender_domain_hosted(self, sender: str) -> bool:
        if "@" not in sender:
            return False
        domain = sender.rsplit("@", 1)[1].lower()
        return await asyncio.to_thread(self.store.get_domain, domain) is not None

    def _log(self, message: QueuedMessage, recipients: list[QueuedRecipient], reply: Reply,
             status: str) -> None:
        delay = max(0.0, time.time() - message.received_at)
        for rcpt in recipients:
            event("drain", message.id, to=f"<{rcpt.address}>", relay=self.result.relay,
                  delay=f"{delay:.1f}", dsn=reply.enhanced or f"{reply.code // 100}.0.0",
                  status=status, reason=str(reply))


async def drain(conn: Connection, store: Store, *, domains: Sequence[str], hostname: str,
                session_id: str, settings: DrainSettings) -> DrainResult:
    """Run the reversed session on `conn`; see the module docstring."""
    return await Drain(conn, store, domains=domains, hostname=hostname, session_id=session_id,
                       settings=settings).run()
