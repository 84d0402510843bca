"""The provider's ODMR listener, phase 1: EHLO/STARTTLS/AUTH/ATRN (RFC 2645 §5).

Contract:
- Initial state accepts EHLO, HELO, AUTH, QUIT, STARTTLS, NOOP, RSET; after a
  successful AUTH, ATRN.  Every other verb of SMTP (MAIL, RCPT, DATA, TURN,
  ETRN, VRFY, ...) gets 502 (RFC 2645 §5.4); an unknown verb 500.
- EHLO lists AUTH and ATRN (RFC 2645 §5.1.1).  PLAIN and LOGIN are offered and
  accepted only under TLS unless `[odmr] allow_plaintext_auth` (RFC 4954 §4:
  538 otherwise); EXTERNAL only when the peer presented a certificate that
  verified against `[tls] client_ca`, and it logs in the account bound to the
  certificate's SHA-256 fingerprint or, failing that, to its subject.
  `max_auth_failures` failed AUTHs answer 421 and close.
- ATRN replies exactly as RFC 2645 §7: 530 before AUTH; 501 for a malformed
  list; 450 when any requested domain is not the account's (nothing is sent;
  the reply does not say which) or when ATRNs come faster than
  `min_atrn_interval`; 453 when there is no mail; 451 when the store cannot
  answer or another session holds a lease on a domain; 250 then the flip.
- ATRN is synchronizing (RFC 2920 by analogy with TURN): bytes pipelined
  after it are discarded and answered 503, and the session stays
  authenticated.  So nothing pre-sent is ever read as the customer's greeting.
- The flip hands the same `Connection` (TLS included) to `drain()`; leases
  are released in every case when the session ends.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from fermoposta.net.connection import Connection, LineTooLong
from fermoposta.net.server_session import AUTH_LINE_LIMIT, ServerSession, SessionLimits
from fermoposta.ops.log import event, redact
from fermoposta.provider.drain import DrainSettings, drain
from fermoposta.smtp import reply as R
from fermoposta.smtp.atrn import parse_atrn_domains
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.sasl import (
    Challenge,
    Failure,
    Success,
    certificate_fingerprint,
    certificate_subject,
    server_mechanism,
)
from fermoposta.store.base import Account, Store, StoreError

log = logging.getLogger("fermoposta.odmr")

PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})
ATRN_NOT_LAST = Reply(503, "5.5.1", "ATRN must be the last command in a pipeline")
DOMAIN_BUSY = Reply(451, "4.3.0", "Unable to process ATRN request now: domain busy, try later")
TOO_SOON = Reply(450, "4.7.1", "ATRN request refused: too frequent, try later")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
SEND_EHLO_FIRST = Reply(503, "5.5.1", "Send EHLO first")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")  # RFC 4954 §4


@dataclass(frozen=True, slots=True)
class ODMRSettings:
    mechanisms: tuple[str, ...] = ("SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5", "EXTERNAL")
    allow_plaintext_auth: bool = False
    require_tls: bool = False
    max_auth_failures: int = 3
    min_atrn_interval: float = 0.0
    lease_ttl: float = 600.0
    no_mail_reply: str = "453"  # or "quit": RFC 2645 §5.2.1 MAY answer 250 then QUIT


class StoreCredentials:
    """Adapts the store to the SASL layer's CredentialSource."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def account(self, username: str) -> Account | None:
        return self.store.get_account(username)

    def account_for_certificate(self, fingerprint: str, subject: str | None) -> Account | None:
        """A fingerprint binding first, then a subject binding."""
        account = self.store.account_by_fingerprint(fingerprint)
        if account is None and subject:
            account = self.store.account_by_subject(subject)
        return account


