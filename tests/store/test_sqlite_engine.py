"""Tests of the SQLite engine itself (fermoposta.store.sqlite), beside the
engine-neutral contract suite (test_contract_*.py): its on-disk format and
what only it promises: WAL, foreign keys and synchronous=FULL on every
connection, private file modes, nothing left behind in the file after a
rollback or a deletion, the due-recipients index, migrations from every older
schema, and the holders' lock files that free a dead process's leases.

The file is inspected with a separate `sqlite3.connect` (the engine's on-disk
format), never through the store's own connection."""

from __future__ import annotations

import io
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fermoposta.store import (
    CHUNK_SIZE,
    STORE_FILENAME,
    Account,
    Domain,
    MessageOrigin,
    NewMessage,
    ScramSecret,
    SQLiteStore,
    StoreError,
    open_store,
)
from fermoposta.store.base import SchemaTooNew
from fermoposta.store.holders import Holders
from fermoposta.store.sqlite import BUSY_TIMEOUT, SCHEMA_VERSION
from support.sqlite_schema import back_to_version_8, back_to_version_9

from .contract import HELD, OUTBOUND, Clock, body_of, msg, rcpt, rcpt_ids


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / STORE_FILENAME


@pytest.fixture
def store(path: Path, clock: Clock) -> Iterator[SQLiteStore]:
    with SQLiteStore(path, clock=clock) as s:
        yield s


def rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run `sql` on the file with a connection of our own."""
    with closing(sqlite3.connect(path)) as conn:
        return [tuple(r) for r in conn.execute(sql, params)]


def count(path: Path, table: str) -> int:
    return int(rows(path, f"SELECT COUNT(*) FROM {table}")[0][0])


# --- connection settings and files ----------------------------------------------------------


def test_every_connection_is_wal_with_foreign_keys_and_full_sync(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # foreign_keys and synchronous are settings of a connection, not of the
    # file: look at each connection the engine opens, as sqlite3 hands it out.
    opened: list[sqlite3.Connection] = []
    real_connect = sqlite3.connect

    def spy(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = real_connect(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", spy)
    with SQLiteStore(path) as s:
        mid = s.enqueue(msg("a@x.example"), io.BytesIO(b"hello"))
        assert body_of(s, mid) == b"hello"
        monkeypatch.undo()
        assert opened
        # The writer, the reader of `_read` and the one of `_read_now`.
        assert len(opened) == 3
        for conn in opened:
            assert str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal"
            assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            if conn is s._quick:
                # Reads on the event loop: never writes, never waits.
                assert conn.execute("PRAGMA query_only").fetchone()[0] == 1
                assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 0
                continue
            # `_read`'s connection only reads; the writer writes.
            read_only = conn.execute("PRAGMA query_only").fetchone()[0]
            assert read_only == (1 if conn is s._reader else 0)
            if conn is s._conn:
                assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 2  # FAST
            # Several processes share the file: wait for a writer, do not fail at once.
            assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT * 1000
    # WAL is a property of the file: it stays after the store is closed.
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]


def test_file_modes_are_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "data" / STORE_FILENAME
    with SQLiteStore(path) as s:
        s.enqueue(msg("a@x.example"), io.BytesIO(b"secret mail"))
        s.acquire_leases(["x.example"], "sess", 60)  # creates the holders directory
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        for name in (path.name, path.name + "-wal", path.name + "-shm", path.name + "-directory"):
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
        holders = path.parent / "holders"
        assert stat.S_IMODE(holders.stat().st_mode) == 0o700
        assert [stat.S_IMODE(p.stat().st_mode) for p in holders.iterdir()] == [0o600]


def test_an_existing_file_keeps_its_modes_private(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    path.touch(mode=0o600)
    SQLiteStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_open_store(tmp_path: Path) -> None:
    s = open_store(tmp_path / "data", node="n1")
    try:
        assert isinstance(s, SQLiteStore) and s.node == "n1"
        assert s.path == tmp_path / "data" / "fermoposta.sqlite3"
        assert s.path.exists()
    finally:
        s.close()
    elsewhere = tmp_path / "elsewhere.sqlite3"
    s = open_store(tmp_path / "unused", url=f"sqlite://{elsewhere}")
    try:
        assert isinstance(s, SQLiteStore) and s.path == elsewhere and elsewhere.exists()
        assert not (tmp_path / "unused").exists()
    finally:
        s.close()


def test_opening_a_new_file_waits_for_another_writer(path: Path) -> None:
    # Deterministic stand-in for two processes opening a fresh file at once
    # (the contract's test_stores_opened_at_once_migrate_safely, which then
    # fails about once in twenty runs).
    path.parent.mkdir(mode=0o700)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # the file is not in WAL mode yet
        timer = threading.Timer(0.5, other.execute, ("COMMIT",))
        timer.start()
        started = time.monotonic()
        try:
            with SQLiteStore(path) as s:  # must wait up to BUSY_TIMEOUT, not fail
                assert s.schema_version() == SCHEMA_VERSION
        finally:
            timer.join()
        assert time.monotonic() - started < BUSY_TIMEOUT
    finally:
        other.close()


def test_errors_are_store_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(StoreError):
        SQLiteStore(blocker / "s.sqlite3")
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        SQLiteStore(garbage)


# --- nothing left behind in the file --------------------------------------------------------


def test_a_failed_enqueue_leaves_no_rows(store: SQLiteStore, path: Path) -> None:
    class Broken(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            if self.tell() > 0:
                raise OSError("disk gone")
            return super().read(size)

    with pytest.raises(StoreError):
        store.enqueue(msg("a@x.example"), Broken(b"x" * (CHUNK_SIZE * 2)))
    assert (count(path, "messages"), count(path, "body_chunks"), count(path, "recipients")) == (
        0, 0, 0)


def test_a_read_does_not_wait_for_a_write_in_progress(store: SQLiteStore) -> None:
    # The drain reads its next message while a delivery commit (and its
    # fsync) runs in another thread: the read must not queue behind it, and
    # it sees what was committed before it began, never the open write.
    first = store.enqueue(msg("a@x.example"), io.BytesIO(b"one"))
    inside, release = threading.Event(), threading.Event()
    seen: list[object] = []

    def slow_write() -> None:
        with store._write() as conn:
            conn.execute("DELETE FROM recipients WHERE message_id = ?", (first,))
            inside.set()
            release.wait(10)

    writer = threading.Thread(target=slow_write)
    writer.start()
    try:
        assert inside.wait(10)
        started = time.monotonic()
        message = store.get_message(first)
        seen.append(body_of(store, first))
        assert time.monotonic() - started < 1.0  # did not wait for the writer
        assert message is not None and len(message.recipients) == 1  # not the open write
        assert seen == [b"one"]
    finally:
        release.set()
        writer.join(10)
    after = store.get_message(first)
    assert after is not None and after.recipients == ()  # committed: seen at once


def test_a_delivered_body_is_not_written_again(store: SQLiteStore, path: Path) -> None:
    # secure_delete=FAST: removing a delivered 2 MiB message frees its pages
    # without writing 2 MiB of zeros to the WAL (which SQLite builds with
    # SECURE_DELETE, like many Pythons', would do by default).
    body = os.urandom(2 * 1024 * 1024)
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(body))
    wal = path.with_name(path.name + "-wal")
    assert rows(path, "PRAGMA wal_checkpoint(TRUNCATE)")[0][0] == 0  # not busy
    assert wal.stat().st_size == 0
    message = store.get_message(mid)
    assert message is not None
    store.record_delivered([r.id for r in message.recipients], "250 ok", None)
    assert store.get_message(mid) is None
    assert count(path, "body_chunks") == 0
    assert wal.stat().st_size < 256 * 1024, wal.stat().st_size


def test_bodies_go_with_their_messages(store: SQLiteStore, path: Path) -> None:
    data = b"b" * (CHUNK_SIZE + 1)
    delivered = store.enqueue(msg("a@x.example", "b@x.example"), io.BytesIO(data))
    failed = store.enqueue(msg("c@x.example"), io.BytesIO(data))
    deleted = store.enqueue(msg("d@x.example"), io.BytesIO(data))
    kept = store.enqueue(msg("e@x.example"), io.BytesIO(b"keep"))
    assert count(path, "body_chunks") == 7
    ids = rcpt_ids(store, delivered)
    store.record_delivered([ids["a@x.example"]], "250 ok")
    assert count(path, "body_chunks") == 7  # b is still queued
    store.record_delivered([ids["b@x.example"]], "250 ok")
    store.record_failed(rcpt_ids(store, failed).values(), "550 no", None)
    assert store.hold_messages([deleted]) == {deleted: 1}
    assert store.delete_messages([deleted]) == [deleted]
    assert rows(path, "SELECT message_id, seq FROM body_chunks") == [(kept, 0)]
    assert rows(path, "SELECT id FROM messages") == [(kept,)]
    # Cascades (foreign keys) also took the hold records of deleted recipients.
    assert count(path, "recipient_holds") == 0
    assert count(path, "recipients") == 1


def test_a_failed_dsn_leaves_no_rows(store: SQLiteStore, path: Path) -> None:
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"orig"))
    dsn = NewMessage("", (rcpt("s@sender.example", OUTBOUND),), MessageOrigin.DSN)

    class Broken(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.record_failed(rcpt_ids(store, mid).values(), "550 5.1.1 no", (dsn, Broken()))
    assert rows(path, "SELECT id FROM messages") == [(mid,)]
    assert count(path, "recipients") == 1 and count(path, "body_chunks") == 1


def test_due_query_uses_the_index(store: SQLiteStore, path: Path) -> None:
    plan = " ".join(
        str(row[-1]) for row in rows(
            path,
            "EXPLAIN QUERY PLAN SELECT id FROM recipients WHERE state = ?"
            " AND COALESCE(next_attempt_at, 0) <= ?"
            " AND (claimed_until IS NULL OR claimed_until <= ?)"
            " ORDER BY COALESCE(next_attempt_at, 0), id LIMIT ?", ("outbound", 1, 1, 10))
    )
    assert "recipients_due" in plan and "TEMP B-TREE" not in plan


def test_domain_queries_take_the_domain_index(path: Path, clock: Clock,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every statement the store runs with a domain and a state reads the
    domain's range of recipients_domain, never every recipient in that state
    through a state index: SQLite keeps no statistics, and with both on
    offer it took recipients_due for ATRN's held_message_ids (222 ms at
    1,000,000 held, against 4 ms)."""
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)  # the SQL with its values
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    from fermoposta.store.base import Account, Domain, QueueFilter
    with SQLiteStore(path, clock=clock) as store:
        store.add_account(Account("acme", None, None))
        store.add_domain(Domain("a.example", "acme"))
        store.enqueue(msg("x@a.example"), io.BytesIO(b"m"))
        statements.clear()
        # Two domains: SQLite weighs an IN list of several values differently.
        store.held_message_ids(["a.example", "b.example"])
        store.domains_with_held_mail(["a.example", "b.example"])
        store.domain_usage("a.example")
        store.queue_page(QueueFilter(domain="a.example", state="held"), None, 10)
        store.retry_outbound(clock.now, domain="a.example")
        store.start_etrn(["a.example", "b.example"], clock.now)
    monkeypatch.undo()
    checked = 0
    for sql in statements:
        if not sql.lstrip().upper().startswith("SELECT") \
                or not re.search(r"\bdomain (=|IN) .*\bstate =|\bstate = .*\bdomain (=|IN) ", sql):
            continue  # not a statement that selects by domain and state
        plan = " | ".join(str(r[-1]) for r in rows(path, "EXPLAIN QUERY PLAN " + sql))
        indexes = re.findall(r"INDEX (recipients_\w+)", plan)
        assert "recipients_domain" in indexes, (sql, plan)
        assert set(indexes) == {"recipients_domain"}, (sql, plan)
        # Both columns of its prefix: a seek to the domain's mail in that state.
        assert "recipients_domain (domain=? AND state=?" in plan, (sql, plan)
        checked += 1
    assert checked >= 5, statements


