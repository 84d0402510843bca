"""Store contract, outbound recipients and their claims: due recipients are
handed to one runner at a time for a time to live (renewed, released, ended
by an outcome or by expiry), oldest due first, with the retry schedule kept
on each recipient; two stores never claim one recipient at once.  Run on
every engine."""

from __future__ import annotations

import io
import threading

from fermoposta.store.base import QueuedMessage, Store

from .contract import HELD, HOLD, OUTBOUND, Clock, StoreFactory, msg, rcpt_ids


def claimed(messages: list[QueuedMessage]) -> list[tuple[str, list[str]]]:
    return [(m.id, [r.address for r in m.recipients]) for m in messages]


def test_claim_due_outbound(store: Store, clock: Clock) -> None:
    first = store.enqueue(msg("a@x.example", "b@y.example", state=OUTBOUND), io.BytesIO(b"1"))
    store.enqueue(msg("held@h.example", state=HELD), io.BytesIO(b"2"))
    store.enqueue(msg("hold@h.example", state=HOLD), io.BytesIO(b"2"))
    third = store.enqueue(msg("c@x.example", state=OUTBOUND), io.BytesIO(b"3"))
    got = store.claim_due_outbound(clock.now, 10, "one", 60)
    assert claimed(got) == [(first, ["a@x.example", "b@y.example"]), (third, ["c@x.example"])]
    assert got[0].sender == "s@sender.example" and got[0].size == 1
    # Claimed: invisible to another runner until the claim expires.
    assert store.claim_due_outbound(clock.now, 10, "two", 60) == []
    assert store.claim_due_outbound(clock.now + 59, 10, "two", 60) == []
    again = store.claim_due_outbound(clock.now + 61, 10, "two", 60)
    assert sum(len(m.recipients) for m in again) == 3


def test_claim_returns_only_the_claimed_recipients(store: Store, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example", "b@x.example", "c@x.example", state=OUTBOUND),
                        io.BytesIO(b"1"))
    [part] = store.claim_due_outbound(clock.now, 2, "one", 60)
    assert (part.id, [r.address for r in part.recipients]) == (mid, ["a@x.example", "b@x.example"])
    [rest] = store.claim_due_outbound(clock.now, 2, "two", 60)
    assert (rest.id, [r.address for r in rest.recipients]) == (mid, ["c@x.example"])
    whole = store.get_message(mid)
    assert whole is not None and len(whole.recipients) == 3  # the message keeps all three


def test_claim_limit_and_order(store: Store, clock: Clock) -> None:
    ids = [store.enqueue(msg(f"r{i}@x.example", state=OUTBOUND), io.BytesIO(b"b"))
           for i in range(5)]
    got = store.claim_due_outbound(clock.now, 2, "one", 60)
    assert [m.id for m in got] == ids[:2]
    got = store.claim_due_outbound(clock.now, 10, "one", 60)
    assert [m.id for m in got] == ids[2:]
    assert store.claim_due_outbound(clock.now, 0, "one", 60) == []


def test_oldest_due_first(store: Store, clock: Clock) -> None:
    late = store.enqueue(msg("late@x.example", state=OUTBOUND), io.BytesIO(b"1"))
    early = store.enqueue(msg("early@x.example", state=OUTBOUND), io.BytesIO(b"2"))
    now_due = store.enqueue(msg("now@x.example", state=OUTBOUND), io.BytesIO(b"3"))
    store.record_deferred(rcpt_ids(store, late).values(), "451", clock.now + 300)
    store.record_deferred(rcpt_ids(store, early).values(), "451", clock.now + 100)
    got = store.claim_due_outbound(clock.now + 400, 10, "one", 60)
    # None (due at once) first, then by due time.
    assert [m.id for m in got] == [now_due, early, late]


