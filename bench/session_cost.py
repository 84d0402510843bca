"""What one MX message costs the provider's Python, without the kernel and
without the disk: an instrument for changes to the SMTP side (issue 10).

    .venv/bin/python bench/session_cost.py [--messages 3000] [--sessions 10]
        [--keep-connection] [--repeat 5] [--log-level info] [--instructions]

Why: the end-to-end benchmarks (`store_engines.py`, `intake_floor.py`)
measure what users see, but on these shared virtual machines their figures
move by 10-30% within minutes, so a change worth 3% cannot be told from
noise. This script takes the network and the disk out and, with
`--instructions`, the machine's speed too.

What it runs, in this one process and one event loop: `SESSIONS` clients
like `smtp-source` (each waits for every reply before its next command),
each talking to a real `MXSession` (the provider's, with its group commit,
limits, log lines and metrics) through a fake transport that hands the
bytes across in memory, one read a loop turn. The store is a real SQLite
store in a temporary directory under `/dev/shm` (no fsync reaches a disk),
with one account and its domain. Each client opens a connection for each
message (EHLO, MAIL, RCPT, DATA with a 4 KiB body, QUIT), or with
`--keep-connection` one connection for all its messages (`smtp-source -d`).
The log goes to /dev/null at `--log-level`.

Printed: the CPU time (`time.process_time`, all threads) a message of each
of `REPEAT` runs of `MESSAGES`, after a warm-up of 500, and their median.
With `--instructions` the script runs itself twice under `valgrind
--tool=callgrind` (200 and 1,200 messages, one run each) and prints the
instructions a message, the difference of the two totals over 1,000: the
same code gives the same count within about 1.5%, whatever else the machine
does. Slow (under a minute) and needs valgrind.

It drives the connection layer the way asyncio's transport does, through
`net.connection`'s protocol class and task runner (private names: this is
an instrument of the package's own code, not a client of it).

Checks: every run stores exactly the messages it sent (the store's count
grows by as many), every reply is the one expected. Contract: no socket,
no child process but valgrind's; the temporary directory is removed. Exit 0
when every run stored what it should, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

from fermoposta.net import connection as connection_module
from fermoposta.net.connection import Connection
from fermoposta.net.server_session import SessionLimits
from fermoposta.ops.log import setup_logging
from fermoposta.provider.mx import MXSession
from fermoposta.store import open_store
from fermoposta.store.group_commit import GroupCommit

DOMAIN = "example.com"
WARM_UP = 500
BODY = c.make_body(4096)
if not BODY.endswith(b"\r\n"):
    BODY += b"\r\n"
# What each step must get: greeting and QUIT aside, one reply a command.
EXPECTED = {b"EHLO": b"250", b"MAIL": b"250", b"RCPT": b"250", b"DATA": b"354",
            b"BODY": b"250", b"QUIT": b"221", b"": b"220"}


class MemoryTransport(asyncio.Transport):
    """The server side's transport: writes go to the client at once."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self._closing = False
        self._extra = {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.client.replied(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            asyncio.get_running_loop().call_soon(self.client.lost)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class Run:
    """One run: its clients share the counts and the sessions' tasks."""

    def __init__(self, store: Any, messages: int) -> None:
        self.store = store
        self.intake = GroupCommit(store)
        self.limits = SessionLimits()
        self.to_send = messages
        self.queued = 0
        self.problems: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.finished = 0

    async def serve(self, conn: Connection) -> None:
        await MXSession(conn, hostname="mx.provider.test", limits=self.limits,
                        store=self.store, intake=self.intake).run()


class Client:
    """Like one `smtp-source` session: the next command only after the reply."""

    def __init__(self, run: Run, per_connection: int) -> None:
        self.run = run
        self.per_connection = per_connection
        self.loop = asyncio.get_running_loop()
        self.connect()

    def connect(self) -> None:
        self.steps = self.script()
        self.waiting_for = b""  # the greeting
        self.protocol = connection_module._Protocol()
        self.transport = MemoryTransport(self)

        def made(protocol: connection_module._Protocol) -> None:
            assert protocol.connection is not None
            task = self.loop.create_task(connection_module._run(
                self.run.serve, protocol.connection, None, 60.0))
            self.run.tasks.add(task)
            task.add_done_callback(self.run.tasks.discard)

        self.protocol.on_made = made
        self.protocol.connection_made(self.transport)

    def script(self) -> Iterator[tuple[bytes, bytes]]:
        yield b"EHLO", b"EHLO client.test\r\n"
        for _ in range(self.per_connection):
            if self.run.to_send <= 0:
                break
            self.run.to_send -= 1
            yield b"MAIL", b"MAIL FROM:<a@b.test>\r\n"
            yield b"RCPT", f"RCPT TO:<x@{DOMAIN}>\r\n".encode()
            yield b"DATA", b"DATA\r\n"
            yield b"BODY", BODY + b".\r\n"
        yield b"QUIT", b"QUIT\r\n"

    def replied(self, data: bytes) -> None:
        for line in data.split(b"\r\n"):
            if len(line) < 4 or line[3:4] != b" ":
                continue  # a continuation line, or the split's empty tail
            if not line.startswith(EXPECTED[self.waiting_for]):
                self.run.problems.append(f"{self.waiting_for!r} got {line!r}")
            if self.waiting_for == b"BODY" and line.startswith(b"250"):
                self.run.queued += 1
            step = next(self.steps, None)
            if step is not None:
                self.waiting_for, command = step
                self.loop.call_soon(self.feed, command)

    def feed(self, data: bytes) -> None:
        """As a transport hands a read to a `BufferedProtocol`."""
        view = self.protocol.get_buffer(len(data))
        view[: len(data)] = data
        self.protocol.buffer_updated(len(data))

    def lost(self) -> None:
        self.protocol.connection_lost(None)
        if self.run.to_send > 0:
            self.connect()
        else:
            self.run.finished += 1


async def one_run(store: Any, messages: int, sessions: int, keep: bool
                  ) -> tuple[float, list[str]]:
    """CPU seconds a message of one run, and what went wrong."""
    run = Run(store, messages)
    per_connection = -(-messages // sessions) if keep else 1
    held_before = len(store.held_message_ids([DOMAIN]))
    started = time.process_time()
    for _ in range(sessions):
        Client(run, per_connection)
    while run.finished < sessions or run.tasks:
        await asyncio.sleep(0.001)
    cpu = time.process_time() - started
    held = len(store.held_message_ids([DOMAIN])) - held_before
    problems = list(run.problems)
    if run.queued != messages or held != messages:
        problems.append(f"{run.queued} answered 250 and {held} held of {messages}")
    return cpu / messages, problems


async def measure(args: argparse.Namespace, store: Any) -> int:
    await one_run(store, WARM_UP, args.sessions, args.keep_connection)
    costs, failed = [], False
    for _ in range(args.repeat):
        cost, problems = await one_run(store, args.messages, args.sessions,
                                       args.keep_connection)
        costs.append(cost * 1e6)
        for problem in problems[:5]:
            print(f"problem: {problem}", file=sys.stderr)
        failed = failed or bool(problems)
    print(f"CPU a message: median {statistics.median(costs):.1f} µs "
          f"(runs: {', '.join(f'{x:.1f}' for x in costs)})")
    return 1 if failed else 0


def instructions(args: argparse.Namespace) -> int:
    """Instructions a message: two runs under callgrind, 1,000 messages apart."""
    if shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    totals = []
    with tempfile.TemporaryDirectory(prefix="session-cost-") as out:
        for messages in (200, 1200):
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p",
                       sys.executable, __file__, "--messages", str(messages),
                       "--repeat", "1", "--sessions", str(args.sessions),
                       "--log-level", args.log_level]
            if args.keep_connection:
                command.append("--keep-connection")
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            found = re.search(r"Collected : (\d+)", done.stderr)
            if done.returncode != 0 or found is None:
                print(done.stdout, done.stderr[-2000:], file=sys.stderr)
                return 1
            totals.append(int(found.group(1)))
    print(f"instructions a message: {(totals[1] - totals[0]) / 1000:,.0f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000, help="messages a run")
    ap.add_argument("--sessions", type=int, default=10, help="clients at once")
    ap.add_argument("--keep-connection", action="store_true",
                    help="one connection a client for all its messages (smtp-source -d)")
    ap.add_argument("--repeat", type=int, default=5, help="runs after the warm-up")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions a message under valgrind instead")
    args = ap.parse_args()
    if args.instructions:
        return instructions(args)
    setup_logging(args.log_level, stream=open(os.devnull, "w"))  # noqa: SIM115
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    directory = Path(tempfile.mkdtemp(prefix="session-cost-", dir=base))
    try:
        store = open_store(directory)
        try:
            c.add_account_store(store, "acme", [DOMAIN])
            return asyncio.run(measure(args, store))
        finally:
            store.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
