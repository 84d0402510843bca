"""Client-side SMTP reply assembly (RFC 5321 §4.2), sans-I/O.

Contract:
- `ReplyAssembler.feed_line(line)` takes one received line (CRLF or LF terminated) and
  returns the complete `Reply` when its last line ("ddd SP text" or exactly "ddd")
  arrives, else None.  Structure is checked strictly and violations raise
  `ReplyProtocolError` (the session must then be aborted): a code that is not three
  digits with the first in 2-5 (§4.2.1), a separator other than "-"/SP/end, a
  continuation line with a different code (§4.2.1), a line over 2048 octets, more than
  100 lines.  Text is decoded leniently (UTF-8, errors replaced).  After an error the
  assembler is reset and can be fed the next reply.
- Enhanced status codes (RFC 2034 §4, RFC 3463): when EVERY line's text starts with the
  same "c.sss.ddd" (followed by SP or end of line) and c equals the reply's first digit,
  it is stripped into `Reply.enhanced`; otherwise the text is left untouched.
- `parse_ehlo(reply)` maps the EHLO keywords (RFC 5321 §4.1.1.1, lines after the
  greeting) to their parameters; the first occurrence of a keyword wins.
No I/O.
"""

from __future__ import annotations

import re

from fermoposta.smtp.reply import Reply

MAX_REPLY_LINE = 2048  # octets incl. line end (RFC 5321 §4.5.3.1.5 says 512; be lenient)
MAX_REPLY_LINES = 100

_ENHANCED = re.compile(r"([2-5])\.(\d{1,3})\.(\d{1,3})(?: |$)", re.ASCII)
_DIGITS = b"0123456789"


class ReplyProtocolError(Exception):
    """The peer sent something that is not an SMTP reply."""


class ReplyAssembler:
    """Collects the lines of one (possibly multi-line) reply."""

    def __init__(self) -> None:
        self._code: int | None = None
        self._lines: list[str] = []

    def _fail(self, message: str) -> ReplyProtocolError:
        self._code = None
        self._lines = []
        return ReplyProtocolError(message)

    def feed_line(self, line: bytes) -> Reply | None:
        if len(line) > MAX_REPLY_LINE:
            raise self._fail("reply line too long")
        if line.endswith(b"\r\n"):
            line = line[:-2]
        elif line.endswith(b"\n"):
            line = line[:-1]
        head = line[:3]
        if len(head) != 3 or head[0] not in b"2345" or any(b not in _DIGITS for b in head):
            raise self._fail(f"bad reply code {bytes(line[:8])!r}")
        code = int(head)
        if len(line) > 3 and line[3:4] not in (b"-", b" "):
            raise self._fail(f"bad reply separator {bytes(line[:8])!r}")
        if self._code is not None and code != self._code:
            raise self._fail(f"reply code changed from {self._code} to {code}")
        if len(self._lines) >= MAX_REPLY_LINES:
            raise self._fail("too many reply lines")
        self._code = code
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if line[3:4] == b"-":
            return None
        lines = self._lines
        self._code = None
        self._lines = []
        return _build(code, lines)


def _build(code: int, lines: list[str]) -> Reply:
    enhanced: str | None = None
    first = _ENHANCED.match(lines[0])
    if first is not None and first.group(1) == str(code)[0]:
        prefix = first.group(0).rstrip(" ")
        if all(line == prefix or line.startswith(prefix + " ") for line in lines):
            enhanced = prefix
            lines = [line[len(prefix) + 1 :] for line in lines]
    return Reply(code, enhanced, *lines)


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO capabilities: keyword (uppercased) -> rest of the line ("" if none)."""
    capabilities: dict[str, str] = {}
    for line in reply.lines[1:]:
        parts = line.strip().split(None, 1)
        if parts:
            capabilities.setdefault(parts[0].upper(), parts[1].strip() if len(parts) > 1 else "")
    return capabilities
