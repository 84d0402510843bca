"""Push delivery (issue 12): delay from the MX's 250 to the file in the
customer's Maildir with a waiting ATRN, and the provider's cost of many
customers waiting.

    .venv/bin/python bench/push_latency.py [--messages 1000] [--mean-interval 0.05]
        [--waiting 1000] [--idle 10]

1. Latency.  `fermoposta provider run` (SQLite) with account `acme`
   (example.org, `account add --atrn-wait 5m`) and `fermoposta customer run`
   with `every = "push"` delivering into a Maildir, both child processes.
   MESSAGES messages are sent to the MX one by one, each over its own SMTP
   connection, at random intervals (exponential, mean MEAN-INTERVAL
   seconds).  For each, the clock runs from the MX's 250 (read by the
   sender) to the moment its file appears in Maildir/new (a watcher scans the
   directory every millisecond); p50, p90, p99 and max are printed.
2. Waiting customers.  A fresh provider with WAITING accounts (one domain
   each, `atrn_wait` 5 minutes, made straight in the store), then WAITING
   raw ODMR connections (EHLO, AUTH PLAIN, ATRN) from this process: the
   provider's RSS before and with all of them waiting, and its CPU time over
   IDLE seconds while they wait.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import resource
import smtplib
import statistics
import sys
import threading
import time
from pathlib import Path

import _common as c


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def customer_config(directory: Path, odmr_port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "password").write_text(c.PASSWORD + "\n")
    path = directory / "customer.toml"
    path.write_text(
        f'hostname = "mail.example.org"\ndata_dir = "{directory / "state"}"\n\n'
        "[provider]\n"
        f'host = "127.0.0.1"\nport = {odmr_port}\ntls = "none"\n'
        f'username = "acme"\npassword_file = "{directory / "password"}"\n'
        'mechanisms = ["CRAM-MD5"]\n\n'
        '[log]\nlevel = "warning"\n\n'
        "[[pull]]\n"
        'domains = ["example.org"]\nevery = "push"\n'
        "[pull.delivery]\n"
        f'type = "maildir"\npath = "{directory / "mail/{local}/Maildir"}"\ncreate = true\n'
    )
    return path


class MaildirWatcher:
    """Notes when each file first appears in a Maildir's new/ (by key)."""

    def __init__(self, new: Path) -> None:
        self.new = new
        self.seen: dict[str, float] = {}
        self._names: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                names = os.listdir(self.new)
            except FileNotFoundError:
                names = []
            for name in names:
                if name in self._names:
                    continue
                self._names.add(name)
                text = (self.new / name).read_bytes()
                i = text.find(b"X-Bench-Key: ")
                if i >= 0:
                    key = text[i + 13:text.index(b"\r\n", i) if b"\r\n" in text[i:]
                               else text.index(b"\n", i)].strip().decode()
                    self.seen[key] = now
            time.sleep(0.001)

    def __enter__(self) -> MaildirWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def latency(args: argparse.Namespace) -> None:
    with c.workdir(args.keep, "fermoposta-bench-push-") as work:
        mx_port, odmr_port = c.free_port(), c.free_port()
        config = c.write_config(work / "provider", mx_port=mx_port, odmr_port=odmr_port,
                                log_level="warning")
        c.add_account_cli(config, "acme", ["example.org"])
        c.cli(config, "account", "set", "acme", "--atrn-wait", "5m")
        provider = c.ProviderProcess(config, mx_port, odmr_port).start()
        site = work / "site"
        cconfig = customer_config(site, odmr_port)
        log = open(site / "customer.log", "wb")  # noqa: SIM115
        customer = c.spawn([c.FERMOPOSTA, "-c", cconfig, "customer", "run"],
                           stdin=c.subprocess.DEVNULL, stdout=log, stderr=c.subprocess.STDOUT)
        rng = random.Random(12)
        delays: list[float] = []
        try:
            time.sleep(2.0)  # the customer's first ATRN is waiting
            with MaildirWatcher(site / "mail" / "bob" / "Maildir" / "new") as watcher:
                acked: dict[str, float] = {}
                started = time.monotonic()
                for n in range(args.messages):
                    time.sleep(rng.expovariate(1.0 / args.mean_interval))
                    key = f"m{n:06d}"
                    body = (f"From: a@sender.test\r\nTo: bob@example.org\r\n"
                            f"Subject: push {n}\r\nX-Bench-Key: {key}\r\n\r\nbody\r\n")
                    with smtplib.SMTP(c.HOST, mx_port, timeout=30) as smtp:
                        smtp.sendmail("a@sender.test", ["bob@example.org"], body)
                        acked[key] = time.monotonic()
                deadline = time.monotonic() + 60
                while len(watcher.seen) < args.messages and time.monotonic() < deadline:
                    time.sleep(0.05)
                elapsed = time.monotonic() - started
                missing = [k for k in acked if k not in watcher.seen]
                delays = [watcher.seen[k] - acked[k] for k in acked if k in watcher.seen]
        finally:
            c.stop_process(customer)
            log.close()
            provider.stop()
        print(f"1. latency, MX 250 -> file in Maildir/new, {args.messages} messages at random "
              f"intervals (mean {args.mean_interval * 1000:.0f} ms), {elapsed:.1f} s:")
        if delays:
            print(f"   p50 {percentile(delays, 50) * 1000:7.1f} ms   p90 "
                  f"{percentile(delays, 90) * 1000:7.1f} ms   p99 "
                  f"{percentile(delays, 99) * 1000:7.1f} ms   max {max(delays) * 1000:7.1f} ms"
                  f"   mean {statistics.mean(delays) * 1000:.1f} ms")
        if missing:
            print(f"   MISSING: {len(missing)} messages never reached the Maildir")


