"""A real Dovecot LMTP server for integration tests, started and stopped by PID.

`running_dovecot()` writes a configuration into a fresh directory under /tmp
(short paths for unix sockets; world-readable because Dovecot's unprivileged
processes must read the user file), starts `dovecot -F -c <conf>` in the
foreground, waits for its LMTP socket and stops it with SIGTERM on exit.

- `protocols = lmtp`, no login services, no TLS; LMTP on the unix socket
  `<dir>/lmtp` and on 127.0.0.1:<free port>.
- Users bob@example.org and carol@example.org (passwd-file); any other user
  is refused at RCPT with 550 5.1.1.
- `mail_location = maildir:<dir>/mail/%d/%n/Maildir`.  Mail is stored as the
  current user, or as "nobody" when the tests run as root (Dovecot never
  writes mail as root); the mail directory is handed to that user.
- `log_path = <dir>/dovecot.log` (shown when startup fails).

Fixtures (import them into a test module, or `pytest_plugins = ("dovecot",)`):
`dovecot_server` (one Dovecot per module) and `dovecot` (that server with
empty mailboxes, per test).  A test that stops Dovecot starts its own with
`running_dovecot()`.  Everything skips with a clear message when Dovecot is
not installed.
"""

from __future__ import annotations

import contextlib
import grp
import mailbox
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DOVECOT = "/usr/sbin/dovecot"
USERS = ("bob@example.org", "carol@example.org")


@dataclass
class Dovecot:
    directory: Path
    config: Path
    socket: Path
    port: int
    proc: subprocess.Popen[bytes] | None

    @property
    def mail_root(self) -> Path:
        return self.directory / "mail"

    def maildir(self, address: str) -> Path:
        local, domain = address.split("@")
        return self.mail_root / domain / local / "Maildir"

    def messages(self, address: str) -> list[bytes]:
        """The raw messages in the user's INBOX (as Dovecot stored them: LF line ends)."""
        path = self.maildir(address)
        if not path.exists():
            return []
        box = mailbox.Maildir(path, create=False)
        return [box.get_bytes(key) for key in sorted(box.keys())]

    def files(self) -> list[Path]:
        """Every message file under the mail root (new/ and cur/ of all users)."""
        return sorted(p for p in self.mail_root.rglob("*")
                      if p.is_file() and p.parent.name in ("new", "cur", "tmp"))

    def log(self) -> str:
        text = ""
        for name in ("stderr", "dovecot.log"):
            path = self.directory / name
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mail_owner() -> tuple[str, str, int, int]:
    """(user, group, uid, gid) that Dovecot stores mail as."""
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        return user.pw_name, grp.getgrgid(user.pw_gid).gr_name, user.pw_uid, user.pw_gid
    uid, gid = os.geteuid(), os.getegid()
    return pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name, uid, gid


def _config(directory: Path, port: int) -> str:
    mail_user, mail_group, _, _ = _mail_owner()
    if os.geteuid() == 0:
        internal, login, group = "dovecot", "dovenull", "dovecot"
        for name in (internal, login):
            try:
                pwd.getpwnam(name)
            except KeyError:
                pytest.skip(f"Dovecot as root needs the system user {name!r}")
    else:  # unprivileged: every process runs as us
        internal = login = mail_user
        group = mail_group
    users = directory / "users"
    return f"""\
base_dir = {directory}/run
state_dir = {directory}/state
log_path = {directory}/dovecot.log
protocols = lmtp
ssl = no
listen = 127.0.0.1
default_internal_user = {internal}
default_internal_group = {group}
default_login_user = {login}
mail_uid = {mail_user}
mail_gid = {mail_group}
mail_location = maildir:{directory}/mail/%d/%n/Maildir
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = passwd-file
  args = {users}
}}
service lmtp {{
  unix_listener {directory}/lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


def _wait_ready(dovecot: Dovecot, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert dovecot.proc is not None
        if dovecot.proc.poll() is not None:
            raise RuntimeError(f"dovecot exited with {dovecot.proc.returncode}:\n"
                               f"{dovecot.log()}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1.0)
            s.connect(str(dovecot.socket))
            if s.recv(512).startswith(b"220"):
                return
        time.sleep(0.05)
    raise TimeoutError(f"dovecot LMTP not ready after {timeout}s:\n{dovecot.log()}")


@contextlib.contextmanager
def running_dovecot() -> Iterator[Dovecot]:
    if not os.path.exists(DOVECOT) or shutil.which("doveadm") is None:
        pytest.skip("Dovecot is not installed (Debian packages dovecot-core and dovecot-lmtpd)")
    if not os.path.exists("/usr/lib/dovecot/lmtp"):
        pytest.skip("Dovecot's LMTP server is not installed (Debian package dovecot-lmtpd)")
    directory = Path(tempfile.mkdtemp(prefix="fp-dovecot-"))
    directory.chmod(0o755)
    try:
        _, _, uid, gid = _mail_owner()
        (directory / "mail").mkdir()
        os.chown(directory / "mail", uid, gid)
        (directory / "users").write_text(
            "".join(f"{user}:{{PLAIN}}unused::::{directory}/home/{user}\n" for user in USERS)
        )
        port = _free_port()
        config = directory / "dovecot.conf"
        config.write_text(_config(directory, port))
        with open(directory / "stderr", "wb") as stderr:
            proc = subprocess.Popen([DOVECOT, "-F", "-c", str(config)],
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        dovecot = Dovecot(directory, config, directory / "lmtp", port, proc)
        try:
            _wait_ready(dovecot)
            yield dovecot
        finally:
            dovecot.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def empty_mailboxes(server: Dovecot) -> None:
    """Remove every user's mail (between tests sharing one server)."""
    for child in server.mail_root.iterdir():
        shutil.rmtree(child)


@pytest.fixture(scope="module")
def dovecot_server() -> Iterator[Dovecot]:
    """One Dovecot for a test module (stopping one takes Dovecot about a second)."""
    with running_dovecot() as server:
        yield server


@pytest.fixture
def dovecot(dovecot_server: Dovecot) -> Iterator[Dovecot]:
    """The module's Dovecot with empty mailboxes; tests must not stop it."""
    empty_mailboxes(dovecot_server)
    yield dovecot_server
    assert dovecot_server.proc is not None, "stop a server of your own: running_dovecot()"
