"""SMTP AUTH (RFC 4954) for server sessions.

Used by the provider's ODMR and submission listeners and the customer's outbox.

Contract:
- `Authenticator` runs the AUTH command of one server session: mechanism
  choice and policy (PLAIN and LOGIN only under TLS unless
  `allow_plaintext_auth`, else 538; EXTERNAL only with a client certificate
  that verified against `[tls] client_ca`; `require_tls` answers 530 before
  STARTTLS), the 334 exchange with base64 and "*" cancellation, SCRAM's
  server-final as a last 334 (RFC 4954 §4), and failure counting
  (`max_auth_failures` → 421, the session closes).
- Across connections (issue 8), when the provider sets `throttle` (an
  `AuthThrottle`; None for the customer's outbox): an AUTH from a locked-out
  address gets `421 4.7.0` before any exchange and the session closes; each
  failure is recorded for the address and the account named (if it exists)
  and its 535 is delayed by the throttle's growing delay; the failure that
  starts an address lockout is answered 421 instead.  While an account is
  locked, AUTH naming it from a suspect address (see `anvil`) gets
  `454 4.7.0` (RFC 4954 §6) whether or not the credentials were right, so
  the reply tells nothing about the password; the session stays open.
  Lockouts and refusals are logged (never with a secret) and counted.
- Each failed AUTH (the 535s of `fermoposta_auth_failures_total{mechanism}`)
  also counts in `fermoposta_smtp_rejects_total{listener, reason="auth_failed"}`.
- On success `account` names the authenticated account.  SASL payloads are
  never logged (the debug trace shows "***").
- Credentials come from the store through `StoreCredentials`; a store
  failure is a temporary failure (454), never a refusal.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from typing import TYPE_CHECKING, Protocol

from fermoposta.mail.anvil import AuthThrottle, Verdict
from fermoposta.net.connection import LineTooLong
from fermoposta.net.server_session import AUTH_LINE_LIMIT
from fermoposta.ops import metrics
from fermoposta.ops.log import redact
from fermoposta.smtp import reply as R
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.sasl import (
    Challenge,
    Failure,
    Success,
    certificate_fingerprint,
    certificate_subject,
    server_mechanism,
)
from fermoposta.store.base import Account, Directory

if TYPE_CHECKING:
    from fermoposta.net.server_session import ServerSession

log = logging.getLogger("fermoposta.auth")

PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
SEND_EHLO_FIRST = Reply(503, "5.5.1", "Send EHLO first")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")  # RFC 4954 §4
ADDRESS_LOCKED = Reply(421, "4.7.0",
                       "Too many authentication failures from your address, try again later")
# RFC 4954 §6: 454 4.7.0 is the temporary authentication failure.
ACCOUNT_LOCKED = Reply(454, "4.7.0", "Temporary authentication failure, try again later")


class _Slot:
    """One credential check under way for the throttle (`AuthThrottle.begin`
    / `end`), taken and given back as the exchange goes; no throttle: always
    granted."""

    def __init__(self, throttle: AuthThrottle | None, ip: str) -> None:
        self.throttle = throttle
        self.ip = ip
        self.held = False

    def take(self) -> bool:
        if self.throttle is None or self.held:
            return True
        self.held = self.throttle.begin(self.ip)
        return self.held

    def give_back(self) -> None:
        if self.held and self.throttle is not None:
            self.held = False
            self.throttle.end(self.ip)


class AuthPolicy(Protocol):
    @property
    def mechanisms(self) -> tuple[str, ...]: ...
    @property
    def allow_plaintext_auth(self) -> bool: ...
    @property
    def require_tls(self) -> bool: ...
    @property
    def max_auth_failures(self) -> int: ...


class StoreCredentials:
    """Adapts the store to the SASL layer's CredentialSource."""

    def __init__(self, store: Directory) -> None:
        self.store = store
        # The existing account a password mechanism asked for: the throttle's
        # per-account key.  Unknown names stay None (they count per address).
        self.attempted: str | None = None

    def account(self, username: str) -> Account | None:
        account = self.store.get_account(username)
        if account is not None:
            self.attempted = account.name
        return account

    def account_for_certificate(self, fingerprint: str, subject: str | None) -> Account | None:
        """A fingerprint binding first, then a subject binding."""
        account = self.store.account_by_fingerprint(fingerprint)
        if account is None and subject:
            account = self.store.account_by_subject(subject)
        return account


