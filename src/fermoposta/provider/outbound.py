"""The outbound delivery engine: OUTBOUND recipients to the Internet.

Submitted mail and DSNs for senders we do not host wait in the queue as
OUTBOUND recipients; `OutboundRunner` delivers them.  Contract:

- Lifecycle: `start()` starts the queue runner task, `stop(grace)` stops
  claiming, lets deliveries in progress finish for `grace` seconds, cancels
  the rest and releases this runner's claims (their recipients stay queued,
  due at once; an interrupted transaction may be delivered twice, never
  lost).  `wake()` (from the event loop) makes the runner look for due mail
  now, e.g. after a submission.  `run_once()` claims everything due, delivers
  it and returns when done (tests, benchmarks, a one-shot flush).
- Every `queue_interval` (and on `wake()`), the runner claims due recipients
  in the store (`Store.claim_due_outbound`, a claim with a TTL renewed while
  this runner lives), so two runners, in one process or several, never
  deliver one recipient at once.  A batch's claims are released when it is
  done; a release the store refuses (it is down) is retried on every later
  pass until it succeeds, since the renewal would otherwise keep those
  recipients claimed, and unsent, for as long as the runner lives.
- Routing (`fermoposta.provider.resolver.Router`): transport map, smarthost,
  or MX lookup; a hosted ETRN domain's recipients (released by an ETRN,
  `provider.etrn`) go only to that domain's ETRN target or its MX hosts
  better than this provider (`Router.etrn_route`; our names are `hostname`
  and `[mx] mx_names`).  Recipients are grouped per destination; one connection
  carries many messages, one transaction all the recipients of a message
  for that destination.  At most `concurrency` connections in all and
  `concurrency_per_destination` per destination.
- Each recipient's outcome is committed before the next command is sent,
  but for a plain delivery:
  * 2xx to the end of data → delivered (`record_delivered`); if its NOTIFY
    asks for SUCCESS and the next hop does not advertise DSN, a "relayed"
    DSN goes to the sender (RFC 3461 §4.2), committed at once; without a
    DSN the removal is committed in the background, many per transaction
    (`delivery_commits.DeliveredCommits`), always before the batch's
    claims are released (a crash before it: the recipient goes again, a
    duplicate, never a loss);
  * 5xx → failed, with a failure DSN to the sender (never to `<>`);
  * 4xx, a lost connection, a timeout, every hop unreachable, a DNS
    failure, a missing required TLS, or a bug in this module → deferred:
    `last_reply` keeps the reason, the next attempt is `retry_initial`
    doubled at each attempt up to `retry_max`, ±20% jitter, and never after
    the end of the lifetime.  A deferral at or after `received_at +
    lifetime` fails the recipient instead with an expiry DSN (Status 4.4.7,
    Action failed, the last reason as Diagnostic-Code; RFC 3463 X.4.7).
    Bugs and store problems defer, they never bounce.  A deferred recipient
    of an ETRN domain goes back on hold instead (`return_to_held`): it
    waits for the next ETRN, and the hold lifetime, not this one, ends it.
  * When a deferral happens `delay_notice` (> 0) or longer after arrival, a
    "delayed" DSN goes once to the sender (for recipients whose NOTIFY
    allows it; no NOTIFY counts as FAILURE,DELAY), with Will-Retry-Until.
  * A connection that drops after the end of data leaves the recipients
    queued (RFC 1047: a duplicate is possible, a loss is not).
- Connections: the hops of the route in order; a refused or failed
  connection, a greeting or EHLO other than 2xx, or a TLS failure tries the
  next hop; when all fail, the recipients are deferred with the last reason.
  STARTTLS is used when offered (no certificate check, like Postfix's
  "may"); if the handshake fails, the same hop is retried once without
  TLS.  With `TLSPolicy.ENCRYPT` (``require_tls_domains``, ``smarthost_tls
  = "starttls"``) a missing or failing STARTTLS defers with 4.7.5.  AUTH
  PLAIN or LOGIN at the smarthost only over TLS.
- Per message: PIPELINING (MAIL, RCPTs and DATA in one write), SIZE,
  8BITMIME, SMTPUTF8 when offered, and the DSN parameters (RET, ENVID,
  NOTIFY, ORCPT, passed on as received) when the next hop offers DSN.  A
  message the next hop cannot take fails without being sent: bigger than
  its SIZE (552 5.3.4), SMTPUTF8 without SMTPUTF8 (553 5.6.7), 8-bit
  without 8BITMIME (554 5.6.3).  Recipients refused with 452 go in a
  further transaction at once (RFC 5321 §4.5.3.1.10).
- One log line per recipient and outcome, like Postfix's smtp:
  ``<queue id>: to=<rcpt>, relay=host[ip]:port, delay=1.2, dsn=2.0.0,
  status=sent (250 2.0.0 Ok)``; status is sent, deferred, bounced or
  expired; DSNs queued are logged as ``status=dsn``.
- Time comes from the injected `clock` (the store should share it).

Code: the runner (claims, routing, jobs and workers, one message's
transfer) is here; opening sessions to hops (greeting, EHLO, STARTTLS, AUTH)
is `provider.outbound_connect`; recording outcomes and their DSNs is
`provider.outbound_outcomes`; what they share (`OutboundSettings`,
`retry_delay`, `Problem`) is `provider.outbound_base`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fermoposta.config import ProviderConfig
from fermoposta.net.client import PEER_ERRORS
from fermoposta.net.transfer import (
    MessageTransfer,
    ResetRefused,
    TransferTimeouts,
    UnwantedData,
    stored_body,
)
from fermoposta.ops import metrics
from fermoposta.passwords import read_password_file
from fermoposta.provider.delivery_commits import DeliveredCommits
from fermoposta.provider.outbound_base import OutboundSettings, retry_delay
from fermoposta.provider.outbound_base import Problem as _Problem
from fermoposta.provider.outbound_connect import Connector
from fermoposta.provider.outbound_connect import HopFailure as _HopFailure
from fermoposta.provider.outbound_connect import Session as _Session
from fermoposta.provider.outbound_outcomes import Outcomes
from fermoposta.provider.resolver import (
    MXResolver,
    Route,
    RouteError,
    Router,
)
from fermoposta.smtp.reply import Reply
from fermoposta.store.base import (
    OutboundMail,
    QueuedMessage,
    QueuedRecipient,
    StoreError,
    lookup_domain,
)

__all__ = ["OutboundRunner", "OutboundSettings", "retry_delay"]

log = logging.getLogger("fermoposta.outbound")


@dataclass(slots=True)
class _Item:
    message: QueuedMessage
    recipients: list[QueuedRecipient]


@dataclass(slots=True)
class _Job:
    route: Route
    items: collections.deque[_Item] = field(default_factory=collections.deque)
    live: int = 0  # workers with an open session
    connecting: int = 0  # workers opening one


class OutboundRunner(Connector, Outcomes):
    """The queue runner for OUTBOUND recipients; see the module docstring.
    Connecting (`Connector`) and recording outcomes (`Outcomes`) are its
    mixins, in `outbound_connect` and `outbound_outcomes`."""

    def __init__(
        self,
        config: ProviderConfig,
        store: OutboundMail,
        *,
        resolver: MXResolver | None = None,
        clock: Callable[[], float] = time.time,
        settings: OutboundSettings | None = None,
        owner: str | None = None,
    ) -> None:
        self.config = config
        self.out = config.outbound
        self.store = store
        self.clock = clock
        self.settings = settings or OutboundSettings()
        self.router = Router(self.out, resolver)
        self.owner = owner or f"{config.hostname}:{os.getpid()}:{secrets.token_hex(4)}"
        self._password: str | None = None
        self._global = asyncio.Semaphore(self.out.concurrency)
        self._per_destination: dict[str, asyncio.Semaphore] = {}
        self._users: collections.Counter[str] = collections.Counter()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        # Claims `_process` could not release (the store was down): retried
        # on every pass, else the heartbeat would renew them for as long as
        # this runner lives and their recipients would never be sent.
        self._unreleased: list[tuple[list[int], float | None]] = []
        self._hosted: dict[str, bool] = {}
        self.delivered_commits = DeliveredCommits(self.store, log)
        # Counters for tests, benchmarks and logs.
        self.delivered = 0
        self.deferred = 0
        self.failed = 0
        self.connections = 0
        self.max_connections_seen = 0
        self._open_connections = 0

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the queue runner (idempotent)."""
        if self._loop_task is not None:
            return
        self._check_config()
        self._stopping = False
        self._loop_task = asyncio.create_task(self._loop(), name="outbound-runner")
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="outbound-claims")
        log.info("outbound queue runner %s started", self.owner)

    def wake(self) -> None:
        """Look for due mail now (call from the event loop thread)."""
        self._wakeup.set()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; let deliveries finish for `grace` s; cancel the rest;
        release this runner's claims."""
        self._stopping = True
        self._wakeup.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._batches:
            _, pending = await asyncio.wait(set(self._batches), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        # Deliveries committed while the heartbeat still renews their claims.
        await self.delivered_commits.flush()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            self._heartbeat_task = None
        try:
            await asyncio.to_thread(self.store.release_claims, self.owner)
            self._unreleased.clear()  # released with the rest, due at once
        except StoreError as exc:
            log.warning("cannot release outbound claims (they expire by themselves): %s", exc)

    async def run_once(self) -> int:
        """Claim and deliver everything due now; return the recipients handled."""
        self._check_config()
        handled = 0
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while True:
                await self._release_unreleased()
                messages = await asyncio.to_thread(
                    self.store.claim_due_outbound, self.clock(), self.settings.claim_batch,
                    self.owner, self.settings.claim_ttl)
                if not messages:
                    return handled
                handled += sum(len(m.recipients) for m in messages)
                await self._process(messages)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    def _check_config(self) -> None:
        if self.out.smarthost is not None and self.out.smarthost_username:
            if self.out.smarthost_tls == "none":
                log.error("[outbound] smarthost_username is set but smarthost_tls = \"none\": "
                          "AUTH is only sent over TLS; mail to the smarthost will be deferred")
            if self._password is None and self.out.smarthost_password_file is not None:
                try:
                    self._password = read_password_file(self.out.smarthost_password_file)
                except ValueError as exc:
                    log.error("cannot read [outbound] smarthost_password_file: %s", exc)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.claim_ttl / 3)
            try:
                await asyncio.to_thread(self.store.renew_claims, self.owner, self.clock(),
                                        self.settings.claim_ttl)
            except StoreError as exc:
                log.warning("cannot renew outbound claims: %s", exc)

    async def _loop(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            try:
                await self._fill()
            except StoreError as exc:
                log.warning("outbound queue runner: store error: %s", exc)
            except Exception:  # a bug must not stop the runner
                log.exception("outbound queue runner: unexpected error")
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.out.queue_interval)

    async def _release_unreleased(self) -> None:
        """Retry the releases that failed; raises StoreError if the store
        still fails (the rest are kept for the next pass)."""
        while self._unreleased:
            ids, at = self._unreleased[0]
            await asyncio.to_thread(self.store.release_claims, self.owner, ids, at)
            self._unreleased.pop(0)
            log.info("released %d outbound claims left over from a store error", len(ids))

    async def _fill(self) -> None:
        await self._release_unreleased()
        while not self._stopping and self._in_flight < self.settings.max_in_flight:
            limit = min(self.settings.claim_batch, self.settings.max_in_flight - self._in_flight)
            messages = await asyncio.to_thread(
                self.store.claim_due_outbound, self.clock(), limit, self.owner,
                self.settings.claim_ttl)
            if not messages:
                return
            count = sum(len(m.recipients) for m in messages)
            self._in_flight += count
            task = asyncio.create_task(self._process(messages))
            self._batches.add(task)

            def done(t: asyncio.Task[None], count: int = count) -> None:
                self._batches.discard(t)
                self._in_flight -= count
                if not t.cancelled() and t.exception() is not None:
                    log.error("outbound batch failed: %r", t.exception())
                self._wakeup.set()  # capacity is free again

            task.add_done_callback(done)
            if count < limit:
                return

    # --- routing and jobs ------------------------------------------------------------------
    async def _process(self, messages: Sequence[QueuedMessage]) -> None:
        """Deliver a claimed batch.  Safety net: whatever is still claimed at
        the end (a store error, a bug) is released with a retry delay."""
        ids = [r.id for m in messages for r in m.recipients]
        delay: float | None = self.out.retry_initial
        try:
            await self._route_and_deliver(messages)
        except asyncio.CancelledError:
            delay = None  # stopped: what is left is due at once
            raise
        finally:
            # Deliveries are committed before their claims go (a delivered
            # recipient released undelivered would go again at once).
            await self.delivered_commits.flush()
            at = None if delay is None else self.clock() + delay
            try:
                await asyncio.to_thread(self.store.release_claims, self.owner, ids, at)
            except StoreError as exc:
                # Still claimed by us, and renewed by our heartbeat: the
                # runner's next pass must release them (`_release_unreleased`).
                log.warning("cannot release %d outbound claims now, will retry: %s",
                            len(ids), exc)
                self._unreleased.append((ids, at))

    async def _route_and_deliver(self, messages: Sequence[QueuedMessage]) -> None:
        self._hosted.clear()
        domains = sorted({r.domain for m in messages for r in m.recipients})
        routes: dict[str, Route | RouteError] = {}

        async def lookup(domain: str) -> None:
            try:
                target = await self._etrn_target(domain)
                if target is not None:
                    routes[domain] = await self.router.etrn_route(domain, target,
                                                                  self._own_names())
                else:
                    routes[domain] = await self.router.route(domain)
            except RouteError as exc:
                routes[domain] = exc
            except Exception as exc:  # a bug: defer
                log.exception("routing %s failed", domain)
                routes[domain] = RouteError(Reply(451, "4.3.0", f"Local error routing {domain}: "
                                                  f"{type(exc).__name__}"))

        limit = asyncio.Semaphore(20)

        async def bounded(domain: str) -> None:
            async with limit:
                await lookup(domain)

        await asyncio.gather(*(bounded(d) for d in domains))
        jobs: dict[str, _Job] = {}
        for message in messages:
            per_key: dict[str, _Item] = {}
            unroutable: dict[str, list[QueuedRecipient]] = {}
            for rcpt in message.recipients:
                route = routes[rcpt.domain]
                if isinstance(route, RouteError):
                    unroutable.setdefault(rcpt.domain, []).append(rcpt)
                    continue
                job = jobs.setdefault(route.key, _Job(route))
                item = per_key.get(route.key)
                if item is None:
                    item = per_key[route.key] = _Item(message, [])
                    job.items.append(item)
                item.recipients.append(rcpt)
            if unroutable:
                await self._settle_unroutable(message, unroutable, routes)
        await asyncio.gather(*(self._run_job(job) for job in jobs.values()))

    async def _settle_unroutable(self, message: QueuedMessage,
                                 unroutable: dict[str, list[QueuedRecipient]],
                                 routes: dict[str, Route | RouteError]) -> None:
        """Fail (one DSN per message) or defer the recipients without a route."""
        failed: list[tuple[QueuedRecipient, _Problem]] = []
        deferred: list[tuple[QueuedRecipient, _Problem]] = []
        for domain, rcpts in unroutable.items():
            error = routes[domain]
            assert isinstance(error, RouteError)
            problem = _Problem(error.reply)
            target = failed if error.reply.is_permanent else deferred
            target += [(r, problem) for r in rcpts]
        try:
            if failed:
                await self._fail_each(message, failed, "bounced")
            if deferred:
                await self._defer_each(message, deferred)
        except StoreError as exc:
            log.warning("%s: store error, recipients stay queued: %s", message.id, exc)
        except Exception:
            log.exception("%s: cannot record the outcome; recipients stay queued", message.id)

    async def _etrn_target(self, domain: str) -> str | None:
        """The ETRN target of a hosted ETRN domain ("" = its MX hosts), else None."""
        hosted = await lookup_domain(self.store, domain)
        return None if hosted is None else hosted.etrn

    def _own_names(self) -> list[str]:
        return [self.config.hostname, *self.config.mx.mx_names]

    def _semaphore(self, key: str) -> asyncio.Semaphore:
        sem = self._per_destination.get(key)
        if sem is None:
            sem = self._per_destination[key] = asyncio.Semaphore(
                self.out.concurrency_per_destination)
        return sem

    async def _run_job(self, job: _Job) -> None:
        key = job.route.key
        self._users[key] += 1
        try:
            workers = min(self.out.concurrency_per_destination, len(job.items))
            await asyncio.gather(*(self._worker(job) for _ in range(workers)))
        finally:
            self._users[key] -= 1
            if self._users[key] <= 0:
                del self._users[key]
                self._per_destination.pop(key, None)

    async def _worker(self, job: _Job) -> None:
        async with self._semaphore(job.route.key), self._global:
            session: _Session | None = None
            try:
                while job.items:
                    if session is None or session.broken or (
                            session.messages >= self.settings.messages_per_connection):
                        if session is not None:
                            job.live -= 1
                            await self._quit(session)
                            session = None
                        job.connecting += 1
                        failure: _HopFailure | None = None
                        try:
                            session = await self._connect(job.route)
                        except _HopFailure as exc:
                            failure = exc
                        finally:
                            job.connecting -= 1
                        if failure is not None:
                            if job.live == 0 and job.connecting == 0:
                                # Unreachable now, and no other connection is
                                # (or may soon be) working on it: defer all of
                                # its mail.  Otherwise (e.g. a 421 "too many
                                # connections") leave the rest to the others.
                                while job.items:
                                    item = job.items.popleft()
                                    await self._settle_safely(item.message, item.recipients,
                                                              failure.problem)
                            return
                        job.live += 1
                        if not job.items:
                            break
                    assert session is not None
                    if not self.store.holder_is_current():
                        # Our store heartbeat is failing: another node may
                        # take our claims soon; start no transaction it
                        # could overlap.  The rest stays claimed for now.
                        log.warning("this node has lost the store (heartbeat failing): "
                                    "%d message(s) to %s left for later or another node",
                                    len(job.items), session.relay)
                        return
                    await self._deliver_item(session, job.items.popleft())
            finally:
                if session is not None:
                    job.live -= 1
                    await self._quit(session)

    async def _deliver_item(self, session: _Session, item: _Item) -> None:
        """Deliver one message; whatever happens, its recipients are settled or
        left claimed for `release_claims` (only on cancellation)."""
        pending = list(item.recipients)
        settled: set[int] = set()

        async def settle(rcpts: list[QueuedRecipient], reply: Reply) -> None:
            await self._settle(item.message, rcpts, session.problem(reply), session)
            settled.update(r.id for r in rcpts)

        async def settle_stage(message: QueuedMessage, rcpts: list[QueuedRecipient],
                               reply: Reply, stage: str) -> None:
            await settle(rcpts, reply)
            if session.broken:  # a 421: stop using this connection
                raise ResetRefused(f"{session.relay} is closing: {reply}")

        transfer = MessageTransfer(
            session.client, peer=session.relay, body=stored_body(self.store), settle=settle_stage,
            timeouts=TransferTimeouts(command=self.settings.command_timeout,
                                      data_init=self.settings.data_init_timeout,
                                      final_reply=self.settings.final_reply_timeout))
        started = time.monotonic()
        try:
            session.messages += 1
            await transfer.send(item.message, pending)
            metrics.DELIVERY_SECONDS.labels("outbound").observe(time.monotonic() - started)
        except ResetRefused:
            session.broken = True
            left = [r for r in pending if r.id not in settled]
            if left:
                await self._settle_safely(item.message, left, _Problem(
                    Reply(451, "4.4.2", f"{session.relay} ended the session; will retry"),
                    session.relay))
        except (*PEER_ERRORS, UnwantedData) as exc:
            session.broken = True
            session.conn.abort()
            left = [r for r in pending if r.id not in settled]
            if left:
                reason = Reply(451, "4.4.2", f"lost connection with {session.relay} "
                               f"({type(exc).__name__}: {exc})".replace(": )", ")"))
                await self._settle_safely(item.message, left,
                                          _Problem(reason, session.relay))
        except StoreError as exc:
            session.broken = True
            session.conn.abort()
            log.warning("%s: store error, recipients stay queued: %s", item.message.id, exc)
        except asyncio.CancelledError:
            session.broken = True
            session.conn.abort()
            raise
        except Exception:
            log.exception("%s: unexpected error while delivering", item.message.id)
            session.broken = True
            session.conn.abort()
            left = [r for r in pending if r.id not in settled]
            if left:
                await self._settle_safely(item.message, left, _Problem(
                    Reply(451, "4.3.0", "Local error in delivery, will retry"), session.relay))
