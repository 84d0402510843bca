"""`get_domain_now` and `lookup_domain`: the MX's per-RCPT lookup answered on
the event loop when the engine can do it without waiting, else in a thread.
Either way the answer is `get_domain`'s."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest

from fermoposta.store.base import Account, Domain, Store, WouldBlock, lookup_domain
from fermoposta.store.sqlite import SQLiteStore


def _with_domains(store: Store) -> None:
    store.add_account(Account("alice", None, None))
    store.add_domain(Domain("a.example", "alice", max_messages=10,
                            valid_recipients=frozenset({"info"})))


def test_lookup_domain_answers_like_get_domain(store: Store) -> None:
    _with_domains(store)

    async def both() -> tuple[Domain | None, Domain | None]:
        return (await lookup_domain(store, "a.example"),
                await lookup_domain(store, "nowhere.example"))

    hit, miss = asyncio.run(both())
    assert hit == store.get_domain("a.example") and hit is not None
    assert hit.valid_recipients == frozenset({"info"})
    assert miss is None


def test_get_domain_now_per_engine(store: Store, engine: str) -> None:
    _with_domains(store)
    if engine == "postgresql":
        with pytest.raises(WouldBlock):  # a round trip: never on the event loop
            store.get_domain_now("a.example")
        return
    assert store.get_domain_now("a.example") == store.get_domain("a.example")
    assert store.get_domain_now("nowhere.example") is None
    # Without a list of valid recipients: one statement, no transaction.
    store.add_domain(Domain("b.example", "alice", max_bytes=5000, hold_lifetime=3600.0))
    plain = store.get_domain_now("b.example")
    assert plain == store.get_domain("b.example")
    assert plain is not None and plain.valid_recipients is None and plain.max_bytes == 5000


def test_sqlite_now_read_does_not_wait_for_a_writer(tmp_path) -> None:
    path = tmp_path / "fermoposta.sqlite3"
    store = SQLiteStore(path)
    try:
        _with_domains(store)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        other.execute("UPDATE domains SET max_messages = 99")
        started = time.monotonic()
        domain = store.get_domain_now("a.example")  # a WAL reader: at once
        assert time.monotonic() - started < 0.5
        assert domain is not None and domain.max_messages == 10  # the committed state
        other.execute("ROLLBACK")
        other.close()
    finally:
        store.close()


def test_sqlite_now_read_in_use_would_block(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "fermoposta.sqlite3")
    try:
        _with_domains(store)
        entered, leave = threading.Event(), threading.Event()

        def hold_the_connection() -> None:
            with store._read_now():  # another thread's read in progress
                entered.set()
                leave.wait(10)

        thread = threading.Thread(target=hold_the_connection)
        thread.start()
        assert entered.wait(10)
        try:
            with pytest.raises(WouldBlock):
                store.get_domain_now("a.example")
            # lookup_domain then asks in a thread, on the main connection.
            assert asyncio.run(lookup_domain(store, "a.example")) == store.get_domain("a.example")
        finally:
            leave.set()
            thread.join()
        assert store.get_domain_now("a.example") is not None  # free again
    finally:
        store.close()
