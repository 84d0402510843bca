"""Outbound: messages/s that fermoposta's outbound engine delivers from its queue
to smtp-sink with 1 and 20 connections, next to Postfix delivering the same
number of queued messages to the same sink in the same run.

    .venv/bin/python bench/outbound.py [--messages 5000] [--size 4096] [--connections 1,20]

fermoposta: MESSAGES messages of about SIZE bytes, each with one OUTBOUND
recipient rcpt@dest.bench.test, are written straight into a fresh store (setup
timed separately); a transport route sends dest.bench.test to smtp-sink;
`[outbound] concurrency` and `concurrency_per_destination` are the number of
connections.  The engine runs in this process (`OutboundRunner.run_once()`,
logging at --log-level to a file): the clock runs from the first claim until
every recipient is recorded as delivered (each outcome committed with fsync).
Checks: every message delivered, the queue empty.

Postfix (3.x, Debian's package; needs root and the `postfix` user): a private
instance with its own config and queue directory under the work directory
(`postfix -c DIR start`), no chroot, an smtpd on a free 127.0.0.1 port that
puts every message on hold (`check_client_access static:HOLD`), relayhost =
the same smtp-sink, `default_destination_concurrency_limit` and
`initial_destination_concurrency` = the number of connections.
`smtp-source -s 10` fills the hold queue (timed separately); the clock runs
from `postsuper -H ALL` + `postqueue -f` until the queue directories are
empty; its log must show MESSAGES "status=sent".  The instance is stopped with
`postfix -c DIR stop`, then its master is killed by PID if it lingers.  When
Postfix cannot run here the script says so and compares with
`smtp-source -d -s N` -> smtp-sink only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _common as c

DOMAIN = "dest.bench.test"


# --- fermoposta ----------------------------------------------------------------------------


def fill(store: object, messages: int, size: int, batch: int = 2000) -> None:
    """Enqueue OUTBOUND messages with the store's own row writer, `batch` per
    transaction (or the public enqueue if the private API changed)."""
    from fermoposta.store import MessageOrigin, NewMessage, NewRecipient, RecipientState

    def message(seq: int) -> NewMessage:
        return NewMessage(sender="sender@bench.test",
                          recipients=(NewRecipient(f"rcpt{seq}@{DOMAIN}", DOMAIN,
                                                   RecipientState.OUTBOUND),),
                          origin=MessageOrigin.SUBMISSION, client="bench[127.0.0.1]")

    body = c.make_body(size)
    writer = getattr(store, "_write", None)
    enqueue_row = getattr(store, "_enqueue", None)
    if writer is not None and enqueue_row is not None:
        for start in range(0, messages, batch):
            with writer() as conn:
                for seq in range(start, min(messages, start + batch)):
                    enqueue_row(conn, message(seq), io.BytesIO(body))
        return
    for seq in range(messages):
        store.enqueue(message(seq), io.BytesIO(body))  # type: ignore[attr-defined]


def run_fermoposta(base: Path, sink_port: int, connections: int, messages: int, size: int,
                   log_level: str) -> tuple[float, str]:
    from fermoposta.config import load_provider_config
    from fermoposta.ops.log import setup_logging
    from fermoposta.provider.outbound import OutboundRunner
    from fermoposta.store import open_store

    directory = base / f"fermoposta-{connections}"
    directory.mkdir()
    config_path = directory / "provider.toml"
    config_path.write_text(
        f'hostname = "mx.provider.test"\ndata_dir = "{directory / "data"}"\n\n'
        '[listen]\nmx = ""\nodmr = ""\nsubmission = ""\n\n'
        f'[outbound]\ntransport = {{ "{DOMAIN}" = "{c.HOST}:{sink_port}" }}\n'
        f"concurrency = {connections}\nconcurrency_per_destination = {connections}\n")
    config = load_provider_config(config_path)
    store = open_store(config.data_dir)
    log = open(directory / "outbound.log", "w")  # noqa: SIM115
    try:
        start = time.perf_counter()
        fill(store, messages, size)
        print(f"  setup: {messages} messages enqueued in {time.perf_counter() - start:.2f} s")
        setup_logging(log_level, "text", log)
        runner = OutboundRunner(config, store)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        handled = asyncio.run(runner.run_once())
        elapsed = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        left = store._conn.execute("SELECT COUNT(*) FROM recipients").fetchone()[0]  # type: ignore[attr-defined]
    finally:
        store.close()
        # Lines go back to stderr before the file closes: the next run's
        # setup_logging flushes the handler it replaces.
        setup_logging(log_level, "text")
        log.close()
    ok = handled == messages and runner.delivered == messages and left == 0
    note = (f"CPU {100 * cpu / elapsed:.0f}% of a core, {runner.connections} connection(s) "
            f"opened, peak {runner.max_connections_seen} at once")
    if not ok:
        raise RuntimeError(f"fermoposta: handled {handled}, delivered {runner.delivered}, "
                           f"{left} recipients left in the queue")
    return elapsed, note


# --- Postfix ---------------------------------------------------------------------------------

MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
mydestination =
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [{host}]:{sink}
smtpd_client_restrictions = check_client_access static:HOLD
maillog_file_prefixes = {dir}
maillog_file = {dir}/postfix.log
default_destination_concurrency_limit = {n}
smtp_destination_concurrency_limit = {n}
initial_destination_concurrency = {n}
smtp_tls_security_level = none
smtpd_tls_security_level = none
alias_maps =
alias_database =
local_recipient_maps =
biff = no
"""

QUEUES = ("incoming", "active", "deferred", "hold", "maildrop")


