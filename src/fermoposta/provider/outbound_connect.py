"""Connections of the outbound engine: a route's hops to an SMTP session.

Contract (the mixin `Connector`, one of `OutboundRunner`'s bases; the runner
sets the attributes it declares):
- `_connect(route)` tries the route's hops in order and returns a `Session`
  after the greeting, EHLO and, as the route asks, STARTTLS (or implicit TLS)
  and AUTH; it raises `HopFailure` with the last hop's `Problem` when none
  works (a 4xx reply: greetings and EHLOs other than 2xx count as temporary,
  like Postfix's smtp_skip_5xx_greeting).  The rules are those of
  "Connections" in the `provider.outbound` docstring: a TLS handshake that
  fails is retried once on the same hop without TLS, unless TLS is required
  (`TLSPolicy.ENCRYPT`: 4.7.5); no certificate check; AUTH PLAIN or LOGIN
  only over TLS, a refused login defers (454 4.7.0).
- `_quit(session)` sends QUIT (unless the session is broken) and closes it;
  `connections`, `max_connections_seen` and `_open_connections` count the
  connections opened, most at once, and open now.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import ssl

from fermoposta.config import OutboundConfig, ProviderConfig
from fermoposta.net.client import PEER_ERRORS, SMTPClient
from fermoposta.net.connection import Connection, ConnectionClosed, open_connection
from fermoposta.provider.outbound_base import OutboundSettings
from fermoposta.provider.outbound_base import Problem as _Problem
from fermoposta.provider.resolver import Hop, Route, TLSPolicy
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.sasl_client import SASLClientError, client_mechanism

__all__ = ["Connector", "HopFailure", "Session"]


class HopFailure(Exception):
    """No session from a hop (or from any hop of a route): why, in `problem`;
    `retry_plain`: the TLS handshake failed, the hop may be tried without."""

    def __init__(self, problem: _Problem, *, retry_plain: bool = False) -> None:
        super().__init__(str(problem.reply))
        self.problem = problem
        self.retry_plain = retry_plain


class Session:
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


class Connector:
    """Opening and closing sessions; mixed into `OutboundRunner`."""

    config: ProviderConfig
    out: OutboundConfig
    settings: OutboundSettings
    _password: str | None  # the smarthost's, read by `_check_config`
    connections: int
    max_connections_seen: int
    _open_connections: int

    async def _connect(self, route: Route) -> Session:
        last: _Problem | None = None
        for hop in route.hops:
            try:
                return await self._open(route, hop, starttls=True)
            except HopFailure as failure:
                last = failure.problem
                if failure.retry_plain:
                    try:
                        return await self._open(route, hop, starttls=False)
                    except HopFailure as again:
                        last = again.problem
        if last is None:
            last = _Problem(Reply(451, "4.4.4", "No route to the destination"))
        raise HopFailure(last)

    async def _open(self, route: Route, hop: Hop, *, starttls: bool) -> Session:
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
            raise HopFailure(_Problem(Reply(451, code, text), relay)) from exc
        self.connections += 1
        self._open_connections += 1
        self.max_connections_seen = max(self.max_connections_seen, self._open_connections)
        client = SMTPClient(conn, write_timeout=s.data_block_timeout)
        try:
            return await self._handshake(route, hop, conn, client, starttls)
        except HopFailure:
            self._closed(conn)
            raise
        except PEER_ERRORS as exc:
            self._closed(conn)
            raise HopFailure(_Problem(Reply(451, "4.4.2", f"lost connection with {relay} "
                                             f"during the greeting: {_os_error(exc)}"),
                                       relay)) from exc
        except BaseException:
            self._closed(conn)
            raise

    def _closed(self, conn: Connection) -> None:
        conn.abort()
        self._open_connections -= 1

    async def _handshake(self, route: Route, hop: Hop, conn: Connection, client: SMTPClient,
                         starttls: bool) -> Session:
        s = self.settings
        relay = str(hop)
        greeting = await client.read_reply(s.greeting_timeout)
        name = _server_name(greeting, hop)
        if greeting.code != 220:
            await self._quit_client(client)
            raise HopFailure(_Problem(_temporary(greeting, "greeting"), relay, hop.name))
        reply = await client.ehlo(self.config.hostname, s.command_timeout)
        if reply.code != 250:
            await self._quit_client(client)
            raise HopFailure(_Problem(_temporary(reply, "EHLO"), relay, hop.name))
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
                        raise HopFailure(problem, retry_plain=not must_tls) from exc
                    reply = await client.ehlo(self.config.hostname, s.command_timeout)
                    if reply.code != 250:
                        await self._quit_client(client)
                        raise HopFailure(_Problem(_temporary(reply, "EHLO after STARTTLS"),
                                                   relay, hop.name))
                elif must_tls:
                    await self._quit_client(client)
                    raise HopFailure(_Problem(Reply(451, "4.7.5", f"TLS is required, but "
                                                     f"{relay} refused STARTTLS: {answer}"),
                                               relay, hop.name))
            elif must_tls:
                await self._quit_client(client)
                raise HopFailure(_Problem(Reply(451, "4.7.5", "TLS is required, but was not "
                                                 f"offered by {relay}"), relay))
        if must_tls and not conn.tls_active:
            await self._quit_client(client)
            raise HopFailure(_Problem(Reply(451, "4.7.5", f"TLS is required for {relay}"),
                                       relay))
        session = Session(conn, client, hop, name)
        if route.auth:
            await self._authenticate(session)
        return session

    async def _authenticate(self, session: Session) -> None:
        client, relay = session.client, session.relay
        username = self.out.smarthost_username
        if not session.conn.tls_active:
            await self._quit_client(client)
            raise HopFailure(_Problem(Reply(451, "4.7.0", f"AUTH at {relay} needs TLS "
                                             "(smarthost_tls)"), relay))
        if self._password is None:
            await self._quit_client(client)
            raise HopFailure(_Problem(Reply(451, "4.7.0", "The smarthost password is not "
                                             "readable"), relay))
        offered = client.capabilities.get("AUTH", "").upper().split()
        if not offered:
            return  # the relay does not want AUTH (from us): go on without
        mech = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
        if mech is None:
            await self._quit_client(client)
            raise HopFailure(_Problem(Reply(451, "4.7.0", f"{relay} offers no PLAIN or LOGIN "
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
            raise HopFailure(_Problem(Reply(451, "4.7.0", f"AUTH {mech} at {relay}: bad "
                                             f"challenge ({exc})"), relay)) from exc
        if reply.code != 235:
            await self._quit_client(client)
            # A refused login is a configuration problem here: defer, never bounce.
            raise HopFailure(_Problem(Reply(454, "4.7.0", f"AUTH {mech} at {relay} "
                                             f"failed: {reply}"), relay, session.hop.name))

    async def _quit_client(self, client: SMTPClient) -> None:
        with contextlib.suppress(*PEER_ERRORS):
            await client.command("QUIT", self.settings.quit_timeout)

    async def _quit(self, session: Session) -> None:
        if not session.broken:
            await self._quit_client(session.client)
        session.broken = True
        self._closed(session.conn)


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
