"""Delivery status notifications (RFC 3464 multipart/report, RFC 3461 rules).

Contract:
- `build_failure_dsn()` returns the DSN to queue for the sender of a message
  whose recipients failed permanently, or None when no DSN may be sent: the
  null reverse-path `<>` never gets one (RFC 5321 §4.5.5, no bounce loops),
  nor a recipient whose NOTIFY excludes FAILURE (RFC 3461 §4.1).
- The DSN is `multipart/report; report-type=delivery-status` from
  MAILER-DAEMON@<hostname> with the null reverse-path, a human-readable
  part, a `message/delivery-status` part (Reporting-MTA, Arrival-Date,
  Original-Envelope-Id; per recipient Final-Recipient, Original-Recipient,
  Action: failed, Status, Remote-MTA, Diagnostic-Code with the remote reply)
  and the original headers (`text/rfc822-headers`).
- Its recipient is HELD when the sender's domain is one we host (it then
  travels to the customer at its next ATRN), else OUTBOUND.
- Pure: no I/O except `read_headers`, which reads a bounded prefix of a body.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from email.generator import BytesGenerator
from email.message import Message
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import IO

from fermoposta.smtp.command import xtext_decode
from fermoposta.smtp.reply import Reply
from fermoposta.store.base import (
    MessageOrigin,
    NewMessage,
    NewRecipient,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    Store,
)

HEADER_LIMIT = 64 * 1024


def read_headers(store: Store, message_id: str, limit: int = HEADER_LIMIT) -> bytes:
    """The header section of a stored message (at most `limit` bytes)."""
    data = b""
    for chunk in store.read_body(message_id):
        data += chunk
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[: end + 2]
        if len(data) >= limit:
            break
    return data[:limit]


def _rfc822_date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, tz=UTC))


def _wants_failure_notice(rcpt: QueuedRecipient) -> bool:
    if rcpt.notify is None:
        return True
    return "FAILURE" in rcpt.notify.upper().split(",")


def _fields(pairs: Sequence[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in pairs:
        block[name] = value
    return block


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
    if not message.sender:
        return None
    failures = [(r, reply) for r, reply in failures if _wants_failure_notice(r)]
    if not failures:
        return None
    when = time.time() if now is None else now

    report = Message()
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = f"<{message.sender}>"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = _rfc822_date(when)
    report["Message-ID"] = make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834 §5
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report; report-type=delivery-status"

    human = Message()
    human["Content-Type"] = "text/plain; charset=utf-8"
    human["Content-Transfer-Encoding"] = "8bit"
    lines = [
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        f"Queue id: {message.id}",
        "",
    ]
    lines += [f"<{r.address}>: {reply}" for r, reply in failures]
    human.set_payload(("\n".join(lines) + "\n").encode("utf-8"), "utf-8")
    human.replace_header("Content-Transfer-Encoding", "8bit")

    per_message = [("Reporting-MTA", f"dns; {hostname}")]
    if message.envid:
        per_message.append(("Original-Envelope-Id", _decode(message.envid)))
    per_message.append(("Arrival-Date", _rfc822_date(message.received_at)))
    blocks = [_fields(per_message)]
    for rcpt, reply in failures:
        per_rcpt = []
        if rcpt.orcpt:
            per_rcpt.append(("Original-Recipient", _decode_orcpt(rcpt.orcpt)))
        per_rcpt += [
            ("Final-Recipient", f"rfc822; {rcpt.address}"),
            ("Action", "failed"),
            ("Status", reply.enhanced or f"{reply.code // 100}.0.0"),
        ]
        if remote_mta:
            per_rcpt.append(("Remote-MTA", f"dns; {remote_mta}"))
        per_rcpt.append(("Diagnostic-Code", f"smtp; {reply.code} {reply.text}"))
        blocks.append(_fields(per_rcpt))
    status = Message()
    status["Content-Type"] = "message/delivery-status"
    status.set_payload(list[Message | str](blocks))

    original = Message()
    original["Content-Type"] = "text/rfc822-headers"
    original["Content-Transfer-Encoding"] = "8bit"
    original.set_payload(headers.decode("utf-8", "replace").replace("\r\n", "\n"))

    report.set_payload([human, status, original])
    buffer = io.BytesIO()
    BytesGenerator(buffer, policy=SMTP).flatten(report)  # type: ignore[arg-type]
    # 8BITMIME only when needed (UTF-8 text or original headers), so a DSN
    # reaches a next hop without 8BITMIME whenever it can.
    eight_bit = max(buffer.getvalue(), default=0) > 127
    buffer.seek(0)

    domain = message.sender.rsplit("@", 1)[-1].lower() if "@" in message.sender else ""
    notice = NewMessage(
        sender="",
        recipients=(
            NewRecipient(
                address=message.sender,
                domain=domain,
                state=RecipientState.HELD if sender_domain_hosted else RecipientState.OUTBOUND,
            ),
        ),
        origin=MessageOrigin.DSN,
        smtputf8=message.smtputf8,
        body_8bit=eight_bit,
        client=f"dsn-for-{message.id}",
    )
    return notice, buffer


def _decode(value: str) -> str:
    try:
        return xtext_decode(value)
    except ValueError:
        return value


def _decode_orcpt(orcpt: str) -> str:
    addr_type, _, addr = orcpt.partition(";")
    return f"{addr_type}; {_decode(addr)}" if addr else orcpt
