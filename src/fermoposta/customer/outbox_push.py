"""Pushing the outbox to the provider's submission service; notices to local senders.

Contract:
- `push_outbox(config)` runs one push and never raises: every failure is a
  `CustomerError` in the returned `PushResult` (with its exit code).  Two
  pushes never overlap: the lock ``<data_dir>/outbox-push.lock`` (flock);
  the loser waits (`wait=True`) or gives up with `AlreadyRunning` (exit 73,
  nothing done; `PushResult.busy`).
- The connection: ``[provider] submission`` (default the provider's host,
  port 587) with ``submission_tls``, the same certificate verification, pin
  and AUTH rules and credentials as the ODMR dial-out (`Dialer` with
  ``require_atrn=False``).  No connection is made when the outbox is empty.
- Each message with OUTBOUND recipients, oldest first, in one transaction:
  MAIL (SIZE, BODY=8BITMIME, SMTPUTF8, RET/ENVID when the provider offers
  DSN), RCPT per recipient (NOTIFY/ORCPT likewise), DATA, all pipelined when
  PIPELINING is offered.  Recipients refused with 452 go in a further
  transaction at once while that makes progress (RFC 5321 §4.5.3.1.10).
- Per-recipient outcomes, each committed before the next command: only a 2xx
  to the final dot removes a recipient (`record_delivered`); a 4xx keeps it
  for the next push (`record_deferred`); a 5xx removes it with
  `record_failed`, committing in the same transaction the failure notice
  (RFC 3464, `mail.dsn.build_failure_dsn`, from MAILER-DAEMON@<our
  hostname>) for the local sender as a HELD message of the spool.  A sender
  outside the site's domains gets no notice (logged); the null sender never
  does.  A message the provider cannot take by its EHLO (over its SIZE,
  8-bit or UTF-8 without the extension) fails the same way unsent.
- A lost connection or a timeout keeps the recipients of the message in
  flight (`record_deferred`): after the final dot a duplicate is possible, a
  loss is not.  A 4xx to MAIL (rate limit, store trouble) or a 421 anywhere
  ends the push; the other messages wait for the next one.  A 530 to MAIL
  is an `AuthFailure` and changes nothing.
- After the push, notices waiting in the spool are delivered through the
  site's own delivery: the backend of the ``[[pull]]`` block that accepts the
  sender's domain (`CustomerConfig.pull_for_domain`).  2xx removes the
  notice, 4xx keeps it for the next push, 5xx (unknown local user) drops it
  (logged: a notice is never bounced).
- `ContinuousPusher` (``[outbox] push = "continuous"``, the daemon) pushes at
  start and whenever `wake()` is called (the listener calls it after each
  250); after a push that failed or left mail deferred it waits ``retry``,
  doubling up to ``retry_max`` (±10 % jitter); while the provider is
  unreachable new mail waits for that timer too.
- Logs: component ``outbox``; per recipient ``<qid>: to=<rcpt>,
  relay=<name>[<ip>]:<port>, delay=<s>, dsn=<x.y.z>, status=sent|deferred|
  bounced (<reply>)``; per push ``push=<id>, relay=..., messages=<n>,
  sent=<n>, deferred=<n>, refused=<n>, notices=<n>, left=<n>, status=ok|<kind>``
  (not for a push that found nothing to do).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field

from fermoposta.customer.config import CustomerConfig
from fermoposta.customer.delivery.base import Delivery, LocalEnvelope, LocalRecipient
from fermoposta.customer.dialout import Dialer, DialSettings
from fermoposta.customer.errors import (
    AlreadyRunning,
    AuthFailure,
    ConnectFailure,
    CustomerError,
    ProtocolFailure,
    TemporaryFailure,
)
from fermoposta.customer.outbox import (
    notice_message_ids,
    open_outbox,
    outbox_message_ids,
    outbox_path,
)
from fermoposta.customer.site import (
    deliver_stored,
    dial_settings,
    domain_of,
    make_delivery_for,
    pull_lock,
)
from fermoposta.mail.dsn import build_failure_dsn, read_headers
from fermoposta.net.client import PEER_ERRORS, SMTPClient
from fermoposta.net.connection import Connection
from fermoposta.net.server_session import new_session_id
from fermoposta.net.transfer import (
    STAGE_MAIL,
    MessageTransfer,
    ResetRefused,
    TransferTimeouts,
    UnwantedData,
    stored_body,
)
from fermoposta.ops.log import event
from fermoposta.smtp.reply import Reply
from fermoposta.store import Spool
from fermoposta.store.base import (
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    StoreError,
)

__all__ = [
    "PUSH_LOCK",
    "ContinuousPusher",
    "PushOutcome",
    "PushResult",
    "outbox_active",
    "push_outbox",
    "submission_settings",
]

log = logging.getLogger("fermoposta.outbox")

PUSH_LOCK = "outbox-push.lock"
DATA_INIT_TIMEOUT = 120.0  # RFC 5321 §4.5.3.2.4
FINAL_REPLY_TIMEOUT = 600.0  # RFC 5321 §4.5.3.2.6
NOTICE_FAILED = Reply(451, "4.3.0", "Local delivery of the notice failed, try again later")


def outbox_active(config: CustomerConfig) -> bool:
    """Whether pulls push an outbox: it is configured, or its spool exists (mail
    left in it after ``[outbox] listen`` was removed is still pushed)."""
    return config.outbox.enabled or outbox_path(config).exists()


def submission_settings(settings: DialSettings, config: CustomerConfig) -> DialSettings:
    """The ODMR dial-out's settings, pointed at the submission service."""
    p = config.provider
    return dataclasses.replace(
        settings, host=p.submission_host, port=p.submission_port, tls=p.submission_tls,
        server_name=p.submission_server_name, require_atrn=False,
    )


