"""Shared helpers for the fermoposta benchmarks (not part of the test suite).

Everything here listens on or connects to 127.0.0.1 only, picks free ports,
starts every child process itself and stops it again by PID (SIGTERM, then
SIGKILL after a grace period), also when the benchmark is interrupted.

Only the standard library, fermoposta itself and trustme are used.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import fcntl
import hashlib
import hmac
import io
import os
import platform
import pwd
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The virtualenv whose `fermoposta` runs (and whose interpreter runs it):
# the project's own, or another one made with another Python build
# (FERMOPOSTA_BENCH_VENV=/path/to/venv; bench/README.md).
BIN = Path(os.environ.get("FERMOPOSTA_BENCH_VENV") or ROOT / ".venv") / "bin"
FERMOPOSTA = BIN / "fermoposta"
if os.environ.get("FERMOPOSTA_BENCH_VENV") and not os.access(FERMOPOSTA, os.X_OK):
    sys.exit(f"FERMOPOSTA_BENCH_VENV={os.environ['FERMOPOSTA_BENCH_VENV']}: no {FERMOPOSTA} "
             "there; make that venv with bench/system_venv.sh DIR")
HOST = "127.0.0.1"
PASSWORD = "bench password 1234"


# --- processes -------------------------------------------------------------------------

_children: dict[int, subprocess.Popen[bytes]] = {}


def _stop_all_children() -> None:
    for pid in reversed(list(_children)):  # the newest (the load generator) first
        with contextlib.suppress(Exception):
            stop_process(_children[pid])


def _on_signal(signum: int, frame: object) -> None:
    # Only unwind here: the `finally` blocks and the atexit hook then stop the
    # children outside the signal handler (where a Popen lock may be held).
    raise SystemExit(128 + signum)


atexit.register(_stop_all_children)
signal.signal(signal.SIGTERM, _on_signal)


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark process dies (Linux prctl)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(args: Sequence[str | os.PathLike[str]], **kwargs: object) -> subprocess.Popen[bytes]:
    """Start a child process that is stopped by PID at exit if still running.

    As a second safety net the child also gets SIGTERM from the kernel if this
    process dies without cleaning up (cleared in children that change uid)."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
        [str(a) for a in args], preexec_fn=_die_with_parent, **kwargs)
    _children[proc.pid] = proc
    return proc


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> int:
    """SIGTERM the process (by its PID), wait, SIGKILL if it lingers; return its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    _children.pop(proc.pid, None)
    return int(proc.returncode)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None,
                  timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port}")


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time consumed so far by a process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def written_bytes(pid: int) -> int:
    """Bytes the process caused to be written to storage (`write_bytes` of
    /proc/<pid>/io: page cache write-back included, all its threads)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


class RSSSampler:
    """Samples VmRSS of a PID in a background thread (max seen, in KiB)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import threading

        self.pid = pid
        self.interval = interval
        self.max_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = memory(self.pid).get("VmRSS", 0)
            self.max_rss = max(self.max_rss, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} cores, {model}, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


# --- provider --------------------------------------------------------------------------


@dataclass
class TLSFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx


def make_tls(directory: Path) -> TLSFiles:
    """A trustme CA and a server certificate for localhost/127.0.0.1."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(files.ca_file))
    with open(files.cert_file, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(files.key_file))
    return files


def write_config(directory: Path, *, mx_port: int, odmr_port: int, tls: TLSFiles | None = None,
                 log_level: str = "info", limits: str = "", odmr: str = "",
                 store_url: str = "", extra: str = "", listen: str = "") -> Path:
    """A provider.toml in `directory`: `store_url` non-empty adds `[store] url`
    (else SQLite under `data_dir`); `extra` is appended as it is (more tables);
    `listen` is added to `[listen]` (e.g. an `odmr_tls` line)."""
    directory.mkdir(parents=True, exist_ok=True)
    tls_table = ""
    if tls is not None:
        tls_table = f'[tls]\ncert = "{tls.cert_file}"\nkey = "{tls.key_file}"\n\n'
    store_table = ""
    if store_url:
        store_table = f'\n[store]\nurl = "{store_url}"\nnode = "bench"\n'
    path = directory / "provider.toml"
    path.write_text(
        f'hostname = "mx.provider.test"\ndata_dir = "{directory / "data"}"\n\n'
        f'[listen]\nmx = "{HOST}:{mx_port}"\nodmr = "{HOST}:{odmr_port}"\n'
        f'submission = ""\n{listen}\n'
        f"{tls_table}"
        f"[limits]\n{limits}\n"
        f"[odmr]\nmechanisms = [\"SCRAM-SHA-256\", \"PLAIN\", \"LOGIN\", \"CRAM-MD5\"]\n{odmr}\n"
        f'[log]\nlevel = "{log_level}"\n'
        f"{store_table}{extra}"
    )
    return path