# --- schema versions and migrations ---------------------------------------------------------


def test_new_store_has_the_current_version(path: Path) -> None:
    with SQLiteStore(path) as s:
        assert s.schema_version() == SCHEMA_VERSION == 10
        assert s.migrate() == (0, SCHEMA_VERSION)  # a new file: from nothing
    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    with SQLiteStore(path) as again:
        assert again.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)


def test_newer_schema_refused(path: Path) -> None:
    SQLiteStore(path).close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 99")
    # Permanent (upgrade this node), unlike other store errors.
    with pytest.raises(SchemaTooNew, match="schema version"):
        SQLiteStore(path)


# The schema of version 1, verbatim from src/fermoposta/store/sqlite.py before
# version 2 added account_cert_subjects.
_SCHEMA_V1 = """
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
    client TEXT NOT NULL
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
    updated_at REAL NOT NULL
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
    validate INTEGER NOT NULL DEFAULT 0
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
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_owner ON leases(owner);
"""


def test_migration_from_version_1(tmp_path: Path) -> None:
    """A store written by fermoposta with schema 1 opens with its data, as the current version."""
    path = tmp_path / "v1.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(_SCHEMA_V1)
    conn.executescript(
        """
        INSERT INTO accounts (name, scram_salt, scram_iterations, scram_stored_key,
            scram_server_key, cram_secret, created_at, last_atrn_at)
            VALUES ('alice', x'73616c74', 4096, x'00', x'01', 'pw', 10.0, 20.0);
        INSERT INTO account_certs (fingerprint, account) VALUES
            ('abababababababababababababababababababababababababababababababab', 'alice');
        INSERT INTO domains (name, account, max_messages, max_bytes, validate)
            VALUES ('a.example', 'alice', 5, NULL, 0);
        INSERT INTO messages (id, sender, received_at, size, origin, smtputf8, body_8bit,
            envid, ret, client) VALUES ('0123456789AB', 's@x.example', 30.0, 4, 'mx', 0, 0,
            NULL, NULL, 'helo[192.0.2.1]');
        INSERT INTO body_chunks (message_id, seq, data) VALUES ('0123456789AB', 0, x'6b656570');
        INSERT INTO recipients (message_id, address, domain, state, updated_at)
            VALUES ('0123456789AB', 'x@a.example', 'a.example', 'held', 30.0);
        PRAGMA user_version = 1;
        """
    )
    conn.close()
    store = SQLiteStore(path)
    try:
        alice = store.get_account("alice")
        assert alice == Account(
            "alice",
            ScramSecret(b"salt", 4096, b"\x00", b"\x01"),
            "pw",
            ("ab" * 32,),
            (),
            created_at=10.0,
            last_atrn_at=20.0,
        )
        assert store.account_by_fingerprint("ab" * 32) == alice
        assert store.get_domain("a.example") == Domain("a.example", "alice", 5, None)
        assert store.held_message_ids(["a.example"]) == ["0123456789AB"]
        assert body_of(store, "0123456789AB") == b"keep"
        store.update_account(replace(alice, cert_subjects=("CN=alice",)))
        found = store.account_by_subject("CN=alice")
        assert found is not None and found.name == "alice"
    finally:
        store.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "account_cert_subjects" in tables
    lease_columns = {r[1] for r in check.execute("PRAGMA table_info(leases)")}
    assert "holder" in lease_columns
    check.close()
    with SQLiteStore(path) as again:  # already current: nothing to do
        assert again.account_by_subject("CN=alice") is not None


