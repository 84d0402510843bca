"""WAL checkpoints of the SQLite store, off the writer's path.

SQLite's own auto-checkpoint runs inside the COMMIT that pushes the WAL past
`wal_autocheckpoint` pages: that commit also copies the WAL into the database
file and fsyncs it.  The writer holds the store's write lock meanwhile, so
every session's 250 waits for it (a 200 MiB message: about 0.7 s more before
its 250; 4 KiB messages: a 4 MiB copy and an fsync every ~70 messages).

Contract:
- `Checkpointer(path)`; the writer sets `wal_autocheckpoint` to
  `BACKSTOP_PAGES` (only a backstop, should this thread fall far behind) and
  `journal_size_limit` to `WAL_SIZE_LIMIT` (a WAL a big message grew is cut
  back when it starts again), and calls `poke()` after each commit.
- A poke wakes one thread of its own (started at the first poke, so a
  short-lived CLI store that never writes starts none) which, `DELAY`
  seconds later (pokes in between are gathered), runs `PRAGMA
  wal_checkpoint(PASSIVE)` on a connection of its own.  PASSIVE never waits
  for the writer or readers and copies only committed frames; the
  checkpoint fsyncs the WAL before copying and the database after, so
  durability is SQLite's as before (the writer's commits stay
  `synchronous=FULL`).  Once a checkpoint has caught up, the next write
  transaction starts the WAL again from its beginning.
- Starting the WAL again costs that transaction a second fsync (SQLite
  syncs a new WAL's header before the first frames), and it is the commit
  of whoever comes first after a quiet spell: an ATRN's leases, the next
  message's 250.  So when a checkpoint has copied every frame and no poke
  comes within `IDLE_RESTART` seconds, the thread calls `restart()` (if
  given: the store writes one page of its own, which starts the WAL again
  and pays that fsync here, off everyone's path).  It counts as no commit:
  it pokes nothing, so the next checkpoint waits for the next real commit.
  `restarts` counts the calls that returned (tests).
- A failed checkpoint is logged (once per kind of error) and tried again at
  the next poke; one that found another connection checkpointing (busy) is
  tried again after `INTERVAL`: the WAL only grows meanwhile, nothing is
  lost.  The file is opened `mode=rw`: a store moved away is an error, not
  a new empty file.
- `close()` stops the thread and waits for it (a checkpoint under way ends
  first, a wait between two does not); idempotent.  `checkpoints` counts
  the checkpoints that ran (tests).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fermoposta.store.base import StoreError

log = logging.getLogger("fermoposta.store")

BACKSTOP_PAGES = 16384  # 64 MiB of 4 KiB pages: the writer checkpoints past this
WAL_SIZE_LIMIT = 64 << 20  # bytes: a WAL started again is cut back to this
DELAY = 0.005  # seconds: gathers the commits of one burst into one checkpoint
INTERVAL = 0.1  # seconds: the least time from one checkpoint's start to the next
IDLE_RESTART = 0.05  # seconds without a poke after a complete checkpoint: restart()


class Checkpointer:
    def __init__(self, path: Path, delay: float = DELAY, interval: float = INTERVAL, *,
                 restart: Callable[[], None] | None = None,
                 idle_restart: float = IDLE_RESTART) -> None:
        self._path = path
        self._delay = delay
        self._interval = interval
        self._restart = restart
        self._idle_restart = idle_restart
        self._wake = threading.Event()
        self._stopping = threading.Event()  # close(): ends a wait at once
        self._stop = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._last_error = ""
        self._last_restart_error = ""
        self.checkpoints = 0
        self.restarts = 0

    def poke(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._stop:
                    thread = threading.Thread(target=self._run, name="sqlite-checkpoint",
                                              daemon=True)
                    thread.start()
                    self._thread = thread
        self._wake.set()

    def close(self) -> None:
        with self._start_lock:
            self._stop = True
            thread = self._thread
        self._stopping.set()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _start_again(self, restart: Callable[[], None]) -> None:
        try:
            restart()
        except StoreError as exc:  # the next commit starts the WAL itself
            if str(exc) != self._last_restart_error:  # once per kind of error
                log.warning("store %s: could not start the WAL again while idle (%s); "
                            "will try again", self._path, exc)
                self._last_restart_error = str(exc)
        else:
            self.restarts += 1
            self._last_restart_error = ""

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        last = -self._interval
        try:
            while True:
                self._wake.wait()
                if self._stop:
                    return
                # Gather the commits of the next few milliseconds, and of a
                # burst (many small checkpoints cost an fsync each).
                self._stopping.wait(max(self._delay, last + self._interval - time.monotonic()))
                self._wake.clear()
                last = time.monotonic()
                if self._stop:
                    return
                try:
                    if conn is None:
                        # mode=rw: never create an empty file where the store was.
                        conn = sqlite3.connect(f"{self._path.resolve().as_uri()}?mode=rw",
                                               uri=True, timeout=0, isolation_level=None,
                                               check_same_thread=False)
                        conn.execute("PRAGMA synchronous = FULL")
                    busy, frames, copied = conn.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if busy:  # another connection is checkpointing: again later
                        self._wake.set()
                    else:
                        self.checkpoints += 1
                        if (self._restart is not None and 0 < frames == copied
                                and not self._wake.wait(self._idle_restart)
                                and not self._stop):
                            self._start_again(self._restart)
                    self._last_error = ""
                except sqlite3.Error as exc:
                    if str(exc) != self._last_error:
                        log.warning("store %s: WAL checkpoint failed (%s); will try again",
                                    self._path, exc)
                        self._last_error = str(exc)
        finally:
            if conn is not None:
                conn.close()