def cli(config: Path, *args: str) -> None:
    """Run a `fermoposta -c config ...` admin command; raise on failure."""
    proc = subprocess.run([str(FERMOPOSTA), "-c", str(config), *args], capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"fermoposta {' '.join(args)} exited {proc.returncode}: "
                           f"{proc.stderr.strip()}")


def add_account_cli(config: Path, name: str, domains: Sequence[str],
                    password: str = PASSWORD) -> None:
    pw = config.parent / f"{name}.pw"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    args = ["account", "add", name]
    for d in domains:
        args += ["--domain", d]
    cli(config, *args, "--password-file", str(pw))


class ProviderProcess:
    """`fermoposta -c CONFIG provider run` as a child process (log in a file);
    `command` replaces `fermoposta` (e.g. a `python -c` that patches it first)."""

    def __init__(self, config: Path, mx_port: int, odmr_port: int,
                 command: Sequence[str | os.PathLike[str]] = (FERMOPOSTA,)) -> None:
        self.config = config
        self.command = list(command)
        self.mx_port = mx_port
        self.odmr_port = odmr_port
        self.log_path = config.parent / "provider.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ProviderProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115
        try:
            self.proc = spawn([*self.command, "-c", self.config, "provider", "run"],
                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                              cwd=str(self.config.parent))
        finally:
            log.close()
        wait_for_port(self.mx_port, self.proc)
        wait_for_port(self.odmr_port, self.proc)
        return self

    def stop(self) -> int:
        if self.proc is None:
            return 0
        code = stop_process(self.proc)
        return code

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> ProviderProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- Postfix peers ---------------------------------------------------------------------


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None and not Path(p).exists()]
    if missing:
        sys.exit(f"not installed: {', '.join(missing)} (Debian: apt-get install postfix)")


SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


@contextlib.contextmanager
def smtp_sink(backlog: int = 64) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Postfix's smtp-sink on a free loopback port (dropping root to nobody)."""
    need(SMTP_SINK)
    port = free_port()
    args = [SMTP_SINK]
    if os.geteuid() == 0:
        pwd.getpwnam("nobody")
        args += ["-u", "nobody"]
    proc = spawn([*args, f"{HOST}:{port}", str(backlog)], stdin=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield port, proc
    finally:
        stop_process(proc, grace=5.0)


def run_smtp_source(args: Sequence[str], port: int, timeout: float) -> float:
    """Run smtp-source against HOST:port; return the wall time in seconds."""
    need(SMTP_SOURCE)
    start = time.perf_counter()
    proc = spawn([SMTP_SOURCE, *args, f"{HOST}:{port}"], stdin=subprocess.DEVNULL,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
        elapsed = time.perf_counter() - start
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"smtp-source did not finish within {timeout:.0f}s") from None
    finally:
        stop_process(proc, grace=2.0)  # a no-op once it has exited
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source exited {proc.returncode}: "
                           f"{out.decode(errors='replace')[-2000:]}")
    return elapsed


# --- store setup -----------------------------------------------------------------------


def held_count(data_dir: Path, domains: Sequence[str], url: str = "") -> int:
    """Messages with HELD recipients in `domains`, read through the store that
    `open_store(data_dir, url=url)` opens (SQLite under `data_dir` by default)."""
    from fermoposta.store import open_store

    store = open_store(data_dir, url=url)
    try:
        return len(store.held_message_ids(list(domains)))
    finally:
        store.close()


def make_body(size: int, seq: int = 0) -> bytes:
    """A plain RFC 5322 message of about `size` bytes, 76-char lines + CRLF."""
    head = (f"From: sender@bench.test\r\nTo: rcpt@example.org\r\n"
            f"Subject: bench message {seq}\r\nMessage-ID: <{seq}@bench.test>\r\n\r\n").encode()
    line = (b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-the-quick-bro"
            b"\r\n")
    assert len(line) == 78
    n = max(0, size - len(head)) // len(line) + 1
    return head + line * n


