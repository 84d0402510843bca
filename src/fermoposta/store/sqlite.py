"""SQLite engine of the store (see `fermoposta.store.base` for the contract).

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
  version 4 `recipient_holds`; version 5 the `holder` of a lease).
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

import contextlib
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

from fermoposta.store.base import (
    CHUNK_SIZE,
    Account,
    Domain,
    DomainShape,
    MessageOrigin,
    NewMessage,
    QueuedMessage,
    QueuedRecipient,
    QueueEntry,
    QueueFilter,
    QueueShape,
    RecipientState,
    SchemaTooNew,
    ScramSecret,
    StoreError,
    new_queue_id,
)
from fermoposta.store.holders import Holders

SCHEMA_VERSION = 6
BUSY_TIMEOUT = 10.0  # seconds
_BATCH = 500  # bound on SQL parameters per statement (old SQLite: 999)

_T = TypeVar("_T")

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
    last_atrn_at REAL
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
    hold_lifetime REAL
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

# Statements that bring a file from version N-1 to N.
_MIGRATIONS: dict[int, str] = {
    2: _ACCOUNT_CERT_SUBJECTS,
    3: _V3,
    4: _RECIPIENT_HOLDS,
    5: _V5,
    6: _V6,
}

_RECIPIENT_COLUMNS = (
    "id, message_id, address, domain, state, attempts, last_reply, notify, orcpt,"
    " next_attempt_at, first_failure_at, delay_notified"
)
_DOMAIN_COLUMNS = "name, account, max_messages, max_bytes, validate, hold_lifetime"
_MESSAGE_COLUMNS = (
    "id, sender, received_at, size, origin, smtputf8, body_8bit, envid, ret, client, node"
)


def _statements(script: str) -> Iterator[str]:
    for statement in script.split(";"):
        if statement.strip():
            yield statement


def _batches(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _BATCH):
        yield items[start : start + _BATCH]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _recipient(r: Any) -> QueuedRecipient:
    return QueuedRecipient(
        id=r[0],
        message_id=r[1],
        address=r[2],
        domain=r[3],
        state=RecipientState(r[4]),
        attempts=r[5],
        last_reply=r[6],
        notify=r[7],
        orcpt=r[8],
        next_attempt_at=r[9],
        first_failure_at=r[10],
        delay_notified=bool(r[11]),
    )


def _message(row: Any, recipients: Sequence[QueuedRecipient]) -> QueuedMessage:
    return QueuedMessage(
        id=row[0],
        sender=row[1],
        received_at=row[2],
        size=row[3],
        origin=MessageOrigin(row[4]),
        smtputf8=bool(row[5]),
        body_8bit=bool(row[6]),
        envid=row[7],
        ret=row[8],
        client=row[9],
        recipients=tuple(recipients),
        node=row[10],
    )


class SQLiteStore:
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
        except (sqlite3.Error, OSError) as exc:
            self._conn.close()
            raise StoreError(f"cannot open store {self._path}: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

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

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    # --- messages ------------------------------------------------------------------------

    def enqueue(self, message: NewMessage, body: IO[bytes], queue_id: str | None = None) -> str:
        with self._write() as conn:
            return self._enqueue(conn, message, body, queue_id)

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

    # --- queue tools -------------------------------------------------------------------
    @staticmethod
    def _filter_sql(where: QueueFilter, after: tuple[float, str] | None
                    ) -> tuple[str, list[Any]]:
        """The WHERE clause (on messages `m`) of `where` and the page key."""
        clauses: list[str] = []
        params: list[Any] = []
        if after is not None:
            clauses.append("(m.received_at > ? OR (m.received_at = ? AND m.id > ?))")
            params += [after[0], after[0], after[1]]
        if where.received_before is not None:
            clauses.append("m.received_at < ?")
            params.append(where.received_before)
        if where.sender is not None:
            if where.sender_exact:
                clauses.append("lower(m.sender) = lower(?)")
            else:
                clauses.append("instr(lower(m.sender), lower(?)) > 0")
            params.append(where.sender)
        inner: list[str] = []
        if where.domain is not None:
            inner.append("r.domain = ?")
            params.append(where.domain)
        if where.recipient is not None:
            if where.recipient_exact:
                inner.append("lower(r.address) = lower(?)")
            else:
                inner.append("instr(lower(r.address), lower(?)) > 0")
            params.append(where.recipient)
        if where.state is not None:
            if where.state == "deferred":
                inner.append("r.state = ? AND r.attempts > 0")
                params.append(str(RecipientState.OUTBOUND))
            else:
                inner.append("r.state = ?")
                params.append(str(RecipientState(where.state)))
        if inner:
            clauses.append("EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id AND "
                           + " AND ".join(inner) + ")")
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def queue_ids(
        self, where: QueueFilter, after: tuple[float, str] | None, limit: int
    ) -> list[tuple[float, str]]:
        if limit <= 0:
            return []
        sql, params = self._filter_sql(where, after)
        with self._read() as conn:
            return [
                (float(r[0]), str(r[1]))
                for r in conn.execute(
                    f"SELECT m.received_at, m.id FROM messages m{sql}"
                    " ORDER BY m.received_at, m.id LIMIT ?",
                    (*params, limit),
                )
            ]

    def queue_page(
        self, where: QueueFilter, after: tuple[float, str] | None, limit: int
    ) -> list[QueueEntry]:
        if limit <= 0:
            return []
        sql, params = self._filter_sql(where, after)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {', '.join('m.' + c.strip() for c in _MESSAGE_COLUMNS.split(','))}"
                f" FROM messages m{sql} ORDER BY m.received_at, m.id LIMIT ?",
                (*params, limit),
            ).fetchall()
            return self._entries(conn, rows)

    def get_queue_entry(self, message_id: str) -> QueueEntry | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            if row is None:
                return None
            return self._entries(conn, [row])[0]

    def _entries(self, conn: sqlite3.Connection, rows: Sequence[Any]) -> list[QueueEntry]:
        """Entries for message rows (in their order), with all recipients."""
        now = self._clock()
        ids = [str(row[0]) for row in rows]
        recipients: dict[str, list[QueuedRecipient]] = {i: [] for i in ids}
        active: dict[str, set[int]] = {i: set() for i in ids}
        previous: dict[str, dict[int, RecipientState]] = {i: {} for i in ids}
        hold_column = (
            "(SELECT h.previous_state FROM recipient_holds h WHERE h.recipient_id = r.id)"
        )
        columns = ", ".join("r." + c.strip() for c in _RECIPIENT_COLUMNS.split(","))
        for batch in _batches(ids):
            for r in conn.execute(
                f"SELECT {columns}, r.claimed_by, r.claimed_until, {hold_column}"
                f" FROM recipients r WHERE r.message_id IN ({_marks(len(batch))})"
                " ORDER BY r.id",
                batch,
            ):
                rcpt = _recipient(r)
                recipients[rcpt.message_id].append(rcpt)
                if r[12] is not None and r[13] is not None and r[13] > now:
                    active[rcpt.message_id].add(rcpt.id)
                if rcpt.state == RecipientState.HOLD and r[14] is not None:
                    with contextlib.suppress(ValueError):
                        previous[rcpt.message_id][rcpt.id] = RecipientState(r[14])
        return [
            QueueEntry(_message(row, recipients[str(row[0])]),
                       frozenset(active[str(row[0])]), previous[str(row[0])])
            for row in rows
        ]

    @staticmethod
    def _existing(conn: sqlite3.Connection, message_ids: Sequence[str]) -> list[str]:
        found: list[str] = []
        for batch in _batches(message_ids):
            found += [
                str(r[0])
                for r in conn.execute(
                    f"SELECT id FROM messages WHERE id IN ({_marks(len(batch))})", batch
                )
            ]
        return sorted(found)

    def delete_messages(self, message_ids: Collection[str]) -> list[str]:
        wanted = sorted(set(message_ids))
        with self._write() as conn:
            found = self._existing(conn, wanted)
            for batch in _batches(found):
                # ON DELETE CASCADE removes the body chunks and the recipients.
                conn.execute(f"DELETE FROM messages WHERE id IN ({_marks(len(batch))})", batch)
        return found

    def _count_by_message(self, conn: sqlite3.Connection, batch: Sequence[str],
                          condition: str, params: Sequence[Any]) -> dict[str, int]:
        return {
            str(r[0]): int(r[1])
            for r in conn.execute(
                "SELECT message_id, COUNT(*) FROM recipients"
                f" WHERE message_id IN ({_marks(len(batch))}) AND {condition}"
                " GROUP BY message_id",
                (*batch, *params),
            )
        }

    def hold_messages(self, message_ids: Collection[str]) -> dict[str, int]:
        wanted = sorted(set(message_ids))
        hold = str(RecipientState.HOLD)
        now = self._clock()
        with self._write() as conn:
            found = self._existing(conn, wanted)
            result = dict.fromkeys(found, 0)
            for batch in _batches(found):
                marks = _marks(len(batch))
                result.update(self._count_by_message(conn, batch, "state != ?", (hold,)))
                conn.execute(
                    "INSERT OR REPLACE INTO recipient_holds (recipient_id, previous_state)"
                    f" SELECT id, state FROM recipients WHERE message_id IN ({marks})"
                    " AND state != ?",
                    (*batch, hold),
                )
                conn.execute(
                    f"UPDATE recipients SET state = ?, updated_at = ? WHERE message_id IN ({marks})"
                    " AND state != ?",
                    (hold, now, *batch, hold),
                )
        return result

    def release_messages(self, message_ids: Collection[str]) -> dict[str, int]:
        wanted = sorted(set(message_ids))
        hold = str(RecipientState.HOLD)
        now = self._clock()
        with self._write() as conn:
            found = self._existing(conn, wanted)
            result = dict.fromkeys(found, 0)
            for batch in _batches(found):
                marks = _marks(len(batch))
                result.update(self._count_by_message(conn, batch, "state = ?", (hold,)))
                conn.execute(
                    "UPDATE recipients SET updated_at = ?, state = COALESCE("
                    " (SELECT h.previous_state FROM recipient_holds h"
                    "  WHERE h.recipient_id = recipients.id),"
                    " CASE WHEN EXISTS (SELECT 1 FROM domains d WHERE d.name = recipients.domain)"
                    " THEN ? ELSE ? END)"
                    f" WHERE message_id IN ({marks}) AND state = ?",
                    (now, str(RecipientState.HELD), str(RecipientState.OUTBOUND), *batch, hold),
                )
                conn.execute(
                    "DELETE FROM recipient_holds WHERE recipient_id IN"
                    f" (SELECT id FROM recipients WHERE message_id IN ({marks}) AND state != ?)",
                    (*batch, hold),
                )
        return result

    def retry_outbound(
        self, now: float, *, message_ids: Collection[str] | None = None,
        domain: str | None = None
    ) -> dict[str, int]:
        condition = ("state = ? AND (claimed_until IS NULL OR claimed_until <= ?)"
                     + (" AND domain = ?" if domain is not None else ""))
        params: list[Any] = [str(RecipientState.OUTBOUND), now]
        if domain is not None:
            params.append(domain)
        result: dict[str, int] = {}
        with self._write() as conn:
            if message_ids is None:
                batches: list[Sequence[str] | None] = [None]
            else:
                found = self._existing(conn, sorted(set(message_ids)))
                result = dict.fromkeys(found, 0)
                batches = list(_batches(found))
            for batch in batches:
                scope = condition
                scope_params = list(params)
                if batch is not None:
                    scope += f" AND message_id IN ({_marks(len(batch))})"
                    scope_params += batch
                result.update(
                    (str(r[0]), int(r[1]))
                    for r in conn.execute(
                        f"SELECT message_id, COUNT(*) FROM recipients WHERE {scope}"
                        " GROUP BY message_id",
                        scope_params,
                    )
                )
                conn.execute(
                    f"UPDATE recipients SET next_attempt_at = ?, updated_at = ? WHERE {scope}",
                    (now, now, *scope_params),
                )
        return result

    def queue_shape(self, now: float, age_limits: Sequence[float]) -> QueueShape:
        limits = [float(a) for a in age_limits]
        bucket = ("CASE" + "".join(
            f" WHEN ? - m.received_at < ? THEN {i}" for i in range(len(limits))
        ) + f" ELSE {len(limits)} END") if limits else "0"  # no limits: one bucket
        bucket_params: list[Any] = []
        for limit in limits:
            bucket_params += [now, limit]
        held, outbound, hold = (str(s) for s in (RecipientState.HELD, RecipientState.OUTBOUND,
                                                  RecipientState.HOLD))
        by_state = (
            "SUM(r.state = ?), SUM(r.state = ?), SUM(r.state = ? AND r.attempts > 0),"
            " SUM(r.state = ?)"
        )
        state_params = (held, outbound, outbound, hold)
        with self._read() as conn:
            figures: dict[str, list[Any]] = {}
            for row in conn.execute(
                "SELECT r.domain, COUNT(DISTINCT r.message_id), COUNT(*), MIN(m.received_at),"
                f" {by_state}"
                " FROM recipients r JOIN messages m ON m.id = r.message_id GROUP BY r.domain",
                state_params,
            ):
                figures[str(row[0])] = list(row[1:])
            sizes = {
                str(r[0]): int(r[1])
                for r in conn.execute(
                    "SELECT domain, SUM(size) FROM (SELECT DISTINCT r.domain AS domain, m.id,"
                    " m.size AS size FROM recipients r JOIN messages m ON m.id = r.message_id)"
                    " GROUP BY domain"
                )
            }
            ages: dict[str, list[int]] = {d: [0] * (len(limits) + 1) for d in figures}
            for domain, index, count in conn.execute(
                f"SELECT r.domain, {bucket}, COUNT(*) FROM recipients r"
                " JOIN messages m ON m.id = r.message_id GROUP BY 1, 2",
                bucket_params,
            ):
                ages.setdefault(str(domain), [0] * (len(limits) + 1))[int(index)] += int(count)
            total_row = conn.execute(
                f"SELECT COUNT(*), {by_state} FROM recipients r", state_params
            ).fetchone()
            message_row = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(received_at) FROM messages"
            ).fetchone()
        domains = [
            DomainShape(domain, int(f[0]), int(f[1]), sizes.get(domain, 0), f[2],
                        int(f[3] or 0), int(f[4] or 0), int(f[5] or 0), int(f[6] or 0),
                        tuple(ages[domain]))
            for domain, f in figures.items()
        ]
        domains.sort(key=lambda d: (-d.recipients, d.domain))
        total_ages = [sum(d.ages[i] for d in domains) for i in range(len(limits) + 1)]
        total = DomainShape("", int(message_row[0]), int(total_row[0]), int(message_row[1]),
                            message_row[2], int(total_row[1] or 0), int(total_row[2] or 0),
                            int(total_row[3] or 0), int(total_row[4] or 0), tuple(total_ages))
        return QueueShape(total, tuple(domains))

    def queue_summary(self) -> list[tuple[str, int, int, float | None]]:
        with self._read() as conn:
            rows = {
                str(r[0]): (int(r[1]), int(r[2] or 0), r[3])
                for r in conn.execute(
                    "SELECT state, COUNT(*), SUM(size), MIN(received_at) FROM"
                    " (SELECT DISTINCT r.state AS state, m.id, m.size AS size,"
                    " m.received_at AS received_at"
                    " FROM recipients r JOIN messages m ON m.id = r.message_id)"
                    " GROUP BY state"
                )
            }
        return [(str(state), *rows.get(str(state), (0, 0, None))) for state in RecipientState]

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

    # --- accounts ------------------------------------------------------------------------

    def add_account(self, account: Account) -> None:
        with self._write() as conn:
            if self._account_exists(conn, account.name):
                raise ValueError(f"account {account.name!r} already exists")
            scram = account.scram
            conn.execute(
                "INSERT INTO accounts (name, scram_salt, scram_iterations, scram_stored_key,"
                " scram_server_key, cram_secret, created_at, last_atrn_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    account.name,
                    scram.salt if scram else None,
                    scram.iterations if scram else None,
                    scram.stored_key if scram else None,
                    scram.server_key if scram else None,
                    account.cram_secret,
                    account.created_at or self._clock(),
                    account.last_atrn_at,
                ),
            )
            self._set_certs(conn, account)

    def update_account(self, account: Account) -> None:
        """Replace the secrets and certificate bindings of an account (ValueError if none).

        `created_at` is kept; `last_atrn_at` is taken from `account`.
        """
        with self._write() as conn:
            if not self._account_exists(conn, account.name):
                raise ValueError(f"no account {account.name!r}")
            scram = account.scram
            conn.execute(
                "UPDATE accounts SET scram_salt = ?, scram_iterations = ?, scram_stored_key = ?,"
                " scram_server_key = ?, cram_secret = ?, last_atrn_at = ? WHERE name = ?",
                (
                    scram.salt if scram else None,
                    scram.iterations if scram else None,
                    scram.stored_key if scram else None,
                    scram.server_key if scram else None,
                    account.cram_secret,
                    account.last_atrn_at,
                    account.name,
                ),
            )
            conn.execute("DELETE FROM account_certs WHERE account = ?", (account.name,))
            conn.execute("DELETE FROM account_cert_subjects WHERE account = ?", (account.name,))
            self._set_certs(conn, account)

    @staticmethod
    def _account_exists(conn: sqlite3.Connection, name: str) -> bool:
        row = conn.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone()
        return row is not None

    @staticmethod
    def _set_certs(conn: sqlite3.Connection, account: Account) -> None:
        for fingerprint in dict.fromkeys(account.cert_fingerprints):
            row = conn.execute(
                "SELECT account FROM account_certs WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
            if row is not None:
                raise ValueError(
                    f"certificate {fingerprint} is already bound to account {row[0]!r}"
                )
            conn.execute(
                "INSERT INTO account_certs (fingerprint, account) VALUES (?, ?)",
                (fingerprint, account.name),
            )
        for subject in dict.fromkeys(account.cert_subjects):
            row = conn.execute(
                "SELECT account FROM account_cert_subjects WHERE subject = ?", (subject,)
            ).fetchone()
            if row is not None:
                raise ValueError(
                    f"certificate subject {subject!r} is already bound to account {row[0]!r}"
                )
            conn.execute(
                "INSERT INTO account_cert_subjects (subject, account) VALUES (?, ?)",
                (subject, account.name),
            )

    _ACCOUNT_COLUMNS = (
        "name, scram_salt, scram_iterations, scram_stored_key, scram_server_key, cram_secret,"
        " created_at, last_atrn_at"
    )

    @staticmethod
    def _account(conn: sqlite3.Connection, row: Any) -> Account:
        certs = tuple(
            r[0]
            for r in conn.execute(
                "SELECT fingerprint FROM account_certs WHERE account = ? ORDER BY fingerprint",
                (row[0],),
            )
        )
        subjects = tuple(
            r[0]
            for r in conn.execute(
                "SELECT subject FROM account_cert_subjects WHERE account = ? ORDER BY subject",
                (row[0],),
            )
        )
        scram = None
        if row[1] is not None:
            scram = ScramSecret(
                salt=bytes(row[1]),
                iterations=int(row[2]),
                stored_key=bytes(row[3]),
                server_key=bytes(row[4]),
            )
        return Account(
            name=row[0],
            scram=scram,
            cram_secret=row[5],
            cert_fingerprints=certs,
            cert_subjects=subjects,
            created_at=row[6],
            last_atrn_at=row[7],
        )

    def get_account(self, name: str) -> Account | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {self._ACCOUNT_COLUMNS} FROM accounts WHERE name = ?", (name,)
            ).fetchone()
            return None if row is None else self._account(conn, row)

    def account_by_fingerprint(self, fingerprint: str) -> Account | None:
        """`fingerprint` is lowercase hex without colons, as stored."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {self._ACCOUNT_COLUMNS} FROM accounts WHERE name ="
                " (SELECT account FROM account_certs WHERE fingerprint = ?)",
                (fingerprint.lower(),),
            ).fetchone()
            return None if row is None else self._account(conn, row)

    def account_by_subject(self, subject: str) -> Account | None:
        """`subject` in the canonical form of `certificate_subject`, compared exactly."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {self._ACCOUNT_COLUMNS} FROM accounts WHERE name ="
                " (SELECT account FROM account_cert_subjects WHERE subject = ?)",
                (subject,),
            ).fetchone()
            return None if row is None else self._account(conn, row)

    def list_accounts(self) -> list[Account]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {self._ACCOUNT_COLUMNS} FROM accounts ORDER BY name"
            ).fetchall()
            return [self._account(conn, row) for row in rows]

    def remove_account(self, name: str) -> bool:
        """Remove the account, its certificate bindings and domains; held mail stays queued."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM accounts WHERE name = ?", (name,))
            return cur.rowcount > 0

    def record_atrn(self, name: str, at: float) -> None:
        with self._write() as conn:
            conn.execute("UPDATE accounts SET last_atrn_at = ? WHERE name = ?", (at, name))

    # --- domains -------------------------------------------------------------------------

    def add_domain(self, domain: Domain) -> None:
        with self._write() as conn:
            row = conn.execute(
                "SELECT account FROM domains WHERE name = ?", (domain.name,)
            ).fetchone()
            if row is not None:
                raise ValueError(f"domain {domain.name!r} already belongs to account {row[0]!r}")
            if not self._account_exists(conn, domain.account):
                raise ValueError(f"no account {domain.account!r}")
            conn.execute(
                "INSERT INTO domains (name, account, max_messages, max_bytes, validate,"
                " hold_lifetime) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    domain.name,
                    domain.account,
                    domain.max_messages,
                    domain.max_bytes,
                    int(domain.valid_recipients is not None),
                    domain.hold_lifetime,
                ),
            )
            self._set_valid(conn, domain)

    def update_domain(self, domain: Domain) -> None:
        """Replace an existing domain's account, quotas, valid recipients and hold lifetime."""
        with self._write() as conn:
            row = conn.execute("SELECT 1 FROM domains WHERE name = ?", (domain.name,)).fetchone()
            if row is None:
                raise ValueError(f"no domain {domain.name!r}")
            if not self._account_exists(conn, domain.account):
                raise ValueError(f"no account {domain.account!r}")
            conn.execute(
                "UPDATE domains SET account = ?, max_messages = ?, max_bytes = ?, validate = ?,"
                " hold_lifetime = ? WHERE name = ?",
                (
                    domain.account,
                    domain.max_messages,
                    domain.max_bytes,
                    int(domain.valid_recipients is not None),
                    domain.hold_lifetime,
                    domain.name,
                ),
            )
            conn.execute("DELETE FROM valid_recipients WHERE domain = ?", (domain.name,))
            self._set_valid(conn, domain)

    @staticmethod
    def _set_valid(conn: sqlite3.Connection, domain: Domain) -> None:
        if domain.valid_recipients is None:
            return
        conn.executemany(
            "INSERT OR IGNORE INTO valid_recipients (domain, local) VALUES (?, ?)",
            [(domain.name, local.lower()) for local in sorted(domain.valid_recipients)],
        )

    @staticmethod
    def _domain(conn: sqlite3.Connection, row: Any) -> Domain:
        valid: frozenset[str] | None = None
        if row[4]:
            valid = frozenset(
                r[0]
                for r in conn.execute(
                    "SELECT local FROM valid_recipients WHERE domain = ?", (row[0],)
                )
            )
        return Domain(
            name=row[0],
            account=row[1],
            max_messages=row[2],
            max_bytes=row[3],
            valid_recipients=valid,
            hold_lifetime=row[5],
        )

    def get_domain(self, name: str) -> Domain | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_DOMAIN_COLUMNS} FROM domains"
                " WHERE name = ?",
                (name,),
            ).fetchone()
            return None if row is None else self._domain(conn, row)

    def list_domains(self, account: str | None = None) -> list[Domain]:
        with self._read() as conn:
            if account is None:
                rows = conn.execute(
                    f"SELECT {_DOMAIN_COLUMNS} FROM domains"
                    " ORDER BY name"
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_DOMAIN_COLUMNS} FROM domains"
                    " WHERE account = ? ORDER BY name",
                    (account,),
                ).fetchall()
            return [self._domain(conn, row) for row in rows]

    def remove_domain(self, name: str) -> bool:
        """Remove the domain (and its valid recipients); its held mail stays queued."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM domains WHERE name = ?", (name,))
            return cur.rowcount > 0

    # --- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._holders.close()
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot close store: {exc}") from exc

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
