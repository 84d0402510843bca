"""`fermoposta customer pull` end to end into a Maildir, against Postfix's drain.

    .venv/bin/python bench/customer_pull.py [--messages 3000] [--rounds 3] [--tls none|starttls]

Each round, interleaved:

- fermoposta: MESSAGES held messages of about SIZE bytes for example.org are
  written straight into a fresh provider store (setup, not timed); a provider
  (`provider run`, trustme certificate) serves ODMR; the clock runs over one
  `fermoposta -c customer.toml customer pull` process (STARTTLS verified
  against the trustme CA unless `--tls none`, AUTH, ATRN, the reversed
  session, every message written to `<maildir>/new` with its fsyncs before
  each 250).  Check: exactly MESSAGES files in the Maildir, none left held.
  The process starts with its modules' bytecode compiled (`compileall`
  first, and PYTHONDONTWRITEBYTECODE not passed on), as an installed
  fermoposta does.
- Postfix: a private instance (`../shared/bench/postfix-instance.sh setup
  hold`, DRAIN_CONCURRENCY=1) takes the same number of messages with
  smtp-source (not timed here) and releases them over one connection to
  smtp-sink (`postsuper -H ALL && postqueue -f`), timed until its log shows
  every `status=sent` (store_engines.run_postfix).  smtp-sink stores
  nothing, so Postfix's figure is its drain alone, with no local delivery:
  the comparison is strict for fermoposta.

Prints each run, the medians and the ratio pull/Postfix drain, and the
provider's and customer's CPU.  Exit 1 when a run lost or duplicated mail.
Only 127.0.0.1 and free ports; children stopped by PID.  Postfix needs root.
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common as c
import drain
import store_engines as se


def customer_config(work: Path, odmr_port: int, tls: c.TLSFiles, mode: str) -> Path:
    pw = work / "acme.pw"
    pw.write_text(c.PASSWORD + "\n")
    pw.chmod(0o600)
    path = work / "customer.toml"
    path.write_text(f"""\
hostname = "mail.example.org"
data_dir = "{work / 'customer'}"

[provider]
host = "127.0.0.1"
port = {odmr_port}
tls = "{mode}"
ca_file = "{tls.ca_file}"
server_name = "localhost"
username = "acme"
password_file = "{pw}"

[log]
level = "warning"

[[pull]]
name = "bench"
domains = ["example.org"]

[pull.delivery]
type = "maildir"
path = "{work / 'mail'}/{{local}}"
create = true
""")
    return path


def run_fermoposta(rnd: int, work: Path, args: argparse.Namespace) -> tuple[se.Run, float]:
    base = work / f"fermoposta-r{rnd}"
    tls = c.make_tls(base / "tls")
    mx_port, odmr_port = c.free_port(), c.free_port()
    config = c.write_config(base, mx_port=mx_port, odmr_port=odmr_port, tls=tls,
                            log_level=args.log_level,
                            odmr="allow_plaintext_auth = true\n" if args.tls == "none" else "")
    drain.fill(base / "data", args.messages, args.size, first=True)
    customer = customer_config(base, odmr_port, tls, args.tls)
    with c.ProviderProcess(config, mx_port, odmr_port) as provider:
        cpu0 = c.cpu_seconds(provider.pid)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        proc = subprocess.run([str(c.BIN / "fermoposta"), "-c", str(customer), "customer",
                               "pull"], capture_output=True, timeout=args.timeout, env=env)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        provider_cpu = c.cpu_seconds(provider.pid) - cpu0
    customer_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    new = base / "mail" / "rcpt" / "new"
    files = list(new.iterdir()) if new.is_dir() else []
    size = sum(f.stat().st_size for f in files)
    run = se.Run("sqlite", "pull", rnd, seconds, len(files), size, customer_cpu,
                 provider_cpu)
    held = c.held_count(base / "data", ["example.org"])
    if proc.returncode != 0:
        run.problems.append(f"customer pull exit {proc.returncode}: "
                            f"{proc.stderr.decode(errors='replace')[-500:]}")
    if len(files) != args.messages or held != 0:
        run.problems.append(f"{len(files)} files in the Maildir of {args.messages}, "
                            f"{held} still held")
    print(f"  round {rnd} fermoposta customer pull ({args.tls}): {len(files)} msgs in "
          f"{seconds:6.2f} s = {run.rate:6.0f} msgs/s, {run.mib_s:5.2f} MiB/s; customer CPU "
          f"{customer_cpu:.2f} s (user {after.ru_utime - before.ru_utime:.2f}, system "
          f"{after.ru_stime - before.ru_stime:.2f}), provider CPU {provider_cpu:.2f} s"
          + (f"  PROBLEM: {'; '.join(run.problems)}" if run.problems else ""), flush=True)
    return run, customer_cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tls", choices=["starttls", "none"], default="starttls")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-postfix", action="store_true")
    args = ap.parse_args()
    c.need(c.SMTP_SOURCE, c.SMTP_SINK)
    problem = None if args.skip_postfix else se.postfix_problem()
    if problem:
        print(f"Postfix runs impossible: {problem}", file=sys.stderr)
        return 2
    print(f"customer pull: {args.messages} messages of ~{args.size} bytes, {args.rounds} rounds, "
          f"TLS {args.tls}; machine: {c.machine_description()}")
    # The timed `customer pull` starts as an installed one does: with its
    # modules' bytecode (else, under PYTHONDONTWRITEBYTECODE, each round
    # would compile them from source first).
    compileall.compile_dir(str(c.ROOT / "src" / "fermoposta"), quiet=1)
    pulls: list[se.Run] = []
    drains: list[se.Run] = []
    source = ["-s", "10", "-m", str(args.messages), "-l", str(args.size), "-f",
              "sender@bench.test", "-t", "rcpt@example.org"]
    with c.workdir(args.keep, "fermoposta-bench-pull-") as work:
        work.chmod(0o711)  # the postfix user must reach its queue under it
        for rnd in range(1, args.rounds + 1):
            order = ["fermoposta", "postfix"] if rnd % 2 else ["postfix", "fermoposta"]
            for system in order:
                if system == "fermoposta":
                    pulls.append(run_fermoposta(rnd, work, args)[0])
                elif not args.skip_postfix:
                    runs = se.run_postfix(rnd, work, args, source)
                    drains += [r for r in runs if r.workload == "drain"]
    pull = statistics.median(r.rate for r in pulls)
    print(f"\nmedian customer pull ({args.tls}) into Maildir: {pull:.0f} msgs/s")
    if drains:
        postfix = statistics.median(r.rate for r in drains)
        print(f"median Postfix drain over one connection to smtp-sink: {postfix:.0f} msgs/s")
        print(f"ratio pull / Postfix drain: {c.ratio(pull, postfix)}")
    bad = [r for r in [*pulls, *drains] if r.problems]
    print("every run delivered exactly what it should" if not bad
          else f"{len(bad)} runs with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
