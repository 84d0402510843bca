"""Queue tools at scale: `fermoposta queue list|stats` on a store holding many messages.

    .venv/bin/python bench/queue_tools.py [--messages 1000000] [--domains 10000]
        [--engine sqlite --engine postgresql] [--repeat 3] [--keep]

Setup (timed on its own, not part of the figures): a fresh store (SQLite file
under a temporary `data_dir`, or a fresh PostgreSQL schema `fp_bench_<hex>`)
is opened once through `open_store`, which creates the schema; then MESSAGES
messages are written with bulk SQL (executemany / COPY), without bodies (no
queue tool here reads one).  Message i arrives at NOW - SPAN + i//3 * step
(three messages share each arrival time, so pages cross equal `received_at`)
and has a HELD recipient in hosted domain `d<i % DOMAINS>.test`; every 10th
message has a second recipient: OUTBOUND (attempts 0..2) at
`r<k>.example` for every 20th, else HELD in another hosted domain.  The
domains belong to one account.  PostgreSQL then gets `VACUUM ANALYZE` (what
autovacuum does on its own after such an intake); SQLite gets nothing.

Timed (each a real CLI subprocess, `python -m fermoposta -c provider.toml
...`, this checkout's `src` first on PYTHONPATH, median of REPEAT runs; the
process start, about 0.2 s, is included).  The modules' bytecode is compiled
first (`compileall`), as an installed package's is, and PYTHONDONTWRITEBYTECODE
is not passed on: with it set and no bytecode, every command compiled some
fifty modules from source again (0.05-0.1 s each time), which no installed
fermoposta does:

- `queue list --domain D` (mailq text) and `queue list --domain D --ids`
  for D = `d42.test`; check: exactly the messages generated with a
  recipient in D, in (arrival, id) order.
- `queue list`, time to its first page (the process is stopped by PID once
  the first 500 blocks are out); check: the first 500 messages by (arrival, id).
- `queue list --count` (one count query in the store); check: MESSAGES.
- `queue stats` and `queue stats --json`; check: the totals (messages,
  recipients, held, outbound, deferred) and D's figures.

Exit 0 when every answer was right, 1 when one was wrong or a command failed,
2 when PostgreSQL cannot be reached.  PostgreSQL is `FERMOPOSTA_BENCH_PG_URL`
(default `postgresql://postgres@127.0.0.1:5432/test`).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import _common as c
import psycopg
from store_engines import PG_DEFAULT, PG_ENV, fresh_schema, pg_connect

SENDER = "sender@bench.test"
PAGE = 500  # queue_common.BATCH: the first page of `queue list`


@dataclass
class Data:
    """What was generated, to check the answers against."""
    messages: list[tuple[str, float, int]] = field(default_factory=list)  # id, arrival, size
    recipients: list[tuple[str, str, str, str, int]] = field(default_factory=list)
    # (message id, address, domain, state, attempts)


def generate(n: int, domains: int, span: float, now: float) -> Data:
    data = Data()
    seen: set[str] = set()
    step = span / max(1, n // 3)
    start = now - span
    for i in range(n):
        mid = secrets.token_hex(6).upper()
        while mid in seen:
            mid = secrets.token_hex(6).upper()
        seen.add(mid)
        data.messages.append((mid, start + (i // 3) * step, 1000 + i % 5000))
        d = f"d{i % domains}.test"
        data.recipients.append((mid, f"u{i % 7}@{d}", d, "held", 0))
        if i % 10 == 0:
            if i % 20 == 0:
                r = f"r{(i // 20) % 100}.example"
                data.recipients.append((mid, f"x@{r}", r, "outbound", (i // 20) % 3))
            else:
                d2 = f"d{(i // 10 * 7 + 3) % domains}.test"
                data.recipients.append((mid, f"v{i % 3}@{d2}", d2, "held", 0))
    return data


def setup_sqlite(path: Path, data: Data, domains: int, now: float) -> None:
    from fermoposta.store import STORE_FILENAME, open_store

    open_store(path.parent).close()  # the schema, as the provider makes it
    path = path.parent / STORE_FILENAME
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO accounts (name, created_at) VALUES ('acme', ?)", (now,))
        conn.executemany("INSERT INTO domains (name, account) VALUES (?, 'acme')",
                         ((f"d{j}.test",) for j in range(domains)))
        conn.executemany(
            "INSERT INTO messages (id, sender, received_at, size, origin, smtputf8, body_8bit,"
            " client, node) VALUES (?, ?, ?, ?, 'mx', 0, 0, 'bench[127.0.0.1]', 'bench')",
            ((m, SENDER, at, size) for m, at, size in data.messages))
        arrival = {m: (at, size) for m, at, size in data.messages}
        conn.executemany(
            "INSERT INTO recipients (message_id, address, domain, state, attempts, updated_at,"
            " message_received_at, message_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ((*r, now, *arrival[r[0]]) for r in data.recipients))
        conn.execute("COMMIT")
    finally:
        conn.close()


def setup_postgres(url: str, data: Data, domains: int, now: float) -> None:
    from fermoposta.store import open_store

    open_store("", url=url).close()
    with pg_connect(url) as conn:
        conn.execute("INSERT INTO accounts (name, created_at) VALUES ('acme', %s)", (now,))
        with conn.cursor().copy("COPY domains (name, account) FROM STDIN") as copy:
            for j in range(domains):
                copy.write_row((f"d{j}.test", "acme"))
        with conn.cursor().copy(
                "COPY messages (id, sender, received_at, size, origin, smtputf8, body_8bit,"
                " client, node) FROM STDIN") as copy:
            for m, at, size in data.messages:
                copy.write_row((m, SENDER, at, size, "mx", False, False, "bench[127.0.0.1]",
                                "bench"))
        arrival = {m: (at, size) for m, at, size in data.messages}
        with conn.cursor().copy(
                "COPY recipients (message_id, address, domain, state, attempts, updated_at,"
                " message_received_at, message_size) FROM STDIN") as copy:
            for r in data.recipients:
                copy.write_row((*r, now, *arrival[r[0]]))
        conn.execute("VACUUM ANALYZE")


# --- running the CLI -----------------------------------------------------------------------


def command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "fermoposta", "-c", str(config), *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(c.ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    return env


def run(config: Path, *args: str, timeout: float) -> tuple[float, str]:
    """Run one queue command to its end; (seconds, stdout)."""
    start = time.perf_counter()
    proc = c.spawn(command(config, *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, env=child_env())
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        c.stop_process(proc, grace=2.0)
        raise RuntimeError(f"fermoposta {' '.join(args)}: no answer within {timeout:.0f}s"
                           ) from None
    elapsed = time.perf_counter() - start
    c.stop_process(proc)  # reaped already: only forgets it
    if proc.returncode != 0:
        raise RuntimeError(f"fermoposta {' '.join(args)} exited {proc.returncode}: "
                           f"{err.decode(errors='replace').strip()[-2000:]}")
    return elapsed, out.decode()


def first_page(config: Path, timeout: float) -> tuple[float, list[str]]:
    """`queue list` until PAGE blocks are out (then stopped by PID); (seconds, their ids)."""
    start = time.perf_counter()
    proc = c.spawn(command(config, "queue", "list"), stdin=subprocess.DEVNULL,
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env())
    ids: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    try:
        expect_id = False
        for raw in proc.stdout:
            line = raw.decode()
            if time.monotonic() > deadline:
                raise RuntimeError(f"queue list: no first page within {timeout:.0f}s")
            if line.startswith("-Queue ID-") or line.strip() == "":
                expect_id = True
                continue
            if expect_id and not line.startswith(" "):
                ids.append(line.split()[0].rstrip("*!"))
                expect_id = False
                if len(ids) == PAGE:
                    break
        elapsed = time.perf_counter() - start
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        c.stop_process(proc, grace=5.0)
        proc.stdout.close()
    return elapsed, ids


def timed(label: str, repeat: int, job: object) -> tuple[float, object]:
    """Run `job` (a callable returning (seconds, result)) `repeat` times; median, last result."""
    times: list[float] = []
    result: object = None
    for _ in range(repeat):
        seconds, result = job()  # type: ignore[operator]
        times.append(seconds)
    median = statistics.median(times)
    print(f"  {label:<40} {median:8.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times)})",
          flush=True)
    return median, result


def listed_ids(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def block_ids(text: str) -> list[str]:
    """The queue ids of mailq text blocks."""
    ids: list[str] = []
    expect = True
    for line in text.splitlines():
        if line.startswith("-Queue ID-") or not line.strip():
            expect = True
        elif expect and not line.startswith(" ") and not line.startswith("--"):
            ids.append(line.split()[0].rstrip("*!"))
            expect = False
    return ids


def measure(engine: str, config: Path, data: Data, domain: str, repeat: int,
            timeout: float) -> list[str]:
    """Time the commands and check their answers; the list of what was wrong."""
    wrong: list[str] = []
    order = sorted(data.messages, key=lambda m: (m[1], m[0]))
    in_domain = {r[0] for r in data.recipients if r[2] == domain}
    expected_domain = [m[0] for m in order if m[0] in in_domain]

    def check(what: str, ok: bool) -> None:
        if not ok:
            wrong.append(f"{engine}: {what}")
            print(f"  WRONG: {what}", flush=True)

    _, out = timed(f"queue list --domain {domain}", repeat,
                   lambda: run(config, "queue", "list", "--domain", domain, timeout=timeout))
    check("list --domain: the listed messages", block_ids(str(out)) == expected_domain)
    _, out = timed(f"queue list --domain {domain} --ids", repeat,
                   lambda: run(config, "queue", "list", "--domain", domain, "--ids",
                               timeout=timeout))
    check("list --domain --ids: the ids", listed_ids(str(out)) == expected_domain)
    _, ids = timed("queue list (first page of 500)", repeat,
                   lambda: first_page(config, timeout))
    check("list: the first page", ids == [m[0] for m in order[:PAGE]])
    _, out = timed("queue list --count", repeat,
                   lambda: run(config, "queue", "list", "--count", timeout=timeout))
    check("list --count", str(out).strip() == str(len(data.messages)))
    timed("queue stats", repeat, lambda: run(config, "queue", "stats", timeout=timeout))
    _, out = timed("queue stats --json", repeat,
                   lambda: run(config, "queue", "stats", "--json", "--top", "100000",
                               timeout=timeout))
    shape = json.loads(str(out))
    total = shape["total"]
    outbound = [r for r in data.recipients if r[3] == "outbound"]
    check("stats: total messages", total["messages"] == len(data.messages))
    check("stats: total recipients", total["recipients"] == len(data.recipients))
    check("stats: total held", total["states"]["held"] == len(data.recipients) - len(outbound))
    check("stats: total outbound", total["states"]["outbound"] == len(outbound))
    check("stats: total deferred",
          total["states"]["deferred"] == sum(1 for r in outbound if r[4] > 0))
    check("stats: total ages", sum(total["ages"].values()) == len(data.recipients))
    check("stats: total bytes", total["bytes"] == sum(m[2] for m in data.messages))
    mine = [d for d in shape["domains"] if d["domain"] == domain]
    sizes = {m[0]: m[2] for m in data.messages}
    check("stats: the domain's messages and bytes",
          len(mine) == 1 and mine[0]["messages"] == len(in_domain)
          and mine[0]["bytes"] == sum(sizes[m] for m in in_domain)
          and mine[0]["recipients"] == sum(1 for r in data.recipients if r[2] == domain))
    return wrong


@contextlib.contextmanager
def engine_store(engine: str, work: Path, pg_base: str) -> Iterator[tuple[Path, str]]:
    """(config, store url) of a fresh store of `engine`."""
    ports = {"mx_port": c.free_port(), "odmr_port": c.free_port()}  # nothing listens
    if engine == "sqlite":
        yield c.write_config(work / "sqlite", **ports), ""
        return
    with fresh_schema(pg_base) as url:
        yield c.write_config(work / "postgresql", store_url=url, **ports), url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1_000_000, help="messages held")
    ap.add_argument("--domains", type=int, default=10_000, help="hosted domains")
    ap.add_argument("--span-hours", type=float, default=72.0,
                    help="the arrival times spread over this many hours before now")
    ap.add_argument("--engine", action="append", choices=["sqlite", "postgresql"],
                    help="engine to run (repeatable; default both)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each command (median)")
    ap.add_argument("--timeout", type=float, default=900.0, help="limit for each command")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    engines = args.engine or ["sqlite", "postgresql"]
    pg_base = os.environ.get(PG_ENV) or PG_DEFAULT
    if "postgresql" in engines:
        try:
            pg_connect(pg_base).close()
        except psycopg.Error as exc:
            print(f"PostgreSQL at {pg_base} unreachable: {exc}", file=sys.stderr)
            return 2
    print(f"queue tools: {args.messages} messages over {args.domains} domains; "
          f"{c.machine_description()}")
    # Bytecode as an installed package has it (see the module docstring).
    compileall.compile_dir(str(c.ROOT / "src" / "fermoposta"), quiet=1)
    now = time.time()
    started = time.perf_counter()
    data = generate(args.messages, args.domains, args.span_hours * 3600.0, now)
    print(f"generated {len(data.messages)} messages, {len(data.recipients)} recipients "
          f"in {time.perf_counter() - started:.1f} s")
    domain = f"d{42 % args.domains}.test"
    wrong: list[str] = []
    with c.workdir(args.keep, "fp-bench-queue-") as work:
        for engine in engines:
            with engine_store(engine, work, pg_base) as (config, url):
                started = time.perf_counter()
                if engine == "sqlite":
                    setup_sqlite(config.parent / "data" / "store.sqlite3", data,
                                 args.domains, now)
                else:
                    setup_postgres(url, data, args.domains, now)
                print(f"{engine}: setup (bulk SQL) {time.perf_counter() - started:.1f} s",
                      flush=True)
                wrong += measure(engine, config, data, domain, args.repeat, args.timeout)
    if wrong:
        print("FAILED: " + "; ".join(wrong))
        return 1
    print("all answers right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
