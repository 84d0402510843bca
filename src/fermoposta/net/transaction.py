"""The SMTP mail transaction: MAIL, RCPT, DATA (RFC 5321 §3.3, §4.1.1.2–4).

Contract:
- `TransactionSession` adds MAIL/RCPT/DATA to `ServerSession` with the
  checks every receiving role needs (sequence, parameters of the advertised
  extensions only: SIZE RFC 1870, BODY=8BITMIME RFC 6152, SMTPUTF8 RFC 6531;
  recipient count limit 452 4.5.3; duplicate RCPT accepted once) and leaves
  policy to three hooks: `check_sender`, `check_recipient`, `accept_message`.
- DATA streams into a spooled temporary file (bounded memory) behind a
  `Received:` header; the size limit is enforced while streaming (552 after
  the end of data), only CRLF.CRLF ends the data, and a message with a bare
  CR or LF is refused (SMTP smuggling, RFC 5321 §2.3.8).
- A body that outgrows `SPOOL_MEMORY` is also handed to `body_stage(txn)`
  while it arrives (`body_stager`), when the receiver offers one (the MX
  and submission, on SQLite): the enqueue after the final dot then stores
  only the rest.  A message not stored (refused, dropped, failed) has what
  was staged discarded.
- `accept_message` must return 250 only once the message is durably stored
  (or delivered); the peer hears nothing before it returns.
- A peer whose EOF arrived with its final dot over TLS, where the 250 can
  no longer be written, gets nothing stored: it keeps the message and
  retries (plain TCP peers that half-close do get their 250).
- A dropped connection mid-DATA discards the partial message (§3.8), and
  so does an expired deadline: `limits.data_deadline` bounds one message's
  whole DATA (the per-read `data_timeout` alone lets a slow drip last
  forever); the session then answers 421 4.4.2 and closes.
- Every refusal of a MAIL, RCPT or message goes through `reject()`: one
  Postfix-like ``NOQUEUE: reject: RCPT from ...`` line (or the caller's own
  text) whose JSON form carries ``reason``, ``client``, ``sender`` and
  ``recipient`` keys (plus ``stage``, ``listener``, ``reply``, ``helo``),
  and one count in `fermoposta_smtp_rejects_total{listener, reason}`.
  Syntax errors (501, 555) and sequence errors are not rejects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, ClassVar

from fermoposta.net.body_stager import Stager
from fermoposta.net.connection import Connection, ConnectionClosed
from fermoposta.net.server_session import ServerSession, SessionLimits
from fermoposta.ops import metrics
from fermoposta.smtp import reply as R
from fermoposta.smtp.command import (
    NEEDS_SMTPUTF8,
    Path,
    normalize_domain,
    parse_mail_from,
    parse_rcpt_to,
    split_address,
    xtext_decode,
)
from fermoposta.smtp.data import DataReader
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.server import NESTED_MAIL, Needs, VerbSpec, verb_table
from fermoposta.smtp.trace import protocol_name, received_header
from fermoposta.store.base import BodyStage

SPOOL_MEMORY = 1024 * 1024  # bodies above this spill to a temporary file

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


class TransactionSession(ServerSession):
    """A `ServerSession` that receives mail; see the module docstring."""

    # RFC 3461: accept NOTIFY/ORCPT/RET/ENVID (and advertise DSN) where the
    # receiver keeps them and acts on them (the provider's MX and submission).
    dsn_extension: ClassVar[bool] = False

    transaction: Transaction | None = None
    authenticated_as: str | None = None

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
            *super().extensions(),
        ]

    def reset_transaction(self) -> None:
        self.transaction = None

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
        return SENDER_OK

    async def smtp_rcpt(self, arg: str) -> Reply:
        txn = self.transaction
        assert txn is not None  # Needs.TRANSACTION
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
        if not txn.recipients:
            return NO_VALID_RECIPIENTS
        await self.send(R.START_DATA)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115
        stager: Stager | None = None
        staging_tried = False
        stored = False

        def sink(payload: bytes) -> None:
            nonlocal stager, staging_tried
            spool.write(payload)
            if stager is not None:
                stager.written(spool.tell())
            elif not staging_tried and spool.tell() > SPOOL_MEMORY:
                staging_tried = True
                stage = self.body_stage(txn, spool)
                if stage is not None:
                    spool.rollover()
                    try:
                        stager = Stager(spool, stage)
                    except OSError as exc:  # no descriptor left: stored at the end instead
                        self.log.warning("%s: cannot store the body while it arrives: %s",
                                         self.session_id, exc)
                        return
                    stager.written(spool.tell())

        try:
            spool.write(self.trace_header(txn))
            reader = DataReader(self.limits.max_message_size, self.limits.max_line_length)
            deadline = None
            if self.limits.data_deadline is not None:
                deadline = asyncio.get_running_loop().time() + self.limits.data_deadline
            self.in_data = True  # stays set if the read raises: the session ends
            await self.conn.read_data(reader, sink, self.limits.data_timeout,
                                      deadline=deadline)
            self.in_data = False
            self.transaction = None  # the transaction ends with the data, whatever follows
            refusal = (
                (MESSAGE_TOO_BIG, "message_size") if reader.too_big
                else (BARE_LINE_ENDING, "smuggling") if reader.bare_line_ending
                else (DATA_LINE_TOO_LONG, "other") if reader.line_too_long
                else None
            )
            if refusal is not None:
                return self.reject(refusal[0], refusal[1], stage="DATA",
                                   sender=txn.sender.address,
                                   recipients=[r.path.address for r in txn.recipients])
            if not self.conn.can_reply:
                # The 250 could no longer reach the peer (TLS after its EOF):
                # storing the message would make the client's retry a
                # duplicate.  It keeps the message; we keep nothing.
                self.log.info("%s: %s closed before the end-of-data reply; message not "
                              "stored", self.session_id, self.peer_description())
                raise ConnectionClosed("peer closed before the end-of-data reply")
            size = spool.tell()
            if stager is not None:
                await stager.finish()  # the rest is stored by the enqueue
            spool.seek(0)
            reply = await self.accept_message(txn, spool, size)
            if reply.is_positive:
                stored = True
                self.machine.delivered()  # errors count only "without delivering mail"
            return reply
        finally:
            try:
                if stager is not None:
                    stager.close()
                    if not stored:
                        await _discard(stager)
            finally:
                spool.close()  # the stager reads a descriptor of its own

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
        base=ServerSession.VERBS,
    )


async def _discard(stager: Stager) -> None:
    """What was staged for a message not stored goes, once the stager's
    thread has ended (else its first append could make the placeholder after
    the discard).  Shielded: a cancelled session (shutdown) still cleans up;
    the store logs a failure and sweeps what is left at its next start."""
    async def cleanup() -> None:
        await stager.finish()
        await asyncio.to_thread(stager.stage.discard)

    task = asyncio.ensure_future(cleanup())
    task.add_done_callback(_log_cleanup_failure)
    with contextlib.suppress(Exception):  # logged by the callback
        await asyncio.shield(task)


def _log_cleanup_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger("fermoposta.smtp").error(
            "discarding a staged body failed", exc_info=task.exception())


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