class ODMRSession(ServerSession):
    component = "odmr"

    def __init__(
        self,
        conn: Connection,
        *,
        hostname: str,
        limits: SessionLimits,
        store: Store,
        settings: ODMRSettings,
        drain_settings: DrainSettings,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(conn, hostname=hostname, limits=limits, tls_context=tls_context)
        self.store = store
        self.settings = settings
        self.drain_settings = drain_settings
        self.account: str | None = None
        self.auth_failures = 0
        self.leased = False
        self.line_limit = AUTH_LINE_LIMIT  # AUTH initial responses; others are held to 512

    def greeting(self) -> Reply:
        return Reply(220, None, f"{self.hostname} ESMTP fermoposta on-demand mail relay ready")

    def client_fingerprint(self) -> str | None:
        der = self.conn.peer_certificate()
        return certificate_fingerprint(der) if der else None

    def client_subject(self) -> str | None:
        """The canonical RFC 4514 subject of the verified client certificate."""
        der = self.conn.peer_certificate()
        if not der:
            return None
        try:
            return certificate_subject(der) or None
        except ValueError as exc:  # OpenSSL accepted it, so this should not happen
            self.log.warning("%s: cannot read the client certificate's subject: %s",
                             self.session_id, exc)
            return None

    def offered_mechanisms(self) -> list[str]:
        offered = []
        for mech in self.settings.mechanisms:
            if (mech in PLAINTEXT_MECHANISMS and not self.conn.tls_active
                    and not self.settings.allow_plaintext_auth):
                continue
            if mech == "EXTERNAL" and self.client_fingerprint() is None:
                continue
            offered.append(mech)
        return offered

    def extensions(self) -> list[str]:
        exts = []
        mechs = self.offered_mechanisms()
        if mechs and self.account is None:
            exts.append("AUTH " + " ".join(mechs))
        exts.append("ATRN")
        return [*exts, *super().extensions()]

    def reset_after_tls(self) -> None:
        super().reset_after_tls()
        self.account = None

    # --- AUTH (RFC 4954) -------------------------------------------------------------------
    async def smtp_auth(self, arg: str) -> Reply | None:
        if self.helo_name is None or not self.esmtp:
            return SEND_EHLO_FIRST
        if self.settings.require_tls and not self.conn.tls_active:
            return R.MUST_STARTTLS
        if self.account is not None:
            return R.AUTH_ALREADY
        parts = arg.split()
        if not parts or len(parts) > 2:
            return R.BAD_ARGUMENTS
        name = parts[0].upper()
        configured = name in self.settings.mechanisms
        if configured and name in PLAINTEXT_MECHANISMS and not self.conn.tls_active \
                and not self.settings.allow_plaintext_auth:
            return R.AUTH_ENCRYPTION_REQUIRED
        if name not in self.offered_mechanisms():
            return R.AUTH_UNKNOWN_MECHANISM
        initial: bytes | None = None
        if len(parts) == 2:
            if parts[1] == "=":
                initial = b""
            elif parts[1] == "*":
                return R.AUTH_CANCELLED
            else:
                try:
                    initial = base64.b64decode(parts[1], validate=True)
                except (binascii.Error, ValueError):
                    return R.AUTH_BAD_BASE64
        mechanism = server_mechanism(
            name,
            credentials=StoreCredentials(self.store),
            hostname=self.hostname,
            client_cert_fingerprint=self.client_fingerprint(),
            client_cert_subject=self.client_subject() if name == "EXTERNAL" else None,
        )
        if mechanism is None:
            return R.AUTH_UNKNOWN_MECHANISM
        result = await asyncio.to_thread(mechanism.start, initial)
        while isinstance(result, Challenge):
            response = await self._auth_exchange(result.data)
            if response is None:
                return R.AUTH_CANCELLED
            if isinstance(response, Reply):
                return response
            result = await asyncio.to_thread(mechanism.step, response)
        if isinstance(result, Success) and result.server_final is not None:
            # RFC 4954 §4: additional data with success goes in a final 334,
            # answered by an empty line.
            response = await self._auth_exchange(result.server_final)
            if response is None:
                return R.AUTH_CANCELLED
            if isinstance(response, Reply):
                return response
            if response != b"":
                result = Failure("non-empty response to the SCRAM server-final message")
        if isinstance(result, Success):
            self.account = result.identity
            self.log.info("%s: AUTH %s as %s from [%s]", self.session_id, name, result.identity,
                          self.conn.peer_ip)
            return R.AUTH_OK
        assert isinstance(result, Failure)
        if result.temporary:
            self.log.warning("%s: AUTH %s temporary failure: %s", self.session_id, name,
                             result.reason)
            return R.AUTH_TEMPORARY_FAILURE
        self.auth_failures += 1
        self.log.info("%s: AUTH %s failed from [%s]: %s", self.session_id, name,
                      self.conn.peer_ip, result.reason)
        if self.auth_failures >= self.settings.max_auth_failures:
            return TOO_MANY_AUTH_FAILURES
        return R.AUTH_FAILED

    async def _auth_exchange(self, challenge: bytes) -> bytes | Reply | None:
        """Send a 334 challenge; return the decoded answer, None on "*", or an error reply."""
        await self.send(Reply(334, None, base64.b64encode(challenge).decode("ascii")))
        try:
            line = await self.conn.read_line(AUTH_LINE_LIMIT, self.limits.command_timeout)
        except LineTooLong:
            return AUTH_LINE_TOO_LONG
        if log.isEnabledFor(logging.DEBUG):
            shown = redact(line, in_auth=True).decode("utf-8", "replace").rstrip()
            self.log.debug("%s: < %s", self.session_id, shown)
        text = line.rstrip(b"\r\n").strip()
        if text == b"*":
            return None
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return R.AUTH_BAD_BASE64

    # --- ATRN (RFC 2645 §5.2.1) ---------------------------------------------------------
    async def smtp_atrn(self, arg: str) -> Reply | None:
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
        try:
            decision = await asyncio.to_thread(self._decide, requested)
        except StoreError as exc:
            self.log.warning("%s: ATRN: store error: %s", self.session_id, exc)
            return R.ATRN_UNAVAILABLE
        if isinstance(decision, Reply):
            self.log.info("%s: ATRN %s by %s refused: %s", self.session_id,
                          ",".join(requested) or "(all)", self.account, decision)
            if decision.code == 453 and self.settings.no_mail_reply == "quit":
                decision = R.ATRN_REVERSING
                domains: tuple[str, ...] = ()
            else:
                return decision
        else:
            domains = decision
        self.leased = bool(domains)
        await self.send(R.ATRN_REVERSING)
        event("odmr", None, session=self.session_id, account=self.account,
              domains=",".join(domains) or "-", client=f"{self.helo_name}[{self.conn.peer_ip}]",
              status="reversing")
        try:
            await drain(
                self.conn,
                self.store,
                domains=domains,
                hostname=self.hostname,
                session_id=self.session_id,
                settings=self.drain_settings,
            )
        finally:
            self.closing = True
        return None

    def _decide(self, requested: tuple[str, ...]) -> Reply | tuple[str, ...]:
        """Runs in a worker thread: authorization, rate limit, mail check, leases."""
        assert self.account is not None
        account = self.store.get_account(self.account)
        if account is None:
            return R.ATRN_REFUSED
        owned = {d.name for d in self.store.list_domains(self.account)}
        domains = requested or tuple(sorted(owned))
        if not domains or not set(domains) <= owned:
            return R.ATRN_REFUSED  # RFC 2645 §5.2.1: all or nothing, and say not which
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

    async def finish(self) -> None:
        if self.leased:
            try:
                await asyncio.to_thread(self.store.release_leases, self.session_id)
            except StoreError as exc:  # the lease expires by itself
                self.log.warning("%s: cannot release leases: %s", self.session_id, exc)

    # The RFC 2645 profile (§5.1, §5.4) plus the harmless STARTTLS, NOOP, RSET
    # and HELO: everything else, VRFY and HELP included, is 502.
    COMMANDS: ClassVar[Mapping[str, str]] = {
        "EHLO": "smtp_ehlo",
        "HELO": "smtp_helo",
        "STARTTLS": "smtp_starttls",
        "NOOP": "smtp_noop",
        "RSET": "smtp_rset",
        "QUIT": "smtp_quit",
        "AUTH": "smtp_auth",
        "ATRN": "smtp_atrn",
    }

    def utf8_commands(self) -> bool:
        # So that `ATRN bücher.de` is read (and compared as its A-label)
        # rather than refused as a syntax error.
        return True