def test_deferred_schedule_and_claim_release(store: Store, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example", "b@x.example", state=OUTBOUND), io.BytesIO(b"b"))
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
    assert got.recipients[0].next_attempt_at == clock.now + 50
    # Callers without a schedule (the drain) still work: due at once.
    store.record_deferred([b], "450 x")
    got = store.get_message(mid)
    assert got is not None and got.recipients[1].next_attempt_at is None
    assert got.recipients[1].attempts == 2 and got.recipients[1].last_reply == "450 x"


def test_deferring_ends_the_claim(store: Store, clock: Clock) -> None:
    store.enqueue(msg("a@x.example", state=OUTBOUND), io.BytesIO(b"b"))
    [m] = store.claim_due_outbound(clock.now, 10, "one", 600)
    store.record_deferred([m.recipients[0].id], "451 later")  # due at once, claim released
    [again] = store.claim_due_outbound(clock.now, 10, "two", 600)
    assert again.recipients[0].id == m.recipients[0].id and again.recipients[0].attempts == 1


def test_outcomes_end_the_claim(store: Store, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example", "b@x.example", state=OUTBOUND), io.BytesIO(b"b"))
    [m] = store.claim_due_outbound(clock.now, 10, "one", 600)
    a, b = (r.id for r in m.recipients)
    store.record_delivered([a], "250 ok")
    store.record_failed([b], "550 no", None)
    assert store.get_message(mid) is None
    assert store.claim_due_outbound(clock.now + 601, 10, "two", 60) == []  # nothing comes back


def test_release_and_renew_claims(store: Store, clock: Clock) -> None:
    store.enqueue(msg("a@x.example", state=OUTBOUND), io.BytesIO(b"b"))
    store.enqueue(msg("b@x.example", state=OUTBOUND), io.BytesIO(b"b"))
    assert len(store.claim_due_outbound(clock.now, 1, "one", 60)) == 1
    assert len(store.claim_due_outbound(clock.now, 1, "two", 60)) == 1
    store.renew_claims("one", clock.now + 50, 60)
    assert store.claim_due_outbound(clock.now + 70, 10, "three", 60) != []  # two's expired
    assert store.claim_due_outbound(clock.now + 100, 10, "three", 60) == []  # one's renewed
    store.release_claims("one")
    [m] = store.claim_due_outbound(clock.now + 100, 10, "three", 60)
    assert m.recipients[0].address == "a@x.example"


def test_release_some_claims_with_a_schedule(store: Store, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example", "b@x.example", "c@x.example", state=OUTBOUND),
                        io.BytesIO(b"b"))
    ids = rcpt_ids(store, mid)
    [m] = store.claim_due_outbound(clock.now, 2, "one", 600)
    assert [r.address for r in m.recipients] == ["a@x.example", "b@x.example"]
    [other] = store.claim_due_outbound(clock.now, 10, "two", 600)
    # "one" releases a (due in 100 s) and tries to release two's c: left alone.
    store.release_claims("one", [ids["a@x.example"], ids["c@x.example"]], clock.now + 100)
    got = store.get_message(mid)
    assert got is not None
    assert got.recipients[0].next_attempt_at == clock.now + 100
    assert store.claim_due_outbound(clock.now + 99, 10, "three", 600) == []
    [due] = store.claim_due_outbound(clock.now + 100, 10, "three", 600)
    assert [r.address for r in due.recipients] == ["a@x.example"]  # b is still one's, c two's
    assert other.recipients[0].address == "c@x.example"
    store.release_claims("two", [ids["c@x.example"]])  # due at once
    [c] = store.claim_due_outbound(clock.now + 100, 10, "four", 600)
    assert [r.address for r in c.recipients] == ["c@x.example"]
    store.release_claims("one", [])  # nothing
    assert store.claim_due_outbound(clock.now + 100, 10, "five", 600) == []


def test_claims_do_not_change_the_retry_record(store: Store, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example", state=OUTBOUND), io.BytesIO(b"b"))
    store.record_deferred(rcpt_ids(store, mid).values(), "451 later", clock.now)
    [m] = store.claim_due_outbound(clock.now, 10, "one", 60)
    r = m.recipients[0]
    assert (r.attempts, r.last_reply, r.first_failure_at) == (1, "451 later", clock.now)


def test_two_stores_never_claim_the_same_recipient(store_factory: StoreFactory) -> None:
    setup = store_factory()
    for i in range(200):
        setup.enqueue(msg(f"r{i}@x.example", state=OUTBOUND), io.BytesIO(b"b"))
    results: dict[str, list[int]] = {"one": [], "two": []}
    errors: list[BaseException] = []
    # Both runners stay open until both are done: the claims of a store that
    # has closed (a runner that is gone) may be free again at once.
    stores = {owner: store_factory() for owner in results}

    def runner(owner: str) -> None:
        try:
            while True:
                got = stores[owner].claim_due_outbound(2e9, 7, owner, 600)
                if not got:
                    return
                results[owner] += [r.id for m in got for r in m.recipients]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=runner, args=(o,)) for o in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    both = results["one"] + results["two"]
    assert len(both) == 200 and len(set(both)) == 200


def test_a_live_stores_claims_are_not_taken(store_factory: StoreFactory, clock: Clock) -> None:
    runner, other = store_factory(), store_factory()
    runner.enqueue(msg("a@x.example", state=OUTBOUND), io.BytesIO(b"b"))
    assert len(runner.claim_due_outbound(clock.now, 10, "runner", 600)) == 1
    assert other.claim_due_outbound(clock.now, 10, "other", 600) == []
    assert other.claim_due_outbound(clock.now + 599, 10, "other", 600) == []
    # Expired: a crashed runner's recipient is due again (a duplicate, never a loss).
    [m] = other.claim_due_outbound(clock.now + 600, 10, "other", 600)
    assert m.recipients[0].address == "a@x.example"


def test_outbound_older_than(store: Store, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example", "h@h.example", state=OUTBOUND), io.BytesIO(b"b"))
    store.enqueue(msg("h@h.example", state=HELD), io.BytesIO(b"b"))
    assert store.outbound_older_than(clock.now, 10) == []
    [m] = store.outbound_older_than(clock.now + 1, 10)
    assert m.id == mid and [r.address for r in m.recipients] == ["a@x.example", "h@h.example"]
    # Claimed or not.
    store.claim_due_outbound(clock.now, 10, "one", 60)
    assert [x.id for x in store.outbound_older_than(clock.now + 1, 10)] == [mid]
    [one] = store.outbound_older_than(clock.now + 1, 1)
    assert [r.address for r in one.recipients] == ["a@x.example"]
    assert store.outbound_older_than(clock.now + 1, 0) == []


def test_mark_delay_notified_outbound(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example", state=OUTBOUND), io.BytesIO(b"b"))
    rid = rcpt_ids(store, mid)["a@x.example"]
    assert store.mark_delay_notified([rid]) is None
    got = store.get_message(mid)
    assert got is not None and got.recipients[0].delay_notified
    assert got.recipients[0].state == OUTBOUND
