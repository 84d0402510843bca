"""What the parts of the outbound engine share (`provider.outbound`,
`outbound_connect`, `outbound_outcomes`).

Contract:
- `OutboundSettings`: the client timeouts and the queue runner's bounds
  (immutable; `OutboundRunner(settings=...)`).
- `retry_delay(attempts, initial, maximum)`: the wait before the next
  attempt, `initial` doubled per failed attempt up to `maximum`, ±20%.
- `Problem`: why recipients were not delivered, a reply (ours, or the next
  hop's when `remote_mta` is set) and the relay; `report()` makes its DSN
  line.  `reply_status(reply)` is the reply's enhanced status, or X.0.0.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from fermoposta.mail.dsn import RecipientReport
from fermoposta.smtp.reply import Reply
from fermoposta.store.base import QueuedRecipient

__all__ = ["OutboundSettings", "Problem", "reply_status", "retry_delay"]


@dataclass(frozen=True, slots=True)
class OutboundSettings:
    """Client timeouts (RFC 5321 §4.5.3.2) and queue runner bounds."""

    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    command_timeout: float = 300.0  # EHLO, MAIL, RCPT, AUTH, STARTTLS
    data_init_timeout: float = 120.0
    data_block_timeout: float = 180.0
    final_reply_timeout: float = 600.0
    quit_timeout: float = 30.0
    tls_handshake_timeout: float = 60.0
    claim_ttl: float = 900.0  # renewed every third of it while the runner lives
    claim_batch: int = 500  # recipients claimed at once
    max_in_flight: int = 10_000  # recipients claimed and not yet settled
    messages_per_connection: int = 1000


def retry_delay(attempts: int, initial: float, maximum: float,
                rng: Callable[[float, float], float] = random.uniform) -> float:
    """The wait before the next attempt after `attempts` failed ones (0 = the
    first failure): `initial` doubled per attempt, capped at `maximum`, ±20%."""
    base = min(maximum, initial * float(1 << min(attempts, 32)))
    return base * rng(0.8, 1.2)


def reply_status(reply: Reply) -> str:
    return reply.enhanced or f"{reply.code // 100}.0.0"


@dataclass(frozen=True, slots=True)
class Problem:
    """Why recipients were not delivered: a reply (ours or the server's)."""

    reply: Reply
    relay: str = "none"
    remote_mta: str | None = None  # set when `reply` came from that server

    def report(self, rcpt: QueuedRecipient, status: str | None = None) -> RecipientReport:
        if self.remote_mta is not None:
            return RecipientReport(rcpt, status or reply_status(self.reply), self.reply,
                                   self.remote_mta)
        return RecipientReport(rcpt, status or reply_status(self.reply),
                               diagnostic=str(self.reply))
