"""ATRN reply time with a big queue: 100,000 held messages across 1,000 domains.

    .venv/bin/python bench/atrn_latency.py [--messages 100000] [--domains 1000]
        [--domains-per-account 100] [--runs 7] [--size 1024]

Setup (timed and printed separately): one SQLite store with ACCOUNTS =
DOMAINS / DOMAINS-PER-ACCOUNT accounts, each owning DOMAINS-PER-ACCOUNT
domains, MESSAGES held messages spread round-robin over all domains (so 100 per
domain by default), enqueued in batches straight into the store; plus an
account `vacant` owning DOMAINS-PER-ACCOUNT domains with no mail.  Then
`fermoposta provider run` starts as a child process.

Each run is a fresh ODMR connection (EHLO, AUTH CRAM-MD5) and the clock runs
from sending the ATRN line to receiving the complete reply:
  - `ATRN <one domain with mail>`                  -> 250
  - `ATRN` (bare) by an account with 100 domains   -> 250
  - `ATRN <one empty domain>`                      -> 453
  - `ATRN` (bare) by `vacant` (100 empty domains)  -> 453
  - `NOOP` in the same state, as the round-trip floor.
After a 250 the customer greets with 554 and answers the provider's QUIT, so
nothing is drained and every run sees the same queue.  Median and max are
printed for each case.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import _common as c


def domain_name(i: int) -> str:
    return f"d{i:05d}.test"


def setup(data_dir: Path, args: argparse.Namespace) -> None:
    from fermoposta.store import open_store

    accounts = args.domains // args.domains_per_account
    t0 = time.perf_counter()
    store = open_store(data_dir)
    try:
        for a in range(accounts):
            names = [domain_name(a * args.domains_per_account + j)
                     for j in range(args.domains_per_account)]
            c.add_account_store(store, f"acct{a:04d}", names)
        c.add_account_store(store, "vacant",
                            [f"v{j:05d}.test" for j in range(args.domains_per_account)])
        t1 = time.perf_counter()
        print(f"  setup: {accounts + 1} accounts, {args.domains + args.domains_per_account} "
              f"domains in {t1 - t0:.2f} s")
        domains = [domain_name(i) for i in range(args.domains)]
        items = [(f"user{i % 7}@{domains[i % len(domains)]}", domains[i % len(domains)])
                 for i in range(args.messages)]
        how = c.bulk_enqueue(store, items, args.size, batch=args.batch)
        t2 = time.perf_counter()
        print(f"  setup: {args.messages} messages of ~{args.size} bytes enqueued in "
              f"{t2 - t1:.2f} s ({args.messages / (t2 - t1):.0f} msgs/s, {how})")
    finally:
        store.close()
    size = sum(p.stat().st_size for p in data_dir.iterdir())
    print(f"  store size on disk: {size / 2**20:.0f} MiB")


async def atrn_once(port: int, user: str, line: str, expect: int) -> float:
    cust = await c.Customer.connect(port)
    try:
        await cust.hello(None)
        await cust.auth_cram_md5(user)
        start = time.perf_counter()
        code, lines = await cust.cmd(line, timeout=120.0)
        elapsed = time.perf_counter() - start
        if code != expect:
            raise c.SMTPError(f"{line!r}: expected {expect}, got {code} {lines}")
        if code == 250 and line.upper().startswith("ATRN"):
            # Refuse the turnaround: the provider sends QUIT and drains nothing.
            await cust.send("554 5.3.2 bench customer: not now")
            reply = await cust.readline(60.0)
            if reply[:4].upper() == b"QUIT":
                await cust.send("221 bye")
        else:
            await cust.send("QUIT")
        # Wait for the provider to close (its leases are released before that).
        with_eof = True
        try:
            while True:
                await cust.readline(30.0)
        except c.SMTPError:
            pass
        except TimeoutError:
            with_eof = False
        if not with_eof:
            raise c.SMTPError("provider did not close the session")
        return elapsed
    finally:
        await cust.close()


def measure(port: int, runs: int, cases: list[tuple[str, str, list[str], int]]) -> list[str]:
    rows = []
    for label, user, lines, expect in cases:
        times = []
        for i in range(runs):
            times.append(asyncio.run(atrn_once(port, user, lines[i % len(lines)], expect)))
        ms = [t * 1000 for t in times]
        row = (f"  {label:<46} median {statistics.median(ms):8.2f} ms   max {max(ms):8.2f} ms"
               f"   (min {min(ms):.2f}, n={runs})")
        print(row)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--domains-per-account", type=int, default=100)
    ap.add_argument("--size", type=int, default=1024, help="approximate message size in bytes")
    ap.add_argument("--runs", type=int, default=7, help="runs per case")
    ap.add_argument("--batch", type=int, default=5000, help="messages per setup transaction")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if args.domains % args.domains_per_account:
        ap.error("--domains must be a multiple of --domains-per-account")
    per_domain = args.messages / args.domains
    print(f"ATRN latency: {args.messages} held messages across {args.domains} domains "
          f"({per_domain:.0f} per domain), {args.domains // args.domains_per_account} accounts of "
          f"{args.domains_per_account} domains")
    print(f"machine: {c.machine_description()}")
    with c.workdir(args.keep, "fermoposta-bench-atrn-") as work:
        mx_port, odmr_port = c.free_port(), c.free_port()
        config = c.write_config(work, mx_port=mx_port, odmr_port=odmr_port,
                                log_level=args.log_level)
        setup(work / "data", args)
        t0 = time.perf_counter()
        provider = c.ProviderProcess(config, mx_port, odmr_port).start()
        print(f"  provider started in {time.perf_counter() - t0:.2f} s")
        try:
            dpa = args.domains_per_account
            # Single-domain ATRNs for different domains of acct0000 (100 held each).
            singles = [f"ATRN {domain_name(j * max(1, dpa // args.runs) % dpa)}"
                       for j in range(args.runs)]
            cases = [
                ("NOOP (round-trip floor)", "acct0000", ["NOOP"], 250),
                (f"ATRN <1 domain, {per_domain:.0f} held> -> 250", "acct0000", singles, 250),
                (f"ATRN (bare, {dpa} domains, {per_domain * dpa:.0f} held) -> 250",
                 "acct0001", ["ATRN"], 250),
                ("ATRN <1 empty domain> -> 453", "vacant", ["ATRN v00000.test"], 453),
                (f"ATRN (bare, {dpa} empty domains) -> 453", "vacant", ["ATRN"], 453),
            ]
            try:
                measure(odmr_port, args.runs, cases)
            except Exception:
                print(provider.log_tail(), file=sys.stderr)
                raise
            mem = c.memory(provider.pid)
            print(f"  provider RSS {c.mib(mem.get('VmRSS'))}, peak {c.mib(mem.get('VmHWM'))}")
        finally:
            code = provider.stop()
        held = c.held_count(work / "data", [domain_name(i) for i in range(args.domains)])
        print(f"  provider exit code {code}; still held afterwards: {held} "
              f"({'OK' if held == args.messages else 'UNEXPECTED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
