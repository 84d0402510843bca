"""Helpers that start real third-party peers (by PID) for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (.ci/run installs them)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def smtp_sink(directory: Path, *extra: str) -> Iterator[int]:
    """Postfix's smtp-sink on a free loopback port, dumping each message to `directory`."""
    need("smtp-sink")
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    args = ["smtp-sink", "-d", f"{directory}/%Y%m%d%H%M%S.", *extra]
    if os.geteuid() == 0:
        # smtp-sink must drop root (-u); the unprivileged user must be able to
        # reach the dump directory, and pytest's tmp dirs are private to root.
        user = "nobody"
        spool = Path(tempfile.mkdtemp(prefix="fermoposta-sink-"))
        spool.chmod(0o755)
        directory.rmdir()
        directory.symlink_to(spool)
        os.chown(spool, pwd.getpwnam(user).pw_uid, -1)
        args = ["smtp-sink", "-d", f"{spool}/%Y%m%d%H%M%S.", *extra, "-u", user]
    proc = subprocess.Popen([*args, f"127.0.0.1:{port}", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if directory.is_symlink():
            spool = directory.resolve()
            directory.unlink()
            shutil.copytree(spool, directory)
            shutil.rmtree(spool, ignore_errors=True)


def sink_messages(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()]


async def run_fetchmail(rcfile: Path, *args: str, timeout: float = 60.0) -> tuple[int, str]:
    need("fetchmail")
    proc = await asyncio.create_subprocess_exec(
        "fetchmail", "-f", str(rcfile), "--nodetach", "--nosyslog", "-v", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "HOME": str(rcfile.parent), "FETCHMAILHOME": str(rcfile.parent)},
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode("utf-8", "replace")
