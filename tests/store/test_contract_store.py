"""Store contract, the store as a whole: an engine implements every member of
the `Store` Protocol, names its node (and a message the node that accepted
it), reports and migrates its schema, is shared by several stores on the
same data (as several processes or nodes), counts rate events for all of
them, and answers `StoreError` once closed.  Run on every engine."""

from __future__ import annotations

import io
import threading
import typing

import pytest

from fermoposta.smtp.credentials import CredentialsUnavailable
from fermoposta.store.base import Account, Domain, QueueFilter, Store, StoreError

from .contract import Clock, StoreFactory, dsn_for, msg, rcpt_ids


def _protocol_members() -> set[str]:
    names: set[str] = set()
    for cls in Store.__mro__:
        if cls in (object, typing.Protocol, typing.Generic):
            continue
        names.update(n for n in vars(cls) if not n.startswith("_"))
    return names


def test_the_protocol_has_the_members_this_suite_knows() -> None:
    # A guard on the check below: it must look at the real Protocol members.
    assert {"enqueue", "claim_due_outbound", "queue_page", "add_account", "add_event",
            "message_ids", "node", "migrate", "close"} <= _protocol_members()


def test_the_engine_has_every_member_of_the_protocol(store: Store) -> None:
    missing = sorted(n for n in _protocol_members() if not hasattr(store, n))
    assert missing == []
    assert all(callable(getattr(store, n)) for n in _protocol_members() if n != "node")


def test_node_names_the_store_and_its_messages(store_factory: StoreFactory) -> None:
    default = store_factory()
    assert isinstance(default.node, str) and default.node
    a = store_factory(node="node-a")
    b = store_factory(node="node-b")
    assert (a.node, b.node) == ("node-a", "node-b")
    from_a = a.enqueue(msg("x@x.example"), io.BytesIO(b"a"))
    from_b = b.enqueue(msg("y@x.example"), io.BytesIO(b"b"))
    # Each store sees the node that accepted a message, whoever reads it.
    for reader in (a, b, default):
        got_a, got_b = reader.get_message(from_a), reader.get_message(from_b)
        assert got_a is not None and got_a.node == "node-a"
        assert got_b is not None and got_b.node == "node-b"
    entry = b.get_queue_entry(from_a)
    assert entry is not None and entry.message.node == "node-a"
    # A DSN is accepted by the node that queued it.
    dsn_id = b.record_failed(rcpt_ids(b, from_a).values(), "550 no", dsn_for())
    assert dsn_id is not None
    dsn = a.get_message(dsn_id)
    assert dsn is not None and dsn.node == "node-b"


def test_schema_version_and_migrate(store_factory: StoreFactory) -> None:
    first = store_factory()
    version = first.schema_version()
    assert isinstance(version, int) and version >= 1
    before, after = first.migrate()
    assert after == version and before <= after
    # Opening again, or migrating again, finds the schema current.
    second = store_factory()
    assert second.schema_version() == version
    assert second.migrate() == (version, version)
    assert first.migrate()[1] == version


def test_stores_opened_at_once_migrate_safely(store_factory: StoreFactory) -> None:
    stores: list[Store] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_one() -> None:
        try:
            barrier.wait()
            stores.append(store_factory())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert len({s.schema_version() for s in stores}) == 1
    mid = stores[0].enqueue(msg("a@x.example"), io.BytesIO(b"m"))
    assert all(s.message_ids() == [mid] for s in stores)


def test_two_stores_share_the_data(store_factory: StoreFactory) -> None:
    daemon = store_factory()
    cli = store_factory()
    cli.add_account(Account("alice", None, "pw"))
    cli.add_domain(Domain("alice.example", "alice"))
    assert daemon.get_domain("alice.example") == Domain("alice.example", "alice")
    mid = daemon.enqueue(msg("u@alice.example"), io.BytesIO(b"m"))
    assert cli.domain_usage("alice.example") == (1, 1)
    assert cli.held_message_ids(["alice.example"]) == [mid]
    assert daemon.acquire_leases(["alice.example"], "d", 60)
    assert not cli.acquire_leases(["alice.example"], "c", 60)
    assert cli.delete_messages([mid]) == [mid]
    assert daemon.get_message(mid) is None


# --- RateCounter ----------------------------------------------------------------------------


def test_rate_events_in_a_sliding_window(store: Store) -> None:
    assert store.count_events("acct:alice", 0.0) == 0
    assert store.add_event("acct:alice", 100.0, 60.0) == 1
    assert store.add_event("acct:alice", 130.0, 60.0) == 2
    assert store.add_event("acct:bob", 130.0, 60.0) == 1  # keys are separate
    # 100 is not in (100, 160]: it falls out of the window.
    assert store.add_event("acct:alice", 160.0, 60.0) == 2
    assert store.count_events("acct:alice", 0.0) == 2  # the one at 100 is forgotten
    assert store.count_events("acct:alice", 130.0) == 1  # later than `since` only
    assert store.count_events("acct:alice", 129.0) == 2
    assert store.count_events("acct:bob", 0.0) == 1
    assert store.count_events("acct:nobody", 0.0) == 0


def test_events_at_the_same_time_all_count(store: Store) -> None:
    assert [store.add_event("k", 50.0, 10.0) for _ in range(3)] == [1, 2, 3]
    assert store.count_events("k", 49.9) == 3


def test_a_later_event_is_outside_an_earlier_window(store: Store) -> None:
    # Another node's clock may be ahead: its events are after `at`, not in the window.
    store.add_event("k", 100.0, 10.0)
    assert store.add_event("k", 95.0, 10.0) == 1
    assert store.count_events("k", 0.0) == 2  # both are kept: none is older than 85


def test_rate_events_are_shared_by_every_store(store_factory: StoreFactory) -> None:
    one, two = store_factory(), store_factory()
    assert one.add_event("acct:alice", 10.0, 100.0) == 1
    assert two.add_event("acct:alice", 20.0, 100.0) == 2
    assert one.count_events("acct:alice", 0.0) == 2
    counts: list[int] = []
    lock = threading.Lock()

    def burst(s: Store) -> None:
        for i in range(20):
            n = s.add_event("acct:carol", 1000.0 + i, 1e6)
            with lock:
                counts.append(n)

    threads = [threading.Thread(target=burst, args=(s,)) for s in (one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert one.count_events("acct:carol", 0.0) == 40
    assert max(counts) == 40


# --- lifecycle ------------------------------------------------------------------------------


def test_a_closed_store_raises_store_error(store: Store, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"x"))
    store.close()
    store.close()  # closing twice is harmless
    with pytest.raises(StoreError):
        store.get_message(mid)
    with pytest.raises(StoreError):
        store.enqueue(msg("a@x.example"), io.BytesIO(b"x"))
    with pytest.raises(StoreError):
        store.queue_ids(QueueFilter(), None, 10)
    with pytest.raises(StoreError):
        store.get_account("alice")


def test_store_error_is_credentials_unavailable() -> None:
    # The SASL mechanisms know only CredentialsUnavailable: a store failure
    # during an account lookup must fail the AUTH temporarily.
    assert issubclass(StoreError, CredentialsUnavailable)
