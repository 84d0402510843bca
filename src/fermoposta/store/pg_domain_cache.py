"""A per-process cache of PostgreSQL domain lookups, emptied by NOTIFY.

The MX asks for the domain of every RCPT; on PostgreSQL each answer is a
round trip in a worker thread.  Domains change rarely, and a change must
take effect at once on every node ("domains live in the store and take
effect at once"), so answers are kept only while a LISTEN proves that no
change has committed since.

Contract:
- `DomainCache(connect, scrub)` caches nothing until `start()`
  (idempotent) has started its thread: it opens its own connection with
  `connect()`, LISTENs on the channel of its current schema
  (`pg_schema.directory_channel`: the triggers of schema version 4 notify
  it, on commit, of every statement that changes `domains` or
  `valid_recipients`, cascades from `accounts` included), and from then on
  every notice empties the cache.
- `lookup(name)` returns (True, answer) for a cached answer (a `Domain`, or
  None for "not hosted"), else (False, None).  Nothing is answered while
  the listener is not connected: a lost connection (notices may have been
  missed) empties and disables the cache until a new LISTEN is in place,
  tried again every `RETRY` seconds, with one warning per outage.
- `generation()` before a query and `keep(name, answer, generation)` after
  it: the answer is kept only if the cache is live and nothing emptied it
  in between, so an answer read before a change committed is never kept
  after that change's notice (or a reconnection) emptied the cache.
- An answer is given for at most `TTL` seconds after it was read, a
  backstop for notices that never come although the LISTEN is in place (a
  change made with triggers disabled, a pooler that drops notices).
- At most `MAX_ENTRIES` answers, negative ones included (RCPT to random
  domains): a full cache is emptied.
- `close()` stops the thread (within `POLL` seconds, or as soon as a
  connection attempt under way ends) and closes its connection; the cache
  is never live after it.  Idempotent; safe before, during or after
  `start()`.
- Any failure of the listener (not only psycopg's) disables the cache and
  is retried; the cache then only costs the round trips it would have saved.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from fermoposta.store.base import Domain
from fermoposta.store.pg_schema import directory_channel

__all__ = ["DomainCache"]

log = logging.getLogger("fermoposta.store")

MAX_ENTRIES = 50_000
TTL = 10.0  # seconds an answer is given without a notice to empty it
RETRY = 2.0  # seconds between attempts to LISTEN again
POLL = 0.5  # seconds: how often the listener looks at its stop flag


class DomainCache:
    def __init__(self, connect: Callable[[], psycopg.Connection[Any]],
                 scrub: Callable[[str], str] = str) -> None:
        self._connect = connect
        self._scrub = scrub
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[float, Domain | None]] = {}  # name: (read at, answer)
        self._generation = 0
        self._live = False  # a LISTEN is in place: answers may be kept and given
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._listen, name="domain-cache",
                                            daemon=True)
            self._thread.start()  # under the lock: close() never sees it unstarted

    def lookup(self, name: str) -> tuple[bool, Domain | None]:
        with self._lock:
            if self._live:
                entry = self._answers.get(name)
                if entry is not None and time.monotonic() - entry[0] < TTL:
                    return True, entry[1]
        return False, None

    def generation(self) -> int:
        with self._lock:
            return self._generation

    def keep(self, name: str, answer: Domain | None, generation: int) -> None:
        """Keep `answer`, read by a query that began at `generation`."""
        read_at = time.monotonic()
        with self._lock:
            if not self._live or generation != self._generation:
                return
            if len(self._answers) >= MAX_ENTRIES:
                self._answers.clear()
            self._answers[name] = (read_at, answer)

    def _empty(self, *, live: bool) -> None:
        with self._lock:
            self._answers.clear()
            self._generation += 1
            self._live = live and not self._stop.is_set()

    def _listen(self) -> None:
        failing = False
        while not self._stop.is_set():
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = self._connect()
                conn.autocommit = True
                row = conn.execute("SELECT current_schema()").fetchone()
                if row is None or row[0] is None:
                    raise psycopg.ProgrammingError("the search_path names no existing schema")
                channel = directory_channel(str(row[0]))
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            except Exception as exc:  # any failure: retried, the cache off meanwhile
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                if self._stop.is_set():
                    return
                if not failing:
                    log.warning("%s", self._scrub(
                        f"PostgreSQL store: cannot LISTEN for domain changes ({exc}); "
                        f"domains are read from the database until it works"))
                    failing = True
                self._stop.wait(RETRY)
                continue
            if failing:
                log.info("PostgreSQL store: listening for domain changes again")
                failing = False
            self._empty(live=True)  # answers from before the LISTEN may be stale
            try:
                while not self._stop.is_set():
                    for _ in conn.notifies(timeout=POLL, stop_after=1):
                        self._empty(live=True)
            except Exception as exc:  # any failure: retried, the cache off meanwhile
                if not self._stop.is_set():
                    log.warning("%s", self._scrub(
                        f"PostgreSQL store: lost the LISTEN for domain changes ({exc})"))
                    failing = True
            finally:
                self._empty(live=False)
                with contextlib.suppress(Exception):
                    conn.close()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=POLL * 4)
        self._empty(live=False)
