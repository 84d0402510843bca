"""MX intake: messages/s that fermoposta's MX accepts from Postfix's smtp-source,
compared with Postfix's smtp-sink (which throws mail away) in the same run.

    .venv/bin/python bench/mx_intake.py [--messages 5000] [--sessions 10] [--size 4096]

Runs `smtp-source -s SESSIONS -m MESSAGES -l SIZE -f sender@bench.test
-t rcpt@example.org 127.0.0.1:PORT` first against `smtp-sink 127.0.0.1:PORT 64`
(PEER_RUNS times, median used), then against `fermoposta provider run` (a child
process, account `acme` with domain example.org created with `fermoposta
account add`), prints msgs/s for both, their ratio and the provider's peak RSS,
then checks that the store holds exactly MESSAGES messages for example.org.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common as c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="messages to send (smtp-source -m)")
    ap.add_argument("--sessions", type=int, default=10, help="parallel sessions (smtp-source -s)")
    ap.add_argument("--size", type=int, default=4096, help="payload bytes (smtp-source -l)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="provider log level (log goes to a file in the work directory)")
    ap.add_argument("--peer-runs", type=int, default=3,
                    help="smtp-source -> smtp-sink runs (the median is compared)")
    ap.add_argument("--timeout", type=float, default=600.0, help="limit for each smtp-source run")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    c.need(c.SMTP_SOURCE, c.SMTP_SINK)

    source_args = ["-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.size),
                   "-f", "sender@bench.test", "-t", "rcpt@example.org"]
    print(f"MX intake: smtp-source {' '.join(source_args)} 127.0.0.1:PORT")
    print(f"machine: {c.machine_description()}")

    with c.smtp_sink() as (port, _):
        runs = sorted(c.run_smtp_source(source_args, port, args.timeout)
                      for _ in range(max(1, args.peer_runs)))
    sink_s = statistics.median(runs)
    sink_rate = args.messages / sink_s
    print(f"  smtp-sink   : {sink_s:7.2f} s  {sink_rate:8.0f} msgs/s  (median of {len(runs)} runs: "
          f"{', '.join(f'{args.messages / t:.0f}' for t in runs)} msgs/s)")

    with c.workdir(args.keep, "fermoposta-bench-mx-") as work:
        mx_port, odmr_port = c.free_port(), c.free_port()
        config = c.write_config(work, mx_port=mx_port, odmr_port=odmr_port,
                                log_level=args.log_level)
        c.add_account_cli(config, "acme", ["example.org"])
        provider = c.ProviderProcess(config, mx_port, odmr_port).start()
        try:
            before = c.memory(provider.pid)
            cpu0 = c.cpu_seconds(provider.pid)
            io0 = c.written_bytes(provider.pid)
            with c.RSSSampler(provider.pid) as sampler:
                try:
                    fp_s = c.run_smtp_source(source_args, mx_port, args.timeout)
                except RuntimeError:
                    print(provider.log_tail(), file=sys.stderr)
                    raise
            after = c.memory(provider.pid)
            cpu = c.cpu_seconds(provider.pid) - cpu0
            io = c.written_bytes(provider.pid) - io0
        finally:
            code = provider.stop()
        fp_rate = args.messages / fp_s
        print(f"  fermoposta  : {fp_s:7.2f} s  {fp_rate:8.0f} msgs/s  (provider CPU {cpu:.2f} s "
              f"= {100 * cpu / fp_s:.0f}% of one core); written to disk {io / 2**20:.1f} MiB "
              f"= {io / 1024 / args.messages:.1f} KiB per message")
        print(f"  ratio fermoposta/smtp-sink: {c.ratio(fp_rate, sink_rate)}  "
              f"(smtp-sink is {c.ratio(sink_rate, fp_rate)}x faster)")
        print(f"  provider RSS: before {c.mib(before.get('VmRSS'))}, after "
              f"{c.mib(after.get('VmRSS'))}, peak (VmHWM) {c.mib(after.get('VmHWM'))}, "
              f"max sampled {c.mib(sampler.max_rss)}; exit code {code}")
        time.sleep(0.1)
        held = c.held_count(work / "data", ["example.org"])
        ok = held == args.messages
        print(f"  held in store for example.org: {held} "
              f"({'OK, equals' if ok else 'MISMATCH, expected'} {args.messages})")
        if not ok:
            print(provider.log_tail(), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
