"""The customer's local retry spool: recipients the site took from the provider
but could not deliver locally yet (mixed LMTP outcomes), and their notices.

Contract:
- The spool is a store of its own (`open_spool`, a SQLite file) at
  ``<data_dir>/local-retry.sqlite3``
  (the outbox's store format; never the provider's store nor the outbox).  A
  stored message's HELD recipients wait for the site's own delivery: the
  backend of the ``[[pull]]`` block that accepts the recipient's domain
  (`CustomerConfig.pull_for_domain`).  Its OUTBOUND recipients (notices to
  senders outside the site) wait to be moved into the outbox spool.
- `spool_failures(config, envelope, body, failures, where)` is called by the
  reversed session BEFORE it answers 250 for a transaction whose local
  outcome was mixed: it commits the message with the failed recipients
  (HELD; attempts 1 and the local reply recorded) and returns its id, or
  raises (StoreError, OSError): the session then answers 4xx and the
  provider keeps the whole message (a duplicate is possible, a loss is not).
  Permanent failures (5xx) are then failed at once with an RFC 3464 notice
  (`build_failure_dsn`, from MAILER-DAEMON@<hostname>, null reverse-path)
  committed in the same SQLite transaction; if that step fails, the
  recipient stays HELD and is retried (and fails again) at the next run.
- `retry_local(config)` runs once after each pull (the daemon's schedule
  and `fermoposta customer pull`), under the lock
  ``<data_dir>/local-retry.lock`` (busy: skipped), and never raises: every
  HELD recipient is offered again, one recipient per local transaction:
  * 2xx: removed (delivered);
  * 4xx: kept (attempts + 1) until ``local_retry_lifetime`` (default 5 days)
    after it was taken; past that, failed with a notice like a 5xx;
  * 5xx: failed with a notice to the sender (none for the null sender, RFC
    5321 §4.5.5; none about a notice: a notice that cannot be delivered is
    dropped, logged);
  * a notice for a sender of the site's domains is a HELD recipient of this
    spool (delivered locally like the rest); one for any other sender is
    moved into the outbox spool (OUTBOUND, pushed to the provider's
    submission service at the next push, still with the null reverse-path),
    enqueued there before it leaves this spool.
- Logs: component ``customer``, keyed by the spool's queue id:
  ``<qid>: to=<rcpt>, relay=<where>, dsn=<x.y.z>, status=spooled|delivered|
  deferred|bounced|expired|moved (<reply>)``; per run (when there was work)
  ``retry=<n>, delivered=<n>, deferred=<n>, bounced=<n>, left=<n>``.
- `spool_status(config)` is the line ``customer check`` prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fermoposta.customer.config import CustomerConfig
from fermoposta.customer.delivery.base import Delivery, LocalEnvelope, LocalRecipient
from fermoposta.customer.errors import AlreadyRunning
from fermoposta.customer.site import (
    copy_stored_body,
    deliver_stored,
    domain_of,
    make_delivery_for,
    pull_lock,
)
from fermoposta.mail.dsn import build_failure_dsn, read_headers
from fermoposta.ops.log import event
from fermoposta.smtp.reply import Reply
from fermoposta.store import Spool, open_spool
from fermoposta.store.base import (
    CHUNK_SIZE,
    MessageOrigin,
    NewMessage,
    NewRecipient,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    StoreError,
)

__all__ = [
    "RETRY_FILENAME",
    "RetryResult",
    "retry_local",
    "retry_path",
    "spool_failures",
    "spool_status",
]

log = logging.getLogger("fermoposta.customer")

RETRY_FILENAME = "local-retry.sqlite3"
RETRY_LOCK = "local-retry.lock"
RETRY_FAILED = Reply(451, "4.3.0", "Local delivery failed, try again later")


def retry_path(config: CustomerConfig) -> Path:
    return config.data_dir / RETRY_FILENAME


def _dsn(reply: Reply) -> str:
    return reply.enhanced or f"{reply.code // 100}.0.0"


# ---------------------------------------------------------------------------
# Taking responsibility (the reversed session, before its 250).
# ---------------------------------------------------------------------------


def spool_failures(config: CustomerConfig, envelope: LocalEnvelope, body: IO[bytes],
                   failures: Sequence[tuple[LocalRecipient, Reply]], where: str) -> str:
    """Commit `failures` of `envelope` to the spool; see the module docstring."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_spool(retry_path(config))
    try:
        message = NewMessage(
            sender=envelope.sender,
            recipients=tuple(NewRecipient(address=r.address, domain=r.domain,
                                          state=RecipientState.HELD) for r, _ in failures),
            origin=MessageOrigin.MX,
            smtputf8=envelope.smtputf8,
            body_8bit=envelope.body_8bit,
            client=f"provider {envelope.queue_hint}".rstrip(),
        )
        body.seek(0)
        queue_id = store.enqueue(message, body)
        # From here on the spool holds every failed recipient: the caller may
        # answer 250.  What follows only records the local replies.
        try:
            _record_first_attempt(config, store, queue_id, failures, where)
        except StoreError as exc:
            log.warning("%s: local retry spool: recording the first attempt failed (%s); "
                        "the recipients will be retried", queue_id, exc)
        return queue_id
    finally:
        store.close()


