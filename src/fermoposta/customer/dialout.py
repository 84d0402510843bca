"""The customer's dial-out: connect, TLS, EHLO, AUTH, ATRN (RFC 2645 §5, RFC 3207, RFC 4954).

Contract:
- `Dialer.connect()` opens the connection per the TLS mode: "starttls"
  (default) REQUIRES the provider to offer STARTTLS (no silent downgrade:
  `TLSFailure` otherwise), "implicit" handshakes at connect, "none" only when
  configured.  Certificates are verified against the CA file or the system
  store and the expected name; an optional SHA-256 pin must match too.
  Bytes the provider sends after its 220 to STARTTLS and before the handshake
  are discarded (response injection).  After TLS it re-EHLOs and requires ATRN,
  unless `DialSettings.require_atrn` is false (the outbox push dials the
  provider's submission service with the same TLS, verification and AUTH
  rules: everything here except ATRN).
- `Dialer.authenticate()` picks the strongest mechanism both sides allow:
  SCRAM-SHA-256 > EXTERNAL (with a client certificate) > PLAIN (TLS only) >
  CRAM-MD5 > LOGIN (TLS only), or the configured order; PLAIN and LOGIN are
  never used without TLS.  SCRAM's server signature must verify (mutual
  authentication).  A 504 moves to the next mechanism.
- `Dialer.atrn()` sends ATRN (bare or with a list) and waits up to the ATRN
  timeout (RFC 2645: at least 10 minutes by default).  250 returns the
  connection, ready for the reversed session; 453 returns None (no mail);
  every other reply raises the matching `CustomerError` after QUIT.
- Nothing here logs a password or a SASL payload.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import ssl
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fermoposta.customer.errors import (
    ATRNRefused,
    AuthFailure,
    ConnectFailure,
    ProtocolFailure,
    TemporaryFailure,
    TLSFailure,
)
from fermoposta.net.client import ReplyProtocolError, SMTPClient
from fermoposta.net.connection import Connection, ConnectionClosed, LineTooLong, open_connection
from fermoposta.smtp.atrn import format_atrn
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.sasl import SASLClientError, client_mechanism

log = logging.getLogger("fermoposta.customer")

AUTOMATIC_ORDER = ("SCRAM-SHA-256", "EXTERNAL", "PLAIN", "CRAM-MD5", "LOGIN")
PLAINTEXT = frozenset({"PLAIN", "LOGIN"})
QUIT_TIMEOUT = 10.0
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DialSettings:
    host: str
    port: int
    tls: str  # "starttls" | "implicit" | "none"
    hostname: str  # our EHLO name
    ca_file: Path | None = None
    server_name: str | None = None
    pin_sha256: str | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    mechanisms: tuple[str, ...] = ()
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    atrn_timeout: float = 600.0
    # False for the submission service (the outbox push): no ATRN expected.
    require_atrn: bool = True


@dataclass(slots=True)
class DialReport:
    """What `check` prints: facts learnt on the way."""

    greeting: str = ""
    capabilities: dict[str, str] = field(default_factory=dict)
    tls: str = "none"
    certificate: str = ""
    mechanism: str = ""


def client_tls_context(settings: DialSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=str(settings.ca_file) if settings.ca_file else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.client_cert is not None:
        context.load_cert_chain(
            str(settings.client_cert),
            str(settings.client_key) if settings.client_key else None,
        )
    return context


class Dialer:
    def __init__(self, settings: DialSettings) -> None:
        self.settings = settings
        self.conn: Connection | None = None
        self.client: SMTPClient | None = None
        self.report = DialReport()

    # --- connection and TLS ---------------------------------------------------------------
    async def connect(self) -> None:
        s = self.settings
        context = None
        server_name = s.server_name or s.host
        try:
            if s.tls in ("starttls", "implicit"):
                context = client_tls_context(s)
        except (OSError, ssl.SSLError) as exc:
            raise TLSFailure(f"cannot load TLS settings: {exc}") from exc
        try:
            self.conn = await open_connection(
                s.host, s.port, timeout=s.connect_timeout,
                ssl_context=context if s.tls == "implicit" else None,
                server_hostname=server_name,
            )
        except ssl.SSLCertVerificationError as exc:
            raise TLSFailure(f"certificate of {s.host}:{s.port} rejected: "
                             f"{exc.verify_message}") from exc
        except ssl.SSLError as exc:
            raise TLSFailure(f"TLS handshake with {s.host}:{s.port} failed: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise ConnectFailure(f"cannot connect to {s.host}:{s.port}: "
                                 f"{exc or type(exc).__name__}") from exc
        self.client = SMTPClient(self.conn, write_timeout=s.command_timeout)
        greeting = await self._reply(s.command_timeout)
        self.report.greeting = str(greeting)
        if greeting.code != 220:
            await self.quit()
            raise ConnectFailure(f"provider refused the session: {greeting}")
        await self._ehlo()
        if s.tls == "implicit":
            self._check_tls()
        elif s.tls == "starttls":
            if "STARTTLS" not in self.client.capabilities:
                await self.quit()
                raise TLSFailure("the provider does not offer STARTTLS (tls = \"starttls\" "
                                 "requires it; refusing to continue in clear)")
            reply = await self._command("STARTTLS", s.command_timeout)
            if reply.code != 220:
                await self.quit()
                raise TLSFailure(f"STARTTLS refused: {reply}")
            try:
                assert context is not None
                dropped = await self.conn.start_tls(context, server_side=False,
                                                    server_hostname=server_name,
                                                    timeout=s.connect_timeout)
            except ssl.SSLCertVerificationError as exc:
                raise TLSFailure(f"certificate of {s.host} rejected: {exc.verify_message}"
                                 ) from exc
            except (ssl.SSLError, OSError, TimeoutError, ConnectionClosed) as exc:
                raise TLSFailure(f"TLS handshake with {s.host} failed: {exc}") from exc
            if dropped:
                log.warning("discarded %d bytes the provider sent before the TLS handshake",
                            dropped)
            self._check_tls()
            await self._ehlo()
        if s.require_atrn and "ATRN" not in self.client.capabilities:
            await self.quit()
            raise ProtocolFailure(f"{s.host}:{s.port} does not support ATRN (not in its EHLO "
                                  "reply): is this an ODMR port?")

    def _check_tls(self) -> None:
        assert self.conn is not None
        der = self.conn.peer_certificate()
        fingerprint = hashlib.sha256(der).hexdigest() if der else ""
        pin = (self.settings.pin_sha256 or "").replace(":", "").lower()
        if pin and fingerprint != pin:
            raise TLSFailure(f"certificate pin mismatch: provider presented sha256 {fingerprint}")
        self.report.tls = f"{self.conn.tls_version} {self.conn.tls_cipher}"
        self.report.certificate = (f"verified for {self.settings.server_name or self.settings.host}"
                                   f", sha256 {fingerprint}" + (", pin matches" if pin else ""))

    async def _ehlo(self) -> None:
        assert self.client is not None
        reply = await self._guard(self.client.ehlo(self.settings.hostname,
                                                   self.settings.command_timeout))
        if reply.code != 250:
            await self.quit()
            raise ProtocolFailure(f"EHLO refused: {reply}")
        self.report.capabilities = dict(self.client.capabilities)

    # --- AUTH -------------------------------------------------------------------------------
    def candidate_mechanisms(self) -> list[str]:
        assert self.client is not None and self.conn is not None
        offered = set(self.client.capabilities.get("AUTH", "").upper().split())
        order = self.settings.mechanisms or AUTOMATIC_ORDER
        chosen = []
        for mech in order:
            if mech not in offered:
                continue
            if mech in PLAINTEXT and not self.conn.tls_active:
                continue  # never a password in clear
            if mech == "EXTERNAL" and self.settings.client_cert is None:
                continue
            if mech != "EXTERNAL" and not (self.settings.username and self.settings.password):
                continue
            chosen.append(mech)
        return chosen

    async def authenticate(self) -> str:
        candidates = self.candidate_mechanisms()
        if not candidates:
            offered = self.client.capabilities.get("AUTH", "(none)") if self.client else ""
            await self.quit()
            raise AuthFailure(f"no usable AUTH mechanism: the provider offers {offered}; "
                              "PLAIN/LOGIN are only used over TLS, EXTERNAL needs client_cert")
        last = ""
        for mech in candidates:
            reply = await self._auth(mech)
            if reply.code == 235:
                self.report.mechanism = mech
                log.info("authenticated with %s as %s", mech, self.settings.username or "(cert)")
                return mech
            last = str(reply)
            if reply.code == 504:
                continue
            await self.quit()
            if reply.code in (454, 421, 432) or reply.is_temporary:
                raise TemporaryFailure(f"AUTH {mech}: {reply}")
            raise AuthFailure(f"AUTH {mech} refused: {reply}")
        await self.quit()
        raise AuthFailure(f"no mechanism accepted: {last}")

    async def _auth(self, mech: str) -> Reply:
        s = self.settings
        assert self.client is not None
        sasl = client_mechanism(mech, username=s.username or "", password=s.password or "")
        initial = sasl.initial_response()
        line = f"AUTH {mech}"
        if initial is not None:
            line += " " + (base64.b64encode(initial).decode() if initial else "=")
        reply = await self._command(line, s.command_timeout)
        try:
            while reply.code == 334:
                try:
                    challenge = base64.b64decode(reply.lines[0].strip(), validate=True)
                except (binascii.Error, ValueError) as exc:
                    await self._command("*", s.command_timeout)
                    raise ProtocolFailure("AUTH challenge is not base64") from exc
                answer = sasl.respond(challenge)
                reply = await self._command(base64.b64encode(answer).decode(), s.command_timeout,
                                            secret=True)
            if reply.code == 235:
                sasl.verify_final(None)
        except SASLClientError as exc:
            with contextlib.suppress(Exception):
                await self._command("*", s.command_timeout)
            await self.quit()
            raise AuthFailure(f"AUTH {mech}: the provider failed to prove itself ({exc})"
                              ) from exc
        return reply

    # --- ATRN -------------------------------------------------------------------------------
    async def atrn(self, domains: Sequence[str]) -> Connection | None:
        assert self.client is not None and self.conn is not None
        # Through the client, so that the -v trace shows the ATRN line too.
        line = format_atrn(domains).decode("ascii").removesuffix("\r\n")
        await self._guard(self.client.send_line(line))
        reply = await self._reply(self.settings.atrn_timeout)
        what = ",".join(domains) or "(all domains of the account)"
        if reply.code == 250:
            return self.conn
        await self.quit()
        if reply.code == 453:
            return None
        if reply.code == 450:
            raise ATRNRefused(f"ATRN {what} refused: {reply}")
        if reply.code == 530:
            raise AuthFailure(f"ATRN needs authentication: {reply}")
        if reply.is_temporary:
            raise TemporaryFailure(f"ATRN {what}: {reply}")
        raise ProtocolFailure(f"ATRN {what}: {reply}")

    # --- plumbing ---------------------------------------------------------------------------
    async def _guard(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise ConnectFailure("timeout waiting for the provider") from exc
        except (ConnectionClosed, OSError) as exc:
            raise ConnectFailure(f"connection to the provider lost: {exc}") from exc
        except (ReplyProtocolError, LineTooLong) as exc:
            raise ProtocolFailure(f"malformed reply from the provider: {exc}") from exc

    async def _reply(self, timeout: float) -> Reply:
        assert self.client is not None
        return await self._guard(self.client.read_reply(timeout))

    async def _command(self, line: str, timeout: float, *, secret: bool = False) -> Reply:
        assert self.client is not None
        return await self._guard(self.client.command(line, timeout, secret=secret))

    async def quit(self) -> None:
        """QUIT and close, ignoring errors (RFC 5321 §4.1.1.10)."""
        if self.client is not None and self.conn is not None and not self.conn.closed:
            with contextlib.suppress(Exception):
                await self.client.command("QUIT", QUIT_TIMEOUT)
        await self.close()

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close(1.0)
