"""Which processes that share a store are alive: a lock file per holder.

Contract:
- A `Holders(directory)` gives this process one holder name (`me()`), made on
  first use: `<directory>/<name>.lock` is created and locked with `flock`
  (exclusive) for as long as this process (or this `Holders`) lives.  The
  kernel drops the lock when the process dies, however it dies (kill -9,
  OOM, power loss: the lock is not on disk), so the lock is the truth about
  liveness, with no clock and no timeout.
- `is_alive(name)` asks whether the holder `name` still runs: it tries the
  same lock without blocking.  It gets it → the holder is dead (its stale
  file is removed); the lock is busy → alive.  Our own name is alive.  A
  name whose file is missing is dead, but only once `me()` has created our
  own file, i.e. only names written by a process that locked first.
- Names come from the database; anything that is not a plain file name
  (`[A-Za-z0-9._-]`) is treated as alive (never as a path), so a bad row can
  never make us take a lease or touch another file.
- Works for processes on one machine sharing one directory (the SQLite
  store's); leases across machines need the database's own means (a
  heartbeat: see the multi-node store).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import socket
import threading
from pathlib import Path

__all__ = ["Holders"]

_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


class Holders:
    """Liveness of the processes sharing a store directory; see the module docstring."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._name: str | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()

    def me(self) -> str:
        """This process's holder name; its lock is taken before the name is returned,
        so no other process can see the name without the lock behind it."""
        with self._lock:
            if self._name is None:
                host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:60] or "host"
                name = f"{host}-{os.getpid()}-{secrets.token_hex(4)}"
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self.directory / f"{name}.lock",
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd, self._name = fd, name
            return self._name

    def is_alive(self, name: str) -> bool:
        if name == self._name or not _NAME.fullmatch(name):
            return True
        path = self.directory / f"{name}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError:
            return True  # cannot tell: never take what may be live
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            except OSError:
                return True
            # We hold a dead holder's lock: remove its file while we hold it.
            with contextlib.suppress(OSError):
                os.unlink(path)
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        """Give up our name (a clean exit); a crash gives it up by itself."""
        with self._lock:
            if self._fd is None:
                return
            assert self._name is not None
            with contextlib.suppress(OSError):
                os.unlink(self.directory / f"{self._name}.lock")
            os.close(self._fd)
            self._fd = None
            self._name = None
