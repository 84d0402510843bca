"""SQLite engine of the store (see `fermoposta.store.base` for the contract).

The engine is this module (the file, transactions, messages, held mail, rate
events) and mixins that use only its transactions: `sqlite_tools` (the queue
tools), `sqlite_directory` (accounts and domains), `sqlite_etrn` (ETRN) and
`sqlite_outbound` (outcomes, outbound claims, leases); `sqlite_rows` has the
columns and row conversions they share, `sqlite_schema` the schema and its
migrations.

Contract and choices:
- One file, opened in WAL mode with `synchronous=FULL`: a commit is on disk
  when the method returns (the SMTP layer answers 250 after `enqueue`).
  `secure_delete=FAST`: deleted bodies are not overwritten page by page
  (Python's SQLite may be built with it ON, which writes every delivered
  body to the WAL again; docs/security.md says what that means).
  `foreign_keys=ON`; `busy_timeout` of 10 s, so several processes (the daemon
  and the CLI) can share the file.  Every write runs in one `BEGIN IMMEDIATE`
  transaction; a failure rolls everything back.
- Three connections per `SQLiteStore`, each guarded by its own lock, so
  methods are thread-safe and blocking (asyncio callers use
  `asyncio.to_thread`): the writer (`_write`), a read-only reader
  (`_read`: a snapshot of what was committed when it began; in WAL it never
  waits for the writer or its fsync, so the drain's next message is read
  while deliveries commit) and `_read_now`'s (never waits at all: for
  lookups on the event loop).
- `sqlite3.Error` and `OSError` are raised as `StoreError`; misuse (duplicate
  account or domain, unknown account) raises `ValueError`.  Any other exception
  raised while a write is under way (e.g. by a body's `read`) rolls the
  transaction back and propagates unchanged.
- WAL checkpoints run in a thread of their own after commits
  (`sqlite_checkpoint`), not inside the commit that crosses SQLite's
  auto-checkpoint threshold (which kept every waiting 250 behind a copy of
  the WAL into the file and its fsync).
- A body over 1 MiB may be staged while it arrives (`sqlite_stage`): a
  placeholder row (size -1) that no view of the queue shows.
- Bodies live in `body_chunks` rows of at most `CHUNK_SIZE` bytes; they are
  written and read one chunk at a time, so memory stays bounded.
- Queue ids are 12 uppercase hex characters (like Postfix): the time,
  then random bits from `secrets` (`base.new_queue_id`).
  Recipient ids are AUTOINCREMENT, never reused, so a stale id held by a
  session can never hit another message's recipient.
- The schema version is kept in `PRAGMA user_version`; a file written by a
  newer version is refused.  A new file gets the whole schema; an older one
  is migrated, in one transaction (`sqlite_schema`).
- Leases and outbound claims name the process that holds them
  (`holders.Holders`, a lock file under `<data_dir>/holders/`): see
  `sqlite_outbound`.
- The state a recipient had before an operator hold (`hold_messages`) is
  kept in the `recipient_holds` table (recipient id -> state, deleted with
  the recipient), so `release_messages` restores it exactly.
- Time comes from the injected `clock` (default `time.time`), for tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import fermoposta.store.sqlite_schema as sqlite_schema
import fermoposta.store.sqlite_wal as sqlite_wal
from fermoposta.store.base import (
    CHUNK_SIZE,
    NewMessage,
    QueuedMessage,
    QueuedRecipient,
    QueueEntry,
    RecipientState,
    StoreError,
    WouldBlock,
    bodies_within,
    new_queue_id,
    read_ahead_result,
)
from fermoposta.store.holders import Holders
from fermoposta.store.rows import message_from_row as _message
from fermoposta.store.rows import recipient_from_row as _recipient
from fermoposta.store.sqlite_checkpoint import BACKSTOP_PAGES, WAL_SIZE_LIMIT, Checkpointer
from fermoposta.store.sqlite_directory import SQLiteDirectory
from fermoposta.store.sqlite_domain_cache import DomainCache
from fermoposta.store.sqlite_etrn import SQLiteEtrn
from fermoposta.store.sqlite_outbound import SQLiteOutbound
from fermoposta.store.sqlite_rows import (
    _MESSAGE_COLUMNS,
    _RECIPIENT_COLUMNS,
    _batches,
    _marks,
)
from fermoposta.store.sqlite_stage import STAGING, SQLiteStaging
from fermoposta.store.sqlite_tools import SQLiteQueueTools

SCHEMA_VERSION = sqlite_schema.SCHEMA_VERSION
BUSY_TIMEOUT = 10.0  # seconds
# The most body bytes `enqueue_now` (or `enqueue_batch_now`, for all its
# messages) copies on the caller's thread (the event loop): one chunk.
INLINE_BODY = CHUNK_SIZE

_INSERT_MESSAGE = (
    "INSERT INTO messages (id, sender, received_at, size, origin, smtputf8, body_8bit, envid,"
    " ret, client, node, wire_ready) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_CHUNK = "INSERT INTO body_chunks (message_id, seq, data) VALUES (?, ?, ?)"
_INSERT_RECIPIENT = (
    "INSERT INTO recipients (message_id, address, domain, state, attempts, notify, orcpt,"
    " updated_at, message_received_at, message_size) VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?, ?)")


class SQLiteStore(SQLiteDirectory, SQLiteQueueTools, SQLiteEtrn, SQLiteOutbound, SQLiteStaging):
    """The `Store` on one SQLite file."""

    def __init__(
        self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time,
        *, node: str | None = None, presize_wal: bool = False,
    ) -> None:
        """`presize_wal`: make the WAL at its full size first, if no process
        has the store open (`sqlite_wal`; a long-lived writer: `provider run`)."""
        self._path = Path(path)
        self._node = node or socket.gethostname()
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._holders = Holders(self._path.parent / "holders")
        self._checkpointer = Checkpointer(self._path, restart=self._start_wal_again)
        self._sync_normal = False  # the writer is at synchronous=NORMAL (see _write)
        self._waits_for_lock = True  # its busy timeout is BUSY_TIMEOUT, not 0 (_write)
        self._init_staging()
        try:
            # The store holds CRAM-MD5 secrets (password equivalents) and mail:
            # private to the daemon's user.  SQLite gives the -wal and -shm
            # files the database file's permissions.
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
            if presize_wal:
                if self._path.stat().st_size == 0:
                    self._put_new_file_in_wal_mode()
                sqlite_wal.presize_wal(self._path, WAL_SIZE_LIMIT)
            self._conn = sqlite3.connect(
                self._path,
                timeout=BUSY_TIMEOUT,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
            )
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open store {self._path}: {exc}") from exc
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            mode = _journal_mode_wal(self._conn)
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreError(f"cannot put {self._path} in WAL mode")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA secure_delete = FAST")
            # Checkpoints run in a thread of their own (sqlite_checkpoint).
            self._conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
            self._conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            self._version_at_open = sqlite_schema.migrate(self._conn, self._path)
            # For `_read_now`: never waits for a lock (busy timeout 0).
            self._quick = self._read_only_connection(timeout=0)
            # For `_read`: a WAL reader does not wait for the writer, so a
            # read (the drain's next message) never queues behind a commit
            # and its fsync on `_conn`.
            self._reader = self._read_only_connection(timeout=BUSY_TIMEOUT)
        except (sqlite3.Error, OSError) as exc:
            self._close_connections()
            raise StoreError(f"cannot open store {self._path}: {exc}") from exc
        except BaseException:
            self._close_connections()
            raise
        self._quick_lock = threading.Lock()
        self._reader_lock = threading.Lock()
        self._domain_cache = DomainCache(self._path)
        self._domain_cache.open()

    def _read_only_connection(self, timeout: float) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            conn.execute("PRAGMA query_only = ON")
            conn.execute("PRAGMA foreign_keys = ON")  # as every connection
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _extra_reader(self) -> sqlite3.Connection:
        """A read-only connection of the caller's own, to close when done
        (`queue_shape` reads on several at once)."""
        return self._read_only_connection(timeout=BUSY_TIMEOUT)

    def _close_connections(self) -> None:
        """Close whichever connections the constructor opened (it failed)."""
        for name in ("_reader", "_quick", "_conn"):
            conn = getattr(self, name, None)
            if conn is not None:
                conn.close()

    def _put_new_file_in_wal_mode(self) -> None:
        """A brand-new (empty) file put in WAL mode by a connection of its
        own, then closed: SQLite writes the first page, whose header says
        WAL, and deletes the WAL on that close.  So `presize_wal` can make
        a full WAL for the first `provider run` of a new store too, before
        any of the store's own connections opens it."""
        conn = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT, isolation_level=None,
                               check_same_thread=False)
        try:
            _journal_mode_wal(conn)
        finally:
            conn.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def node(self) -> str:
        return self._node

    def holder_is_current(self) -> bool:
        return True  # our lock file is ours for as long as we live

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> tuple[int, int]:
        """The constructor migrated; report the version it found and the one now."""
        return self._version_at_open, self.schema_version()

    # --- transactions --------------------------------------------------------------------

    @contextmanager
    def _write(self, *, durable: bool = True, wait: bool = True, poke: bool = True
               ) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction; rolled back on any exception.  Not
        `durable`: its commit does not fsync (`synchronous=NORMAL`), for
        writes no one was promised (a staged body: the enqueue's own
        commit, durable, syncs the whole WAL and so them too).  A durable
        write puts `synchronous=FULL` back first if it is not (a reset that
        failed after a non-durable one): it fails rather than commit
        without an fsync.  Not `wait`: `WouldBlock` instead of waiting when
        another thread is writing or another connection holds the file's
        write lock (for `enqueue_now`, on the event loop).  Not `poke`: the
        checkpointer is not told of the commit (`_start_wal_again`)."""
        if not self._lock.acquire(blocking=wait):
            raise WouldBlock()
        try:
            self._check_open()
            try:
                if durable and self._sync_normal:
                    self._conn.execute("PRAGMA synchronous = FULL")
                    self._sync_normal = False
                elif not durable:
                    self._sync_normal = True
                    self._conn.execute("PRAGMA synchronous = NORMAL")
                if wait != self._waits_for_lock:
                    # Set only on a change: a lone sender's commits all go
                    # inline (no wait), a busy provider's all in threads.
                    self._conn.execute("PRAGMA busy_timeout = "
                                       f"{int(BUSY_TIMEOUT * 1000) if wait else 0}")
                    self._waits_for_lock = wait
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if not wait and ("locked" in str(exc) or "busy" in str(exc)):
                    raise WouldBlock() from exc
                raise StoreError(f"store busy or unavailable: {exc}") from exc
            except sqlite3.Error as exc:
                raise StoreError(f"store busy or unavailable: {exc}") from exc
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as exc:
                try:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.Error | OSError):
                    raise StoreError(f"store write failed: {exc}") from exc
                raise
            finally:
                if not durable:
                    with contextlib.suppress(sqlite3.Error):  # else the next durable one
                        self._conn.execute("PRAGMA synchronous = FULL")
                        self._sync_normal = False
            if poke:
                self._checkpointer.poke()
        finally:
            self._lock.release()

    def _start_wal_again(self) -> None:
        """The checkpointer's `restart` (in its thread, the store quiet and
        the WAL all copied): one write of the schema version as it is, which
        starts the WAL again, so that the next commit appends to it with one
        fsync instead of two (`sqlite_checkpoint`).  Skipped when a writer,
        or `close()`, holds the store: never waits for either."""
        try:
            with self._write(wait=False, poke=False) as conn:
                # Read in this write transaction: no other writer in between.
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                conn.execute(f"PRAGMA user_version = {version}")
        except WouldBlock:
            pass

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: a consistent snapshot across several queries,
        of everything committed before it began.  On its own connection: it
        waits for other reads, never for a write (WAL)."""
        with self._reader_lock:
            self._check_open()
            try:
                self._reader.execute("BEGIN")
                try:
                    yield self._reader
                finally:
                    if self._reader.in_transaction:
                        self._reader.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"store read failed: {exc}") from exc

    @contextmanager
    def _read_now(self, *, snapshot: bool = True) -> Iterator[sqlite3.Connection]:
        """A read on the second connection that never waits: `WouldBlock`
        if another thread is using it or the file is busy (WAL readers
        normally never are: they do not wait for the writer).  Without
        `snapshot`, no transaction: for ONE statement (a snapshot by itself),
        two round trips through SQLite fewer."""
        if not self._quick_lock.acquire(blocking=False):
            raise WouldBlock()
        try:
            self._check_open()
            try:
                if snapshot:
                    self._quick.execute("BEGIN")
                try:
                    yield self._quick
                finally:
                    if self._quick.in_transaction:
                        self._quick.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise WouldBlock() from exc
                raise StoreError(f"store read failed: {exc}") from exc
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"store read failed: {exc}") from exc
        finally:
            self._quick_lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    # --- messages ------------------------------------------------------------------------

    def enqueue(self, message: NewMessage, body: IO[bytes], queue_id: str | None = None) -> str:
        with self._write() as conn:
            message_id = self._enqueue(conn, message, body, queue_id)
        self._forget_stages([message_id])
        return message_id

    def enqueue_now(self, message: NewMessage, body: IO[bytes],
                    queue_id: str | None = None) -> str:
        return self.enqueue_batch_now([(message, body, queue_id)])[0]

    async def enqueue_async(self, message: NewMessage, body: IO[bytes],
                            queue_id: str | None = None) -> str:
        """Always `WouldBlock`: SQLite has no I/O to wait for without
        blocking (`enqueue_now` is its way on the loop)."""
        raise WouldBlock()

    async def enqueue_batch_async(self, items: Sequence[tuple[NewMessage, IO[bytes], str | None]]
                                  ) -> list[str]:
        """Always `WouldBlock`, as `enqueue_async`."""
        raise WouldBlock()

    def enqueue_batch_now(self, items: Sequence[tuple[NewMessage, IO[bytes], str | None]]
                          ) -> list[str]:
        # On the event loop: only a commit that copies little (INLINE_BODY for
        # all the bodies) and waits for no lock (the fsync it does wait for).
        if sum(self._bytes_to_copy(body, queue_id) for _, body, queue_id in items) > INLINE_BODY:
            raise WouldBlock()
        with self._write(wait=False) as conn:
            ids = self._enqueue_small(conn, items)
        self._forget_stages(ids)
        return ids

    def _enqueue_small(self, conn: sqlite3.Connection,
                       items: Sequence[tuple[NewMessage, IO[bytes], str | None]]) -> list[str]:
        """`_enqueue` for a batch whose bodies are small together and none
        staged (`enqueue_batch_now` checked both): every body read first,
        then the messages, chunks and recipients each in one `executemany`
        with the sizes known, instead of four statements a message (a
        batch of ten 4 KiB messages: 53-58 µs of CPU a message instead of
        68-78, some 3% of the provider's at `-s 10`; bench/README.md,
        eighteenth session).  A queue id taken (in the store, or earlier
        in the batch) is drawn again, as in `_enqueue`: `executemany` stops
        at that row, the rows before it are in (`total_changes` counts them:
        no trigger writes on an insert into `messages`), and it goes on from
        there."""
        now = self._clock()
        ids = [queue_id or new_queue_id() for _, _, queue_id in items]
        chunks: list[tuple[int, int, bytes]] = []  # (item, seq, data)
        sizes: list[int] = []
        for index, (_, body, _) in enumerate(items):
            size = seq = 0
            while data := body.read(CHUNK_SIZE):
                chunks.append((index, seq, bytes(data)))
                size += len(data)
                seq += 1
            sizes.append(size)
        rows = [_message_row(ids[i], message, now, sizes[i], self._node)
                for i, (message, _, _) in enumerate(items)]
        stored = 0
        while stored < len(rows):
            before = conn.total_changes
            try:
                conn.executemany(_INSERT_MESSAGE, rows[stored:])
            except sqlite3.IntegrityError as exc:
                if not _queue_id_taken(exc):
                    raise
                stored += conn.total_changes - before  # the rows before the taken id
                ids[stored] = new_queue_id()
                rows[stored] = (ids[stored], *rows[stored][1:])
                continue
            break
        conn.executemany(_INSERT_CHUNK, [(ids[i], seq, data) for i, seq, data in chunks])
        conn.executemany(_INSERT_RECIPIENT, [
            row for i, (message, _, _) in enumerate(items)
            for row in _recipient_rows(ids[i], message, now, sizes[i])])
        return ids

    def enqueue_batch(self, items: Sequence[tuple[NewMessage, IO[bytes], str | None]]
                      ) -> list[str]:
        with self._write() as conn:
            ids = [self._enqueue(conn, message, body, queue_id)
                   for message, body, queue_id in items]
        self._forget_stages(ids)
        return ids

    def _enqueue(self, conn: sqlite3.Connection, message: NewMessage, body: IO[bytes],
                 queue_id: str | None = None) -> str:
        now = self._clock()
        staged = self._finish_stage(conn, message, body, queue_id, now)
        if staged is not None:
            staged_id, staged_size = staged
            self._insert_recipients(conn, staged_id, message, now, staged_size)
            return staged_id
        while True:
            message_id = queue_id or new_queue_id()
            queue_id = None  # on a collision, draw a fresh one
            try:
                # Size 0 until the body, read a chunk at a time, is all in.
                conn.execute(_INSERT_MESSAGE, _message_row(message_id, message, now, 0,
                                                           self._node))
            except sqlite3.IntegrityError as exc:
                if not _queue_id_taken(exc):
                    raise
                continue  # queue id collision: draw again
            break
        size = 0
        seq = 0
        while True:
            data = body.read(CHUNK_SIZE)
            if not data:
                break
            conn.execute(_INSERT_CHUNK, (message_id, seq, bytes(data)))
            size += len(data)
            seq += 1
            del data
        conn.execute("UPDATE messages SET size = ? WHERE id = ?", (size, message_id))
        self._insert_recipients(conn, message_id, message, now, size)
        return message_id

    @staticmethod
    def _insert_recipients(conn: sqlite3.Connection, message_id: str, message: NewMessage,
                           now: float, size: int) -> None:
        """The recipients of a message received at `now` with `size` bytes."""
        conn.executemany(_INSERT_RECIPIENT, _recipient_rows(message_id, message, now, size))

    def is_empty(self) -> bool:
        with self._read() as conn:
            return all(conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None
                       for table in ("accounts", "domains")) and conn.execute(
                "SELECT 1 FROM messages WHERE size <> ? LIMIT 1", (STAGING,)).fetchone() is None

    def import_message(self, entry: QueueEntry, body: IO[bytes]) -> None:
        m = entry.message
        now = self._clock()
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
                    " body_8bit, envid, ret, client, node, wire_ready)"
                    " VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (m.id, m.sender, m.received_at, str(m.origin), int(m.smtputf8),
                     int(m.body_8bit), m.envid, m.ret, m.client, m.node, int(m.wire_ready)))
            except sqlite3.IntegrityError:
                raise ValueError(f"message {m.id} is already in the store") from None
            size = 0
            for seq, data in enumerate(iter(lambda: body.read(CHUNK_SIZE), b"")):
                conn.execute("INSERT INTO body_chunks (message_id, seq, data) VALUES (?, ?, ?)",
                             (m.id, seq, bytes(data)))
                size += len(data)
            conn.execute("UPDATE messages SET size = ? WHERE id = ?", (size, m.id))
            for r in m.recipients:
                cur = conn.execute(
                    "INSERT INTO recipients (message_id, address, domain, state, attempts,"
                    " last_reply, notify, orcpt, updated_at, next_attempt_at, first_failure_at,"
                    " delay_notified, message_received_at, message_size)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (m.id, r.address, r.domain, str(r.state), r.attempts, r.last_reply,
                     r.notify, r.orcpt, now, r.next_attempt_at, r.first_failure_at,
                     int(r.delay_notified), m.received_at, size))
                previous = entry.hold_from.get(r.id)
                if r.state == RecipientState.HOLD and previous is not None:
                    conn.execute("INSERT INTO recipient_holds (recipient_id, previous_state)"
                                 " VALUES (?, ?)", (cur.lastrowid, str(previous)))

    def get_message(self, message_id: str) -> QueuedMessage | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ? AND size <> ?",
                (message_id, STAGING),
            ).fetchone()
            if row is None:
                return None
            rcpts = conn.execute(
                f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE message_id = ? ORDER BY id",
                (message_id,),
            ).fetchall()
        return _message(row, [_recipient(r) for r in rcpts])

    @staticmethod
    def _messages_of(conn: sqlite3.Connection, recipient_ids: Sequence[int]
                     ) -> list[QueuedMessage]:
        """The messages of `recipient_ids`, each with only those recipients, in
        the order of their first recipient in `recipient_ids`."""
        recipients: dict[int, QueuedRecipient] = {}
        for batch in _batches(recipient_ids):
            for r in conn.execute(
                f"SELECT {_RECIPIENT_COLUMNS} FROM recipients"
                f" WHERE id IN ({_marks(len(batch))})",
                batch,
            ):
                recipients[int(r[0])] = _recipient(r)
        grouped: dict[str, list[QueuedRecipient]] = {}
        for rid in recipient_ids:
            found = recipients.get(rid)
            if found is not None:
                grouped.setdefault(found.message_id, []).append(found)
        rows: dict[str, Any] = {}
        for batch_ids in _batches(list(grouped)):
            for row in conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id IN ({_marks(len(batch_ids))})",
                batch_ids,
            ):
                rows[row[0]] = row
        return [_message(rows[mid], rcpts) for mid, rcpts in grouped.items() if mid in rows]

    def read_body(self, message_id: str) -> Iterator[bytes]:
        """Check the message exists now (StoreError if not), then stream its chunks.

        Each chunk is fetched by its own query; if the message disappears while
        it is read, the iterator raises `StoreError` instead of ending short.
        """
        with self._read() as conn:
            row = conn.execute("SELECT size FROM messages WHERE id = ? AND size <> ?",
                               (message_id, STAGING)).fetchone()
        if row is None:
            raise StoreError(f"message {message_id} is not in the queue")
        return self._chunks(message_id, int(row[0]))

    def read_ahead(self, message_ids: Sequence[str], body_limit: int,
                   body_budget: int | None = None
                   ) -> list[tuple[QueuedMessage | None, bytes | None]]:
        """One read transaction (one snapshot) for the whole batch."""
        ids = list(dict.fromkeys(message_ids))
        messages: dict[str, QueuedMessage] = {}
        bodies: dict[str, bytes] = {}
        with self._read() as conn:
            for batch in _batches(ids):
                marks = _marks(len(batch))
                rows = conn.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id IN ({marks})"
                    " AND size <> ?", (*batch, STAGING)).fetchall()
                rcpts: dict[str, list[QueuedRecipient]] = {}
                for r in conn.execute(
                        f"SELECT {_RECIPIENT_COLUMNS} FROM recipients"
                        f" WHERE message_id IN ({marks}) ORDER BY id", batch):
                    recipient = _recipient(r)
                    rcpts.setdefault(recipient.message_id, []).append(recipient)
                for row in rows:
                    messages[row[0]] = _message(row, rcpts.get(row[0], []))
            small = bodies_within(messages, ids, body_limit, body_budget)
            for batch in _batches(small):
                for mid, data in conn.execute(
                        "SELECT message_id, data FROM body_chunks"
                        f" WHERE message_id IN ({_marks(len(batch))}) AND seq = 0", batch):
                    bodies[mid] = bytes(data)
        return read_ahead_result(message_ids, messages, bodies)

    def _chunks(self, message_id: str, size: int) -> Iterator[bytes]:
        seq = 0
        done = 0
        while done < size:
            with self._read() as conn:
                row = conn.execute(
                    "SELECT data FROM body_chunks WHERE message_id = ? AND seq = ?",
                    (message_id, seq),
                ).fetchone()
            if row is None:
                raise StoreError(f"message {message_id} left the queue while being read")
            data = bytes(row[0])
            del row
            done += len(data)
            seq += 1
            yield data

    def message_ids(self, state: RecipientState | None = None) -> list[str]:
        sql = "SELECT id FROM messages m"
        params: tuple[str, ...] = ()
        if state is None:
            sql += " WHERE EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id)"
        else:
            sql += (" WHERE EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
                    " AND r.state = ?)")
            params = (str(state),)
        with self._read() as conn:
            return [str(r[0]) for r in conn.execute(sql + " ORDER BY received_at, id", params)]

    def recipient_count(self) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM recipients").fetchone()[0])

    def add_event(self, key: str, at: float, window: float) -> int:
        with self._write() as conn:
            conn.execute("DELETE FROM rate_events WHERE key = ? AND at <= ?", (key, at - window))
            conn.execute("INSERT INTO rate_events (key, at) VALUES (?, ?)", (key, at))
            row = conn.execute("SELECT COUNT(*) FROM rate_events WHERE key = ? AND at > ?"
                               " AND at <= ?", (key, at - window, at)).fetchone()
        return int(row[0])

    def count_events(self, key: str, since: float) -> int:
        with self._read() as conn:
            row = conn.execute("SELECT COUNT(*) FROM rate_events WHERE key = ? AND at > ?",
                               (key, since)).fetchone()
        return int(row[0])

    def held_message_ids(self, domains: Collection[str]) -> list[str]:
        found: dict[str, float] = {}
        with self._read() as conn:
            for batch in _batches(sorted(set(domains))):
                for message_id, received_at in conn.execute(
                    "SELECT id, received_at FROM messages WHERE id IN ("
                    " SELECT message_id FROM recipients"
                    f" WHERE state = ? AND domain IN ({_marks(len(batch))}))",
                    (str(RecipientState.HELD), *batch),
                ):
                    found[message_id] = received_at
        return sorted(found, key=lambda i: (found[i], i))

    def domains_with_held_mail(self, domains: Collection[str]) -> set[str]:
        result: set[str] = set()
        with self._read() as conn:
            for batch in _batches(sorted(set(domains))):
                for (domain,) in conn.execute(
                    "SELECT DISTINCT domain FROM recipients"
                    f" WHERE domain IN ({_marks(len(batch))}) AND state = ?",
                    (*batch, str(RecipientState.HELD)),
                ):
                    result.add(domain)
        return result

    def held_mail_notices(self) -> None:
        """None: SQLite has no notices; callers poll `domains_with_held_mail`."""
        return None

    def domain_usage(self, domain: str) -> tuple[int, int]:
        with self._read() as conn:
            # Index-only: the domain's range of recipients_domain, each message once.
            row = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(message_size), 0) FROM (SELECT DISTINCT"
                " message_received_at, message_id, message_size FROM recipients"
                " WHERE domain = ? AND state = ?)",
                (domain, str(RecipientState.HELD)),
            ).fetchone()
        return int(row[0]), int(row[1])

    # --- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._checkpointer.close()
            self._holders.close()
            try:
                with self._quick_lock:
                    self._quick.close()
                with self._reader_lock:
                    self._reader.close()
                self._conn.close()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot close store: {exc}") from exc

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _journal_mode_wal(conn: sqlite3.Connection) -> Any:
    """`PRAGMA journal_mode = WAL` on `conn`, waiting like `busy_timeout`
    would: the switch of a new file needs its write lock and gets
    SQLITE_BUSY at once (no busy handler), e.g. when several processes open
    a new file."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.02)


def _message_row(message_id: str, message: NewMessage, now: float, size: int,
                 node: str) -> tuple[object, ...]:
    """`_INSERT_MESSAGE`'s parameters."""
    return (message_id, message.sender, now, size, str(message.origin), int(message.smtputf8),
            int(message.body_8bit), message.envid, message.ret, message.client, node,
            int(message.wire_ready))


def _recipient_rows(message_id: str, message: NewMessage, now: float,
                    size: int) -> list[tuple[object, ...]]:
    """`_INSERT_RECIPIENT`'s parameters, one row a recipient of a message
    received at `now` with `size` bytes."""
    return [(message_id, r.address, r.domain, str(r.state), r.notify, r.orcpt, now, now, size)
            for r in message.recipients]


def _queue_id_taken(exc: sqlite3.IntegrityError) -> bool:
    """Whether the INSERT into `messages` failed on its primary key (a queue
    id already there), not on another constraint: only that is drawn again."""
    return getattr(exc, "sqlite_errorname", "") == "SQLITE_CONSTRAINT_PRIMARYKEY"
