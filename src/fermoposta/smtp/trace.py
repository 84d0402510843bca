"""Trace headers (RFC 5321 §4.4, RFC 3848 protocol names).  No I/O.

Contract: `received_header()` returns one folded `Received:` field ending in
CRLF, safe to prepend to a message body.  Values that come from the peer
(HELO name) are stripped of CR, LF and parentheses so they cannot inject
header lines or break the comment syntax.
"""

from __future__ import annotations

import functools
import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime

_UNSAFE = re.compile(r"[\x00-\x1f\x7f()\\]")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """The RFC 5322 date of a second (formatted once per second, not per message)."""
    return format_datetime(datetime.fromtimestamp(second, tz=UTC))


def protocol_name(*, esmtp: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(
    *,
    helo: str | None,
    peer_ip: str,
    by: str,
    protocol: str,
    queue_id: str | None = None,
    tls_info: str | None = None,
    for_recipient: str | None = None,
    now: float | None = None,
) -> bytes:
    helo_clean = _UNSAFE.sub("", helo or "unknown")[:255]
    stamp = _date(int(now if now is not None else time.time()))
    lines = [
        f"Received: from {helo_clean} ([{peer_ip}])",
        f"\tby {by} (fermoposta) with {protocol}",
    ]
    if tls_info:
        lines[-1] += f" ({_UNSAFE.sub('', tls_info)})"
    if queue_id:
        lines[-1] += f" id {queue_id}"
    if for_recipient:
        lines.append(f"\tfor <{_UNSAFE.sub('', for_recipient)}>")
    lines[-1] += ";"
    lines.append(f"\t{stamp}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")
