"""Intake floor: how fast MX intake could be if storing a message cost nothing,
against Postfix in the same run, and what the store's commit costs on this disk.

    .venv/bin/python bench/intake_floor.py [--messages 3000] [--rounds 3]
        [--sessions 10] [--keep-connection] [--systems shipped,onewrite,...]

Why: issue 10 asks for MX intake at 1.5 × Postfix.  This tells whether a
cheaper store alone could get there on the machine at hand, or whether the
SMTP side (one Python process) is the limit.

Before the rounds, once (the disk and SQLite, in this process):

- disk: median time of writing, then `fdatasync`, what a lone message's
  commit writes, the way SQLite writes it (17 WAL frames: a 24-byte header
  and a 4 KiB page each, one `pwrite` apiece, back to back), and of
  writing one record of SIZE + 256 bytes the same way (what a journal in
  front of the store, one record a message, would write instead), 1,000
  each, in a file written once beforehand (overwritten, as a WAL in use
  is).
- commit: median time of `SQLiteStore.enqueue_now` (a lone message's commit,
  as the event loop makes it) for 2,000 messages of SIZE bytes, first as
  shipped (`synchronous = FULL`: one fdatasync of the WAL), then with the
  writer connection switched to `synchronous = NORMAL` (no fsync): the
  difference is what the fsync costs.  With the record's figure it says
  what such a journal could save: a commit made of the NORMAL commit and
  the record, against the commit as shipped.

Then each round runs, in a rotating order, `smtp-source -s SESSIONS -m
MESSAGES -l SIZE` (`-d` with `--keep-connection`) into:

- `shipped`: fermoposta's provider on SQLite, as `store_engines.py` runs it;
- `no store`: the same provider, started by a `python -c` that first
  replaces the SQLite store's `enqueue`, `enqueue_now`, `enqueue_batch`
  and `enqueue_batch_now` (the batches the event loop commits since the
  fifteenth session; until the seventeenth they went to the shipped store
  here, so `no store` and `one write` at `-s 10` measured the shipped
  store then) with ones that keep nothing and return a queue id at once: the SMTP side
  alone (sessions, parsing, spooling, logging, replies).  A measurement,
  never a configuration: that provider loses every message by design;
- `one write`: the same, but each `enqueue_now` (each batch) writes its
  body and RECORD_ENVELOPE bytes with one `pwrite` and one `fdatasync`
  into a file written once beforehand: what any store that keeps the
  promise of a 250 must at least do, with no index to find the message
  again.  The most a durable store could reach with this SMTP side;
- `journal`: the shipped provider whose lone messages commit without an
  fsync (`synchronous = NORMAL`) and are then written as such a record and
  fdatasynced, before the 250: a store behind an intake journal (no
  replay: a measurement);
- `store behind`: the shipped provider whose lone messages are written as
  such a record, fdatasynced and answered at once; a thread of the
  provider puts them into the SQLite store afterwards, all those of 5 ms in
  one transaction at `synchronous = NORMAL` (no replay: a measurement; the
  store is closed only once it holds them all);
- `bare asyncio`: not fermoposta at all: a bare asyncio `Protocol` in a
  process of its own (`BARE`), that answers each command by its verb with
  a fixed reply, finds the end of DATA and keeps nothing: what asyncio's
  loop, transports and the kernel cost on this machine, the floor under
  any session logic and any store (nineteenth session: 4.6-5.2 × Postfix);
- `Postfix`: a private Postfix putting every message on hold
  (`../shared/bench/postfix-instance.sh`, as in `store_engines.py`).

Printed: per system the median msgs/s and its range, the provider's CPU per
message (Postfix: all its processes), and each system's ratio to Postfix,
of the medians and of each round's own runs: one write is the most a store
that keeps its promise could reach with this SMTP side, no store the
ceiling a store that cost nothing would reach.

Checks: `shipped`, `journal` and `store behind` hold exactly MESSAGES
afterwards, `no store` and `one write` hold none (and smtp-source got a
250 for each message), `bare asyncio` answered MESSAGES ends of DATA,
Postfix holds MESSAGES.
`--systems` runs only the systems it names (default: all).
Contract: only 127.0.0.1 and free ports; every child stopped by PID; the
work directory removed (unless `--keep`).  Exit 0 when every run finished
and held what it should, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import _common as c
import store_engines as se

DOMAIN = se.DOMAIN
SYSTEMS = ("shipped", "nostore", "onewrite", "journal", "behind", "bare", "postfix")
LABELS = {"shipped": "fermoposta, SQLite", "nostore": "fermoposta, no store",
          "bare": "bare asyncio",
          "journal": "fermoposta, journal",
          "behind": "fermoposta, store behind",
          "onewrite": "fermoposta, one write", "postfix": "Postfix hold queue"}
PAGE = 4096
FRAMES = 17  # WAL frames a lone 4 KiB message's commit writes (strace, 2026-12-07)

# The provider whose store keeps nothing: see the module docstring.
NO_STORE = """
import sys
from fermoposta.store import base, sqlite

