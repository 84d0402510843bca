"""SQLite engine of the store (see `fermoposta.store.base` for the contract).

The engine is this module (the file, transactions, the schema and its
migrations, messages, held mail, outbound claims, leases, rate events) and
two mixins that use only its transactions: `sqlite_tools` (the queue tools)
and `sqlite_directory` (accounts and domains); `sqlite_rows` has the columns
and row conversions they share.

Contract and choices:
- One file, opened in WAL mode with `synchronous=FULL`: a commit is on disk
  when the method returns (the SMTP layer answers 250 after `enqueue`).
  `foreign_keys=ON`; `busy_timeout` of 10 s, so several processes (the daemon
  and the CLI) can share the file.  Every write runs in one `BEGIN IMMEDIATE`
  transaction; a failure rolls everything back.
- One connection per `SQLiteStore`, guarded by a lock: methods are thread-safe
  and blocking (asyncio callers use `asyncio.to_thread`).
- `sqlite3.Error` and `OSError` are raised as `StoreError`; misuse (duplicate
  account or domain, unknown account) raises `ValueError`.  Any other exception
  raised while a write is under way (e.g. by a body's `read`) rolls the
  transaction back and propagates unchanged.
- Bodies live in `body_chunks` rows of at most `CHUNK_SIZE` bytes; they are
  written and read one chunk at a time, so memory stays bounded.
- Queue ids are 12 uppercase hex characters (like Postfix) from `secrets`.
  Recipient ids are AUTOINCREMENT, never reused, so a stale id held by a
  session can never hit another message's recipient.
- The schema version is kept in `PRAGMA user_version`; a file written by a
  newer version is refused.  A new file gets the whole schema; an older one
  runs the steps of `_MIGRATIONS` up to `SCHEMA_VERSION`, in one transaction
  (version 2 added `account_cert_subjects`; version 3 the outbound retry
  schedule and claims of recipients, and the per-domain hold lifetime;
  version 4 `recipient_holds`; version 5 the `holder` of a lease; version 7
  the ETRN target of a domain).
- A lease names the process that holds it (`holders.Holders`, a lock file
  under `<data_dir>/holders/`): a lease whose holder is dead is taken over
  at once, so a provider killed mid-drain blocks its domains for no time;
  a live holder's lease is busy until it expires.
- "What is due" is one index range: `recipients_due` on
  `(state, COALESCE(next_attempt_at, 0))`.  A claim also moves
  `next_attempt_at` to the claim's expiry, so claimed recipients leave the
  due range and an expired claim (a crashed runner) makes them due again.
  Held-mail expiry scans `messages_received` (received_at) from the oldest.
- The state a recipient had before an operator hold (`hold_messages`) is
  kept in the `recipient_holds` table (recipient id -> state, deleted with
  the recipient), so `release_messages` restores it exactly.
- Time comes from the injected `clock` (default `time.time`), for tests.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fermoposta.store.base import (
    CHUNK_SIZE,
    NewMessage,
    QueuedMessage,
    QueuedRecipient,
    QueueEntry,
    RecipientState,
    SchemaTooNew,
    StoreError,
    WouldBlock,
    new_queue_id,
)
from fermoposta.store.holders import Holders
from fermoposta.store.rows import message_from_row as _message
from fermoposta.store.rows import recipient_from_row as _recipient
from fermoposta.store.sqlite_directory import SQLiteDirectory
from fermoposta.store.sqlite_etrn import SQLiteEtrn
from fermoposta.store.sqlite_rows import (
    _BATCH,
    _MESSAGE_COLUMNS,
    _RECIPIENT_COLUMNS,
    _batches,
    _marks,
)
from fermoposta.store.sqlite_tools import SQLiteQueueTools

SCHEMA_VERSION = 8
BUSY_TIMEOUT = 10.0  # seconds


# Version 2: subject bindings of client certificates.
_ACCOUNT_CERT_SUBJECTS = """
CREATE TABLE IF NOT EXISTS account_cert_subjects (
    subject TEXT PRIMARY KEY,  -- canonical RFC 4514 string (certificate_subject)
    account TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS account_cert_subjects_account ON account_cert_subjects(account);
"""

# Version 3: outbound retry schedule and claims; per-domain hold lifetime.
_OUTBOUND_INDEXES = """
CREATE INDEX IF NOT EXISTS recipients_due
    ON recipients(state, COALESCE(next_attempt_at, 0));
CREATE INDEX IF NOT EXISTS recipients_claimed_by
    ON recipients(claimed_by) WHERE claimed_by IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_received ON messages(received_at);
"""
_V3 = """
ALTER TABLE recipients ADD COLUMN next_attempt_at REAL;
ALTER TABLE recipients ADD COLUMN first_failure_at REAL;
ALTER TABLE recipients ADD COLUMN delay_notified INTEGER NOT NULL DEFAULT 0;
ALTER TABLE recipients ADD COLUMN claimed_by TEXT;
ALTER TABLE recipients ADD COLUMN claimed_until REAL;
ALTER TABLE domains ADD COLUMN hold_lifetime REAL;
""" + _OUTBOUND_INDEXES

# The whole schema, for a new file.
# The state a recipient had before an operator hold (`queue hold`), so that
# `queue release` restores it exactly.  Deleting the recipient deletes it.
_RECIPIENT_HOLDS = """
CREATE TABLE IF NOT EXISTS recipient_holds (
    recipient_id INTEGER PRIMARY KEY REFERENCES recipients(id) ON DELETE CASCADE,
    previous_state TEXT NOT NULL
);
"""

# Version 6: windowed rate events (per-account submission rates), shared
# by every process on the file.
_RATE_EVENTS = """
CREATE TABLE IF NOT EXISTS rate_events (
    key TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rate_events_key_at ON rate_events(key, at);
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    received_at REAL NOT NULL,
    size INTEGER NOT NULL,
    origin TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL,
    body_8bit INTEGER NOT NULL,
    envid TEXT,
    ret TEXT,
    client TEXT NOT NULL,
    node TEXT NOT NULL DEFAULT ''  -- the node that accepted it
);
CREATE TABLE IF NOT EXISTS body_chunks (
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (message_id, seq)
);
CREATE TABLE IF NOT EXISTS recipients (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: callers hold ids across calls
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_reply TEXT,
    notify TEXT,
    orcpt TEXT,
    updated_at REAL NOT NULL,
    next_attempt_at REAL,  -- OUTBOUND: due again at (NULL = now), or a claim's expiry
    first_failure_at REAL,
    delay_notified INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT,  -- the queue runner delivering it now
    claimed_until REAL,
    claim_holder TEXT  -- the process of that runner (holders.py)
);
CREATE INDEX IF NOT EXISTS recipients_domain_state
    ON recipients(domain, state, message_id);
CREATE INDEX IF NOT EXISTS recipients_message ON recipients(message_id);
CREATE INDEX IF NOT EXISTS recipients_state ON recipients(state, message_id);
CREATE TABLE IF NOT EXISTS accounts (
    name TEXT PRIMARY KEY,
    scram_salt BLOB,
    scram_iterations INTEGER,
    scram_stored_key BLOB,
    scram_server_key BLOB,
    cram_secret TEXT,
    created_at REAL NOT NULL,
    last_atrn_at REAL,
    atrn_wait REAL  -- seconds a fruitless ATRN may wait for mail (NULL: none)
);
CREATE TABLE IF NOT EXISTS account_certs (
    fingerprint TEXT PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS account_certs_account ON account_certs(account);
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE,
    max_messages INTEGER,
    max_bytes INTEGER,
    validate INTEGER NOT NULL DEFAULT 0,
    hold_lifetime REAL,
    etrn TEXT  -- NULL: not an ETRN domain, '': its MX hosts, else host[:port]
);
CREATE INDEX IF NOT EXISTS domains_account ON domains(account);
CREATE TABLE IF NOT EXISTS valid_recipients (
    domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    local TEXT NOT NULL,
    PRIMARY KEY (domain, local)
);
CREATE TABLE IF NOT EXISTS leases (
    domain TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL,
    holder TEXT NOT NULL DEFAULT ''  -- the process (holders.py), or '' (expiry only)
);
CREATE INDEX IF NOT EXISTS leases_owner ON leases(owner);
""" + _ACCOUNT_CERT_SUBJECTS + _OUTBOUND_INDEXES + _RECIPIENT_HOLDS + _RATE_EVENTS


# Version 5: the process holding a lease, so a dead one's leases are taken at once.
_V5 = """
ALTER TABLE leases ADD COLUMN holder TEXT NOT NULL DEFAULT '';
"""

# Version 6: the node that accepted a message, the holder of an outbound
# claim (a dead runner's claims are free at once), and windowed rate events.
_V6 = """
ALTER TABLE messages ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE recipients ADD COLUMN claim_holder TEXT;
""" + _RATE_EVENTS

# Version 7: the ETRN target of a domain (RFC 1985).
_V7 = """
ALTER TABLE domains ADD COLUMN etrn TEXT;
"""

# Version 8: how long an account's fruitless ATRN may wait for mail (issue 12).
_V8 = """
ALTER TABLE accounts ADD COLUMN atrn_wait REAL;
"""

# Statements that bring a file from version N-1 to N.
_MIGRATIONS: dict[int, str] = {
    2: _ACCOUNT_CERT_SUBJECTS,
    3: _V3,
    4: _RECIPIENT_HOLDS,
    5: _V5,
    6: _V6,
    7: _V7,
    8: _V8,
}

def _statements(script: str) -> Iterator[str]:
    for statement in script.split(";"):
        if statement.strip():
            yield statement


class SQLiteStore(SQLiteDirectory, SQLiteQueueTools, SQLiteEtrn):
    """The `Store` on one SQLite file."""

    def __init__(
        self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time,
        *, node: str | None = None,
    ) -> None:
        self._path = Path(path)
        self._node = node or socket.gethostname()
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._holders = Holders(self._path.parent / "holders")
        try:
            # The store holds CRAM-MD5 secrets (password equivalents) and mail:
            # private to the daemon's user.  SQLite gives the -wal and -shm
            # files the database file's permissions.
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
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
            mode = self._journal_mode_wal()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreError(f"cannot put {self._path} in WAL mode")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._migrate()
            # For `_read_now`: never waits for a lock (busy timeout 0).
            self._quick = sqlite3.connect(self._path, timeout=0, isolation_level=None,
                                          check_same_thread=False)
            self._quick.execute("PRAGMA query_only = ON")
            self._quick.execute("PRAGMA foreign_keys = ON")  # as every connection
            self._quick.execute("PRAGMA synchronous = FULL")
        except (sqlite3.Error, OSError) as exc:
            self._conn.close()
            raise StoreError(f"cannot open store {self._path}: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise
        self._quick_lock = threading.Lock()

    def _journal_mode_wal(self) -> Any:
        """`PRAGMA journal_mode = WAL`, waiting like `busy_timeout` would: the
        switch of a new file needs its write lock and gets SQLITE_BUSY at once
        (no busy handler), e.g. when several processes open a new file."""
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                return self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.02)

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

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        self._version_at_open = int(version)
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self._path} has schema version {version}; this fermoposta knows "
                f"up to {SCHEMA_VERSION}"
            )
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have just done it.
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:  # a new file
                for statement in _statements(_SCHEMA):
                    self._conn.execute(statement)
            elif version < SCHEMA_VERSION:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _statements(_MIGRATIONS[step]):
                        self._conn.execute(statement)
            if version < SCHEMA_VERSION:
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    # --- transactions --------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction; rolled back on any exception."""
        with self._lock:
            self._check_open()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
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

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: a consistent snapshot across several queries."""
        with self._lock:
            self._check_open()
            try:
                self._conn.execute("BEGIN")
                try:
                    yield self._conn
                finally:
                    if self._conn.in_transaction:
                        self._conn.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"store read failed: {exc}") from exc

    @contextmanager
    def _read_now(self) -> Iterator[sqlite3.Connection]:
        """A read on the second connection that never waits: `WouldBlock`
        if another thread is using it or the file is busy (WAL readers
        normally never are: they do not wait for the writer)."""
        if not self._quick_lock.acquire(blocking=False):
            raise WouldBlock()
        try:
            self._check_open()
            try:
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
            return self._enqueue(conn, message, body, queue_id)

    def enqueue_batch(self, items: Sequence[tuple[NewMessage, IO[bytes], str | None]]
                      ) -> list[str]:
        with self._write() as conn:
            return [self._enqueue(conn, message, body, queue_id)
                    for message, body, queue_id in items]

    def _enqueue(self, conn: sqlite3.Connection, message: NewMessage, body: IO[bytes],
                 queue_id: str | None = None) -> str:
        now = self._clock()
        while True:
            message_id = queue_id or new_queue_id()
            queue_id = None  # on a collision, draw a fresh one
            try:
                conn.execute(
                    "INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
                    " body_8bit, envid, ret, client, node)"
                    " VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        message_id,
                        message.sender,
                        now,
                        str(message.origin),
                        int(message.smtputf8),
                        int(message.body_8bit),
                        message.envid,
                        message.ret,
                        message.client,
                        self._node,
                    ),
                )
            except sqlite3.IntegrityError:
                continue  # queue id collision: draw again
            break
        size = 0
        seq = 0
        while True:
            data = body.read(CHUNK_SIZE)
            if not data:
                break
            conn.execute(
                "INSERT INTO body_chunks (message_id, seq, data) VALUES (?, ?, ?)",
                (message_id, seq, bytes(data)),
            )
            size += len(data)
            seq += 1
            del data
        conn.execute("UPDATE messages SET size = ? WHERE id = ?", (size, message_id))
        conn.executemany(
            "INSERT INTO recipients (message_id, address, domain, state, attempts, notify,"
            " orcpt, updated_at) VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
            [
                (message_id, r.address, r.domain, str(r.state), r.notify, r.orcpt, now)
                for r in message.recipients
            ],
        )
        return message_id

    def is_empty(self) -> bool:
        with self._read() as conn:
            return all(conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None
                       for table in ("accounts", "domains", "messages"))

    def import_message(self, entry: QueueEntry, body: IO[bytes]) -> None:
        m = entry.message
        now = self._clock()
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
                    " body_8bit, envid, ret, client, node)"
                    " VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?)",
                    (m.id, m.sender, m.received_at, str(m.origin), int(m.smtputf8),
                     int(m.body_8bit), m.envid, m.ret, m.client, m.node))
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
                    " delay_notified) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (m.id, r.address, r.domain, str(r.state), r.attempts, r.last_reply,
                     r.notify, r.orcpt, now, r.next_attempt_at, r.first_failure_at,
                     int(r.delay_notified)))
                previous = entry.hold_from.get(r.id)
                if r.state == RecipientState.HOLD and previous is not None:
                    conn.execute("INSERT INTO recipient_holds (recipient_id, previous_state)"
                                 " VALUES (?, ?)", (cur.lastrowid, str(previous)))

    def get_message(self, message_id: str) -> QueuedMessage | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)
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
            row = conn.execute("SELECT size FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise StoreError(f"message {message_id} is not in the queue")
        return self._chunks(message_id, int(row[0]))

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
            row = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE id IN ("
                " SELECT message_id FROM recipients WHERE domain = ? AND state = ?)",
                (domain, str(RecipientState.HELD)),
            ).fetchone()
        return int(row[0]), int(row[1])

    def record_delivered(self, recipient_ids: Collection[int], reply: str,
                         dsn: tuple[NewMessage, IO[bytes]] | None = None) -> str | None:
        with self._write() as conn:
            removed = self._remove_recipients(conn, recipient_ids)
            if dsn is None or not removed:
                return None
            return self._enqueue(conn, dsn[0], dsn[1])

    def record_deferred(
        self,
        recipient_ids: Collection[int],
        reply: str,
        next_attempt_at: float | Mapping[int, float] | None = None,
    ) -> None:
        now = self._clock()
        ids = sorted(set(recipient_ids))
        with self._write() as conn:
            if isinstance(next_attempt_at, Mapping):
                conn.executemany(
                    "UPDATE recipients SET attempts = attempts + 1, last_reply = ?,"
                    " updated_at = ?, first_failure_at = COALESCE(first_failure_at, ?),"
                    " next_attempt_at = ?, claimed_by = NULL, claimed_until = NULL"
                    " WHERE id = ?",
                    [(reply, now, now, next_attempt_at.get(rid), rid) for rid in ids],
                )
                return
            for batch in _batches(ids):
                conn.execute(
                    "UPDATE recipients SET attempts = attempts + 1, last_reply = ?,"
                    " updated_at = ?, first_failure_at = COALESCE(first_failure_at, ?),"
                    " next_attempt_at = ?, claimed_by = NULL, claimed_until = NULL"
                    f" WHERE id IN ({_marks(len(batch))})",
                    (reply, now, now, next_attempt_at, *batch),
                )

    def record_failed(
        self,
        recipient_ids: Collection[int],
        reply: str,
        dsn: tuple[NewMessage, IO[bytes]] | None,
    ) -> str | None:
        with self._write() as conn:
            removed = self._remove_recipients(conn, recipient_ids)
            if dsn is None or not removed:
                return None
            return self._enqueue(conn, dsn[0], dsn[1])

    def _remove_recipients(self, conn: sqlite3.Connection, recipient_ids: Collection[int]) -> int:
        """Delete the recipients (and messages left without any); return how many were."""
        ids = sorted(set(recipient_ids))
        touched: set[str] = set()
        removed = 0
        for batch in _batches(ids):
            marks = _marks(len(batch))
            touched.update(
                r[0]
                for r in conn.execute(
                    f"SELECT DISTINCT message_id FROM recipients WHERE id IN ({marks})", batch
                )
            )
            removed += conn.execute(f"DELETE FROM recipients WHERE id IN ({marks})", batch).rowcount
        for ids_batch in _batches(sorted(touched)):
            conn.execute(
                f"DELETE FROM messages WHERE id IN ({_marks(len(ids_batch))}) AND NOT EXISTS"
                " (SELECT 1 FROM recipients WHERE recipients.message_id = messages.id)",
                ids_batch,
            )
        return removed

    # --- outbound queue ------------------------------------------------------------------

    def claim_due_outbound(
        self, now: float, limit: int, owner: str, ttl: float
    ) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        until = now + ttl
        holder = self._holders.me()
        with self._write() as conn:
            # Claims of a runner whose process died (kill -9) are free now,
            # not when they expire: their recipients come first.
            dead = [h for h in self._claim_holders(conn, now) if not self._holders.is_alive(h)]
            ids: list[int] = []
            for batch in _batches(dead):
                ids += [
                    int(r[0])
                    for r in conn.execute(
                        "SELECT id FROM recipients WHERE claimed_by IS NOT NULL"
                        f" AND claimed_until > ? AND claim_holder IN ({_marks(len(batch))})"
                        " AND state = ? ORDER BY id LIMIT ?",
                        (now, *batch, str(RecipientState.OUTBOUND), limit - len(ids)),
                    )
                ]
                if len(ids) >= limit:
                    break
            if len(ids) < limit:
                ids += [
                    int(r[0])
                    for r in conn.execute(
                        "SELECT id FROM recipients WHERE state = ?"
                        " AND COALESCE(next_attempt_at, 0) <= ?"
                        " AND (claimed_until IS NULL OR claimed_until <= ?)"
                        " ORDER BY COALESCE(next_attempt_at, 0), id LIMIT ?",
                        (str(RecipientState.OUTBOUND), now, now, limit - len(ids)),
                    )
                ]
            for batch_ids in _batches(ids):
                conn.execute(
                    "UPDATE recipients SET claimed_by = ?, claimed_until = ?, next_attempt_at = ?,"
                    f" claim_holder = ? WHERE id IN ({_marks(len(batch_ids))})",
                    (owner, until, until, holder, *batch_ids),
                )
            return self._messages_of(conn, ids)

    @staticmethod
    def _claim_holders(conn: sqlite3.Connection, now: float) -> list[str]:
        """Holders of unexpired claims (an index range on `recipients_claimed_by`)."""
        return [
            str(r[0])
            for r in conn.execute(
                "SELECT DISTINCT claim_holder FROM recipients WHERE claimed_by IS NOT NULL"
                " AND claimed_until > ? AND claim_holder IS NOT NULL",
                (now,),
            )
        ]

    def renew_claims(self, owner: str, now: float, ttl: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE recipients SET claimed_until = ?, next_attempt_at = ?"
                " WHERE claimed_by = ?",
                (now + ttl, now + ttl, owner),
            )

    def release_claims(self, owner: str, recipient_ids: Collection[int] | None = None,
                       next_attempt_at: float | None = None) -> None:
        with self._write() as conn:
            if recipient_ids is None:
                conn.execute(
                    "UPDATE recipients SET claimed_by = NULL, claimed_until = NULL,"
                    " next_attempt_at = ? WHERE claimed_by = ?",
                    (next_attempt_at, owner),
                )
                return
            for batch in _batches(sorted(set(recipient_ids))):
                conn.execute(
                    "UPDATE recipients SET claimed_by = NULL, claimed_until = NULL,"
                    f" next_attempt_at = ? WHERE claimed_by = ? AND id IN ({_marks(len(batch))})",
                    (next_attempt_at, owner, *batch),
                )

    def mark_delay_notified(
        self, recipient_ids: Collection[int], dsn: tuple[NewMessage, IO[bytes]] | None = None
    ) -> str | None:
        with self._write() as conn:
            marked = 0
            for batch in _batches(sorted(set(recipient_ids))):
                marked += conn.execute(
                    "UPDATE recipients SET delay_notified = 1"
                    f" WHERE id IN ({_marks(len(batch))}) AND delay_notified = 0",
                    batch,
                ).rowcount
            if dsn is None or not marked:
                return None
            return self._enqueue(conn, dsn[0], dsn[1])

    def held_older_than(
        self,
        cutoff: float,
        limit: int,
        *,
        domains: Collection[str] | None = None,
        default_lifetime_only: bool = False,
        delay_notified: bool | None = None,
    ) -> list[QueuedMessage]:
        if limit <= 0 or (domains is not None and not domains):
            return []
        if domains is not None and len(set(domains)) > _BATCH:
            raise ValueError(f"held_older_than: at most {_BATCH} domains at once")
        sql = (
            "SELECT r.id FROM messages m JOIN recipients r ON r.message_id = m.id"
            " WHERE m.received_at < ? AND r.state = ?"
            " AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.domain = r.domain"
            " AND l.expires_at > ?)"
        )
        params: list[Any] = [cutoff, str(RecipientState.HELD), self._clock()]
        if domains is not None:
            wanted = sorted(set(domains))
            sql += f" AND r.domain IN ({_marks(len(wanted))})"
            params += wanted
        if default_lifetime_only:
            sql += (" AND r.domain NOT IN"
                    " (SELECT name FROM domains WHERE hold_lifetime IS NOT NULL)")
        if delay_notified is not None:
            sql += " AND r.delay_notified = ?"
            params.append(int(delay_notified))
        sql += " ORDER BY m.received_at, r.id LIMIT ?"
        params.append(limit)
        with self._read() as conn:
            ids = [int(r[0]) for r in conn.execute(sql, params)]
            return self._messages_of(conn, ids)

    def outbound_older_than(self, cutoff: float, limit: int) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        with self._read() as conn:
            ids = [
                int(r[0])
                for r in conn.execute(
                    "SELECT r.id FROM messages m JOIN recipients r ON r.message_id = m.id"
                    " WHERE m.received_at < ? AND r.state = ?"
                    " ORDER BY m.received_at, r.id LIMIT ?",
                    (cutoff, str(RecipientState.OUTBOUND), limit),
                )
            ]
            return self._messages_of(conn, ids)

    # --- leases --------------------------------------------------------------------------

    def acquire_leases(self, domains: Collection[str], owner: str, ttl: float) -> bool:
        wanted = sorted(set(domains))
        # Our lock file exists (and is locked) before our name is in a row.
        holder = self._holders.me()
        with self._write() as conn:
            now = self._clock()
            for batch in _batches(wanted):
                live = conn.execute(
                    f"SELECT DISTINCT holder FROM leases WHERE domain IN ({_marks(len(batch))})"
                    " AND owner != ? AND expires_at > ?",
                    (*batch, owner, now),
                ).fetchall()
                # A lease of a process that died (kill -9, OOM, power) is
                # free now, not when it expires; one of a live process, or
                # of a row without a holder, is busy until it expires.
                if any(not row[0] or self._holders.is_alive(str(row[0])) for row in live):
                    return False  # nothing written yet: the commit is empty
            conn.executemany(
                "INSERT INTO leases (domain, owner, expires_at, holder) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(domain) DO UPDATE SET owner = excluded.owner,"
                " expires_at = excluded.expires_at, holder = excluded.holder",
                [(d, owner, now + ttl, holder) for d in wanted],
            )
        return True

    def renew_leases(self, owner: str, ttl: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE leases SET expires_at = ? WHERE owner = ?", (self._clock() + ttl, owner)
            )

    def release_leases(self, owner: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE owner = ?", (owner,))

    # --- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._holders.close()
            try:
                with self._quick_lock:
                    self._quick.close()
                self._conn.close()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot close store: {exc}") from exc

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
