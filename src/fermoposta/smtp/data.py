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
  `leading_dots` says whether a line of the content may begin with "." (set as
  soon as a line-leading dot is un-stuffed; a message without one can be sent
  on as it is, see `PassThrough`).
  Work is done per chunk with bytes methods; only the last 3 unprocessed bytes plus 2
  bytes of context are kept between feeds, so chunk boundaries may fall anywhere.
  A chunk in which no line begins with "." (and none across its edge) can hold
  neither the end nor a stuffing dot: it is checked and returned as it is, the
  same object, nothing held back (a big body is not copied).
- `ContentChecks` holds those three verdicts for one message and is shared with BDAT
  (`smtp.chunking`): `scan()` the octets as they stand on the wire of a DATA transfer
  (lines are counted with their stuffing dot, as the DATA reader always has), in
  pieces cut anywhere (a CR at the end of a piece waits for the next piece's first
  octet; a line's length carries over), `count()` the content octets, `end()` once
  the content is complete (a CR still waiting is bare).
- `crlf_lines(data)` makes every bare CR and bare LF a CRLF (RFC 5321 §2.3.8); the
  dot-stuffer and the drain's BDAT octets both use it.
- `DotStuffer` (client side, RFC 5321 §4.5.2) converts bare CR and bare LF to CRLF,
  doubles a leading "." on every line and `finish()` appends the final CRLF (if the
  content did not end with one) and ".<CRLF>".  `dot_stuff()` wraps it for iterables.
  A chunk already in CRLF form (every stored body: intake refuses bare CR/LF) is
  only counted and searched, not rewritten; the stuffer never skips the check.
- `PassThrough` has the DotStuffer's interface for a body already in wire form
  (CRLF only, no line-leading "."; `QueuedMessage.wire_ready`): chunks go out
  unchanged, with no pass over them but one guard, a search for the sequence that
  ends the data early for an RFC 5321 receiver (CRLF "." CRLF, or a line-leading
  "." at a chunk's edge): if it is found, that chunk and the rest go through a
  `DotStuffer`, so the data never ends early.  The guard trusts the flag for the
  rest (a line-leading "." inside a chunk, bare CR or LF, the lenient end forms
  such as LF "." LF): checking them would cost the passes it saves.
- Both look for a "." at memchr speed before searching for a line-leading one, so
  a body without dots (base64) is copied at most once per chunk.
No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

_END = b"\r\n.\r\n"
_CRLF = b"\r\n"
_CR, _LF = 0x0D, 0x0A  # as bytes index them
_HOLD = len(_END) - 2  # bytes kept unprocessed: a terminator may start in them
_CONTEXT = 2  # already-processed bytes kept in front of the buffer (for "\r\n." matching)


class ContentChecks:
    """The size, line-ending and line-length verdicts on one message's content."""

    __slots__ = ("_cr_pending", "_line_len", "bare_line_ending", "leading_dots",
                 "line_too_long", "max_line", "max_size", "size", "too_big")

    def __init__(self, max_size: int, max_line: int = 1000) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0
        self.too_big = False
        self.bare_line_ending = False
        self.line_too_long = False
        # Whether a line of the content may begin with "." (True: not known;
        # the DATA reader knows, from its un-stuffing, and clears it).
        self.leading_dots = True
        self._cr_pending = False  # the last octet scanned is a CR: its LF may come next
        self._line_len = 0  # octets of the current (incomplete) line scanned so far

    def count(self, n: int) -> None:
        """Account for `n` more octets of content (RFC 1870 counts content)."""
        self.size += n
        if self.size > self.max_size:
            self.too_big = True

    def scan(self, buf: bytes, start: int, stop: int) -> None:
        """Check buf[start:stop], the next octets of the content's wire form."""
        if stop <= start:
            return
        if not self.bare_line_ending:
            self._check_line_ends(buf, start, stop)
        if not self.line_too_long:
            self._check_lines(buf, start, stop)

    def end(self) -> None:
        """The content is complete: a CR still waiting for its LF is bare."""
        if self._cr_pending:
            self.bare_line_ending = True
            self._cr_pending = False

    def _check_line_ends(self, buf: bytes, start: int, stop: int) -> None:
        # A CR must be followed by LF and an LF preceded by CR (RFC 5321 §2.3.8).
        # With the CRLF pairs inside taken out, what is left may hold a CR or
        # an LF only at its edges: an LF first after the CR that ended the
        # last piece, a CR last (decided by the next piece, or bare at the
        # end).  One `replace` and two memchr-speed finds: 3.5 µs for 4 KiB on
        # Debian's python3, against 8.4 for the counts of CR, LF and CRLF
        # (about even on a build without PGO; bench/README.md, twenty-first
        # session).
        rest = buf[start:stop].replace(_CRLF, b"")
        joined = self._cr_pending and buf[start] == _LF
        trailing = buf[stop - 1] == _CR
        low = 1 if joined else 0
        high = len(rest) - 1 if trailing else len(rest)
        if (self._cr_pending != joined or rest.find(b"\r", low, high) >= 0
                or rest.find(b"\n", low, high) >= 0):
            self.bare_line_ending = True
        self._cr_pending = trailing

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


class DataReader:
    """Incremental reader of DATA content up to `<CRLF>.<CRLF>`."""

    def __init__(self, max_size: int, max_line: int = 1000) -> None:
        self.checks = ContentChecks(max_size, max_line)
        self.checks.leading_dots = False  # until a line-leading dot is un-stuffed
        self.done = False
        # _buf[:2] is context (already processed); the data stream is preceded by the
        # CRLF that ended the DATA command, so a "." in the first line is a line start.
        self._buf = _CRLF

    # The verdicts, as the caller reads them.
    @property
    def max_size(self) -> int:
        return self.checks.max_size

    @property
    def max_line(self) -> int:
        return self.checks.max_line

    @property
    def size(self) -> int:
        return self.checks.size

    @property
    def too_big(self) -> bool:
        return self.checks.too_big

    @property
    def bare_line_ending(self) -> bool:
        return self.checks.bare_line_ending

    @property
    def line_too_long(self) -> bool:
        return self.checks.line_too_long

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Return (content so far, None) or, at end of data, (content, leftover)."""
        if self.done:
            raise RuntimeError("DataReader.feed() called after end of data")
        first = self._first_line_leading_dot(data)
        if first < 0:
            return self._pass(data), None
        buf = self._buf + data
        if buf.startswith(_END, first):
            # The first line that begins with "." ends the data: the content
            # before it has none to un-stuff (the usual message, whole in
            # one read: one search of it, not three).
            self.done = True
            self._buf = b""
            payload = self._process(buf, first + 2, dotless=True)
            self.checks.end()  # the content ends with the CRLF before the dot
            return payload, buf[first + len(_END) :]
        end = buf.find(_END, first)
        if end >= 0:
            self.done = True
            self._buf = b""
            payload = self._process(buf, end + 2)
            self.checks.end()
            return payload, buf[end + len(_END) :]
        cut = len(buf) - _HOLD
        if cut <= _CONTEXT:
            self._buf = buf
            return b"", None
        self._buf = buf[cut - _CONTEXT :]
        return self._process(buf, cut), None

    def _first_line_leading_dot(self, data: bytes) -> int:
        """Where the first CRLF "." lies in what is held and `data` (an
        index into the two joined), or -1: without one, nothing in them
        ends the data (the terminator is CRLF "." CRLF) and nothing is
        un-stuffed.  A "." is looked for at memchr speed first (none at
        all: base64, most long bodies); a CRLF "." only from the first one
        on; the edge, where held bytes meet `data`, is looked at apart (a
        few bytes), and comes first."""
        held = self._buf
        edge = (held + data[:2]).find(b"\r\n.")
        if edge >= 0:
            return edge
        dot = data.find(b".")
        if dot < 0:
            return -1
        inner = data.find(b"\r\n.", max(0, dot - 2))
        return len(held) + inner if inner >= 0 else -1

    def _pass(self, data: bytes) -> bytes:
        """`data` (and the bytes held before it) as content, checked: nothing
        is held back, since no line in them begins with "." (the CRLF before
        a terminator's dot is content, and the next `feed` sees the context
        kept here).  The common case returns `data` itself: the body's bytes
        are not copied."""
        held = self._buf[_CONTEXT:]
        checks = self.checks
        if held:
            checks.scan(self._buf, _CONTEXT, len(self._buf))
        checks.scan(data, 0, len(data))
        self._buf = (self._buf + data[-_CONTEXT:])[-_CONTEXT:]
        payload = held + data if held else data
        checks.count(len(payload))
        return b"" if checks.too_big else payload

    def _process(self, buf: bytes, stop: int, *, dotless: bool = False) -> bytes:
        """Check and un-stuff buf[2:stop]; buf[:2] is context.  `dotless`:
        the caller knows no line in it begins with "."."""
        if stop <= _CONTEXT:
            return b""
        checks = self.checks
        checks.scan(buf, _CONTEXT, stop)  # the wire form: a stuffing dot counts
        # §4.5.2: a "." starting a line is removed (the sender doubled it);
        # without one (every base64 attachment), one copy instead of three.
        # No "." at all is found at memchr speed; a CRLF before one may not be.
        if (dotless or buf.find(b".", _CONTEXT, stop) < 0
                or buf.find(b"\r\n.", 0, stop) < 0):
            payload = buf[_CONTEXT:stop]
        else:
            payload = buf[:stop].replace(b"\r\n.", _CRLF)[_CONTEXT:]
            # A line began with "." on the wire: after its stuffing dot, the
            # content's line may still begin with one (a line ".." was ".").
            checks.leading_dots = True
        checks.count(len(payload))
        return b"" if checks.too_big else payload


def in_wire_form(text: bytes) -> bool:
    """Whether `text` can be sent as it is before ".<CRLF>": CRLF line ends
    only, a final CRLF (or nothing), no line that begins with "."  It reads
    all of `text`: for short texts (a trace header), not for bodies."""
    lines = text.count(b"\n")
    return (text.count(b"\r") == lines and text.count(_CRLF) == lines
            and text.endswith(_CRLF) == bool(text) and not text.startswith(b".")
            and b"\n." not in text)


def crlf_lines(data: bytes) -> bytes:
    """`data` with every bare CR and bare LF made CRLF (RFC 5321 §2.3.8: never
    emit one).  Stored bodies already have none (intake refuses them):
    counting, which copies nothing, spares the three rewrites.  A CR at the
    very end is taken as bare: a caller cutting a stream holds it back."""
    lf = data.count(b"\n")
    if data.count(b"\r") != lf or (lf and data.count(_CRLF) != lf):
        data = data.replace(_CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", _CRLF)
    return data


def _hold_trailing_cr(held: bool, chunk: bytes) -> tuple[bytes, bool]:
    """`chunk` behind the CR held from the chunk before (if `held`), less a
    CR at its end, and whether one was held back: whether that CR is bare
    depends on the next chunk's first octet."""
    data = b"\r" + chunk if held else chunk
    if data.endswith(b"\r"):
        return data[:-1], True
    return data, False


class DotStuffer:
    """Incremental dot-stuffer with line-end normalisation (client side)."""

    def __init__(self, *, line_start: bool = True) -> None:
        self._line_start = line_start  # the next output byte starts a line
        self._pending_cr = False  # a trailing CR whose successor is not known yet

    def feed(self, chunk: bytes) -> bytes:
        data, self._pending_cr = _hold_trailing_cr(self._pending_cr, chunk)
        if not data:
            return b""
        data = crlf_lines(data)
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


class PassThrough:
    """The wire form of a body stored in it (see the module docstring)."""

    def __init__(self) -> None:
        self._line_start = True  # the output so far ends a line (or is empty)
        self._held_cr = False  # a trailing CR, sent with what follows it
        self.diverted: DotStuffer | None = None  # took over: the body was not wire-ready

    def feed(self, chunk: bytes) -> bytes:
        if self.diverted is not None:
            return self.diverted.feed(chunk)
        # A CR at the end waits: if the guard diverts on the next chunk, the
        # stuffer must see it together with its LF.
        data, self._held_cr = _hold_trailing_cr(self._held_cr, chunk)
        if not data:
            return b""
        last_line = data.rfind(b"\n") + 1  # 0: the chunk is inside one line
        if ((self._line_start and data.startswith(b"."))
                or (last_line and data.startswith(b".", last_line))  # at the edge
                or _END in data):
            stuffer = self.diverted = DotStuffer(line_start=self._line_start)
            out = stuffer.feed(data + b"\r" if self._held_cr else data)
            self._held_cr = False
            return out
        self._line_start = data.endswith(_CRLF)
        return data

    def finish(self) -> bytes:
        """Like `DotStuffer.finish`: a final CRLF if missing, then ".<CRLF>"."""
        if self.diverted is not None:
            return self.diverted.finish()
        out = _CRLF if self._held_cr or not self._line_start else b""
        self._held_cr, self._line_start = False, True
        return out + b".\r\n"


def dot_stuff(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Yield the stuffed form of `chunks`, ending with the end-of-data line."""
    stuffer = DotStuffer()
    for chunk in chunks:
        out = stuffer.feed(chunk)
        if out:
            yield out
    yield stuffer.finish()
