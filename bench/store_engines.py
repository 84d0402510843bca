"""Store engines: MX intake and a one-connection drain with fermoposta on SQLite, on
PostgreSQL, and Postfix's hold queue in the same run.

    .venv/bin/python bench/store_engines.py [--messages 3000] [--rounds 3] [--sessions 10]

Workloads (messages of about SIZE bytes, all for example.org):

- intake: `smtp-source -s SESSIONS -m MESSAGES -l SIZE -f sender@bench.test
  -t rcpt@example.org 127.0.0.1:PORT` into (a) fermoposta on SQLite (the default
  store under `data_dir`), (b) fermoposta on PostgreSQL (`[store] url`, a fresh
  schema), (c) a private Postfix (`../shared/bench/postfix-instance.sh setup
  hold`) that puts every message on hold.  The clock is smtp-source's run.
  Check: exactly MESSAGES messages held afterwards.
- drain: the mail just taken in leaves over one connection.  fermoposta: one ATRN
  session of drain.py's customer (AUTH CRAM-MD5 in clear, `ATRN example.org`,
  clock from ATRN to QUIT; with `--chunking` it offers CHUNKING and the drain
  sends BDAT), same provider process.  Postfix
  (DRAIN_CONCURRENCY=1): `postsuper -H ALL && postqueue -f` to smtp-sink, clock
  until its log shows MESSAGES `status=sent`.  Check: the receiver got exactly
  MESSAGES (the customer's count; Postfix's status=sent count) and nothing is
  left queued.

Round r runs every system once (intake, then drain), each from a fresh store,
schema or Postfix instance; the order of the systems rotates by one each round.
The summary gives per system and workload the median of ROUNDS runs: msgs/s,
MiB/s (from the stored message sizes), peak RSS and CPU, and the ratios
PostgreSQL/SQLite, SQLite/Postfix and PostgreSQL/Postfix of the median msgs/s.

Measured: fermoposta's provider process (VmHWM after a reset before each phase;
utime+stime of all its threads); for PostgreSQL also the CPU of the server
backends serving the provider's connections (found by their client ports);
for Postfix the CPU of its master and every process under it (including those
that exited, via cutime/cstime) and the highest sampled sum of their PSS (no
single process to take VmHWM of).

Contract: only 127.0.0.1 and free ports; every child stopped by PID (the
Postfix instance with the script's `stop`, its master by PID if it lingers),
the PostgreSQL schema dropped, also on Ctrl-C or SIGTERM.  Exit 0 when every
run delivered exactly what it should, 1 when a run lost or duplicated mail or
failed, 2 when PostgreSQL cannot be reached.  PostgreSQL is
`FERMOPOSTA_BENCH_PG_URL` (default `postgresql://postgres@127.0.0.1:5432/test`);
each run gets `CREATE SCHEMA fp_bench_<hex>`, used through
`options=-csearch_path=<schema>` in the URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import pwd
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import _common as c
import drain
import psycopg

PG_ENV = "FERMOPOSTA_BENCH_PG_URL"
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
POSTFIX_SCRIPT = c.ROOT.parent / "shared" / "bench" / "postfix-instance.sh"
POSTSUPER = shutil.which("postsuper") or "/usr/sbin/postsuper"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"
DOMAIN = "example.org"
SYSTEMS = ("sqlite", "postgresql", "postfix")
LABELS = {"sqlite": "fermoposta, SQLite", "postgresql": "fermoposta, PostgreSQL",
          "postfix": "Postfix hold queue"}
WORKLOADS = ("intake", "drain")


@dataclass
class Run:
    system: str
    workload: str
    round: int
    seconds: float
    messages: int  # what the receiver counted
    data_bytes: int  # message bytes moved (stored sizes)
    cpu: float  # provider process, or every Postfix process
    server_cpu: float | None = None  # PostgreSQL backends of the provider
    peak_kib: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def mib_s(self) -> float:
        return self.data_bytes / 2**20 / self.seconds if self.seconds > 0 else 0.0


# --- PostgreSQL ------------------------------------------------------------------------


def with_search_path(url: str, schema: str) -> str:
    """`url` with `options=-csearch_path=<schema>` (percent-encoded) in its query.

    The idea of tests/support/pg.py, copied: benchmarks do not import the tests."""
    if not schema.replace("_", "").isalnum():
        raise ValueError(f"not a plain schema name: {schema!r}")
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    others = [value for key, value in query if key == "options"]
    query = [(key, value) for key, value in query if key != "options"]
    query.append(("options", " ".join([*others, f"-csearch_path={schema}"])))
    # libpq decodes %XX in a URI but not "+": quote, not quote_plus.
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


def pg_connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, connect_timeout=5, autocommit=True)


def pg_header(url: str) -> str:
    """The server's version and the settings that decide the cost of a commit."""
    with pg_connect(url) as conn:
        values = [str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
                  for name in ("server_version", "synchronous_commit", "fsync",
                               "full_page_writes", "wal_sync_method", "shared_buffers")]
    return (f"PostgreSQL {values[0]}: server defaults synchronous_commit={values[1]} "
            f"(fermoposta sets it on per connection), fsync={values[2]}, "
            f"full_page_writes={values[3]}, wal_sync_method={values[4]}, "
            f"shared_buffers={values[5]}")