# Version 2 = version 1 (above) plus account_cert_subjects.
_SCHEMA_V2_EXTRA = """
CREATE TABLE IF NOT EXISTS account_cert_subjects (
    subject TEXT PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS account_cert_subjects_account ON account_cert_subjects(account);
"""


def test_migration_from_version_2(tmp_path: Path) -> None:
    """A store written with schema 2 opens with its data as the current version; queued
    OUTBOUND recipients are due at once, HELD ones keep waiting."""
    path = tmp_path / "v2.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(_SCHEMA_V1 + _SCHEMA_V2_EXTRA)
    conn.executescript(
        """
        INSERT INTO accounts (name, scram_salt, scram_iterations, scram_stored_key,
            scram_server_key, cram_secret, created_at, last_atrn_at)
            VALUES ('alice', NULL, NULL, NULL, NULL, 'pw', 10.0, NULL);
        INSERT INTO account_cert_subjects (subject, account) VALUES ('CN=alice', 'alice');
        INSERT INTO domains (name, account, max_messages, max_bytes, validate)
            VALUES ('a.example', 'alice', NULL, 7, 0);
        INSERT INTO messages (id, sender, received_at, size, origin, smtputf8, body_8bit,
            envid, ret, client) VALUES ('0123456789AB', 's@a.example', 30.0, 4, 'submission',
            0, 0, 'env+2B1', 'HDRS', 'helo[192.0.2.1]');
        INSERT INTO body_chunks (message_id, seq, data) VALUES ('0123456789AB', 0, x'6b656570');
        INSERT INTO recipients (message_id, address, domain, state, attempts, last_reply,
            notify, updated_at) VALUES
            ('0123456789AB', 'x@out.example', 'out.example', 'outbound', 2, '451 later',
             'FAILURE,DELAY', 30.0),
            ('0123456789AB', 'y@a.example', 'a.example', 'held', 0, NULL, NULL, 30.0);
        PRAGMA user_version = 2;
        """
    )
    conn.close()
    with SQLiteStore(path) as store:
        assert store.get_domain("a.example") == Domain("a.example", "alice", None, 7)
        found = store.account_by_subject("CN=alice")
        assert found is not None and found.name == "alice"
        m = store.get_message("0123456789AB")
        assert m is not None and m.envid == "env+2B1" and m.ret == "HDRS"
        x, y = m.recipients
        assert (x.attempts, x.last_reply, x.notify) == (2, "451 later", "FAILURE,DELAY")
        assert (x.next_attempt_at, x.first_failure_at, x.delay_notified) == (None, None, False)
        assert y.state == HELD
        [claimed] = store.claim_due_outbound(100.0, 10, "runner", 60)
        assert [r.address for r in claimed.recipients] == ["x@out.example"]
        assert b"".join(store.read_body("0123456789AB")) == b"keep"
        assert store.held_message_ids(["a.example"]) == ["0123456789AB"]
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"recipients_due", "recipients_claimed_by", "messages_received"} <= indexes
    check.close()