def _dial_settings(config: CustomerConfig) -> DialSettings:
    return submission_settings(dial_settings(config), config)


# ---------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushOutcome:
    """One recipient's outcome, for the summary."""

    queue_id: str
    sender: str
    recipient: str
    status: str  # "sent" | "deferred" | "refused"
    reply: str


@dataclass(slots=True)
class PushResult:
    session_id: str
    relay: str  # the configured submission host:port
    started: float
    finished: float = 0.0
    messages: int = 0  # messages attempted
    sent: int = 0  # recipients accepted by the provider
    deferred: int = 0  # recipients kept for the next push
    refused: int = 0  # recipients refused for good
    notices: int = 0  # notices delivered locally by this push
    notices_dropped: int = 0  # notices nobody local could take (5xx)
    notices_waiting: int = 0  # notices still waiting for local delivery
    left: int = 0  # messages still in the outbox after the push
    outcomes: list[PushOutcome] = field(default_factory=list)
    error: CustomerError | None = None

    @property
    def busy(self) -> bool:
        """Another push held the lock: nothing was done."""
        return isinstance(self.error, AlreadyRunning)

    @property
    def exit_code(self) -> int:
        """The error's code; else 75 when mail or notices were kept for later; else 0."""
        if self.error is not None:
            return self.error.exit_code
        return TemporaryFailure.exit_code if self.deferred or self.notices_waiting else 0

    @property
    def failed(self) -> bool:
        """The push did not complete (any error but a busy lock), or kept mail for later."""
        return (self.error is not None and not self.busy) or self.exit_code != 0

    def lines(self) -> list[str]:
        head = f"outbox -> {self.relay}: "
        if self.busy:
            return [head + f"skipped: {self.error}"]
        parts: list[str] = []
        if self.messages:
            counts = f"{self.messages} message(s), {self.sent} recipient(s) sent"
            if self.deferred:
                counts += f", {self.deferred} deferred (kept in the outbox)"
            if self.refused:
                counts += f", {self.refused} refused"
            parts.append(counts)
        if self.notices or self.notices_dropped or self.notices_waiting:
            notices = f"{self.notices} notice(s) to local senders delivered"
            if self.notices_dropped:
                notices += f", {self.notices_dropped} dropped"
            if self.notices_waiting:
                notices += f", {self.notices_waiting} waiting"
            parts.append(notices)
        took = f" in {self.finished - self.started:.1f}s"
        if self.error is not None:
            line = head + f"failed ({self.error.kind}, exit {self.error.exit_code}): {self.error}"
            if parts:
                line += "; " + "; ".join(parts)
            if self.left:
                line += f"; {self.left} message(s) kept in the outbox"
            out = [line]
        elif not parts:
            out = [head + "nothing to send"]
        else:
            out = [head + "; ".join(parts) + took]
        for o in self.outcomes:
            out.append(f"  {o.queue_id} from <{o.sender}> to {o.recipient} -> {o.status} "
                       f"({o.reply})")
        return out


