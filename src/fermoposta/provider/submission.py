"""The provider's submission service: the customers' outgoing mail (RFC 6409, RFC 8314).

Contract:
- MAIL needs a successful AUTH first (530 5.7.0), with the same accounts
  and mechanisms as ODMR (`mail.auth`: PLAIN/LOGIN only under TLS).
- With `[submission] restrict_senders` (default) the envelope sender must be
  an address in one of the account's domains (or the null sender `<>`,
  which a site's own delivery notices use); anything else gets 553 5.7.1.
  No open relay: unauthenticated peers
  cannot send anywhere, authenticated ones only as themselves.
- At most `rate_limit` messages per account per `rate_window` (450 4.7.1
  beyond), counted in the store: shared by every process and node on it.
  A store error at the check is a 451; after the commit, only a warning.
- Any recipient is accepted (that is the point of submission).  Recipients
  in domains we host are stored HELD for their customer; the rest OUTBOUND
  for delivery to the Internet.  250 only after the durable commit, as on
  the MX; then `on_queued()` wakes the outbound runner.
- Each refusal is counted in `fermoposta_smtp_rejects_total` (rate_limit,
  or other for a sender not owned or a recipient without a domain) and its
  log line carries the structured fields of `TransactionSession.reject`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, ClassVar, Protocol

from fermoposta.mail.auth import Authenticator, AuthPolicy
from fermoposta.net.connection import Connection
from fermoposta.net.server_session import SessionLimits
from fermoposta.net.transaction import Recipient, Transaction, TransactionSession
from fermoposta.ops import metrics
from fermoposta.ops.log import event
from fermoposta.smtp.command import Path, normalize_domain, split_address
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.server import AUTH_IN_TRANSACTION, NESTED_MAIL, Needs, VerbSpec, verb_table
from fermoposta.store.base import (
    BodyStage,
    Directory,
    MessageOrigin,
    MessageQueue,
    NewMessage,
    NewRecipient,
    RateCounter,
    RecipientState,
    StoreError,
    lookup_domain,
    new_queue_id,
)
from fermoposta.store.group_commit import GroupCommit

log = logging.getLogger("fermoposta.submission")


class SubmissionStore(MessageQueue, Directory, RateCounter, Protocol):
    """What submission uses: enqueue, the hosted domains, the rate counts."""

SENDER_NOT_OWNED = Reply(
    553, "5.7.1", "Sender address rejected: not owned by the authenticated user"
)
RATE_LIMITED = Reply(450, "4.7.1", "Message rate limit exceeded, try again later")
TRY_LATER = Reply(451, "4.3.0", "Temporary local problem, try again later")
NEEDS_DOMAIN = Reply(550, "5.1.3", "Recipient address needs a domain")


class RateLimiter:
    """Submissions per account in a sliding window, counted in the store
    (`RateCounter`), so that every process and node on one store shares the
    count.  Times are wall-clock (`clock`, default `time.time`): the events
    are compared across machines.  Store errors propagate (`StoreError`)."""

    def __init__(self, counter: RateCounter, limit: int, window: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.counter = counter
        self.limit = limit
        self.window = window
        self.clock = clock

    @staticmethod
    def _key(account: str) -> str:
        return f"submission:{account}"

    def allows(self, account: str) -> bool:
        if self.limit <= 0:
            return True
        since = self.clock() - self.window
        return self.counter.count_events(self._key(account), since) < self.limit

    def record(self, account: str) -> None:
        if self.limit > 0:
            self.counter.add_event(self._key(account), self.clock(), self.window)


@dataclass(frozen=True, slots=True)
class SubmissionSettings:
    mechanisms: tuple[str, ...] = ("SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5", "EXTERNAL")
    allow_plaintext_auth: bool = False
    require_tls: bool = False
    max_auth_failures: int = 3
    restrict_senders: bool = True


class SubmissionSession(TransactionSession):
    component = "submission"
    dsn_extension = True

    def __init__(
        self,
        conn: Connection,
        *,
        hostname: str,
        limits: SessionLimits,
        store: SubmissionStore,
        settings: SubmissionSettings,
        rate_limiter: RateLimiter,
        tls_context: ssl.SSLContext | None = None,
        on_queued: Callable[[], None] | None = None,
        intake: GroupCommit | None = None,
    ) -> None:
        super().__init__(conn, hostname=hostname, limits=limits, tls_context=tls_context)
        self.store = store
        self.intake = intake or GroupCommit(store)  # the provider's, shared by its sessions
        self.settings = settings
        self.rate_limiter = rate_limiter
        self.on_queued = on_queued
        policy: AuthPolicy = settings
        self.auth = Authenticator(self, store, policy)

    def greeting(self) -> Reply:
        return Reply(220, None, f"{self.hostname} ESMTP fermoposta submission")

    # The group commit waits for the messages of open transactions (GroupCommit).
    def transaction_opened(self) -> None:
        self.intake.transaction_opened(self)

    def transaction_closed(self) -> None:
        self.intake.transaction_closed(self)

    def extensions(self) -> list[str]:
        mechs = self.auth.offered_mechanisms()
        auth = [f"AUTH {' '.join(mechs)}"] if mechs and self.auth.account is None else []
        return [*auth, *super().extensions()]

    def reset_after_tls(self) -> None:
        super().reset_after_tls()
        self.auth.account = None

    @property
    def authenticated_as(self) -> str | None:  # type: ignore[override]
        return self.auth.account

    def authenticated_account(self) -> str | None:
        return self.auth.account

    async def smtp_auth(self, arg: str) -> Reply | None:
        return await self.auth.smtp_auth(arg)

    async def check_sender(self, sender: Path) -> Reply | None:
        account = self.auth.account
        assert account is not None  # Needs.AUTH
        # The rate limit first (after the MAIL syntax, so its log line has the sender).
        try:
            allowed = await asyncio.to_thread(self.rate_limiter.allows, account)
        except StoreError as exc:
            self.log.warning("%s: store error at MAIL: %s", self.session_id, exc)
            return TRY_LATER
        if not allowed:
            return self.reject(RATE_LIMITED, "rate_limit", stage="MAIL", sender=sender.address,
                               text=f"{self.session_id}: rate limit for {account}",
                               sasl_username=account)
        if not self.settings.restrict_senders:
            return None
        if not sender.address:
            # The null sender is a site's own notice (a DSN from its local
            # retry spool, RFC 3464 / RFC 5321 §4.5.5): it owns no address to
            # check.  Authenticated, rate-limited and logged with the account.
            self.log.info("%s: %s sends a notice (MAIL FROM:<>)", self.session_id, account)
            return None
        not_owned = f"{self.session_id}: {account} may not send as <{sender.address}>"
        if "@" not in sender.address:
            return self.reject(SENDER_NOT_OWNED, "other", stage="MAIL", sender=sender.address,
                               text=not_owned, sasl_username=account)
        try:
            domain = normalize_domain(split_address(sender.address)[1])
            owned = await asyncio.to_thread(self.store.list_domains, account)
        except ValueError:
            return self.reject(SENDER_NOT_OWNED, "other", stage="MAIL", sender=sender.address,
                               text=not_owned, sasl_username=account)
        except StoreError as exc:
            self.log.warning("%s: store error at MAIL: %s", self.session_id, exc)
            return TRY_LATER
        if domain not in {d.name for d in owned}:
            return self.reject(SENDER_NOT_OWNED, "other", stage="MAIL", sender=sender.address,
                               text=not_owned, sasl_username=account)
        return None

    async def check_recipient(self, txn: Transaction, rcpt: Recipient) -> Reply | None:
        if not rcpt.domain:  # a bare <postmaster> means ours; we have none to offer
            return self.reject(NEEDS_DOMAIN, "other", stage="RCPT", sender=txn.sender.address,
                               recipients=[rcpt.path.address], sasl_username=self.auth.account)
        return None

    def trace_header(self, txn: Transaction) -> bytes:
        txn.queue_id = new_queue_id()
        return super().trace_header(txn)

    def body_stage(self, txn: Transaction, spool: IO[bytes]) -> BodyStage | None:
        if txn.queue_id is None:
            return None
        return self.intake.queue.stage_body(txn.queue_id, spool)

    async def accept_message(self, txn: Transaction, body: IO[bytes], size: int) -> Reply:
        account = self.auth.account
        assert account is not None
        try:
            hosted = {r.domain for r in txn.recipients
                      if await lookup_domain(self.store, r.domain) is not None}
            message = NewMessage(
                sender=txn.sender.address,
                recipients=tuple(
                    NewRecipient(address=r.path.address, domain=r.domain,
                                 state=RecipientState.HELD if r.domain in hosted
                                 else RecipientState.OUTBOUND,
                                 notify=r.notify, orcpt=r.orcpt)
                    for r in txn.recipients
                ),
                origin=MessageOrigin.SUBMISSION,
                smtputf8=txn.smtputf8,
                body_8bit=txn.body_8bit,
                envid=txn.envid,
                ret=txn.ret,
                client=f"{self.peer_description()} sasl_username={account}",
                wire_ready=txn.wire_ready,
            )
            queue_id = await self.intake.enqueue(message, body, txn.queue_id)
        except StoreError as exc:
            self.log.warning("%s: store error at DATA: %s", self.session_id, exc)
            return TRY_LATER
        try:
            await asyncio.to_thread(self.rate_limiter.record, account)
        except StoreError as exc:  # the message is stored: only the count is short
            self.log.warning("%s: %s: cannot count the submission for the rate limit: %s",
                             self.session_id, queue_id, exc)
        metrics.MESSAGES_RECEIVED.labels("submission").inc()
        metrics.MESSAGE_BYTES.labels("submission").inc(size)
        event("submission", queue_id, client=self.peer_description(), sasl_username=account)
        event("submission", queue_id, **{"from": f"<{txn.sender.address}>"}, size=size,
              nrcpt=len(txn.recipients), held=len([r for r in txn.recipients
                                                   if r.domain in hosted]),
              status="queued")
        if self.on_queued is not None:
            self.on_queued()
        return Reply(250, "2.0.0", f"OK queued as {queue_id}")

    VERBS: ClassVar[Mapping[str, VerbSpec]] = verb_table(
        VerbSpec("AUTH", "smtp_auth", Needs.NO_TRANSACTION, sequence_reply=AUTH_IN_TRANSACTION),
        # RFC 6409 §4.3: no mail without authentication (530 before anything else).
        VerbSpec("MAIL", "smtp_mail", Needs.AUTH | Needs.HELO | Needs.NO_TRANSACTION,
                 sequence_reply=NESTED_MAIL),
        base=TransactionSession.VERBS,
    )


__all__ = ["RateLimiter", "SubmissionSession", "SubmissionSettings"]
