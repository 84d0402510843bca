"""Delivery status notifications (RFC 3464 multipart/report, RFC 3461 rules).

Contract:
- `build_dsn(store, ...)` is the one builder: it returns the DSN to queue for
  the sender of `message` about `reports` (one per recipient) with one
  `Action` (failed, delayed, delivered, relayed), or None when no DSN may
  be sent:
  * never to the null reverse-path `<>` (RFC 5321 §4.5.5: no bounce loops);
  * only for recipients whose NOTIFY asks for it (RFC 3461 §4.1): NEVER gets
    nothing; FAILURE a failed DSN, DELAY a delayed one, SUCCESS a delivered
    or relayed one.  Without NOTIFY we act as for ``FAILURE,DELAY`` (the
    MTA's choice, §4.1, the same as Postfix): failures and delay notices,
    no success notices.
- The DSN is `multipart/report; report-type=delivery-status` from
  ``MAILER-DAEMON@<hostname>``, sent with the null reverse-path: a
  human-readable part; a `message/delivery-status` part with Reporting-MTA,
  X-Fermoposta-Queue-ID, Original-Envelope-Id (the ENVID, xtext-decoded),
  Arrival-Date, and per recipient Original-Recipient (ORCPT, decoded),
  Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code (``smtp;``
  with the remote reply, or ``X-Fermoposta;`` with our own reason when no
  server answered), Last-Attempt-Date and, for delays, Will-Retry-Until;
  then the original:
  * RET=FULL, failed DSN, original up to `FULL_LIMIT` (10 MiB): the whole
    message as `message/rfc822`;
  * otherwise (RET=HDRS, no RET, a delay or success notice, which never
    carries content (RFC 3461 §4.3), or a FULL original over the limit):
    its header section (at most `HEADER_LIMIT`) as `text/rfc822-headers`.
  A message sent with SMTPUTF8 gets the RFC 6533 types instead
  (`message/global-delivery-status`, `message/global-headers`,
  `message/global`) and ``utf-8;`` addresses.
- 8-bit only when needed: the DSN is flagged `body_8bit` only if a byte
  above 127 was written (UTF-8 text or an 8-bit original), so it reaches a
  next hop without 8BITMIME whenever it can.
- Its recipient is HELD when the sender's domain is one we host (the customer
  collects it at its next ATRN), else OUTBOUND (`sender_domain_hosted`).
- Memory stays bounded: the DSN is written to a spooled temporary file (in
  memory up to 1 MiB) and the original is streamed from the store in chunks.
  `build_dsn` reads the store: asyncio callers run it in a worker thread.
  `build_failure_dsn` (failed DSN from given header bytes) does no I/O.
- Text from remote servers is cleaned of control characters (and of
  non-ASCII unless the DSN is SMTPUTF8) so it cannot forge header lines.
"""

from __future__ import annotations

import enum
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from typing import IO, cast

import idna

from fermoposta.smtp.command import xtext_decode
from fermoposta.smtp.reply import Reply
from fermoposta.store.base import (
    MessageOrigin,
    MessageQueue,
    NewMessage,
    NewRecipient,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
)

__all__ = [
    "FULL_LIMIT",
    "HEADER_LIMIT",
    "Action",
    "RecipientReport",
    "build_dsn",
    "build_failure_dsn",
    "read_headers",
    "wants_notice",
]

HEADER_LIMIT = 64 * 1024
FULL_LIMIT = 10 * 1024 * 1024
_SPOOL = 1024 * 1024


