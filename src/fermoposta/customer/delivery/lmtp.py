"""Local delivery over LMTP (RFC 2033), e.g. to Dovecot's `lmtp` service.

Contract:
- `LMTPDelivery(address, hostname=...)`: `address` is the path of a unix
  socket (`Path`) or a `(host, port)` pair.  The dialogue, timeouts and reply
  mapping are those of `RelayingDelivery` (smtp.py), with LHLO instead of
  EHLO.
- `max_recipients = 1`.  An LMTP server answers the final dot once per
  accepted recipient; with one recipient per transaction that single reply is
  exactly the DATA reply we give the provider, so a recipient the server
  refuses (at RCPT or after DATA) gets its own reply mirrored (a 550 stays a
  550 and the provider bounces it) while every other recipient, delivered in
  its own transaction, is delivered exactly once.
- `check_recipient()` accepts; the LMTP server validates at delivery.
- SIZE=, BODY=8BITMIME and SMTPUTF8 are passed only when the server offers
  them; otherwise the message is offered without them (final delivery into a
  mailbox: the server decides, and its refusal is mirrored).
- The server down (no socket, connection refused, timeout, no 220, LHLO
  refused): 451 4.4.1 "local delivery unavailable", nothing written.  The
  connection lost after the final dot: 451 4.4.2 (the provider keeps the
  mail; a duplicate is possible, a loss is not).
- One connection per message, closed with QUIT.
"""

from __future__ import annotations

from pathlib import Path

from fermoposta.customer.delivery.smtp import RelayingDelivery

__all__ = ["LMTPDelivery"]


class LMTPDelivery(RelayingDelivery):
    """Hand each message to an LMTP server; see the module docstring."""

    name = "lmtp"

    def __init__(
        self,
        address: Path | tuple[str, int],
        *,
        hostname: str,
        connect_timeout: float = 30.0,
        command_timeout: float = 120.0,
        data_timeout: float = 180.0,
        final_timeout: float = 300.0,
    ) -> None:
        super().__init__(address, hostname=hostname, lmtp=True,
                         connect_timeout=connect_timeout, command_timeout=command_timeout,
                         data_timeout=data_timeout, final_timeout=final_timeout)
