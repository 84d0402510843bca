"""Store contract, accounts and domains (the `Directory`): secrets and
certificate bindings round-trip, a fingerprint or subject is bound to one
account at most, a domain belongs to an existing account, and removing an
account or domain never removes mail.  Run on every engine."""

from __future__ import annotations

import io

import pytest

from fermoposta.store.base import Account, Domain, ScramSecret, Store

from .contract import Clock, body_of, msg


def test_accounts_crud(store: Store, clock: Clock) -> None:
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
    assert store.get_account("carol") is None
    store.record_atrn("alice", 1234.5)
    got = store.get_account("alice")
    assert got is not None and got.last_atrn_at == 1234.5


def test_account_round_trip_exactly(store: Store, clock: Clock) -> None:
    scram = ScramSecret(b"\x00salt\xff", 100_000, bytes(range(32)), bytes(range(32, 64)))
    account = Account("Dave.Example", scram, "p\u00e4ss", ("01" * 32, "ab" * 32),
                      ("CN=b", "CN=a"), created_at=12.5, last_atrn_at=13.25)
    store.add_account(account)
    got = store.get_account("Dave.Example")
    # Bindings come back sorted; everything else exactly as given.
    assert got == Account("Dave.Example", scram, "p\u00e4ss", ("01" * 32, "ab" * 32),
                          ("CN=a", "CN=b"), created_at=12.5, last_atrn_at=13.25)
    assert store.get_account("dave.example") is None  # names compare exactly
    assert store.list_accounts() == [got]


def test_atrn_wait_round_trip(store: Store) -> None:
    store.add_account(Account("alice", None, None, atrn_wait=300.0))
    store.add_account(Account("bob", None, None))
    alice, bob = store.get_account("alice"), store.get_account("bob")
    assert alice is not None and alice.atrn_wait == 300.0
    assert bob is not None and bob.atrn_wait is None
    store.update_account(Account("bob", None, None, atrn_wait=90.5))
    store.update_account(Account("alice", None, None))
    assert [a.atrn_wait for a in store.list_accounts()] == [None, 90.5]


def test_update_account_keeps_created_at(store: Store, clock: Clock) -> None:
    store.add_account(Account("alice", None, "old"))
    clock.now += 100
    store.update_account(Account("alice", None, "new", created_at=5.0, last_atrn_at=7.0))
    got = store.get_account("alice")
    assert got is not None
    assert (got.cram_secret, got.created_at, got.last_atrn_at) == ("new", clock.now - 100, 7.0)


def test_account_cert_subjects(store: Store) -> None:
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


def test_a_refused_update_changes_nothing(store: Store) -> None:
    store.add_account(Account("alice", None, "a", ("aa" * 32,)))
    store.add_account(Account("bob", None, "b", ("bb" * 32,), cert_subjects=("CN=bob",)))
    with pytest.raises(ValueError):  # alice's fingerprint
        store.update_account(Account("bob", None, "changed", ("aa" * 32,), ("CN=new",)))
    bob = store.get_account("bob")
    assert bob == Account("bob", None, "b", ("bb" * 32,), ("CN=bob",),
                          created_at=bob.created_at if bob else 0.0)
    found = store.account_by_fingerprint("bb" * 32)
    assert found is not None and found.name == "bob"
    assert store.account_by_subject("CN=new") is None


def test_duplicate_fingerprints_of_one_account_collapse(store: Store) -> None:
    store.add_account(Account("alice", None, None, ("ab" * 32, "ab" * 32)))
    got = store.get_account("alice")
    assert got is not None and got.cert_fingerprints == ("ab" * 32,)