def _record_first_attempt(config: CustomerConfig, store: Spool, queue_id: str,
                          failures: Sequence[tuple[LocalRecipient, Reply]], where: str) -> None:
    stored = store.get_message(queue_id)
    if stored is None:
        raise StoreError(f"{queue_id} vanished from the local retry spool")
    by_address = {r.address: r for r in stored.recipients}
    for local, reply in failures:
        rcpt = by_address.get(local.address)
        if rcpt is None:
            continue
        event("customer", queue_id, to=f"<{local.address}>", relay=where, dsn=_dsn(reply),
              status="spooled", reason=f"kept in the local retry spool: {reply}")
        if reply.is_permanent:
            _fail(config, store, stored, [rcpt], reply, where, "bounced")
        else:
            store.record_deferred([rcpt.id], str(reply))


def _fail(config: CustomerConfig, store: Spool, message: QueuedMessage,
          recipients: list[QueuedRecipient], reply: Reply, where: str, status: str) -> None:
    """Remove `recipients` with a failure notice to the sender (if any may be sent)."""
    notice = None
    is_notice = message.origin == MessageOrigin.DSN or not message.sender
    if not is_notice:
        headers = read_headers(store, message.id)
        notice = build_failure_dsn(
            hostname=config.hostname, message=message,
            failures=[(r, reply) for r in recipients], headers=headers,
            remote_mta=where.partition(":")[2] or None,
            sender_domain_hosted=domain_of(message.sender) in config.domains,
        )
    notice_id = store.record_failed([r.id for r in recipients], str(reply), notice)
    for rcpt in recipients:
        event("customer", message.id, to=f"<{rcpt.address}>", relay=where, dsn=_dsn(reply),
              status="dropped" if is_notice else status, reason=str(reply))
    if notice_id is not None:
        event("customer", message.id, status="notice",
              reason=f"sender non-delivery notification: {notice_id}")


# ---------------------------------------------------------------------------
# Retrying (after each pull).
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class RetryResult:
    attempted: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0  # failed for good (5xx or expired), notice queued if any
    moved: int = 0  # notices moved into the outbox
    left: int = 0  # recipients still waiting after the run
    error: str | None = None

    def lines(self) -> list[str]:
        if not (self.attempted or self.left or self.error):
            return []
        line = (f"local retry spool: {self.attempted} recipient(s) retried, "
                f"{self.delivered} delivered, {self.deferred} deferred, "
                f"{self.bounced} failed (notice to the sender)")
        if self.moved:
            line += f", {self.moved} notice(s) moved to the outbox"
        line += f"; {self.left} waiting"
        if self.error:
            line += f"; error: {self.error}"
        return [line]


async def retry_local(config: CustomerConfig, *, now: float | None = None) -> RetryResult:
    """Offer every spooled recipient to the site's delivery again; never raises."""

    result = RetryResult()
    if not retry_path(config).exists():
        return result
    try:
        async with pull_lock(config.data_dir / RETRY_LOCK, wait=False,
                             busy="another run of the local retry spool is going on"):
            store = await asyncio.to_thread(open_spool, retry_path(config))
            try:
                await _run(config, store, result, time.time() if now is None else now)
            finally:
                store.close()
            result.left = await asyncio.to_thread(_count_waiting, retry_path(config))
    except AlreadyRunning:
        return result
    except (StoreError, OSError) as exc:
        result.error = str(exc)
        log.warning("local retry spool: %s", exc)
    except Exception as exc:  # a bug must not stop the pulls
        log.exception("local retry spool failed")
        result.error = f"internal error: {exc!r}"
    if result.attempted or result.error or result.moved:
        event("customer", None, retry=result.attempted, delivered=result.delivered,
              deferred=result.deferred, bounced=result.bounced, moved=result.moved,
              left=result.left, status="ok" if result.error is None else "error",
              reason=result.error)
    return result


def _count_waiting(path: Path) -> int:
    store = open_spool(path)
    try:
        return store.recipient_count()
    finally:
        store.close()


def spool_status(config: CustomerConfig) -> str | None:
    """``local retry spool: <n> recipient(s) waiting`` (None without a spool)."""
    path = retry_path(config)
    if not path.exists():
        return None
    try:
        return f"local retry spool: {_count_waiting(path)} recipient(s) waiting ({path})"
    except StoreError as exc:
        return f"local retry spool: {exc}"


