"""Bounded line framing for received bytes (sans-I/O).

Contract:
- `LineBuffer.feed(data)` appends received bytes; `next_line(limit)` returns the next
  complete line INCLUDING its terminator, or None while no complete line is buffered.
  A line ends at LF; whether it was CRLF or a bare LF is the caller's business
  (RFC 5321 §2.3.8 requires CRLF, the command parser enforces it).
- If no LF appears within `limit` bytes, `next_line` raises `LineTooLong` exactly once
  for that line (its `head`: the line's first bytes, up to `HEAD_SIZE`); the rest of
  the overlong line, up to and including its LF, is then
  discarded silently (even across later feeds) and framing resumes with the next line.
  RFC 5321 §4.5.3.1.4-6 limits: command line 512, text line 1000 octets incl. CRLF.
- `take_all()` removes and returns every buffered byte (hand-off to the DATA reader,
  or discarding pipelined plaintext before a TLS handshake, RFC 3207 §4.2).  It also
  ends a discard in progress: what is returned is exactly what was buffered.
  `take(n)` removes and returns the first n bytes at most (a BDAT chunk, RFC 3030 §2:
  counted octets, no line framing), and likewise ends a discard.
- Amortised O(n): a read offset is kept and the consumed prefix is deleted only when
  it dominates the buffer; a scan mark avoids rescanning a partial line on every feed.
  Bytes fed to an empty buffer are kept as they are until a line is asked for, so
  `take_all()` hands them on without a copy (a DATA body's reads), and so does
  `next_line` when they are one whole line (a command read on its own).
No I/O, no clocks.
"""

from __future__ import annotations

_COMPACT_AT = 64 * 1024


#: How much of an overlong line `LineTooLong.head` keeps (enough to name its verb).
HEAD_SIZE = 64


class LineTooLong(Exception):
    """No LF within the line limit; the rest of the line will be discarded.
    `head` is the line's first `HEAD_SIZE` bytes (b"" when not given), so a
    server can tell which command it was (an overlong BDAT line is followed
    by octets that must not be read as commands, RFC 3030 §2)."""

    def __init__(self, message: str, head: bytes = b"") -> None:
        super().__init__(message)
        self.head = head


class LineBuffer:
    """Accumulates bytes and splits them into LF-terminated lines."""

    __slots__ = ("_buf", "_discarding", "_lone", "_pos", "_scanned")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed data in _buf
        self._scanned = 0  # absolute index up to which _buf[_pos:] holds no LF
        self._discarding = False  # skipping the tail of an overlong line
        # Bytes fed while _buf was empty, not yet copied into it (only then set).
        self._lone: bytes | None = None

    def __len__(self) -> int:
        if self._lone is not None:
            return len(self._lone)
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._lone is None and not self._buf and type(data) is bytes:
            self._lone = data
            return
        self._absorb()
        self._buf += data

    def _absorb(self) -> None:
        """Copy the bytes kept as fed into the buffer (line framing reads it)."""
        if self._lone is not None:
            self._buf += self._lone
            self._lone = None

    def has_line(self) -> bool:
        """Whether a whole line (up to its LF) is here, not yet taken."""
        if self._lone is not None:  # then all there is (`feed`)
            return b"\n" in self._lone
        return self._buf.find(b"\n", max(self._pos, self._scanned)) >= 0

    def _consume_to(self, end: int) -> None:
        self._pos = end
        self._scanned = end
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = self._scanned = 0
        elif self._pos >= _COMPACT_AT and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._scanned -= self._pos
            self._pos = 0

    def next_line(self, limit: int) -> bytes | None:
        """Return the next line with its terminator, None if incomplete.

        Raises `LineTooLong` once when `limit` bytes hold no LF."""
        if limit < 1:
            raise ValueError("limit must be positive")
        lone = self._lone
        if lone is None:
            if not self._buf:  # nothing here (the usual case before a wait)
                return None
        else:
            # The usual command: one whole line in one read, into an empty
            # buffer: it is the line, with no copy.
            if lone and not self._discarding and lone.find(b"\n", 0, limit) == len(lone) - 1:
                self._lone = None
                return lone
            self._absorb()
        buf = self._buf
        if self._discarding:
            lf = buf.find(b"\n", self._pos)
            if lf < 0:
                self._consume_to(len(buf))
                return None
            self._discarding = False
            self._consume_to(lf + 1)
        start = self._pos
        stop = start + limit
        lf = buf.find(b"\n", max(start, self._scanned), stop)
        if lf >= 0:
            line = bytes(buf[start : lf + 1])
            self._consume_to(lf + 1)
            return line
        if len(buf) >= stop:
            # RFC 5321 §4.5.3.1: line exceeds the limit; drop what we have and the rest.
            self._discarding = True
            head = bytes(buf[start : start + min(limit, HEAD_SIZE)])
            self._consume_to(stop)
            raise LineTooLong(f"no line end within {limit} bytes", head)
        self._scanned = len(buf)
        return None

    def take(self, n: int) -> bytes:
        """Remove and return up to `n` bytes from the front (ends any discard)."""
        self._discarding = False
        self._absorb()
        end = min(self._pos + max(n, 0), len(self._buf))
        data = bytes(self._buf[self._pos : end])
        self._consume_to(end)
        return data

    def take_all(self) -> bytes:
        """Remove and return everything buffered (ends any discard in progress)."""
        if self._lone is not None:
            data, self._lone = self._lone, None
            self._discarding = False
            return data
        # One copy, not a slice's and then bytes'; both views released before
        # the clear (a bytearray with exports cannot be resized).
        with memoryview(self._buf) as view, view[self._pos :] as rest:
            data = bytes(rest)
        self._buf.clear()
        self._pos = self._scanned = 0
        self._discarding = False
        return data