def test_domains_crud(store: Store) -> None:
    store.add_account(Account("alice", None, None))
    store.add_account(Account("bob", None, None))
    store.add_domain(Domain("a.example", "alice", max_messages=10, max_bytes=1000))
    store.add_domain(Domain("b.example", "alice", valid_recipients=frozenset({"Info", "sales"})))
    store.add_domain(Domain("c.example", "bob"))
    with pytest.raises(ValueError):
        store.add_domain(Domain("a.example", "bob"))
    with pytest.raises(ValueError):
        store.add_domain(Domain("d.example", "nobody"))
    assert store.get_domain("d.example") is None
    assert store.get_domain("a.example") == Domain("a.example", "alice", 10, 1000, None)
    b = store.get_domain("b.example")
    assert b is not None and b.valid_recipients == frozenset({"info", "sales"})
    assert [d.name for d in store.list_domains()] == ["a.example", "b.example", "c.example"]
    assert [d.name for d in store.list_domains("alice")] == ["a.example", "b.example"]
    assert store.list_domains("nobody") == []
    # The names alone (what an ATRN checks), the same sets.
    assert store.domain_names("alice") == frozenset({"a.example", "b.example"})
    assert store.domain_names("bob") == frozenset({"c.example"})
    assert store.domain_names("nobody") == frozenset()
    store.update_domain(Domain("b.example", "bob", valid_recipients=None))
    assert store.get_domain("b.example") == Domain("b.example", "bob")
    assert store.domain_names("bob") == frozenset({"b.example", "c.example"})
    with pytest.raises(ValueError):
        store.update_domain(Domain("z.example", "bob"))
    with pytest.raises(ValueError):
        store.update_domain(Domain("a.example", "nobody"))
    assert store.get_domain("a.example") == Domain("a.example", "alice", 10, 1000, None)
    assert store.remove_domain("c.example")
    assert not store.remove_domain("c.example")
    assert store.get_domain("c.example") is None


def test_an_empty_recipient_list_is_not_no_validation(store: Store) -> None:
    store.add_account(Account("alice", None, None))
    store.add_domain(Domain("a.example", "alice", valid_recipients=frozenset()))
    got = store.get_domain("a.example")
    assert got is not None and got.valid_recipients == frozenset()  # accept nobody
    store.update_domain(Domain("a.example", "alice", valid_recipients=frozenset({"x"})))
    got = store.get_domain("a.example")
    assert got is not None and got.valid_recipients == frozenset({"x"})


def test_domain_hold_lifetime_round_trip(store: Store) -> None:
    store.add_account(Account("acme", None, None))
    store.add_domain(Domain("a.example", "acme", hold_lifetime=86400.0))
    assert store.get_domain("a.example") == Domain("a.example", "acme", hold_lifetime=86400.0)
    store.update_domain(Domain("a.example", "acme"))
    got = store.get_domain("a.example")
    assert got is not None and got.hold_lifetime is None


def test_remove_account_keeps_mail(store: Store) -> None:
    store.add_account(Account("alice", None, None, ("ab" * 32,)))
    store.add_domain(Domain("a.example", "alice", valid_recipients=frozenset({"x"})))
    mid = store.enqueue(msg("x@a.example"), io.BytesIO(b"keep"))
    assert store.remove_account("alice")
    assert not store.remove_account("alice")
    assert store.get_account("alice") is None
    assert store.get_domain("a.example") is None
    assert store.list_domains() == []
    assert store.account_by_fingerprint("ab" * 32) is None
    assert store.held_message_ids(["a.example"]) == [mid]
    assert body_of(store, mid) == b"keep"
    # The name is free again, without the old domains.
    store.add_account(Account("alice", None, None))
    assert store.list_domains("alice") == []
    assert store.domain_names("alice") == frozenset()


def test_remove_domain_keeps_mail(store: Store) -> None:
    store.add_account(Account("alice", None, None))
    store.add_domain(Domain("a.example", "alice"))
    mid = store.enqueue(msg("x@a.example"), io.BytesIO(b"keep"))
    assert store.remove_domain("a.example")
    assert store.held_message_ids(["a.example"]) == [mid]
    assert store.get_account("alice") is not None


def test_record_atrn_of_an_unknown_account_creates_nothing(store: Store) -> None:
    store.record_atrn("nobody", 1.0)
    assert store.get_account("nobody") is None and store.list_accounts() == []