class Action(enum.StrEnum):
    """RFC 3464 §2.3.3 Action values we report."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"


# The NOTIFY keyword that asks for each action (RFC 3461 §4.1).
_NOTIFY_KEYWORD = {
    Action.FAILED: "FAILURE",
    Action.DELAYED: "DELAY",
    Action.DELIVERED: "SUCCESS",
    Action.RELAYED: "SUCCESS",
}
_DEFAULT_NOTIFY = frozenset({"FAILURE", "DELAY"})

_SUBJECTS = {
    Action.FAILED: "Undelivered Mail Returned to Sender",
    Action.DELAYED: "Delayed Mail (still being retried)",
    Action.DELIVERED: "Successful Mail Delivery Report",
    Action.RELAYED: "Successful Mail Delivery Report",
}


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What happened to one recipient.

    `status` is the RFC 3463 code reported (e.g. "5.1.1", "4.4.7").
    `reply` is the remote server's reply (Diagnostic-Code ``smtp;``);
    without one, `diagnostic` is our own reason (``X-Fermoposta;``).
    `remote_mta` is the name of the server that gave `reply`, if any.
    """

    recipient: QueuedRecipient
    status: str
    reply: Reply | None = None
    remote_mta: str | None = None
    diagnostic: str | None = None

    @property
    def reason(self) -> str:
        if self.reply is not None:
            return str(self.reply)
        return self.diagnostic or self.status


def wants_notice(rcpt: QueuedRecipient, action: Action) -> bool:
    """Whether `rcpt`'s NOTIFY (RFC 3461 §4.1) asks for a DSN with `action`."""
    if rcpt.notify is None or not rcpt.notify.strip():
        keywords = _DEFAULT_NOTIFY
    else:
        keywords = frozenset(k.strip().upper() for k in rcpt.notify.split(","))
    if "NEVER" in keywords:
        return False
    return _NOTIFY_KEYWORD[action] in keywords


def read_headers(store: MessageQueue, message_id: str, limit: int = HEADER_LIMIT) -> bytes:
    """The header section of a stored message (at most `limit` bytes, ending
    at a line end), with the CRLF that ends its last header line."""
    return _headers_of(store.read_body(message_id), limit)


def _headers_of(chunks: Iterable[bytes], limit: int) -> bytes:
    data = b""
    for chunk in chunks:
        data += chunk
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[: end + 2]
        if len(data) >= limit:
            break
    data = data[:limit]
    cut = data.rfind(b"\r\n")
    return data[: cut + 2] if cut >= 0 else b""


# --- helpers --------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _clean(text: str, utf8: bool) -> str:
    text = _CONTROL.sub(" ", text).strip()
    if not utf8:
        text = text.encode("ascii", "replace").decode("ascii")
    return text


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, tz=UTC))


def _decode(value: str) -> str:
    try:
        return xtext_decode(value)
    except ValueError:
        return value


def _field(name: str, value: str) -> str:
    """One header field, folded at spaces so lines stay short (RFC 5322 §2.2.3)."""
    words = value.split(" ")
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if len(line) + 1 + len(word) > 76 and line.strip() and line != f"{name}:":
            lines.append(line)
            line = " " + word  # continuation line
        else:
            line += " " + word
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _address_type(address: str) -> str:
    """RFC 3464 address field: rfc822, or utf-8 for a non-ASCII one (RFC 6533)."""
    return f"utf-8; {address}" if not address.isascii() else f"rfc822; {address}"


def _domain_of(address: str) -> str:
    domain = address.rsplit("@", 1)[-1] if "@" in address else ""
    if domain.startswith("["):
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower() if domain else ""
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain.lower()


class _Writer:
    """A spooled temporary file that remembers whether it got 8-bit bytes."""

    def __init__(self) -> None:
        # Handed to the caller (the store reads and closes it): no `with`.
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL, mode="w+b")  # noqa: SIM115
        self.file: IO[bytes] = cast(IO[bytes], spool)
        self.eight_bit = False

    def write(self, data: bytes) -> None:
        if not self.eight_bit and not data.isascii():
            self.eight_bit = True
        self.file.write(data)

    def text(self, data: str) -> None:
        self.write(data.encode("utf-8"))


# --- the builder ----------------------------------------------------------------------------


