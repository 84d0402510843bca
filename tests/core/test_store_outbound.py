"""Store schema 3: the outbound retry schedule, claims, held-mail expiry queries,
per-domain hold lifetime, and the migration from schema 2."""

from __future__ import annotations

import io
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fermoposta.store import (
    Account,
    Domain,
    MessageOrigin,
    NewMessage,
    NewRecipient,
    RecipientState,
    SQLiteStore,
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
    s = SQLiteStore(tmp_path / "store.sqlite3", clock=clock)
    yield s
    s.close()


def msg(*addresses: str, state: RecipientState = OUTBOUND, sender: str = "s@a.example"
        ) -> NewMessage:
    return NewMessage(
        sender=sender,
        recipients=tuple(NewRecipient(a, a.rpartition("@")[2], state) for a in addresses),
        origin=MessageOrigin.SUBMISSION,
    )


def dsn_for(address: str = "s@a.example") -> tuple[NewMessage, io.BytesIO]:
    return (NewMessage("", (NewRecipient(address, "a.example", OUTBOUND),), MessageOrigin.DSN),
            io.BytesIO(b"DSN\r\n"))


def test_claim_due_outbound(store: SQLiteStore, clock: Clock) -> None:
    first = store.enqueue(msg("a@x.example", "b@y.example"), io.BytesIO(b"1"))
    store.enqueue(msg("held@h.example", state=HELD), io.BytesIO(b"2"))
    third = store.enqueue(msg("c@x.example"), io.BytesIO(b"3"))
    claimed = store.claim_due_outbound(clock.now, 10, "one", 60)
    assert [(m.id, [r.address for r in m.recipients]) for m in claimed] == [
        (first, ["a@x.example", "b@y.example"]), (third, ["c@x.example"])]
    # Claimed: invisible to another runner until the claim expires.
    assert store.claim_due_outbound(clock.now, 10, "two", 60) == []
    assert store.claim_due_outbound(clock.now + 59, 10, "two", 60) == []
    again = store.claim_due_outbound(clock.now + 61, 10, "two", 60)
    assert sum(len(m.recipients) for m in again) == 3


def test_claim_limit_and_order(store: SQLiteStore, clock: Clock) -> None:
    ids = [store.enqueue(msg(f"r{i}@x.example"), io.BytesIO(b"b")) for i in range(5)]
    got = store.claim_due_outbound(clock.now, 2, "one", 60)
    assert [m.id for m in got] == ids[:2]
    got = store.claim_due_outbound(clock.now, 10, "one", 60)
    assert [m.id for m in got] == ids[2:]
    assert store.claim_due_outbound(clock.now, 0, "one", 60) == []


def test_deferred_schedule_and_claim_release(store: SQLiteStore, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example", "b@x.example"), io.BytesIO(b"b"))
    [m] = store.claim_due_outbound(clock.now, 10, "one", 60)
    a, b = (r.id for r in m.recipients)
    store.record_deferred([a, b], "451 4.4.1 later", {a: clock.now + 100, b: clock.now + 200})
    got = store.get_message(mid)
    assert got is not None
    ra, rb = got.recipients
    assert (ra.attempts, ra.next_attempt_at, ra.first_failure_at) == (1, clock.now + 100, clock.now)
    assert rb.next_attempt_at == clock.now + 200 and rb.last_reply == "451 4.4.1 later"
    assert store.claim_due_outbound(clock.now + 99, 10, "one", 60) == []
    [due] = store.claim_due_outbound(clock.now + 150, 10, "two", 60)
    assert [r.id for r in due.recipients] == [a]
    clock.now += 300
    store.record_deferred([a], "452 again", clock.now + 50)
    got = store.get_message(mid)
    assert got is not None
    assert got.recipients[0].first_failure_at == clock.now - 300  # the first one is kept
    assert got.recipients[0].attempts == 2
    # Old callers (the drain) still work: no schedule given.
    store.record_deferred([b], "450 x")


def test_release_and_renew_claims(store: SQLiteStore, clock: Clock) -> None:
    store.enqueue(msg("a@x.example"), io.BytesIO(b"b"))
    store.enqueue(msg("b@x.example"), io.BytesIO(b"b"))
    assert len(store.claim_due_outbound(clock.now, 1, "one", 60)) == 1
    assert len(store.claim_due_outbound(clock.now, 1, "two", 60)) == 1
    store.renew_claims("one", clock.now + 50, 60)
    assert store.claim_due_outbound(clock.now + 70, 10, "three", 60) != []  # two's expired
    assert store.claim_due_outbound(clock.now + 100, 10, "three", 60) == []  # one's renewed
    store.release_claims("one")
    [m] = store.claim_due_outbound(clock.now + 100, 10, "three", 60)
    assert m.recipients[0].address == "a@x.example"


def test_two_stores_never_claim_the_same_recipient(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    with SQLiteStore(path) as setup:
        for i in range(200):
            setup.enqueue(msg(f"r{i}@x.example"), io.BytesIO(b"b"))
    results: dict[str, list[int]] = {"one": [], "two": []}
    # Both runners stay open until both are done: the claims of a store that
    # has closed (a runner that is gone) are free again at once.
    stores = {owner: SQLiteStore(path) for owner in results}

    def runner(owner: str) -> None:
        while True:
            got = stores[owner].claim_due_outbound(2e9, 7, owner, 600)
            if not got:
                return
            results[owner] += [r.id for m in got for r in m.recipients]

    threads = [threading.Thread(target=runner, args=(o,)) for o in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores.values():
        s.close()
    both = results["one"] + results["two"]
    assert len(both) == 200 and len(set(both)) == 200


def test_due_query_uses_the_index(store: SQLiteStore) -> None:
    plan = " ".join(
        str(row[-1]) for row in store._conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM recipients WHERE state = ?"
            " AND COALESCE(next_attempt_at, 0) <= ?"
            " AND (claimed_until IS NULL OR claimed_until <= ?)"
            " ORDER BY COALESCE(next_attempt_at, 0), id LIMIT ?", ("outbound", 1, 1, 10))
    )
    assert "recipients_due" in plan and "TEMP B-TREE" not in plan


def test_failed_twice_reports_once(store: SQLiteStore, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"b"))
    [m] = store.claim_due_outbound(clock.now, 10, "one", 60)
    rid = m.recipients[0].id
    assert store.record_failed([rid], "550 no", dsn_for()) is not None
    assert store.get_message(mid) is None
    # Already gone: no second DSN.
    assert store.record_failed([rid], "550 no", dsn_for()) is None


def test_mark_delay_notified(store: SQLiteStore) -> None:
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"b"))
    got = store.get_message(mid)
    assert got is not None and not got.recipients[0].delay_notified
    rid = got.recipients[0].id
    first = store.mark_delay_notified([rid], dsn_for())
    assert first is not None
    assert store.mark_delay_notified([rid], dsn_for()) is None  # once only
    got = store.get_message(mid)
    assert got is not None and got.recipients[0].delay_notified


