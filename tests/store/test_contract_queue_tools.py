"""Store contract, the queue tools (`QueueTools`): pages of the queue oldest
first with filters, entries with their active claims and remembered hold
states, delete / hold / release / retry by explicit ids, and the qshape and
metrics figures.  Run on every engine, on one small queue of five messages
(see `Queue`)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pytest

from fermoposta.store.base import (
    Account,
    Domain,
    DomainShape,
    MessageOrigin,
    NewMessage,
    QueueFilter,
    RecipientState,
    Requeued,
    Store,
    StoreError,
)

from .contract import HELD, HOLD, OUTBOUND, Clock, StoreFactory, all_ids, msg, rcpt, rcpt_ids

MINUTE = 60.0
DAY = 86400.0
AGES = (5 * MINUTE, 60 * MINUTE, DAY)  # qshape buckets: <5m, <1h, <1d, older


@dataclass
class Queue:
    """Five messages of known age (oldest first: hold, deferred, mixed, fresh,
    held); example.org is a hosted domain, remote.test and other.test are not."""

    store: Store
    clock: Clock
    held: str = ""  # from <>, HELD bob@example.org, 3 minutes old
    fresh: str = ""  # OUTBOUND dave@remote.test never tried, 12 minutes old
    deferred: str = ""  # OUTBOUND frank@remote.test deferred twice, 130 minutes old
    hold: str = ""  # HOLD hal@example.org (enqueued so: no state remembered), 2 days old
    mixed: str = ""  # HELD jo@example.org, OUTBOUND kim@remote.test (deferred once),
    #                  OUTBOUND lee@other.test; 45 minutes old
    sizes: dict[str, int] = field(default_factory=dict)
    received: dict[str, float] = field(default_factory=dict)

    def enqueue(self, sender: str, recipients: list[tuple[str, RecipientState]],
                age: float) -> str:
        now = self.clock.now
        self.clock.now = now - age
        try:
            body = f"From: <{sender}>\r\n\r\n{len(recipients)} recipients\r\n".encode()
            mid = self.store.enqueue(
                NewMessage(sender, tuple(rcpt(a, s) for a, s in recipients), MessageOrigin.MX),
                io.BytesIO(body))
        finally:
            self.clock.now = now
        self.sizes[mid] = len(body)
        self.received[mid] = now - age
        return mid

    def rid(self, message_id: str, address: str) -> int:
        return rcpt_ids(self.store, message_id)[address]

    def ids(self, **where: object) -> list[str]:
        return [i for _, i in self.store.queue_ids(QueueFilter(**where), None, 100)]  # type: ignore[arg-type]

    def recipients(self, message_id: str) -> dict[str, tuple[object, ...]]:
        m = self.store.get_message(message_id)
        assert m is not None
        return {r.address: (r.state, r.attempts, r.last_reply, r.next_attempt_at)
                for r in m.recipients}


@pytest.fixture
def queue(store: Store, clock: Clock) -> Queue:
    store.add_account(Account("acme", None, None))
    store.add_domain(Domain("example.org", "acme"))
    q = Queue(store, clock)
    q.held = q.enqueue("", [("bob@example.org", HELD)], 3 * MINUTE)
    q.fresh = q.enqueue("carol@example.org", [("dave@remote.test", OUTBOUND)], 12 * MINUTE)
    q.deferred = q.enqueue("erin@example.org", [("frank@remote.test", OUTBOUND)], 130 * MINUTE)
    frank = q.rid(q.deferred, "frank@remote.test")
    store.record_deferred([frank], "451 greylisted", clock.now + 600)
    store.record_deferred([frank], "451 4.7.1 greylisted", clock.now + 3600)
    q.hold = q.enqueue("gina@sender.test", [("hal@example.org", HOLD)], 2 * DAY)
    q.mixed = q.enqueue("ivan@sender.test", [("jo@example.org", HELD),
                                             ("kim@remote.test", OUTBOUND),
                                             ("lee@other.test", OUTBOUND)], 45 * MINUTE)
    store.record_deferred([q.rid(q.mixed, "kim@remote.test")], "421 timeout", clock.now + 900)
    return q


ORDER = ("hold", "deferred", "mixed", "fresh", "held")


def named(q: Queue, *names: str) -> list[str]:
    return [getattr(q, n) for n in names]


# --- reading the queue ----------------------------------------------------------------------


def test_page_of_the_whole_queue(queue: Queue) -> None:
    entries = queue.store.queue_page(QueueFilter(), None, 100)
    assert [e.message.id for e in entries] == named(queue, *ORDER)
    keys = queue.store.queue_ids(QueueFilter(), None, 100)
    assert keys == [(e.message.received_at, e.message.id) for e in entries]
    assert [t for t, _ in keys] == [queue.received[i] for _, i in keys]
    mixed = entries[2]
    assert [(r.address, r.state, r.attempts) for r in mixed.message.recipients] == [
        ("jo@example.org", HELD, 0), ("kim@remote.test", OUTBOUND, 1),
        ("lee@other.test", OUTBOUND, 0)]
    assert (mixed.message.sender, mixed.message.size) == ("ivan@sender.test",
                                                          queue.sizes[queue.mixed])
    assert all(e.active == frozenset() and dict(e.hold_from) == {} for e in entries)
    assert queue.store.queue_page(QueueFilter(), None, 0) == []
    assert queue.store.queue_ids(QueueFilter(), None, 0) == []


@pytest.mark.parametrize(("where", "expected"), [
    ({"domain": "remote.test"}, ("deferred", "mixed", "fresh")),
    ({"domain": "other.test"}, ("mixed",)),
    ({"domain": "nowhere.test"}, ()),
    ({"sender": "EXAMPLE.ORG"}, ("deferred", "fresh")),  # substring, any case
    ({"sender": "carol@example.org", "sender_exact": True}, ("fresh",)),
    ({"sender": "CAROL@example.org", "sender_exact": True}, ("fresh",)),
    ({"sender": "carol", "sender_exact": True}, ()),
    ({"sender": "", "sender_exact": True}, ("held",)),  # the null sender
    ({"sender": ""}, ORDER),  # the empty substring is in every sender
    ({"recipient": "KIM"}, ("mixed",)),
    ({"recipient": "@example.org"}, ("hold", "mixed", "held")),
    ({"recipient": "kim@remote.test", "recipient_exact": True}, ("mixed",)),
    ({"recipient": "kim", "recipient_exact": True}, ()),
    ({"received_before": 1_000_000.0 - 60 * MINUTE}, ("hold", "deferred")),
    ({"received_before": 1_000_000.0 - 2 * DAY}, ()),  # strictly before
    ({"state": "held"}, ("mixed", "held")),
    ({"state": "outbound"}, ("deferred", "mixed", "fresh")),
    ({"state": "deferred"}, ("deferred", "mixed")),  # outbound, tried at least once
    ({"state": "hold"}, ("hold",)),
    # Recipient criteria must all hold for one recipient: mixed has a HELD
    # recipient and one at remote.test, but no HELD one at remote.test.
    ({"domain": "remote.test", "state": "held"}, ()),
    ({"domain": "example.org", "state": "held"}, ("mixed", "held")),
    ({"recipient": "lee", "state": "deferred"}, ()),
    ({"recipient": "kim", "state": "deferred"}, ("mixed",)),
    ({"sender": "ivan", "recipient": "lee"}, ("mixed",)),
    ({"sender": "gina", "recipient": "lee"}, ()),
    ({"sender": "example.org", "received_before": 1_000_000.0 - 60 * MINUTE}, ("deferred",)),
])
def test_filters(queue: Queue, where: dict[str, object], expected: tuple[str, ...]) -> None:
    assert queue.ids(**where) == named(queue, *expected)
    assert queue.store.count_queue(QueueFilter(**where)) == len(expected)  # type: ignore[arg-type]
    page = queue.store.queue_page(QueueFilter(**where), None, 100)  # type: ignore[arg-type]
    assert [e.message.id for e in page] == named(queue, *expected)
    # A page shows every recipient of a matching message, not only those that match.
    for entry in page:
        m = queue.store.get_message(entry.message.id)
        assert m is not None and entry.message.recipients == m.recipients


def test_pages_follow_the_key(store: Store, clock: Clock) -> None:
    ids: list[tuple[float, str]] = []
    for i in range(7):
        if i % 3 == 0:
            clock.now += 1  # several messages share a received_at: ties go by id
        mid = store.enqueue(msg(f"r{i}@x.example"), io.BytesIO(b"m"))
        ids.append((clock.now, mid))
    ids.sort()
    seen: list[tuple[float, str]] = []
    after: tuple[float, str] | None = None
    while True:
        page = store.queue_ids(QueueFilter(), after, 2)
        entries = store.queue_page(QueueFilter(), after, 2)
        assert [(e.message.received_at, e.message.id) for e in entries] == page
        if not page:
            break
        assert len(page) <= 2
        seen += page
        after = page[-1]
    assert seen == ids
    # A key past the end, and a key from a message already gone.
    assert store.queue_ids(QueueFilter(), ids[-1], 10) == []
    store.delete_messages([ids[2][1]])
    assert store.queue_ids(QueueFilter(), ids[2], 10) == ids[3:]


def test_count_of_what_arrived_after_a_time(store: Store, clock: Clock) -> None:
    times: list[float] = []
    for i in range(6):
        if i % 2 == 0:
            clock.now += 1  # two messages share each received_at
        state = HELD if i < 4 else OUTBOUND
        store.enqueue(NewMessage("s@x.example", (rcpt(f"r{i}@x.example", state),),
                                 MessageOrigin.MX), io.BytesIO(b"m"))
        times.append(clock.now)
    assert store.count_queue(QueueFilter()) == 6
    assert store.count_queue(QueueFilter(), times[0] - 1) == 6
    # Strictly after: the two that arrived at that very time are not counted.
    assert store.count_queue(QueueFilter(), times[0]) == 4
    assert store.count_queue(QueueFilter(), times[2]) == 2
    assert store.count_queue(QueueFilter(), times[-1]) == 0
    assert store.count_queue(QueueFilter(state="held"), times[0]) == 2
    assert store.count_queue(QueueFilter(received_before=times[4]), times[0]) == 2


def test_pages_with_a_filter(queue: Queue) -> None:
    where = QueueFilter(state="outbound")
    first = queue.store.queue_ids(where, None, 1)
    assert [i for _, i in first] == [queue.deferred]
    second = queue.store.queue_page(where, first[-1], 1)
    assert [e.message.id for e in second] == [queue.mixed]
    key = (second[0].message.received_at, second[0].message.id)
    assert [i for _, i in queue.store.queue_ids(where, key, 10)] == [queue.fresh]


def test_get_queue_entry(queue: Queue) -> None:
    assert queue.store.get_queue_entry("000000000000") is None
    entry = queue.store.get_queue_entry(queue.mixed)
    assert entry is not None
    assert entry.message == queue.store.get_message(queue.mixed)
    assert entry.active == frozenset() and dict(entry.hold_from) == {}
    hold = queue.store.get_queue_entry(queue.hold)
    # Enqueued on hold: no earlier state to remember.
    assert hold is not None and dict(hold.hold_from) == {}


def test_active_recipients_are_those_claimed_now(queue: Queue) -> None:
    store, clock = queue.store, queue.clock
    [got] = store.claim_due_outbound(clock.now, 1, "runner-1", 600)
    assert got.id == queue.fresh  # the only one due now (the others were deferred)
    dave = queue.rid(queue.fresh, "dave@remote.test")
    entry = store.get_queue_entry(queue.fresh)
    assert entry is not None and entry.active == frozenset({dave})
    [page_entry] = store.queue_page(QueueFilter(recipient="dave"), None, 10)
    assert page_entry.active == frozenset({dave})
    other = store.get_queue_entry(queue.mixed)
    assert other is not None and other.active == frozenset()
    clock.now += 601  # the claim has expired: not active any more
    entry = store.get_queue_entry(queue.fresh)
    assert entry is not None and entry.active == frozenset()
    clock.now -= 601
    store.release_claims("runner-1")
    entry = store.get_queue_entry(queue.fresh)
    assert entry is not None and entry.active == frozenset()


# --- acting on messages ---------------------------------------------------------------------


def test_delete_messages(queue: Queue) -> None:
    store = queue.store
    gone = store.delete_messages([queue.mixed, queue.held, "000000000000", queue.mixed])
    assert sorted(gone) == sorted([queue.mixed, queue.held])
    assert all_ids(store) == named(queue, "hold", "deferred", "fresh")  # and no DSN
    for mid in (queue.mixed, queue.held):
        assert store.get_message(mid) is None and store.get_queue_entry(mid) is None
        with pytest.raises(StoreError):
            store.read_body(mid)
    assert store.held_message_ids(["example.org"]) == []
    assert store.delete_messages([queue.mixed]) == []
    assert store.delete_messages([]) == []
    assert store.recipient_count() == 3


def test_delete_a_claimed_message(queue: Queue) -> None:
    store, clock = queue.store, queue.clock
    [got] = store.claim_due_outbound(clock.now, 1, "runner", 600)
    assert store.delete_messages([got.id]) == [got.id]
    # The runner's outcome for a deleted recipient is a no-op, not an error.
    rid = got.recipients[0].id
    store.record_deferred([rid], "451 later", clock.now + 60)
    assert store.record_failed([rid], "550 no", None) is None
    assert store.get_message(got.id) is None


def test_hold_and_release_are_exact(queue: Queue) -> None:
    store, clock = queue.store, queue.clock
    before = {mid: queue.recipients(mid) for mid in (queue.mixed, queue.deferred)}
    assert store.hold_messages([queue.mixed, queue.deferred, "000000000000"]) == {
        queue.mixed: 3, queue.deferred: 1}
    assert store.hold_messages([queue.mixed]) == {queue.mixed: 0}  # already on hold
    for mid in (queue.mixed, queue.deferred):
        assert {r[0] for r in queue.recipients(mid).values()} == {HOLD}
    entry = store.get_queue_entry(queue.mixed)
    assert entry is not None
    assert dict(entry.hold_from) == {
        queue.rid(queue.mixed, "jo@example.org"): HELD,
        queue.rid(queue.mixed, "kim@remote.test"): OUTBOUND,
        queue.rid(queue.mixed, "lee@other.test"): OUTBOUND}
    assert queue.ids(state="hold") == named(queue, "hold", "deferred", "mixed")
    # On hold: neither drained, delivered nor expired.
    assert store.held_message_ids(["example.org"]) == [queue.held]
    assert store.domain_usage("example.org") == (1, queue.sizes[queue.held])
    assert store.domains_with_held_mail(["example.org", "remote.test"]) == {"example.org"}
    due = store.claim_due_outbound(clock.now + 10 * DAY, 10, "runner", 60)
    assert [m.id for m in due] == [queue.fresh]
    assert [m.id for m in store.held_older_than(clock.now + 1, 10)] == [queue.held]
    assert store.outbound_older_than(clock.now + 1, 10)[0].id == queue.fresh
    assert store.retry_outbound(clock.now, message_ids=[queue.mixed]) == {queue.mixed: 0}
    store.release_claims("runner")
    # Released: each recipient is back in the state it had, schedule unchanged.
    assert store.release_messages([queue.mixed, queue.deferred, "000000000000"]) == {
        queue.mixed: 3, queue.deferred: 1}
    assert {mid: queue.recipients(mid) for mid in before} == before
    assert store.release_messages([queue.mixed]) == {queue.mixed: 0}
    entry = store.get_queue_entry(queue.mixed)
    assert entry is not None and dict(entry.hold_from) == {}
    assert store.held_message_ids(["example.org"]) == [queue.mixed, queue.held]


def test_holding_twice_remembers_the_first_state(queue: Queue) -> None:
    store = queue.store
    store.hold_messages([queue.held])
    store.hold_messages([queue.held])
    assert store.release_messages([queue.held]) == {queue.held: 1}
    assert queue.recipients(queue.held)["bob@example.org"][0] == HELD


def test_release_without_a_remembered_state(queue: Queue) -> None:
    store = queue.store
    # Enqueued on hold, one recipient hosted here and one not.
    mid = queue.enqueue("x@sender.test", [("u@example.org", HOLD), ("v@far.test", HOLD)], 0)
    assert store.release_messages([mid, queue.hold]) == {mid: 2, queue.hold: 1}
    assert queue.recipients(mid)["u@example.org"][0] == HELD  # hosted domain
    assert queue.recipients(mid)["v@far.test"][0] == OUTBOUND  # anything else
    assert queue.recipients(queue.hold)["hal@example.org"][0] == HELD
    assert store.release_messages([queue.fresh]) == {queue.fresh: 0}  # nothing on hold


def test_hold_release_of_nothing(queue: Queue) -> None:
    assert queue.store.hold_messages([]) == {}
    assert queue.store.release_messages([]) == {}
    assert queue.store.hold_messages(["000000000000"]) == {}


def test_retry_everything(queue: Queue) -> None:
    store, clock = queue.store, queue.clock
    clock.now += 5
    result = store.retry_outbound(clock.now)
    # Every message touched: the OUTBOUND recipients made due.
    assert result == {queue.fresh: 1, queue.deferred: 1, queue.mixed: 2}
    for mid, address in ((queue.fresh, "dave@remote.test"), (queue.deferred, "frank@remote.test"),
                         (queue.mixed, "kim@remote.test"), (queue.mixed, "lee@other.test")):
        state, _, _, due = queue.recipients(mid)[address]
        assert (state, due) == (OUTBOUND, clock.now)
    # Attempts and replies are kept; HELD and HOLD recipients are untouched.
    assert queue.recipients(queue.deferred)["frank@remote.test"][1:3] == (
        2, "451 4.7.1 greylisted")
    assert queue.recipients(queue.mixed)["jo@example.org"][0] == HELD
    assert queue.recipients(queue.hold)["hal@example.org"][0] == HOLD
    due = store.claim_due_outbound(clock.now, 10, "runner", 60)
    assert sum(len(m.recipients) for m in due) == 4


def test_retry_by_ids_and_by_domain(queue: Queue) -> None:
    store, clock = queue.store, queue.clock
    assert store.retry_outbound(clock.now, message_ids=[queue.mixed, queue.held, "000000000000"]
                                ) == {queue.mixed: 2, queue.held: 0}
    assert queue.recipients(queue.deferred)["frank@remote.test"][3] == clock.now + 3600
    clock.now += 1
    assert store.retry_outbound(clock.now, domain="remote.test") == {
        queue.fresh: 1, queue.deferred: 1, queue.mixed: 1}
    assert queue.recipients(queue.mixed)["lee@other.test"][3] == clock.now - 1  # not this time
    assert queue.recipients(queue.mixed)["kim@remote.test"][3] == clock.now
    assert store.retry_outbound(clock.now, message_ids=[queue.mixed], domain="other.test") == {
        queue.mixed: 1}
    assert store.retry_outbound(clock.now, message_ids=[]) == {}
    assert store.retry_outbound(clock.now, domain="nowhere.test") == {}


def test_retry_leaves_claimed_recipients_alone(queue: Queue, store_factory: StoreFactory) -> None:
    runner, clock = queue.store, queue.clock
    tools = store_factory()  # the operator's command, another process
    [got] = runner.claim_due_outbound(clock.now, 1, "runner", 600)
    assert got.id == queue.fresh
    result = tools.retry_outbound(clock.now)
    assert result.get(queue.fresh, 0) == 0
    assert result[queue.deferred] == 1 and result[queue.mixed] == 2
    # Still the runner's: nobody else may claim it.
    assert [m.id for m in tools.claim_due_outbound(clock.now, 10, "other", 600)] == named(
        queue, "deferred", "mixed")
    assert tools.retry_outbound(clock.now, message_ids=[queue.fresh]) == {queue.fresh: 0}


# --- requeue --------------------------------------------------------------------------------


def test_requeue_follows_the_domains_now_hosted(queue: Queue) -> None:
    store, clock = queue.store, queue.clock
    held_before = queue.recipients(queue.held)["bob@example.org"]
    # Nothing moved: every recipient is where it belongs, so nothing changes.
    assert store.requeue_messages([queue.mixed, queue.held, "000000000000"], clock.now) == {
        queue.mixed: Requeued(), queue.held: Requeued()}
    # example.org moves away (to another provider), remote.test comes here.
    assert store.remove_domain("example.org")
    store.add_domain(Domain("remote.test", "acme"))
    clock.now += 5
    result = store.requeue_messages([queue.mixed, queue.held, queue.deferred, queue.fresh],
                                    clock.now)
    assert result == {queue.mixed: Requeued(to_outbound=1, to_held=1),
                      queue.held: Requeued(to_outbound=1),
                      queue.deferred: Requeued(to_held=1), queue.fresh: Requeued(to_held=1)}
    mixed = queue.recipients(queue.mixed)
    assert mixed["jo@example.org"] == (OUTBOUND, 0, None, clock.now)  # due now
    assert mixed["kim@remote.test"] == (HELD, 1, "421 timeout", None)  # attempts kept
    assert mixed["lee@other.test"][0] == OUTBOUND  # not hosted before or now
    assert queue.recipients(queue.held)["bob@example.org"] == (
        OUTBOUND, held_before[1], held_before[2], clock.now)
    assert queue.recipients(queue.deferred)["frank@remote.test"] == (
        HELD, 2, "451 4.7.1 greylisted", None)
    # The queues see them where they are now.
    assert store.held_message_ids(["remote.test"]) == named(queue, "deferred", "mixed", "fresh")
    assert store.held_message_ids(["example.org"]) == []
    due = store.claim_due_outbound(clock.now, 10, "runner", 60)
    assert {(m.id, r.address) for m in due for r in m.recipients} == {
        (queue.mixed, "jo@example.org"), (queue.mixed, "lee@other.test"),
        (queue.held, "bob@example.org")}
    # Once more: nothing left to change.
    store.release_claims("runner")
    assert set(store.requeue_messages(named(queue, *ORDER), clock.now).values()) == {Requeued()}
    assert store.requeue_messages([], clock.now) == {}
    assert store.requeue_messages(["000000000000"], clock.now) == {}


def test_requeue_corrects_what_release_restores(queue: Queue) -> None:
    store, clock = queue.store, queue.clock
    store.hold_messages([queue.mixed])
    assert store.remove_domain("example.org")
    store.add_domain(Domain("other.test", "acme"))
    assert store.requeue_messages([queue.mixed], clock.now) == {queue.mixed: Requeued(on_hold=2)}
    # Still on hold: requeue does not release.
    assert {r[0] for r in queue.recipients(queue.mixed).values()} == {HOLD}
    entry = store.get_queue_entry(queue.mixed)
    assert entry is not None
    assert dict(entry.hold_from) == {
        queue.rid(queue.mixed, "jo@example.org"): OUTBOUND,
        queue.rid(queue.mixed, "kim@remote.test"): OUTBOUND,
        queue.rid(queue.mixed, "lee@other.test"): HELD}
    assert store.release_messages([queue.mixed]) == {queue.mixed: 3}
    states = {a: r[0] for a, r in queue.recipients(queue.mixed).items()}
    assert states == {"jo@example.org": OUTBOUND, "kim@remote.test": OUTBOUND,
                      "lee@other.test": HELD}


def test_requeue_leaves_claimed_recipients_alone(queue: Queue,
                                                 store_factory: StoreFactory) -> None:
    runner, clock = queue.store, queue.clock
    tools = store_factory()  # the operator's command, another process
    [got] = runner.claim_due_outbound(clock.now, 1, "runner", 600)
    assert got.id == queue.fresh
    tools.add_domain(Domain("remote.test", "acme"))
    result = tools.requeue_messages([queue.fresh, queue.deferred], clock.now)
    assert result == {queue.fresh: Requeued(), queue.deferred: Requeued(to_held=1)}
    assert queue.recipients(queue.fresh)["dave@remote.test"][0] == OUTBOUND
    # Its claim ended (the runner gave it back): now it moves.
    runner.release_claims("runner")
    assert tools.requeue_messages([queue.fresh], clock.now) == {queue.fresh: Requeued(to_held=1)}


# --- figures --------------------------------------------------------------------------------


def test_queue_shape(queue: Queue) -> None:
    s, r = queue.sizes, queue.received
    shape = queue.store.queue_shape(queue.clock.now, AGES)
    assert shape.domains == (
        DomainShape("example.org", 3, 3, s[queue.held] + s[queue.hold] + s[queue.mixed],
                    r[queue.hold], held=2, outbound=0, deferred=0, hold=1, ages=(1, 1, 0, 1)),
        DomainShape("remote.test", 3, 3, s[queue.fresh] + s[queue.deferred] + s[queue.mixed],
                    r[queue.deferred], held=0, outbound=3, deferred=2, hold=0,
                    ages=(0, 2, 1, 0)),
        DomainShape("other.test", 1, 1, s[queue.mixed], r[queue.mixed], held=0, outbound=1,
                    deferred=0, hold=0, ages=(0, 1, 0, 0)),
    )
    assert shape.total == DomainShape("", 5, 7, sum(s.values()), r[queue.hold], held=2,
                                      outbound=4, deferred=2, hold=1, ages=(1, 4, 1, 1))


def test_queue_shape_buckets_and_empty(store: Store, clock: Clock) -> None:
    empty = store.queue_shape(clock.now, AGES)
    assert empty.total == DomainShape("", 0, 0, 0, None, 0, 0, 0, 0, (0, 0, 0, 0))
    assert empty.domains == ()
    for age in (0.0, 59.0, 60.0, 119.0, 120.0, 1e6):
        clock.now -= age
        store.enqueue(msg("a@x.example"), io.BytesIO(b"12"))
        clock.now += age
    shape = store.queue_shape(clock.now, [60.0, 120.0])
    # Bucket i: ages below limit i and at least limit i - 1; the last, the rest.
    assert shape.total.ages == (2, 2, 2)
    assert shape.total.bytes == 12 and shape.total.oldest == clock.now - 1e6
    # Most recipients first, ties by name.
    store.enqueue(msg("a@w.example", "b@w.example", "c@w.example", "d@w.example", "e@w.example",
                      "f@w.example", "g@w.example"), io.BytesIO(b"1"))
    store.enqueue(msg("a@v.example"), io.BytesIO(b"1"))
    store.enqueue(msg("a@u.example"), io.BytesIO(b"1"))
    assert [d.domain for d in store.queue_shape(clock.now, AGES).domains] == [
        "w.example", "x.example", "u.example", "v.example"]


def test_queue_shape_without_age_limits(store: Store, clock: Clock) -> None:
    for age in (0.0, 1e6):
        clock.now -= age
        store.enqueue(msg("a@x.example"), io.BytesIO(b"12"))
        clock.now += age
    shape = store.queue_shape(clock.now, [])
    assert shape.total.ages == (2,) and [d.ages for d in shape.domains] == [(2,)]


def test_queue_summary(queue: Queue) -> None:
    s, r = queue.sizes, queue.received
    summary = queue.store.queue_summary()
    assert [row[0] for row in summary] == [str(state) for state in RecipientState]
    # A message with recipients in several states counts in each.
    assert {row[0]: row[1:] for row in summary} == {
        "held": (2, s[queue.held] + s[queue.mixed], r[queue.mixed]),
        "outbound": (3, s[queue.fresh] + s[queue.deferred] + s[queue.mixed], r[queue.deferred]),
        "hold": (1, s[queue.hold], r[queue.hold]),
    }


def test_queue_summary_of_an_empty_store(store: Store) -> None:
    assert store.queue_summary() == [(str(state), 0, 0, None) for state in RecipientState]


# --- the plans of a domain filter (small domain: from its recipients; large:
# --- messages in page order), which must give the same pages ----------------------------


@pytest.fixture(params=["small", "large"])
def domain_plan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with the engines' usual threshold (these domains are small), or with
    every domain taken as large (threshold 0)."""
    if request.param == "large":
        import fermoposta.store.pg_tools as pg_tools
        import fermoposta.store.sqlite_tools as sqlite_tools

        monkeypatch.setattr(sqlite_tools, "SMALL_DOMAIN", 0)
        monkeypatch.setattr(pg_tools, "SMALL_DOMAIN", 0)
    return str(request.param)


