"""Store contract, ETRN (RFC 1985): a domain's ETRN target round-trips,
`etrn_domains` finds ETRN domains (and their subdomains for ``@domain``),
`start_etrn` moves held mail to OUTBOUND due now in one step, skipping
domains an ATRN session has leased and recipients a runner has claimed, and
`return_to_held` puts a deferred ETRN delivery back on hold.  Run on every
engine."""

from __future__ import annotations

import io

import pytest

from fermoposta.store.base import Account, Domain, EtrnStarted, MessageOrigin, NewMessage, Store

from .contract import HELD, HOLD, OUTBOUND, Clock, StoreFactory, msg, rcpt, rcpt_ids


def _domains(store: Store, *domains: Domain) -> None:
    store.add_account(Account("acme", None, None))
    for domain in domains:
        store.add_domain(domain)


def _states(store: Store, message_id: str) -> dict[str, str]:
    m = store.get_message(message_id)
    assert m is not None
    return {r.address: str(r.state) for r in m.recipients}


def test_etrn_target_round_trips(store: Store) -> None:
    _domains(store, Domain("a.example", "acme", etrn="mail.a.example:2525"),
             Domain("b.example", "acme", etrn=""), Domain("c.example", "acme"))
    assert store.get_domain("a.example") == Domain("a.example", "acme",
                                                   etrn="mail.a.example:2525")
    b = store.get_domain("b.example")
    assert b is not None and b.etrn == ""  # its MX hosts, not "off"
    c = store.get_domain("c.example")
    assert c is not None and c.etrn is None
    store.update_domain(Domain("a.example", "acme"))
    a = store.get_domain("a.example")
    assert a is not None and a.etrn is None
    store.update_domain(Domain("c.example", "acme", etrn="192.0.2.7"))
    assert [d.etrn for d in store.list_domains("acme")] == [None, "", "192.0.2.7"]


def test_etrn_domains_exact_and_subdomains(store: Store) -> None:
    _domains(store, Domain("example.org", "acme", etrn=""),
             Domain("a.example.org", "acme", etrn="h:25"),
             Domain("b.a.example.org", "acme", etrn="h:25"),
             Domain("plain.example.org", "acme"),  # hosted, not ETRN
             Domain("badexample.org", "acme", etrn=""),  # a suffix, not a subdomain
             Domain("other.example", "acme", etrn=""))
    assert store.etrn_domains("example.org") == ["example.org"]
    assert store.etrn_domains("plain.example.org") == []
    assert store.etrn_domains("nowhere.example") == []
    assert store.etrn_domains("example.org", subdomains=True) == [
        "a.example.org", "b.a.example.org", "example.org"]
    assert store.etrn_domains("a.example.org", subdomains=True) == [
        "a.example.org", "b.a.example.org"]
    assert store.etrn_domains("org", subdomains=True) == [
        "a.example.org", "b.a.example.org", "badexample.org", "example.org"]


def test_start_etrn_moves_held_mail_of_those_domains_only(store: Store, clock: Clock) -> None:
    m1 = store.enqueue(msg("a@e.example", "b@e.example", "c@other.example"), io.BytesIO(b"1"))
    m2 = store.enqueue(msg("d@e.example"), io.BytesIO(b"2"))
    m3 = store.enqueue(NewMessage("", (rcpt("h@e.example", HOLD),), MessageOrigin.MX),
                       io.BytesIO(b"3"))
    clock.now += 10
    got = store.start_etrn(["e.example"], clock.now)
    assert got == EtrnStarted(messages=2, recipients=3)
    assert _states(store, m1) == {"a@e.example": "outbound", "b@e.example": "outbound",
                                  "c@other.example": "held"}
    assert _states(store, m2) == {"d@e.example": "outbound"}
    assert _states(store, m3) == {"h@e.example": "hold"}  # operator hold stays
    assert store.held_message_ids(["e.example"]) == []
    claimed = store.claim_due_outbound(clock.now, 10, "runner", 60)
    assert sorted(r.address for m in claimed for r in m.recipients) == [
        "a@e.example", "b@e.example", "d@e.example"]
    # Nothing left: the next ETRN finds nothing (what is claimed stays with its runner).
    assert store.start_etrn(["e.example"], clock.now) == EtrnStarted()
    assert store.start_etrn([], clock.now) == EtrnStarted()
    assert store.start_etrn(["none.example"], clock.now) == EtrnStarted()


def test_start_etrn_makes_deferred_outbound_mail_due(store: Store, clock: Clock) -> None:
    mid = store.enqueue(msg("a@e.example", state=OUTBOUND), io.BytesIO(b"x"))
    ids = rcpt_ids(store, mid)
    store.record_deferred(list(ids.values()), "451 later", clock.now + 3600)
    assert store.claim_due_outbound(clock.now, 10, "r", 60) == []
    assert store.start_etrn(["e.example"], clock.now) == EtrnStarted(1, 1)
    [m] = store.claim_due_outbound(clock.now, 10, "r", 60)
    [r] = m.recipients
    assert (r.attempts, r.last_reply) == (1, "451 later")  # history kept


def test_start_etrn_leaves_leased_domains_alone(store_factory: StoreFactory,
                                               clock: Clock) -> None:
    store = store_factory()
    other = store_factory()  # another process or node holds the lease
    m1 = store.enqueue(msg("a@leased.example", "b@free.example"), io.BytesIO(b"x"))
    assert other.acquire_leases(["leased.example"], "atrn-session", 60)
    got = store.start_etrn(["leased.example", "free.example"], clock.now)
    assert got == EtrnStarted(messages=1, recipients=1, busy=("leased.example",))
    assert _states(store, m1) == {"a@leased.example": "held", "b@free.example": "outbound"}
    assert store.start_etrn(["leased.example"], clock.now) == EtrnStarted(
        busy=("leased.example",))
    clock.now += 61  # the lease expired
    assert store.start_etrn(["leased.example"], clock.now) == EtrnStarted(1, 1)


def test_start_etrn_bound(store: Store, clock: Clock) -> None:
    with pytest.raises(ValueError):
        store.start_etrn([f"d{i}.example" for i in range(501)], clock.now)


def test_return_to_held(store: Store, clock: Clock) -> None:
    mid = store.enqueue(msg("a@e.example", "b@e.example"), io.BytesIO(b"x"))
    store.start_etrn(["e.example"], clock.now)
    [m] = store.claim_due_outbound(clock.now, 10, "runner", 60)
    ids = rcpt_ids(store, mid)
    clock.now += 5
    store.return_to_held([ids["a@e.example"]], "421 4.4.2 customer went away")
    got = store.get_message(mid)
    assert got is not None
    a = next(r for r in got.recipients if r.address == "a@e.example")
    assert (a.state, a.attempts, a.last_reply, a.first_failure_at, a.next_attempt_at) == (
        HELD, 1, "421 4.4.2 customer went away", clock.now, None)
    assert store.held_message_ids(["e.example"]) == [mid]
    # Its claim ended: the runner's renewal or release does not touch it.
    store.release_claims("runner")
    assert _states(store, mid) == {"a@e.example": "held", "b@e.example": "outbound"}
    # Only OUTBOUND recipients: a HELD one is not counted again.
    store.return_to_held([ids["a@e.example"]], "again")
    got = store.get_message(mid)
    assert got is not None
    a = next(r for r in got.recipients if r.address == "a@e.example")
    assert (a.attempts, a.last_reply) == (1, "421 4.4.2 customer went away")
    store.return_to_held([], "nothing")
    assert m.id == mid