def test_held_older_than(store: SQLiteStore, clock: Clock) -> None:
    store.add_account(Account("acme", None, None))
    store.add_domain(Domain("long.example", "acme", hold_lifetime=1e6))
    store.add_domain(Domain("short.example", "acme"))
    old = store.enqueue(msg("a@short.example", "b@long.example", "c@out.example", state=HELD),
                        io.BytesIO(b"b"))
    clock.now += 100
    young = store.enqueue(msg("d@short.example", state=HELD), io.BytesIO(b"b"))
    found = store.held_older_than(clock.now, 10)
    assert [(m.id, [r.address for r in m.recipients]) for m in found] == [
        (old, ["a@short.example", "b@long.example", "c@out.example"])]
    assert [m.id for m in store.held_older_than(clock.now + 1, 1)] == [old]
    found = store.held_older_than(clock.now + 1, 10, default_lifetime_only=True)
    assert [[r.address for r in m.recipients] for m in found] == [
        ["a@short.example", "c@out.example"], ["d@short.example"]]
    assert young in [m.id for m in found]
    found = store.held_older_than(clock.now + 1, 10, domains=["long.example"])
    assert [[r.address for r in m.recipients] for m in found] == [["b@long.example"]]
    # A leased domain belongs to its ATRN session.
    assert store.acquire_leases(["short.example"], "sess", 60)
    found = store.held_older_than(clock.now + 1, 10)
    assert [[r.address for r in m.recipients] for m in found] == [
        ["b@long.example", "c@out.example"]]
    store.release_leases("sess")
    ids = [r.id for r in store.held_older_than(clock.now, 10)[0].recipients]
    store.mark_delay_notified(ids[:1])
    found = store.held_older_than(clock.now, 10, delay_notified=False)
    assert [r.id for r in found[0].recipients] == ids[1:]
    assert store.held_older_than(clock.now, 10, domains=[]) == []
    assert store.outbound_older_than(clock.now + 1, 10) == []


def test_outbound_older_than(store: SQLiteStore, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example", "h@h.example"), io.BytesIO(b"b"))
    store.enqueue(msg("h@h.example", state=HELD), io.BytesIO(b"b"))
    assert store.outbound_older_than(clock.now, 10) == []
    [m] = store.outbound_older_than(clock.now + 1, 10)
    assert m.id == mid and [r.address for r in m.recipients] == ["a@x.example", "h@h.example"]


def test_domain_hold_lifetime_round_trip(store: SQLiteStore) -> None:
    store.add_account(Account("acme", None, None))
    store.add_domain(Domain("a.example", "acme", hold_lifetime=86400.0))
    assert store.get_domain("a.example") == Domain("a.example", "acme", hold_lifetime=86400.0)
    store.update_domain(Domain("a.example", "acme"))
    got = store.get_domain("a.example")
    assert got is not None and got.hold_lifetime is None


# Version 2 = version 1 (see test_store_sqlite.py) plus account_cert_subjects.
_SCHEMA_V2_EXTRA = """
CREATE TABLE IF NOT EXISTS account_cert_subjects (
    subject TEXT PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS account_cert_subjects_account ON account_cert_subjects(account);
"""


def test_migration_from_version_2(tmp_path: Path) -> None:
    """A store written with schema 2 opens with its data as version 3; queued
    OUTBOUND recipients are due at once, HELD ones keep waiting."""
    from test_store_sqlite import _SCHEMA_V1

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
    assert check.execute("PRAGMA user_version").fetchone()[0] == 6
    indexes = {r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"recipients_due", "recipients_claimed_by", "messages_received"} <= indexes
    check.close()
