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
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import _common as c

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200, help="message size in MiB")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--timeout", type=float, default=900.0, help="limit for each phase")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    total = args.mb << 20
    print(f"Big message: one {args.mb} MiB message ({total} bytes, 76-char lines) in and out")
    print(f"machine: {c.machine_description()}")
    ok = True
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
            print(f"  MX intake: {args.mb} MiB streamed in {streamed:.2f} s, 250 after "
                  f"{elapsed:.2f} s (commit {elapsed - streamed:.2f} s) = "
                  f"{args.mb / elapsed:.1f} MiB/s; reply: {reply}")
            report_mem("during MX intake", before, after, sampler.max_rss)
            print(f"    provider CPU {cpu:.2f} s")
            ok = ok and reply.startswith("250")
            store_mb = sum(p.stat().st_size for p in (work / "data").iterdir()) / 2**20
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
            print(f"  drain: {st.messages} message, {got_mb:.1f} MiB received in {elapsed:.2f} s "
                  f"= {got_mb / elapsed:.1f} MiB/s (ATRN to QUIT; last byte at "
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
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
