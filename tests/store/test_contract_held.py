"""Store contract, held mail and domain leases: which messages a customer's
domains hold (oldest first, ties by id), quota usage, held-mail expiry
queries, delay notices, and all-or-nothing expiring leases that never let
two ATRN sessions drain one domain, across stores.  Run on every engine."""

from __future__ import annotations

import io
import threading

import pytest

from fermoposta.store.base import (
    Account,
    Domain,
    MessageOrigin,
    NewMessage,
    Store,
)

from .contract import HELD, HOLD, OUTBOUND, Clock, StoreFactory, dsn_for, msg, rcpt, rcpt_ids


def test_selection_per_domain_and_state(store: Store, clock: Clock) -> None:
    m1 = store.enqueue(msg("a@one.example", "b@two.example"), io.BytesIO(b"12345"))
    clock.now += 1
    m2 = store.enqueue(msg("c@two.example"), io.BytesIO(b"123"))
    clock.now += 1
    m3 = store.enqueue(
        NewMessage("", (rcpt("d@one.example", OUTBOUND),), MessageOrigin.DSN), io.BytesIO(b"x")
    )
    clock.now += 1
    m4 = store.enqueue(NewMessage("", (rcpt("e@one.example", HOLD),), MessageOrigin.MX),
                       io.BytesIO(b"x"))
    assert store.held_message_ids(["one.example"]) == [m1]
    assert store.held_message_ids(["two.example"]) == [m1, m2]
    assert store.held_message_ids(["two.example", "one.example"]) == [m1, m2]
    assert store.held_message_ids(["three.example"]) == []
    assert store.held_message_ids([]) == []
    assert store.domains_with_held_mail(["one.example", "two.example", "x.example"]) == {
        "one.example",
        "two.example",
    }
    assert store.domains_with_held_mail([]) == set()
    assert store.domain_usage("two.example") == (2, 8)
    assert store.domain_usage("one.example") == (1, 5)  # OUTBOUND and HOLD are not held
    assert store.domain_usage("none.example") == (0, 0)
    assert m3 not in store.held_message_ids(["one.example"])
    assert m4 not in store.held_message_ids(["one.example"])


def test_held_message_ids_oldest_first(store: Store, clock: Clock) -> None:
    late = store.enqueue(msg("a@x.example"), io.BytesIO(b""))
    clock.now -= 100
    early = store.enqueue(msg("b@x.example"), io.BytesIO(b""))
    assert store.held_message_ids(["x.example"]) == [early, late]


def test_order_ties_broken_by_id(store: Store) -> None:
    ids = [store.enqueue(msg("a@x.example"), io.BytesIO(b"")) for _ in range(5)]
    assert store.held_message_ids(["x.example"]) == sorted(ids)


def test_many_domains_at_once(store: Store) -> None:
    # More domains than one SQL statement may bind on some engines.
    domains = [f"d{i}.example" for i in range(1200)]
    wanted = {domains[0], domains[777], domains[-1]}
    ids = {d: store.enqueue(msg(f"u@{d}"), io.BytesIO(b"m")) for d in sorted(wanted)}
    assert store.domains_with_held_mail(domains) == wanted
    assert sorted(store.held_message_ids(domains)) == sorted(ids.values())


