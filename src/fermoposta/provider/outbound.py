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
- Each recipient's outcome is committed before the next command is sent:
  * 2xx to the end of data → delivered (`record_delivered`); if its NOTIFY
    asks for SUCCESS and the next hop does not advertise DSN, a "relayed"
    DSN goes to the sender (RFC 3461 §4.2);
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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import os
import random
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO

from fermoposta.config import ProviderConfig
from fermoposta.mail.dsn import Action, RecipientReport, build_dsn, wants_notice
from fermoposta.net.client import PEER_ERRORS, SMTPClient
from fermoposta.net.connection import Connection, ConnectionClosed, open_connection
from fermoposta.net.transfer import (
    MessageTransfer,
    ResetRefused,
    TransferTimeouts,
    UnwantedData,
    stored_body,
)
from fermoposta.ops import metrics
from fermoposta.ops.log import event
from fermoposta.passwords import read_password_file
from fermoposta.provider.resolver import (
    Hop,
    MXResolver,
    Route,
    RouteError,
    Router,
    TLSPolicy,
)
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.sasl_client import SASLClientError, client_mechanism
from fermoposta.store.base import (
    NewMessage,
    OutboundMail,
    QueuedMessage,
    QueuedRecipient,
    StoreError,
    lookup_domain,
)

__all__ = ["OutboundRunner", "OutboundSettings", "retry_delay"]

log = logging.getLogger("fermoposta.outbound")



@dataclass(frozen=True, slots=True)
class OutboundSettings:
    """Client timeouts (RFC 5321 §4.5.3.2) and queue runner bounds."""

    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    command_timeout: float = 300.0  # EHLO, MAIL, RCPT, AUTH, STARTTLS
    data_init_timeout: float = 120.0
    data_block_timeout: float = 180.0
    final_reply_timeout: float = 600.0
    quit_timeout: float = 30.0
    tls_handshake_timeout: float = 60.0
    claim_ttl: float = 900.0  # renewed every third of it while the runner lives
    claim_batch: int = 500  # recipients claimed at once
    max_in_flight: int = 10_000  # recipients claimed and not yet settled
    messages_per_connection: int = 1000


def retry_delay(attempts: int, initial: float, maximum: float,
                rng: Callable[[float, float], float] = random.uniform) -> float:
    """The wait before the next attempt after `attempts` failed ones (0 = the
    first failure): `initial` doubled per attempt, capped at `maximum`, ±20%."""
    base = min(maximum, initial * float(1 << min(attempts, 32)))
    return base * rng(0.8, 1.2)


def _status(reply: Reply) -> str:
    return reply.enhanced or f"{reply.code // 100}.0.0"


@dataclass(frozen=True, slots=True)
class _Problem:
    """Why recipients were not delivered: a reply (ours or the server's)."""

    reply: Reply
    relay: str = "none"
    remote_mta: str | None = None  # set when `reply` came from that server

    def report(self, rcpt: QueuedRecipient, status: str | None = None) -> RecipientReport:
        if self.remote_mta is not None:
            return RecipientReport(rcpt, status or _status(self.reply), self.reply,
                                   self.remote_mta)
        return RecipientReport(rcpt, status or _status(self.reply),
                               diagnostic=str(self.reply))


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




class _HopFailure(Exception):
    def __init__(self, problem: _Problem, *, retry_plain: bool = False) -> None:
        super().__init__(str(problem.reply))
        self.problem = problem
        self.retry_plain = retry_plain


class _Session:
    """One SMTP connection to a hop, after EHLO (and STARTTLS, AUTH)."""

    def __init__(self, conn: Connection, client: SMTPClient, hop: Hop, helo_name: str) -> None:
        self.conn = conn
        self.client = client
        self.hop = hop
        self.name = helo_name  # the server's name from its EHLO reply
        self.relay = f"{helo_name}[{hop.ip}]:{hop.port}"
        self.messages = 0
        self.broken = False

    def problem(self, reply: Reply) -> _Problem:
        return _Problem(reply, self.relay, self.hop.name)


