"""One SMTP byte stream over asyncio, usable in either SMTP role.

Contract:
- `Connection` owns its receive buffer (a `LineBuffer`), so the SMTP layer
  always knows exactly which bytes it has received and not yet consumed.
  That is what makes the two dangerous moments safe:
  * STARTTLS (RFC 3207 §4.2, CVE-2011-0411 class): `start_tls()` discards
    every plaintext byte received before the handshake and returns how many
    it dropped; nothing read before TLS is ever interpreted after it.
  * the ATRN role flip (RFC 2645 §5.3): the same `Connection` object, TLS
    state included, is handed from the server machine to the client machine;
    the ODMR layer checks `buffered()` before the flip.
- Every read and write takes a timeout (RFC 5321 §4.5.3.2); expiry raises
  `TimeoutError`.  One timer per connection, armed lazily, bounds every
  wait for the peer's bytes (`_watch`); it goes when the connection does.
  Two overall deadlines (absolute `loop.time()` values) bound those waits
  further: `deadline`, set on the connection (the whole
  server session), and the `deadline` argument of `read_data()`,
  `read_chunk()` and `read_line()` (one message's DATA, or its BDAT chunks
  and the commands between them).  A wait cut short by one raises
  `DeadlineExceeded` (a `TimeoutError`) naming it; a deadline never
  interrupts anything but a wait for the peer.
- `read_chunk(n, sink)` reads exactly n octets (a BDAT chunk, RFC 3030 §2:
  raw, no line framing), handing them to `sink` as they arrive (bounded
  memory: never the whole chunk at once); what follows them stays buffered
  (the peer's next, pipelined commands).  A peer that closes first raises
  `ConnectionClosed`.
- A peer's half-close (FIN after its last command, RFC 2920 §3.1 pipelining)
  is not a reset: the bytes it sent are still read, in order, and only the
  read that finds the buffer empty raises `ConnectionClosed`; on plain TCP
  our write side stays open, so every reply to what the peer sent still
  reaches it.  Over TLS the same holds for a bare TCP FIN: `_FINGuard`
  keeps it from asyncio's SSL protocol (which would shut down and drop
  later writes) until we close.  A TLS close_notify, though, makes asyncio
  shut the TLS session down at once (RFC 8446 §6.1 leaves a TLS 1.3
  half-close optional): only replies written before it arrives get out,
  and `can_reply` turns false.
- Implicit TLS (server and client) is a plain connection upgraded with
  `loop.start_tls` before anything else, so both TLS paths share the guard;
  a failed server-side handshake is logged and the connection dropped
  before the handler runs.
- `tls_failure_reason(exc, timeout)` says why a handshake failed, for the
  log, never empty: OpenSSL's code and text (``[SSL: NO_SHARED_CIPHER] no
  shared cipher``, ``[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca``,
  ``[SSL: WRONG_VERSION_NUMBER] ...``), a certificate verification's
  message, "connection closed by the peer during the handshake" for an EOF
  or reset, "no handshake within <timeout>s" for a timeout.
- `hold(data)` queues a reply instead of writing it: held bytes go out,
  in order, ahead of the next `write()`, and before any wait for the peer's
  bytes, any TLS handshake and any close, and at the latest `HOLD_DELAY`
  after the first of them was held (so a reply never waits for slow work
  on the next command: a local MTA asked at RCPT time).  A server answering
  pipelined commands (RFC 2920 §3.1) holds the replies to the commands it
  has already received (`line_pending()`), so one write carries a whole
  group's replies, like Postfix's smtpd; a peer never waits on a reply held
  while we wait on it.  At most `HOLD_LIMIT` bytes are held: `hold` returns
  False beyond, and the caller writes (with the write's flow control, so a
  client that pipelines without reading is stopped as before).  `flush()`
  sends them now.  `abort()` drops them with the rest.
- `close()` flushes what was written (and TLS close_notify) before the
  socket goes, bounded by its timeout; after that it aborts, so a peer that
  never reads cannot keep a closed session's buffers alive.  A plain
  connection with nothing left to send needs no bound (no timer): the
  transport reports its loss at the loop's next turn.
- `write_now(data)` is `write()` when that would not wait: it writes (the
  held replies first) and says True, or writes nothing and says False when
  the transport pushes back, is closing, or TLS can no longer reply; the
  caller then awaits `write()`, which waits or raises.
- Reads are bounded: `read_line(limit)` raises `LineTooLong` for an overlong
  line (the rest of that line is skipped), and the receive buffer pauses the
  transport above a high-water mark, so a peer cannot make us buffer without
  bound.
- `enable_quickack()` (the client side of a pipelined dialog: `SMTPClient`)
  re-arms Linux `TCP_QUICKACK` after every read from the socket, TLS or not,
  so a peer that writes each reply separately with Nagle on never waits for
  our delayed ACK (`net/sockopts.py` explains the stall); elsewhere a no-op.
- Only public asyncio APIs are used (`loop.create_server`,
  `loop.create_connection`, `loop.create_unix_connection`, `loop.start_tls`,
  `BaseTransport.set_protocol`).
  `open_unix_connection()` reaches a unix-domain socket (an LMTP server);
  such a connection has no peer address (`peer_ip` is "unknown").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fermoposta.net.sockopts import quickack, rearm_quickack
from fermoposta.smtp.data import DataReader
from fermoposta.smtp.lines import LineBuffer, LineTooLong

__all__ = [
    "Connection",
    "ConnectionClosed",
    "DeadlineExceeded",
    "LineTooLong",
    "open_connection",
    "open_unix_connection",
    "start_server",
    "tls_failure_reason",
]

HIGH_WATER = 4 * 1024 * 1024  # pause reading above this many buffered bytes


class ConnectionClosed(Exception):
    """The peer closed the connection (or it was reset)."""


_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)\s*$")  # CPython's source location, noise in a log


def tls_failure_reason(exc: BaseException, timeout: float | None = None) -> str:
    """Why a TLS handshake failed, as the log says it (never empty).

    asyncio reports a peer that closes mid-handshake with a bare
    ConnectionResetError and a timeout with a bare TimeoutError, both with
    an empty text: they get words of their own here."""
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionClosed,
                        ConnectionResetError, BrokenPipeError, EOFError)):
        return "connection closed by the peer during the handshake"
    if isinstance(exc, TimeoutError):
        return f"no handshake within {timeout:g}s" if timeout else "handshake timed out"
    if isinstance(exc, ssl.SSLError):
        text = _SSL_SOURCE.sub("", str(exc.strerror or "")) or _SSL_SOURCE.sub("", str(exc))
        verify = getattr(exc, "verify_message", None)
        if verify and verify not in text:
            text = f"{text}: {verify}" if text else str(verify)
        if not text or text.startswith("("):  # e.g. an SSLError with only an errno
            library = getattr(exc, "library", None) or "SSL"
            code = getattr(exc, "reason", None)  # absent when not raised by OpenSSL
            text = f"[{library}: {code}]" if code else type(exc).__name__
        return text
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.strerror:
        text = str(exc.strerror)
    return text or type(exc).__name__


class DeadlineExceeded(TimeoutError):
    """An overall deadline passed while waiting for the peer; `what` names it
    ("DATA" for one message's data, "session" for the whole connection)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} deadline exceeded")
        self.what = what


class _FINGuard(asyncio.BufferedProtocol):
    """Sits between a TLS connection's socket transport and asyncio's SSL
    protocol (public `set_protocol`): everything passes through but the
    peer's TCP FIN, which would make the SSL protocol shut down and silently
    drop the replies still to be written.  The FIN is reported to the
    `Connection` at once (reads end after what was received) and handed to
    the SSL protocol only when we close."""

    def __init__(self, inner: asyncio.BufferedProtocol, connection: Connection) -> None:
        self.inner = inner
        self.connection = connection
        self.fin = False
        self.released = False

    def get_buffer(self, sizehint: int) -> Any:
        return self.inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.connection._rearm_quickack()  # every socket read, whole TLS record or not
        self.inner.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        if self.released or self.connection._transport.is_closing():
            # TLS is shutting down already (our close, or the peer's
            # close_notify): the FIN is what the SSL protocol waits for.
            return self.inner.eof_received()
        self.fin = True
        self.connection._closed_by_peer()
        return True  # keep the socket's write side open

    def release(self) -> None:
        """Our close: now let the SSL protocol see a FIN held back, and finish."""
        self.released = True
        if self.fin:
            with contextlib.suppress(Exception):
                self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


# asyncio's plain `Protocol` path reads with `sock.recv(256 KiB)`: CPython
# allocates 256 KiB for each read and shrinks it to what came, which glibc
# serves (above its mmap threshold) with mmap, mremap and munmap: 18 µs a
# read on our VMs for a 30-byte command, against 3.5 µs for the same read
# into a buffer that stays, copied out (bench/README.md, fourteenth session).  So `_Protocol`
# is a `BufferedProtocol`: the transport (plain socket or asyncio's TLS)
# reads into one buffer of this size per thread, and `buffer_updated`
# copies out at once what came.  One buffer per thread, not per
# connection, so an idle connection costs no more than before: nothing can
# run between the transport's `get_buffer` and its `buffer_updated`.
RECEIVE_SIZE = 256 * 1024


class _ReceiveBuffer(threading.local):
    def __init__(self) -> None:
        self.view = memoryview(bytearray(RECEIVE_SIZE))


_receive_buffer = _ReceiveBuffer()


class _Protocol(asyncio.BufferedProtocol):
    """Feeds received bytes into the owning Connection; handles flow control."""

    def __init__(self) -> None:
        self.connection: Connection | None = None
        self.on_made: Callable[[_Protocol], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.connection = Connection(transport, self)
        if self.on_made is not None:
            self.on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _receive_buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.connection is not None:
            self.connection._received(bytes(_receive_buffer.view[:nbytes]))

    def eof_received(self) -> bool:
        # The peer's FIN ends what it sends, not what it may receive: a client
        # that pipelines ".", "QUIT" and then shuts down its write side still
        # waits for the 250 and the 221 (RFC 2920 §3.1).  Returning True keeps
        # our write side open; the session closes once it has answered.  For
        # TLS the return value is ignored (asyncio's SSL protocol closes and
        # warns if we return True), so say False there.
        if self.connection is None:
            return False
        self.connection._closed_by_peer()
        return not self.connection.tls_active

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connection is not None:
            self.connection._stop_watch()  # its timer must not keep it for minutes
            self.connection._closed_by_peer()
            self.connection._lost.set()
            self.connection._wake_writers()

    def pause_writing(self) -> None:
        if self.connection is not None:
            self.connection._write_paused = True

    def resume_writing(self) -> None:
        if self.connection is not None:
            self.connection._write_paused = False
            self.connection._wake_writers()


# Seconds: a timer fired this early counts as on time (asyncio may run one
# up to its clock's resolution early; re-arming then would spin).
_WATCH_SLACK = max(0.001, time.get_clock_info("monotonic").resolution)
_WATCH_STEP = 60.0  # seconds: how far ahead the watchdog is armed at most (_watch)
HOLD_LIMIT = 16 * 1024  # bytes of held replies (see hold())
HOLD_DELAY = 0.005  # seconds a held reply may wait for the next command's


class Connection:
    """A bidirectional SMTP stream; see the module docstring."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()  # made in the loop's connection_made
        self._buffer = LineBuffer()
        self._held = bytearray()  # replies queued by hold()
        self._hold_timer: asyncio.TimerHandle | None = None
        self._eof = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._write_waiters: list[asyncio.Future[None]] = []
        self._reading_paused = False
        self._lost = asyncio.Event()
        self._fin_guard: _FINGuard | None = None
        self._quickack_sock: Any = None  # set by enable_quickack()
        self._tls = False  # set once start_tls() has put TLS in place (read per command)
        # The current wait for the peer's bytes ends at _wait_until (loop
        # time); _watchdog enforces it (see _watch).
        self._wait_until = 0.0
        self._wait_which: str | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        # The whole session's deadline (loop time), set by the server session.
        self.deadline: float | None = None
        # A unix-domain socket's names are paths (str), not (host, port) tuples.
        peer = transport.get_extra_info("peername")
        peer = peer if isinstance(peer, tuple) else None
        self.peer_ip: str = str(peer[0]) if peer else "unknown"
        self.peer_port: int = int(peer[1]) if peer else 0
        sock = transport.get_extra_info("sockname")
        sock = sock if isinstance(sock, tuple) else None
        self.local_port: int = int(sock[1]) if sock else 0

    # --- state -----------------------------------------------------------------------
    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def tls_version(self) -> str | None:
        obj = self._transport.get_extra_info("ssl_object")
        return obj.version() if obj is not None else None

    @property
    def tls_cipher(self) -> str | None:
        obj = self._transport.get_extra_info("ssl_object")
        if obj is None:
            return None
        cipher = obj.cipher()
        return str(cipher[0]) if cipher else None

    def peer_certificate(self) -> bytes | None:
        """DER of the peer's certificate if TLS is up and it sent a verified one."""
        obj = self._transport.get_extra_info("ssl_object")
        if obj is None:
            return None
        der = obj.getpeercert(binary_form=True)
        return bytes(der) if der else None

    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buffer)

    def discard_buffer(self) -> bytes:
        return self._buffer.take_all()

    @property
    def closed(self) -> bool:
        """True once we closed, or the peer closed (or half-closed) its side:
        nothing more will be read; replies can still be written (plain TCP)."""
        return self._transport.is_closing() or self._eof

    @property
    def can_reply(self) -> bool:
        """Whether bytes written now can still reach the peer: false once we
        closed, and over TLS once the peer's close_notify arrived (a bare FIN
        is held back by `_FINGuard`; see the module docstring)."""
        if self._transport.is_closing():
            return False
        if self._eof and self.tls_active:
            return self._fin_guard is not None and self._fin_guard.fin
        return True

    def enable_quickack(self) -> bool:
        """ACK every read at once from now on (see the module docstring);
        False where the socket cannot (no TCP_QUICKACK, unix-domain socket)."""
        sock = self._transport.get_extra_info("socket")
        if not quickack(sock):
            return False
        self._quickack_sock = sock
        return True

    def _rearm_quickack(self) -> None:
        if self._quickack_sock is not None:
            rearm_quickack(self._quickack_sock)

    # --- protocol callbacks ----------------------------------------------------------
    def _received(self, data: bytes) -> None:
        # Called for every read: the checks are inline, not calls.
        if self._quickack_sock is not None and self._fin_guard is None:
            rearm_quickack(self._quickack_sock)  # over TLS the guard re-arms on each socket read
        buffer = self._buffer
        buffer.feed(data)
        if not self._reading_paused and len(buffer) > HIGH_WATER:
            self._reading_paused = True
            with contextlib.suppress(RuntimeError, AttributeError):
                self._transport.pause_reading()
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _closed_by_peer(self) -> None:
        self._eof = True
        self._wake_reader()

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writers(self) -> None:
        for waiter in self._write_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._write_waiters.clear()

    def _maybe_resume_reading(self) -> None:
        if self._reading_paused and len(self._buffer) < HIGH_WATER // 2:
            self._reading_paused = False
            with contextlib.suppress(RuntimeError, AttributeError):
                self._transport.resume_reading()

    async def _wait_for_data(self, when: float, which: str | None) -> None:
        """Wait for more bytes until `when` (loop time); past it raise
        `DeadlineExceeded(which)`, or `TimeoutError` when `which` is None."""
        self._flush_held()  # the peer may be waiting for these before it sends more
        if self._eof:
            raise ConnectionClosed("connection closed by peer")
        if self._reading_paused:
            self._maybe_resume_reading()
        loop = self._loop
        if loop.time() >= when:
            raise DeadlineExceeded(which) if which is not None else TimeoutError()
        self._read_waiter = waiter = loop.create_future()
        self._wait_until, self._wait_which = when, which
        self._watch(loop, when)
        try:
            await waiter
        finally:
            self._read_waiter = None

    # One timer per connection bounds its waits, armed lazily: a wait whose
    # end is later than the timer's leaves it be (most waits: each command
    # pushes the end 300 s on), and the timer, when it fires early, re-arms
    # itself for the current wait's end.  A timer per wait (asyncio.timeout)
    # cost a heap push, a cancel and a task lookup for every command.  It is
    # armed at most _WATCH_STEP ahead, so a later, shorter wait (DATA's 180 s
    # after the commands' 300 s) finds it early enough: one timer for a
    # whole short session instead of two, a long one re-arms once a step.
    def _watch(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        watchdog = self._watchdog
        if watchdog is not None and watchdog.when() <= when:
            return
        if watchdog is not None:
            watchdog.cancel()
        self._watchdog = loop.call_at(min(when, loop.time() + _WATCH_STEP),
                                      self._watchdog_fired)

    def _watchdog_fired(self) -> None:
        self._watchdog = None
        waiter = self._read_waiter
        if waiter is None or waiter.done():
            return
        loop = waiter.get_loop()
        # The loop may run a timer up to its clock resolution early.
        if loop.time() + _WATCH_SLACK < self._wait_until:
            self._watch(loop, self._wait_until)
            return
        which = self._wait_which
        waiter.set_exception(DeadlineExceeded(which) if which is not None else TimeoutError())

    def _stop_watch(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _bound(self, timeout: float, deadline: float | None = None) -> tuple[float, str | None]:
        """When a wait of `timeout` seconds must end (loop time), and which
        deadline (if any) ends it sooner; raises `DeadlineExceeded` if that
        deadline has already passed."""
        now = self._loop.time()
        when, which = now + timeout, None
        if self.deadline is not None and self.deadline < when:
            when, which = self.deadline, "session"
        if deadline is not None and deadline < when:
            when, which = deadline, "DATA"
        if which is not None and when <= now:
            raise DeadlineExceeded(which)
        return when, which

    # --- reading ---------------------------------------------------------------------
    async def read_line(self, limit: int, timeout: float, *,
                        deadline: float | None = None) -> bytes:
        """Next line including its terminator; see LineBuffer.next_line.

        Lines already received are returned even after the peer's EOF.
        `deadline` (loop time) is a message's, between its BDAT chunks."""
        when, which = self._bound(timeout, deadline)
        while True:
            line = self._buffer.next_line(limit)
            if line is not None:
                if self._reading_paused:
                    self._maybe_resume_reading()
                return line
            await self._wait_for_data(when, which)

    async def read_data(
        self,
        reader: DataReader,
        sink: Callable[[bytes], object],
        timeout: float,
        *,
        deadline: float | None = None,
    ) -> None:
        """Feed DATA bytes through `reader` into `sink` until the end-of-data line.

        `timeout` applies to each wait for more bytes (the RFC 5321 §4.5.3.2.5
        data block timeout); `deadline` (loop time) to the whole transfer: RFC
        5321 defines only per-read timeouts, which a peer dripping one byte
        per (timeout - 1) seconds never trips."""
        while True:
            chunk = self._buffer.take_all()
            if chunk:
                payload, leftover = reader.feed(chunk)
                if payload:
                    sink(payload)
                if leftover is not None:
                    if leftover:
                        self._buffer.feed(leftover)
                    self._maybe_resume_reading()
                    return
            await self._wait_bounded(timeout, deadline)

    async def _wait_bounded(self, timeout: float, deadline: float | None) -> None:
        """Wait for more bytes, at most `timeout` and never past `deadline`."""
        await self._wait_for_data(*self._bound(timeout, deadline))

    async def read_chunk(
        self,
        size: int,
        sink: Callable[[bytes], object],
        timeout: float,
        *,
        deadline: float | None = None,
    ) -> None:
        """Feed exactly `size` octets into `sink` as they arrive (RFC 3030 §2).

        `timeout` applies to each wait for more octets (RFC 5321 §4.5.3.2.5,
        as for DATA), `deadline` (loop time) to the whole message."""
        remaining = size
        while True:
            if remaining and len(self._buffer):
                piece = self._buffer.take(remaining)
                remaining -= len(piece)
                sink(piece)
            if not remaining:
                self._maybe_resume_reading()
                return
            await self._wait_bounded(timeout, deadline)

    # --- writing ---------------------------------------------------------------------
    def line_pending(self) -> bool:
        """Whether the peer's next line is already here (it pipelines)."""
        return self._buffer.has_line()

    def hold(self, data: bytes) -> bool:
        """Queue `data` to go out with the next write, before the next wait, or
        within HOLD_DELAY; False (nothing queued) past HOLD_LIMIT."""
        if len(self._held) + len(data) > HOLD_LIMIT:
            return False
        if not self._held:
            self._hold_timer = self._loop.call_later(HOLD_DELAY, self.flush)
        self._held += data
        return True

    def flush(self) -> None:
        """Send the held replies now (no wait: the transport buffers them)."""
        self._flush_held()

    def _flush_held(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self._held:
            data = bytes(self._held)
            self._held.clear()
            if not self._transport.is_closing() and self.can_reply:
                self._transport.write(data)

    def write_now(self, data: bytes) -> bool:
        """`write()` when it would not wait: True once `data` (after the held
        replies) is handed to the transport; False, with nothing written,
        when `write()` must be awaited (the transport is paused or closing,
        or TLS can no longer reply: `write()` then waits or raises)."""
        if self._write_paused or not self.can_reply:
            return False
        self._transport.write(self._behind_held(data))
        return True

    def _behind_held(self, data: bytes) -> bytes:
        """`data` behind the held replies, which are held no longer."""
        if self._held:
            data = bytes(self._held) + data
            self._held.clear()
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        return data

    async def write(self, data: bytes, timeout: float) -> None:
        if self._transport.is_closing():
            raise ConnectionClosed("connection is closed")
        if not self.can_reply:
            # asyncio's SSL transport has shut down and would drop this silently.
            raise ConnectionClosed("TLS connection closed by peer (close_notify)")
        self._transport.write(self._behind_held(data))
        if self._write_paused:
            # A peer that does not read must not outlast the session deadline.
            when, which = self._bound(timeout)
            try:
                async with asyncio.timeout_at(when):
                    while self._write_paused and not self._transport.is_closing():
                        waiter: asyncio.Future[None] = (
                            asyncio.get_running_loop().create_future())
                        self._write_waiters.append(waiter)
                        await waiter
            except TimeoutError:
                if which is not None:
                    raise DeadlineExceeded(which) from None
                raise
            if self._transport.is_closing():
                raise ConnectionClosed("connection closed while writing")

    # --- TLS -------------------------------------------------------------------------
    async def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float = 60.0,
    ) -> int:
        """Upgrade to TLS on the same connection; returns plaintext bytes discarded.

        The buffer is emptied *before* the handshake: bytes a peer pipelined
        after STARTTLS (server) or after the 220 (client) are an injection
        attempt and must never be read as protected data (RFC 3207 §6)."""
        self._flush_held()  # replies to what came before, in the clear
        dropped = len(self._buffer.take_all())
        loop = asyncio.get_running_loop()
        raw = self._transport
        new_transport = await loop.start_tls(
            raw,
            self._protocol,
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            ssl_handshake_timeout=timeout,
        )
        if new_transport is None:  # pragma: no cover - only when the transport closed
            raise ConnectionClosed("connection closed during TLS handshake")
        assert isinstance(new_transport, asyncio.Transport)
        self._transport = new_transport
        self._tls = True
        ssl_protocol = raw.get_protocol()
        if isinstance(ssl_protocol, asyncio.BufferedProtocol) and not raw.is_closing():
            self._fin_guard = _FINGuard(ssl_protocol, self)
            raw.set_protocol(self._fin_guard)
        return dropped

    async def close(self, timeout: float = 5.0) -> None:
        """Close after flushing what we wrote (and TLS close_notify): the last
        replies to a half-closed peer must reach it.  Bounded by `timeout`;
        then the connection is aborted."""
        self._flush_held()
        self._buffer.take_all()
        if not self._transport.is_closing():
            if not self._tls and not self._transport.get_write_buffer_size():
                # Plain TCP with nothing left to send: the transport reports
                # the loss at the loop's next turn (`BaseTransport.close`),
                # so no timer need bound the wait (one per connection saved).
                self._transport.close()
                await self._lost.wait()
                self._buffer.take_all()
                return
            self._transport.close()
        if self._fin_guard is not None:
            # The peer's FIN was held back from TLS (see _FINGuard): our
            # writes are queued now, so the SSL protocol may finish.
            self._fin_guard.release()
        try:
            async with asyncio.timeout(timeout):
                await self._lost.wait()
        except TimeoutError:
            self._transport.abort()
        finally:
            self._buffer.take_all()

    def abort(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._held.clear()
        self._transport.abort()


async def open_connection(
    host: str,
    port: int,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Connection:
    """Connect as a client (implicit TLS when `ssl_context` is given)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_connection(_Protocol, host, port)
    assert protocol.connection is not None
    conn = protocol.connection
    if ssl_context is not None:
        try:
            await conn.start_tls(ssl_context, server_side=False,
                                 server_hostname=server_hostname or host, timeout=timeout)
        except BaseException:
            conn.abort()
            raise
    return conn


async def open_unix_connection(path: str | os.PathLike[str], *, timeout: float) -> Connection:
    """Connect as a client to a unix-domain stream socket (e.g. an LMTP server)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_unix_connection(_Protocol, os.fspath(path))
    assert protocol.connection is not None
    return protocol.connection


async def _run(handler: Callable[[Connection], Awaitable[None]], conn: Connection,
               ssl_context: ssl.SSLContext | None, tls_handshake_timeout: float) -> None:
    if ssl_context is not None:
        try:
            await conn.start_tls(ssl_context, server_side=True, timeout=tls_handshake_timeout)
        except (OSError, ssl.SSLError, ConnectionClosed) as exc:  # TimeoutError is an OSError
            logging.getLogger("fermoposta.smtp").info(
                "TLS handshake failed from [%s]: %s", conn.peer_ip,
                tls_failure_reason(exc, tls_handshake_timeout))
            conn.abort()
            return
    await handler(conn)


async def start_server(
    handler: Callable[[Connection], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    tls_handshake_timeout: float = 60.0,
) -> asyncio.Server:
    """Listen; run `handler(connection)` as a task for every accepted peer."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def factory() -> _Protocol:
        protocol = _Protocol()

        def made(p: _Protocol) -> None:
            assert p.connection is not None
            if ssl_context is not None:
                # Not one byte of the ClientHello may reach our plaintext
                # buffer (start_tls would drop it): read nothing until the
                # handshake takes the transport over.
                p.connection._transport.pause_reading()
            task: asyncio.Task[None] = loop.create_task(
                _run(handler, p.connection, ssl_context, tls_handshake_timeout))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        protocol.on_made = made
        return protocol

    return await loop.create_server(factory, host, port, reuse_address=True)
