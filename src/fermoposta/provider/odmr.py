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
import functools
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from fermoposta.mail.auth import Authenticator
from fermoposta.net.connection import Connection
from fermoposta.net.server_session import ServerSession, SessionLimits
from fermoposta.ops import metrics
from fermoposta.ops.log import event
from fermoposta.provider.activity import Activity
from fermoposta.provider.drain import DrainSettings, drain
from fermoposta.smtp import reply as R
from fermoposta.smtp.atrn import parse_atrn_domains
from fermoposta.smtp.reply import Reply, SMTPError
from fermoposta.smtp.server import VerbSpec, verb_table
from fermoposta.store.base import HostedMail, StoreError

log = logging.getLogger("fermoposta.odmr")

ATRN_NOT_LAST = Reply(503, "5.5.1", "ATRN must be the last command in a pipeline")
DOMAIN_BUSY = Reply(451, "4.3.0", "Unable to process ATRN request now: domain busy, try later")
TOO_SOON = Reply(450, "4.7.1", "ATRN request refused: too frequent, try later")
RELEASE_RETRY = 2.0  # seconds between attempts to release leases the store refused

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
    ) -> None:
        super().__init__(conn, hostname=hostname, limits=limits, tls_context=tls_context)
        self.store = store
        self.settings = settings
        self.drain_settings = drain_settings
        self.auth = Authenticator(self, store, settings)
        self.leased = False
        self.refusal = ""  # why `_decide` refused the last ATRN with 450, for the log
        # The provider's record of pulls in progress and done (the status page).
        self.activity: Activity | None = None

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
        metrics.ATRN_SESSIONS.labels(_atrn_result(reply)).inc()
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
        await self.send(R.ATRN_REVERSING)
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

    def _decide(self, requested: tuple[str, ...]) -> Reply | tuple[str, ...]:
        """Runs in a worker thread: authorization, rate limit, mail check, leases."""
        assert self.account is not None
        account = self.store.get_account(self.account)
        if account is None:
            self.refusal = "the account no longer exists"
            return R.ATRN_REFUSED
        owned = {d.name for d in self.store.list_domains(self.account)}
        domains = requested or tuple(sorted(owned))
        if not domains or not set(domains) <= owned:
            # RFC 2645 §5.2.1: all or nothing, and the reply says not which;
            # the log says which and why, for the operator.
            self.refusal = self._why_refused(domains, owned)
            return R.ATRN_REFUSED
        now = time.time()
        if (self.settings.min_atrn_interval > 0 and account.last_atrn_at is not None
                and now - account.last_atrn_at < self.settings.min_atrn_interval):
            return TOO_SOON
        with_mail = self.store.domains_with_held_mail(domains)
        if not with_mail:
            self.store.record_atrn(self.account, now)
            return R.ATRN_NO_MAIL
        if not self.store.acquire_leases(domains, self.session_id, self.settings.lease_ttl):
            return DOMAIN_BUSY
        self.store.record_atrn(self.account, now)
        return domains

    def _why_refused(self, domains: tuple[str, ...], owned: set[str]) -> str:
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

    async def finish(self) -> None:
        if self.leased:
            try:
                await asyncio.to_thread(self.store.release_leases, self.session_id)
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


def _atrn_result(reply: Reply | None) -> str:
    """A bounded label for the metrics."""
    if reply is None or reply.code == 250:
        return "reversed"
    return {453: "no_mail", 450: "refused", 530: "not_authenticated"}.get(
        reply.code,
        "busy" if reply is DOMAIN_BUSY else "unavailable" if reply.code == 451 else "syntax",
    )
