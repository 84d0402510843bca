"""A per-process cache of SQLite domain lookups, emptied through a stamp file.

The MX asks for the domain of every RCPT.  On SQLite that is a read of
about 9 µs, but while mail is being committed each read finds the WAL
changed, and SQLite then drops its connection's page cache and reads the
pages again: about 30 µs (bench/README.md, fifteenth session).  Domains
change rarely, and a change must take effect at once, also when another
process (the `fermoposta domain` and `account` commands) makes it.  SQLite
tells no other connection what changed, so the processes say it
themselves, in a file next to the store.

Contract:
- The stamp is the file `<store>-directory` (created, empty, by `open`,
  quietly skipped when it cannot be; mode 0600, and owned by the store
  file's owner when root creates it, as SQLite does for its -wal and -shm
  files).  Its state is its (inode,
  size, modification time in ns).  It holds no data: losing it loses
  nothing.
- `touched()`: called by every `SQLiteDirectory` write that changes what
  a `Domain` says (its account, quotas, valid recipients, hold lifetime,
  ETRN target, or that it exists), after that write has committed.  It
  empties this process's cache and appends one byte to the stamp, so the
  stamp's size, a strictly growing number, tells every process that
  something changed; past `MAX_SIZE` the stamp is replaced by a new file
  (a new inode).  A stamp that cannot be written is logged once a
  process (a warning: other processes then see the change only after
  `TTL`), and nothing else fails.
- `generation()` before a query and `keep(name, answer, generation)`
  after it; `lookup(name)` gives (True, answer) only while the stamp is
  still what `generation()` read before the query (one `stat` a lookup)
  and the answer is younger than `TTL`; else (False, None).  A change
  committed before the query but stamped after `generation()` makes the
  next lookup miss, and so does one committed after the query (its stamp
  comes after its commit): an answer read before a change committed is
  never given after that change's stamp.  A change this process made
  itself while the query ran is never kept either, stamp or no stamp.
  `TTL` is the backstop for a change made without the stamp: the sqlite3
  shell, a store copied back, a process killed between its commit and its
  stamp.
- Without a stamp to read (missing, unreadable), nothing is kept or given:
  every lookup reads the store, as before this cache.
- At most `MAX_ENTRIES` answers, negative ones included (RCPT to random
  domains): a full cache is emptied.
- Thread-safe: `keep` and `touched` hold a lock; `lookup` reads one entry
  without it (a dictionary lookup is atomic in CPython).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from fermoposta.store.base import Domain

__all__ = ["DomainCache", "stamp_path"]

log = logging.getLogger("fermoposta.store")

MAX_ENTRIES = 50_000
TTL = 10.0  # seconds an answer is given, whatever the stamp says
MAX_SIZE = 4096  # bytes of stamp before it is replaced by a new file

_Stamp = tuple[int, int, int]  # (inode, size, mtime_ns)
_Generation = tuple[int, _Stamp | None]  # (this process's touches, the stamp)


def stamp_path(store: Path) -> Path:
    """The stamp file of the SQLite store at `store`."""
    return store.with_name(store.name + "-directory")


class DomainCache:
    def __init__(self, store: Path) -> None:
        self.path = stamp_path(store)
        self._store = store
        self._lock = threading.Lock()
        # name: (monotonic time read, stamp when read, answer)
        self._answers: dict[str, tuple[float, _Stamp, Domain | None]] = {}
        self._touches = 0  # this process's own changes: also counted without a stamp
        self._warned = False

    def open(self) -> None:
        """Create the stamp if it is missing; never raises, never warns (no
        stamp: no cache, and a write that cannot stamp warns then)."""
        with contextlib.suppress(OSError):
            os.close(self._open(self.path, os.O_APPEND))

    def _open(self, path: Path, flags: int) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
        try:
            if os.geteuid() == 0 and self._store.exists():  # as SQLite does for -wal, -shm
                owner = os.stat(self._store)
                if os.fstat(fd).st_uid != owner.st_uid:
                    os.fchown(fd, owner.st_uid, owner.st_gid)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _stamp(self) -> _Stamp | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def generation(self) -> _Generation:
        return self._touches, self._stamp()

    def lookup(self, name: str) -> tuple[bool, Domain | None]:
        entry = self._answers.get(name)
        if entry is None or time.monotonic() - entry[0] >= TTL:
            return False, None
        if self._stamp() != entry[1]:
            return False, None
        return True, entry[2]

    def keep(self, name: str, answer: Domain | None, generation: _Generation) -> None:
        """Keep `answer`, read by a query that began at `generation`."""
        touches, stamp = generation
        if stamp is None:
            return
        read_at = time.monotonic()
        with self._lock:
            if touches != self._touches:  # this process changed a domain meanwhile
                return
            if len(self._answers) >= MAX_ENTRIES:
                self._answers = {}
            self._answers[name] = (read_at, stamp, answer)

    def touched(self) -> None:
        """A directory write has committed: forget, and tell the other processes."""
        with self._lock:
            self._answers = {}
            self._touches += 1
            try:
                fd = self._open(self.path, os.O_APPEND)
                try:
                    size = os.fstat(fd).st_size
                    if size < MAX_SIZE:
                        os.write(fd, b".")
                finally:
                    os.close(fd)
                if size >= MAX_SIZE:
                    # Named for this process: two that replace at once each
                    # leave a new inode, and neither loses the other's file.
                    fresh = self.path.with_name(f"{self.path.name}.{os.getpid()}")
                    os.close(self._open(fresh, os.O_TRUNC))
                    os.replace(fresh, self.path)
            except OSError as exc:
                self._warn(exc)

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("SQLite store: cannot write %s (%s); domain changes made here reach "
                        "a running provider within %.0fs, not at once", self.path,
                        exc.strerror or exc, TTL)