# Version 5 = version 2 plus the steps of versions 3 to 5, verbatim from
# src/fermoposta/store/sqlite.py before version 6 (node, claim_holder, rate_events).
_SCHEMA_V3_TO_V5 = """
ALTER TABLE recipients ADD COLUMN next_attempt_at REAL;
ALTER TABLE recipients ADD COLUMN first_failure_at REAL;
ALTER TABLE recipients ADD COLUMN delay_notified INTEGER NOT NULL DEFAULT 0;
ALTER TABLE recipients ADD COLUMN claimed_by TEXT;
ALTER TABLE recipients ADD COLUMN claimed_until REAL;
ALTER TABLE domains ADD COLUMN hold_lifetime REAL;
CREATE INDEX IF NOT EXISTS recipients_due
    ON recipients(state, COALESCE(next_attempt_at, 0));
CREATE INDEX IF NOT EXISTS recipients_claimed_by
    ON recipients(claimed_by) WHERE claimed_by IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_received ON messages(received_at);
CREATE TABLE IF NOT EXISTS recipient_holds (
    recipient_id INTEGER PRIMARY KEY REFERENCES recipients(id) ON DELETE CASCADE,
    previous_state TEXT NOT NULL
);
ALTER TABLE leases ADD COLUMN holder TEXT NOT NULL DEFAULT '';
"""


