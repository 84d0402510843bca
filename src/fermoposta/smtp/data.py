"""DATA content framing: end-of-data detection, dot-(un)stuffing (sans-I/O).

Contract:
- `DataReader` (server side, RFC 5321 §4.1.1.4, §4.5.2) consumes the bytes that follow
  the 354 reply.  ONLY `<CRLF>.<CRLF>` ends the data (or ".<CRLF>" at the very start);
  `<LF>.<LF>`, `<CR>.<CR>`, `<CRLF>.<LF>`, `<LF>.<CRLF>` do not (SMTP smuggling,
  CVE-2023-51764).  `feed()` returns the un-stuffed content available so far and, once
  the terminator has been seen, the bytes after it (pipelined commands).  The content
  includes the CRLF preceding the final ".".  Flags report oversize (`too_big`, content
  then withheld), bare CR/LF (`bare_line_ending`) and lines over `max_line` octets
  incl. the line end (`line_too_long`, RFC 5321 §4.5.3.1.6); the caller decides.
  Work is done per chunk with bytes methods; only the last 3 unprocessed bytes plus 2
  bytes of context are kept between feeds, so chunk boundaries may fall anywhere.
- `DotStuffer` (client side, RFC 5321 §4.5.2) converts bare CR and bare LF to CRLF,
  doubles a leading "." on every line and `finish()` appends the final CRLF (if the
  content did not end with one) and ".<CRLF>".  `dot_stuff()` wraps it for iterables.
  A chunk already in CRLF form (every stored body: intake refuses bare CR/LF) is
  only counted and searched, not rewritten; the check is never skipped.
- Both look for a "." at memchr speed before searching for a line-leading one, so
  a body without dots (base64) is copied at most once per chunk.
No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

_END = b"\r\n.\r\n"
_CRLF = b"\r\n"
_HOLD = len(_END) - 2  # bytes kept unprocessed: a terminator may start in them
_CONTEXT = 2  # already-processed bytes kept in front of the buffer (for "\r\n." matching)


class DataReader:
    """Incremental reader of DATA content up to `<CRLF>.<CRLF>`."""

    def __init__(self, max_size: int, max_line: int = 1000) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.done = False
        self.size = 0
        self.too_big = False
        self.bare_line_ending = False
        self.line_too_long = False
        # _buf[:2] is context (already processed); the data stream is preceded by the
        # CRLF that ended the DATA command, so a "." in the first line is a line start.
        self._buf = _CRLF
        self._line_len = 0  # octets of the current (incomplete) line processed so far

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Return (content so far, None) or, at end of data, (content, leftover)."""
        if self.done:
            raise RuntimeError("DataReader.feed() called after end of data")
        buf = self._buf + data
        end = buf.find(_END)
        if end >= 0:
            self.done = True
            self._buf = b""
            return self._process(buf, end + 2), buf[end + len(_END) :]
        cut = len(buf) - _HOLD
        if cut <= _CONTEXT:
            self._buf = buf
            return b"", None
        self._buf = buf[cut - _CONTEXT :]
        return self._process(buf, cut), None

    def _process(self, buf: bytes, stop: int) -> bytes:
        """Account for and un-stuff buf[2:stop]; buf[:2] is context."""
        if stop <= _CONTEXT:
            return b""
        if not self.bare_line_ending:
            # A CR must be followed by LF and an LF preceded by CR (RFC 5321 §2.3.8).
            # The byte after stop is always present (it is held back or the terminator).
            lf = buf.count(b"\n", _CONTEXT, stop)
            cr = buf.count(b"\r", _CONTEXT, stop)
            # One count of the CRLF pairs inside, plus the pair across each
            # edge: an LF first after the context's CR, a CR last before the
            # byte after stop.  (Pairs never overlap.)
            pairs = buf.count(_CRLF, _CONTEXT, stop) if lf or cr else 0
            if (lf != pairs + (buf[_CONTEXT - 1 : _CONTEXT + 1] == _CRLF)
                    or cr != pairs + (buf[stop - 1 : stop + 1] == _CRLF)):
                self.bare_line_ending = True
        if not self.line_too_long:
            self._check_lines(buf, _CONTEXT, stop)
        # §4.5.2: a "." starting a line is removed (the sender doubled it);
        # without one (every base64 attachment), one copy instead of three.
        # No "." at all is found at memchr speed; a CRLF before one may not be.
        if buf.find(b".", _CONTEXT, stop) < 0 or buf.find(b"\r\n.", 0, stop) < 0:
            payload = buf[_CONTEXT:stop]
        else:
            payload = buf[:stop].replace(b"\r\n.", _CRLF)[_CONTEXT:]
        self.size += len(payload)
        if self.size > self.max_size:
            self.too_big = True
        return b"" if self.too_big else payload

    def _check_lines(self, buf: bytes, start: int, stop: int) -> None:
        """Flag a line longer than max_line octets (LF-delimited) in buf[start:stop]."""
        limit = self.max_line
        pos = start - self._line_len  # start of the current line (may precede `start`)
        while pos + limit <= stop:
            # The current line fits iff an LF lies in its first `limit` octets; the
            # last LF in the window gives the next line start, so we skip many lines.
            lf = buf.rfind(b"\n", max(pos, start), pos + limit)
            if lf < 0:
                self.line_too_long = True
                return
            pos = lf + 1
        lf = buf.rfind(b"\n", max(pos, start), stop)
        if lf >= 0:
            pos = lf + 1
        self._line_len = stop - pos


class DotStuffer:
    """Incremental dot-stuffer with line-end normalisation (client side)."""

    def __init__(self) -> None:
        self._line_start = True  # the next output byte starts a line
        self._pending_cr = False  # a trailing CR whose successor is not known yet

    def feed(self, chunk: bytes) -> bytes:
        data = b"\r" + chunk if self._pending_cr else chunk
        self._pending_cr = data.endswith(b"\r")
        if self._pending_cr:
            data = data[:-1]
        if not data:
            return b""
        # §2.3.8: never emit a bare CR or LF; each becomes CRLF.  Stored bodies
        # already have none (intake refuses them): counting, which copies
        # nothing, spares the three rewrites.
        lf = data.count(b"\n")
        if data.count(b"\r") != lf or (lf and data.count(_CRLF) != lf):
            data = data.replace(_CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", _CRLF)
        if b"." in data and b"\n." in data:  # every LF is in a CRLF now
            data = data.replace(b"\r\n.", b"\r\n..")  # §4.5.2 transparency
        if self._line_start and data.startswith(b"."):
            data = b"." + data
        self._line_start = data.endswith(_CRLF)
        return data

    def finish(self) -> bytes:
        """Final line end (if missing) plus the end-of-data line ".<CRLF>"."""
        out = b""
        if self._pending_cr:
            self._pending_cr = False
            self._line_start = True
            out = _CRLF
        if not self._line_start:
            out += _CRLF
        self._line_start = True
        return out + b".\r\n"


def dot_stuff(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Yield the stuffed form of `chunks`, ending with the end-of-data line."""
    stuffer = DotStuffer()
    for chunk in chunks:
        out = stuffer.feed(chunk)
        if out:
            yield out
    yield stuffer.finish()
