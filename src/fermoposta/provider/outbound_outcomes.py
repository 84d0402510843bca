"""Outcomes of the outbound engine: what a reply does to recipients, durably.

Contract (the mixin `Outcomes`, one of `OutboundRunner`'s bases; the runner
sets the attributes it declares and provides `wake` and `_etrn_target`):
- `_settle(message, recipients, problem, session)` records the outcome of
  `problem.reply` before the caller sends its next command, except a plain
  delivery: a 2xx delivers (with a "relayed" DSN when the session's next hop
  has no DSN, committed at once with it; without a DSN the removal goes to
  `delivery_commits.DeliveredCommits`, committed in the background, gathered),
  a 5xx fails with a failure DSN (`_fail`, `_fail_each`), anything else defers
  (`_defer`, `_defer_each`): `retry_delay` up to the end of the lifetime,
  then an expiry (4.4.7); the delay notice once after `delay_notice`; an
  ETRN domain's recipients back on hold (`_hold_etrn_again`).  A 421 marks
  the session broken.  These are the outcome rules of the `provider.outbound`
  docstring.  `_settle_safely` never raises: on a store error or a bug the
  recipients stay claimed.
- DSNs go to the sender, never to `<>` (`_build`); each queued DSN logs
  ``status=dsn`` and wakes the runner.  `_log` writes the one line per
  recipient and outcome (``to=<...>, relay=..., delay=..., dsn=...,
  status=...``) and counts it in `metrics.RECIPIENTS`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import IO

from fermoposta.config import OutboundConfig, ProviderConfig
from fermoposta.mail.dsn import Action, RecipientReport, build_dsn, wants_notice
from fermoposta.ops import metrics
from fermoposta.ops.log import event
from fermoposta.provider.delivery_commits import DeliveredCommits
from fermoposta.provider.outbound_base import Problem as _Problem
from fermoposta.provider.outbound_base import reply_status as _status
from fermoposta.provider.outbound_base import retry_delay
from fermoposta.provider.outbound_connect import Session as _Session
from fermoposta.store.base import (
    NewMessage,
    OutboundMail,
    QueuedMessage,
    QueuedRecipient,
    StoreError,
    lookup_domain,
)

__all__ = ["Outcomes"]

log = logging.getLogger("fermoposta.outbound")


class Outcomes:
    """Recording outcomes and their DSNs; mixed into `OutboundRunner`."""

    config: ProviderConfig
    out: OutboundConfig
    store: OutboundMail
    clock: Callable[[], float]
    _hosted: dict[str, bool]  # sender domain -> hosted, for this batch
    delivered: int
    deferred: int
    failed: int
    delivered_commits: DeliveredCommits
    wake: Callable[[], None]
    _etrn_target: Callable[[str], Awaitable[str | None]]

    async def _settle_safely(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                             problem: _Problem) -> None:
        """`_settle` that never raises: on a store problem or a bug the
        recipients stay claimed, and `_process` releases them with a delay."""
        try:
            await self._settle(message, recipients, problem, None)
        except StoreError as exc:
            log.warning("%s: store error, recipients stay queued: %s", message.id, exc)
        except Exception:
            log.exception("%s: cannot record the outcome; recipients stay queued", message.id)

    async def _settle(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                      problem: _Problem, session: _Session | None) -> None:
        """Record the outcome of `problem.reply` for `recipients`, durably.  Only
        a 2xx to the end of data delivers (callers map other 2xx to 4xx)."""
        reply = problem.reply
        if 200 <= reply.code < 300:
            dsn = None
            if session is not None and not session.client.has("DSN"):
                # RFC 3461 §4.2: the next hop does not do DSN, so we report "relayed".
                dsn = await self._build(message, Action.RELAYED, [
                    problem.report(r, "2.0.0") for r in recipients
                    if wants_notice(r, Action.RELAYED)])
            if dsn is None:
                self.delivered_commits.add(message.id, [r.id for r in recipients])
                dsn_id = None
            else:
                try:
                    dsn_id = await asyncio.to_thread(self.store.record_delivered,
                                                     [r.id for r in recipients], str(reply), dsn)
                finally:
                    dsn[1].close()
            self.delivered += len(recipients)
            self._log(message, recipients, problem, "sent")
            if dsn_id is not None:
                event("outbound", message.id, status="dsn",
                      reason=f"sender delivery status notification: {dsn_id}")
                self.wake()
        elif reply.is_permanent:
            await self._fail(message, recipients, problem, "bounced")
        else:
            await self._defer(message, recipients, problem)
        if reply.code == 421 and session is not None:
            session.broken = True

    async def _fail(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                    problem: _Problem, status: str, dsn_status: str | None = None) -> None:
        await self._fail_each(message, [(r, problem) for r in recipients], status, dsn_status)

    async def _fail_each(self, message: QueuedMessage,
                         pairs: list[tuple[QueuedRecipient, _Problem]], status: str,
                         dsn_status: str | None = None) -> None:
        """Fail recipients (each with its own problem) with one DSN."""
        reports = [problem.report(r, dsn_status) for r, problem in pairs]
        dsn = await self._build(message, Action.FAILED, reports)
        try:
            dsn_id = await asyncio.to_thread(self.store.record_failed,
                                             [r.id for r, _ in pairs], str(pairs[0][1].reply),
                                             dsn)
        finally:
            if dsn is not None:
                dsn[1].close()
        self.failed += len(pairs)
        for rcpt, problem in pairs:
            self._log(message, [rcpt], problem, status, dsn_status)
        if dsn_id is not None:
            event("outbound", message.id, status="dsn",
                  reason=f"sender non-delivery notification: {dsn_id}")
            self.wake()

    async def _defer(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                     problem: _Problem) -> None:
        await self._defer_each(message, [(r, problem) for r in recipients])

    async def _defer_each(self, message: QueuedMessage,
                          pairs: list[tuple[QueuedRecipient, _Problem]]) -> None:
        """Keep recipients for a later attempt, or expire them after the lifetime;
        send the delay notice when it is time.  ETRN domains' recipients go
        back on hold instead."""
        pairs = await self._hold_etrn_again(message, pairs)
        if not pairs:
            return
        now = self.clock()
        expires = message.received_at + self.out.lifetime
        if now >= expires:
            await self._fail_each(message, pairs, "expired", "4.4.7")
            return
        by_reply: dict[str, dict[int, float]] = {}
        for rcpt, problem in pairs:
            by_reply.setdefault(str(problem.reply), {})[rcpt.id] = min(
                now + retry_delay(rcpt.attempts, self.out.retry_initial, self.out.retry_max),
                expires)
        for reply_text, schedule in by_reply.items():
            await asyncio.to_thread(self.store.record_deferred, list(schedule), reply_text,
                                    schedule)
        self.deferred += len(pairs)
        for rcpt, problem in pairs:
            self._log(message, [rcpt], problem, "deferred")
        if self.out.delay_notice > 0 and now - message.received_at >= self.out.delay_notice:
            due = [(r, p) for r, p in pairs if not r.delay_notified]
            if due:
                reports = [p.report(r) for r, p in due if wants_notice(r, Action.DELAYED)]
                dsn = (await self._build(message, Action.DELAYED, reports, expires)
                       if reports else None)
                try:
                    dsn_id = await asyncio.to_thread(self.store.mark_delay_notified,
                                                     [r.id for r, _ in due], dsn)
                finally:
                    if dsn is not None:
                        dsn[1].close()
                if dsn_id is not None:
                    event("outbound", message.id, status="dsn",
                          reason=f"sender delay notification: {dsn_id}")
                    self.wake()

    async def _hold_etrn_again(self, message: QueuedMessage,
                               pairs: list[tuple[QueuedRecipient, _Problem]]
                               ) -> list[tuple[QueuedRecipient, _Problem]]:
        """Put the deferred recipients of hosted domains (ETRN domains, and
        any that stopped being one while their mail was out: `domain set
        --no-etrn`) back on hold, where the hold lifetime, not `[outbound]
        lifetime`, ends them; return the others.  A store error propagates:
        the recipients stay claimed and are released later, never treated as
        the Internet's mail (which could expire them at once)."""
        hosted: dict[str, bool] = {}
        for domain in {r.domain for r, _ in pairs}:
            hosted[domain] = await lookup_domain(self.store, domain) is not None
        held = [(r, p) for r, p in pairs if hosted[r.domain]]
        by_reply: dict[str, list[int]] = {}
        for rcpt, problem in held:
            by_reply.setdefault(str(problem.reply), []).append(rcpt.id)
        for reply_text, ids in by_reply.items():
            await asyncio.to_thread(self.store.return_to_held, ids, reply_text)
        self.deferred += len(held)
        for rcpt, problem in held:
            self._log(message, [rcpt], problem, "deferred", note="held until the next ETRN")
        return [(r, p) for r, p in pairs if not hosted[r.domain]]

    async def _build(self, message: QueuedMessage, action: Action,
                     reports: list[RecipientReport], will_retry_until: float | None = None
                     ) -> tuple[NewMessage, IO[bytes]] | None:
        if not message.sender or not reports:
            return None
        hosted = await self._sender_domain_hosted(message.sender)
        return await asyncio.to_thread(
            build_dsn, self.store, hostname=self.config.hostname, message=message,
            action=action, reports=reports, sender_domain_hosted=hosted, now=self.clock(),
            will_retry_until=will_retry_until)

    async def _sender_domain_hosted(self, sender: str) -> bool:
        if "@" not in sender:
            return False
        domain = sender.rsplit("@", 1)[1].lower()
        if domain not in self._hosted:
            self._hosted[domain] = (
                await asyncio.to_thread(self.store.get_domain, domain) is not None)
        return self._hosted[domain]

    def _log(self, message: QueuedMessage, recipients: list[QueuedRecipient], problem: _Problem,
             status: str, dsn: str | None = None, note: str | None = None) -> None:
        delay = max(0.0, self.clock() - message.received_at)
        metrics.RECIPIENTS.labels("outbound", status).inc(len(recipients))
        reason = str(problem.reply) + (f"; {note}" if note else "")
        for rcpt in recipients:
            event("outbound", message.id, to=f"<{rcpt.address}>", relay=problem.relay,
                  delay=round(delay, 2), dsn=dsn or _status(problem.reply), status=status,
                  reason=reason)