@contextlib.contextmanager
def fresh_schema(base_url: str) -> Iterator[str]:
    """A new schema fp_bench_<hex>; yield a URL using it; drop it (CASCADE) on exit."""
    schema = f"fp_bench_{secrets.token_hex(6)}"
    with pg_connect(base_url) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(base_url, schema)
    finally:
        with pg_connect(base_url) as conn:
            # A backend of a killed provider may still hold a lock for a moment.
            conn.execute("SET lock_timeout = '60s'")
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _tcp_ports_to(pid: int, remote_port: int) -> set[int]:
    """Local ports of the TCP connections of process `pid` to `remote_port`."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) == remote_port:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


class BackendCPU:
    """CPU of the PostgreSQL backends that serve one client process.

    The backends are those whose `client_port` in pg_stat_activity is a local
    port of the process's connections to the server; `/proc/<backend>/stat`
    needs the same machine and the right to read it (root)."""

    def __init__(self, admin: psycopg.Connection[Any], client_pid: int, server_port: int) -> None:
        self.admin = admin
        self.client_pid = client_pid
        self.server_port = server_port

    def sample(self) -> dict[int, float]:
        ports = sorted(_tcp_ports_to(self.client_pid, self.server_port))
        if not ports:
            return {}
        rows = self.admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)"
            " AND client_addr = '127.0.0.1'", (ports,)).fetchall()
        return {int(r[0]): c.cpu_seconds(int(r[0])) for r in rows}

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float:
        # A backend that ended in between is lost (the pool keeps them for minutes).
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


# --- fermoposta --------------------------------------------------------------------------


def held_state(data_dir: Path, url: str) -> tuple[int, int]:
    """(messages held for DOMAIN, their stored bytes), read through open_store."""
    from fermoposta.store import open_store

    store = open_store(data_dir, url=url)
    try:
        count = len(store.held_message_ids([DOMAIN]))
        _, size = store.domain_usage(DOMAIN)
        return count, size
    finally:
        store.close()


def run_fermoposta(system: str, rnd: int, work: Path, args: argparse.Namespace,
                   source_args: Sequence[str], pg_base: str) -> list[Run]:
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_schema(pg_base)) if system == "postgresql" else ""
        base = work / f"{system}-r{rnd}"
        mx_port, odmr_port = c.free_port(), c.free_port()
        # All sessions come from 127.0.0.1: let the per-address limit admit them.
        per_ip = max(20, args.sessions + 10)
        config = c.write_config(base, mx_port=mx_port, odmr_port=odmr_port, store_url=url,
                                log_level=args.log_level,
                                limits=f"max_connections_per_ip = {per_ip}\n"
                                       f"max_connections = {max(100, per_ip)}\n")
        c.add_account_cli(config, "acme", [DOMAIN])
        provider = c.ProviderProcess(config, mx_port, odmr_port).start()
        stack.callback(provider.stop)  # before the schema is dropped (LIFO)
        backends: BackendCPU | None = None
        if url:
            admin = stack.enter_context(pg_connect(pg_base))
            backends = BackendCPU(admin, provider.pid, urlsplit(pg_base).port or 5432)

        def phase_start() -> tuple[float, dict[int, float]]:
            c.reset_peak_rss(provider.pid)
            return c.cpu_seconds(provider.pid), backends.sample() if backends else {}

        def phase_end(cpu0: float, server0: dict[int, float]
                      ) -> tuple[float, float | None, int | None]:
            cpu = c.cpu_seconds(provider.pid) - cpu0
            server = BackendCPU.spent(server0, backends.sample()) if backends else None
            return cpu, server, c.memory(provider.pid).get("VmHWM")

        # intake
        cpu0, server0 = phase_start()
        try:
            seconds = c.run_smtp_source(source_args, mx_port, args.timeout)
        except RuntimeError:
            print(provider.log_tail(), file=sys.stderr)
            raise
        cpu, server, peak = phase_end(cpu0, server0)
        held, size = held_state(base / "data", url)
        intake = Run(system, "intake", rnd, seconds, held, size, cpu, server, peak)
        if held != args.messages:
            intake.problems.append(f"{held} held after intake, expected {args.messages}")
        runs.append(intake)
        report(intake)

        # drain over one ATRN session
        cpu0, server0 = phase_start()
        try:
            seconds, st, _ = asyncio.run(drain.one_session(odmr_port, None, args.timeout,
                                                           chunking=args.chunking))
        except Exception:
            print(provider.log_tail(), file=sys.stderr)
            raise
        cpu, server, peak = phase_end(cpu0, server0)
        left = c.held_count(base / "data", [DOMAIN], url)
        out = Run(system, "drain", rnd, seconds, st.messages, st.data_bytes, cpu, server, peak)
        if st.messages != held or left != 0 or not st.quit:
            out.problems.append(f"customer got {st.messages} of {held}, {left} still held, "
                                f"QUIT seen: {st.quit} {st.notes}")
        runs.append(out)
        report(out)
        code = provider.stop()
        if code != 0:
            out.problems.append(f"provider exited {code}")
            print(provider.log_tail(), file=sys.stderr)
    return runs


# --- Postfix -----------------------------------------------------------------------------


def postfix_problem() -> str | None:
    if os.geteuid() != 0:
        return "Postfix needs root"
    if not POSTFIX_SCRIPT.is_file():
        return f"{POSTFIX_SCRIPT} is missing"
    for program in ("/usr/sbin/postfix", POSTSUPER, POSTQUEUE):
        if not Path(program).exists():
            return f"{program} is not installed"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix user"
    return None


def run_command(args: Sequence[str | os.PathLike[str]], log: Path, timeout: float,
                env: dict[str, str] | None = None) -> None:
    """Run a command as a child (stopped by PID on timeout); raise if it fails.

    Output goes to a file, not a pipe: `postfix start` leaves a daemon behind
    that could keep a pipe open."""
    with open(log, "ab") as out:
        proc = c.spawn(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                       env=env)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(map(str, args))}: no exit within {timeout:.0f}s") from None
    finally:
        c.stop_process(proc, grace=5.0)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{' '.join(map(str, args))} exited {proc.returncode}: {tail}")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(name))
    return children


def _tree(root: int) -> list[int]:
    children = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_cpu(root: int) -> float:
    """CPU of `root` and every process under it, alive or reaped (cutime/cstime)."""
    ticks = 0
    for pid in _tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


class TreePSS:
    """Highest sampled sum of PSS over a process tree (Postfix: many processes)."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root = root
        self.interval = interval
        self.max_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_kib = max(self.max_kib, sum(_pss_kib(p) for p in _tree(self.root)))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreePSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class PostfixLog:
    """Counts `status=sent` in a growing log file and sums the sizes qmgr logs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.sent = 0
        self.sizes: dict[str, int] = {}

    def poll(self) -> int:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            self.offset += len(data)
            lines = (self.partial + data).split(b"\n")
            self.partial = lines.pop()
            for line in lines:
                if b"status=sent" in line:
                    self.sent += 1
                elif b"qmgr[" in line and b" size=" in line:
                    m = re.search(rb": ([0-9A-F]+): from=<.*?>, size=(\d+)", line)
                    if m:
                        self.sizes[m.group(1).decode()] = int(m.group(2))
        return self.sent


def _master_pid(pfx: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((pfx / "queue" / "pid" / "master.pid").read_text().split()[0])
    return None


def _files(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def _queued(pfx: Path) -> int:
    return sum(_files(pfx / "queue" / q)
               for q in ("maildrop", "incoming", "active", "deferred", "hold"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_postfix(rnd: int, work: Path, args: argparse.Namespace,
                source_args: Sequence[str], *, drain: bool = True) -> list[Run]:
    """Postfix's intake into its hold queue, then (`drain`) its drain."""
    pfx = work / f"postfix-r{rnd}"
    pfx.mkdir()
    out_log = work / f"postfix-r{rnd}.commands.log"
    runs: list[Run] = []
    with c.smtp_sink(backlog=1024) as (sink_port, _):
        smtpd_port = c.free_port()
        env = {**os.environ, "PFX": str(pfx), "SMTPD_PORT": str(smtpd_port),
               "SINK_PORT": str(sink_port), "DRAIN_CONCURRENCY": "1"}
        run_command(["bash", POSTFIX_SCRIPT, "setup", "hold"], out_log, args.timeout, env)
        master: int | None = None
        try:
            run_command(["bash", POSTFIX_SCRIPT, "start"], out_log, args.timeout, env)
            master = _master_pid(pfx)
            c.wait_for_port(smtpd_port)
            if master is None:
                raise RuntimeError("Postfix started but wrote no master.pid")
            log = PostfixLog(pfx / "postfix.log")

            # intake
            cpu0 = tree_cpu(master)
            with TreePSS(master) as pss:
                seconds = c.run_smtp_source(source_args, smtpd_port, args.timeout)
            cpu = tree_cpu(master) - cpu0
            held = _files(pfx / "queue" / "hold")
            intake = Run("postfix", "intake", rnd, seconds, held, 0, cpu, None, pss.max_kib)
            if held != args.messages or _queued(pfx) != held:
                intake.problems.append(f"{held} on hold ({_queued(pfx)} queued) after intake, "
                                       f"expected {args.messages}")
            runs.append(intake)
            if not drain:
                report(intake)
                return runs

            # drain over one connection (smtp_destination_concurrency_limit = 1)
            cpu0 = tree_cpu(master)
            deadline = time.monotonic() + args.timeout
            with TreePSS(master) as pss:
                start = time.perf_counter()
                run_command([POSTSUPER, "-c", pfx / "etc", "-H", "ALL"], out_log, args.timeout)
                run_command([POSTQUEUE, "-c", pfx / "etc", "-f"], out_log, args.timeout)
                while log.poll() < held:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.005)
                seconds = time.perf_counter() - start
            cpu = tree_cpu(master) - cpu0
            while _queued(pfx) and time.monotonic() < deadline:
                time.sleep(0.05)  # the queue file goes after its status=sent line
            time.sleep(0.5)  # a duplicate delivery would show up by now
            sent = log.poll()
            left = _queued(pfx)
            size = sum(log.sizes.values())
            out = Run("postfix", "drain", rnd, seconds, sent, size, cpu, None, pss.max_kib)
            if sent != held or left != 0:
                out.problems.append(f"status=sent {sent} of {held}, {left} still queued")
            # Same messages both ways: the intake moved the bytes qmgr logs now.
            intake.data_bytes = size * held // max(len(log.sizes), 1)
            report(intake)
            runs.append(out)
            report(out)
        finally:
            with contextlib.suppress(RuntimeError):
                run_command(["bash", POSTFIX_SCRIPT, "stop"], out_log, 60.0, env)
            if master is not None and _alive(master):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(master, 9)
    return runs


