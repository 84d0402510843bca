"""The provider's ODMR listener, phase 1: EHLO/STARTTLS/AUTH/ATRN (RFC 2645 §5).

Contract:
- Initial state accepts EHLO, HELO, AUTH, QUIT, STARTTLS, NOOP, RSET; after a
  successful AUTH, ATRN.  Every other verb of SMTP (MAIL, RCPT, DATA, TURN,
  ETRN, VRFY, ...) gets 502 (RFC 2645 §5.4); an unknown verb 500.
- EHLO lists AUTH and ATRN (RFC 2645 §5.1.1).  AUTH is `mail.auth`'s
  (shared with submission): PLAIN and LOGIN only under TLS unless
  `[odmr] allow_plaintext_auth`; EXTERNAL for a verified client certificate
  bound to an account by fingerprint or subject; `max_auth_failures` → 421.
- ATRN replies exactly as RFC 2645 §7: 530 before AUTH; 501 for a malformed
  list; 450 when any requested domain is not the account's (nothing is sent;
  the reply does not say which; the log line does, with the reason: not
  hosted, owned by another account, the account has no domains) or when
  ATRNs come faster than `min_atrn_interval`; 453 when there is no mail;
  451 when the store cannot answer or another session holds a lease on a
  domain; 250 then the flip.
- Waiting (issue 12): when ATRN finds no mail and the account has an
  `atrn_wait` (at most `MAX_ATRN_WAIT`, 9 minutes: RFC 2645 §4 and §5.2
  make the client wait at least 10 for the reply) and the node's
  `HeldMailWatch` has room (`[odmr] max_waiting`), the session waits
  instead of answering 453, holding no lease and making no query of its
  own, except that a bare ATRN (every domain of the account) reads the
  account's domains every `BARE_REFRESH_POLLS` polls of the watch (30 s
  by default): a domain added to the account while it waits is waited
  for, and its mail taken, from then on.  Woken (mail for one of its
  domains was committed, on any node; or a bare ATRN's domains changed), it
  decides again (held mail? leases?): 250 and the drain as always; a lease
  another session holds means it keeps waiting (that session drains the
  mail; later mail wakes this one again).  When the wait ends: 453 (or the
  "quit" reply of `no_mail_reply`); when the provider stops: 421 4.3.2.
  The wait counts neither against the command timeout nor against
  `session_deadline`.  A line the client sends while waiting (it must not,
  RFC 2645 §5.2.1) ends the wait: 453 for the ATRN, then 221 and close for
  QUIT, else 503 and the session goes on.  A client that hangs up ends it
  too.  Logged: a line when the wait starts, and when it is woken or ends.
- ATRN is synchronizing (RFC 2920 by analogy with TURN): bytes pipelined
  after it are discarded and answered 503, and the session stays
  authenticated.  So nothing pre-sent is ever read as the customer's greeting.
- The flip is a hand-off: after the 250 the ATRN handler ends phase 1 and
  `ServerSession.run()` runs `drain()` on the same `Connection` (TLS
  included) outside every verb handler; an unexpected error there drops the
  connection and never writes a server reply.  Leases are released in every
  case when the session ends; a release the store refuses (it is down) is
  retried in the background every `RELEASE_RETRY` seconds until it succeeds
  or `lease_ttl` has passed, so the domain is free soon after the store is
  back, not only when the lease expires.
- With `activity` set (the provider sets its `provider.activity.Activity`),
  each drain is recorded there as in progress, then with its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from fermoposta.mail.auth import Authenticator
from fermoposta.net.connection import Connection, ConnectionClosed, LineTooLong
from fermoposta.net.server_session import ServerSession, SessionLimits
from fermoposta.ops import metrics
from fermoposta.ops.log import event
from fermoposta.provider.activity import Activity
from fermoposta.provider.atrn_wait import HeldMailWatch, Waiter
from fermoposta.provider.drain import DrainSettings, drain
from fermoposta.smtp import reply as R
from fermoposta.smtp.atrn import parse_atrn_domains
from fermoposta.smtp.reply import Reply, SMTPError
from fermoposta.smtp.server import COMMAND_LINE_LIMIT, VerbSpec, verb_table
from fermoposta.store.base import HostedMail, StoreError

log = logging.getLogger("fermoposta.odmr")

ATRN_NOT_LAST = Reply(503, "5.5.1", "ATRN must be the last command in a pipeline")
DOMAIN_BUSY = Reply(451, "4.3.0", "Unable to process ATRN request now: domain busy, try later")
TOO_SOON = Reply(450, "4.7.1", "ATRN request refused: too frequent, try later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
WAITED_OUT_OF_TURN = Reply(503, "5.5.1", "Command sent while ATRN waited for mail; discarded")
MAX_ATRN_WAIT = 540.0  # seconds: RFC 2645 §4 and §5.2, the client waits at least 10 minutes
RELEASE_RETRY = 2.0  # seconds between attempts to release leases the store refused
# A waiting bare ATRN reads its account's domains every this many polls of
# the watch (`[odmr] wait_poll_interval`): one query a session, rarely.
BARE_REFRESH_POLLS = 10

# Background releases in progress (a reference keeps each task alive).
_releases: set[asyncio.Task[None]] = set()


@dataclass(frozen=True, slots=True)
class ODMRSettings:
    mechanisms: tuple[str, ...] = ("SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5", "EXTERNAL")
    allow_plaintext_auth: bool = False
    require_tls: bool = False
    max_auth_failures: int = 3
    min_atrn_interval: float = 0.0
    lease_ttl: float = 600.0
    no_mail_reply: str = "453"  # or "quit": RFC 2645 §5.2.1 MAY answer 250 then QUIT


class ODMRSession(ServerSession):
    component = "odmr"

    def __init__(
        self,
        conn: Connection,
        *,
        hostname: str,
        limits: SessionLimits,
        store: HostedMail,
        settings: ODMRSettings,
        drain_settings: DrainSettings,
        tls_context: ssl.SSLContext | None = None,
        watch: HeldMailWatch | None = None,
        listener: str = "odmr",
    ) -> None:
        super().__init__(conn, hostname=hostname, limits=limits, tls_context=tls_context)
        self.store = store
        self.watch = watch  # the node's waiting ATRNs; None: never wait
        self.listener = listener
        self.settings = settings
        self.drain_settings = drain_settings
        self.auth = Authenticator(self, store, settings)
        self.leased = False
        self.refusal = ""  # why `_decide` refused the last ATRN with 450, for the log
        # The provider's record of pulls in progress and done (the status page).
        self.activity: Activity | None = None
        self.atrn_wait = 0.0  # the account's wait for mail, as `_decide` last read it
        self.atrn_domains: tuple[str, ...] = ()  # the domains `_decide` last resolved

    def greeting(self) -> Reply:
        return Reply(220, None, f"{self.hostname} ESMTP fermoposta on-demand mail relay ready")

    def extensions(self) -> list[str]:
        exts = []
        mechs = self.auth.offered_mechanisms()
        if mechs and self.account is None:
            exts.append("AUTH " + " ".join(mechs))
        exts.append("ATRN")
        return [*exts, *super().extensions()]

    def reset_after_tls(self) -> None:
        super().reset_after_tls()
        self.auth.account = None

    # --- AUTH (RFC 4954), shared with submission -------------------------------------------
    @property
    def account(self) -> str | None:
        return self.auth.account

    async def smtp_auth(self, arg: str) -> Reply | None:
        return await self.auth.smtp_auth(arg)

    # --- ATRN (RFC 2645 §5.2.1) ---------------------------------------------------------
    async def smtp_atrn(self, arg: str) -> Reply | None:
        try:
            reply = await self._atrn(arg)
        except SMTPError:
            metrics.ATRN_SESSIONS.labels("syntax").inc()
            raise
        metrics.ATRN_SESSIONS.labels(_atrn_result(reply, self.handoff is not None)).inc()
        return reply

    async def _atrn(self, arg: str) -> Reply | None:
        if self.settings.require_tls and not self.conn.tls_active:
            return R.MUST_STARTTLS
        if self.account is None:
            return R.ATRN_AUTH_REQUIRED
        if self.conn.buffered():
            dropped = len(self.conn.discard_buffer())
            self.log.warning("%s: discarded %d bytes pipelined after ATRN from [%s]",
                             self.session_id, dropped, self.conn.peer_ip)
            return ATRN_NOT_LAST
        requested = parse_atrn_domains(arg)
        self.refusal = ""
        try:
            decision = await asyncio.to_thread(self._decide, requested)
        except StoreError as exc:
            self.log.warning("%s: ATRN: store error: %s", self.session_id, exc)
            return R.ATRN_UNAVAILABLE
        if ((decision is R.ATRN_NO_MAIL or decision is DOMAIN_BUSY)
                and self.atrn_wait > 0 and self.watch is not None):
            # Busy: another session holds the domain (often the customer's
            # own previous one, still closing): wait for its lease to go.
            waited = await self._wait_for_mail(self.watch, requested, decision)
            if waited is None:
                return None  # the client hung up, or said QUIT, while we waited
            decision = waited
        if isinstance(decision, Reply):
            if decision.code == 453 and self.settings.no_mail_reply == "quit":
                # RFC 2645 §5.2.1 lets us reverse anyway and QUIT at once.
                self.log.info("%s: ATRN %s by %s: no mail; reversing to QUIT "
                              "(no_mail_reply = \"quit\")", self.session_id,
                              ",".join(requested) or "(all)", self.account)
                domains: tuple[str, ...] = ()
            else:
                why = f" ({self.refusal})" if self.refusal else ""
                self.log.info("%s: ATRN %s by %s refused: %s%s", self.session_id,
                              ",".join(requested) or "(all)", self.account, decision, why)
                return decision
        else:
            domains = decision
        self.leased = bool(domains)
        if self.conn.buffered():
            # Sent while we decided or waited: still not ours to read as the
            # customer's greeting (RFC 2645 §5.3), and no 250 was sent.
            dropped = len(self.conn.discard_buffer())
            self.log.warning("%s: discarded %d bytes pipelined after ATRN from [%s]",
                             self.session_id, dropped, self.conn.peer_ip)
            await self._give_back_leases()
            return ATRN_NOT_LAST
        await self.send(R.ATRN_REVERSING)  # nothing buffered: written at once
        event("odmr", None, session=self.session_id, account=self.account,
              domains=",".join(domains) or "-", client=f"{self.helo_name}[{self.conn.peer_ip}]",
              status="reversing")
        # The flip is a hand-off (RFC 2645 §5.3): phase 1 ends here and the
        # session runs the drain after its command loop, outside this
        # handler, so nothing in phase 2 can be answered with a server reply.
        self.closing = True
        self.handoff = functools.partial(self._phase_two, domains)
        return None

    async def _phase_two(self, domains: tuple[str, ...]) -> None:
        activity, account = self.activity, self.account
        if activity is None or account is None:
            await drain(self.conn, self.store, domains=domains, hostname=self.hostname,
                        session_id=self.session_id, settings=self.drain_settings)
            return
        handle = activity.started(account, domains)
        result = None
        try:
            result = await drain(self.conn, self.store, domains=domains, hostname=self.hostname,
                                 session_id=self.session_id, settings=self.drain_settings)
        finally:
            if result is None:
                activity.finished(handle, messages=0, delivered=0, deferred=0, failed=0,
                                  aborted="the drain stopped with an error")
            else:
                activity.finished(handle, messages=result.messages, delivered=result.delivered,
                                  deferred=result.deferred, failed=result.failed,
                                  aborted=result.aborted)

    async def _wait_for_mail(self, watch: HeldMailWatch, requested: tuple[str, ...],
                             first: Reply) -> Reply | tuple[str, ...] | None:
        """No mail yet (`first` is 453), or it is there but another session
        holds the domain (`first` is 451): wait up to the account's
        `atrn_wait` for mail we may take (see the module docstring).  The
        ATRN's reply or its leased domains; None when the session is over
        (the client hung up or sent QUIT)."""
        what = ",".join(requested) or "(all)"
        why = "domain busy" if first is DOMAIN_BUSY else "no mail"
        waiter = watch.enter(self.atrn_domains, self.listener)
        if waiter is None:
            self.log.info("%s: ATRN %s by %s: %s, and %d sessions already wait "
                          "([odmr] max_waiting); %d now", self.session_id, what,
                          self.account, why, watch.waiting, first.code)
            metrics.ATRN_WAITS.labels("full").inc()
            return first
        wait = min(self.atrn_wait, MAX_ATRN_WAIT)
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.log.info("%s: ATRN %s by %s: %s; waiting up to %gs for it",
                      self.session_id, what, self.account, why, wait)
        # Neither the session deadline nor the command timeout runs while we wait.
        saved_deadline, self.conn.deadline = self.conn.deadline, None
        reader = asyncio.ensure_future(self.conn.read_line(COMMAND_LINE_LIMIT, wait + 60.0))
        closing = asyncio.ensure_future(watch.closing.wait())
        # Look once at once: mail may have come between `_decide` and `enter`.
        waiter.event.set()
        # A bare ATRN stands for the account's domains: nothing wakes it for
        # one added meanwhile, so it looks at them now and then itself.
        refresh = BARE_REFRESH_POLLS * watch.poll_interval
        next_refresh = started + refresh if not requested else float("inf")
        outcome = "timeout"
        last = first  # the latest decision: what the wait ends with
        try:
            while True:
                now = loop.time()
                remaining = started + wait - now
                if remaining <= 0:
                    break
                woken = asyncio.ensure_future(waiter.event.wait())
                try:
                    await asyncio.wait({woken, reader, closing},
                                       timeout=min(remaining, max(next_refresh - now, 0.0)),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                if closing.done():
                    outcome = "shutdown"
                    self.log.info("%s: ATRN %s by %s: wait ended after %.1fs: the provider "
                                  "is stopping; 421", self.session_id, what, self.account,
                                  loop.time() - started)
                    self.closing = True
                    return SHUTTING_DOWN
                if reader.done():
                    outcome = "client"
                    return await self._line_while_waiting(reader, what, loop.time() - started)
                if not waiter.event.is_set():
                    if loop.time() < next_refresh:
                        continue
                    next_refresh = loop.time() + refresh
                    if not await self._domains_changed(waiter, what):
                        continue
                waiter.event.clear()
                try:
                    # The request as the client made it (a bare ATRN: every
                    # domain the account owns *now*).
                    decision = await asyncio.to_thread(self._decide_woken, requested)
                except StoreError as exc:
                    self.log.warning("%s: ATRN wait: store error, waiting on: %s",
                                     self.session_id, exc)
                    continue
                if isinstance(decision, tuple):
                    outcome = "woken"
                    self.log.info("%s: ATRN %s by %s: woken after %.1fs: mail for %s",
                                  self.session_id, what, self.account,
                                  loop.time() - started, ",".join(decision))
                    return decision
                if decision is DOMAIN_BUSY:
                    if last is not DOMAIN_BUSY:
                        self.log.info("%s: ATRN %s by %s: there is mail, but another "
                                      "session holds the domain; waiting on",
                                      self.session_id, what, self.account)
                elif decision is not R.ATRN_NO_MAIL:
                    # Refused now (the account or its domains changed): say so
                    # at once rather than wait for nothing.
                    outcome = "refused"
                    self.log.info("%s: ATRN %s by %s: refused after %.1fs of waiting: %s",
                                  self.session_id, what, self.account,
                                  loop.time() - started, self.refusal)
                    return decision
                last = decision
                if frozenset(self.atrn_domains) != waiter.domains:
                    waiter.watch_domains(self.atrn_domains)  # a bare ATRN's set changed
            self.refusal = ""
            if last is DOMAIN_BUSY:
                # The mail is there, held by another session all along: not
                # "you have no mail" (453), but try later (451).
                self.log.info("%s: ATRN %s by %s: waited %gs, the domain stayed busy; 451",
                              self.session_id, what, self.account, wait)
                return DOMAIN_BUSY
            self.log.info("%s: ATRN %s by %s: waited %gs, no mail; 453", self.session_id,
                          what, self.account, wait)
            return R.ATRN_NO_MAIL
        finally:
            waiter.leave()
            closing.cancel()
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            if saved_deadline is not None:
                self.conn.deadline = saved_deadline + (loop.time() - started)
            metrics.ATRN_WAITS.labels(outcome).inc()
            metrics.ATRN_WAIT_SECONDS.observe(loop.time() - started)

    async def _line_while_waiting(self, reader: asyncio.Future[bytes], what: str,
                                  waited: float) -> Reply | None:
        """The client spoke (or left) while its ATRN waited."""
        try:
            line = reader.result()
        except (ConnectionClosed, TimeoutError, OSError, LineTooLong) as exc:
            self.log.info("%s: ATRN %s by %s: the client left after %.1fs of waiting (%s)",
                          self.session_id, what, self.account, waited,
                          type(exc).__name__)
            self.closing = True
            return None
        verb = line.split(b" ", 1)[0].strip().upper()
        self.log.info("%s: ATRN %s by %s: the client sent %s after %.1fs of waiting; 453",
                      self.session_id, what, self.account,
                      verb.decode("ascii", "replace")[:16] or "an empty line", waited)
        await self.send(R.ATRN_NO_MAIL)
        if verb == b"QUIT":
            await self.send(R.BYE)
            self.closing = True
            return None
        return WAITED_OUT_OF_TURN

    async def _domains_changed(self, waiter: Waiter, what: str) -> bool:
        """A waiting bare ATRN's look at its account: does the account own
        other domains than those it waits for?  (A store error: no, and the
        next look or wake-up tries again.)"""
        assert self.account is not None
        try:
            names = await asyncio.to_thread(self.store.domain_names, self.account)
        except StoreError as exc:
            self.log.warning("%s: ATRN wait: cannot read the account's domains, waiting on: "
                             "%s", self.session_id, exc)
            return False
        if names == waiter.domains:
            return False
        self.log.info("%s: ATRN %s by %s: the account's domains changed while it waited: "
                      "now %s", self.session_id, what, self.account,
                      ",".join(sorted(names)) or "none")
        return True

    def _decide_woken(self, domains: tuple[str, ...]) -> Reply | tuple[str, ...]:
        """In a worker thread, after a wake-up: the same checks as `_decide`
        (the account or its domains may have changed meanwhile) but no rate
        limit: this is the ATRN that was already let through."""
        return self._decide(domains, rate_limit=False)

    def _decide(self, requested: tuple[str, ...], *, rate_limit: bool = True
                ) -> Reply | tuple[str, ...]:
        """Runs in a worker thread: authorization, rate limit, mail check, leases."""
        assert self.account is not None
        account = self.store.get_account(self.account)
        if account is None:
            self.refusal = "the account no longer exists"
            return R.ATRN_REFUSED
        self.atrn_wait = account.atrn_wait or 0.0
        owned = self.store.domain_names(self.account)
        domains = requested or tuple(sorted(owned))
        if not domains or not set(domains) <= owned:
            # RFC 2645 §5.2.1: all or nothing, and the reply says not which;
            # the log says which and why, for the operator.
            self.refusal = self._why_refused(domains, owned)
            return R.ATRN_REFUSED
        self.atrn_domains = domains
        now = time.time()
        if (rate_limit and self.settings.min_atrn_interval > 0 and account.last_atrn_at is not None
                and now - account.last_atrn_at < self.settings.min_atrn_interval):
            return TOO_SOON
        with_mail = self.store.domains_with_held_mail(domains)
        if not with_mail:
            if rate_limit:
                self.store.record_atrn(self.account, now, durable=False)
            return R.ATRN_NO_MAIL
        # The leases and the ATRN's record: one commit, and one that does
        # not wait for the disk.  No mail is promised on them: a crash that
        # forgets the leases also ends this drain (PostgreSQL: at its next
        # commit), so at worst a message goes twice, as after any crash; one
        # that forgets the record only lets the next ATRN through sooner.
        # The drain's first durable commit (a delivery) makes them durable.
        if not self.store.acquire_leases(domains, self.session_id, self.settings.lease_ttl,
                                         atrn_by=(self.account, now), durable=False):
            return DOMAIN_BUSY
        return domains

    def _why_refused(self, domains: tuple[str, ...], owned: frozenset[str]) -> str:
        """Why an ATRN for `domains` is refused (450), for the log line."""
        if not owned:
            return (f"the account has no domains (fermoposta domain add DOMAIN "
                    f"--account {self.account})")
        reasons = []
        for name in domains:
            if name in owned:
                continue
            domain = self.store.get_domain(name)
            if domain is None:
                reasons.append(f"{name}: not hosted")
            else:
                reasons.append(f"{name}: owned by account {domain.account}")
        return "; ".join(reasons)

    async def _release_leases(self) -> None:
        """Release this session's leases (StoreError if the store fails)."""
        await asyncio.to_thread(self.store.release_leases, self.session_id)
        if self.watch is not None:
            # Mail this session left (deferred, or come meanwhile) is free
            # now for a session waiting on these domains.
            self.watch.notify(self.atrn_domains)

    async def _give_back_leases(self) -> None:
        """The leases of an ATRN refused after all (the session goes on)."""
        if not self.leased:
            return
        try:
            await self._release_leases()
        except StoreError as exc:
            self.log.warning("%s: cannot release leases now (%s); at the session's end",
                             self.session_id, exc)
            return
        self.leased = False

    async def finish(self) -> None:
        if self.leased:
            try:
                await self._release_leases()
            except StoreError as exc:
                # The lease names a live node: nobody takes it before it
                # expires (`lease_ttl`, 10 minutes by default), so try again
                # for that long rather than keep the customer waiting.
                self.log.warning("%s: cannot release leases now, will retry: %s",
                                 self.session_id, exc)
                task = asyncio.create_task(self._release_later())
                _releases.add(task)
                task.add_done_callback(_releases.discard)

    async def _release_later(self) -> None:
        deadline = time.monotonic() + self.settings.lease_ttl
        while time.monotonic() < deadline:
            await asyncio.sleep(RELEASE_RETRY)
            try:
                await asyncio.to_thread(self.store.release_leases, self.session_id)
            except StoreError:
                continue
            self.log.info("%s: leases released", self.session_id)
            return

    # The RFC 2645 profile (§5.1, §5.4) plus the harmless STARTTLS, NOOP, RSET
    # and HELO: everything else, VRFY and HELP included, is 502.
    # ATRN decides its own order of RFC 2645 §7 replies (and counts each in the
    # metrics), so its TLS and AUTH needs are checked in `_atrn`, not here.
    VERBS: ClassVar[Mapping[str, VerbSpec]] = verb_table(
        *(spec for verb, spec in ServerSession.VERBS.items()
          if verb in {"EHLO", "HELO", "STARTTLS", "NOOP", "RSET", "QUIT"}),
        VerbSpec("AUTH", "smtp_auth"),
        VerbSpec("ATRN", "smtp_atrn"),
    )

    def utf8_commands(self) -> bool:
        # So that `ATRN bücher.de` is read (and compared as its A-label)
        # rather than refused as a syntax error.
        return True


def _atrn_result(reply: Reply | None, reversed_: bool = True) -> str:
    """A bounded label for the metrics."""
    if reply is None:
        return "reversed" if reversed_ else "client_left"
    if reply.code == 250:
        return "reversed"
    return {453: "no_mail", 450: "refused", 530: "not_authenticated", 421: "shutdown",
            503: "syntax"}.get(
        reply.code,
        "busy" if reply is DOMAIN_BUSY else "unavailable" if reply.code == 451 else "syntax",
    )