def enqueue(self, message, body, queue_id=None):
    return queue_id or base.new_queue_id()

def enqueue_batch(self, items):
    return [queue_id or base.new_queue_id() for _, _, queue_id in items]

sqlite.SQLiteStore.enqueue = sqlite.SQLiteStore.enqueue_now = enqueue
sqlite.SQLiteStore.enqueue_batch = sqlite.SQLiteStore.enqueue_batch_now = enqueue_batch
from fermoposta.cli import main
raise SystemExit(main(sys.argv[1:]))
"""

# The bare asyncio answerer (see the module docstring): `python -c BARE PORT`;
# on SIGTERM it prints how many ends of DATA it answered and exits.
BARE = r"""
import asyncio, signal, sys

answered = 0

class Bare(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer, self.in_data = transport, b"", False
        transport.write(b"220 bare ESMTP\r\n")

    def data_received(self, data):
        global answered
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buffer, self.in_data = self.buffer[end + 5:], False
                answered += 1
                self.transport.write(b"250 2.0.0 Ok\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            verb, self.buffer = self.buffer[:4].upper(), self.buffer[end + 2:]
            if verb == b"EHLO":
                self.transport.write(b"250-bare\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                # The body's first line may be the end: look from its CRLF.
                self.buffer, self.in_data = b"\r\n" + self.buffer, True
                self.transport.write(b"354 Go ahead\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"221 Bye\r\n")
                self.transport.close()
                return
            else:
                self.transport.write(b"250 Ok\r\n")

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Bare, "127.0.0.1", int(sys.argv[1]))
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    await stop
    server.close()
    print(answered, flush=True)

asyncio.run(main())
"""

# What the probe providers below start with: a file of SPAN bytes written
# once, and `record(pieces)`, which writes the pieces, each followed by
# ENVELOPE bytes, with one `pwrite` where the last record ended (from the
# file's start again when full), then one `fdatasync`.
RECORDS = """
import io, os, sys, threading, time
from fermoposta.store import base, sqlite

SPAN, ENVELOPE = {span}, {envelope}
fd = os.open({path!r}, os.O_RDWR | os.O_CREAT, 0o600)
os.write(fd, bytes(SPAN))
os.fsync(fd)
at = 0

def record(pieces):
    global at
    data = b"".join(piece + bytes(ENVELOPE) for piece in pieces)
    if at + len(data) > SPAN:
        at = 0
    os.pwrite(fd, data, at)
    os.fdatasync(fd)
    at += len(data)
"""
# ... and end with the provider itself.
RUN = """
from fermoposta.cli import main
raise SystemExit(main(sys.argv[1:]))
"""

# The provider whose store writes each message once and keeps no index: one
# record a message (a batch: one for all its messages).  What any store that
# keeps the promise of a 250 must at least do: the most a durable store
# could reach with this SMTP side.  A measurement, never a configuration.
ONE_WRITE = RECORDS + """
def enqueue(self, message, body, queue_id=None):
    record([body.read()])
    return queue_id or base.new_queue_id()

def enqueue_batch(self, items):
    record([body.read() for _, body, _ in items])
    return [queue_id or base.new_queue_id() for _, _, queue_id in items]

sqlite.SQLiteStore.enqueue = sqlite.SQLiteStore.enqueue_now = enqueue
sqlite.SQLiteStore.enqueue_batch = sqlite.SQLiteStore.enqueue_batch_now = enqueue_batch
""" + RUN

# The shipped provider whose lone messages (`enqueue_now`) commit without an
# fsync (`synchronous = NORMAL`) and are then written once more as a record:
# what a store behind an intake journal would take, before any replay.  A
# measurement, never a configuration.
JOURNAL = RECORDS + """
def enqueue_now(self, message, body, queue_id=None):
    if self._bytes_to_copy(body, queue_id) > sqlite.INLINE_BODY:
        raise sqlite.WouldBlock()
    with self._write(wait=False, durable=False) as conn:
        message_id = self._enqueue(conn, message, body, queue_id)
        body.seek(0)
        record([body.read()])
    self._forget_stages([message_id])
    return message_id

sqlite.SQLiteStore.enqueue_now = enqueue_now
""" + RUN

# The shipped provider whose lone messages (`enqueue_now`) are written as a
# record and answered at once; a thread of the provider then puts them into
# the SQLite store, those waiting when it wakes and those of the next
# GATHER seconds in one transaction at `synchronous = NORMAL`.  What a store
# that answers after its journal record and fills its tables behind it would
# reach (its replay after a crash left out).  `close()` first waits for the
# thread to catch up, so the store holds every message answered.  A
# measurement, never a configuration.
BEHIND = RECORDS + """
GATHER = 0.005
waiting = []
changed = threading.Condition()
busy = False

def fill(store):
    global waiting, busy
    while True:
        with changed:
            while not waiting:
                changed.wait()
            busy = True
        time.sleep(GATHER)
        with changed:
            items, waiting = waiting, []
        try:
            with store._write(durable=False) as conn:
                for message, data, queue_id in items:
                    store._enqueue(conn, message, io.BytesIO(data), queue_id)
        finally:  # a failure shows as messages missing, not as a provider that never stops
            with changed:
                busy = False
                changed.notify_all()

def enqueue_now(self, message, body, queue_id=None):
    if self._bytes_to_copy(body, queue_id) > sqlite.INLINE_BODY:
        raise sqlite.WouldBlock()
    data = body.read()
    record([data])
    queue_id = queue_id or base.new_queue_id()
    if not hasattr(self, "_filler"):
        self._filler = threading.Thread(target=fill, args=(self,), daemon=True)
        self._filler.start()
    with changed:
        waiting.append((message, data, queue_id))
        changed.notify_all()
    return queue_id

close = sqlite.SQLiteStore.close

def close_after_filling(self):
    with changed:
        while waiting or busy:
            changed.wait()
    close(self)

sqlite.SQLiteStore.enqueue_now = enqueue_now
sqlite.SQLiteStore.close = close_after_filling
""" + RUN


FRAME_HEADER = 24  # bytes before each page of a WAL frame
RECORD_ENVELOPE = 256  # bytes a journal record would add to the body: ids, addresses, checksum
SPAN = 8 << 20  # bytes of the probe file, written once before the timed writes


class ProbeFile:
    """A file of SPAN bytes, written once when opened, that `write_sync`
    then writes to: one `pwrite` of each of `pieces` (sizes in bytes), back
    to back from where the last write ended, wrapping to its start, then
    one `fdatasync`.  So the writes overwrite allocated blocks, as a WAL in
    use is overwritten (extending a file costs more: its size must reach
    the disk too), and, from offset 32 as after a WAL's header, pages are
    not aligned to blocks, as WAL frames are not."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.write(self.fd, b"\0" * SPAN)
        os.fsync(self.fd)
        self.offset = 32

    def write_sync(self, pieces: Sequence[int]) -> None:
        if self.offset + sum(pieces) > SPAN:
            self.offset = 32
        for size in pieces:
            os.pwrite(self.fd, b"p" * size, self.offset)
            self.offset += size
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink()


def write_sync_ms(directory: Path, pieces: Sequence[int], times: int = 1000) -> float:
    """Median ms of `ProbeFile.write_sync(pieces)`: the disk side of a commit."""
    probe = ProbeFile(directory / "write-sync.probe")
    try:
        spent = []
        for _ in range(times):
            start = time.perf_counter()
            probe.write_sync(pieces)
            spent.append(time.perf_counter() - start)
    finally:
        probe.close()
    return statistics.median(spent) * 1000


def commit_ms(directory: Path, size: int, synchronous: str, times: int = 2000, *,
              journal: bool = False) -> float:
    """Median ms of `enqueue_now` for a lone message of `size` bytes; with
    `journal`, each followed by the write and fdatasync of one record of
    `size + RECORD_ENVELOPE` bytes in a file of its own, inside the timing:
    what a store at `synchronous` behind such a journal would take, the
    store's checkpoints (which then fsync what the commits did not) running
    as they do."""
    from fermoposta.store import open_store
    from fermoposta.store.base import MessageOrigin, NewMessage, NewRecipient, RecipientState

    store = open_store(Path(tempfile.mkdtemp(dir=directory)))
    probe = ProbeFile(directory / "journal.probe") if journal else None
    try:
        if synchronous != "FULL":
            # The writer connection itself (a private attribute: a probe, not an
            # API); a durable write keeps it as long as the store's own flag says
            # it is at FULL.
            store._conn.execute(f"PRAGMA synchronous = {synchronous}")  # type: ignore[attr-defined]
        message = NewMessage(sender="sender@bench.test",
                             recipients=(NewRecipient(f"rcpt@{DOMAIN}", DOMAIN,
                                                      RecipientState.HELD),),
                             origin=MessageOrigin.MX, client="bench[127.0.0.1]")
        body = c.make_body(size)
        spent = []
        for _ in range(times):
            start = time.perf_counter()
            store.enqueue_now(message, io.BytesIO(body))
            if probe is not None:
                probe.write_sync([size + RECORD_ENVELOPE])
            spent.append(time.perf_counter() - start)
    finally:
        store.close()
        if probe is not None:
            probe.close()
    return statistics.median(spent) * 1000


def run_provider(system: str, rnd: int, work: Path, args: argparse.Namespace,
                 source_args: list[str]) -> se.Run:
    base = work / f"{system}-r{rnd}"
    mx_port, odmr_port = c.free_port(), c.free_port()
    per_ip = max(20, args.sessions + 10)
    config = c.write_config(base, mx_port=mx_port, odmr_port=odmr_port,
                            limits=f"max_connections_per_ip = {per_ip}\n"
                                   f"max_connections = {max(100, per_ip)}\n")
    c.add_account_cli(config, "acme", [DOMAIN])
    command: tuple[str | os.PathLike[str], ...] = (c.FERMOPOSTA,)
    if system == "nostore":
        command = (c.BIN / "python", "-c", NO_STORE)
    elif system == "onewrite":
        source = ONE_WRITE.format(span=SPAN, envelope=RECORD_ENVELOPE,
                                  path=str(base / "records.floor"))
        command = (c.BIN / "python", "-c", source)
    elif system == "behind":
        source = BEHIND.format(span=SPAN, envelope=RECORD_ENVELOPE,
                               path=str(base / "records.behind"))
        command = (c.BIN / "python", "-c", source)
    elif system == "journal":
        source = JOURNAL.format(span=SPAN, envelope=RECORD_ENVELOPE,
                                path=str(base / "records.journal"))
        command = (c.BIN / "python", "-c", source)
    provider = c.ProviderProcess(config, mx_port, odmr_port, command=command).start()
    try:
        cpu0 = c.cpu_seconds(provider.pid)
        try:
            seconds = c.run_smtp_source(source_args, mx_port, args.timeout)
        except RuntimeError:
            print(provider.log_tail(), file=sys.stderr)
            raise
        cpu = c.cpu_seconds(provider.pid) - cpu0
    finally:
        code = provider.stop()
    held = c.held_count(base / "data", [DOMAIN])
    run = se.Run(system, "intake", rnd, seconds, args.messages, 0, cpu)
    expected = args.messages if system in ("shipped", "journal", "behind") else 0
    if held != expected:
        run.problems.append(f"{held} held after intake, expected {expected}")
    if code != 0:
        run.problems.append(f"provider exited {code}")
    return run


def run_bare(rnd: int, args: argparse.Namespace, source_args: list[str]) -> se.Run:
    """smtp-source against the bare asyncio answerer (`BARE`)."""
    port = c.free_port()
    proc = c.spawn([c.BIN / "python", "-c", BARE, str(port)], stdin=subprocess.DEVNULL,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        c.wait_for_port(port, proc)
        cpu0 = c.cpu_seconds(proc.pid)
        seconds = c.run_smtp_source(source_args, port, args.timeout)
        cpu = c.cpu_seconds(proc.pid) - cpu0
    finally:
        code = c.stop_process(proc)
    assert proc.stdout is not None
    output = proc.stdout.read().decode(errors="replace").strip()
    run = se.Run("bare", "intake", rnd, seconds, args.messages, 0, cpu)
    if code != 0 or output != str(args.messages):
        run.problems.append(f"answered {output or 'nothing'} ends of DATA (exit {code}), "
                            f"expected {args.messages}")
    return run


def summary(runs: list[se.Run]) -> list[str]:
    lines = ["| system | msgs/s (median) | range | CPU ms a message |", "|---|---|---|---|"]
    medians: dict[str, float] = {}
    for system in SYSTEMS:
        rs = [r for r in runs if r.system == system]
        if not rs:
            continue
        medians[system] = statistics.median(r.rate for r in rs)
        cpu = statistics.median(1000 * r.cpu / r.messages for r in rs)
        lines.append(f"| {LABELS[system]} | {medians[system]:.0f} | "
                     f"{min(r.rate for r in rs):.0f}-{max(r.rate for r in rs):.0f} | "
                     f"{cpu:.3f} |")
    postfix = medians.get("postfix", float("nan"))
    ran = [system for system in SYSTEMS if system in medians and system != "postfix"]
    lines += ["", "| against Postfix | ratio of the medians | each round's own ratio, "
                  "median (range) |", "|---|---|---|"]
    lines += [f"| {LABELS[system]} | {c.ratio(medians[system], postfix)} | "
              f"{se.paired_ratio(runs, 'intake', system)} |" for system in ran]
    lines += ["", "(one write: the most a store that keeps its promise could reach with "
                  "this SMTP side; no store: its ceiling; bare asyncio: the floor under "
                  "any SMTP side in one asyncio process)"]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    se.intake_arguments(ap)
    ap.add_argument("--systems", default="",
                    help="comma-separated systems to run (default: all): " + ",".join(SYSTEMS))
    args = ap.parse_args()
    unknown = set(filter(None, args.systems.split(","))) - set(SYSTEMS)
    if unknown:
        ap.error(f"--systems: unknown {', '.join(sorted(unknown))}; "
                 f"choose from {','.join(SYSTEMS)}")
    c.need(c.SMTP_SOURCE)
    problem = se.postfix_problem()
    systems = [s for s in SYSTEMS if (s != "postfix" or problem is None)
               and (not args.systems or s in args.systems.split(","))]
    source_args = se.intake_source_args(args)
    print(f"Intake floor: smtp-source {' '.join(source_args)}, {args.rounds} rounds")
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {c.machine_description()}")
    print(f"Postfix: {problem or 'private instance via ' + str(se.POSTFIX_SCRIPT)}")
    runs: list[se.Run] = []
    failed = False
    try:
        with c.workdir(args.keep, "fermoposta-bench-floor-") as work:
            work.chmod(0o711)  # the postfix user must reach its queue under it
            frames = write_sync_ms(work, [FRAME_HEADER, PAGE] * FRAMES)
            record = write_sync_ms(work, [args.size + RECORD_ENVELOPE])
            print(f"disk: {FRAMES} WAL frames written and fdatasynced {frames:.3f} ms; "
                  f"one record of {args.size + RECORD_ENVELOPE} bytes {record:.3f} ms")
            full = commit_ms(work, args.size, "FULL")
            normal = commit_ms(work, args.size, "NORMAL")
            journal = commit_ms(work, args.size, "NORMAL", journal=True)
            print(f"a lone message's commit (enqueue_now, {args.size} bytes): {full:.3f} ms "
                  f"as shipped, {normal:.3f} ms without its fsync (synchronous = NORMAL), "
                  f"{journal:.3f} ms without it but with a journal record", flush=True)
            for rnd, system in se.rotation(args.rounds, systems):
                try:
                    if system == "postfix":
                        runs += se.run_postfix(rnd, work, args, source_args, drain=False)
                        continue
                    if system == "bare":
                        run = run_bare(rnd, args, source_args)
                    else:
                        run = run_provider(system, rnd, work, args, source_args)
                    runs.append(run)
                    print(f"  round {rnd} {LABELS[system]:22s}: {run.rate:7.0f} msgs/s, "
                          f"CPU {1000 * run.cpu / run.messages:.3f} ms a message"
                          f"{'; ' + '; '.join(run.problems) if run.problems else ''}",
                          flush=True)
                except Exception as exc:  # the run is lost, not the others: go on
                    failed = True
                    print(f"  round {rnd} {LABELS[system]}: FAILED: {exc}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    for line in summary(runs):
        print(line)
    bad = [r for r in runs if r.problems]
    if bad or failed:
        print(f"\n{len(bad)} runs held the wrong count" + (", some failed" if failed else ""))
        return 1
    print(f"\nall {len(runs)} runs held what they should")
    return 0


if __name__ == "__main__":
    sys.exit(main())
