"""Held mail that nobody collects: expiry and delay notices.

Contract:
- `HoldExpirer(config, store, clock=time.time)`: `start()` runs `run_once()`
  every `[hold] expiry_interval`; `stop()` ends it (a pass in progress is
  cancelled between two messages; what was recorded stays recorded).
- `run_once()` fails every HELD recipient older than its domain's hold
  lifetime (the domain's own `hold_lifetime`, set with `fermoposta domain
  add --hold-lifetime`, else `[hold] lifetime`) with an expiry DSN to the
  sender: Action failed, Status 5.4.7 (RFC 3463 "delivery time expired"),
  Diagnostic-Code ``X-Fermoposta; ...`` (no remote server was involved).
  The recipient leaves the queue in the same transaction that queues the
  DSN (`Store.record_failed`); the null sender gets none; NOTIFY is
  honoured (`fermoposta.mail.dsn`).
- With `[hold] delay_notice` > 0, each HELD recipient older than that (and
  not yet expired) gets one "delayed" DSN (Will-Retry-Until = arrival +
  lifetime) when its NOTIFY allows it (no NOTIFY = FAILURE,DELAY); the flag
  is set in the same transaction (`Store.mark_delay_notified`).
- Recipients of a domain that an ATRN session has leased right now are left
  for the next pass (the drain may be delivering them).
- Several nodes on one store: each pass of the loop first takes the lease
  `EXPIRY_LEASE` (a name no domain can have) for two intervals, so one node
  runs the passes while it lives and another takes over when it dies.  (A
  pass run twice would still be safe: `record_failed` and
  `mark_delay_notified` queue a DSN only for recipients still queued.)
- Work per pass is bounded (`batch` recipients per query, repeated until
  none is left); a store error ends the pass with a warning and the next
  pass tries again.  Like the DSN rules: a DSN for a sender we host is HELD
  for its customer, else OUTBOUND (then `on_outbound_dsn`, e.g. the outbound
  runner's `wake`, is called).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import IO

from fermoposta.config import ProviderConfig
from fermoposta.mail.dsn import Action, RecipientReport, build_dsn, wants_notice
from fermoposta.ops import metrics
from fermoposta.ops.log import event
from fermoposta.store.base import (
    HostedMail,
    NewMessage,
    QueuedMessage,
    RecipientState,
    StoreError,
)

__all__ = ["EXPIRY_LEASE", "HoldExpirer"]

EXPIRY_LEASE = "@hold-expiry"  # a lease name, never a domain (no "@" in one)

log = logging.getLogger("fermoposta.expiry")


def _duration(seconds: float) -> str:
    if seconds % 86400 == 0:
        return f"{int(seconds // 86400)}d"
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds)}s"


class HoldExpirer:
    """Expires held mail and sends hold delay notices; see the module docstring."""

    def __init__(self, config: ProviderConfig, store: HostedMail, *,
                 clock: Callable[[], float] = time.time, batch: int = 200,
                 on_outbound_dsn: Callable[[], None] | None = None) -> None:
        self.config = config
        self.hold = config.hold
        self.store = store
        self.clock = clock
        self.batch = batch
        self.on_outbound_dsn = on_outbound_dsn
        self._task: asyncio.Task[None] | None = None
        self.owner = f"expiry-{store.node}-{secrets.token_hex(4)}"
        self.expired = 0
        self.notified = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="hold-expiry")

    async def stop(self, grace: float = 5.0) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, grace)
        with contextlib.suppress(StoreError):  # let another node take over now
            await asyncio.to_thread(self.store.release_leases, self.owner)

    async def _loop(self) -> None:
        while True:
            try:
                if await asyncio.to_thread(self.store.acquire_leases, [EXPIRY_LEASE], self.owner,
                                           2 * self.hold.expiry_interval):
                    await self.run_once()
                else:
                    log.debug("hold expiry: another node runs it")
            except StoreError as exc:
                log.warning("hold expiry: store error, trying again later: %s", exc)
            except Exception:  # a bug must not stop expiry for good
                log.exception("hold expiry: unexpected error")
            await asyncio.sleep(self.hold.expiry_interval)

    async def run_once(self) -> tuple[int, int]:
        """One pass; returns (recipients expired, recipients named in delay notices)."""
        now = self.clock()
        expired = notified = 0
        domains = await asyncio.to_thread(self.store.list_domains)
        own = {d.name: d.hold_lifetime for d in domains if d.hold_lifetime is not None}
        # Default lifetime, then each domain with its own.
        expired += await self._expire(now - self.hold.lifetime, self.hold.lifetime,
                                      default_only=True)
        for name, lifetime in sorted(own.items()):
            expired += await self._expire(now - lifetime, lifetime, domains=[name])
        if self.hold.delay_notice > 0:
            notified = await self._notify(now, own)
        self.expired += expired
        self.notified += notified
        return expired, notified

    async def _expire(self, cutoff: float, lifetime: float, *, default_only: bool = False,
                      domains: list[str] | None = None) -> int:
        count = 0
        while True:
            messages = await asyncio.to_thread(
                self.store.held_older_than, cutoff, self.batch, domains=domains,
                default_lifetime_only=default_only)
            if not messages:
                return count
            for message in messages:
                await self._expire_message(message, lifetime)
                count += len(message.recipients)
            if sum(len(m.recipients) for m in messages) < self.batch:
                return count

    async def _expire_message(self, message: QueuedMessage, lifetime: float) -> None:
        reason = (f"Delivery time expired: not collected by the customer within "
                  f"{_duration(lifetime)}")
        reports = [RecipientReport(r, "5.4.7", diagnostic=f"550 5.4.7 {reason}")
                   for r in message.recipients]
        dsn = await self._build(message, Action.FAILED, reports)
        try:
            dsn_id = await asyncio.to_thread(
                self.store.record_failed, [r.id for r in message.recipients],
                f"550 5.4.7 {reason}", dsn)
        finally:
            if dsn is not None:
                dsn[1].close()
        delay = max(0.0, self.clock() - message.received_at)
        metrics.RECIPIENTS.labels("hold", "expired").inc(len(message.recipients))
        for rcpt in message.recipients:
            event("expiry", message.id, to=f"<{rcpt.address}>", relay="none",
                  delay=round(delay, 2), dsn="5.4.7", status="expired", reason=reason)
        if dsn_id is not None:
            event("expiry", message.id, status="dsn",
                  reason=f"sender non-delivery notification: {dsn_id}")
            self._dsn_queued(dsn)

    async def _notify(self, now: float, own: dict[str, float]) -> int:
        count = 0
        cutoff = now - self.hold.delay_notice
        while True:
            messages = await asyncio.to_thread(
                self.store.held_older_than, cutoff, self.batch, delay_notified=False)
            if not messages:
                return count
            for message in messages:
                lifetimes = {r.domain: own.get(r.domain) or self.hold.lifetime
                             for r in message.recipients}
                until = message.received_at + min(lifetimes.values())
                reports = [RecipientReport(
                    r, "4.4.1", diagnostic=f"451 4.4.1 Waiting for the customer of {r.domain} "
                    "to collect it") for r in message.recipients]
                dsn = await self._build(message, Action.DELAYED, reports, until)
                try:
                    dsn_id = await asyncio.to_thread(
                        self.store.mark_delay_notified, [r.id for r in message.recipients], dsn)
                finally:
                    if dsn is not None:
                        dsn[1].close()
                if dsn_id is not None:
                    count += sum(wants_notice(r, Action.DELAYED) for r in message.recipients)
                    event("expiry", message.id, status="dsn",
                          reason=f"sender delay notification: {dsn_id}")
                    self._dsn_queued(dsn)
            if sum(len(m.recipients) for m in messages) < self.batch:
                return count

    def _dsn_queued(self, dsn: tuple[NewMessage, IO[bytes]] | None) -> None:
        if dsn is None or self.on_outbound_dsn is None:
            return
        if any(r.state == RecipientState.OUTBOUND for r in dsn[0].recipients):
            self.on_outbound_dsn()

    async def _build(self, message: QueuedMessage, action: Action,
                     reports: list[RecipientReport], will_retry_until: float | None = None
                     ) -> tuple[NewMessage, IO[bytes]] | None:
        if not message.sender:
            return None
        domain = message.sender.rsplit("@", 1)[-1].lower() if "@" in message.sender else ""
        hosted = bool(domain) and (
            await asyncio.to_thread(self.store.get_domain, domain) is not None)
        return await asyncio.to_thread(
            build_dsn, self.store, hostname=self.config.hostname, message=message,
            action=action, reports=reports, sender_domain_hosted=hosted, now=self.clock(),
            will_retry_until=will_retry_until)
