"""Client-side SMTP primitives on a `Connection` (RFC 5321 §4.1, §4.2).

Contract:
- `SMTPClient` sends command lines and reads complete (multi-line) replies
  with a timeout each; a malformed reply raises `ReplyProtocolError`, a
  closed connection `ConnectionClosed`, an expired timeout `TimeoutError`.
- `send_body()` streams a message body through a `DotStuffer`
  (RFC 5321 §4.5.2) so no bare CR/LF and no unstuffed leading dot ever
  reach the wire, and memory stays bounded by the chunk size.  With
  `wire_ready=True` (a stored body that needs neither, `QueuedMessage.wire_ready`)
  it goes through a `PassThrough` instead: unchanged, guarded only against
  ending the data early.
- With `line_records=True` (the ODMR drain) on a TLS connection, every
  command line of a pipelined group goes in its own TLS record, and the
  end-of-data line ".<CRLF>" in a record of its own: the last record before
  we wait for a reply always holds exactly one line.  Pipelining is kept
  (nothing waits between the lines).  Why: fetchmail, the usual ODMR
  client, relays the reversed session with a select() loop that reads one
  line per wakeup through OpenSSL; the other lines of a record it has
  already decrypted are invisible to select() (the socket is no longer
  readable) and would never be relayed, so the session would stall after
  the first reply until our timeout.  A BDAT transaction
  (`send_chunk_transaction`) follows the same rule: each command line in a
  record, and the octets' last line in a record of its own.
- It ACKs the peer's bytes at once (`Connection.enable_quickack`, Linux
  TCP_QUICKACK re-armed after every read): a peer that writes each reply,
  or each line of a multi-line reply, on its own with Nagle on (fetchmail
  relaying the customer's replies, a simple SMTP server) would otherwise
  hold the next one until our delayed ACK, about 40 ms, twice per message
  with pipelining (`net/sockopts.py`).  The commands sent, their grouping
  and the records are unchanged.
- It never decides what a reply *means*: callers (the drain, the customer,
  outbound delivery) do.
- `PEER_ERRORS` is the one list of what a peer can do to a client dialog
  (close, time out, send a malformed or overlong reply, fail TLS or the
  socket): every caller catches exactly these, and lets a bug propagate.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fermoposta.net.connection import Connection, ConnectionClosed, LineTooLong
from fermoposta.ops.log import redact
from fermoposta.smtp.data import DotStuffer, PassThrough
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.reply_parser import ReplyAssembler, ReplyProtocolError, parse_ehlo

__all__ = ["PEER_ERRORS", "ReplyProtocolError", "SMTPClient"]

# ssl.SSLError is an OSError; TimeoutError too, but named for the reader.
PEER_ERRORS = (ConnectionClosed, TimeoutError, ReplyProtocolError, LineTooLong, OSError)

log = logging.getLogger("fermoposta.smtp")

REPLY_LINE_LIMIT = 2048  # RFC 5321 says 512; real servers send longer text lines
END_OF_DATA = b".\r\n"  # RFC 5321 §4.1.1.4
# The longest last line of BDAT octets sent in a TLS record of its own
# (fetchmail reads at most 8191 bytes a wakeup; see fits_chunk_records).
LAST_RECORD_LIMIT = 4096


class SMTPClient:
    def __init__(self, conn: Connection, *, write_timeout: float = 180.0,
                 line_records: bool = False) -> None:
        self.conn = conn
        self.write_timeout = write_timeout
        self.line_records = line_records
        self.capabilities: dict[str, str] = {}
        conn.enable_quickack()

    def _one_record_per_line(self) -> bool:
        # asyncio's SSL transport turns each write() into its own TLS
        # record(s) (up to 16 KiB each); in clear text separate writes would
        # only cost system calls, the peer's kernel buffer is visible to it.
        return self.line_records and self.conn.tls_active

    async def read_reply(self, timeout: float) -> Reply:
        assembler = ReplyAssembler()
        while True:
            line = await self.conn.read_line(REPLY_LINE_LIMIT, timeout)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("[%s] < %s", self.conn.peer_ip, line.decode("utf-8", "replace").rstrip())
            reply = assembler.feed_line(line)
            if reply is not None:
                return reply

    async def send_line(self, line: str, *, secret: bool = False) -> None:
        """Send one command line; `secret` (a SASL response) is never traced."""
        data = line.encode("utf-8") + b"\r\n"
        if log.isEnabledFor(logging.DEBUG):
            shown = redact(data, in_auth=secret).decode("utf-8", "replace").rstrip()
            log.debug("[%s] > %s", self.conn.peer_ip, shown)
        await self.conn.write(data, self.write_timeout)

    async def send_group(self, lines: list[str], timeout: float) -> None:
        """Several commands sent without waiting (RFC 2920 pipelining): in one
        write, or one TLS record per line with `line_records` (see above)."""
        if log.isEnabledFor(logging.DEBUG):
            for line in lines:
                log.debug("[%s] > %s", self.conn.peer_ip, line)
        if self._one_record_per_line():
            for line in lines:
                await self.conn.write(line.encode("utf-8") + b"\r\n", timeout)
            return
        data = ("\r\n".join(lines) + "\r\n").encode("utf-8")
        await self.conn.write(data, timeout)

    def fits_chunk_records(self, body: bytes) -> bool:
        """Whether `body` can go as BDAT octets: with `line_records` over TLS
        its last line, alone in the last record, must fit one read of
        fetchmail's relay (8 KiB: a longer one would wait in OpenSSL, unseen
        by select(), for ever); such a message goes with DATA."""
        if not self._one_record_per_line():
            return True
        return len(body) - _last_line_start(body) <= LAST_RECORD_LIMIT

    async def send_chunk_transaction(self, lines: list[str], body: bytes,
                                     timeout: float) -> None:
        """`lines` (MAIL, RCPT...), then ``BDAT <n> LAST`` and the n octets of
        `body` (RFC 3030 §2), without waiting; `body` must already be in
        CRLF form (`transfer.canonical_body`).  One write, or with
        `line_records` one TLS record per command line and the body's last
        line in a record of its own (see above)."""
        lines = [*lines, f"BDAT {len(body)} LAST"]
        if log.isEnabledFor(logging.DEBUG):
            for line in lines:
                log.debug("[%s] > %s", self.conn.peer_ip, line)
            log.debug("[%s] > (%d octets)", self.conn.peer_ip, len(body))
        if not self._one_record_per_line():
            await self.conn.write(("\r\n".join(lines) + "\r\n").encode("utf-8") + body,
                                  timeout)
            return
        for line in lines:
            await self.conn.write(line.encode("utf-8") + b"\r\n", timeout)
        cut = _last_line_start(body)  # the final record holds one line
        if cut:
            await self.conn.write(body[:cut], timeout)
        if cut < len(body):
            await self.conn.write(body[cut:], timeout)

    async def command(self, line: str, timeout: float, *, secret: bool = False) -> Reply:
        await self.send_line(line, secret=secret)
        return await self.read_reply(timeout)

    async def ehlo(self, name: str, timeout: float) -> Reply:
        """EHLO, falling back to HELO on a 5xx (RFC 5321 §3.2)."""
        reply = await self.command(f"EHLO {name}", timeout)
        if reply.code == 250:
            self.capabilities = parse_ehlo(reply)
            return reply
        self.capabilities = {}
        if reply.is_permanent:
            return await self.command(f"HELO {name}", timeout)
        return reply

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.capabilities

    def max_size(self) -> int | None:
        value = self.capabilities.get("SIZE", "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
        return None

    async def send_body(self, chunks: AsyncIterator[bytes], *, wire_ready: bool = False
                        ) -> int:
        """Dot-stuff and send the body, then the end-of-data line; return bytes sent.

        The last piece of the body and the dot are held (`Connection.hold`,
        up to its limit), so they leave in one write with whatever is sent
        next (the next message's pipelined commands, RFC 2920 §3.1), or
        before we wait for the reply, or within milliseconds."""
        stuffer = PassThrough() if wire_ready else DotStuffer()
        sent = 0
        last = b""
        async for chunk in chunks:
            out = stuffer.feed(chunk)
            if out:
                if last:
                    await self.conn.write(last, self.write_timeout)
                    sent += len(last)
                last = out
        tail = stuffer.finish()  # [CRLF] ".<CRLF>"
        if self._one_record_per_line():
            if last:
                await self.conn.write(last, self.write_timeout)
            if len(tail) > len(END_OF_DATA):
                # A missing final line end and the dot must not share a record.
                await self.conn.write(tail[:-len(END_OF_DATA)], self.write_timeout)
                await self.conn.write(END_OF_DATA, self.write_timeout)
            else:
                await self.conn.write(tail, self.write_timeout)
        elif not self.conn.hold(last + tail):
            await self.conn.write(last + tail, self.write_timeout)
        return sent + len(last) + len(tail)


def _last_line_start(body: bytes) -> int:
    """Where the last line of `body` (ending with CRLF) begins."""
    return body.rfind(b"\n", 0, len(body) - 1) + 1