# ---------------------------------------------------------------------------
# One push.
# ---------------------------------------------------------------------------


async def push_outbox(config: CustomerConfig, *, store: Spool | None = None,
                      wait: bool = False) -> PushResult:
    """Push the outbox once; see the module docstring.  `store`: an open spool
    to use (the daemon's), else it is opened and closed here."""
    result = PushResult(session_id=new_session_id(), relay=config.provider.submission_address,
                        started=time.time())
    try:
        async with pull_lock(config.data_dir / PUSH_LOCK, wait=wait,
                             busy="another push of the outbox is running"):
            spool = store if store is not None else await asyncio.to_thread(open_outbox, config)
            try:
                await _push_and_notify(config, spool, result)
            finally:
                if store is None:
                    spool.close()
    except CustomerError as exc:
        result.error = exc
    except StoreError as exc:
        result.error = TemporaryFailure(f"outbox spool: {exc}")
    except Exception as exc:  # a bug must not stop the pull that follows
        log.exception("%s: outbox push failed", result.session_id)
        result.error = CustomerError(f"internal error: {exc!r}")
    result.finished = time.time()
    idle = not (result.messages or result.notices or result.notices_dropped
                or result.notices_waiting or result.left)
    if not result.busy and not (idle and result.error is None):
        event("outbox", None, push=result.session_id, relay=result.relay,
              messages=result.messages, sent=result.sent, deferred=result.deferred,
              refused=result.refused, notices=result.notices, left=result.left,
              status="ok" if result.error is None else result.error.kind,
              reason=str(result.error) if result.error else None)
    return result


async def _push_and_notify(config: CustomerConfig, store: Spool,
                           result: PushResult) -> None:
    ids = await asyncio.to_thread(outbox_message_ids, store)
    if ids:
        try:
            await _push(config, store, ids, result)
        except CustomerError as exc:
            result.error = exc
    await _deliver_notices(config, store, result)
    if ids:
        result.left = len(await asyncio.to_thread(outbox_message_ids, store))


async def _push(config: CustomerConfig, store: Spool, ids: list[str],
                result: PushResult) -> None:
    dialer = Dialer(_dial_settings(config))
    try:
        await dialer.connect()
        await dialer.authenticate()
        assert dialer.conn is not None and dialer.client is not None
        pusher = _Pusher(config, store, result, dialer.conn, dialer.client,
                         greeting=dialer.report.greeting)
        await pusher.run(ids)
        await dialer.quit()
    finally:
        await dialer.close()


class _Stop(Exception):
    """End the push now (421, a 4xx to MAIL); `error` when it is a failure."""

    def __init__(self, error: CustomerError | None = None) -> None:
        super().__init__(str(error) if error else "")
        self.error = error