def test_migration_from_version_5(tmp_path: Path) -> None:
    """A store written with schema 5 opens as the current version: its messages have no
    node (""), a claim it held has no holder and waits for its expiry, rate
    events start empty."""
    path = tmp_path / "v5.sqlite3"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(_SCHEMA_V1 + _SCHEMA_V2_EXTRA + _SCHEMA_V3_TO_V5)
        conn.executescript(
            """
            INSERT INTO messages (id, sender, received_at, size, origin, smtputf8, body_8bit,
                envid, ret, client) VALUES ('0123456789AB', 's@a.example', 30.0, 4,
                'submission', 0, 0, NULL, NULL, 'helo[192.0.2.1]');
            INSERT INTO body_chunks (message_id, seq, data) VALUES ('0123456789AB', 0, x'6b656570');
            INSERT INTO recipients (message_id, address, domain, state, attempts, updated_at,
                next_attempt_at, claimed_by, claimed_until) VALUES
                ('0123456789AB', 'x@out.example', 'out.example', 'outbound', 1, 30.0,
                 1060.0, 'old-runner', 1060.0),
                ('0123456789AB', 'y@hold.example', 'hold.example', 'hold', 0, 30.0,
                 NULL, NULL, NULL);
            INSERT INTO recipient_holds (recipient_id, previous_state) VALUES (2, 'held');
            PRAGMA user_version = 5;
            """
        )
    with SQLiteStore(path) as store:
        assert store.migrate() == (5, SCHEMA_VERSION)
        m = store.get_message("0123456789AB")
        assert m is not None and m.node == ""
        # The claim of version 5 names no process: only its expiry frees it.
        assert store.claim_due_outbound(1059.0, 10, "new-runner", 60) == []
        [claimed] = store.claim_due_outbound(1060.0, 10, "new-runner", 60)
        assert [r.address for r in claimed.recipients] == ["x@out.example"]
        entry = store.get_queue_entry("0123456789AB")
        assert entry is not None and dict(entry.hold_from) == {2: HELD}
        assert store.count_events("k", 0.0) == 0 and store.add_event("k", 1.0, 10.0) == 1
        assert body_of(store, "0123456789AB") == b"keep"
    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    columns = {r[1] for r in rows(path, "PRAGMA table_info(recipients)")}
    assert "claim_holder" in columns


# --- holders: a lock file per process (issue 8, defect 5) ---------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from fermoposta.store import open_store
    store = open_store(sys.argv[1])
    assert store.acquire_leases(["example.org", "example.net"], "OTHERSESSION", 600.0)
    print("leased", flush=True)
    time.sleep(60)