def test_domain_filter_over_several_domains_and_states(store: Store, clock: Clock,
                                                       domain_plan: str) -> None:
    tools = store
    made: dict[str, tuple[float, str]] = {}
    specs = {  # name: recipients (address, state); three share each received_at
        "two_in_d": [("a@d.example", HELD), ("b@d.example", OUTBOUND)],
        "d_and_e": [("c@e.example", HELD), ("d@d.example", HOLD)],
        "e_only": [("e@e.example", HELD)],
        "d_outbound": [("f@d.example", OUTBOUND), ("g@e.example", HELD)],
        "f_only": [("h@f.example", OUTBOUND)],
        "d_held": [("i@D.example", HELD)],
        "d_again": [("j@d.example", HELD), ("k@d.example", HELD)],
    }
    for i, (name, recipients) in enumerate(specs.items()):
        if i % 3 == 0:
            clock.now += 1
        mid = store.enqueue(NewMessage("s@x.example", tuple(rcpt(a, s) for a, s in recipients),
                                       MessageOrigin.MX), io.BytesIO(b"m"))
        made[name] = (clock.now, mid)

    def keys(*names: str) -> list[tuple[float, str]]:
        return sorted(made[n] for n in names)

    def pages(where: QueueFilter, size: int) -> list[tuple[float, str]]:
        seen: list[tuple[float, str]] = []
        after: tuple[float, str] | None = None
        while True:
            page = tools.queue_ids(where, after, size)
            entries = tools.queue_page(where, after, size)
            assert [(e.message.received_at, e.message.id) for e in entries] == page
            seen += page
            if len(page) < size:
                # The count query counts what the pages found, by either plan.
                assert tools.count_queue(where) == len(seen)
                return seen
            after = page[-1]

    in_d = keys("two_in_d", "d_and_e", "d_outbound", "d_held", "d_again")
    for size in (1, 2, 3, 100):  # pages across equal received_at
        assert pages(QueueFilter(domain="d.example"), size) == in_d
    assert pages(QueueFilter(domain="d.example", state="held"), 2) == keys(
        "two_in_d", "d_held", "d_again")
    assert pages(QueueFilter(domain="d.example", state="outbound"), 1) == keys(
        "two_in_d", "d_outbound")
    assert pages(QueueFilter(domain="d.example", state="hold"), 2) == keys("d_and_e")
    # Every criterion on one recipient: d_and_e's HELD one is at e.example.
    assert pages(QueueFilter(domain="e.example", state="hold"), 2) == []
    assert pages(QueueFilter(domain="d.example", recipient="c@e.example",
                             recipient_exact=True), 2) == []
    assert pages(QueueFilter(domain="d.example", recipient="j"), 2) == keys("d_again")
    assert pages(QueueFilter(domain="d.example", sender="nobody"), 2) == []
    assert pages(QueueFilter(domain="nowhere.example"), 2) == []
    # An older-than bound, and a key of a message that is gone.
    cut = made["d_held"][0]
    assert pages(QueueFilter(domain="d.example", received_before=cut), 2) == keys(
        "two_in_d", "d_and_e")  # d_outbound arrived with d_held
    store.delete_messages([made["d_and_e"][1]])
    assert tools.queue_ids(QueueFilter(domain="d.example"), made["d_and_e"], 10) == [
        k for k in in_d if k > made["d_and_e"]]


def test_queue_shape_counts_a_message_once_per_domain(store: Store, clock: Clock) -> None:
    clock.now -= 30 * MINUTE
    both = store.enqueue(NewMessage("s@x.example", (
        rcpt("a@d.example", HELD), rcpt("b@d.example", HOLD), rcpt("c@e.example", OUTBOUND)),
        MessageOrigin.MX), io.BytesIO(b"12345"))
    clock.now += 30 * MINUTE
    store.enqueue(msg("x@d.example", "y@d.example"), io.BytesIO(b"123"))
    assert both
    shape = store.queue_shape(clock.now, AGES)
    assert shape.domains == (
        DomainShape("d.example", 2, 4, 8, clock.now - 30 * MINUTE, held=3, outbound=0,
                    deferred=0, hold=1, ages=(2, 2, 0, 0)),
        DomainShape("e.example", 1, 1, 5, clock.now - 30 * MINUTE, held=0, outbound=1,
                    deferred=0, hold=0, ages=(0, 1, 0, 0)),
    )
    assert shape.total == DomainShape("", 2, 5, 8, clock.now - 30 * MINUTE, held=3,
                                      outbound=1, deferred=0, hold=1, ages=(2, 3, 0, 0))
