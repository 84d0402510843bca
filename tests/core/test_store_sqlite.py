"""Tests of the SQLite store engine (fermoposta.store.sqlite)."""

from __future__ import annotations

import io
import os
import sqlite3
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fermoposta.store import (
    CHUNK_SIZE,
    Account,
    Domain,
    MessageOrigin,
    NewMessage,
    NewRecipient,
    RecipientState,
    ScramSecret,
    SQLiteStore,
    Store,
    StoreError,
    open_store,
)

HELD = RecipientState.HELD
OUTBOUND = RecipientState.OUTBOUND


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "q" / "store.sqlite3", clock=clock)
    yield s
    s.close()


def rcpt(address: str, state: RecipientState = HELD) -> NewRecipient:
    return NewRecipient(address=address, domain=address.rpartition("@")[2].lower(), state=state)


def msg(*addresses: str, sender: str = "s@sender.example") -> NewMessage:
    return NewMessage(
        sender=sender, recipients=tuple(rcpt(a) for a in addresses), origin=MessageOrigin.MX
    )


def body_of(store: SQLiteStore, message_id: str) -> bytes:
    return b"".join(store.read_body(message_id))


def rcpt_ids(store: SQLiteStore, message_id: str) -> dict[str, int]:
    m = store.get_message(message_id)
    assert m is not None
    return {r.address: r.id for r in m.recipients}


def test_is_a_store(store: SQLiteStore) -> None:
    s: Store = store  # structural check by mypy
    assert s is store


def test_enqueue_and_read_back_multichunk(store: SQLiteStore, clock: Clock) -> None:
    data = os.urandom(CHUNK_SIZE * 2 + 12345)
    message = NewMessage(
        sender="",
        recipients=(
            NewRecipient(
                "A@Ex.Example",
                "ex.example",
                HELD,
                notify="SUCCESS,FAILURE",
                orcpt="rfc822;A@Ex.Example",
            ),
        ),
        origin=MessageOrigin.MX,
        smtputf8=True,
        body_8bit=True,
        envid="ENV1",
        ret="HDRS",
        client="mx.peer[192.0.2.1]",
    )
    mid = store.enqueue(message, io.BytesIO(data))
    assert len(mid) == 12 and mid == mid.upper() and int(mid, 16) >= 0
    chunks = list(store.read_body(mid))
    assert len(chunks) == 3 and all(len(c) <= CHUNK_SIZE for c in chunks)
    assert b"".join(chunks) == data
    q = store.get_message(mid)
    assert q is not None
    assert (q.sender, q.size, q.received_at, q.origin) == (
        "",
        len(data),
        clock.now,
        MessageOrigin.MX,
    )
    assert (q.smtputf8, q.body_8bit, q.envid, q.ret, q.client) == (
        True,
        True,
        "ENV1",
        "HDRS",
        "mx.peer[192.0.2.1]",
    )
    (r,) = q.recipients
    assert (r.address, r.domain, r.state, r.attempts, r.last_reply) == (
        "A@Ex.Example",
        "ex.example",
        HELD,
        0,
        None,
    )
    assert (r.notify, r.orcpt) == ("SUCCESS,FAILURE", "rfc822;A@Ex.Example")


def test_empty_body(store: SQLiteStore) -> None:
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b""))
    assert list(store.read_body(mid)) == []
    m = store.get_message(mid)
    assert m is not None and m.size == 0


def test_unknown_message(store: SQLiteStore) -> None:
    assert store.get_message("000000000000") is None
    with pytest.raises(StoreError):
        store.read_body("000000000000")


def test_read_body_raises_if_message_vanishes(store: SQLiteStore) -> None:
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"x" * (CHUNK_SIZE + 1)))
    it = store.read_body(mid)
    next(it)
    store.record_delivered(rcpt_ids(store, mid).values(), "250 ok")
    with pytest.raises(StoreError):
        next(it)