async def waiting(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * args.waiting + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * args.waiting + 400), hard))
    from fermoposta.store.sqlite import SQLiteStore

    with c.workdir(args.keep, "fermoposta-bench-waiting-") as work:
        mx_port, odmr_port = c.free_port(), c.free_port()
        n = args.waiting
        config = c.write_config(
            work, mx_port=mx_port, odmr_port=odmr_port, log_level="warning",
            odmr=f"allow_plaintext_auth = true\nmax_waiting = {n + 10}\n",
            # All of them come from 127.0.0.1, where a fleet comes from as many
            # addresses: the per-address AUTH throttle (at most as many checks
            # at once as failures are left, 454 beyond) is turned off.
            extra=(f"\n[connections]\nodmr = {{ max_connections = 500, "
                   f"max_connections_per_ip = {n + 100} }}\n"
                   "\n[auth_throttle]\nmax_failures_per_ip = 0\n"))
        store = SQLiteStore(work / "data" / "fermoposta.sqlite3")
        for i in range(n):
            c.add_account_store(store, f"c{i:05d}", [f"c{i:05d}.test"])
            account = store.get_account(f"c{i:05d}")
            assert account is not None
            store.update_account(dataclasses.replace(account, atrn_wait=300.0))
        store.close()
        provider = c.ProviderProcess(config, mx_port, odmr_port).start()
        try:
            time.sleep(1.0)
            before = c.memory(provider.pid)
            customers: list[c.Customer] = []
            t0 = time.monotonic()

            async def one(i: int) -> c.Customer:
                cust = await c.Customer.connect(odmr_port)
                await cust.hello(None)
                await cust.auth_plain(f"c{i:05d}")
                await cust.send(f"ATRN c{i:05d}.test")
                return cust

            sem = asyncio.Semaphore(50)

            async def bounded(i: int) -> c.Customer:
                async with sem:
                    return await one(i)

            customers = list(await asyncio.gather(*(bounded(i) for i in range(n))))
            setup = time.monotonic() - t0
            await asyncio.sleep(2.0)
            with_waiting = c.memory(provider.pid)
            cpu0 = c.cpu_seconds(provider.pid)
            await asyncio.sleep(args.idle)
            cpu = c.cpu_seconds(provider.pid) - cpu0
            # Nobody has been answered: all still wait.
            async def answered(cust: c.Customer) -> bool:
                try:
                    await cust.reply(timeout=0.2)
                except (TimeoutError, c.SMTPError):
                    return False
                return True

            early = sum(await asyncio.gather(*(answered(cust) for cust in customers)))
            print(f"2. {n} customers waiting (connected, AUTH, ATRN in {setup:.1f} s):")
            print(f"   provider RSS: {c.mib(before.get('VmRSS'))} before, "
                  f"{c.mib(with_waiting.get('VmRSS'))} with {n} waiting "
                  f"(peak {c.mib(with_waiting.get('VmHWM'))})")
            print(f"   provider CPU while they wait: {cpu:.2f} s over {args.idle:g} s "
                  f"({cpu / args.idle * 100:.1f} % of one core); answered before their "
                  f"wait ended: {early}")
            for cust in customers:
                await cust.close()
        finally:
            provider.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--mean-interval", type=float, default=0.05,
                    help="mean seconds between messages (exponential)")
    ap.add_argument("--waiting", type=int, default=1000, help="customers waiting at once")
    ap.add_argument("--idle", type=float, default=10.0,
                    help="seconds the CPU is measured while they wait")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-waiting", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    args = ap.parse_args()
    print(f"push (waiting ATRN): machine: {c.machine_description()}")
    if not args.skip_latency:
        latency(args)
    if not args.skip_waiting:
        asyncio.run(waiting(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
