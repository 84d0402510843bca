"""BDAT (RFC 3030 CHUNKING): the command's argument and the chunks' content (sans-I/O).

Contract:
- `parse_bdat(arg)` reads the argument of ``BDAT <chunk-size> [LAST]``
  (RFC 3030 §2: chunk-size is 1*DIGIT, the end marker "LAST", any case) into
  a `Bdat`; anything else raises `ValueError`, and so does a size of more
  than `MAX_SIZE_DIGITS` digits (a terabyte: no message we take is that
  big, and no such count is worth reading).  The caller cannot tell where
  the chunk ends then: the stream has lost its framing.
- `ChunkReader` takes the octets of one message's chunks, in order and cut
  anywhere (a chunk's edges and the reads inside it alike), and gives the
  same verdicts and content as `DataReader` on the DATA form of that
  message: the content is kept as it came (BDAT has no dot-stuffing, RFC
  3030 §2: a line starting with "." is content); the size limit, bare CR or
  LF (RFC 5321 §2.3.8) and the line limit are judged over the whole message
  by `ContentChecks`, so a CRLF or a long line may straddle chunks.  Lines
  are measured as DATA's wire carries them (a line-leading "." counts
  twice, as `DataReader` counts the stuffing dot), so a message gets the
  same verdict whichever way it is sent.  `finish()` returns the CRLF a DATA
  transfer adds to content that does not end with one (and checks it); the
  verdict is final only after it.  `refused` is true once any verdict is
  against the message; `feed()` then keeps nothing more.
No I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fermoposta.smtp.data import ContentChecks

__all__ = ["MAX_SIZE_DIGITS", "Bdat", "ChunkReader", "parse_bdat"]

MAX_SIZE_DIGITS = 12
_ARG = re.compile(rf"([0-9]{{1,{MAX_SIZE_DIGITS}}})(?:[ \t]+(LAST))?", re.ASCII | re.IGNORECASE)
_CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class Bdat:
    size: int  # octets of the chunk that follow the command line
    last: bool  # the chunk ends the message


def parse_bdat(arg: str) -> Bdat:
    """The chunk of ``BDAT <arg>``; `ValueError` if `arg` is not ``<size> [LAST]``."""
    match = _ARG.fullmatch(arg)
    if match is None:
        raise ValueError(f"not a BDAT argument: {arg[:40]!r}")
    return Bdat(int(match.group(1)), match.group(2) is not None)


class ChunkReader:
    """One message's content from its BDAT chunks."""

    def __init__(self, max_size: int, max_line: int = 1000) -> None:
        self.checks = ContentChecks(max_size, max_line)
        self._line_start = True  # the next octet starts a line
        self._tail = b""  # the content's last two octets
        self.finished = False

    @property
    def refused(self) -> bool:
        c = self.checks
        return c.too_big or c.bare_line_ending or c.line_too_long

    def feed(self, data: bytes) -> bytes:
        """The content to keep of the next octets (b"" once refused)."""
        if self.finished:
            raise RuntimeError("ChunkReader.feed() called after finish()")
        if not data:
            return b""
        wire = data
        if b"." in data:  # memchr first: most bodies have few dots or none
            if b"\n." in data:
                wire = wire.replace(b"\n.", b"\n..")
            if self._line_start and data[0] == 0x2E:
                wire = b"." + wire
        self.checks.scan(wire, 0, len(wire))
        self.checks.count(len(data))
        self._line_start = data[-1] == 0x0A
        self._tail = (self._tail + data)[-2:]
        return b"" if self.refused else data

    def finish(self) -> bytes:
        """The end of the message: the CRLF to add (b"" if it ends with one, or
        is empty), already checked; then the verdicts are final."""
        if self.finished:
            raise RuntimeError("ChunkReader.finish() called twice")
        extra = _CRLF if self._tail and self._tail != _CRLF else b""
        if extra:
            self.feed(extra)
        self.finished = True
        self.checks.end()
        return b"" if self.refused else extra
