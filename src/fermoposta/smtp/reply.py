"""SMTP replies as values (RFC 5321 §4.2, RFC 2034/3463 enhanced codes).

Contract:
- `Reply` is an immutable value: a three-digit code, an optional enhanced
  status code ("2.0.0") and one or more text lines.  `Reply.to_bytes()`
  renders it on the wire (multi-line with "-" continuation, CRLF endings).
- `cached_reply(code, enhanced, *lines)` is that `Reply`, one object for
  equal values while it is among the last 512 asked for: a reply sent
  again and again (a greeting, a returning client's EHLO reply) is
  rendered once.
- Handlers return replies; one writer renders them.  Named constants for the
  replies the protocol fixes (RFC 2645 §7) live here so the wire text is
  written once.
- `SMTPError` carries a `Reply` plus the cause for the log; raising it from a
  handler answers the peer with that reply.  `temporary` is derived from the
  code, so a bug that raises a generic exception must be mapped to a 4xx by
  the caller, never a 5xx (a bug defers mail; it never bounces it).
This module does no I/O.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply.  `lines` holds the text of each line (at least one)."""

    code: int
    enhanced: str | None
    lines: tuple[str, ...]
    # The wire form with enhanced codes, made at the first `to_bytes()`: most
    # replies are module constants sent again and again.
    _wire: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def __init__(self, code: int, enhanced: str | None, *lines: str) -> None:
        if not 200 <= code <= 599:
            raise ValueError(f"reply code out of range: {code}")
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "enhanced", enhanced)
        object.__setattr__(self, "lines", tuple(lines) if lines else ("",))
        object.__setattr__(self, "_wire", None)

    @property
    def text(self) -> str:
        """The text of all lines joined by spaces (for logs and DSNs)."""
        parts = [self.enhanced] if self.enhanced else []
        parts.extend(line for line in self.lines if line)
        return " ".join(parts)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()

    def to_bytes(self, enhanced_codes: bool = True) -> bytes:
        """Render on the wire.  Enhanced codes are prefixed to every line
        (RFC 2034 §4) when `enhanced_codes` is true and the reply has one."""
        cached: bytes | None = getattr(self, "_wire", None)  # absent if unpickled from before
        if enhanced_codes and cached is not None:
            return cached
        prefix = f"{self.enhanced} " if (enhanced_codes and self.enhanced) else ""
        last = len(self.lines) - 1
        wire = "".join([
            f"{self.code}{' ' if index == last else '-'}{(prefix + line).rstrip(' ')}\r\n"
            for index, line in enumerate(self.lines)
        ]).encode("utf-8", "replace")
        if enhanced_codes:
            object.__setattr__(self, "_wire", wire)
        return wire


@functools.lru_cache(maxsize=512)
def cached_reply(code: int, enhanced: str | None, *lines: str) -> Reply:
    """`Reply(code, enhanced, *lines)`, made once for each distinct value
    while it is in use (the last 512), so that its wire form is rendered
    once: a greeting, the EHLO reply to a client that comes back.  A reply
    is an immutable value: sharing one is safe."""
    return Reply(code, enhanced, *lines)


class SMTPError(Exception):
    """An error that maps onto an SMTP reply.  `cause` is for the log only."""

    def __init__(self, reply: Reply, cause: str | None = None) -> None:
        super().__init__(str(reply) if cause is None else f"{reply} ({cause})")
        self.reply = reply
        self.cause = cause

    @property
    def temporary(self) -> bool:
        return self.reply.is_temporary


# --- Replies fixed by RFCs; text written once ------------------------------------------------

# RFC 5321
OK = Reply(250, "2.0.0", "OK")
BYE = Reply(221, "2.0.0", "Bye")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
BAD_ARGUMENTS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")

# RFC 3207 STARTTLS
READY_TO_START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")

# RFC 4954 AUTH
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")

# RFC 2645 §7 ATRN
ATRN_REVERSING = Reply(250, "2.0.0", "OK now reversing the connection")
ATRN_REFUSED = Reply(450, "4.7.1", "ATRN request refused")
ATRN_UNAVAILABLE = Reply(451, "4.3.0", "Unable to process ATRN request now")
ATRN_NO_MAIL = Reply(453, "4.2.0", "You have no mail")
ATRN_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
