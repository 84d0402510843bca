"""One big message: the provider's peak RSS and MB/s while it receives a 200 MB
message on the MX and while it drains it to a customer.

    .venv/bin/python bench/big_message.py [--mb 200]

`fermoposta provider run` runs as a child process (max_message_size raised to
fit).  Phase 1: this script sends one message of MB MiB to the MX, streamed in
1 MiB writes of 76-character lines (+CRLF); the clock runs from the 354 to the
250 after the final dot (so it includes the durable enqueue).  Phase 2: this
script authenticates on the ODMR port (CRAM-MD5), sends `ATRN example.org` and
plays a minimal SMTP server that counts the bytes and discards them; the clock
runs from the ATRN to the provider's QUIT.  Before each phase the provider's
peak RSS (VmHWM) is reset through /proc/PID/clear_refs; VmRSS and VmHWM are
read before and after each phase and VmRSS is also sampled every 50 ms.

Postfix, same run (as root, unless `--skip-postfix`): a private instance
(`../shared/bench/postfix-instance.sh setup hold`, `message_size_limit`
raised to fit) gets the same message on its smtpd with the same client and
clock (354 to the 250, which cleanup sends after its fsync), then releases it
(`postsuper -H ALL`, `postqueue -f`) over one connection to `smtp-sink`;
that clock runs from the release to the `status=sent` line.  `--rounds N`
alternates fermoposta and Postfix N times (A, B, A, B, ...) and prints the
medians and their ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time

import _common as c
import store_engines as se

LINE = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-+=0123456789\r\n"
assert len(LINE) == 78  # 76 characters + CRLF


async def send_big(port: int, total: int, timeout: float) -> tuple[float, float, str]:
    """Send one message of `total` bytes of content; return (stream s, total s, reply)."""
    cust = await c.Customer.connect(port)
    try:
        await cust.reply()
        await cust.cmd("EHLO client.bench.test", 250)
        await cust.cmd(f"MAIL FROM:<sender@bench.test> SIZE={total}", 250)
        await cust.cmd("RCPT TO:<rcpt@example.org>", 250)
        header = (b"From: sender@bench.test\r\nTo: rcpt@example.org\r\n"
                  b"Subject: big bench message\r\n\r\n")
        block = LINE * ((1 << 20) // len(LINE))
        await cust.cmd("DATA", 354)
        start = time.perf_counter()
        cust.writer.write(header)
        left = total - len(header)
        while left > 0:
            if left >= len(block):
                cust.writer.write(block)
                left -= len(block)
            else:
                cust.writer.write(LINE * (left // len(LINE) + 1))
                left = 0
            await cust.writer.drain()
        cust.writer.write(b".\r\n")
        await cust.writer.drain()
        streamed = time.perf_counter() - start
        code, lines = await cust.reply(timeout)
        elapsed = time.perf_counter() - start
        reply = f"{code} {' '.join(lines)}"
        await cust.cmd("QUIT", 221)
        return streamed, elapsed, reply
    finally:
        await cust.close()


async def drain_big(port: int, timeout: float) -> tuple[float, c.ServeStats]:
    cust = await c.Customer.connect(port)
    try:
        await cust.hello(None)
        await cust.auth_cram_md5("acme")
        start = time.perf_counter()
        await cust.cmd("ATRN example.org", 250)
        stats = await cust.serve(timeout)
        return stats.ended_at - start, stats
    finally:
        await cust.close()


def report_mem(label: str, before: dict[str, int], after: dict[str, int], sampled: int) -> None:
    print(f"    provider RSS {label}: before {c.mib(before.get('VmRSS'))}, after "
          f"{c.mib(after.get('VmRSS'))}, peak (VmHWM since reset) {c.mib(after.get('VmHWM'))}, "
          f"max sampled {c.mib(sampled)}")


def fermoposta_round(args: argparse.Namespace, total: int) -> tuple[float, float, bool]:
    """One provider, the message in and out; (MiB/s in, MiB/s out, all well)."""
    ok = True
    rate_in = rate_out = 0.0
    with c.workdir(args.keep, "fermoposta-bench-big-") as work:
        mx_port, odmr_port = c.free_port(), c.free_port()
        config = c.write_config(
            work, mx_port=mx_port, odmr_port=odmr_port, log_level=args.log_level,
            limits=f'max_message_size = "{args.mb + 16}M"\n')
        c.add_account_cli(config, "acme", ["example.org"])
        provider = c.ProviderProcess(config, mx_port, odmr_port).start()
        try:
            idle = c.memory(provider.pid)
            print(f"  provider idle: RSS {c.mib(idle.get('VmRSS'))}, peak "
                  f"{c.mib(idle.get('VmHWM'))}")

            # Phase 1: MX intake.
            c.reset_peak_rss(provider.pid)
            before = c.memory(provider.pid)
            cpu0 = c.cpu_seconds(provider.pid)
            with c.RSSSampler(provider.pid) as sampler:
                try:
                    streamed, elapsed, reply = asyncio.run(
                        send_big(mx_port, total, args.timeout))
                except Exception:
                    print(provider.log_tail(), file=sys.stderr)
                    raise
            after = c.memory(provider.pid)
            cpu = c.cpu_seconds(provider.pid) - cpu0
            rate_in = args.mb / elapsed
            print(f"  MX intake: {args.mb} MiB streamed in {streamed:.2f} s, 250 after "
                  f"{elapsed:.2f} s (commit {elapsed - streamed:.2f} s) = "
                  f"{rate_in:.1f} MiB/s; reply: {reply}")
            report_mem("during MX intake", before, after, sampler.max_rss)
            print(f"    provider CPU {cpu:.2f} s")
            ok = ok and reply.startswith("250")
            store_mb = sum(p.stat().st_size for p in (work / "data").iterdir()
                           if p.is_file()) / 2**20
            print(f"    store files on disk now: {store_mb:.0f} MiB")

            # Phase 2: drain to the customer.
            c.reset_peak_rss(provider.pid)
            before = c.memory(provider.pid)
            cpu0 = c.cpu_seconds(provider.pid)
            with c.RSSSampler(provider.pid) as sampler:
                try:
                    elapsed, st = asyncio.run(drain_big(odmr_port, args.timeout))
                except Exception:
                    print(provider.log_tail(), file=sys.stderr)
                    raise
            after = c.memory(provider.pid)
            cpu = c.cpu_seconds(provider.pid) - cpu0
            got_mb = st.data_bytes / 2**20
            rate_out = got_mb / elapsed
            print(f"  drain: {st.messages} message, {got_mb:.1f} MiB received in {elapsed:.2f} s "
                  f"= {rate_out:.1f} MiB/s (ATRN to QUIT; last byte at "
                  f"{st.last_message_at - (st.ended_at - elapsed):.2f} s); QUIT seen: {st.quit}")
            report_mem("during drain", before, after, sampler.max_rss)
            print(f"    provider CPU {cpu:.2f} s")
            ok = ok and st.messages == 1 and st.data_bytes >= total
        finally:
            code = provider.stop()
        held = c.held_count(work / "data", ["example.org"])
        print(f"  provider exit code {code}; held afterwards: {held} "
              f"({'OK' if held == 0 else 'UNEXPECTED'})")
        ok = ok and held == 0
    return rate_in, rate_out, ok


def postfix_round(args: argparse.Namespace, total: int) -> tuple[float, float, bool]:
    """A private Postfix, the message into its hold queue and out to smtp-sink."""
    with c.workdir(args.keep, "fermoposta-bench-big-pfx-") as work:
        work.chmod(0o711)  # the postfix user must reach its queue under it
        pfx = work / "postfix"
        pfx.mkdir()
        out_log = work / "postfix.commands.log"
        with c.smtp_sink(backlog=16) as (sink_port, _):
            smtpd_port = c.free_port()
            env = {**os.environ, "PFX": str(pfx), "SMTPD_PORT": str(smtpd_port),
                   "SINK_PORT": str(sink_port), "DRAIN_CONCURRENCY": "1"}
            se.run_command(["bash", se.POSTFIX_SCRIPT, "setup", "hold"], out_log,
                           args.timeout, env)
            se.run_command(["/usr/sbin/postconf", "-c", pfx / "etc", "-e",
                            f"message_size_limit = {total + (16 << 20)}"],
                           out_log, args.timeout)
            master: int | None = None
            try:
                se.run_command(["bash", se.POSTFIX_SCRIPT, "start"], out_log, args.timeout, env)
                master = se._master_pid(pfx)
                c.wait_for_port(smtpd_port)
                if master is None:
                    raise RuntimeError("Postfix started but wrote no master.pid")
                log = se.PostfixLog(pfx / "postfix.log")
                cpu0 = se.tree_cpu(master)
                streamed, elapsed, reply = asyncio.run(send_big(smtpd_port, total, args.timeout))
                rate_in = args.mb / elapsed
                held = se._files(pfx / "queue" / "hold")
                print(f"  Postfix intake: streamed in {streamed:.2f} s, 250 after {elapsed:.2f} s"
                      f" = {rate_in:.1f} MiB/s; reply: {reply}; on hold: {held}; "
                      f"CPU {se.tree_cpu(master) - cpu0:.2f} s")
                ok = reply.startswith("250") and held == 1
                cpu0 = se.tree_cpu(master)
                start = time.perf_counter()
                deadline = time.monotonic() + args.timeout
                se.run_command([se.POSTSUPER, "-c", pfx / "etc", "-H", "ALL"], out_log,
                               args.timeout)
                se.run_command([se.POSTQUEUE, "-c", pfx / "etc", "-f"], out_log, args.timeout)
                while log.poll() < 1 and time.monotonic() < deadline:
                    time.sleep(0.005)
                elapsed = time.perf_counter() - start
                rate_out = args.mb / elapsed
                while se._queued(pfx) and time.monotonic() < deadline:
                    time.sleep(0.05)
                sent, left = log.poll(), se._queued(pfx)
                print(f"  Postfix drain: status=sent after {elapsed:.2f} s = {rate_out:.1f} "
                      f"MiB/s; sent {sent}, left {left}; CPU {se.tree_cpu(master) - cpu0:.2f} s")
                ok = ok and sent == 1 and left == 0
            finally:
                with contextlib.suppress(RuntimeError):
                    se.run_command(["bash", se.POSTFIX_SCRIPT, "stop"], out_log, 60.0, env)
                if master is not None and se._alive(master):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(master, 9)
    return rate_in, rate_out, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200, help="message size in MiB")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians)")
    ap.add_argument("--skip-postfix", action="store_true", help="no Postfix runs")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--timeout", type=float, default=900.0, help="limit for each phase")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    total = args.mb << 20
    print(f"Big message: one {args.mb} MiB message ({total} bytes, 76-char lines) in and out")
    print(f"machine: {c.machine_description()}")
    problem = "skipped (--skip-postfix)" if args.skip_postfix else se.postfix_problem()
    print(f"Postfix: {problem or 'private instance via ' + str(se.POSTFIX_SCRIPT)}")
    ok = True
    figures: dict[str, list[tuple[float, float]]] = {"fermoposta": [], "postfix": []}
    for rnd in range(1, args.rounds + 1):
        order = ["fermoposta", "postfix"] if rnd % 2 else ["postfix", "fermoposta"]
        for system in order:
            if system == "postfix" and problem is not None:
                continue
            print(f"round {rnd}: {system}", flush=True)
            run = fermoposta_round if system == "fermoposta" else postfix_round
            rate_in, rate_out, well = run(args, total)
            ok = ok and well
            figures[system].append((rate_in, rate_out))
    print("\nmedians (MiB/s):")
    med = {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
           for name, runs in figures.items() if runs}
    for name, (rate_in, rate_out) in med.items():
        print(f"  {name:10} in {rate_in:6.1f}  out {rate_out:6.1f}")
    if "postfix" in med:
        print(f"  ratio fermoposta/Postfix: in {c.ratio(med['fermoposta'][0], med['postfix'][0])},"
              f" out {c.ratio(med['fermoposta'][1], med['postfix'][1])}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