# --- reporting ---------------------------------------------------------------------------


def report(run: Run) -> None:
    extra = f", PostgreSQL backends {run.server_cpu:.2f} s" if run.server_cpu is not None else ""
    peak = c.mib(run.peak_kib)
    mib_s = f"{run.mib_s:5.2f} MiB/s" if run.data_bytes else "MiB/s n/a"  # not measured
    print(f"  round {run.round} {LABELS[run.system]:22} {run.workload:6}: {run.messages} msgs "
          f"in {run.seconds:6.2f} s = {run.rate:6.0f} msgs/s, {mib_s}; "
          f"CPU {run.cpu:.2f} s{extra}; peak {peak}"
          + (f"  PROBLEM: {'; '.join(run.problems)}" if run.problems else ""), flush=True)


def summary(runs: list[Run], systems: Sequence[str]) -> list[str]:
    lines = ["| workload | system | msgs/s (median) | range | MiB/s | seconds | peak RSS "
             "| CPU (% of wall) | PostgreSQL backends CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    medians: dict[tuple[str, str], float] = {}
    for workload in WORKLOADS:
        for system in systems:
            rs = [r for r in runs if r.system == system and r.workload == workload]
            if not rs:
                continue
            rate = statistics.median(r.rate for r in rs)
            medians[workload, system] = rate
            cpu = statistics.median(100 * r.cpu / r.seconds for r in rs if r.seconds > 0)
            server = [r.server_cpu / r.seconds * 100 for r in rs
                      if r.server_cpu is not None and r.seconds > 0]
            peaks = [r.peak_kib for r in rs if r.peak_kib]
            peak = c.mib(int(statistics.median(peaks))) if peaks else "n/a"
            if system == "postfix":
                peak += " (PSS sum)"
            lines.append(
                f"| {workload} | {LABELS[system]} | {rate:.0f} | "
                f"{min(r.rate for r in rs):.0f}-{max(r.rate for r in rs):.0f} | "
                f"{statistics.median(r.mib_s for r in rs):.2f} | "
                f"{statistics.median(r.seconds for r in rs):.2f} | {peak} | {cpu:.0f}% | "
                f"{f'{statistics.median(server):.0f}%' if server else ''} |")
    lines += ["", "| workload | PostgreSQL/SQLite | SQLite/Postfix | PostgreSQL/Postfix |",
              "|---|---|---|---|"]
    for workload in WORKLOADS:
        def m(system: str, w: str = workload) -> float:
            return medians.get((w, system), float("nan"))  # not run: ratio n/a
        lines.append(f"| {workload} | {c.ratio(m('postgresql'), m('sqlite'))} | "
                     f"{c.ratio(m('sqlite'), m('postfix'))} | "
                     f"{c.ratio(m('postgresql'), m('postfix'))} |")
    lines += ["", "Each round's own ratios (its runs follow each other within minutes, "
              "so a machine that speeds up or slows down moves both), median (range):", "",
              "| workload | SQLite/Postfix | PostgreSQL/Postfix |", "|---|---|---|"]
    for workload in WORKLOADS:
        lines.append(f"| {workload} | {paired_ratio(runs, workload, 'sqlite')} | "
                     f"{paired_ratio(runs, workload, 'postgresql')} |")
    return lines


def paired_ratio(runs: Sequence[Run], workload: str, system: str,
                 versus: str = "postfix") -> str:
    """`system`'s rate over `versus`'s in each round that ran both: their
    median and range, or "n/a"."""
    rates = {(r.round, r.system): r.rate for r in runs if r.workload == workload}
    ratios = [rates[rnd, system] / rates[rnd, versus] for rnd in sorted({r for r, _ in rates})
              if (rnd, system) in rates and rates.get((rnd, versus), 0) > 0]
    if not ratios:
        return "n/a"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def intake_arguments(ap: argparse.ArgumentParser) -> None:
    """The intake's flags, shared with `intake_floor.py`."""
    ap.add_argument("--messages", type=int, default=3000, help="messages per run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (each runs every system once)")
    ap.add_argument("--sessions", type=int, default=10, help="intake sessions (smtp-source -s)")
    ap.add_argument("--size", type=int, default=4096, help="payload bytes (smtp-source -l)")
    ap.add_argument("--timeout", type=float, default=600.0, help="limit for each wait")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--keep-connection", action="store_true",
                    help="smtp-source -d: every session sends all its messages over one "
                         "connection (with --sessions 1: one long session)")


