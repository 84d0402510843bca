"""TCP socket options for the client side of a pipelined SMTP dialog.

Contract:
- `quickack(sock)` asks the kernel to ACK what we received at once
  (Linux `TCP_QUICKACK`) and says whether it could; it never raises.  On
  systems without the option, on non-TCP sockets (unix-domain: LMTP) and on
  a closed socket it does nothing and returns False.
- The option is not permanent: Linux goes back to delayed ACKs by itself.
  Set while an ACK is pending (just after a read), it sends that ACK at
  once; so a caller that needs it re-arms it after every read from the
  socket (`Connection.enable_quickack`).  Set only once, it does not help
  (measured: 43 ms per message still, against 0.3 ms re-armed).

Why: a pipelining client sends MAIL, RCPT... DATA at once and then waits
for all their replies.  A peer that writes each reply with its own write and
leaves Nagle's algorithm on (fetchmail, many small SMTP servers) keeps its
second reply until the first is ACKed, and we, sending nothing meanwhile,
delay that ACK (about 40 ms on Linux): two such stalls per message.  An
immediate ACK releases the held reply after one round trip.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

__all__ = ["QUICKACK_SUPPORTED", "quickack", "rearm_quickack"]

_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
QUICKACK_SUPPORTED = _TCP_QUICKACK is not None


def quickack(sock: Any) -> bool:
    """Re-arm immediate ACKs on `sock` (a socket or asyncio's TransportSocket)."""
    if _TCP_QUICKACK is None or sock is None:
        return False
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        return True
    return False


def rearm_quickack(sock: Any) -> None:
    """`quickack` again on a socket it accepted (a TCP one): only the
    setsockopt, without the family check (an enum built at every read)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
