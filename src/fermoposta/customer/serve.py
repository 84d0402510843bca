"""The customer's reversed session: an SMTP server for the provider (RFC 2645 §5.3).

Contract:
- Runs on the connection the ATRN 250 came back on (TLS unchanged) and
  speaks first: our 220 greeting, right away (RFC 2645 §5.3).
- A full RFC 5321 receiver (the shared `TransactionSession`): EHLO with SIZE,
  8BITMIME, PIPELINING, ENHANCEDSTATUSCODES, SMTPUTF8; no STARTTLS and no AUTH
  (the provider is trusted through our own authenticated dial-out); ATRN,
  TURN and ETRN get 502: no re-reversal.
- RCPT only for this pull's domains (else 550 5.7.1); then the delivery
  backend's check (550 5.1.1 unknown user); a backend that maps per-recipient
  outcomes (LMTP, SMTP relay) takes one recipient per transaction: further
  RCPTs get 452 4.5.3 and the provider sends them in another transaction.
- The final dot gets the backend's reply: 250 only after the message is
  committed locally.  A dropped connection mid-DATA stores nothing.
- Every accepted message is recorded in `received` for the pull summary.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import IO

from fermoposta.customer.delivery.base import Delivery, LocalEnvelope, LocalRecipient
from fermoposta.net.connection import Connection
from fermoposta.net.server_session import SessionLimits
from fermoposta.net.transaction import Recipient, Transaction, TransactionSession
from fermoposta.ops.log import event
from fermoposta.smtp.reply import Reply

log = logging.getLogger("fermoposta.customer")

NOT_OUR_DOMAIN = Reply(550, "5.7.1", "Relaying denied: not a domain of this site")
ONE_AT_A_TIME = Reply(452, "4.5.3", "Too many recipients: send the others in a new transaction")
LOCAL_FAILURE = Reply(451, "4.3.0", "Local delivery failed, try again later")

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


class ReversedSession(TransactionSession):
    component = "customer"

    def __init__(self, conn: Connection, *, hostname: str, limits: SessionLimits,
                 accept_domains: frozenset[str], delivery: Delivery, session_id: str) -> None:
        super().__init__(conn, hostname=hostname, limits=limits, tls_context=None,
                         session_id=session_id)
        self.accept_domains = accept_domains
        self.delivery = delivery
        self.received: list[ReceivedMessage] = []
        self.refused = 0  # transactions or recipients refused for good (5xx)
        self.deferred = 0  # ... or for now (4xx): still held at the provider
        self.quit_seen = False

    def counts_as_error(self, reply: Reply) -> bool:
        # The provider is trusted (we dialled it and authenticated it): only
        # protocol errors count.  Refused recipients are not its mistakes, and
        # 452 4.5.3 is how we ask for one recipient per transaction; counting
        # them would cut the session short and strand the mail behind.
        return 500 <= reply.code <= 504

    def greeting(self) -> Reply:
        return Reply(220, None, f"{self.hostname} ESMTP fermoposta customer ready")

    async def smtp_quit(self, arg: str) -> Reply:
        self.quit_seen = True
        return await super().smtp_quit(arg)

    async def check_recipient(self, txn: Transaction, rcpt: Recipient) -> Reply | None:
        limit = self.delivery.max_recipients
        if rcpt.domain not in self.accept_domains:
            refusal: Reply | None = NOT_OUR_DOMAIN
        elif limit is not None and len(txn.recipients) >= limit:
            return ONE_AT_A_TIME  # not a refusal: it comes in the next transaction
        else:
            local = LocalRecipient(address=rcpt.path.address, local=rcpt.local,
                                   domain=rcpt.domain)
            try:
                refusal = await self.delivery.check_recipient(local)
            except Exception:
                log.exception("%s: delivery check failed for <%s>", self.session_id,
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
        try:
            outcome = await self.delivery.deliver(envelope, body, size)
            reply, where = outcome.reply, outcome.where
        except Exception:
            log.exception("%s: delivery failed", self.session_id)
            reply, where = LOCAL_FAILURE, self.delivery.name
        status = "delivered" if reply.is_positive else (
            "deferred" if reply.is_temporary else "refused")
        for rcpt in envelope.recipients:
            event("customer", queue_id or self.session_id, to=f"<{rcpt.address}>",
                  relay=where, size=size, dsn=reply.enhanced or f"{reply.code // 100}.0.0",
                  status=status, reason=str(reply))
        if reply.is_positive:
            self.received.append(ReceivedMessage(queue_id, envelope.sender,
                                                 tuple(r.address for r in envelope.recipients),
                                                 size, str(reply), where))
        else:
            self._count(reply)
        return reply


def reversed_session(conn: Connection, *, hostname: str, accept_domains: frozenset[str],
                     delivery: Delivery, session_id: str, max_message_size: int,
                     command_timeout: float = 600.0) -> ReversedSession:
    limits = SessionLimits(
        # RFC 5321 §4.5.3.2.7 says 5 minutes; we allow the provider more, as
        # it may be scanning its queue between messages.
        command_timeout=command_timeout,
        max_message_size=max_message_size,
        # Be liberal with our own provider: it may accept longer lines than
        # RFC 5321's 1000 octets, and refusing them here would bounce mail
        # that the local store takes without trouble.
        max_line_length=65536,
    )
    return ReversedSession(conn, hostname=hostname, limits=limits, accept_domains=accept_domains,
                           delivery=delivery, session_id=session_id)


__all__ = ["ReceivedMessage", "ReversedSession", "provider_queue_id", "reversed_session"]
