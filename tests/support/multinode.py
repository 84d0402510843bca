"""Helpers for multi-node tests: provider processes on one PostgreSQL schema.

Contract:
- `Node` is one `python -m fermoposta -c <cfg> provider run` process with its
  own config (`[store]` url, `node`, `node_timeout`), ports on 127.0.0.1 and
  log file.  `spawn()`/`wait_ready()` start it (by PID, waiting for its
  listeners), `kill()` sends SIGKILL, `stop()` SIGTERM (then SIGKILL after a
  grace); `cli()`/`acli()` run `fermoposta -c <cfg> ...` with that node's
  config (blocking / in the event loop).  `Cluster` owns several nodes and
  stops every one it started (`close()`, for a fixture's `finally`).
- `TCPForwarder` relays 127.0.0.1:<port> to a target (PostgreSQL) in daemon
  threads; `cut()` stops listening and resets every relayed connection (the
  node sees its database vanish, new connections refused); `restore()`
  listens again on the same port.
- `RecordingSink` is `support.smtp_server.ScriptedSMTP` that also records,
  per recipient, when each transaction carrying it was open: from its RCPT
  to the reply to the end of data (or the end of the connection, whichever
  comes first), so a test can see two transactions for one recipient open
  at once.
- `send_batch` sends many messages over one MX connection (PIPELINING) and
  returns each message's final reply; `Outgoing` builds messages whose
  `Subject:` is a unique key.  `customer_session`/`try_atrn` log a
  customer in on an ODMR listener (STARTTLS, AUTH PLAIN) and ask for ATRN;
  `SlowCustomer` is a `Dialog` whose 250 to each final dot comes late.
These helpers are independent of fermoposta's code (raw sockets, like
`support.dialog`), so an engine bug cannot hide behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from support.dialog import Dialog
from support.smtp_server import ScriptedSMTP, Transaction

FERMOPOSTA = [sys.executable, "-m", "fermoposta"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


# --- provider processes -------------------------------------------------------------------

@dataclass
class Node:
    name: str
    config: Path
    mx: int
    odmr: int
    submission: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        assert self.proc is None, f"{self.name} already runs"
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen([*FERMOPOSTA, "-c", str(self.config), "provider", "run"],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every listener accepts connections; fails if the process exits."""
        deadline = time.monotonic() + timeout
        for port in (self.mx, self.odmr, self.submission):
            while not port_open(port):
                if not self.alive():
                    raise AssertionError(f"{self.name} exited: {self.tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: nothing on port {port}: {self.tail()}")
                time.sleep(0.05)

    def kill(self) -> float:
        """SIGKILL; returns the monotonic time it was sent."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        at = time.monotonic()
        self.proc.wait(10)
        self.proc = None
        return at

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM and wait (SIGKILL after `grace`); the exit code, None if it was killed."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FERMOPOSTA, "-c", str(self.config), *args], input=stdin,
                              capture_output=True, text=True, timeout=60)

    async def acli(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *FERMOPOSTA, "-c", str(self.config), *args, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return proc.returncode or 0, out.decode(), err.decode()

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])


@dataclass
class Cluster:
    nodes: dict[str, Node] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def start(self, *names: str) -> None:
        """Spawn the nodes at once (they migrate the schema concurrently), then wait."""
        chosen = [self.nodes[n] for n in (names or tuple(self.nodes))]
        for node in chosen:
            node.spawn()
        for node in chosen:
            node.wait_ready()

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop(grace=10.0)

    def tails(self) -> str:
        return "\n".join(f"--- {n.name} ---\n{n.tail()}" for n in self.nodes.values())


# --- a forwarder that can cut a node off its database ----------------------------------------

class TCPForwarder:
    """127.0.0.1:`port` relayed to `target`, in daemon threads; see the module docstring."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.port = port
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._flowing = threading.Event()
        self._flowing.set()
        self.accepted = 0

    def start(self) -> int:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = int(listener.getsockname()[1])
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self.port

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut()
            try:
                upstream = socket.create_connection(self.target, 5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()  # frozen: the bytes go nowhere for now
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and reset the relayed ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            listener.close()
        for s in sockets:
            with contextlib.suppress(OSError):
                # SO_LINGER 0: the close sends a RST, as a dead peer's kernel would.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()

    def freeze(self) -> None:
        """A silent partition: connections stay open, no byte gets through."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def restore(self) -> None:
        assert self._listener is None
        self.start()

    def close(self) -> None:
        self.thaw()
        self.cut()


# --- a sink that records when each recipient's transactions were open ----------------------

_connection: contextvars.ContextVar[list[tuple[str, float]]] = contextvars.ContextVar("conn")


@dataclass
class RecordingSink(ScriptedSMTP):
    # recipient -> (opened, closed) of every transaction that carried it
    spans: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        accept_rcpt, accept_data = self.rcpt_policy, self.data_policy

        def on_rcpt(rcpt: str) -> str:
            reply = accept_rcpt(rcpt)
            if reply.startswith("2"):
                _connection.get().append((rcpt, time.monotonic()))
            return reply

        def on_data(txn: Transaction) -> str:
            reply = accept_data(txn)  # first: it may act (kill a node) before the reply
            self._close_open()
            return reply

        self.rcpt_policy, self.data_policy = on_rcpt, on_data

    def _close_open(self) -> None:
        now = time.monotonic()
        opened = _connection.get()
        for rcpt, since in opened:
            self.spans.setdefault(rcpt, []).append((since, now))
        opened.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _connection.set([])  # each connection runs in its own task, so its own context
        try:
            await super()._handle(reader, writer)
        finally:
            self._close_open()

    def delivered(self) -> list[str]:
        """Every recipient of every accepted transaction, repeats included."""
        return [r for t in self.received for r in t.recipients]

    def opened_by(self, moment: float) -> set[str]:
        """Recipients in a transaction opened at or before `moment`."""
        return {rcpt for rcpt, spans in self.spans.items()
                if any(a <= moment for a, _ in spans)}

    def overlaps(self) -> dict[str, list[tuple[float, float]]]:
        """Recipients with two transactions open at the same time."""
        bad = {}
        for rcpt, spans in self.spans.items():
            ordered = sorted(spans)
            if any(b[0] < a[1] for a, b in itertools.pairwise(ordered)):
                bad[rcpt] = ordered
        return bad


# --- bulk senders ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Outgoing:
    key: str  # unique: the Subject and the Message-ID's left part
    sender: str
    recipients: tuple[str, ...]

    @property
    def body(self) -> bytes:
        return (f"From: <{self.sender}>\r\nTo: <{self.recipients[0]}>\r\n"
                f"Subject: {self.key}\r\nMessage-ID: <{self.key}@multinode.test>\r\n"
                f"\r\nbody of {self.key}\r\n").encode()


SUBJECT = re.compile(rb"^Subject: (\S+)\r?$", re.MULTILINE)


def subject_of(body: bytes) -> str:
    found = SUBJECT.search(body)
    assert found is not None, body[:300]
    return found.group(1).decode()


async def send_batch(port: int, messages: Sequence[Outgoing], *, timeout: float = 30.0,
                     login: tuple[ssl.SSLContext, str, str] | None = None,
                     ) -> list[tuple[Outgoing, int, str]]:
    """Send `messages` over one connection (to an MX; with `login` = (TLS
    context, user, password) to a submission listener, after STARTTLS and
    AUTH PLAIN), pipelining MAIL, RCPTs and DATA; return (message, code,
    text) of each one's last reply (code 0: not sent, the connection failed
    before)."""
    results: list[tuple[Outgoing, int, str]] = []
    d = await Dialog.connect("127.0.0.1", port)
    try:
        await d.expect(220, timeout)
        if login is not None:
            await d.cmd("EHLO sender.multinode.test", 250, timeout)
            await d.starttls(login[0])
        lines = await d.cmd("EHLO sender.multinode.test", 250, timeout)
        assert "PIPELINING" in lines, lines
        if login is not None:
            await d.auth_plain(login[1], login[2])
        for message in messages:
            commands = [f"MAIL FROM:<{message.sender}>",
                        *(f"RCPT TO:<{r}>" for r in message.recipients), "DATA"]
            await d.raw("".join(c + "\r\n" for c in commands).encode())
            replies = [await d.reply(timeout) for _ in commands]
            if replies[-1][0] != 354:
                bad = next(r for r in replies if r[0] >= 400)
                results.append((message, bad[0], " ".join(bad[1])))
                if replies[-1][0] < 400:  # cannot happen: DATA without recipients
                    raise AssertionError(replies)
                await d.cmd("RSET", 250, timeout)
                continue
            await d.raw(message.body + b".\r\n")
            code, lines = await d.reply(timeout)
            results.append((message, code, " ".join(lines)))
        with contextlib.suppress(ConnectionError, TimeoutError):
            await d.cmd("QUIT", 221, timeout)
    except (ConnectionError, TimeoutError, OSError):
        pass  # the rest were not sent
    finally:
        await d.close()
    sent = {id(m) for m, _, _ in results}
    results += [(m, 0, "not sent") for m in messages if id(m) not in sent]
    return results


# --- customers -------------------------------------------------------------------------------

class SlowCustomer(Dialog):
    """A customer that takes `delay` seconds (and waits for `hold`, if set)
    before its 250 to each final dot (`DATA_OK`), and whose replies to a
    provider that vanished go nowhere quietly (so `serve_reversed` returns
    its transcript at the EOF)."""

    DATA_OK = "250 2.0.0 OK slowly"

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 delay: float = 0.0, hold: asyncio.Event | None = None) -> None:
        super().__init__(reader, writer)
        self.delay = delay
        self.hold = hold

    async def send(self, line: str | bytes) -> None:
        if line == self.DATA_OK and self.delay:
            await asyncio.sleep(self.delay)
        if line == self.DATA_OK and self.hold is not None:
            await self.hold.wait()
        with contextlib.suppress(ConnectionError):
            await super().send(line)


async def customer_session(port: int, context: ssl.SSLContext, account: str, password: str,
                           *, delay: float = 0.0, hold: asyncio.Event | None = None
                           ) -> SlowCustomer:
    """An ODMR session after STARTTLS and AUTH PLAIN, ready for ATRN."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    d = SlowCustomer(reader, writer, delay, hold)
    try:
        await d.expect(220)
        await d.cmd("EHLO customer.multinode.test", 250)
        await d.starttls(context)
        await d.cmd("EHLO customer.multinode.test", 250)
        await d.auth_plain(account, password)
    except BaseException:
        await d.close()
        raise
    return d


async def try_atrn(d: Dialog, domain: str) -> tuple[int, str]:
    await d.send(f"ATRN {domain}")
    code, lines = await d.reply(30)
    return code, " ".join(lines)


async def atrn_until_served(port: int, context: ssl.SSLContext, account: str, password: str,
                            domain: str, *, within: float, every: float = 0.25,
                            ) -> tuple[SlowCustomer, list[tuple[int, str]]]:
    """ATRN `domain` until it is answered 250 (then the session is reversed:
    serve it), at most `within` seconds; returns the session and the refusals
    before.  A session closed by the server for too many errors (each busy
    451 counts, `[limits] max_errors`) is replaced by a new one, as a real
    customer would reconnect."""
    deadline = time.monotonic() + within
    refusals: list[tuple[int, str]] = []
    d = await customer_session(port, context, account, password)
    try:
        while True:
            code, text = await try_atrn(d, domain)
            if code == 250:
                return d, refusals
            refusals.append((code, text))
            if time.monotonic() > deadline:
                raise AssertionError(f"ATRN {domain} not served within {within}s: {refusals}")
            if code == 421:
                await d.close()
                d = await customer_session(port, context, account, password)
            await asyncio.sleep(every)
    except BaseException:
        await d.close()
        raise

