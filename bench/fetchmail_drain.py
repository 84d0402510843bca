"""Drain to customers that write each SMTP reply separately: fetchmail in ODMR
mode, and a simple Python customer with and without TCP_NODELAY (issue 10).

    .venv/bin/python bench/fetchmail_drain.py [--messages 500] [--size 4096]

For each run, MESSAGES held messages of about SIZE bytes for example.org are
written straight into the store (bulk, timed separately); one
`fermoposta provider run` child serves every run, with a plain `odmr` and an
implicit-TLS `odmr_tls` listener (trustme certificate with a CN, which
fetchmail's `sslcertck` wants).  The customers:

- `fetchmail` (`protocol ODMR`, CRAM-MD5, `smtphost` = Postfix's `smtp-sink`
  on loopback), plain and with `ssl sslcertck`; the clock is fetchmail's whole
  run (start to exit).  fetchmail relays every reply line with its own write
  and does not set TCP_NODELAY.  With `--smtphost postfix` fetchmail's
  `smtphost` is a real Postfix smtpd instead (a private instance,
  `../shared/bench/postfix-instance.sh setup hold`: every message is fsynced
  into its hold queue), a site's usual local MTA; it offers CHUNKING, which
  fetchmail passes on, so the drain sends BDAT with up to 32 messages in
  flight.  Checked: Postfix's hold queue grows by exactly MESSAGES each run.
- a Python customer (blocking socket, this process): EHLO, AUTH CRAM-MD5,
  `ATRN example.org`, then a minimal SMTP server that answers every command
  with its own `sendall()`, without TCP_NODELAY (the stalling kind: Nagle
  holds its second reply until the first is ACKed), then the same with
  TCP_NODELAY.  The clock runs from sending ATRN to receiving QUIT.

Prints msgs/s and ms per message for each; checks that nothing is left held
and that the provider's drain log line says every message was delivered
(and, for the Python customer, that it received all of them).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import _common as c
import store_engines as se

ROUNDS_RE = re.compile(r"fermoposta/drain.*?messages=(\d+), delivered=(\d+)")


def fill(data_dir: Path, messages: int, size: int, first: bool) -> None:
    from fermoposta.store import open_store

    start = time.perf_counter()
    store = open_store(data_dir)
    try:
        if first:
            c.add_account_store(store, "acme", ["example.org"])
        c.bulk_enqueue(store, [("rcpt@example.org", "example.org")] * messages, size)
    finally:
        store.close()
    print(f"  (setup: {messages} messages enqueued in {time.perf_counter() - start:.2f} s)")


def make_tls_cn(directory: Path) -> c.TLSFiles:
    """Like `_common.make_tls`, with a subject CN (fetchmail's sslcertck needs one)."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    files = c.TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(files.ca_file))
    with open(files.cert_file, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(files.key_file))
    return files


# --- fetchmail ---------------------------------------------------------------------------


def run_fetchmail(work: Path, port: int, sink_port: int, tls: c.TLSFiles | None,
                  timeout: float) -> tuple[float, str]:
    home = work / ("fetchmail-ssl" if tls else "fetchmail")
    home.mkdir(exist_ok=True)
    rc = home / "fetchmailrc"
    host = "localhost" if tls else c.HOST
    text = (f'poll {host} protocol ODMR service {port}\n'
            f'  user "acme" password "{c.PASSWORD}" fetchdomains example.org\n'
            f'  smtphost {c.HOST}/{sink_port}\n')
    if tls:
        text += f'  ssl sslcertck sslcertfile "{tls.ca_file}"\n'
    rc.write_text(text)
    rc.chmod(0o600)
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(home),
           "FETCHMAILHOME": str(home)}
    start = time.perf_counter()
    proc = c.spawn(["fetchmail", "-f", rc, "--nodetach", "--nosyslog"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
        elapsed = time.perf_counter() - start
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"fetchmail did not finish within {timeout:.0f}s") from None
    finally:
        c.stop_process(proc, grace=2.0)
    text_out = out.decode(errors="replace")
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"fetchmail exited {proc.returncode}: {text_out[-2000:]}")
    return elapsed, text_out


