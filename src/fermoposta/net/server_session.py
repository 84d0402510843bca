"""The asyncio driver of a server-side SMTP dialog (RFC 5321 §4.1, §4.3.2; RFC 3207).

Contract:
- `ServerSession` runs one server-side SMTP dialog on a `Connection`.  The
  dialog's rules live in the sans-I/O `smtp.server.ServerMachine`: this
  driver sends the greeting, reads one command line at a time (512 octets,
  AUTH included, RFC 4954 §4), gives it to the machine, and either writes
  the machine's refusal (syntax, 500/502, a verb out of sequence per the
  verb table `VERBS`: HELO first, TLS first, AUTH first, inside or outside a
  transaction) or runs the verb's handler and writes its reply; the machine
  counts error replies (after `max_errors` 421 and close).  Before each line
  the driver tells the machine the facts it does not own (TLS, the
  authenticated account, an open transaction).
- It owns the verbs every dialog shares: EHLO/HELO, STARTTLS, NOOP, RSET,
  QUIT, HELP, VRFY.  Subclasses (MX, ODMR, submission, the customer's
  reversed session and outbox) extend `VERBS` and override `extensions()`
  and the hooks; handlers never re-check what their `VerbSpec` guarantees.
- Handlers return a `Reply` (or raise `SMTPError`).  An unexpected exception
  in a handler answers 451 4.3.0 (temporary: a bug never bounces mail) and
  is logged with its traceback; the session goes on.
- STARTTLS discards plaintext pipelined after the command (CVE-2011-0411
  class) and resets the dialog to "no EHLO yet" (RFC 3207 §4.2).
- A verb that hands the connection over (ATRN's role reversal) sets
  `handoff` and ends phase 1; `run()` then runs the hand-off outside every
  verb handler, so an error in phase 2 can never be answered with a server
  reply: a bug there is logged and the connection dropped.
- A peer that half-closes (FIN after pipelined commands) gets a reply to
  every complete command it sent, then the connection closes (flushing
  those replies, see `Connection`).
- Deadlines (`SessionLimits.session_deadline`, the whole connection from
  accept to close, phase 1 only: an ATRN hand-off has its own bounds; and
  `data_deadline`, one message's DATA, or its BDAT chunks and the commands
  between them: `message_deadline()`) cut waits for the peer, never a
  handler at work: when one passes the session answers 421 4.4.2, keeps
  nothing of an unfinished message, logs it and closes.  `None` = none.
- A line the machine refuses goes through `refused_line(line, reply)` first: a
  dialog that must still consume what follows such a line (a BDAT chunk)
  answers it there.  So does a line over the command line limit (500
  5.5.6), with only its first bytes (`LineTooLong.head`) as `line`.
- The session never raises: peer closes, timeouts and TLS failures end it
  quietly (logged), and `run()` always closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from fermoposta.net.connection import (
    Connection,
    ConnectionClosed,
    DeadlineExceeded,
    LineTooLong,
    tls_failure_reason,
)
from fermoposta.ops.log import redact
from fermoposta.smtp import reply as R
from fermoposta.smtp.command import Command, parse_ehlo_arg
from fermoposta.smtp.reply import Reply, SMTPError, cached_reply
from fermoposta.smtp.server import (
    COMMAND_LINE_LIMIT,
    RESPONSE_LINE_LIMIT,
    Dispatch,
    ServerMachine,
    VerbSpec,
    verb_table,
)

log = logging.getLogger("fermoposta.smtp")

AUTH_LINE_LIMIT = RESPONSE_LINE_LIMIT  # RFC 4954 §4: a SASL response line (not AUTH itself)


@dataclass(frozen=True, slots=True)
class SessionLimits:
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7 server timeout
    data_timeout: float = 180.0  # RFC 5321 §4.5.3.2.5 data block
    tls_handshake_timeout: float = 60.0
    max_errors: int = 20
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 1000  # RFC 5321 §4.5.3.1.6
    # Overall bounds RFC 5321 does not define (§4.5.3.2 timeouts are per read,
    # so a slow drip never trips them); None = no bound.  The listeners set them
    # from [limits] data_deadline / session_deadline.
    data_deadline: float | None = None  # one message's DATA
    session_deadline: float | None = None  # the whole connection (phase 1)


def deadline_reply(what: str) -> Reply:
    """421 4.4.2 when an overall deadline passes (RFC 3463 §3.5: timeout)."""
    limit = "DATA time limit" if what == "DATA" else "Session time limit"
    return Reply(421, "4.4.2", f"{limit} exceeded, closing connection")


def new_session_id() -> str:
    return secrets.token_hex(5).upper()


class ServerSession:
    """One server-side SMTP dialog; see the module docstring."""

    # The verb table (`smtp.server.VerbSpec`): verb -> handler and what it needs.
    VERBS: ClassVar[Mapping[str, VerbSpec]] = {}
    component: ClassVar[str] = "smtpd"

    def __init__(
        self,
        conn: Connection,
        *,
        hostname: str,
        limits: SessionLimits,
        tls_context: ssl.SSLContext | None = None,
        session_id: str | None = None,
    ) -> None:
        self.conn = conn
        self.hostname = hostname
        self.limits = limits
        self.tls_context = tls_context
        self.session_id = session_id or new_session_id()
        self.machine = ServerMachine(self.VERBS, max_errors=limits.max_errors)
        self.closing = False
        self.in_data = False  # reading a message's data (for the deadline log)
        # Set by a verb that hands the connection over (ATRN's flip): run by
        # `run()` after phase 1 ends, outside every verb handler.
        self.handoff: Callable[[], Awaitable[None]] | None = None
        self.log = logging.LoggerAdapter(log, {"component": self.component})

    # --- the dialog state, kept by the machine ----------------------------------------------
    @property
    def helo_name(self) -> str | None:
        return self.machine.state.helo_name

    @property
    def esmtp(self) -> bool:
        return self.machine.state.esmtp

    # --- hooks for subclasses ------------------------------------------------------------
    def require_tls(self) -> bool:
        """Whether verbs flagged `Needs.TLS` wait for STARTTLS (530 5.7.0)."""
        return False

    def authenticated_account(self) -> str | None:
        """The account AUTH established, for verbs flagged `Needs.AUTH`."""
        return None

    def transaction_open(self) -> bool:
        """Whether a MAIL was accepted, for `Needs.TRANSACTION` / `NO_TRANSACTION`."""
        return False

    def greeting(self) -> Reply:
        return cached_reply(220, None, f"{self.hostname} ESMTP fermoposta")

    def extensions(self) -> list[str]:
        """EHLO keywords after the greeting line."""
        exts = ["ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and not self.conn.tls_active:
            exts.append("STARTTLS")
        return exts

    def reset_transaction(self) -> None:
        """Forget any mail transaction (RSET, EHLO, STARTTLS)."""

    def reset_after_tls(self) -> None:
        """RFC 3207 §4.2: discard all knowledge obtained from the client."""
        self.machine.tls_started()
        self.reset_transaction()

    def peer_description(self) -> str:
        return f"{self.helo_name or 'unknown'}[{self.conn.peer_ip}]"

    async def on_connect(self) -> Reply | None:
        """Return a reply to refuse the connection (it is sent, then we close)."""
        return None

    def utf8_commands(self) -> bool:
        return False

    def message_deadline(self) -> float | None:
        """When (loop time) a message whose data comes between commands (BDAT
        chunks, RFC 3030) must be complete: it bounds the wait for the next
        command too.  None: no message under way, or no bound."""
        return None

    async def refused_line(self, line: bytes, reply: Reply) -> Reply | None:
        """The reply to a line the machine refused (`reply`, its own); None
        when this method answered it itself."""
        return reply

    # --- the loop ------------------------------------------------------------------------
    async def send(self, reply: Reply) -> None:
        data = reply.to_bytes()
        if log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s: > %s", self.session_id, data.decode("utf-8", "replace").rstrip())
        if self.conn.line_pending() and self.conn.hold(data):
            # The client pipelines (RFC 2920): its next command is here, so
            # this reply goes out with the next one, in one write; the
            # connection flushes it before it waits for the client, and
            # within milliseconds whatever happens (Connection.hold).
            return
        if not self.conn.write_now(data):  # paused or closing: write() waits or raises
            await self.conn.write(data, self.limits.command_timeout)

    async def run(self) -> None:
        try:
            if self.limits.session_deadline is not None:
                self.conn.deadline = (asyncio.get_running_loop().time()
                                      + self.limits.session_deadline)
            await self._dialog()
            # The hand-off (the ODMR drain) runs under its own timeouts and lease.
            self.conn.deadline = None
            if self.handoff is not None:
                await self._run_handoff(self.handoff)
        finally:
            self.conn.deadline = None
            self.conn.flush()  # a held 221 or 421 goes before finish() (leases, a local MTA)
            await self.finish()
            await self.conn.close()

    async def _run_handoff(self, handoff: Callable[[], Awaitable[None]]) -> None:
        """Phase 2 of a role reversal (RFC 2645 §5.3): we are no longer the
        server, so whatever goes wrong there must never be answered with a
        server reply (the peer would read it as a command).  Peer errors are
        the hand-off's own business; anything else escaping it is a bug:
        log it and drop the connection (what was not acknowledged stays
        queued)."""
        try:
            await handoff()
        except asyncio.CancelledError:
            self.conn.abort()
            raise
        except Exception:
            self.log.exception("%s: internal error after the role reversal; dropping the "
                               "connection", self.session_id)
            self.conn.abort()

    async def _dialog(self) -> None:
        """Phase 1: the server dialog, until QUIT, 421, a hand-off or the peer goes."""
        try:
            refusal = await self.on_connect()
            if refusal is not None:
                await self.send(refusal)
                return
            await self.send(self.greeting())
            while not self.closing:
                await self.one_command()
        except ConnectionClosed:
            self.log.info("%s: disconnect from %s", self.session_id, self.peer_description())
        except DeadlineExceeded as exc:
            # RFC 5321 §3.8: the server may close with 421 for its own reasons;
            # an unfinished message is not kept (its client still has it).
            self.conn.deadline = None  # let the 421 itself go out
            self.log.warning("%s: %s deadline passed for %s; closing%s", self.session_id,
                             exc.what, self.peer_description(),
                             " (partial message discarded)" if self.in_data else "")
            await self._try_send(deadline_reply(exc.what))
        except TimeoutError:
            self.log.info("%s: timeout from %s", self.session_id, self.peer_description())
            await self._try_send(R.TIMEOUT)
        except ssl.SSLError as exc:
            self.log.info("%s: TLS error from %s: %s", self.session_id, self.peer_description(),
                          tls_failure_reason(exc))
        except OSError as exc:
            self.log.info("%s: connection error from %s: %s", self.session_id,
                          self.peer_description(), exc)

    async def finish(self) -> None:
        """Called once when the dialog ends, before the connection closes."""

    async def _try_send(self, reply: Reply) -> None:
        with contextlib.suppress(Exception):  # best effort on a dying connection
            await asyncio.wait_for(self.conn.write(reply.to_bytes(), 5.0), 5.0)

    async def one_command(self) -> None:
        try:
            line = await self.conn.read_line(COMMAND_LINE_LIMIT, self.limits.command_timeout,
                                             deadline=self.message_deadline())
        except LineTooLong as exc:
            # Its head (what is left of it) goes where a refused line goes: a
            # dialog that must consume what follows it (BDAT) answers there.
            refusal = await self.refused_line(exc.head, R.LINE_TOO_LONG)
            if refusal is not None:
                await self.reply(refusal)
            return
        if log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s: < %s", self.session_id,
                           redact(line).decode("utf-8", "replace").rstrip())
        # The facts the machine does not own, as they are now (subclasses'
        # settings, the TLS layer, AUTH, the open transaction).
        self.machine.require_tls = self.require_tls()
        self.machine.utf8_commands = self.utf8_commands()
        state = self.machine.state
        state.tls = self.conn.tls_active
        state.account = self.authenticated_account()
        state.transaction_open = self.transaction_open()
        action = self.machine.receive_line(line)
        if isinstance(action, Dispatch):
            try:
                reply = await self.dispatch(action)
            except SMTPError as exc:
                reply = exc.reply
        else:
            reply = await self.refused_line(line, action.reply)
        if reply is not None:
            await self.reply(reply)

    async def dispatch(self, action: Dispatch) -> Reply | None:
        command: Command = action.command
        try:
            handler: Callable[[str], Awaitable[Reply | None]] = getattr(self, action.spec.handler)
            return await handler(command.arg)
        except (SMTPError, ConnectionClosed, TimeoutError, ssl.SSLError, OSError):
            raise
        except Exception:
            self.log.exception("%s: internal error handling %s", self.session_id, command.verb)
            return R.LOCAL_ERROR

    def counts_as_error(self, reply: Reply) -> bool:
        """Whether `reply` counts towards `max_errors`.  Refused recipients do
        (a client probing addresses), except 452 4.5.3 "too many recipients",
        which is flow control; a session that delivers mail starts afresh
        (Postfix's "errors without delivering mail")."""
        return self.machine.counts_as_error(reply)

    async def reply(self, reply: Reply) -> None:
        """Send a reply, counting errors (RFC 5321 §4.3.2 lets us close with 421)."""
        await self.send(reply)
        for extra in self.machine.replied(reply, counts=self.counts_as_error(reply)):
            self.log.info("%s: too many errors from %s", self.session_id,
                          self.peer_description())
            await self.send(extra)
        if self.machine.closing:
            self.closing = True

    # --- shared verbs ----------------------------------------------------------------------
    async def smtp_ehlo(self, arg: str) -> Reply:
        name = parse_ehlo_arg(arg)
        self.reset_transaction()
        self.machine.helo(name, esmtp=True)
        # A client that comes back (the same name, address and extensions)
        # gets the reply rendered before.
        return cached_reply(250, None, f"{self.hostname} Hello {name} [{self.conn.peer_ip}]",
                            *self.extensions())

    async def smtp_helo(self, arg: str) -> Reply:
        name = parse_ehlo_arg(arg)
        self.reset_transaction()
        self.machine.helo(name, esmtp=False)
        return Reply(250, None, self.hostname)

    async def smtp_noop(self, arg: str) -> Reply:
        return R.OK

    async def smtp_rset(self, arg: str) -> Reply:
        if arg:
            return R.BAD_ARGUMENTS
        self.reset_transaction()
        return R.OK

    async def smtp_quit(self, arg: str) -> Reply:
        self.closing = True
        return R.BYE

    async def smtp_vrfy(self, arg: str) -> Reply:
        # RFC 5321 §3.5.3: 252 when we will not verify.
        return Reply(252, "2.5.2", "Cannot VRFY user, but will accept message")

    async def smtp_help(self, arg: str) -> Reply:
        return Reply(214, "2.0.0", "See RFC 5321 and RFC 2645")

    async def smtp_starttls(self, arg: str) -> Reply | None:
        if arg:
            return R.BAD_ARGUMENTS
        if self.conn.tls_active:
            return R.BAD_SEQUENCE
        if self.tls_context is None:
            return R.TLS_NOT_AVAILABLE
        await self.send(R.READY_TO_START_TLS)
        timeout = self.limits.tls_handshake_timeout
        try:
            dropped = await self.conn.start_tls(self.tls_context, server_side=True,
                                                timeout=timeout)
        except (OSError, ssl.SSLError, ConnectionClosed) as exc:  # TimeoutError is an OSError
            # Logged here, with its reason: the session's handlers below would
            # call a timeout a command timeout and a reset an empty error.
            self.log.info("%s: TLS handshake failed from %s: %s", self.session_id,
                          self.peer_description(), tls_failure_reason(exc, timeout))
            raise ConnectionClosed("TLS handshake failed") from exc
        if dropped:
            self.log.warning(
                "%s: discarded %d plaintext bytes pipelined after STARTTLS from %s",
                self.session_id, dropped, self.peer_description(),
            )
        self.reset_after_tls()
        self.log.info("%s: TLS %s %s from [%s]", self.session_id, self.conn.tls_version,
                      self.conn.tls_cipher, self.conn.peer_ip)
        return None

    VERBS = verb_table(
        VerbSpec("EHLO", "smtp_ehlo"),
        VerbSpec("HELO", "smtp_helo"),
        VerbSpec("NOOP", "smtp_noop"),
        VerbSpec("RSET", "smtp_rset"),
        VerbSpec("QUIT", "smtp_quit"),
        VerbSpec("VRFY", "smtp_vrfy"),
        VerbSpec("HELP", "smtp_help"),
        VerbSpec("STARTTLS", "smtp_starttls"),
    )