def test_queue_id_collision_retries(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import secrets

    values = iter(["aaaaaaaaaaaa", "aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(values))
    first = store.enqueue(msg("a@x.example"), io.BytesIO(b"1"))
    second = store.enqueue(msg("a@x.example"), io.BytesIO(b"2"))
    assert (first, second) == ("AAAAAAAAAAAA", "BBBBBBBBBBBB")
    assert body_of(store, second) == b"2"


def test_durable_and_visible_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    s1 = SQLiteStore(path)
    mid = s1.enqueue(msg("a@x.example"), io.BytesIO(b"hello"))
    s1.close()
    s2 = SQLiteStore(path)
    assert body_of(s2, mid) == b"hello"
    assert s2.held_message_ids(["x.example"]) == [mid]
    mode = s2._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert s2._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert s2._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    s2.close()


def test_invisible_until_enqueue_returns(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    writer = SQLiteStore(path)
    reader = SQLiteStore(path)
    seen: list[list[str]] = []

    class Body(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            seen.append(reader.held_message_ids(["x.example"]))
            return super().read(size)

    mid = writer.enqueue(msg("a@x.example"), Body(b"z" * (CHUNK_SIZE + 10)))
    assert seen and all(s == [] for s in seen)
    assert reader.held_message_ids(["x.example"]) == [mid]
    writer.close()
    reader.close()


def test_failed_body_read_leaves_nothing(store: SQLiteStore) -> None:
    class Broken(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            if self.tell() > 0:
                raise OSError("disk gone")
            return super().read(size)

    with pytest.raises(StoreError):
        store.enqueue(msg("a@x.example"), Broken(b"x" * (CHUNK_SIZE * 2)))
    assert store.held_message_ids(["x.example"]) == []
    assert store._conn.execute("SELECT COUNT(*) FROM body_chunks").fetchone()[0] == 0
    assert store._conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_selection_per_domain_and_state(store: SQLiteStore, clock: Clock) -> None:
    m1 = store.enqueue(msg("a@one.example", "b@two.example"), io.BytesIO(b"12345"))
    clock.now += 1
    m2 = store.enqueue(msg("c@two.example"), io.BytesIO(b"123"))
    clock.now += 1
    m3 = store.enqueue(
        NewMessage("", (rcpt("d@one.example", OUTBOUND),), MessageOrigin.DSN), io.BytesIO(b"x")
    )
    clock.now += 1
    m4 = store.enqueue(
        NewMessage("", (rcpt("e@one.example", RecipientState.HOLD),), MessageOrigin.MX),
        io.BytesIO(b"x"),
    )
    assert store.held_message_ids(["one.example"]) == [m1]
    assert store.held_message_ids(["two.example"]) == [m1, m2]
    assert store.held_message_ids(["two.example", "one.example"]) == [m1, m2]
    assert store.held_message_ids(["three.example"]) == []
    assert store.held_message_ids([]) == []
    assert store.domains_with_held_mail(["one.example", "two.example", "x.example"]) == {
        "one.example",
        "two.example",
    }
    assert store.domain_usage("two.example") == (2, 8)
    assert store.domain_usage("one.example") == (1, 5)
    assert store.domain_usage("none.example") == (0, 0)
    assert m3 not in store.held_message_ids(["one.example"])
    assert m4 not in store.held_message_ids(["one.example"])


def test_order_ties_broken_by_id(store: SQLiteStore) -> None:
    ids = [store.enqueue(msg("a@x.example"), io.BytesIO(b"")) for _ in range(5)]
    assert store.held_message_ids(["x.example"]) == sorted(ids)


def test_delivered_keeps_other_recipients_then_deletes(store: SQLiteStore) -> None:
    mid = store.enqueue(msg("a@one.example", "b@two.example"), io.BytesIO(b"body"))
    ids = rcpt_ids(store, mid)
    store.record_delivered([ids["a@one.example"]], "250 2.0.0 ok")
    m = store.get_message(mid)
    assert m is not None and [r.address for r in m.recipients] == ["b@two.example"]
    assert store.held_message_ids(["one.example"]) == []
    assert store.held_message_ids(["two.example"]) == [mid]
    assert body_of(store, mid) == b"body"
    store.record_delivered([ids["b@two.example"]], "250 2.0.0 ok")
    assert store.get_message(mid) is None
    assert store._conn.execute("SELECT COUNT(*) FROM body_chunks").fetchone()[0] == 0
    store.record_delivered([ids["b@two.example"]], "250 again")  # idempotent
    store.record_delivered([], "250")


def test_deferred(store: SQLiteStore, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example", "b@x.example"), io.BytesIO(b"b"))
    ids = rcpt_ids(store, mid)
    store.record_deferred([ids["a@x.example"]], "451 4.3.0 later")
    store.record_deferred([ids["a@x.example"]], "452 4.2.2 full")
    m = store.get_message(mid)
    assert m is not None
    a, b = m.recipients
    assert (a.attempts, a.last_reply, a.state) == (2, "452 4.2.2 full", HELD)
    assert (b.attempts, b.last_reply) == (0, None)


def test_failed_with_dsn_is_atomic(store: SQLiteStore) -> None:
    mid = store.enqueue(msg("a@x.example", "b@x.example"), io.BytesIO(b"orig"))
    ids = rcpt_ids(store, mid)
    dsn = NewMessage("", (rcpt("s@sender.example", OUTBOUND),), MessageOrigin.DSN)

    class Broken(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.record_failed(ids.values(), "550 5.1.1 no", (dsn, Broken()))
    m = store.get_message(mid)
    assert m is not None and len(m.recipients) == 2  # nothing changed
    assert store._conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1

    dsn_id = store.record_failed([ids["a@x.example"]], "550 5.1.1 no", (dsn, io.BytesIO(b"DSN")))
    assert dsn_id is not None and dsn_id != mid
    assert body_of(store, dsn_id) == b"DSN"
    d = store.get_message(dsn_id)
    assert d is not None and d.origin == MessageOrigin.DSN and d.recipients[0].state == OUTBOUND
    m = store.get_message(mid)
    assert m is not None and [r.address for r in m.recipients] == ["b@x.example"]
    assert store.record_failed([ids["b@x.example"]], "550", None) is None
    assert store.get_message(mid) is None


def test_leases(store: SQLiteStore, clock: Clock) -> None:
    assert store.acquire_leases(["a.example", "b.example"], "one", 60)
    assert store.acquire_leases(["a.example"], "one", 60)  # re-entrant for its owner
    # all or nothing: c is free but b is taken
    assert not store.acquire_leases(["c.example", "b.example"], "two", 60)
    assert store.acquire_leases(["c.example"], "three", 60)
    assert not store.acquire_leases(["c.example"], "two", 60)
    clock.now += 50
    store.renew_leases("one", 60)
    clock.now += 30  # one's leases still valid (renewed), three's expired
    assert not store.acquire_leases(["a.example"], "two", 60)
    assert store.acquire_leases(["c.example"], "two", 60)  # expired: taken over
    store.renew_leases("three", 60)  # lost it: renewing does not steal it back
    assert not store.acquire_leases(["c.example"], "three", 60)
    store.release_leases("one")
    assert store.acquire_leases(["a.example", "b.example"], "two", 60)
    assert store.acquire_leases([], "four", 60)


def test_lease_race_between_threads(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    stores = [SQLiteStore(path) for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    results: list[bool] = [False] * len(stores)

    def grab(i: int) -> None:
        barrier.wait()
        results[i] = stores[i].acquire_leases(["x.example", "y.example"], f"owner{i}", 60)

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 1
    for s in stores:
        s.close()


def test_two_stores_on_one_file(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    daemon = SQLiteStore(path)
    cli = SQLiteStore(path)
    cli.add_account(Account("alice", None, "pw"))
    cli.add_domain(Domain("alice.example", "alice"))
    assert daemon.get_domain("alice.example") == Domain("alice.example", "alice")
    mid = daemon.enqueue(msg("u@alice.example"), io.BytesIO(b"m"))
    assert cli.domain_usage("alice.example") == (1, 1)
    assert cli.held_message_ids(["alice.example"]) == [mid]
    assert daemon.acquire_leases(["alice.example"], "d", 60)
    assert not cli.acquire_leases(["alice.example"], "c", 60)
    daemon.close()
    cli.close()


def test_concurrent_enqueue_threads(store: SQLiteStore) -> None:
    def work() -> None:
        for _ in range(10):
            store.enqueue(msg("a@x.example"), io.BytesIO(b"x" * 1000))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.domain_usage("x.example") == (40, 40_000)


def test_accounts_crud(store: SQLiteStore, clock: Clock) -> None:
    scram = ScramSecret(b"salt", 4096, b"s" * 32, b"k" * 32)
    alice = Account("alice", scram, "secret", ("ab" * 32,))
    store.add_account(alice)
    got = store.get_account("alice")
    assert got is not None
    assert (got.scram, got.cram_secret, got.cert_fingerprints) == (scram, "secret", ("ab" * 32,))
    assert got.created_at == clock.now and got.last_atrn_at is None
    with pytest.raises(ValueError):
        store.add_account(Account("alice", None, None))
    with pytest.raises(ValueError):  # certificate already bound to alice
        store.add_account(Account("bob", None, None, ("ab" * 32,)))
    assert store.get_account("bob") is None
    store.add_account(Account("bob", None, None))
    assert [a.name for a in store.list_accounts()] == ["alice", "bob"]
    fp = store.account_by_fingerprint("AB" * 32)
    assert fp is not None and fp.name == "alice"
    assert store.account_by_fingerprint("cd" * 32) is None
    store.update_account(Account("bob", scram, None, ("cd" * 32,)))
    bob = store.get_account("bob")
    assert bob is not None and bob.scram == scram and bob.cert_fingerprints == ("cd" * 32,)
    with pytest.raises(ValueError):
        store.update_account(Account("carol", None, None))
    store.record_atrn("alice", 1234.5)
    got = store.get_account("alice")
    assert got is not None and got.last_atrn_at == 1234.5


def test_account_cert_subjects(store: SQLiteStore) -> None:
    subject = "CN=customer@example.org,O=Example Ltd"
    alice = Account("alice", None, None, ("ab" * 32,), cert_subjects=(subject, "CN=second"))
    store.add_account(alice)
    got = store.get_account("alice")
    assert got is not None
    assert got.cert_subjects == ("CN=customer@example.org,O=Example Ltd", "CN=second")
    by_subject = store.account_by_subject(subject)
    assert by_subject is not None and by_subject.name == "alice"
    assert by_subject.cert_fingerprints == ("ab" * 32,)
    assert store.account_by_subject(subject.upper()) is None  # compared exactly
    assert store.account_by_subject("CN=nobody") is None
    with pytest.raises(ValueError, match="already bound to account 'alice'"):
        store.add_account(Account("bob", None, None, cert_subjects=(subject,)))
    assert store.get_account("bob") is None  # nothing of bob was written
    store.add_account(Account("bob", None, None))
    with pytest.raises(ValueError, match="already bound"):
        store.update_account(Account("bob", None, None, cert_subjects=("CN=second",)))
    bob = store.get_account("bob")
    assert bob is not None and bob.cert_subjects == ()
    # update_account replaces the bindings (duplicates collapse).
    store.update_account(
        Account("alice", None, None, (), cert_subjects=("CN=third", "CN=third", subject))
    )
    got = store.get_account("alice")
    assert got is not None and got.cert_fingerprints == ()
    assert got.cert_subjects == ("CN=customer@example.org,O=Example Ltd", "CN=third")
    assert store.account_by_subject("CN=second") is None
    store.update_account(Account("bob", None, None, cert_subjects=("CN=second",)))
    assert [a.cert_subjects for a in store.list_accounts()] == [got.cert_subjects, ("CN=second",)]
    assert store.remove_account("alice")
    assert store.account_by_subject(subject) is None
    store.add_account(Account("carol", None, None, cert_subjects=(subject,)))  # free again
    carol = store.account_by_subject(subject)
    assert carol is not None and carol.name == "carol"


def test_domains_crud(store: SQLiteStore) -> None:
    store.add_account(Account("alice", None, None))
    store.add_account(Account("bob", None, None))
    store.add_domain(Domain("a.example", "alice", max_messages=10, max_bytes=1000))
    store.add_domain(Domain("b.example", "alice", valid_recipients=frozenset({"Info", "sales"})))
    store.add_domain(Domain("c.example", "bob"))
    with pytest.raises(ValueError):
        store.add_domain(Domain("a.example", "bob"))
    with pytest.raises(ValueError):
        store.add_domain(Domain("d.example", "nobody"))
    assert store.get_domain("a.example") == Domain("a.example", "alice", 10, 1000, None)
    b = store.get_domain("b.example")
    assert b is not None and b.valid_recipients == frozenset({"info", "sales"})
    assert [d.name for d in store.list_domains()] == ["a.example", "b.example", "c.example"]
    assert [d.name for d in store.list_domains("alice")] == ["a.example", "b.example"]
    store.update_domain(Domain("b.example", "bob", valid_recipients=None))
    assert store.get_domain("b.example") == Domain("b.example", "bob")
    with pytest.raises(ValueError):
        store.update_domain(Domain("z.example", "bob"))
    assert store.remove_domain("c.example")
    assert not store.remove_domain("c.example")
    assert store.get_domain("c.example") is None


def test_remove_account_keeps_mail(store: SQLiteStore) -> None:
    store.add_account(Account("alice", None, None, ("ab" * 32,)))
    store.add_domain(Domain("a.example", "alice", valid_recipients=frozenset({"x"})))
    mid = store.enqueue(msg("x@a.example"), io.BytesIO(b"keep"))
    assert store.remove_account("alice")
    assert not store.remove_account("alice")
    assert store.get_domain("a.example") is None
    assert store.account_by_fingerprint("ab" * 32) is None
    assert store.held_message_ids(["a.example"]) == [mid]
    assert body_of(store, mid) == b"keep"


def test_errors_are_store_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(StoreError):
        SQLiteStore(blocker / "s.sqlite3")
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        SQLiteStore(garbage)
    s = SQLiteStore(tmp_path / "ok.sqlite3")
    s.close()
    s.close()
    with pytest.raises(StoreError):
        s.get_message("X")


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="schema version"):
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
    """A store written by fermoposta with schema 1 opens with its data, as version 3."""
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
    assert check.execute("PRAGMA user_version").fetchone()[0] == 6
    tables = {r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "account_cert_subjects" in tables
    lease_columns = {r[1] for r in check.execute("PRAGMA table_info(leases)")}
    assert "holder" in lease_columns
    check.close()
    with SQLiteStore(path) as again:  # already current: nothing to do
        assert again.account_by_subject("CN=alice") is not None


def test_new_store_has_version_6(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 6
    conn.close()


def test_open_store(tmp_path: Path) -> None:
    s = open_store(tmp_path / "data")
    assert (tmp_path / "data" / "fermoposta.sqlite3").exists()
    s.close()


class _Stream(io.RawIOBase):
    """`size` bytes produced on the fly, never all in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = b"m" * n
        self.left -= n
        return n


def test_big_body_bounded_memory(store: SQLiteStore) -> None:
    size = 50 * 1024 * 1024
    tracemalloc.start()
    try:
        mid = store.enqueue(msg("a@x.example"), io.BufferedReader(_Stream(size)))
        total = 0
        for chunk in store.read_body(mid):
            assert chunk == b"m" * len(chunk)
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert peak < 10 * 1024 * 1024
    m = store.get_message(mid)
    assert m is not None and m.size == size