def test_a_message_counts_once_per_domain(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example", "b@x.example", "c@x.example"), io.BytesIO(b"abcd"))
    assert store.domain_usage("x.example") == (1, 4)
    assert store.held_message_ids(["x.example"]) == [mid]


def test_delivered_recipients_leave_the_usage(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example", "b@y.example"), io.BytesIO(b"abcd"))
    ids = rcpt_ids(store, mid)
    store.record_delivered([ids["a@x.example"]], "250 ok")
    assert store.domain_usage("x.example") == (0, 0)
    assert store.domain_usage("y.example") == (1, 4)
    assert store.domains_with_held_mail(["x.example", "y.example"]) == {"y.example"}


# --- expiry of held mail --------------------------------------------------------------------


def test_held_older_than(store: Store, clock: Clock) -> None:
    store.add_account(Account("acme", None, None))
    store.add_domain(Domain("long.example", "acme", hold_lifetime=1e6))
    store.add_domain(Domain("short.example", "acme"))
    old = store.enqueue(msg("a@short.example", "b@long.example", "c@out.example"),
                        io.BytesIO(b"b"))
    clock.now += 100
    young = store.enqueue(msg("d@short.example"), io.BytesIO(b"b"))
    found = store.held_older_than(clock.now, 10)
    assert [(m.id, [r.address for r in m.recipients]) for m in found] == [
        (old, ["a@short.example", "b@long.example", "c@out.example"])]
    assert [m.id for m in store.held_older_than(clock.now + 1, 1)] == [old]
    assert store.held_older_than(clock.now + 1, 0) == []
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
    found = store.held_older_than(clock.now, 10, delay_notified=True)
    assert [r.id for r in found[0].recipients] == ids[:1]
    assert store.held_older_than(clock.now, 10, domains=[]) == []
    assert store.outbound_older_than(clock.now + 1, 10) == []


def test_held_older_than_counts_recipients_and_keeps_message_fields(store: Store,
                                                                    clock: Clock) -> None:
    first = store.enqueue(msg("a@x.example", "b@x.example", sender="first@s.example"),
                          io.BytesIO(b"12"))
    clock.now += 1
    second = store.enqueue(msg("c@x.example"), io.BytesIO(b"123"))
    # `limit` counts recipients, not messages.
    found = store.held_older_than(clock.now + 1, 2)
    assert [(m.id, len(m.recipients)) for m in found] == [(first, 2)]
    found = store.held_older_than(clock.now + 1, 3)
    assert [(m.id, len(m.recipients)) for m in found] == [(first, 2), (second, 1)]
    assert (found[0].sender, found[0].size) == ("first@s.example", 2)
    assert all(r.state == HELD for m in found for r in m.recipients)


def test_held_older_than_skips_other_states(store: Store, clock: Clock) -> None:
    store.enqueue(msg("a@x.example", state=OUTBOUND), io.BytesIO(b"1"))
    store.enqueue(msg("b@x.example", state=HOLD), io.BytesIO(b"2"))
    assert store.held_older_than(clock.now + 1, 10) == []


def test_held_older_than_refuses_too_many_domains(store: Store, clock: Clock) -> None:
    store.enqueue(msg("a@d1.example"), io.BytesIO(b"1"))
    five_hundred = [f"d{i}.example" for i in range(500)]
    assert len(store.held_older_than(clock.now + 1, 10, domains=five_hundred)) == 1
    with pytest.raises(ValueError):
        store.held_older_than(clock.now + 1, 10, domains=[*five_hundred, "more.example"])


def test_an_expired_lease_no_longer_hides_held_mail(store: Store, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"1"))
    assert store.acquire_leases(["x.example"], "sess", 60)
    assert store.held_older_than(clock.now + 1, 10) == []
    clock.now += 61
    assert [m.id for m in store.held_older_than(clock.now, 10)] == [mid]


def test_mark_delay_notified_once(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example", "b@x.example"), io.BytesIO(b"b"))
    ids = rcpt_ids(store, mid)
    got = store.get_message(mid)
    assert got is not None and not any(r.delay_notified for r in got.recipients)
    first = store.mark_delay_notified([ids["a@x.example"]], dsn_for())
    assert first is not None and first != mid
    d = store.get_message(first)
    assert d is not None and d.origin == MessageOrigin.DSN
    assert [(r.address, r.state) for r in d.recipients] == [("s@sender.example", OUTBOUND)]
    assert store.mark_delay_notified([ids["a@x.example"]], dsn_for()) is None  # once only
    got = store.get_message(mid)
    assert got is not None
    assert [r.delay_notified for r in got.recipients] == [True, False]
    # One still unnotified is enough for the notice.
    assert store.mark_delay_notified(ids.values(), dsn_for()) is not None
    assert store.mark_delay_notified([], dsn_for()) is None
    assert store.mark_delay_notified([ids["b@x.example"]]) is None  # no DSN given: none queued


def test_mark_delay_notified_of_gone_recipients_queues_nothing(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"b"))
    ids = list(rcpt_ids(store, mid).values())
    store.record_delivered(ids, "250 ok")
    assert store.mark_delay_notified(ids, dsn_for()) is None
    assert store.message_ids() == []


# --- leases ---------------------------------------------------------------------------------


def test_leases(store: Store, clock: Clock) -> None:
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


def test_a_refused_lease_takes_nothing(store: Store) -> None:
    assert store.acquire_leases(["b.example"], "one", 60)
    assert not store.acquire_leases(["a.example", "b.example"], "two", 60)
    # a.example was not leased to "two" by the refused call.
    assert store.acquire_leases(["a.example"], "three", 60)


def test_leases_taken_record_the_atrn_in_the_same_transaction(store: Store) -> None:
    store.add_account(Account("alice", None, None))
    store.add_account(Account("bob", None, None))
    assert store.acquire_leases(["a.example", "b.example"], "one", 60,
                                atrn_by=("alice", 1234.5))
    alice = store.get_account("alice")
    assert alice is not None and alice.last_atrn_at == 1234.5
    # Refused (b.example is one's): nothing is taken and nothing recorded.
    assert not store.acquire_leases(["c.example", "b.example"], "two", 60,
                                    atrn_by=("bob", 99.0))
    bob = store.get_account("bob")
    assert bob is not None and bob.last_atrn_at is None
    assert store.acquire_leases(["c.example"], "three", 60)
    # No domains to lease: the ATRN is still recorded.
    assert store.acquire_leases([], "four", 60, atrn_by=("bob", 100.0))
    bob = store.get_account("bob")
    assert bob is not None and bob.last_atrn_at == 100.0
    # An unknown account: the leases are taken, no account appears.
    assert store.acquire_leases(["d.example"], "five", 60, atrn_by=("nobody", 1.0))
    assert store.get_account("nobody") is None
    assert not store.acquire_leases(["d.example"], "six", 60)


def test_release_leases_only_the_owners(store: Store) -> None:
    assert store.acquire_leases(["a.example"], "one", 60)
    assert store.acquire_leases(["b.example"], "two", 60)
    store.release_leases("one")
    store.release_leases("nobody")
    assert store.acquire_leases(["a.example"], "three", 60)
    assert not store.acquire_leases(["b.example"], "three", 60)


def test_leases_across_stores(store_factory: StoreFactory, clock: Clock) -> None:
    one, two = store_factory(), store_factory()
    assert one.acquire_leases(["x.example"], "sess-1", 60)
    # A live holder's lease is never taken, whatever store asks.
    assert not two.acquire_leases(["x.example"], "sess-2", 60)
    clock.now += 30
    one.renew_leases("sess-1", 60)
    clock.now += 45
    assert not two.acquire_leases(["x.example"], "sess-2", 60)
    one.release_leases("sess-1")
    assert two.acquire_leases(["x.example"], "sess-2", 60)
    assert not one.acquire_leases(["x.example"], "sess-1", 60)


def test_lease_race_between_threads(store_factory: StoreFactory) -> None:
    stores = [store_factory() for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    results: list[bool | BaseException] = [False] * len(stores)

    def grab(i: int) -> None:
        barrier.wait()
        try:
            results[i] = stores[i].acquire_leases(["x.example", "y.example"], f"owner{i}", 60)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(repr, results)) == ["False"] * (len(stores) - 1) + ["True"]
