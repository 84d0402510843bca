"""The local delivery interface of the customer (two-phase, never lossy).

Contract:
- The reversed session calls `check_recipient()` at RCPT time (to refuse an
  unknown user with 550 5.1.1 before the provider sends the message; the
  provider then sends the sender a DSN) and `deliver()` once the whole message
  is spooled.  `deliver()` returns the reply to give the provider for the
  final dot: 2xx ONLY after the message is committed (Maildir: tmp, fsync,
  rename to new, fsync of the directory) or accepted by the next hop (LMTP or
  SMTP 250).  Anything else must be a 4xx (temporary: the mail stays held at
  the provider) or a 5xx (permanent: the provider bounces it).
- A backend whose next hop answers per recipient (LMTP) sets
  `max_recipients = 1`: the session then answers 452 4.5.3 to further
  recipients, the provider sends them in separate transactions (RFC 5321
  §4.5.3.1.10), and each DATA reply is exactly one recipient's outcome: no
  recipient is ever lost or delivered twice because another one failed.
- When the local target is down or fails, the reply is 4xx; a bug (an
  unexpected exception) is mapped to 4xx by the caller.
- `body` is a binary file positioned at 0 holding the complete message
  (trace header included) with CRLF line endings; backends stream it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Protocol

from fermoposta.smtp.reply import Reply


@dataclass(frozen=True, slots=True)
class LocalRecipient:
    address: str  # as the provider sent it
    local: str
    domain: str  # lowercase A-label


@dataclass(frozen=True, slots=True)
class LocalEnvelope:
    sender: str  # "" for the null reverse-path
    recipients: tuple[LocalRecipient, ...]
    smtputf8: bool = False
    body_8bit: bool = False
    queue_hint: str = ""  # the provider's queue id when known, for logs


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """What happened, for the session log and the `pull` summary."""

    reply: Reply
    where: str  # e.g. "maildir:/var/mail/example.org/bob/Maildir/new/..." or "lmtp:/run/lmtp"


class Delivery(Protocol):
    name: str
    max_recipients: int | None  # None = no limit per transaction

    async def check_recipient(self, rcpt: LocalRecipient) -> Reply | None:
        """None to accept; a 5xx (unknown user) or 4xx (cannot check now) to refuse."""
        ...

    async def deliver(self, envelope: LocalEnvelope, body: IO[bytes], size: int
                      ) -> DeliveryOutcome:
        ...

    async def close(self) -> None: ...