class _Pusher:
    def __init__(self, config: CustomerConfig, store: Spool, result: PushResult,
                 conn: Connection, client: SMTPClient, *, greeting: str) -> None:
        self.config = config
        self.store = store
        self.result = result
        self.conn = conn
        self.client = client
        words = greeting.split()
        self.remote = words[1] if len(words) > 1 else config.provider.submission_host
        self.relay = f"{self.remote}[{conn.peer_ip}]:{conn.peer_port}"
        self.timeout = config.provider.command_timeout

    async def run(self, ids: list[str]) -> None:
        try:
            for message_id in ids:
                message = await asyncio.to_thread(self.store.get_message, message_id)
                if message is None:
                    continue
                recipients = [r for r in message.recipients
                              if r.state == RecipientState.OUTBOUND]
                if not recipients:
                    continue
                self.result.messages += 1
                await self._push_message(message, recipients)
        except _Stop as stop:
            if stop.error is not None:
                raise stop.error from None
        except StoreError as exc:
            raise TemporaryFailure(f"outbox spool: {exc}") from exc

    async def _push_message(self, message: QueuedMessage,
                            recipients: list[QueuedRecipient]) -> None:
        """One message through the shared transaction (net/transfer.py)."""
        transfer = MessageTransfer(
            self.client, peer="the provider", body=stored_body(self.store),
            settle=self._settle_stage,
            timeouts=TransferTimeouts(command=self.timeout, data_init=DATA_INIT_TIMEOUT,
                                      final_reply=FINAL_REPLY_TIMEOUT),
        )
        try:
            await transfer.send(message, recipients)
        except UnwantedData as exc:
            # Ending it with "." could send an empty message: drop the
            # connection; the provider discards the open transaction (§3.8).
            self.conn.abort()
            await self._keep(message, transfer.unsettled, f"{exc}: kept for the next push")
            raise _Stop(ProtocolFailure(f"{exc}; connection dropped")) from None
        except ResetRefused as exc:
            raise _Stop(ProtocolFailure(str(exc))) from None
        except PEER_ERRORS as exc:
            why = f"{type(exc).__name__}: {exc}".rstrip(": ")
            # Whatever was not settled stays in the outbox; after the final
            # dot the provider may have it already (a duplicate, never a loss).
            await self._keep(message, transfer.unsettled,
                             f"connection to the provider lost ({why}): kept for the next push")
            raise ConnectFailure(f"connection to the provider lost: {why}") from exc

    async def _settle_stage(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                            reply: Reply, stage: str) -> None:
        if stage == STAGE_MAIL and reply.code == 530:
            raise _Stop(AuthFailure(f"the provider wants authentication at MAIL: {reply}"))
        await self._settle(message, recipients, reply)
        if stage == STAGE_MAIL and reply.is_temporary:
            # Not about this message (rate limit, store trouble): stop for now.
            raise _Stop()

    async def _settle(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                      reply: Reply) -> None:
        """Record the outcome of `reply` for `recipients`, durably, before going on."""
        ids = [r.id for r in recipients]
        if 200 <= reply.code < 300:
            await asyncio.to_thread(self.store.record_delivered, ids, str(reply))
            self.result.sent += len(recipients)
            self._log(message, recipients, reply, "sent")
        elif reply.is_permanent:
            await self._fail(message, recipients, reply)
        else:
            await asyncio.to_thread(self.store.record_deferred, ids, str(reply))
            self.result.deferred += len(recipients)
            self._log(message, recipients, reply, "deferred")
        if reply.code == 421:
            raise _Stop()

    async def _keep(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                    why: str) -> None:
        if not recipients:
            return
        try:
            await asyncio.to_thread(self.store.record_deferred, [r.id for r in recipients], why)
        except StoreError as exc:  # they stay OUTBOUND anyway
            log.warning("%s: cannot record the deferral: %s", message.id, exc)
        self.result.deferred += len(recipients)
        for rcpt in recipients:
            event("outbox", message.id, to=f"<{rcpt.address}>", relay=self.relay,
                  status="deferred", reason=why)
            self.result.outcomes.append(
                PushOutcome(message.id, message.sender, rcpt.address, "deferred", why))

    async def _fail(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                    reply: Reply) -> None:
        notice = None
        domain = domain_of(message.sender)
        if message.sender and domain in self.config.domains:
            headers = await asyncio.to_thread(read_headers, self.store, message.id)
            notice = build_failure_dsn(
                hostname=self.config.hostname,
                message=message,
                failures=[(r, reply) for r in recipients],
                headers=headers,
                remote_mta=self.remote,
                sender_domain_hosted=True,
            )
            if notice is not None and any(r.state != RecipientState.HELD
                                          for r in notice[0].recipients):
                notice = None  # defensive: a notice never goes back to the provider
        elif message.sender:
            event("outbox", message.id, status="no notice",
                  reason=f"the sender <{message.sender}> is not an address of this site")
        notice_id = await asyncio.to_thread(
            self.store.record_failed, [r.id for r in recipients], str(reply), notice
        )
        self.result.refused += len(recipients)
        self._log(message, recipients, reply, "bounced")
        if notice_id is not None:
            event("outbox", message.id, status="notice",
                  reason=f"sender non-delivery notification: {notice_id}")

    def _log(self, message: QueuedMessage, recipients: list[QueuedRecipient], reply: Reply,
             status: str) -> None:
        delay = max(0.0, time.time() - message.received_at)
        shown = "refused" if status == "bounced" else status
        for rcpt in recipients:
            event("outbox", message.id, to=f"<{rcpt.address}>", relay=self.relay,
                  delay=f"{delay:.1f}", dsn=reply.enhanced or f"{reply.code // 100}.0.0",
                  status=status, reason=str(reply))
            self.result.outcomes.append(
                PushOutcome(message.id, message.sender, rcpt.address, shown, str(reply)))