@contextlib.contextmanager
def postfix_smtpd(work: Path, timeout: float) -> Iterator[tuple[int, Path]]:
    """A private Postfix in hold mode: (its smtpd port, its instance directory)."""
    problem = se.postfix_problem()
    if problem is not None:
        sys.exit(f"--smtphost postfix: {problem}")
    work.chmod(0o711)  # the postfix user must reach its queue under it
    pfx = work / "postfix"
    pfx.mkdir()
    log = work / "postfix.commands.log"
    with c.smtp_sink(backlog=1024) as (sink_port, _):  # its relay target, never used here
        port = c.free_port()
        env = {**os.environ, "PFX": str(pfx), "SMTPD_PORT": str(port),
               "SINK_PORT": str(sink_port), "DRAIN_CONCURRENCY": "1"}
        se.run_command(["bash", se.POSTFIX_SCRIPT, "setup", "hold"], log, timeout, env)
        try:
            se.run_command(["bash", se.POSTFIX_SCRIPT, "start"], log, timeout, env)
            c.wait_for_port(port)
            yield port, pfx
        finally:
            with contextlib.suppress(Exception):
                se.run_command(["bash", se.POSTFIX_SCRIPT, "stop"], log, timeout, env)


def held_by_postfix(pfx: Path, expected: int, timeout: float = 30.0) -> int:
    """Messages in Postfix's queues, once `expected` are there (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        count = se._queued(pfx)
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


# --- the Python customer ---------------------------------------------------------------------


class LineSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def fill(self) -> None:
        data = self.sock.recv(256 * 1024)
        if not data:
            raise c.SMTPError("connection closed")
        self.buf += data

    def line(self) -> bytes:
        while (i := self.buf.find(b"\n")) < 0:
            self.fill()
        out = bytes(self.buf[:i + 1])
        del self.buf[:i + 1]
        return out

    def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            text = self.line().decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if len(text) < 4 or text[3] == " ":
                return int(text[:3]), lines

    def cmd(self, line: str, expect: int) -> list[str]:
        self.sock.sendall(line.encode() + b"\r\n")
        code, lines = self.reply()
        if code != expect:
            raise c.SMTPError(f"{line.split()[0]}: expected {expect}, got {code} {lines}")
        return lines

    def swallow_data(self) -> None:
        while (i := self.buf.find(b"\r\n.\r\n")) < 0:
            if len(self.buf) > 8:
                del self.buf[:-8]  # keep enough for a terminator split across reads
            self.fill()
        del self.buf[:i + 5]


def python_customer(port: int, nodelay: bool, timeout: float) -> tuple[float, int]:
    """The separate-writes customer; returns (ATRN-to-QUIT seconds, messages)."""
    sock = socket.create_connection((c.HOST, port), timeout=timeout)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ls = LineSocket(sock)
    try:
        ls.reply()
        ls.cmd("EHLO customer.example.org", 250)
        challenge = base64.b64decode(ls.cmd("AUTH CRAM-MD5", 334)[0])
        digest = hmac.new(c.PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
        ls.cmd(base64.b64encode(f"acme {digest}".encode()).decode(), 235)
        start = time.perf_counter()
        ls.cmd("ATRN example.org", 250)
        sock.sendall(b"220 customer.example.org ESMTP\r\n")
        messages = 0
        while True:
            verb = ls.line()[:4].upper()
            if verb == b"EHLO":
                sock.sendall(b"250-customer.example.org\r\n250-PIPELINING\r\n"
                             b"250-SIZE 1099511627776\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                sock.sendall(b"250 2.1.0 OK\r\n")
            elif verb == b"RCPT":
                sock.sendall(b"250 2.1.5 OK\r\n")
            elif verb == b"DATA":
                sock.sendall(b"354 go ahead\r\n")
                ls.swallow_data()
                messages += 1
                sock.sendall(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                sock.sendall(b"221 bye\r\n")
                return time.perf_counter() - start, messages
            else:
                sock.sendall(b"250 OK\r\n")
    finally:
        sock.close()


def drain_counts(log: Path, skip: int) -> tuple[int, int] | None:
    """(messages, delivered) of the last drain line after byte `skip` of the log."""
    text = log.read_text(errors="replace")[skip:]
    found = ROUNDS_RE.findall(text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--size", type=int, default=4096, help="approximate message size in bytes")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--timeout", type=float, default=600.0, help="limit for each drain")
    ap.add_argument("--only", default="", help="comma-separated subset of: "
                    "fetchmail,fetchmail-ssl,python,python-nodelay")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--smtphost", choices=("sink", "postfix"), default="sink",
                    help="fetchmail's smtphost: Postfix's smtp-sink (default) or a private "
                         "Postfix smtpd with a hold queue (offers CHUNKING)")
    args = ap.parse_args()
    c.need(c.SMTP_SINK, "/usr/bin/fetchmail")
    if args.log_level not in ("debug", "info"):
        sys.exit("--log-level must be debug or info: the drain log line is checked")
    print(f"Drain to separate-write customers: {args.messages} held messages of "
          f"~{args.size} bytes; fetchmail's smtphost: "
          f"{'a Postfix smtpd (hold queue)' if args.smtphost == 'postfix' else 'smtp-sink'}")
    print(f"machine: {c.machine_description()}")
    runs = ["fetchmail", "fetchmail-ssl", "python", "python-nodelay"]
    if args.only:
        runs = [r for r in runs if r in args.only.split(",")]
    failures = 0
    with c.workdir(args.keep, "fermoposta-bench-fetchmail-") as work:
        tls = make_tls_cn(work / "tls")
        mx_port, odmr_port, tls_port = c.free_port(), c.free_port(), c.free_port()
        config = c.write_config(work, mx_port=mx_port, odmr_port=odmr_port, tls=tls,
                                log_level=args.log_level,
                                listen=f'odmr_tls = "{c.HOST}:{tls_port}"\n')
        data_dir = work / "data"
        first = True
        provider = c.ProviderProcess(config, mx_port, odmr_port).start()
        try:
            with contextlib.ExitStack() as stack:
                pfx: Path | None = None
                if args.smtphost == "postfix":
                    sink_port, pfx = stack.enter_context(postfix_smtpd(work, args.timeout))
                else:
                    sink_port, _ = stack.enter_context(c.smtp_sink())
                for run in runs:
                    before = se._queued(pfx) if pfx is not None else 0
                    fill(data_dir, args.messages, args.size, first)
                    first = False
                    skip = provider.log_path.stat().st_size
                    cpu0 = c.cpu_seconds(provider.pid)
                    got: int | None = None
                    try:
                        if run.startswith("fetchmail"):
                            ssl_files = tls if run == "fetchmail-ssl" else None
                            elapsed, _out = run_fetchmail(
                                work, tls_port if ssl_files else odmr_port, sink_port,
                                ssl_files, args.timeout)
                        else:
                            elapsed, got = python_customer(odmr_port, run.endswith("nodelay"),
                                                           args.timeout)
                    except Exception:
                        print(provider.log_tail(), file=sys.stderr)
                        raise
                    cpu = c.cpu_seconds(provider.pid) - cpu0
                    time.sleep(0.2)  # the drain line is logged after QUIT
                    counts = drain_counts(provider.log_path, skip)
                    held = c.held_count(data_dir, ["example.org"])
                    rate = args.messages / elapsed
                    print(f"  {run:15s} {rate:7.1f} msgs/s  {1000 * elapsed / args.messages:6.2f}"
                          f" ms/message  ({elapsed:.2f} s; provider CPU "
                          f"{100 * cpu / elapsed:.0f}% of a core)")
                    if pfx is not None and run.startswith("fetchmail"):
                        got = held_by_postfix(pfx, before + args.messages) - before
                    ok = (held == 0 and counts == (args.messages, args.messages)
                          and got in (None, args.messages))
                    if not ok:
                        failures += 1
                        print(f"    PROBLEM: drain log (messages, delivered) = {counts}, "
                              f"{held} still held, customer got {got}")
        finally:
            code = provider.stop()
        print(f"  provider exit code {code}; {'all delivered, none held' if not failures else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