def build_dsn(
    store: MessageQueue,
    *,
    hostname: str,
    message: QueuedMessage,
    action: Action,
    reports: Sequence[RecipientReport],
    sender_domain_hosted: bool,
    now: float | None = None,
    will_retry_until: float | None = None,
) -> tuple[NewMessage, IO[bytes]] | None:
    """The DSN for `reports` (see the module docstring), reading the original
    from `store`; None if none may be sent."""
    if not message.sender:
        return None
    reports = [r for r in reports if wants_notice(r.recipient, action)]
    if not reports:
        return None
    full = (action == Action.FAILED and (message.ret or "").upper() == "FULL"
            and message.size <= FULL_LIMIT)
    if full:
        return _compose(hostname, message, action, reports, sender_domain_hosted,
                        now, will_retry_until, original=store.read_body(message.id), full=True)
    headers = read_headers(store, message.id)
    return _compose(hostname, message, action, reports, sender_domain_hosted, now,
                    will_retry_until, original=iter((headers,)), full=False)


def build_failure_dsn(
    *,
    hostname: str,
    message: QueuedMessage,
    failures: Sequence[tuple[QueuedRecipient, Reply]],
    headers: bytes,
    remote_mta: str | None,
    sender_domain_hosted: bool,
    now: float | None = None,
) -> tuple[NewMessage, IO[bytes]] | None:
    """A failed DSN for remote 5xx `failures`, with the given original
    `headers` (RET is not honoured here; `build_dsn` does).  No I/O."""
    if not message.sender:
        return None
    reports = [
        RecipientReport(rcpt, reply.enhanced or f"{reply.code // 100}.0.0", reply, remote_mta)
        for rcpt, reply in failures
        if wants_notice(rcpt, Action.FAILED)
    ]
    if not reports:
        return None
    return _compose(hostname, message, Action.FAILED, reports, sender_domain_hosted, now, None,
                    original=iter((headers,)), full=False)


def _human_text(hostname: str, message: QueuedMessage, action: Action,
                reports: Sequence[RecipientReport], now: float, will_retry_until: float | None,
                utf8: bool) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if action == Action.FAILED:
        lines += ["I'm sorry to have to inform you that your message could not",
                  "be delivered to one or more recipients. It's attached below.", "",
                  "The mail system"]
    elif action == Action.DELAYED:
        waited = max(0.0, now - message.received_at) / 3600
        lines += ["#### THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. ####",
                  "",
                  f"Your message could not be delivered for {waited:.1f} hour(s)."]
        if will_retry_until is not None:
            lines.append(f"It will be retried until {_date(will_retry_until)}.")
        lines += ["", "The mail system"]
    else:
        lines += ["Your message was successfully delivered to the destination(s)",
                  "listed below. If the message was delivered to a mailbox you will",
                  "receive no further notifications. Otherwise you may still receive",
                  "notifications of mail delivery errors from other systems.", "",
                  "The mail system"]
    lines.append("")
    for report in reports:
        lines.append(_clean(f"<{report.recipient.address}>: {report.reason}", utf8))
    lines.append("")
    lines.append(f"Queue id: {message.id}")
    return "\r\n".join(lines) + "\r\n"