async def _run(config: CustomerConfig, store: Spool, result: RetryResult,
               now: float) -> None:
    path = retry_path(config)
    await _move_outbound_notices(config, store, path, result)
    deliveries: dict[str, Delivery] = {}
    try:
        for message_id in await asyncio.to_thread(store.message_ids, RecipientState.HELD):
            message = await asyncio.to_thread(store.get_message, message_id)
            if message is None:
                continue
            for rcpt in message.recipients:
                if rcpt.state == RecipientState.HELD:
                    await _retry_one(config, store, message, rcpt, deliveries, result, now)
    finally:
        for delivery in deliveries.values():
            with contextlib.suppress(Exception):
                await delivery.close()
    # Notices created by this run for senders outside the site.
    await _move_outbound_notices(config, store, path, result)


async def _retry_one(config: CustomerConfig, store: Spool, message: QueuedMessage,
                     rcpt: QueuedRecipient, deliveries: dict[str, Delivery],
                     result: RetryResult, now: float) -> None:
    result.attempted += 1
    domain = domain_of(rcpt.address) or rcpt.domain
    pull = config.pull_for_domain(domain)
    where = "-"
    if pull is None:
        reply = Reply(550, "5.1.2", f"no [[pull]] block delivers {domain}")
    else:
        if pull.name not in deliveries:
            deliveries[pull.name] = make_delivery_for(config, pull)
        delivery = deliveries[pull.name]
        where = delivery.name
        local = LocalRecipient(address=rcpt.address, local=rcpt.address.rsplit("@", 1)[0],
                               domain=domain)
        try:
            reply = await delivery.check_recipient(local) or Reply(250, "2.0.0", "")
            if reply.is_positive:
                envelope = LocalEnvelope(sender=message.sender, recipients=(local,),
                                         smtputf8=message.smtputf8,
                                         body_8bit=message.body_8bit, queue_hint=message.id)
                outcome = await deliver_stored(delivery, store, message.id, envelope)
                reply, where = outcome.reply, outcome.where
        except StoreError:
            raise
        except Exception:
            log.exception("%s: local redelivery failed", message.id)
            reply = RETRY_FAILED
    if reply.is_positive:
        await asyncio.to_thread(store.record_delivered, [rcpt.id], str(reply))
        result.delivered += 1
        event("customer", message.id, to=f"<{rcpt.address}>", relay=where, dsn=_dsn(reply),
              status="delivered", reason=str(reply))
    elif reply.is_permanent:
        await asyncio.to_thread(_fail, config, store, message, [rcpt], reply, where, "bounced")
        result.bounced += 1
    elif now - message.received_at >= config.local_retry_lifetime:
        # RFC 3463 §3.5: X.4.7 delivery time expired.
        expired = Reply(550, "5.4.7", "Delivery time expired in the local retry spool; "
                        f"last reply: {reply}")
        await asyncio.to_thread(_fail, config, store, message, [rcpt], expired, where,
                                "expired")
        result.bounced += 1
    else:
        await asyncio.to_thread(store.record_deferred, [rcpt.id], str(reply))
        result.deferred += 1
        event("customer", message.id, to=f"<{rcpt.address}>", relay=where, dsn=_dsn(reply),
              status="deferred", reason=f"{reply} (kept in the local retry spool)")


async def _move_outbound_notices(config: CustomerConfig, store: Spool, path: Path,
                                 result: RetryResult) -> None:
    ids = await asyncio.to_thread(store.message_ids, RecipientState.OUTBOUND)
    if not ids:
        return
    from fermoposta.customer.outbox import open_outbox

    outbox = await asyncio.to_thread(open_outbox, config)
    try:
        for message_id in ids:
            await asyncio.to_thread(_move_one, store, outbox, message_id)
            result.moved += 1
    finally:
        outbox.close()


def _move_one(store: Spool, outbox: Spool, message_id: str) -> None:
    message = store.get_message(message_id)
    if message is None:
        return
    recipients = [r for r in message.recipients if r.state == RecipientState.OUTBOUND]
    if not recipients:
        return
    new = NewMessage(
        sender=message.sender,
        recipients=tuple(NewRecipient(address=r.address, domain=r.domain,
                                      state=RecipientState.OUTBOUND) for r in recipients),
        origin=message.origin, smtputf8=message.smtputf8, body_8bit=message.body_8bit,
        client=message.client,
    )
    with tempfile.SpooledTemporaryFile(max_size=CHUNK_SIZE) as body:
        copy_stored_body(store, message_id, body)
        body.seek(0)
        outbox_id = outbox.enqueue(new, body)
    # In the outbox first, then out of here: a crash between the two sends
    # the notice twice, never not at all.
    store.record_delivered([r.id for r in recipients], f"moved to the outbox as {outbox_id}")
    for rcpt in recipients:
        event("customer", message_id, to=f"<{rcpt.address}>", relay="outbox",
              status="moved", reason=f"notice queued in the outbox as {outbox_id}")