def bulk_enqueue(store: object, items: Sequence[tuple[str, str]], body_size: int,
                 batch: int = 2000) -> str:
    """Enqueue one message per (recipient address, domain) as HELD mail.

    Uses the store's own row-writing code inside one transaction per `batch`
    messages (SQLiteStore._write/_enqueue) when available, else the public
    `enqueue` (one fsynced commit each).  Returns which path was taken."""
    from fermoposta.store import MessageOrigin, NewMessage, NewRecipient, RecipientState

    def message(address: str, domain: str) -> NewMessage:
        return NewMessage(sender="sender@bench.test",
                          recipients=(NewRecipient(address, domain, RecipientState.HELD),),
                          origin=MessageOrigin.MX, client="bench[127.0.0.1]")

    body = make_body(body_size)
    writer = getattr(store, "_write", None)
    enqueue_row = getattr(store, "_enqueue", None)
    if writer is not None and enqueue_row is not None:
        try:
            for start in range(0, len(items), batch):
                with writer() as conn:
                    for address, domain in items[start:start + batch]:
                        enqueue_row(conn, message(address, domain), io.BytesIO(body))
            return f"batched ({batch} messages per transaction)"
        except TypeError:
            pass  # private API changed: fall back to the public one
    for address, domain in items:
        store.enqueue(message(address, domain), io.BytesIO(body))  # type: ignore[attr-defined]
    return "public enqueue (one commit per message)"


def add_account_store(store: object, name: str, domains: Sequence[str],
                      password: str = PASSWORD, iterations: int = 4096) -> None:
    from fermoposta.provider.accounts import make_scram_secret
    from fermoposta.store import Account, Domain

    store.add_account(Account(name=name, scram=make_scram_secret(password, iterations),  # type: ignore[attr-defined]
                              cram_secret=password))
    for d in domains:
        store.add_domain(Domain(name=d, account=name))  # type: ignore[attr-defined]