def _compose(
    hostname: str,
    message: QueuedMessage,
    action: Action,
    reports: Sequence[RecipientReport],
    sender_domain_hosted: bool,
    now: float | None,
    will_retry_until: float | None,
    *,
    original: Iterator[bytes],
    full: bool,
) -> tuple[NewMessage, IO[bytes]]:
    when = time.time() if now is None else now
    utf8 = message.smtputf8
    boundary = f"{message.id}.{secrets.token_hex(12)}/{hostname}"
    out = _Writer()

    out.text(f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n")
    out.text(f"To: <{message.sender}>\r\n")
    out.text(f"Subject: {_SUBJECTS[action]}\r\n")
    out.text(f"Date: {_date(when)}\r\n")
    out.text(f"Message-ID: {make_msgid(domain=hostname)}\r\n")
    out.text("Auto-Submitted: auto-replied\r\n")  # RFC 3834 §5
    out.text("MIME-Version: 1.0\r\n")
    out.text('Content-Type: multipart/report; report-type=delivery-status;\r\n'
             f' boundary="{boundary}"\r\n')
    out.text("\r\nThis is a MIME-encapsulated message.\r\n\r\n")

    # 1. The human-readable part.
    human = _human_text(hostname, message, action, reports, when, will_retry_until, utf8)
    out.text(f"--{boundary}\r\nContent-Description: Notification\r\n")
    if human.isascii():
        out.text("Content-Type: text/plain; charset=us-ascii\r\n\r\n")
    else:
        out.text("Content-Type: text/plain; charset=utf-8\r\n"
                 "Content-Transfer-Encoding: 8bit\r\n\r\n")
    out.text(human)

    # 2. The machine-readable part (RFC 3464 §2).
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    out.text(f"\r\n--{boundary}\r\nContent-Description: Delivery report\r\n"
             f"Content-Type: {status_type}\r\n")
    if utf8:
        out.text("Content-Transfer-Encoding: 8bit\r\n")
    out.text("\r\n")
    out.text(_field("Reporting-MTA", f"dns; {hostname}"))
    out.text(_field("X-Fermoposta-Queue-ID", message.id))
    out.text(_field("X-Fermoposta-Sender", _address_type(message.sender)))
    if message.envid:
        out.text(_field("Original-Envelope-Id", _clean(_decode(message.envid), utf8)))
    out.text(_field("Arrival-Date", _date(message.received_at)))
    for report in reports:
        rcpt = report.recipient
        out.text("\r\n")
        if rcpt.orcpt:
            addr_type, _, addr = rcpt.orcpt.partition(";")
            value = f"{addr_type.strip()}; {_decode(addr)}" if addr else rcpt.orcpt
            out.text(_field("Original-Recipient", _clean(value, utf8)))
        out.text(_field("Final-Recipient", _address_type(rcpt.address)))
        out.text(_field("Action", str(action)))
        out.text(_field("Status", report.status))
        if report.remote_mta:
            out.text(_field("Remote-MTA", f"dns; {_clean(report.remote_mta, utf8)}"))
        if report.reply is not None:
            out.text(_field("Diagnostic-Code", f"smtp; {_clean(str(report.reply), utf8)}"))
        elif report.diagnostic:
            out.text(_field("Diagnostic-Code", f"X-Fermoposta; {_clean(report.diagnostic, utf8)}"))
        if action != Action.DELIVERED:
            out.text(_field("Last-Attempt-Date", _date(when)))
        if action == Action.DELAYED and will_retry_until is not None:
            out.text(_field("Will-Retry-Until", _date(will_retry_until)))

    # 3. The original: the whole message or its headers.
    if full:
        kind = "message/global" if utf8 else "message/rfc822"
        out.text(f"\r\n--{boundary}\r\nContent-Description: Undelivered Message\r\n"
                 f"Content-Type: {kind}\r\n")
        if message.body_8bit or utf8:
            out.text("Content-Transfer-Encoding: 8bit\r\n")
        out.text("\r\n")
    else:
        kind = "message/global-headers" if utf8 else "text/rfc822-headers"
        description = ("Undelivered Message Headers" if action == Action.FAILED
                       else "Message Headers")
        out.text(f"\r\n--{boundary}\r\nContent-Description: {description}\r\n"
                 f"Content-Type: {kind}\r\n")
        out.text("\r\n")
    tail = b"\r\n"
    for chunk in original:
        if chunk:
            out.write(chunk)
            tail = chunk[-2:]
    if tail != b"\r\n":
        out.write(b"\r\n")
    out.text(f"\r\n--{boundary}--\r\n")

    out.file.seek(0)
    notice = NewMessage(
        sender="",
        recipients=(
            NewRecipient(
                address=message.sender,
                domain=_domain_of(message.sender),
                state=RecipientState.HELD if sender_domain_hosted else RecipientState.OUTBOUND,
            ),
        ),
        origin=MessageOrigin.DSN,
        smtputf8=utf8 and not message.sender.isascii(),
        body_8bit=out.eight_bit,
        client=f"dsn-for-{message.id}",
    )
    return notice, out.file
