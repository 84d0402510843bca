"""The SMTP mail transaction: MAIL, RCPT, DATA (RFC 5321 §3.3, §4.1.1.2–4).

Contract:
- `TransactionSession` adds MAIL/RCPT/DATA to `ServerSession` with the
  checks every receiving role needs (sequence, parameters of the advertised
  extensions only: SIZE RFC 1870, BODY=8BITMIME RFC 6152, SMTPUTF8 RFC 6531;
  recipient count limit 452 4.5.3; duplicate RCPT accepted once) and leaves
  policy to three hooks: `check_sender`, `check_recipient`, `accept_message`.
- DATA streams into a spooled temporary file (bounded memory,
  `net.incoming`) behind a `Received:` header; the size limit is enforced
  while streaming (552 after the end of data), only CRLF.CRLF ends the
  data, and a message with a bare CR or LF is refused (SMTP smuggling, RFC
  5321 §2.3.8).
- BDAT (RFC 3030 CHUNKING) only where `offer_chunking` is set (the
  customer's reversed session); elsewhere it is 502 as any verb a dialog
  does not take, and CHUNKING is not advertised.  See `smtp_bdat`: each
  chunk's octets are always read (`Connection.read_chunk`), also to throw
  them away after a refusal, so the next command is found (a refused chunk
  over 1.5 times `max_message_size` plus 1 MiB is not: 421 and close); no
  recipient gets 554 as DATA does, RCPT between chunks 503; the chunks of a
  message go through the same spool, trace header, size, line and bare
  CR/LF checks as DATA (`smtp.chunking.ChunkReader`, across chunk edges),
  and `accept_message` gets the very bytes DATA would give it.
- A body that outgrows `SPOOL_MEMORY` is also handed to `body_stage(txn)`
  while it arrives (`body_stager`), when the receiver offers one (the MX
  and submission, on SQLite): the enqueue after the final dot then stores
  only the rest.  A message not stored (refused, dropped, failed) has what
  was staged discarded.
- `accept_message` must return 250 only once the message is durably stored
  (or delivered); the peer hears nothing before it returns.
- `transaction_opened()` (MAIL accepted) and `transaction_closed()` come in
  pairs, whatever ends the transaction (its message's end, before
  `accept_message`; RSET, EHLO, STARTTLS; the session's end): the MX and
  submission pass them to their group commit, which waits for open ones.
- A peer whose EOF arrived with its final dot over TLS, where the 250 can
  no longer be written, gets nothing stored: it keeps the message and
  retries (plain TCP peers that half-close do get their 250).
- A dropped connection mid-DATA discards the partial message (§3.8), and
  so does an expired deadline: `limits.data_deadline` bounds one message's
  whole DATA, or its chunks from the first BDAT to the LAST one, waits for
  the commands between them included (the per-read `data_timeout` alone
  lets a slow drip last forever); the session then answers 421 4.4.2 and
  closes.
- Every refusal of a MAIL, RCPT or message goes through `reject()`: one
  Postfix-like ``NOQUEUE: reject: RCPT from ...`` line (or the caller's own
  text) whose JSON form carries ``reason``, ``client``, ``sender`` and
  ``recipient`` keys (plus ``stage``, ``listener``, ``reply``, ``helo``),
  and one count in `fermoposta_smtp_rejects_total{listener, reason}`.
  Syntax errors (501, 555) and sequence errors are not rejects.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, ClassVar

from fermoposta.net.connection import Connection, ConnectionClosed
from fermoposta.net.incoming import IncomingBody
from fermoposta.net.server_session import ServerSession, SessionLimits
from fermoposta.ops import metrics
from fermoposta.smtp import reply as R
from fermoposta.smtp.chunking import Bdat, ChunkReader, parse_bdat
from fermoposta.smtp.command import (
    NEEDS_SMTPUTF8,
    Path,
    normalize_domain,
    parse_mail_from,
    parse_rcpt_to,
    split_address,
    xtext_decode,
)
from fermoposta.smtp.data import ContentChecks, DataReader, in_wire_form
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.server import NESTED_MAIL, Needs, VerbSpec, verb_table
from fermoposta.smtp.trace import protocol_name, received_header
from fermoposta.store.base import BodyStage

NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LINE_ENDING = Reply(
    550, "5.5.2", "Message refused: bare CR or LF in message data (RFC 5321 section 2.3.8)"
)
DATA_LINE_TOO_LONG = Reply(
    500, "5.5.6", "Message refused: line too long (RFC 5321 section 4.5.3.1.6)"
)
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL FROM or RCPT TO parameter")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
# RFC 3030 §2 (BDAT).  The octets of a refused chunk are read and dropped.
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
BDAT_UNFRAMED = Reply(421, "4.5.0", "Cannot tell where that BDAT chunk ends, closing connection")
BDAT_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first (BDAT chunk discarded)")
# 554 as for DATA (and Postfix): refused recipients are no protocol error.
BDAT_NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients (BDAT chunk discarded)")
RCPT_AFTER_BDAT = Reply(503, "5.5.1", "RCPT not allowed after BDAT in one transaction")
BDAT_AFTER_ERROR = Reply(503, "5.5.1", "Transaction failed earlier, send RSET or MAIL "
                         "(BDAT chunk discarded)")
BDAT_TOO_BIG_TO_SKIP = Reply(421, "4.5.0", "BDAT chunk too big to skip, closing connection")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA not allowed after BDAT in one transaction; "
                        "transaction ended")
_BDAT_LINE = re.compile(rb"BDAT[ \t]", re.IGNORECASE)


def chunk_received(size: int) -> Reply:
    """The reply to a BDAT chunk that is not the last (RFC 3030 §2)."""
    return Reply(250, "2.0.0", f"{size} octets received")


@dataclass(slots=True)
class Recipient:
    path: Path
    local: str
    domain: str  # normalized A-label, lowercase; "" for <postmaster>
    notify: str | None = None  # RFC 3461 NOTIFY, uppercased ("NEVER" or a list)
    orcpt: str | None = None  # RFC 3461 ORCPT as received ("rfc822;xtext")


@dataclass(slots=True)
class Transaction:
    sender: Path
    queue_id: str | None = None  # named before DATA when the receiver stores it
    declared_size: int | None = None
    body_8bit: bool = False
    smtputf8: bool = False
    envid: str | None = None  # RFC 3461 ENVID (xtext, as received)
    ret: str | None = None  # RFC 3461 RET: "FULL" or "HDRS"
    recipients: list[Recipient] = field(default_factory=list)
    # Set at the end of DATA: the body `accept_message` gets needs no
    # rewriting on the way out (`QueuedMessage.wire_ready`).
    wire_ready: bool = False


@dataclass(slots=True)
class _Chunks:
    """A message under way in BDAT chunks: its content's checks, its spool
    and when it must be complete (loop time)."""

    reader: ChunkReader
    body: IncomingBody
    deadline: float | None


class TransactionSession(ServerSession):
    """A `ServerSession` that receives mail; see the module docstring."""

    # RFC 3461: accept NOTIFY/ORCPT/RET/ENVID (and advertise DSN) where the
    # receiver keeps them and acts on them (the provider's MX and submission).
    dsn_extension: ClassVar[bool] = False
    # RFC 3030: advertise CHUNKING and take BDAT (the customer's reversed session).
    offer_chunking: ClassVar[bool] = False

    transaction: Transaction | None = None
    authenticated_as: str | None = None
    _chunks: _Chunks | None = None  # a BDAT message under way
    _bdat_failed = False  # a BDAT error ended the transaction: later BDATs get 503

    def __init__(self, conn: Connection, *, hostname: str, limits: SessionLimits,
                 tls_context: ssl.SSLContext | None = None,
                 session_id: str | None = None) -> None:
        super().__init__(conn, hostname=hostname, limits=limits, tls_context=tls_context,
                         session_id=session_id)
        # Implicit TLS is up before the session exists; STARTTLS comes later.
        self.listener = metrics.listener_name(self.component, implicit_tls=conn.tls_active)

    def reject(self, reply: Reply, reason: str, *, stage: str, sender: str | None,
               recipients: list[str] | None = None, text: str | None = None,
               **fields: object) -> Reply:
        """Count and log one refusal; return `reply`.

        `reason` is one of `metrics.REJECT_REASONS`; `stage` the verb (MAIL,
        RCPT, DATA); `text` replaces the Postfix-like line (kept where a line
        is documented already); `fields` are added to the structured ones."""
        metrics.reject(self.listener, reason)
        to = ",".join(recipients) if recipients else None
        if text is None:
            text = (f"NOQUEUE: reject: {stage} from {self.peer_description()}: {reply}; "
                    f"from=<{sender if sender is not None else ''}>"
                    + (f" to=<{to}>" if to is not None else "")
                    + f" helo=<{self.helo_name or ''}>")
        # The four keys are always there (null when the stage has none, e.g.
        # no recipient at MAIL), so a log pipeline can rely on them.
        structured: dict[str, object] = {
            "reason": reason, "client": self.peer_description(), "sender": sender,
            "recipient": to, "stage": stage, "listener": self.listener, "reply": str(reply),
            **{k: v for k, v in {"helo": self.helo_name, **fields}.items() if v is not None},
        }
        # The session's adapter would drop `extra`: log on its logger directly.
        self.log.logger.info("%s", text,
                             extra={"component": self.component, "fields": structured})
        return reply

    # --- policy hooks --------------------------------------------------------------------
    async def check_sender(self, sender: Path) -> Reply | None:
        return None

    async def check_recipient(self, txn: Transaction, rcpt: Recipient) -> Reply | None:
        return None

    def body_stage(self, txn: Transaction, spool: IO[bytes]) -> BodyStage | None:
        """Where a big body may be stored while it arrives (see `body_stager`);
        `spool` is the body `accept_message` will be given.  None: only
        `accept_message` stores it."""
        return None

    async def accept_message(self, txn: Transaction, body: IO[bytes], size: int) -> Reply:
        raise NotImplementedError

    def received_protocol(self) -> str:
        return protocol_name(
            esmtp=self.esmtp,
            tls=self.conn.tls_active,
            authenticated=self.authenticated_as is not None,
        )

    # --- ServerSession hooks ---------------------------------------------------------------
    def extensions(self) -> list[str]:
        return [
            f"SIZE {self.limits.max_message_size}",
            "8BITMIME",
            "PIPELINING",
            "SMTPUTF8",
            *(["DSN"] if self.dsn_extension else []),
            *(["CHUNKING"] if self.offer_chunking else []),
            *super().extensions(),
        ]

    def reset_transaction(self) -> None:
        self._close_transaction()
        self._bdat_failed = False
        self._drop_chunks()  # RFC 3030 §2: RSET clears the chunks sent

    def message_deadline(self) -> float | None:
        return self._chunks.deadline if self._chunks is not None else None

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            self._drop_chunks()  # the connection went mid-message: nothing stored
            self._close_transaction()

    async def finish(self) -> None:
        # Before the connection's close: the group commit need not wait for
        # a transaction whose client is gone.
        self._close_transaction()
        await super().finish()

    def _close_transaction(self) -> None:
        if self.transaction is not None:
            self.transaction = None
            self.transaction_closed()

    def transaction_opened(self) -> None:
        """A MAIL was accepted: a message may follow.  Paired with exactly
        one `transaction_closed()` (the message's end, RSET, EHLO, STARTTLS
        or the session's end), which comes before the message is handed to
        `accept_message`."""

    def transaction_closed(self) -> None:
        """The transaction `transaction_opened()` announced is over."""

    def transaction_open(self) -> bool:
        return self.transaction is not None

    def utf8_commands(self) -> bool:
        # SMTPUTF8 is advertised to EHLO clients: their MAIL and RCPT may carry
        # UTF-8 addresses (RFC 6531 §3.3); the parsers enforce the parameter.
        return self.esmtp

    # --- verbs -----------------------------------------------------------------------------
    async def smtp_mail(self, arg: str) -> Reply:
        # HELO first, no transaction open: the verb table (VERBS) saw to it.
        wants_utf8 = self.esmtp and "SMTPUTF8" in arg.upper()
        path = parse_mail_from(arg, allow_utf8=wants_utf8)
        if path.is_utf8 and "SMTPUTF8" not in path.params:
            return NEEDS_SMTPUTF8  # RFC 6531 §3.4
        txn = Transaction(sender=path)
        for key, value in path.params.items():
            if not self.esmtp:
                return UNKNOWN_PARAMETER
            if key == "SIZE":
                if value is None or not value.isdigit():
                    return R.BAD_ARGUMENTS
                txn.declared_size = int(value)
                if txn.declared_size > self.limits.max_message_size:
                    return self.reject(MESSAGE_TOO_BIG, "message_size", stage="MAIL",
                                       sender=path.address, size=txn.declared_size)
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return UNKNOWN_PARAMETER
                txn.body_8bit = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8":
                if value is not None:
                    return R.BAD_ARGUMENTS
                txn.smtputf8 = True
            elif key == "AUTH":
                pass  # RFC 4954 §5: we may ignore it
            elif key == "RET" and self.dsn_extension:
                if value is None or value.upper() not in ("FULL", "HDRS") or txn.ret:
                    return R.BAD_ARGUMENTS
                txn.ret = value.upper()
            elif key == "ENVID" and self.dsn_extension:
                if not _valid_xtext(value, 100) or txn.envid:  # RFC 3461 §4.4: 100 chars
                    return R.BAD_ARGUMENTS
                txn.envid = value
            else:
                return UNKNOWN_PARAMETER
        refusal = await self.check_sender(path)
        if refusal is not None:
            return refusal
        self.transaction = txn
        self._bdat_failed = False
        self.transaction_opened()
        return SENDER_OK

    async def smtp_rcpt(self, arg: str) -> Reply:
        txn = self.transaction
        assert txn is not None  # Needs.TRANSACTION
        if self._chunks is not None:
            # RFC 3030 §2: the recipients are set before the first chunk (our
            # trace header, written then, names them).
            return RCPT_AFTER_BDAT
        path = parse_rcpt_to(arg, allow_utf8=txn.smtputf8)
        notify, orcpt = None, None
        for key, value in path.params.items():
            if key == "NOTIFY" and self.dsn_extension:
                notify = _parse_notify(value)
                if notify is None:
                    return R.BAD_ARGUMENTS
            elif key == "ORCPT" and self.dsn_extension:
                addr_type, sep, addr = (value or "").partition(";")
                if not sep or not addr_type or not _valid_xtext(addr, 500):
                    return R.BAD_ARGUMENTS
                orcpt = value
            else:
                return UNKNOWN_PARAMETER
        if len(txn.recipients) >= self.limits.max_recipients:
            return self.reject(TOO_MANY_RECIPIENTS, "other", stage="RCPT",
                               sender=txn.sender.address, recipients=[path.address])
        if "@" in path.address:
            local, raw_domain = split_address(path.address)
            try:
                domain = normalize_domain(raw_domain)
            except ValueError:
                return Reply(501, "5.1.3", "Bad recipient address syntax")
        else:
            local, domain = path.address, ""
        rcpt = Recipient(path=path, local=local, domain=domain, notify=notify, orcpt=orcpt)
        same = (local.lower(), domain)
        if any((r.local.lower(), r.domain) == same for r in txn.recipients):
            return RECIPIENT_OK  # RFC 5321 §3.3: a duplicate is accepted once
        refusal = await self.check_recipient(txn, rcpt)
        if refusal is not None:
            return refusal
        txn.recipients.append(rcpt)
        return RECIPIENT_OK

    async def smtp_data(self, arg: str) -> Reply | None:
        txn = self.transaction
        assert txn is not None  # Needs.TRANSACTION
        if arg:
            return R.BAD_ARGUMENTS
        if self._chunks is not None:
            # RFC 3030 §2: 503, and the state is "indeterminate": the chunks
            # go, and the transaction with them (MAIL may follow at once).
            self._bdat_error()
            return DATA_AFTER_BDAT
        if not txn.recipients:
            return NO_VALID_RECIPIENTS
        await self.send(R.START_DATA)
        body = self._incoming_body(txn)
        try:
            header = self.trace_header(txn)
            body.write(header)
            reader = DataReader(self.limits.max_message_size, self.limits.max_line_length)
            self.in_data = True  # stays set if the read raises: the session ends
            await self.conn.read_data(reader, body.write, self.limits.data_timeout,
                                      deadline=self._new_deadline())
            self.in_data = False
            return await self._end_of_message(txn, body, reader.checks, "DATA",
                                              header_ready=in_wire_form(header))
        finally:
            await body.close()

    async def smtp_bdat(self, arg: str) -> Reply | None:
        """RFC 3030 §2: ``BDAT <size> [LAST]`` and its octets.  One reply per
        chunk: 250 for a chunk taken, and for the LAST one what DATA's dot
        gets.  Every chunk's octets are read, refused or not; after an error
        reply the transaction is over (a later BDAT: 503, octets dropped;
        MAIL works at once).  An argument that is not a size leaves the rest
        of the stream unframed: 501, then 421 and close (Postfix hangs up
        with one 521 there; RFC 5321 §3.8 closes after a 421)."""
        if not self.offer_chunking:
            return R.NOT_IMPLEMENTED  # the machine's reply to a verb not taken
        try:
            chunk = parse_bdat(arg)
        except ValueError:
            return await self._unframed(f"BDAT {arg[:40]}")
        txn = self.transaction
        refusal = (BDAT_AFTER_ERROR if self._bdat_failed and txn is None
                   else BDAT_NEED_MAIL if txn is None
                   else BDAT_NO_RECIPIENTS if not txn.recipients
                   else None)
        chunks = self._chunks
        if refusal is None and txn is not None:
            so_far = chunks.reader.checks.size if chunks is not None else 0
            if so_far + chunk.size > self.limits.max_message_size:
                refusal = self.reject(MESSAGE_TOO_BIG, "message_size", stage="BDAT",
                                      sender=txn.sender.address,
                                      recipients=[r.path.address for r in txn.recipients])
        if refusal is not None:
            if chunk.size > _discard_limit(self.limits.max_message_size):
                # Not worth reading to throw away (Postfix stops at 1.5 times
                # its limit too): the refusal, then 421 and close.
                self.log.warning("%s: refused BDAT chunk of %d octets from %s; closing",
                                 self.session_id, chunk.size, self.peer_description())
                self.reset_transaction()
                await self.reply(refusal)
                return None if self.machine.closing else BDAT_TOO_BIG_TO_SKIP
            deadline = chunks.deadline if chunks is not None else self._new_deadline()
            await self.conn.read_chunk(chunk.size, _drop, self.limits.data_timeout,
                                       deadline=deadline)
            if txn is not None:
                self._bdat_error()
            return refusal
        assert txn is not None
        if chunks is None:
            chunks = self._chunks = _Chunks(
                ChunkReader(self.limits.max_message_size, self.limits.max_line_length),
                self._incoming_body(txn), self._new_deadline())
            chunks.body.write(self.trace_header(txn))
            self.in_data = True  # until the LAST chunk or the transaction's end
        return await self._read_chunk(txn, chunks, chunk)

    async def _read_chunk(self, txn: Transaction, chunks: _Chunks, chunk: Bdat) -> Reply:
        reader, body = chunks.reader, chunks.body

        def sink(data: bytes) -> None:
            content = reader.feed(data)
            if content:
                body.write(content)

        # Raising (the peer gone, a timeout) leaves the chunks to `run()`.
        await self.conn.read_chunk(chunk.size, sink, self.limits.data_timeout,
                                   deadline=chunks.deadline)
        if not chunk.last and not reader.refused:
            return chunk_received(chunk.size)
        self._chunks = None
        self.in_data = False
        try:
            if not chunk.last:  # refused already: say so now (RFC 3030 §2 allows it)
                self._bdat_error()
                reply = _refusal(reader.checks)
                assert reply is not None
                return self.reject(reply[0], reply[1], stage="BDAT",
                                   sender=txn.sender.address,
                                   recipients=[r.path.address for r in txn.recipients])
            body.write(reader.finish())
            return await self._end_of_message(txn, body, reader.checks, "BDAT")
        finally:
            await body.close()

    async def _end_of_message(self, txn: Transaction, body: IncomingBody,
                              checks: ContentChecks, stage: str, *,
                              header_ready: bool = False) -> Reply:
        """The reply to a message's end (the final dot, BDAT LAST): its
        refusal, or `accept_message`'s, as the message is stored or not.
        `header_ready`: the trace header in front of the content is in wire
        form (`in_wire_form`)."""
        self._close_transaction()  # it ends with the data, whatever follows
        refusal = _refusal(checks)
        if refusal is not None:
            return self.reject(refusal[0], refusal[1], stage=stage, sender=txn.sender.address,
                               recipients=[r.path.address for r in txn.recipients])
        # No bare CR or LF (else refused above) and no line-leading dot in the
        # content, behind a trace header in the same form.
        txn.wire_ready = header_ready and not checks.leading_dots
        if not self.conn.can_reply:
            # The 250 could no longer reach the peer (TLS after its EOF):
            # storing the message would make the client's retry a
            # duplicate.  It keeps the message; we keep nothing.
            self.log.info("%s: %s closed before the end-of-data reply; message not "
                          "stored", self.session_id, self.peer_description())
            raise ConnectionClosed("peer closed before the end-of-data reply")
        spool, size = await body.ready()
        reply = await self.accept_message(txn, spool, size)
        if reply.is_positive:
            body.stored = True
            self.machine.delivered()  # errors count only "without delivering mail"
        return reply

    def _incoming_body(self, txn: Transaction) -> IncomingBody:
        return IncomingBody(lambda spool: self.body_stage(txn, spool),
                            session_id=self.session_id, logger=self.log)

    def _new_deadline(self) -> float | None:
        if self.limits.data_deadline is None:
            return None
        return asyncio.get_running_loop().time() + self.limits.data_deadline

    def _drop_chunks(self) -> None:
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            chunks.body.abandon()
            self.in_data = False

    def _bdat_error(self) -> None:
        """An error reply to a BDAT ends its transaction (RFC 3030 §2: the
        client sends no more chunks of it; those already pipelined get 503)."""
        self.reset_transaction()
        self._bdat_failed = True

    async def _unframed(self, what: str) -> Reply | None:
        """A BDAT line whose chunk size is unknown: what follows can no longer
        be told from commands (RFC 3030 §2 warns of reading a chunk as
        commands).  501 for the line, then 421 and close."""
        self.log.warning("%s: malformed BDAT from %s: %r; closing", self.session_id,
                         self.peer_description(), what)
        self.reset_transaction()
        await self.reply(BDAT_SYNTAX)
        return None if self.machine.closing else BDAT_UNFRAMED

    async def refused_line(self, line: bytes, reply: Reply) -> Reply | None:
        if self.offer_chunking and _BDAT_LINE.match(line):
            # A BDAT line the parser refused (a NUL, 8-bit bytes, or over
            # 512 octets: `line` is then its head): its chunk follows all
            # the same, and its size cannot be trusted.
            return await self._unframed(line[:40].decode("ascii", "replace"))
        return reply

    def trace_header(self, txn: Transaction) -> bytes:
        tls_info = None
        if self.conn.tls_active:
            tls_info = f"using {self.conn.tls_version} with cipher {self.conn.tls_cipher}"
        only = txn.recipients[0].path.address if len(txn.recipients) == 1 else None
        return received_header(
            helo=self.helo_name,
            peer_ip=self.conn.peer_ip,
            by=self.hostname,
            protocol=self.received_protocol(),
            tls_info=tls_info,
            queue_id=txn.queue_id,
            for_recipient=only,
        )

    VERBS: ClassVar[Mapping[str, VerbSpec]] = verb_table(
        VerbSpec("MAIL", "smtp_mail", Needs.HELO | Needs.NO_TRANSACTION,
                 sequence_reply=NESTED_MAIL),
        VerbSpec("RCPT", "smtp_rcpt", Needs.TRANSACTION),
        VerbSpec("DATA", "smtp_data", Needs.TRANSACTION),
        # No needs: a refused BDAT's octets must still be read (`smtp_bdat`).
        VerbSpec("BDAT", "smtp_bdat"),
        base=ServerSession.VERBS,
    )


def _discard_limit(max_message_size: int) -> int:
    """The largest refused chunk read to find the next command."""
    return max_message_size + max_message_size // 2 + 1024 * 1024


def _drop(data: bytes) -> None:
    """The sink of a refused chunk's octets."""


def _refusal(checks: ContentChecks) -> tuple[Reply, str] | None:
    """The reply and reject reason for content `checks` refuse, or None."""
    return ((MESSAGE_TOO_BIG, "message_size") if checks.too_big
            else (BARE_LINE_ENDING, "smuggling") if checks.bare_line_ending
            else (DATA_LINE_TOO_LONG, "other") if checks.line_too_long
            else None)


def _valid_xtext(value: str | None, limit: int) -> bool:
    """RFC 3461 §4: printable ASCII without "+" and "=" except as "+XX"."""
    if not value or len(value) > limit:
        return False
    try:
        xtext_decode(value)
    except ValueError:
        return False
    return all(33 <= ord(c) <= 126 and c != "=" for c in value)


def _parse_notify(value: str | None) -> str | None:
    """RFC 3461 §4.1: NEVER alone, or a list of SUCCESS, FAILURE, DELAY."""
    if not value:
        return None
    items = value.upper().split(",")
    if items == ["NEVER"]:
        return "NEVER"
    if len(set(items)) != len(items) or not set(items) <= {"SUCCESS", "FAILURE", "DELAY"}:
        return None
    return ",".join(items)