def postfix_problem() -> str | None:
    if os.geteuid() != 0:
        return "Postfix needs root to start"
    for program in ("postfix", "postsuper", "postqueue"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix user"
    return None


def _postfix_cmd(*args: str, timeout: float = 60.0) -> str:
    # Postfix writes its errors to stderr only on a terminal; `script` gives it one.
    proc = subprocess.run(["script", "-qc", " ".join(args), "/dev/null"], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or "fatal:" in out:
        raise RuntimeError(f"{' '.join(args)}: {out or f'exit {proc.returncode}'}")
    return out


def _queued(directory: Path) -> int:
    return sum(1 for q in QUEUES for p in (directory / "queue" / q).rglob("*") if p.is_file())


def _master_pid(directory: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((directory / "queue" / "pid" / "master.pid").read_text().split()[0])
    return None


def run_postfix(base: Path, sink_port: int, connections: int, messages: int, size: int,
                timeout: float) -> tuple[float, str]:
    directory = base / f"postfix-{connections}"
    base.chmod(0o711)  # mkdtemp makes it 0700: the postfix user must reach its queue
    conf = directory / "conf"
    conf.mkdir(parents=True)
    (directory / "queue").mkdir()
    (directory / "data").mkdir()
    pw = pwd.getpwnam("postfix")
    os.chown(directory / "data", pw.pw_uid, pw.pw_gid)
    smtpd_port = c.free_port()
    (conf / "main.cf").write_text(MAIN_CF.format(dir=directory, host=c.HOST, sink=sink_port,
                                                 n=connections))
    (conf / "master.cf").write_text(MASTER_CF.format(host=c.HOST, port=smtpd_port))
    _postfix_cmd("postfix", "-c", str(conf), "start")
    try:
        c.wait_for_port(smtpd_port)
        intake = c.run_smtp_source(["-s", "10", "-m", str(messages), "-l", str(size),
                                    "-f", "sender@bench.test", "-t", f"rcpt@{DOMAIN}"],
                                   smtpd_port, timeout)
        deadline = time.monotonic() + timeout
        while len(list((directory / "queue" / "hold").rglob("*"))) < messages:
            if time.monotonic() > deadline:
                raise RuntimeError("Postfix did not put every message on hold")
            time.sleep(0.05)
        print(f"  setup: {messages} messages put on hold through Postfix's smtpd in "
              f"{intake:.2f} s")
        start = time.perf_counter()
        _postfix_cmd("postsuper", "-c", str(conf), "-H", "ALL")
        _postfix_cmd("postqueue", "-c", str(conf), "-f")
        while _queued(directory) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Postfix still has {_queued(directory)} messages queued")
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
    finally:
        pid = _master_pid(directory)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _postfix_cmd("postfix", "-c", str(conf), "stop")
        if pid is not None:
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    log = (directory / "postfix.log").read_text(errors="replace")
    sent = log.count("status=sent")
    if sent != messages:
        raise RuntimeError(f"Postfix logged {sent} status=sent, expected {messages}")
    return elapsed, f"status=sent logged {sent} times"


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size", type=int, default=4096, help="approximate message size in bytes")
    ap.add_argument("--connections", default="1,20", help="comma-separated connection counts")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--no-postfix", action="store_true", help="skip the Postfix comparison")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    c.need(c.SMTP_SINK, c.SMTP_SOURCE)
    counts = [int(n) for n in args.connections.split(",") if n.strip()]
    print(f"Outbound: {args.messages} queued messages of ~{args.size} bytes to smtp-sink")
    print(f"machine: {c.machine_description()}")
    problem = "skipped (--no-postfix)" if args.no_postfix else postfix_problem()
    rows: list[tuple[str, int, float, str]] = []
    failures = 0
    with c.workdir(args.keep, "fermoposta-bench-outbound-") as base, c.smtp_sink() as (port, _):
        for n in counts:
            print(f"fermoposta, {n} connection(s):")
            try:
                elapsed, note = run_fermoposta(base, port, n, args.messages, args.size,
                                               args.log_level)
                rows.append(("fermoposta", n, elapsed, note))
                print(f"  {args.messages / elapsed:.0f} msgs/s ({elapsed:.2f} s); {note}")
            except Exception as exc:
                failures += 1
                print(f"  FAILED: {exc}")
            if problem is None:
                print(f"Postfix, {n} connection(s):")
                try:
                    elapsed, note = run_postfix(base, port, n, args.messages, args.size,
                                                args.timeout)
                    rows.append(("postfix", n, elapsed, note))
                    print(f"  {args.messages / elapsed:.0f} msgs/s ({elapsed:.2f} s); {note}")
                except Exception as exc:
                    failures += 1
                    print(f"  FAILED: {exc}")
            print(f"smtp-source -d -s {n} -> smtp-sink (no queue, the ceiling):")
            try:
                elapsed = c.run_smtp_source(["-d", "-s", str(n), "-m", str(args.messages),
                                             "-l", str(args.size)], port, args.timeout)
                rows.append(("smtp-source", n, elapsed, ""))
                print(f"  {args.messages / elapsed:.0f} msgs/s ({elapsed:.2f} s)")
            except Exception as exc:
                failures += 1
                print(f"  FAILED: {exc}")
    if problem is not None:
        print(f"Postfix comparison: {problem}")
    print()
    print(f"{'sender':<12} {'conns':>5} {'msgs/s':>8} {'seconds':>8}  msgs/s / Postfix's")
    postfix = {n: t for who, n, t, _ in rows if who == "postfix"}
    for who, n, elapsed, _ in rows:
        versus = c.ratio(postfix[n], elapsed) if who == "fermoposta" and n in postfix else ""
        print(f"{who:<12} {n:>5} {args.messages / elapsed:>8.0f} {elapsed:>8.2f}  {versus}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