""")


def _start_holder(data_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(data_dir)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "leased"
    return proc


def test_a_live_holders_lease_is_busy_and_a_dead_ones_is_free_at_once(
        tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / STORE_FILENAME)
    proc = _start_holder(tmp_path)
    try:
        assert not store.acquire_leases(["example.org"], "MINE", 600.0)
        assert not store.acquire_leases(["example.net", "example.com"], "MINE", 600.0)
        assert store.acquire_leases(["example.com"], "MINE", 600.0)  # not leased by it
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # Ten minutes left on its lease, but its process is dead: free now.
    started = time.monotonic()
    assert store.acquire_leases(["example.org", "example.net"], "MINE", 600.0)
    assert time.monotonic() - started < 5
    # Its stale lock file is gone; ours stays while we live.
    names = [p.name for p in (tmp_path / "holders").iterdir()]
    assert len(names) == 1
    # And now ours is busy for another store of this process (a live holder).
    other = SQLiteStore(store.path)
    assert other.acquire_leases(["example.org"], "THIRD", 600.0) is False
    other.close()
    store.close()


def test_a_lease_without_a_holder_waits_for_its_expiry(tmp_path: Path) -> None:
    now = [1000.0]
    store = SQLiteStore(tmp_path / STORE_FILENAME)
    store2 = SQLiteStore(store.path, clock=lambda: now[0])
    assert store2.acquire_leases(["example.org"], "OLD", 60.0)
    # A row written before schema 5 (no holder): only expiry frees it.
    with sqlite3.connect(store.path) as raw:
        raw.execute("UPDATE leases SET holder = ''")
    raw.close()
    store3 = SQLiteStore(store.path, clock=lambda: now[0])
    assert not store3.acquire_leases(["example.org"], "NEW", 60.0)
    now[0] += 61
    assert store3.acquire_leases(["example.org"], "NEW", 60.0)
    for s in (store, store2, store3):
        s.close()


def test_holder_names_that_are_not_file_names_count_as_alive(tmp_path: Path) -> None:
    holders = Holders(tmp_path / "holders")
    me = holders.me()
    assert holders.is_alive(me)
    assert holders.is_alive("../../etc/passwd")
    assert holders.is_alive("")
    assert not holders.is_alive("somehost-123-deadbeef")  # no such file: dead
    holders.close()
    assert not (tmp_path / "holders" / f"{me}.lock").exists()


def test_migration_from_version_6(tmp_path: Path) -> None:
    """A store written with schema 6 (no ETRN column) opens as the current version with
    its domains, none of them an ETRN domain."""
    from fermoposta.store.base import Account, Domain
    path = tmp_path / "v6.sqlite3"
    with SQLiteStore(path) as store:
        store.add_account(Account("acme", None, None))
        store.add_domain(Domain("a.example", "acme", max_messages=5))
    with closing(sqlite3.connect(path)) as conn:
        back_to_version_8(conn)
        conn.execute("ALTER TABLE domains DROP COLUMN etrn")
        conn.execute("ALTER TABLE accounts DROP COLUMN atrn_wait")
        conn.execute("PRAGMA user_version = 6")
        conn.commit()
    with SQLiteStore(path) as store:
        assert store.migrate() == (6, SCHEMA_VERSION)  # what opening did
        assert store.get_domain("a.example") == Domain("a.example", "acme", max_messages=5)
        assert store.etrn_domains("a.example") == []
        store.update_domain(Domain("a.example", "acme", etrn="h.example:2525"))
        assert store.etrn_domains("a.example") == ["a.example"]
    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_migration_from_version_7(tmp_path: Path) -> None:
    """A store written with schema 7 (no ATRN wait) opens as the current version: its
    accounts do not wait, and can be made to."""
    import dataclasses

    from fermoposta.store.base import Account
    path = tmp_path / "v7.sqlite3"
    with SQLiteStore(path) as store:
        store.add_account(Account("acme", None, None, created_at=1.0))
    with closing(sqlite3.connect(path)) as conn:
        back_to_version_8(conn)
        conn.execute("ALTER TABLE accounts DROP COLUMN atrn_wait")
        conn.execute("PRAGMA user_version = 7")
        conn.commit()
    with SQLiteStore(path) as store:
        assert store.migrate() == (7, SCHEMA_VERSION)
        account = store.get_account("acme")
        assert account is not None and account.atrn_wait is None
        store.update_account(dataclasses.replace(account, atrn_wait=120.0))
        again = store.get_account("acme")
        assert again is not None and again.atrn_wait == 120.0
    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def _schema_of(path: Path) -> tuple[list[Any], list[Any]]:
    """The indexes (name, SQL) and the recipients' columns of a file."""
    return (rows(path, "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                       " ORDER BY name"),
            rows(path, "SELECT name, type, \"notnull\" FROM pragma_table_info('recipients')"
                       " ORDER BY cid"))


def test_migration_from_version_9(tmp_path: Path) -> None:
    """A store written with schema 9 opens as version 10: its messages are
    not known to be in wire form (they are dot-stuffed on the way out, as
    before), new ones say so, and the file matches a new one."""
    path = tmp_path / "v9.sqlite3"
    with SQLiteStore(path) as store:
        old = store.enqueue(msg("x@a.example"), io.BytesIO(b"old\r\n"))
    with closing(sqlite3.connect(path)) as conn:
        back_to_version_9(conn)
    new = tmp_path / "new.sqlite3"
    SQLiteStore(new).close()
    with SQLiteStore(path) as store:
        assert store.migrate() == (9, SCHEMA_VERSION)
        fresh = store.enqueue(NewMessage("s@x.example", (rcpt("y@a.example"),),
                                         MessageOrigin.MX, wire_ready=True),
                              io.BytesIO(b"new\r\n"))
        got = [store.get_message(mid) for mid in (old, fresh)]
    assert [m.wire_ready if m else None for m in got] == [False, True]
    assert _schema_of(path) == _schema_of(new)


def test_migration_from_version_8(tmp_path: Path) -> None:
    """A store written with schema 8 opens as version 9: each recipient gets
    its message's arrival and size (queue stats reads them from the index),
    and the file has the same indexes and columns as a new one."""
    clock = Clock(1_000.0)
    path = tmp_path / "v8.sqlite3"
    with SQLiteStore(path, clock=clock) as store:
        from fermoposta.store.base import Account, Domain
        store.add_account(Account("acme", None, None))
        store.add_domain(Domain("a.example", "acme"))
        first = store.enqueue(msg("x@a.example", "y@a.example"), io.BytesIO(b"12345"))
        clock.now = 1_600.0
        second = store.enqueue(
            NewMessage("s@sender.example", (rcpt("z@a.example"), rcpt("w@b.example", OUTBOUND)),
                       MessageOrigin.MX), io.BytesIO(b"1234567"))
    with closing(sqlite3.connect(path)) as conn:
        back_to_version_8(conn)
    new = tmp_path / "new.sqlite3"
    SQLiteStore(new).close()
    with SQLiteStore(path, clock=clock) as store:
        assert store.migrate() == (8, SCHEMA_VERSION)
        shape = store.queue_shape(1_700.0, [300.0])
    assert rows(path, "SELECT message_id, message_received_at, message_size FROM recipients"
                      " ORDER BY id") == [(first, 1_000.0, 5), (first, 1_000.0, 5),
                                          (second, 1_600.0, 7), (second, 1_600.0, 7)]
    assert _schema_of(path) == _schema_of(new)
    by_domain = {d.domain: d for d in shape.domains}
    a = by_domain["a.example"]
    # Two messages (12 bytes), three recipients: one young (100 s), two old (700 s).
    assert (a.messages, a.recipients, a.bytes, a.oldest, a.held, a.ages) == (
        2, 3, 12, 1_000.0, 3, (1, 2))
    assert (shape.total.messages, shape.total.bytes, shape.total.ages) == (2, 12, (2, 2))


def test_an_atrns_writes_do_not_wait_for_the_disk(path: Path) -> None:
    # `durable=False` (an ATRN's leases and record): the transaction runs at
    # synchronous=NORMAL, and the writer is at FULL again right after, so
    # the next durable commit syncs the WAL, these frames included.
    from fermoposta.store.base import Account
    with SQLiteStore(path) as store:
        store.add_account(Account("acme", None, None))
        statements: list[str] = []
        store._conn.set_trace_callback(statements.append)
        assert store.acquire_leases(["a.example"], "one", 60, atrn_by=("acme", 5.0),
                                    durable=False)
        store.record_atrn("acme", 6.0, durable=False)
        store._conn.set_trace_callback(None)
        normal = [i for i, sql in enumerate(statements) if sql == "PRAGMA synchronous = NORMAL"]
        full = [i for i, sql in enumerate(statements) if sql == "PRAGMA synchronous = FULL"]
        lease = next(i for i, sql in enumerate(statements) if "INTO leases" in sql)
        record = next(i for i, sql in enumerate(statements) if "last_atrn_at" in sql
                      and "6.0" in sql)
        assert len(normal) == 2 and len(full) == 2
        assert normal[0] < lease < full[0] < normal[1] < record < full[1]
        assert store._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        account = store.get_account("acme")
        assert account is not None and account.last_atrn_at == 6.0
        assert not store.acquire_leases(["a.example"], "two", 60)