def rotation(rounds: int, systems: Sequence[str]) -> Iterator[tuple[int, str]]:
    """(round, system) for every run: each round runs every system once, the
    order rotating by one from round to round; says how busy the machine was
    at the start of each round (other work moves the figures)."""
    for rnd in range(1, rounds + 1):
        print(f"round {rnd}: load average {os.getloadavg()[0]:.2f}", flush=True)
        shift = (rnd - 1) % len(systems)
        for system in [*systems[shift:], *systems[:shift]]:
            yield rnd, system


def intake_source_args(args: argparse.Namespace) -> list[str]:
    """smtp-source's arguments for the intake `args` ask for."""
    source_args = ["-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.size),
                   "-f", "sender@bench.test", "-t", f"rcpt@{DOMAIN}"]
    if args.keep_connection:
        source_args.insert(0, "-d")
    return source_args


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    intake_arguments(ap)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="provider log level (log goes to a file in the work directory)")
    ap.add_argument("--skip-postfix", action="store_true", help="no Postfix runs")
    ap.add_argument("--chunking", action="store_true",
                    help="the drain's customer offers CHUNKING: the drain sends BDAT "
                         "transactions, several in flight (Postfix's drain to smtp-sink "
                         "stays DATA)")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"comma-separated subset of {','.join(SYSTEMS)}")
    args = ap.parse_args()
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not chosen or set(chosen) - set(SYSTEMS):
        sys.exit(f"--systems: choose among {', '.join(SYSTEMS)}")
    c.need(c.SMTP_SOURCE, c.SMTP_SINK)
    pg_base = os.environ.get(PG_ENV) or PG_DEFAULT
    if urlsplit(pg_base).hostname not in ("127.0.0.1", None):
        sys.exit(f"{PG_ENV} must name 127.0.0.1 (benchmarks stay on loopback)")
    try:
        pg_line = pg_header(pg_base)
    except Exception as exc:
        from fermoposta.store import redact_url

        print(f"PostgreSQL not reachable at {redact_url(pg_base)}: {exc}", file=sys.stderr)
        return 2
    problem = "skipped (--skip-postfix)" if args.skip_postfix else postfix_problem()
    systems = [s for s in SYSTEMS if s in chosen and (s != "postfix" or problem is None)]

    source_args = intake_source_args(args)
    print(f"Store engines: {args.messages} messages of ~{args.size} bytes, {args.rounds} rounds; "
          f"intake smtp-source {' '.join(source_args)}; drain over one connection"
          f"{' (customer offers CHUNKING)' if args.chunking else ''}")
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {c.machine_description()}")
    print(pg_line)
    print(f"Postfix: {problem or 'private instance via ' + str(POSTFIX_SCRIPT)}")
    runs: list[Run] = []
    failed = False
    try:
        with c.workdir(args.keep, "fermoposta-bench-engines-") as work:
            work.chmod(0o711)  # the postfix user must reach its queue under it
            for rnd, system in rotation(args.rounds, systems):
                try:
                    if system == "postfix":
                        runs += run_postfix(rnd, work, args, source_args)
                    else:
                        runs += run_fermoposta(system, rnd, work, args, source_args, pg_base)
                except Exception as exc:  # the run is lost, not the others: go on
                    failed = True
                    print(f"  round {rnd} {LABELS[system]}: FAILED: {exc}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}\n")
    for line in summary(runs, systems):
        print(line)
    bad = [r for r in runs if r.problems]
    if bad or failed:
        print(f"\n{len(bad)} runs lost or duplicated mail" + (", and some failed" if failed
                                                                else ""))
        return 1
    print(f"\nall {len(runs)} runs: every message held after intake, every one delivered once "
          "and none left after the drain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
