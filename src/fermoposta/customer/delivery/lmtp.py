"""Local delivery over LMTP (RFC 2033), e.g. to Dovecot's `lmtp` service.

Contract:
- `LMTPDelivery(address, hostname=...)`: `address` is the path of a unix
  socket (`Path`) or a `(host, port)` pair.  The dialogue, timeouts and reply
  mapping are those of `RelayingDelivery` (smtp.py), with LHLO instead of
  EHLO.
- Many recipients per transaction.  Each RCPT is forwarded as the provider
  sends it and a refusal (Dovecot's 550 5.1.1 for an unknown user) is
  mirrored at RCPT; after the dot the server answers once per accepted
  recipient (RFC 2033 §4.2) and `data()` returns those replies in RCPT
  order.  The reversed session maps them onto its one DATA reply (all alike:
  mirrored; mixed: the failures go to the local retry spool first, see
  serve.py), so no recipient is lost or delivered twice because another one
  failed.
- `check_recipient()` accepts; the LMTP server validates at delivery.
- SIZE=, BODY=8BITMIME and SMTPUTF8 are passed only when the server offers
  them; otherwise the message is offered without them (final delivery into a
  mailbox: the server decides, and its refusal is mirrored).
- The server down (no socket, connection refused, timeout, no 220, LHLO
  refused): 451 4.4.1 "local delivery unavailable", nothing written.  The
  connection lost after the final dot: 451 4.4.2 (the provider keeps the
  mail; a duplicate is possible, a loss is not).
- One connection per transaction, closed with QUIT.
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
