"""The provider's reversed session, phase 2: deliver held mail to the customer.

After the 250 to ATRN the provider becomes the SMTP client on the same
connection (RFC 2645 §5.3).  Contract:
- Waits for the customer's 220 (RFC 5321 §4.5.3.2.1 timeout); EHLO with HELO
  fallback; then delivers every message that had HELD recipients in the
  leased domains when the drain started (oldest first), each with only the
  recipients of those domains: other recipients stay queued.
- A recipient leaves the queue only on a 2xx to the final dot (or is failed
  with a DSN to the sender on a 5xx, never to `<>`, built by
  `fermoposta.mail.dsn.build_dsn`, which honours NOTIFY and RET); a 4xx
  keeps it.  If the
  connection drops or times out after the final dot the outcome is unknown:
  the recipients stay queued (a duplicate is possible, a loss is not; RFC
  1047).  Deliveries (a 2xx that needs no DSN from us) are committed in the
  background (`delivery_commits.DeliveredCommits`: gathered, up to 10 ms or
  100 per transaction; a refused commit tried three times), while the next
  messages go out: the drain does not wait for each commit (a crash before
  it makes the next drain send those messages again: a duplicate, never a
  loss).  Every such commit has ended before `run` returns, hence before
  the session releases its leases, and before QUIT; one that fails for good
  stops the drain without QUIT (its recipients stay queued, and so does
  every message not yet sent).
  Other outcomes (a deferral, a failure, a delivery with a DSN) are
  committed before the next reply is read.
- Uses PIPELINING (MAIL, all RCPTs and DATA sent without waiting, and
  right after the previous message's final dot, before its reply: RFC 2920
  §3.1, `MessageTransfer(pipeline_messages=True)`; in one write, or over
  TLS one TLS record per command so that fetchmail's line-by-line relay
  sees every one, see `net/client.py`), SIZE, 8BITMIME
  and SMTPUTF8 when the customer offers them; a message the customer cannot take
  (too big for its SIZE, 8-bit without 8BITMIME, UTF-8 without SMTPUTF8) is
  failed with a DSN without being sent.
- With a customer that offers CHUNKING (RFC 3030) and PIPELINING, each
  message whose body was read ahead (up to `PREFETCH_BYTES`) goes as MAIL,
  RCPT... and ``BDAT <n> LAST`` with no wait for a 354, and up to
  `CHUNKING_WINDOW` such transactions are in flight: the customer stores
  one while the next arrive (`net/transfer.py`).  Outcomes are still
  settled in order, as each transaction's replies are read; a recipient
  whose replies are not read when the connection fails stays queued.
- Renews the domain leases while it works; ends with QUIT.  Never raises
  for peer misbehaviour: it returns a `DrainResult`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass

from fermoposta.mail.dsn import Action, RecipientReport, build_dsn, wants_notice
from fermoposta.net.client import PEER_ERRORS, SMTPClient
from fermoposta.net.connection import Connection
from fermoposta.net.transfer import (
    STAGE_FINAL,
    MessageTransfer,
    ResetRefused,
    TransferTimeouts,
    UnwantedData,
    stored_body,
)
from fermoposta.ops import metrics
from fermoposta.ops.log import event
from fermoposta.provider.delivery_commits import DeliveredCommits
from fermoposta.smtp.reply import Reply
from fermoposta.store.base import (
    CHUNK_SIZE,
    HostedMail,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    StoreError,
    lookup_domain,
)

log = logging.getLogger("fermoposta.drain")

# Bodies up to this size are read with their message, ahead of time,
# PREFETCH_MESSAGES messages per read and PREFETCH_BATCHES reads ahead
# (their reads overlap the sending), at most PREFETCH_BATCH_BYTES of bodies
# a read: a drain holds at most (PREFETCH_BATCHES + 1) of them (3 MiB).
PREFETCH_BYTES = 256 * 1024
PREFETCH_MESSAGES = 8
PREFETCH_BATCHES = 2
PREFETCH_BATCH_BYTES = 1024 * 1024
# With a customer that offers CHUNKING: BDAT transactions in flight at once
# (each body at most PREFETCH_BYTES, kept until its replies are read).
CHUNKING_WINDOW = 32



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


# A message read ahead (None: it left the queue) and its body if small.
_Fetched = tuple[QueuedMessage | None, bytes | None]


class _Abort(Exception):
    pass


class Drain:
    def __init__(self, conn: Connection, store: HostedMail, *, domains: Sequence[str],
                 hostname: str, session_id: str, settings: DrainSettings) -> None:
        self.conn = conn
        # line_records: the customer may be fetchmail relaying our bytes line
        # by line out of OpenSSL (net/client.py explains the stall it avoids).
        self.client = SMTPClient(conn, write_timeout=settings.data_block_timeout,
                                 line_records=True)
        self.store = store
        self.domains = frozenset(domains)
        self.hostname = hostname
        self.session_id = session_id
        self.settings = settings
        self.result = DrainResult(relay=f"unknown[{conn.peer_ip}]")
        # Delivered recipients removed in the background (see the module docstring).
        self.commits = DeliveredCommits(store, log, f"{session_id}: ")
        self._stored_body = stored_body(store)
        self._bodies: dict[str, bytes] = {}  # prefetched bodies of small messages
        # One transfer for the session: the next message's commands follow a
        # final dot at once (net/transfer.py, pipeline_messages).
        self.transfer = MessageTransfer(
            self.client, peer="the customer", body=self._body, settle=self._settle,
            timeouts=TransferTimeouts(command=settings.command_timeout,
                                      data_init=settings.data_init_timeout,
                                      final_reply=settings.final_reply_timeout),
            pipeline_messages=True, whole_body=self._bodies.get, window=CHUNKING_WINDOW,
        )

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
                # The customer sees QUIT only once every delivery is recorded.
                await self.commits.flush()
                if self.commits.error is not None:
                    raise self.commits.error
                await self._quit()
        except _Abort:
            pass
        except PEER_ERRORS as exc:
            self.result.aborted = f"{type(exc).__name__}: {exc}".rstrip(": ")
        except StoreError as exc:
            self.result.aborted = f"store error: {exc}"
            log.warning("%s: drain stopped: store error: %s", self.session_id, exc)
        finally:
            try:
                # Even a cancelled drain lets its last commit end (flush is
                # shielded) before the leases go.
                await self.commits.flush()
            finally:
                heartbeat.cancel()
            if self.commits.error is not None and self.result.aborted is None:
                self.result.aborted = f"store error: {self.commits.error}"
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
        # Messages (and small bodies) are read PREFETCH_MESSAGES at a time,
        # PREFETCH_BATCHES reads ahead of the one going out: one thread hop
        # and a few queries per batch, overlapping the sending.
        batches = [ids[i:i + PREFETCH_MESSAGES] for i in range(0, len(ids), PREFETCH_MESSAGES)]
        upcoming: collections.deque[asyncio.Task[list[_Fetched]]] = collections.deque(
            self._prefetch(batch) for batch in batches[:PREFETCH_BATCHES])
        try:
            await self._deliver_batches(batches, upcoming)
        finally:
            for task in upcoming:
                if task.done() and not task.cancelled():
                    task.exception()  # read ahead for nothing (a store error, say)
                task.cancel()
        await self._guarded(self.transfer.finish())  # the last message's final reply

    async def _deliver_batches(self, batches: Sequence[Sequence[str]],
                               upcoming: collections.deque[asyncio.Task[list[_Fetched]]]
                               ) -> None:
        for index in range(len(batches)):
            fetched = collections.deque(await upcoming.popleft())
            if index + PREFETCH_BATCHES < len(batches):
                upcoming.append(self._prefetch(batches[index + PREFETCH_BATCHES]))
            while fetched:
                message, body = fetched.popleft()  # a body sent is not kept till the batch ends
                if not self._may_go_on():
                    return
                if message is not None:  # else it left the queue since the listing
                    await self._deliver_fetched(message, body)
                del message, body

    def _may_go_on(self) -> bool:
        """Whether the drain may start one more message."""
        if self.settings.max_messages and self.result.messages >= self.settings.max_messages:
            return False
        if not self.store.holder_is_current():
            # Our store heartbeat is failing: another node may take our
            # leases soon.  Stop before two drains could overlap.
            self.result.aborted = ("this node has lost the store (heartbeat failing); "
                                   "the rest stays queued")
            log.warning("%s: %s", self.session_id, self.result.aborted)
            return False
        return True

    async def _deliver_fetched(self, message: QueuedMessage, body: bytes | None) -> None:
        recipients = [r for r in message.recipients
                      if r.state == RecipientState.HELD and r.domain in self.domains]
        if not recipients:
            return
        self.result.messages += 1
        if body is not None:
            self._bodies[message.id] = body
        try:
            await self._deliver_in_transactions(message, recipients)
        finally:
            self._bodies.pop(message.id, None)

    def _prefetch(self, batch: Sequence[str]) -> asyncio.Task[list[_Fetched]]:
        return asyncio.create_task(
            asyncio.to_thread(self.store.read_ahead, batch, PREFETCH_BYTES,
                              PREFETCH_BATCH_BYTES))

    async def _body(self, message_id: str) -> AsyncIterator[bytes]:
        """The body source of the transfer: prefetched, else from the store."""
        body = self._bodies.pop(message_id, None)
        if body is None:
            async for chunk in self._stored_body(message_id):
                yield chunk
            return
        for start in range(0, len(body), CHUNK_SIZE):
            yield body[start:start + CHUNK_SIZE]

    # --- one message ---------------------------------------------------------------------
    async def _deliver_in_transactions(self, message: QueuedMessage,
                                       recipients: list[QueuedRecipient]) -> None:
        """One message through the shared transaction (net/transfer.py): its
        refusals, pipelining, 452 splitting (so a customer may take one
        recipient per transaction, as an LMTP hand-off must) and outcomes."""
        started = time.monotonic()
        await self._guarded(self.transfer.send(message, recipients))
        metrics.DELIVERY_SECONDS.labels("odmr").observe(time.monotonic() - started)

    async def _guarded(self, step: Awaitable[None]) -> None:
        """Run a step of the transfer; turn its peer failures into the drain's."""
        transfer = self.transfer
        try:
            await step
        except UnwantedData:
            # Ending it with "." could deliver an empty message: drop the
            # connection; the customer discards the open transaction (§3.8).
            self.result.aborted = "customer accepted DATA without recipients; connection dropped"
            log.warning("%s: %s", self.session_id, self.result.aborted)
            self.conn.abort()
            raise _Abort() from None
        except ResetRefused:
            raise _Abort() from None
        except PEER_ERRORS:
            for rcpt in transfer.unsettled:
                event("drain", rcpt.message_id, to=f"<{rcpt.address}>", relay=self.result.relay,
                      status="deferred",
                      reason="connection lost during the transaction: kept, possible duplicate")
            self.result.deferred += len(transfer.unsettled)
            raise

    async def _settle(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                      reply: Reply, stage: str = STAGE_FINAL) -> None:
        """Record the outcome of `reply` for `recipients`, durably, before going on.
        Only a 2xx to the final dot delivers (the transfer makes any other
        positive reply a 4xx); 5xx fails with a DSN; 4xx keeps them queued."""
        if 200 <= reply.code < 300:
            ids = [r.id for r in recipients]
            dsn = None
            notify = [r for r in recipients if wants_notice(r, Action.RELAYED)]
            if notify and not self.client.has("DSN"):
                # RFC 3461 §4.2: the customer does not do DSN, so the sender
                # who asked for NOTIFY=SUCCESS hears "relayed" from us.
                remote_mta = self.result.relay.split("[", 1)[0]
                dsn = await asyncio.to_thread(
                    build_dsn, self.store, hostname=self.hostname, message=message,
                    action=Action.RELAYED,
                    reports=[RecipientReport(r, "2.0.0", reply, remote_mta) for r in notify],
                    sender_domain_hosted=await self._sender_domain_hosted(message.sender),
                )
            if dsn is None:
                if self.commits.error is not None:
                    # The store failed: these stay queued too (a duplicate later).
                    raise self.commits.error
                self.commits.add(message.id, ids)
                dsn_id = None
            else:
                try:
                    dsn_id = await asyncio.to_thread(self.store.record_delivered, ids,
                                                     str(reply), dsn)
                finally:
                    dsn[1].close()
            self.result.delivered += len(recipients)
            self._log(message, recipients, reply, "sent")
            if dsn_id is not None:
                event("drain", message.id, status="dsn",
                      reason=f"sender delivery status notification (relayed): {dsn_id}")
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
        return await lookup_domain(self.store, domain) is not None

    def _log(self, message: QueuedMessage, recipients: list[QueuedRecipient], reply: Reply,
             status: str) -> None:
        delay = max(0.0, time.time() - message.received_at)
        metrics.RECIPIENTS.labels("odmr", status).inc(len(recipients))
        for rcpt in recipients:
            event("drain", message.id, to=f"<{rcpt.address}>", relay=self.result.relay,
                  delay=f"{delay:.1f}", dsn=reply.enhanced or f"{reply.code // 100}.0.0",
                  status=status, reason=str(reply))


async def drain(conn: Connection, store: HostedMail, *, domains: Sequence[str], hostname: str,
                session_id: str, settings: DrainSettings) -> DrainResult:
    """Run the reversed session on `conn`; see the module docstring."""
    return await Drain(conn, store, domains=domains, hostname=hostname, session_id=session_id,
                       settings=settings).run()