class Authenticator:
    """AUTH for one server session; see the module docstring."""

    def __init__(self, session: ServerSession, store: Directory, policy: AuthPolicy) -> None:
        self.session = session
        self.conn = session.conn
        self.store = store
        self.settings = policy
        self.account: str | None = None
        self.auth_failures = 0
        self.throttle: AuthThrottle | None = None  # set by the provider (issue 8)
        # For fermoposta_smtp_rejects_total: odmr_tls and submissions have
        # TLS on before the session (and this object) exist.
        self.listener = metrics.listener_name(session.component, implicit_tls=self.conn.tls_active)

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        return self.session.log

    @property
    def session_id(self) -> str:
        return self.session.session_id

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

    async def smtp_auth(self, arg: str) -> Reply | None:
        if self.session.helo_name is None or not self.session.esmtp:
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
        throttle = self.throttle
        if throttle is not None:
            remaining = throttle.address_locked(self.conn.peer_ip)
            if remaining > 0:
                # Refused before the exchange: no credential is looked at, so
                # a locked-out address learns nothing and costs no PBKDF2.
                metrics.AUTH_THROTTLED.labels("address").inc()
                self.log.info("%s: AUTH %s refused from [%s]: address locked out for "
                              "another %ds", self.session_id, name, self.conn.peer_ip,
                              max(1, int(remaining)))
                return ADDRESS_LOCKED
        slot = _Slot(throttle, self.conn.peer_ip)
        if not slot.take():
            return self._too_many_at_once(name)
        try:
            return await self._check(name, initial, throttle, slot)
        finally:
            slot.give_back()

    def _too_many_at_once(self, name: str) -> Reply:
        """As many credential checks under way from this address as it has
        failures left: parallel connections cannot outrun the count."""
        metrics.AUTH_THROTTLED.labels("address").inc()
        self.log.info("%s: AUTH %s refused from [%s]: too many AUTHs at once from this "
                      "address", self.session_id, name, self.conn.peer_ip)
        return ACCOUNT_LOCKED

    async def _check(self, name: str, initial: bytes | None,
                     throttle: AuthThrottle | None, slot: _Slot) -> Reply:
        """The SASL exchange and its outcome (the rest of `smtp_auth`).  The
        throttle's slot is held while credentials are checked until the
        failure is counted, and given back while the client answers a
        challenge (idle exchanges must not keep others from logging in)."""
        credentials = StoreCredentials(self.store)
        mechanism = server_mechanism(
            name,
            credentials=credentials,
            hostname=self.session.hostname,
            client_cert_fingerprint=self.client_fingerprint(),
            client_cert_subject=self.client_subject() if name == "EXTERNAL" else None,
        )
        if mechanism is None:
            return R.AUTH_UNKNOWN_MECHANISM
        result = await asyncio.to_thread(mechanism.start, initial)
        while isinstance(result, Challenge):
            slot.give_back()
            response = await self._auth_exchange(result.data)
            if response is None:
                return R.AUTH_CANCELLED
            if isinstance(response, Reply):
                return response
            if not slot.take():
                return self._too_many_at_once(name)
            result = await asyncio.to_thread(mechanism.step, response)
        if throttle is not None and not (isinstance(result, Failure) and result.temporary):
            # Asked whatever the outcome (before SCRAM's server-final, which
            # would prove the password right): no oracle for a locked account.
            attempted = result.identity if isinstance(result, Success) else credentials.attempted
            if throttle.account_refused(self.conn.peer_ip, attempted):
                return await self._account_refused(throttle, name, attempted, slot)
        if isinstance(result, Success) and result.server_final is not None:
            # RFC 4954 §4: additional data with success goes in a final 334,
            # answered by an empty line.  (The check is over: no slot held.)
            slot.give_back()
            response = await self._auth_exchange(result.server_final)
            if response is None:
                return R.AUTH_CANCELLED
            if isinstance(response, Reply):
                return response
            if response != b"":
                result = Failure("non-empty response to the SCRAM server-final message"
                                 f" for {result.identity!r}")
        if isinstance(result, Success):
            self.account = result.identity
            if throttle is not None:
                throttle.success(self.conn.peer_ip, result.identity)
            self.log.info("%s: AUTH %s as %s from [%s]", self.session_id, name, result.identity,
                          self.conn.peer_ip)
            return R.AUTH_OK
        assert isinstance(result, Failure)
        if result.temporary:
            self.log.warning("%s: AUTH %s temporary failure: %s", self.session_id, name,
                             result.reason)
            return R.AUTH_TEMPORARY_FAILURE
        self.auth_failures += 1
        metrics.AUTH_FAILURES.labels(name).inc()
        metrics.reject(self.listener, "auth_failed")  # the same 535s, by listener
        self.log.info("%s: AUTH %s failed from [%s]: %s", self.session_id, name,
                      self.conn.peer_ip, result.reason)
        if throttle is not None:
            verdict = throttle.failure(self.conn.peer_ip, credentials.attempted)
            slot.give_back()  # counted: the delay needs no slot
            self._log_lockouts(verdict, credentials.attempted)
            await self._delay(verdict.delay)
            if verdict.address_locked:
                return ADDRESS_LOCKED
        if self.auth_failures >= self.settings.max_auth_failures:
            return TOO_MANY_AUTH_FAILURES
        return R.AUTH_FAILED

    async def _account_refused(self, throttle: AuthThrottle, name: str,
                               account: str | None, slot: _Slot) -> Reply:
        """454 for a locked account from a suspect address; the attempt still
        counts for the address (not for the account, already locked)."""
        metrics.AUTH_THROTTLED.labels("account").inc()
        self.log.info("%s: AUTH %s for %s refused from [%s]: account locked against "
                      "addresses with recent failures", self.session_id, name, account,
                      self.conn.peer_ip)
        verdict = throttle.failure(self.conn.peer_ip, None)
        slot.give_back()
        self._log_lockouts(verdict, None)
        await self._delay(verdict.delay)
        return ADDRESS_LOCKED if verdict.address_locked else ACCOUNT_LOCKED

    def _log_lockouts(self, verdict: Verdict, name: str | None) -> None:
        lockout = int(self.throttle.settings.lockout) if self.throttle is not None else 0
        if verdict.address_locked:
            metrics.AUTH_LOCKOUTS.labels("address").inc()
            self.log.warning("%s: AUTH throttle: locking out [%s] for %ds after %d failed "
                             "AUTHs", self.session_id, self.conn.peer_ip, lockout,
                             verdict.address_failures)
        if verdict.account_locked and name is not None:
            metrics.AUTH_LOCKOUTS.labels("account").inc()
            self.log.warning("%s: AUTH throttle: account %s locked for %ds after %d failed "
                             "AUTHs (last from [%s]); addresses with recent failures get 454",
                             self.session_id, name, lockout, verdict.account_failures,
                             self.conn.peer_ip)

    async def _delay(self, seconds: float) -> None:
        """Wait before a failure reply (the throttle's growing delay)."""
        if seconds > 0:
            started = time.monotonic()
            await asyncio.sleep(seconds)
            metrics.AUTH_DELAY_SECONDS.inc(time.monotonic() - started)

    async def _auth_exchange(self, challenge: bytes) -> bytes | Reply | None:
        """Send a 334 challenge; return the decoded answer, None on "*", or an error reply."""
        await self.session.send(Reply(334, None, base64.b64encode(challenge).decode("ascii")))
        try:
            line = await self.conn.read_line(AUTH_LINE_LIMIT, self.session.limits.command_timeout)
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