class OutboundRunner:
    """The queue runner for OUTBOUND recipients; see the module docstring."""

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

    # --- connecting ------------------------------------------------------------------------
    async def _connect(self, route: Route) -> _Session:
        last: _Problem | None = None
        for hop in route.hops:
            try:
                return await self._open(route, hop, starttls=True)
            except _HopFailure as failure:
                last = failure.problem
                if failure.retry_plain:
                    try:
                        return await self._open(route, hop, starttls=False)
                    except _HopFailure as again:
                        last = again.problem
        if last is None:
            last = _Problem(Reply(451, "4.4.4", "No route to the destination"))
        raise _HopFailure(last)

    async def _open(self, route: Route, hop: Hop, *, starttls: bool) -> _Session:
        s = self.settings
        relay = str(hop)
        context = None
        if route.tls == TLSPolicy.IMPLICIT:
            context = _client_tls_context()
        try:
            conn = await open_connection(
                hop.ip, hop.port, timeout=s.connect_timeout, ssl_context=context,
                server_hostname=None if context is None or _is_ip(hop.name) else hop.name)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            text = f"connect to {relay}: {_os_error(exc)}"
            code = "4.7.5" if isinstance(exc, ssl.SSLError) else "4.4.1"
            raise _HopFailure(_Problem(Reply(451, code, text), relay)) from exc
        self.connections += 1
        self._open_connections += 1
        self.max_connections_seen = max(self.max_connections_seen, self._open_connections)
        client = SMTPClient(conn, write_timeout=s.data_block_timeout)
        try:
            return await self._handshake(route, hop, conn, client, starttls)
        except _HopFailure:
            self._closed(conn)
            raise
        except PEER_ERRORS as exc:
            self._closed(conn)
            raise _HopFailure(_Problem(Reply(451, "4.4.2", f"lost connection with {relay} "
                                             f"during the greeting: {_os_error(exc)}"),
                                       relay)) from exc
        except BaseException:
            self._closed(conn)
            raise

    def _closed(self, conn: Connection) -> None:
        conn.abort()
        self._open_connections -= 1

    async def _handshake(self, route: Route, hop: Hop, conn: Connection, client: SMTPClient,
                         starttls: bool) -> _Session:
        s = self.settings
        relay = str(hop)
        greeting = await client.read_reply(s.greeting_timeout)
        name = _server_name(greeting, hop)
        if greeting.code != 220:
            await self._quit_client(client)
            raise _HopFailure(_Problem(_temporary(greeting, "greeting"), relay, hop.name))
        reply = await client.ehlo(self.config.hostname, s.command_timeout)
        if reply.code != 250:
            await self._quit_client(client)
            raise _HopFailure(_Problem(_temporary(reply, "EHLO"), relay, hop.name))
        name = _server_name(reply, hop, name)
        relay = f"{name}[{hop.ip}]:{hop.port}"
        must_tls = route.tls == TLSPolicy.ENCRYPT
        if not conn.tls_active and route.tls != TLSPolicy.NONE and starttls:
            if client.has("STARTTLS"):
                answer = await client.command("STARTTLS", s.command_timeout)
                if answer.code == 220:
                    try:
                        await conn.start_tls(
                            _client_tls_context(), server_side=False,
                            server_hostname=None if _is_ip(hop.name) else hop.name,
                            timeout=s.tls_handshake_timeout)
                    except (ssl.SSLError, OSError, TimeoutError, ConnectionClosed) as exc:
                        problem = _Problem(Reply(451, "4.7.5", f"TLS handshake with {relay} "
                                                 f"failed: {_os_error(exc)}"), relay)
                        raise _HopFailure(problem, retry_plain=not must_tls) from exc
                    reply = await client.ehlo(self.config.hostname, s.command_timeout)
                    if reply.code != 250:
                        await self._quit_client(client)
                        raise _HopFailure(_Problem(_temporary(reply, "EHLO after STARTTLS"),
                                                   relay, hop.name))
                elif must_tls:
                    await self._quit_client(client)
                    raise _HopFailure(_Problem(Reply(451, "4.7.5", f"TLS is required, but "
                                                     f"{relay} refused STARTTLS: {answer}"),
                                               relay, hop.name))
            elif must_tls:
                await self._quit_client(client)
                raise _HopFailure(_Problem(Reply(451, "4.7.5", "TLS is required, but was not "
                                                 f"offered by {relay}"), relay))
        if must_tls and not conn.tls_active:
            await self._quit_client(client)
            raise _HopFailure(_Problem(Reply(451, "4.7.5", f"TLS is required for {relay}"),
                                       relay))
        session = _Session(conn, client, hop, name)
        if route.auth:
            await self._authenticate(session)
        return session

    async def _authenticate(self, session: _Session) -> None:
        client, relay = session.client, session.relay
        username = self.out.smarthost_username
        if not session.conn.tls_active:
            await self._quit_client(client)
            raise _HopFailure(_Problem(Reply(451, "4.7.0", f"AUTH at {relay} needs TLS "
                                             "(smarthost_tls)"), relay))
        if self._password is None:
            await self._quit_client(client)
            raise _HopFailure(_Problem(Reply(451, "4.7.0", "The smarthost password is not "
                                             "readable"), relay))
        offered = client.capabilities.get("AUTH", "").upper().split()
        if not offered:
            return  # the relay does not want AUTH (from us): go on without
        mech = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
        if mech is None:
            await self._quit_client(client)
            raise _HopFailure(_Problem(Reply(451, "4.7.0", f"{relay} offers no PLAIN or LOGIN "
                                             f"AUTH: {' '.join(offered)}"), relay))
        sasl = client_mechanism(mech, username=username, password=self._password)
        timeout = self.settings.command_timeout
        initial = sasl.initial_response()
        line = f"AUTH {mech}"
        if initial is not None:
            line += " " + (base64.b64encode(initial).decode() if initial else "=")
        reply = await client.command(line, timeout, secret=True)
        try:
            while reply.code == 334:
                challenge = base64.b64decode(reply.lines[0].strip(), validate=True)
                answer = sasl.respond(challenge)
                reply = await client.command(base64.b64encode(answer).decode(), timeout,
                                             secret=True)
        except (binascii.Error, ValueError, SASLClientError) as exc:
            with contextlib.suppress(*PEER_ERRORS):
                await client.command("*", timeout)
            await self._quit_client(client)
            raise _HopFailure(_Problem(Reply(451, "4.7.0", f"AUTH {mech} at {relay}: bad "
                                             f"challenge ({exc})"), relay)) from exc
        if reply.code != 235:
            await self._quit_client(client)
            # A refused login is a configuration problem here: defer, never bounce.
            raise _HopFailure(_Problem(Reply(454, "4.7.0", f"AUTH {mech} at {relay} "
                                             f"failed: {reply}"), relay, session.hop.name))

    async def _quit_client(self, client: SMTPClient) -> None:
        with contextlib.suppress(*PEER_ERRORS):
            await client.command("QUIT", self.settings.quit_timeout)

    async def _quit(self, session: _Session) -> None:
        if not session.broken:
            await self._quit_client(session.client)
        session.broken = True
        self._closed(session.conn)

    # --- one message -----------------------------------------------------------------------
    # --- outcomes --------------------------------------------------------------------------
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
            try:
                dsn_id = await asyncio.to_thread(self.store.record_delivered,
                                                 [r.id for r in recipients], str(reply), dsn)
            finally:
                if dsn is not None:
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
        """Put the deferred recipients of ETRN domains back on hold; return the others."""
        etrn: dict[str, bool] = {}
        for domain in {r.domain for r, _ in pairs}:
            try:
                etrn[domain] = await self._etrn_target(domain) is not None
            except StoreError:
                etrn[domain] = False  # deferred as outbound mail: retried, not lost
        held = [(r, p) for r, p in pairs if etrn[r.domain]]
        by_reply: dict[str, list[int]] = {}
        for rcpt, problem in held:
            by_reply.setdefault(str(problem.reply), []).append(rcpt.id)
        for reply_text, ids in by_reply.items():
            await asyncio.to_thread(self.store.return_to_held, ids, reply_text)
        self.deferred += len(held)
        for rcpt, problem in held:
            self._log(message, [rcpt], problem, "deferred", note="held until the next ETRN")
        return [(r, p) for r, p in pairs if not etrn[r.domain]]

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


# --- helpers ---------------------------------------------------------------------------------


def _client_tls_context() -> ssl.SSLContext:
    """Opportunistic/encrypt-only TLS: no certificate or name check (Postfix
    "may"/"encrypt"); TLS 1.2 or later."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _os_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "Connection timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # "Connection refused", not asyncio's wording
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return str(exc) or type(exc).__name__


def _server_name(reply: Reply, hop: Hop, default: str | None = None) -> str:
    first = reply.lines[0].split(" ", 1)[0] if reply.lines and reply.lines[0] else ""
    if first and all(c.isalnum() or c in "-._" for c in first) and len(first) <= 253:
        return first
    return default or hop.name


def _temporary(reply: Reply, where: str) -> Reply:
    """A refusal before any transaction (greeting, EHLO) defers: the next hop
    is tried, and when none takes the mail it waits (like Postfix's
    smtp_skip_5xx_greeting).  The enhanced code keeps its subject and detail."""
    if reply.is_temporary:
        return reply
    enhanced = "4" + reply.enhanced[1:] if reply.enhanced else "4.4.0"
    return Reply(451, enhanced, f"{where} refused: {reply}")



