"""The server side of an SMTP dialog as a state machine (sans-I/O).

Contract:
- A `ServerMachine` is given one received command line at a time
  (`receive_line`) and answers with one action: `Refuse(reply)` (the line
  is refused here: syntax, an unknown or unoffered verb, a verb out of
  sequence, an overlong line) or `Dispatch(verb, command)` (the driver runs
  the verb's handler and reports the reply it sent with `replied`).
  `replied` returns the replies the machine adds (the 421 after too many
  errors, RFC 5321 §4.3.2) and sets `closing`.  It does no I/O, reads no
  clock and imports nothing outside `smtp/`; the asyncio driver is
  `fermoposta.net.server_session`.
- Dispatch is by one explicit table of `VerbSpec`s (Postfix's
  `smtpd_cmd_table`): each verb names its handler and the state it needs
  (`Needs`): a HELO/EHLO first, TLS first when the dialog requires it
  (530 5.7.0, RFC 3207 §4), an authenticated client (530 5.7.0, RFC 4954
  §6), a mail transaction open (503 5.5.1) or none open.  A verb absent
  from the table is 502 when it is an SMTP verb we know (RFC 5321 §4.2.4)
  and 500 otherwise.  Handlers never re-check what the table guarantees.
- Line limits: 512 octets with CRLF for every command (RFC 5321
  §4.5.3.1.4), AUTH included (RFC 4954 §4: "the AUTH command is still
  subject to the line length limitations"); `response_limit` (12,288,
  RFC 4954 §4) applies only to the client's SASL responses, which the
  AUTH handler reads itself.  An overlong line is 500 5.5.6.
- The dialog state (`DialogState`) is the machine's: the HELO name and
  ESMTP (set by `helo`), and the facts other layers own, which the driver
  writes into `state` before each line: TLS active, the authenticated
  account, whether a transaction is open.  `tls_started` forgets everything
  learned before STARTTLS (RFC 3207 §4.2).
- ETRN (RFC 1985 §5): `parse_etrn` is its syntax, checked by the machine
  before dispatch (501 5.5.4 for a missing or bad node name; the handler
  gets only well-formed ones): ``ETRN domain``, ``ETRN @domain`` (the domain
  and its subdomains) or ``ETRN #queue`` (a queue name, which the caller
  may refuse with 458/459); domains are IDNA-normalised like paths.
- Errors: a reply ≥ 400 counts towards `max_errors` except 421 and 452
  4.5.3 (flow control); a delivered message (`delivered`) starts the count
  afresh, like Postfix's "errors without delivering mail".
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from fermoposta.smtp import reply as R
from fermoposta.smtp.command import Command, normalize_domain, parse_command
from fermoposta.smtp.reply import Reply, SMTPError

__all__ = [
    "AUTH_IN_TRANSACTION",
    "COMMAND_LINE_LIMIT",
    "KNOWN_VERBS",
    "NESTED_MAIL",
    "RESPONSE_LINE_LIMIT",
    "DialogState",
    "Dispatch",
    "EtrnRequest",
    "Needs",
    "Refuse",
    "ServerMachine",
    "VerbSpec",
    "parse_etrn",
    "verb_table",
]

COMMAND_LINE_LIMIT = 512  # RFC 5321 §4.5.3.1.4, including CRLF; AUTH too (RFC 4954 §4)
RESPONSE_LINE_LIMIT = 12288  # RFC 4954 §4: a SASL response line

# Verbs we know but may not offer in a dialog: 502, not 500 (RFC 5321 §4.2.4).
KNOWN_VERBS = frozenset(
    {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN",
     "HELP", "STARTTLS", "AUTH", "ATRN", "ETRN", "TURN", "BDAT", "LHLO"}
)

SEND_HELO_FIRST = Reply(503, "5.5.1", "Send EHLO/HELO first")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NOT_IN_TRANSACTION = Reply(503, "5.5.1", "Not allowed during a mail transaction")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")


_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ETRN_SYNTAX = Reply(501, "5.5.4", "Syntax: ETRN [@]domain or ETRN #queue")


@dataclass(frozen=True, slots=True)
class EtrnRequest:
    """A well-formed ETRN argument (RFC 1985 §5); a queue name is letters,
    digits, ".", "_" and "-", at most 64."""

    name: str  # the domain (normalised A-label) or the queue name
    subdomains: bool = False  # "@domain": the domain and every domain under it
    queue: bool = False  # "#queue": a queue name, not a domain

    def __str__(self) -> str:  # as the client wrote it (normalised)
        return ("#" if self.queue else "@" if self.subdomains else "") + self.name


def parse_etrn(arg: str) -> EtrnRequest:
    """The node of ``ETRN [@|#]<node>``; `SMTPError` 501 5.5.4 if it is missing
    or is not one domain name (or one queue name after ``#``)."""
    text = arg.strip()
    if not text or any(c.isspace() for c in text):
        raise SMTPError(ETRN_SYNTAX)
    if text.startswith("#"):
        name = text[1:]
        if not _QUEUE_NAME.fullmatch(name):
            raise SMTPError(ETRN_SYNTAX)
        return EtrnRequest(name, queue=True)
    subdomains = text.startswith("@")
    if subdomains:
        text = text[1:]
    if text.startswith("[") or text.startswith("@"):
        raise SMTPError(ETRN_SYNTAX)  # an address literal names no queue of ours
    try:
        name = normalize_domain(text)
    except ValueError:
        raise SMTPError(ETRN_SYNTAX) from None
    return EtrnRequest(name, subdomains=subdomains)


class Needs(enum.Flag):
    """What a verb needs before it may run (checked in this order)."""

    NOTHING = 0
    TLS = enum.auto()  # when the dialog requires TLS (`require_tls`): 530 5.7.0
    HELO = enum.auto()  # a HELO or EHLO first: 503 5.5.1
    EHLO = enum.auto()  # an EHLO (not HELO) first: 503 5.5.1
    AUTH = enum.auto()  # an authenticated client: the verb's `auth_reply` (530 5.7.0)
    NO_AUTH = enum.auto()  # not yet authenticated: 503 5.5.1 (RFC 4954 §4)
    TRANSACTION = enum.auto()  # a MAIL accepted: 503 5.5.1
    NO_TRANSACTION = enum.auto()  # no MAIL accepted: 503 5.5.1


_TLS, _HELO, _EHLO, _AUTH, _NO_AUTH, _TRANSACTION, _NO_TRANSACTION = (
    flag.value for flag in (Needs.TLS, Needs.HELO, Needs.EHLO, Needs.AUTH, Needs.NO_AUTH,
                            Needs.TRANSACTION, Needs.NO_TRANSACTION))


@dataclass(frozen=True, slots=True)
class VerbSpec:
    verb: str
    handler: str  # the name of the driver's method
    needs: Needs = Needs.NOTHING
    auth_reply: Reply = R.AUTH_REQUIRED
    sequence_reply: Reply | None = None  # overrides the 503 text of TRANSACTION/NO_*
    # `needs` as an int, read for every command: a Flag's `value` is a
    # descriptor call each time.
    needs_bits: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs_bits", self.needs.value)


def verb_table(*specs: VerbSpec, base: Mapping[str, VerbSpec] | None = None
               ) -> dict[str, VerbSpec]:
    """A table: `base` (a parent dialog's) updated with `specs`."""
    table = dict(base or {})
    for spec in specs:
        table[spec.verb] = spec
    return table


@dataclass(slots=True)
class DialogState:
    helo_name: str | None = None
    esmtp: bool = False
    tls: bool = False
    account: str | None = None
    transaction_open: bool = False


@dataclass(frozen=True, slots=True)
class Refuse:
    reply: Reply


@dataclass(frozen=True, slots=True)
class Dispatch:
    spec: VerbSpec
    command: Command


@dataclass
class ServerMachine:
    """See the module docstring."""

    table: Mapping[str, VerbSpec]
    max_errors: int = 20
    require_tls: bool = False
    utf8_commands: bool = False
    state: DialogState = field(default_factory=DialogState)
    errors: int = 0
    closing: bool = False

    # --- input -------------------------------------------------------------------------
    def receive_line(self, line: bytes) -> Refuse | Dispatch:
        if len(line) > COMMAND_LINE_LIMIT:
            return Refuse(R.LINE_TOO_LONG)
        try:
            command = parse_command(line, utf8=self.utf8_commands)
        except SMTPError as exc:
            return Refuse(exc.reply)
        spec = self.table.get(command.verb)
        if spec is None:
            return Refuse(R.NOT_IMPLEMENTED if command.verb in KNOWN_VERBS else R.SYNTAX_ERROR)
        refusal = self.check(spec)
        if refusal is not None:
            return Refuse(refusal)
        if command.verb == "ETRN":
            try:
                parse_etrn(command.arg)
            except SMTPError as exc:
                return Refuse(exc.reply)
        return Dispatch(spec, command)

    def check(self, spec: VerbSpec) -> Reply | None:
        """Why `spec` may not run now, or None."""
        # The flags' bits as an int: `Flag in Flag` costs a call per test,
        # seven tests for every command.
        needs = spec.needs_bits
        if not needs:
            return None
        state = self.state
        if needs & _TLS and self.require_tls and not state.tls:
            return R.MUST_STARTTLS
        if needs & _HELO and state.helo_name is None:
            return SEND_HELO_FIRST
        if needs & _EHLO and (state.helo_name is None or not state.esmtp):
            return Reply(503, "5.5.1", "Send EHLO first")
        if needs & _NO_AUTH and state.account is not None:
            return R.AUTH_ALREADY
        if needs & _AUTH and state.account is None:
            return spec.auth_reply
        if needs & _TRANSACTION and not state.transaction_open:
            return spec.sequence_reply or NEED_MAIL
        if needs & _NO_TRANSACTION and state.transaction_open:
            return spec.sequence_reply or NOT_IN_TRANSACTION
        return None

    # --- what the handlers did ----------------------------------------------------------
    def helo(self, name: str, *, esmtp: bool) -> None:
        self.state.helo_name, self.state.esmtp = name, esmtp
        self.state.transaction_open = False

    def tls_started(self) -> None:
        """RFC 3207 §4.2: discard all knowledge obtained from the client."""
        self.state = DialogState(tls=True)

    def delivered(self) -> None:
        """A message was accepted: errors count only "without delivering mail"."""
        self.errors = 0

    # --- output ------------------------------------------------------------------------
    def counts_as_error(self, reply: Reply) -> bool:
        return reply.code >= 400 and reply.code != 421 and reply.enhanced != "4.5.3"

    def replied(self, reply: Reply, *, counts: bool | None = None) -> list[Reply]:
        """Account for a reply just sent; returns what must follow it (a 421).
        `counts` overrides `counts_as_error` (a dialog with its own policy)."""
        if reply.code == 421:
            self.closing = True
            return []
        if counts if counts is not None else self.counts_as_error(reply):
            self.errors += 1
            if self.errors >= self.max_errors:
                self.closing = True
                return [R.TOO_MANY_ERRORS]
        return []

