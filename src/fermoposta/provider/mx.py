"""The provider's MX listener: mail for hosted customer domains only.

Contract:
- Accepts RCPT only for domains in the store (else 550 5.7.1: we are no open
  relay, whoever the peer is); when a domain has a list of valid local parts
  (or `[mx] require_valid_recipient` is set) an unknown one gets 550 5.1.1 at
  RCPT time, so we never accept mail we would have to bounce (backscatter).
- Per-domain quotas (held messages, held bytes) answer 452 4.2.2.
- A message is answered 250 (with its queue id) only after its enqueue
  returned, i.e. after the transaction holding body and recipients was
  committed and fsynced; the provider's sessions share one
  `store.group_commit.GroupCommit`, so messages ready at the same moment
  share that commit (the session tells it when its transactions open and
  close, so that it can wait briefly for them).  Every recipient is stored
  HELD, waiting for its customer's ATRN.
- A store failure answers 451 4.3.0 (try again later); nothing is lost.
- ETRN (RFC 1985) after HELO/EHLO and outside a transaction, advertised in
  EHLO, when the session has an `EtrnService` (the provider always gives
  one): its syntax is the machine's (501), its answer the service's
  (`fermoposta.provider.etrn`); without a service it is 502.
- Each refused recipient is one ``NOQUEUE: reject: RCPT`` line and one count
  in `fermoposta_smtp_rejects_total` (`TransactionSession.reject`): reason
  relay_denied, unknown_user, quota, or other (a store error).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping
from typing import IO, ClassVar

from fermoposta.net.connection import Connection
from fermoposta.net.server_session import SessionLimits
from fermoposta.net.transaction import Recipient, Transaction, TransactionSession
from fermoposta.ops import metrics
from fermoposta.ops.log import event
from fermoposta.provider.etrn import EtrnService
from fermoposta.smtp import reply as R
from fermoposta.smtp.command import Path
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.server import Needs, VerbSpec, parse_etrn, verb_table
from fermoposta.store.base import (
    BodyStage,
    HostedMail,
    MessageOrigin,
    NewMessage,
    NewRecipient,
    RecipientState,
    StoreError,
    lookup_domain,
    new_queue_id,
)
from fermoposta.store.group_commit import GroupCommit

log = logging.getLogger("fermoposta.mx")

RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied: we are not the destination of this domain")
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
QUOTA_EXCEEDED = Reply(452, "4.2.2", "Mailbox full: domain quota exceeded, try again later")
TRY_LATER = Reply(451, "4.3.0", "Temporary local problem, try again later")
# The labelled counters, looked up once (a labels() call per message costs a lock).
_RECEIVED = metrics.MESSAGES_RECEIVED.labels("mx")
_RECEIVED_BYTES = metrics.MESSAGE_BYTES.labels("mx")


class MXSession(TransactionSession):
    component = "mx"
    dsn_extension = True

    def __init__(
        self,
        conn: Connection,
        *,
        hostname: str,
        limits: SessionLimits,
        store: HostedMail,
        tls_context: ssl.SSLContext | None = None,
        require_valid_recipient: bool = False,
        intake: GroupCommit | None = None,
        etrn: EtrnService | None = None,
    ) -> None:
        super().__init__(conn, hostname=hostname, limits=limits, tls_context=tls_context)
        self.store = store
        self.intake = intake or GroupCommit(store)
        self.require_valid_recipient = require_valid_recipient
        self.etrn = etrn

    # The group commit waits for the messages of open transactions (GroupCommit).
    def transaction_opened(self) -> None:
        self.intake.transaction_opened(self)

    def transaction_closed(self) -> None:
        self.intake.transaction_closed(self)

    def extensions(self) -> list[str]:
        return [*super().extensions(), "ETRN"] if self.etrn is not None else super().extensions()

    async def smtp_etrn(self, arg: str) -> Reply:
        # HELO first, no transaction, well-formed: the verb table and the machine saw to it.
        if self.etrn is None:
            return R.NOT_IMPLEMENTED
        return await self.etrn.request(parse_etrn(arg), self.peer_description())

    async def check_recipient(self, txn: Transaction, rcpt: Recipient) -> Reply | None:
        refusal = await self._recipient_refusal(txn, rcpt)
        if refusal is None:
            return None
        # Postfix style: a refused recipient has no queue id yet.
        reply, reason = refusal
        return self.reject(reply, reason, stage="RCPT", sender=txn.sender.address,
                           recipients=[rcpt.path.address])

    async def _recipient_refusal(self, txn: Transaction, rcpt: Recipient
                                 ) -> tuple[Reply, str] | None:
        """The refusal of a recipient and its reason (`metrics.REJECT_REASONS`)."""
        if not rcpt.domain:
            return RELAY_DENIED, "relay_denied"
        try:
            domain = await lookup_domain(self.store, rcpt.domain)
            if domain is None:
                return RELAY_DENIED, "relay_denied"
            if domain.valid_recipients is not None:
                if rcpt.local.lower() not in domain.valid_recipients:
                    return UNKNOWN_USER, "unknown_user"
            elif self.require_valid_recipient:
                return UNKNOWN_USER, "unknown_user"
            if domain.max_messages is not None or domain.max_bytes is not None:
                messages, size = await asyncio.to_thread(self.store.domain_usage, rcpt.domain)
                incoming = txn.declared_size or 0
                if domain.max_messages is not None and messages >= domain.max_messages:
                    return QUOTA_EXCEEDED, "quota"
                if domain.max_bytes is not None and size + incoming > domain.max_bytes:
                    return QUOTA_EXCEEDED, "quota"
        except StoreError as exc:
            self.log.warning("%s: store error at RCPT: %s", self.session_id, exc)
            return TRY_LATER, "other"
        return None

    async def check_sender(self, sender: Path) -> Reply | None:
        return None

    def trace_header(self, txn: Transaction) -> bytes:
        txn.queue_id = new_queue_id()  # named now so the Received: header carries it
        return super().trace_header(txn)

    def body_stage(self, txn: Transaction, spool: IO[bytes]) -> BodyStage | None:
        if txn.queue_id is None:
            return None
        return self.intake.queue.stage_body(txn.queue_id, spool)

    async def accept_message(self, txn: Transaction, body: IO[bytes], size: int) -> Reply:
        message = NewMessage(
            sender=txn.sender.address,
            recipients=tuple(
                NewRecipient(address=r.path.address, domain=r.domain, state=RecipientState.HELD,
                             notify=r.notify, orcpt=r.orcpt)
                for r in txn.recipients
            ),
            origin=MessageOrigin.MX,
            smtputf8=txn.smtputf8,
            body_8bit=txn.body_8bit,
            envid=txn.envid,
            ret=txn.ret,
            client=self.peer_description(),
            wire_ready=txn.wire_ready,
        )
        try:
            queue_id = await self.intake.enqueue(message, body, txn.queue_id)
        except StoreError as exc:
            self.log.warning("%s: store error at DATA: %s", self.session_id, exc)
            return TRY_LATER
        _RECEIVED.inc()
        _RECEIVED_BYTES.inc(size)
        event("mx", queue_id, client=self.peer_description())
        event("mx", queue_id, **{"from": f"<{txn.sender.address}>"}, size=size,
              nrcpt=len(txn.recipients), status="held")
        return Reply(250, "2.0.0", f"OK queued as {queue_id}")


    VERBS: ClassVar[Mapping[str, VerbSpec]] = verb_table(
        VerbSpec("ETRN", "smtp_etrn", Needs.HELO | Needs.NO_TRANSACTION),
        base=TransactionSession.VERBS,
    )
