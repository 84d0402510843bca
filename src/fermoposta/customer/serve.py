"""The customer's reversed session: an SMTP server for the provider (RFC 2645 §5.3).

Contract:
- Runs on the connection the ATRN 250 came back on (TLS unchanged) and
  speaks first: our 220 greeting, right away (RFC 2645 §5.3).
- A full RFC 5321 receiver (the shared `TransactionSession`): EHLO with SIZE,
  8BITMIME, PIPELINING, CHUNKING, ENHANCEDSTATUSCODES, SMTPUTF8; no STARTTLS
  and no AUTH (the provider is trusted through our own authenticated
  dial-out); ATRN, TURN and ETRN get 502: no re-reversal.
- CHUNKING (RFC 3030): the provider may send a message as ``BDAT <n>
  [LAST]`` chunks, several transactions in flight, instead of DATA; the
  chunks get DATA's checks and replies (`TransactionSession.smtp_bdat`), and
  the local delivery sees the same spooled body either way.
- Up to 100 recipients per transaction (RFC 5321 §4.5.3.1.8 requires at
  least 100), advertised as ``LIMITS RCPTMAX=100`` (RFC 9422); the 101st
  gets 452 4.5.3 and the provider sends it in another transaction.
- RCPT only for this pull's domains (else 550 5.7.1); then the recipient
  goes to the local transaction (`Delivery.transaction`, opened at the first
  recipient and following the provider's: SMTP and LMTP next hops see MAIL
  and each RCPT as they come), whose refusal (550 5.1.1 unknown user, a 4xx
  when the target is down) is the RCPT reply.  RSET, a new MAIL, a refused
  DATA or BDAT or the end of the session abort the local transaction.
- The final dot gets one reply for every accepted recipient, from their
  local outcomes (one each; SMTP and Maildir give the same to all):
  * all 2xx: 250 (their text if they are all the same, else "Delivered
    to <n> recipients");
  * none 2xx: the first failure mirrored, 5xx only if all are permanent
    (else 4xx: the provider keeps them all, nothing was delivered);
  * mixed (LMTP): the failed recipients are committed to the local retry
    spool (`local_retry.spool_failures`: 4xx retried after each pull until
    ``local_retry_lifetime``, 5xx failed at once with a notice to the
    sender) and only then 250; if the spool cannot be written, 451 4.3.0:
    the provider keeps the whole message (a duplicate is possible for the
    recipients already delivered, a loss is not).  Without a spool
    (`spool=None`), mixed outcomes get 451 4.3.0 the same way.
  The reply is given only after the local commits (to BDAT LAST as to the
  final dot); a dropped connection mid-DATA or mid-chunk stores nothing.
- Group commit, with a delivery that offers it (`GroupCommit`: Maildir):
  a message's files are written (`stage`; bodies up to
  `BACKGROUND_STAGE_MAX` in the background, from a copy, while the next
  commands are read) and its reply, and every reply after it, are kept
  while the provider's next command is already here (it keeps messages in
  flight); then the staged messages are committed together
  (`commit_staged`: each file fsync()ed and renamed, one fsync of each
  `new/`), and the replies go, in order, each 250 only for a message now
  committed.  At most `GROUP_MAX` messages or `GROUP_WAIT` seconds per
  group; a reply is never kept while we wait for the provider (before a
  354, or a chunk whose octets are not all here yet).  A message whose
  commit fails gets its 4xx alone.  A kept reply counts (errors, a 421
  that closes) when it is made, in order with the deliveries that reset
  the count; a 421 ends the group at once.  Nothing is committed once the
  replies can no longer reach the provider (its TLS close), and messages
  not answered when the session ends (the provider gone, the customer
  stopped) are discarded (`discard_staged`): the provider keeps them.
- Every accepted message is recorded in `received` for the pull summary.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from fermoposta.customer.delivery.base import (
    Delivery,
    DeliveryOutcome,
    GroupCommit,
    LocalEnvelope,
    LocalRecipient,
    LocalSender,
    LocalTransaction,
)
from fermoposta.net.connection import Connection, ConnectionClosed
from fermoposta.net.server_session import SessionLimits
from fermoposta.net.transaction import Recipient, Transaction, TransactionSession
from fermoposta.ops.log import event
from fermoposta.smtp.chunking import parse_bdat
from fermoposta.smtp.reply import Reply

log = logging.getLogger("fermoposta.customer")

NOT_OUR_DOMAIN = Reply(550, "5.7.1", "Relaying denied: not a domain of this site")
LOCAL_FAILURE = Reply(451, "4.3.0", "Local delivery failed, try again later")
SPOOL_FAILED = Reply(451, "4.3.0", "Local delivery incomplete and the local retry spool failed, "
                     "try again later")
#: RCPTs per transaction: RFC 5321 §4.5.3.1.8 says at least 100.
MAX_RECIPIENTS = 100
#: Group commit: at most so many staged messages, or so many seconds since
#: the first of them, before their replies go (with fewer once the provider
#: has nothing more buffered for us).
GROUP_MAX = 16
GROUP_WAIT = 0.05
#: Bodies up to this size are written out in the background (from a copy
#: in memory) while the next messages arrive; bigger ones before the reply.
BACKGROUND_STAGE_MAX = 256 * 1024

# "... by mx.provider.test (fermoposta) with ESMTP id 4F9D195432C" in the
# provider's Received: header tells us its queue id for the logs.
_QUEUE_ID = re.compile(rb"\sid\s+([A-Za-z0-9]+)[\s;]")


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    provider_queue_id: str
    sender: str
    recipients: tuple[str, ...]
    size: int
    reply: str
    where: str


def provider_queue_id(body: IO[bytes]) -> str:
    """The queue id in the first Received: header written by the provider, or ""."""
    head = body.read(8192)
    body.seek(0)
    # Our own trace header comes first; the provider's is the second one.
    headers = head.split(b"\r\n\r\n", 1)[0]
    fields = re.split(rb"\r\n(?=\S)", headers)
    received = [f for f in fields if f[:9].lower() == b"received:"]
    for field in received[1:2]:
        match = _QUEUE_ID.search(field)
        if match:
            return match.group(1).decode("ascii")
    return ""


SpoolFailures = Callable[[LocalEnvelope, IO[bytes], Sequence[tuple[LocalRecipient, Reply]], str],
                         str]


class _StageFailed(Exception):
    def __init__(self, outcome: DeliveryOutcome) -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome


@dataclass(eq=False, slots=True)
class _Staged:
    """A message written but not committed: `provisional` stands for its reply
    until the group commit gives the real one (never sent itself)."""

    provisional: Reply
    stage: asyncio.Future[Any]  # GroupCommit.stage: the backend's handle, or the failure
    envelope: LocalEnvelope
    size: int
    queue_id: str
    since: float  # loop time


class ReversedSession(TransactionSession):
    component = "customer"
    offer_chunking = True  # the provider's drain keeps several messages in flight

    def __init__(self, conn: Connection, *, hostname: str, limits: SessionLimits,
                 accept_domains: frozenset[str], delivery: Delivery, session_id: str,
                 spool: SpoolFailures | None = None) -> None:
        super().__init__(conn, hostname=hostname, limits=limits, tls_context=None,
                         session_id=session_id)
        self.accept_domains = accept_domains
        self.delivery = delivery
        self.spool = spool
        self.local: LocalTransaction | None = None
        self.received: list[ReceivedMessage] = []
        self.refused = 0  # transactions or recipients refused for good (5xx)
        self.deferred = 0  # ... or for now (4xx): still held at the provider
        self.spooled = 0  # recipients taken into the local retry spool
        self.quit_seen = False
        # Group commit: replies in order, staged messages among them, and the
        # staged messages whose provisional reply has not come back yet.
        self._outbox: list[Reply | _Staged] = []
        self._staged: dict[int, _Staged] = {}
        self._unanswered: list[Reply | _Staged] = []  # a flush under way

    def counts_as_error(self, reply: Reply) -> bool:
        # The provider is trusted (we dialled it and authenticated it): only
        # protocol errors count.  Refused recipients are not its mistakes;
        # counting them would cut the session short and strand the mail behind.
        return 500 <= reply.code <= 504

    def greeting(self) -> Reply:
        return Reply(220, None, f"{self.hostname} ESMTP fermoposta customer ready")

    def extensions(self) -> list[str]:
        # RFC 9422 §4.1: tell the provider how many RCPTs one transaction takes.
        return [*super().extensions(), f"LIMITS RCPTMAX={self.limits.max_recipients}"]

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            await self._discard_staged()
            await self._end_local()

    # --- group commit ----------------------------------------------------------------------
    async def reply(self, reply: Reply) -> None:
        staged = self._staged.get(id(reply))
        if staged is not None and staged.provisional is reply:
            del self._staged[id(reply)]
        else:
            staged = None
        if staged is None and not self._outbox:
            await super().reply(reply)
            return
        self._outbox.append(reply if staged is None else staged)
        if staged is None:
            # The session's bookkeeping as the reply is made, not when it is
            # sent: errors count in order with the deliveries that reset
            # them, and a 421 ends the group (nothing is read after it).
            for extra in self.machine.replied(reply, counts=self.counts_as_error(reply)):
                self.log.info("%s: too many errors from %s", self.session_id,
                              self.peer_description())
                self._outbox.append(extra)
            if self.machine.closing:
                self.closing = True
        if not self._more_to_group():
            await self._flush_outbox()

    def _more_to_group(self) -> bool:
        """Keep the replies while the provider's next command is already here
        (it keeps messages in flight) and the group is small and young."""
        group = [e for e in self._outbox if isinstance(e, _Staged)]
        return (bool(group) and self.conn.line_pending() and not self.closing
                and not self.machine.closing and len(group) < GROUP_MAX
                and asyncio.get_running_loop().time() - group[0].since < GROUP_WAIT)

    async def send(self, reply: Reply) -> None:
        if self._outbox:  # a 354 or a greeting never overtakes a reply
            await self._flush_outbox()
        await super().send(reply)

    async def _flush_outbox(self) -> None:
        """Commit the staged messages together, then send every reply kept, in order."""
        outbox, self._outbox = self._outbox, []
        self._unanswered = outbox  # for `_discard_staged` if we never get to the end
        group = [e for e in outbox if isinstance(e, _Staged)]
        final: dict[int, Reply] = {}
        if group:
            assert isinstance(self.delivery, GroupCommit)
            outcomes: dict[int, DeliveryOutcome] = {}
            handles: list[tuple[_Staged, Any]] = []
            for g in group:  # phase 1 may still be under way, or have failed
                staged = await self._staged_result(g)
                if isinstance(staged, DeliveryOutcome):
                    outcomes[id(g)] = staged
                else:
                    handles.append((g, staged))
            if handles and not self.conn.can_reply:
                # The provider's TLS close came after these messages: no 250
                # can reach it any more, so nothing is committed (it keeps
                # them; `_discard_staged` removes their files).
                raise ConnectionClosed("provider closed before the replies to its messages")
            if handles:
                try:
                    done = await self.delivery.commit_staged([h for _, h in handles])
                    if len(done) != len(handles):
                        raise RuntimeError(f"{len(done)} outcomes for {len(handles)} messages")
                except Exception:
                    log.exception("%s: group commit failed", self.session_id)
                    done = [DeliveryOutcome(LOCAL_FAILURE, self.delivery.name)] * len(handles)
                outcomes.update((id(g), outcome) for (g, _), outcome in zip(handles, done,
                                                                            strict=True))
            for g in group:
                outcome = outcomes[id(g)]
                final[id(g)] = await self._conclude(
                    g.envelope, None, [outcome.reply] * len(g.envelope.recipients),
                    outcome.where, g.size, g.queue_id)
        self._unanswered = []
        for entry in outbox:
            # Accounted for when made (`reply`); a message's own reply is
            # never an error the session counts (a 4xx at worst).
            await super().send(final[id(entry)] if isinstance(entry, _Staged) else entry)
        self.conn.flush()  # the provider waits for these to send more

    async def _discard_staged(self) -> None:
        """The session ended before these replies: the provider keeps the
        messages, so nothing of them may stay."""
        left = [e for e in [*self._unanswered, *self._outbox, *self._staged.values()]
                if isinstance(e, _Staged)]
        self._outbox, self._staged, self._unanswered = [], {}, []
        if not left:
            return
        log.info("%s: %d message(s) not answered when the session ended: not delivered, "
                 "the provider keeps them", self.session_id, len(left))
        assert isinstance(self.delivery, GroupCommit)
        handles = [h for h in [await self._staged_result(g) for g in left]
                   if not isinstance(h, DeliveryOutcome)]
        try:
            await self.delivery.discard_staged(handles)
        except Exception:
            log.exception("%s: removing uncommitted messages failed", self.session_id)

    async def _staged_result(self, staged: _Staged) -> Any:
        """Phase 1's handle, or its failure as a `DeliveryOutcome`."""
        try:
            # Shielded: a cancelled session must still learn what to remove.
            return await asyncio.shield(staged.stage)
        except Exception:
            log.exception("%s: delivery failed", self.session_id)
            return DeliveryOutcome(LOCAL_FAILURE, self.delivery.name)

    async def smtp_quit(self, arg: str) -> Reply:
        self.quit_seen = True
        return await super().smtp_quit(arg)

    async def smtp_mail(self, arg: str) -> Reply:
        await self._end_local()  # a transaction left by RSET, EHLO or a failed DATA
        return await super().smtp_mail(arg)

    async def smtp_rset(self, arg: str) -> Reply:
        await self._end_local()
        return await super().smtp_rset(arg)

    async def smtp_data(self, arg: str) -> Reply | None:
        try:
            return await super().smtp_data(arg)
        finally:
            if self.transaction is None:  # the transaction ended, delivered or not
                await self._end_local()

    async def smtp_bdat(self, arg: str) -> Reply | None:
        if self._outbox:
            # Never wait for the provider while holding replies it may be
            # waiting for: the chunk's octets must all be here already.
            try:
                whole = self.conn.buffered() >= parse_bdat(arg).size
            except ValueError:
                whole = False
            if not whole:
                await self._flush_outbox()
        try:
            return await super().smtp_bdat(arg)
        finally:
            if self.transaction is None:  # LAST, or a refusal ended it
                await self._end_local()

    async def _end_local(self) -> None:
        local, self.local = self.local, None
        if local is not None:
            try:
                await local.abort()
            except Exception:
                log.exception("%s: ending the local transaction failed", self.session_id)

    async def check_recipient(self, txn: Transaction, rcpt: Recipient) -> Reply | None:
        if rcpt.domain not in self.accept_domains:
            refusal: Reply | None = NOT_OUR_DOMAIN
        else:
            local = LocalRecipient(address=rcpt.path.address, local=rcpt.local,
                                   domain=rcpt.domain)
            try:
                if self.local is None:
                    self.local = self.delivery.transaction(LocalSender(
                        sender=txn.sender.address, smtputf8=txn.smtputf8,
                        body_8bit=txn.body_8bit, size=txn.declared_size))
                refusal = await self.local.add_recipient(local)
            except Exception:
                log.exception("%s: local delivery failed at RCPT for <%s>", self.session_id,
                              rcpt.path.address)
                refusal = LOCAL_FAILURE
        if refusal is not None:
            self._count(refusal)
            event("customer", self.session_id, to=f"<{rcpt.path.address}>",
                  dsn=refusal.enhanced or f"{refusal.code // 100}.0.0",
                  status="deferred" if refusal.is_temporary else "refused",
                  reason=f"at RCPT: {refusal}")
        return refusal

    def _count(self, reply: Reply) -> None:
        if reply.is_temporary:
            self.deferred += 1
        elif reply.is_permanent:
            self.refused += 1

    async def accept_message(self, txn: Transaction, body: IO[bytes], size: int) -> Reply:
        queue_id = provider_queue_id(body)
        envelope = LocalEnvelope(
            sender=txn.sender.address,
            recipients=tuple(LocalRecipient(r.path.address, r.local, r.domain)
                             for r in txn.recipients),
            smtputf8=txn.smtputf8,
            body_8bit=txn.body_8bit,
            queue_hint=queue_id,
        )
        local, self.local = self.local, None
        where = self.delivery.name
        try:
            if local is None:  # every accepted RCPT went through it: a bug
                raise RuntimeError("no local transaction at DATA")
            if isinstance(self.delivery, GroupCommit):
                loop = asyncio.get_running_loop()
                stage: asyncio.Future[Any]
                if size <= BACKGROUND_STAGE_MAX:
                    # Written while the next messages arrive; the spool
                    # closes when we return, so from a copy.
                    stage = asyncio.ensure_future(
                        self.delivery.stage(envelope, io.BytesIO(body.read())))
                else:
                    staged = await self.delivery.stage(envelope, body)
                    if isinstance(staged, DeliveryOutcome):
                        raise _StageFailed(staged)
                    stage = loop.create_future()
                    stage.set_result(staged)
                # Committed with the messages around it (`_flush_outbox`).
                provisional = Reply(250, "2.0.0", "Staged")
                self._staged[id(provisional)] = _Staged(provisional, stage, envelope, size,
                                                        queue_id, loop.time())
                return provisional
            else:
                replies = await local.data(body, size)
                where = local.where
            if len(replies) != len(envelope.recipients):
                raise RuntimeError(f"{len(replies)} local replies for "
                                   f"{len(envelope.recipients)} recipients")
        except _StageFailed as failed:
            replies = [failed.outcome.reply] * len(envelope.recipients)
            where = failed.outcome.where
        except Exception:
            log.exception("%s: delivery failed", self.session_id)
            replies = [LOCAL_FAILURE] * len(envelope.recipients)
        finally:
            if local is not None:
                await _abort_quietly(local)
        return await self._conclude(envelope, body, replies, where, size, queue_id)

    async def _conclude(self, envelope: LocalEnvelope, body: IO[bytes] | None,
                        replies: list[Reply], where: str, size: int, queue_id: str) -> Reply:
        """The message's one reply from its recipients' local outcomes: logged,
        counted and recorded for the pull summary."""
        reply, spooled = await self._final_reply(envelope, body, replies, where)
        spooled_addresses = {r.address for r, _ in spooled}
        delivered: list[str] = []
        for rcpt, own in zip(envelope.recipients, replies, strict=True):
            if own.is_positive:
                delivered.append(rcpt.address)
            if reply.is_positive and rcpt.address in spooled_addresses:
                status = "spooled"
            else:
                status = "delivered" if own.is_positive else (
                    "deferred" if reply.is_temporary else "refused")
            shown = own if reply.is_positive or own.is_positive else reply
            event("customer", queue_id or self.session_id, to=f"<{rcpt.address}>",
                  relay=where, size=size, dsn=shown.enhanced or f"{shown.code // 100}.0.0",
                  status=status, reason=str(shown))
        if reply.is_positive:
            self.spooled += len(spooled)
            self.received.append(ReceivedMessage(queue_id, envelope.sender,
                                                 tuple(delivered), size, str(reply), where))
        else:
            for _ in envelope.recipients:
                self._count(reply)
        return reply

    async def _final_reply(self, envelope: LocalEnvelope, body: IO[bytes] | None,
                           replies: list[Reply], where: str
                           ) -> tuple[Reply, list[tuple[LocalRecipient, Reply]]]:
        """The one DATA reply for `replies`, and what went to the retry spool."""
        failed = [(rcpt, r) for rcpt, r in zip(envelope.recipients, replies, strict=True)
                  if not r.is_positive]
        if not failed:
            if len(set(replies)) == 1:
                return replies[0], []
            # LMTP: one 250 per recipient, each naming its own; ours covers all.
            return Reply(250, "2.0.0", f"Delivered to {len(replies)} recipients"), []
        if len(failed) == len(replies):
            if all(r.is_permanent for _, r in failed):
                return failed[0][1], []
            return next(r for _, r in failed if r.is_temporary), []
        # Mixed: the provider hears one reply for all.  We answer 250 only
        # once the failed recipients are ours for good (RFC 5321 §6.1).
        if self.spool is None or body is None:  # body: a group commit is all or nothing
            log.warning("%s: mixed local outcomes and no retry spool: deferred, a duplicate "
                        "is possible", self.session_id)
            return SPOOL_FAILED, []
        try:
            spool_id = await asyncio.to_thread(self.spool, envelope, body, failed, where)
        except Exception as exc:
            log.error("%s: local retry spool failed (%s): the provider keeps the message; "
                      "%d recipient(s) already delivered may get it twice", self.session_id,
                      exc, len(replies) - len(failed))
            return SPOOL_FAILED, []
        delivered = len(replies) - len(failed)
        return Reply(250, "2.0.0", f"Delivered to {delivered} recipient(s); {len(failed)} "
                     f"kept in the local retry spool as {spool_id}"), failed


async def _abort_quietly(local: LocalTransaction) -> None:
    try:
        await local.abort()
    except Exception:
        log.exception("ending the local transaction failed")


def reversed_session(conn: Connection, *, hostname: str, accept_domains: frozenset[str],
                     delivery: Delivery, session_id: str, max_message_size: int,
                     command_timeout: float = 600.0, spool: SpoolFailures | None = None,
                     max_recipients: int = MAX_RECIPIENTS) -> ReversedSession:
    limits = SessionLimits(
        # RFC 5321 §4.5.3.2.7 says 5 minutes; we allow the provider more, as
        # it may be scanning its queue between messages.
        command_timeout=command_timeout,
        max_message_size=max_message_size,
        # Be liberal with our own provider: it may accept longer lines than
        # RFC 5321's 1000 octets, and refusing them here would bounce mail
        # that the local store takes without trouble.
        max_line_length=65536,
        max_recipients=max_recipients,
    )
    return ReversedSession(conn, hostname=hostname, limits=limits, accept_domains=accept_domains,
                           delivery=delivery, session_id=session_id, spool=spool)


__all__ = ["MAX_RECIPIENTS", "ReceivedMessage", "ReversedSession", "SpoolFailures",
           "provider_queue_id", "reversed_session"]