# ext4's inode flag FS_TOPDIR_FL, read and set with FS_IOC_GETFLAGS / FS_IOC_SETFLAGS
# (<linux/fs.h>; what `chattr +T` does).
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def spread_subdirectories(path: Path) -> bool:
    """Mark `path` as the top of a directory hierarchy (ext4's TOPDIR flag),
    so that each directory made in it goes to a block group of its own
    (the Orlov allocator), as on separate machines, instead of next to the
    others.  Why: on a file system without a journal (this host's), ext4
    skips inodes deleted within the last minutes when it allocates a new
    one, reading each one's inode table entry (`recently_deleted`), so a
    system creating files in the block group where another has just
    deleted thousands (Postfix's drain, a previous round) pays for that
    scan: `customer pull` rounds at 665-829 msgs/s with 2.0-3.8 s of system
    time, against 1057-1272 and 0.7-0.8 s in a group of their own (bench/README.md).
    Best effort: False where the flag cannot be set (not ext4, say tmpfs)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags | FS_TOPDIR_FL))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def workdir(keep: bool, prefix: str) -> Iterator[Path]:
    """A new work directory whose subdirectories are spread over block
    groups (`spread_subdirectories`); removed afterwards unless `keep`."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if not spread_subdirectories(path):
        print(f"(work directory {path}: its subdirectories share block groups: "
              "the ext4 TOPDIR flag could not be set)")
    try:
        yield path
    finally:
        if keep:
            print(f"(kept work directory {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


# --- the customer: ODMR client, then a minimal SMTP server on the same stream -----------

END_OF_DATA = b"\r\n.\r\n"
READ_SIZE = 256 * 1024


class SMTPError(Exception):
    pass


@dataclass
class ServeStats:
    messages: int = 0
    data_bytes: int = 0
    recipients: int = 0
    quit: bool = False
    first_command_at: float = 0.0
    last_message_at: float = 0.0
    ended_at: float = 0.0
    notes: list[str] = field(default_factory=list)


class Customer:
    """A dial-up customer: authenticates on the ODMR port, sends ATRN and then
    plays a minimal fast SMTP server (220/EHLO/MAIL/RCPT/DATA/QUIT) that
    counts the messages and bytes it receives and throws them away."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int) -> Customer:
        reader, writer = await asyncio.open_connection(HOST, port, limit=READ_SIZE * 4)
        return cls(reader, writer)

    async def _fill(self) -> bool:
        data = await self.reader.read(READ_SIZE)
        if not data:
            return False
        self.buf += data
        return True

    async def readline(self, timeout: float = 60.0) -> bytes:
        async with asyncio.timeout(timeout):
            while True:
                i = self.buf.find(b"\n")
                if i >= 0:
                    line = bytes(self.buf[:i + 1])
                    del self.buf[:i + 1]
                    return line
                if not await self._fill():
                    raise SMTPError("connection closed")

    async def reply(self, timeout: float = 60.0) -> tuple[int, list[str]]:
        lines = []
        while True:
            text = (await self.readline(timeout)).decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if len(text) < 4 or text[3] == " ":
                return int(text[:3]), lines

    async def send(self, line: str) -> None:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()

    async def cmd(self, line: str, expect: int | None = None,
                  timeout: float = 60.0) -> tuple[int, list[str]]:
        await self.send(line)
        code, lines = await self.reply(timeout)
        if expect is not None and code != expect:
            raise SMTPError(f"{line.split()[0] if line else '(empty)'}: expected {expect}, "
                            f"got {code} {lines}")
        return code, lines

    async def hello(self, tls: ssl.SSLContext | None) -> None:
        await self.reply()
        await self.cmd("EHLO customer.example.org", 250)
        if tls is not None:
            await self.cmd("STARTTLS", 220)
            self.buf.clear()
            await self.writer.start_tls(tls, server_hostname="localhost")
            await self.cmd("EHLO customer.example.org", 250)

    async def auth_plain(self, user: str, password: str = PASSWORD) -> None:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        await self.cmd(f"AUTH PLAIN {token}", 235)

    async def auth_cram_md5(self, user: str, password: str = PASSWORD) -> None:
        _, lines = await self.cmd("AUTH CRAM-MD5", 334)
        challenge = base64.b64decode(lines[0])
        digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
        await self.cmd(base64.b64encode(f"{user} {digest}".encode()).decode(), 235)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.writer.wait_closed()

    async def serve(self, timeout: float = 300.0, *, chunking: bool = False) -> ServeStats:
        """Play the SMTP server after the turnaround until QUIT or EOF; with
        `chunking`, offer CHUNKING and take BDAT too (RFC 3030)."""
        st = ServeStats()
        ehlo = (b"250-customer.example.org\r\n250-PIPELINING\r\n"
                + (b"250-CHUNKING\r\n" if chunking else b"")
                + b"250-SIZE 1099511627776\r\n250 8BITMIME\r\n")
        self.writer.write(b"220 customer.example.org ESMTP bench sink\r\n")
        out: list[bytes] = []
        async with asyncio.timeout(timeout):
            while True:
                # Answer every complete command line already buffered (pipelining).
                i = self.buf.find(b"\n")
                if i < 0:
                    if out:
                        self.writer.write(b"".join(out))
                        out.clear()
                        await self.writer.drain()
                    if not await self._fill():
                        st.notes.append("EOF before QUIT")
                        break
                    continue
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                if not st.first_command_at:
                    st.first_command_at = time.perf_counter()
                verb = line[:4].upper()
                if verb == b"EHLO":
                    out.append(ehlo)
                elif verb == b"HELO":
                    out.append(b"250 customer.example.org\r\n")
                elif verb == b"MAIL":
                    out.append(b"250 2.1.0 OK\r\n")
                elif verb == b"RCPT":
                    st.recipients += 1
                    out.append(b"250 2.1.5 OK\r\n")
                elif verb == b"DATA":
                    out.append(b"354 go ahead\r\n")
                    self.writer.write(b"".join(out))
                    out.clear()
                    await self.writer.drain()
                    st.data_bytes += await self._swallow_data()
                    st.messages += 1
                    st.last_message_at = time.perf_counter()
                    out.append(b"250 2.0.0 OK\r\n")
                elif verb == b"BDAT" and chunking:
                    _, size, *last = line.split()
                    st.data_bytes += await self._swallow_octets(int(size))
                    if last:
                        st.messages += 1
                        st.last_message_at = time.perf_counter()
                    out.append(b"250 2.0.0 OK\r\n")
                elif verb == b"RSET" or verb == b"NOOP":
                    out.append(b"250 OK\r\n")
                elif verb == b"QUIT":
                    out.append(b"221 bye\r\n")
                    self.writer.write(b"".join(out))
                    out.clear()
                    with contextlib.suppress(ConnectionError):
                        await self.writer.drain()
                    st.quit = True
                    break
                else:
                    out.append(b"502 5.5.1 not implemented\r\n")
        st.ended_at = time.perf_counter()
        return st

    async def _swallow_octets(self, size: int) -> int:
        """Discard the `size` octets of a BDAT chunk; return `size`."""
        left = size
        while left:
            if not self.buf and not await self._fill():
                raise SMTPError("connection closed in BDAT")
            take = min(left, len(self.buf))
            del self.buf[:take]
            left -= take
        return size

    async def _swallow_data(self) -> int:
        """Discard DATA content up to CRLF.CRLF; return the bytes counted."""
        count = 0
        tail = b"\r\n"  # the CRLF that ended the DATA command line
        if self.buf:
            chunk = bytes(self.buf)
            self.buf.clear()
        else:
            chunk = await self.reader.read(READ_SIZE)
        while True:
            if not chunk:
                raise SMTPError("connection closed in DATA")
            window = tail + chunk
            end = window.find(END_OF_DATA)
            if end >= 0:
                count += end + 2 - len(tail)
                self.buf += window[end + len(END_OF_DATA):]
                return count
            count += len(chunk)
            tail = window[-4:]
            chunk = await self.reader.read(READ_SIZE)


def ratio(a: float, b: float) -> str:
    """a/b to two places; "n/a" when b is 0 or either was not measured (NaN)."""
    return "n/a" if not b or a != a or b != b else f"{a / b:.2f}"
