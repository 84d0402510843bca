"""Drain: messages/s that fermoposta delivers to a customer over one ATRN session,
in clear (AUTH CRAM-MD5) and over STARTTLS (AUTH PLAIN), compared with Postfix's
smtp-source sending the same number of messages over one connection to smtp-sink.

    .venv/bin/python bench/drain.py [--messages 5000] [--size 4096]

Setup (timed separately): MESSAGES held messages of about SIZE bytes for
example.org are written straight into the store (SQLiteStore), then
`fermoposta provider run` starts as a child process with a trustme certificate.
The customer is this script: it connects to the ODMR port, authenticates,
sends `ATRN example.org` and then plays a minimal asyncio SMTP server
(220, EHLO with PIPELINING/SIZE/8BITMIME, 250/354/250, 221) that counts and
discards the messages.  The clock runs from sending ATRN to receiving QUIT.
The store is refilled before the STARTTLS run.  The peer is
`smtp-source -d -s 1 -m MESSAGES -l SIZE` -> `smtp-sink` (-d: one connection),
PEER_RUNS times, median used.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import sys
import time
from pathlib import Path

import _common as c


async def one_session(port: int, tls: ssl.SSLContext | None, timeout: float,
                      chunking: bool = False) -> tuple[float, c.ServeStats, float]:
    cust = await c.Customer.connect(port)
    try:
        await cust.hello(tls)
        if tls is None:
            await cust.auth_cram_md5("acme")
        else:
            await cust.auth_plain("acme")
        start = time.perf_counter()
        await cust.cmd("ATRN example.org", 250)
        atrn_reply = time.perf_counter() - start
        stats = await cust.serve(timeout, chunking=chunking)
    finally:
        await cust.close()
    return stats.ended_at - start, stats, atrn_reply


def fill(data_dir: Path, messages: int, size: int, first: bool) -> float:
    from fermoposta.store import open_store

    start = time.perf_counter()
    store = open_store(data_dir)
    try:
        if first:
            c.add_account_store(store, "acme", ["example.org"])
        how = c.bulk_enqueue(store, [("rcpt@example.org", "example.org")] * messages, size)
    finally:
        store.close()
    elapsed = time.perf_counter() - start
    print(f"  setup: {messages} messages enqueued in {elapsed:.2f} s ({how})")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size", type=int, default=4096, help="approximate message size in bytes")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--peer-runs", type=int, default=3,
                    help="smtp-source -> smtp-sink runs (the median is compared)")
    ap.add_argument("--timeout", type=float, default=600.0, help="limit for each drain/run")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    c.need(c.SMTP_SOURCE, c.SMTP_SINK)
    print(f"Drain: {args.messages} held messages of ~{args.size} bytes over one connection")
    print(f"machine: {c.machine_description()}")
    failures = 0
    results: dict[str, float] = {}

    with c.workdir(args.keep, "fermoposta-bench-drain-") as work:
        tls_files = c.make_tls(work / "tls")
        mx_port, odmr_port = c.free_port(), c.free_port()
        config = c.write_config(work, mx_port=mx_port, odmr_port=odmr_port, tls=tls_files,
                                log_level=args.log_level)
        data_dir = work / "data"
        fill(data_dir, args.messages, args.size, first=True)
        provider = c.ProviderProcess(config, mx_port, odmr_port).start()
        try:
            for label, ctx in (("plain, CRAM-MD5", None),
                               ("STARTTLS, PLAIN", tls_files.client_context())):
                if label.startswith("STARTTLS"):
                    fill(data_dir, args.messages, args.size, first=False)
                c.reset_peak_rss(provider.pid)
                before = c.memory(provider.pid)
                cpu0 = c.cpu_seconds(provider.pid)
                try:
                    elapsed, st, atrn_reply = asyncio.run(
                        one_session(odmr_port, ctx, args.timeout))
                except Exception:
                    print(provider.log_tail(), file=sys.stderr)
                    raise
                after = c.memory(provider.pid)
                cpu = c.cpu_seconds(provider.pid) - cpu0
                rate = st.messages / elapsed if elapsed > 0 else 0.0
                results[label] = rate
                print(f"  fermoposta drain ({label}): {st.messages} messages, "
                      f"{st.data_bytes / 2**20:.1f} MiB in {elapsed:.2f} s = {rate:.0f} msgs/s, "
                      f"{st.data_bytes / 2**20 / elapsed:.1f} MiB/s; ATRN->250 "
                      f"{atrn_reply * 1000:.1f} ms; QUIT seen: {st.quit}")
                print(f"    provider CPU {cpu:.2f} s = {100 * cpu / elapsed:.0f}% of one core; "
                      f"{1000 * elapsed / max(st.messages, 1):.2f} ms wall per message")
                print(f"    provider RSS before {c.mib(before.get('VmRSS'))}, after "
                      f"{c.mib(after.get('VmRSS'))}, peak during drain {c.mib(after.get('VmHWM'))}")
                held = c.held_count(data_dir, ["example.org"])
                if st.messages != args.messages or held != 0:
                    failures += 1
                    print(f"    PROBLEM: customer got {st.messages}/{args.messages}, "
                          f"{held} still held; {st.notes}")
                else:
                    print(f"    customer got all {st.messages}; 0 left held in the store")
        finally:
            code = provider.stop()
        print(f"  provider exit code {code}")

    with c.smtp_sink() as (port, _):
        runs = sorted(c.run_smtp_source(["-d", "-s", "1", "-m", str(args.messages), "-l",
                                         str(args.size)], port, args.timeout)
                      for _ in range(max(1, args.peer_runs)))
    peer_s = statistics.median(runs)
    peer = args.messages / peer_s
    print(f"  smtp-source -d -s 1 -m {args.messages} -l {args.size} -> smtp-sink: "
          f"{peer_s:.2f} s = {peer:.0f} msgs/s (median of {len(runs)} runs: "
          f"{', '.join(f'{args.messages / t:.0f}' for t in runs)} msgs/s)")
    plain = results.get("plain, CRAM-MD5", 0.0)
    tls = results.get("STARTTLS, PLAIN", 0.0)
    print(f"  ratio drain plain / smtp-source->smtp-sink: {c.ratio(plain, peer)}")
    print(f"  ratio drain STARTTLS / smtp-source->smtp-sink: {c.ratio(tls, peer)}")
    print(f"  ratio drain STARTTLS / drain plain: {c.ratio(tls, plain)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