# ---------------------------------------------------------------------------
# Notices to local senders.
# ---------------------------------------------------------------------------


async def _deliver_notices(config: CustomerConfig, store: Spool,
                           result: PushResult) -> None:
    ids = await asyncio.to_thread(notice_message_ids, store)
    deliveries: dict[str, Delivery] = {}
    try:
        for message_id in ids:
            message = await asyncio.to_thread(store.get_message, message_id)
            if message is None:
                continue
            for rcpt in message.recipients:
                if rcpt.state == RecipientState.HELD:
                    await _deliver_notice(config, store, message, rcpt, deliveries, result)
    finally:
        for delivery in deliveries.values():
            try:
                await delivery.close()
            except Exception:
                log.exception("closing the local delivery failed")
    result.notices_waiting = len(await asyncio.to_thread(notice_message_ids, store))


async def _deliver_notice(config: CustomerConfig, store: Spool, message: QueuedMessage,
                          rcpt: QueuedRecipient, deliveries: dict[str, Delivery],
                          result: PushResult) -> None:
    domain = domain_of(rcpt.address)
    pull = config.pull_for_domain(domain)
    if pull is None:
        reply, where = Reply(550, "5.1.2", f"no [[pull]] block delivers {domain}"), "-"
    else:
        if pull.name not in deliveries:
            deliveries[pull.name] = make_delivery_for(config, pull)
        delivery = deliveries[pull.name]
        local = LocalRecipient(address=rcpt.address, local=rcpt.address.rsplit("@", 1)[0],
                               domain=domain)
        where = delivery.name
        try:
            refusal = await delivery.check_recipient(local)
            if refusal is not None:
                reply = refusal
            else:
                envelope = LocalEnvelope(sender="", recipients=(local,),
                                         smtputf8=message.smtputf8, body_8bit=message.body_8bit,
                                         queue_hint=message.id)
                outcome = await deliver_stored(delivery, store, message.id, envelope)
                reply, where = outcome.reply, outcome.where
        except StoreError:
            raise
        except Exception:
            log.exception("%s: local delivery of the notice failed", message.id)
            reply = NOTICE_FAILED
    ids = [rcpt.id]
    if 200 <= reply.code < 300:
        await asyncio.to_thread(store.record_delivered, ids, str(reply))
        result.notices += 1
        status = "delivered"
    elif reply.is_permanent:
        await asyncio.to_thread(store.record_failed, ids, str(reply), None)
        result.notices_dropped += 1
        status = "dropped"
    else:
        await asyncio.to_thread(store.record_deferred, ids, str(reply))
        status = "deferred"
    event("outbox", message.id, to=f"<{rcpt.address}>", relay=where,
          dsn=reply.enhanced or f"{reply.code // 100}.0.0", status=status, reason=str(reply))


# ---------------------------------------------------------------------------
# Continuous mode.
# ---------------------------------------------------------------------------


class ContinuousPusher:
    """``push = "continuous"``: push at start and on `wake()`; see the module docstring."""

    def __init__(self, config: CustomerConfig, store: Spool, stop: asyncio.Event,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.store = store
        self.stop = stop
        self.rng = rng or random.Random()
        self.wakeup = asyncio.Event()
        self.pushes = 0
        self.last: PushResult | None = None

    def wake(self) -> None:
        self.wakeup.set()

    def retry_delay(self, failures: int) -> float:
        outbox = self.config.outbox
        base = min(outbox.retry * 2.0 ** min(failures - 1, 30), outbox.retry_max)
        return max(1.0, base * self.rng.uniform(0.9, 1.1))

    async def run(self) -> None:
        failures = 0
        unreachable = False
        self.wakeup.set()  # whatever waits in the spool at start
        while not self.stop.is_set():
            delay = self.retry_delay(failures) if failures else None
            waiters = [asyncio.ensure_future(self.stop.wait())]
            if not unreachable:
                waiters.append(asyncio.ensure_future(self.wakeup.wait()))
            if delay is not None:
                log.info("outbox: next push in %.0fs", delay)
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if self.stop.is_set():
                break
            self.wakeup.clear()
            result = await push_outbox(self.config, store=self.store, wait=True)
            self.pushes += 1
            self.last = result
            if result.messages or result.error or result.notices or result.notices_waiting:
                for line in result.lines():
                    log.info("%s", line)
            failures = failures + 1 if result.failed else 0
            unreachable = result.error is not None
