"""Store contract, the `Importer` (the receiving side of `fermoposta store
copy`): `is_empty` sees any account, domain or message; `import_message`
stores a message exactly as its `QueueEntry` has it (id, arrival, node,
parameters, every recipient's state, retry record and remembered hold
state), without claims, in one transaction, and refuses an id that exists.
Run on every engine: a message is exported with `get_queue_entry` /
`read_body`, deleted, and imported back."""

from __future__ import annotations

import io

import pytest

from fermoposta.store.base import (
    Account,
    Domain,
    MessageOrigin,
    NewMessage,
    QueuedRecipient,
    QueueEntry,
    Store,
    StoreError,
)

from .contract import HELD, HOLD, OUTBOUND, Clock, StoreFactory, body_of, rcpt, rcpt_ids


def test_is_empty(store_factory: StoreFactory) -> None:
    store = store_factory()
    assert store.is_empty()
    store.add_account(Account("alice", None, None))
    assert not store.is_empty()
    store.add_domain(Domain("a.example", "alice"))
    assert not store.is_empty()
    assert store.remove_account("alice")  # and its domain with it
    assert store.is_empty()
    mid = store.enqueue(NewMessage("", (rcpt("x@b.example"),), MessageOrigin.MX),
                        io.BytesIO(b"m"))
    assert not store.is_empty()
    assert not store_factory().is_empty()  # whoever asks
    assert store.delete_messages([mid]) == [mid]
    assert store.is_empty()


def _recipient_record(r: QueuedRecipient) -> tuple[object, ...]:
    """A recipient without its id (import gives new ones)."""
    return (r.message_id, r.address, r.domain, r.state, r.attempts, r.last_reply, r.notify,
            r.orcpt, r.next_attempt_at, r.first_failure_at, r.delay_notified)


def _exported(store: Store, clock: Clock) -> tuple[QueueEntry, bytes]:
    """A message on operator hold (from HELD and OUTBOUND, with a retry record
    and a delay notice), exported."""
    store.add_account(Account("acme", None, None))
    store.add_domain(Domain("hosted.example", "acme"))
    message = NewMessage(
        sender="s@sender.example",
        recipients=(
            rcpt("held@hosted.example", HELD, notify="SUCCESS", orcpt="rfc822;held@hosted.example"),
            rcpt("Out@Remote.Example", OUTBOUND),
            rcpt("later@remote.example", OUTBOUND),
            rcpt("onhold@remote.example", OUTBOUND),
        ),
        origin=MessageOrigin.SUBMISSION, smtputf8=True, body_8bit=True, envid="E1", ret="HDRS",
        client="c[192.0.2.9]")
    data = b"x" * 300_000  # more than one chunk
    mid = store.enqueue(message, io.BytesIO(data))
    ids = rcpt_ids(store, mid)
    clock.now += 30
    store.record_deferred([ids["later@remote.example"], ids["onhold@remote.example"]],
                          "451 later", clock.now + 600)
    store.mark_delay_notified([ids["later@remote.example"]])
    store.hold_messages([mid])  # every recipient on HOLD, its state remembered
    entry = store.get_queue_entry(mid)
    assert entry is not None
    assert set(entry.hold_from.values()) == {HELD, OUTBOUND}
    return entry, data


def test_import_message_round_trip(store: Store, clock: Clock) -> None:
    entry, data = _exported(store, clock)
    mid = entry.message.id
    assert store.delete_messages([mid]) == [mid]
    store.import_message(entry, io.BytesIO(data))
    got = store.get_queue_entry(mid)
    assert got is not None
    m, want = got.message, entry.message
    assert (m.id, m.sender, m.received_at, m.size, m.origin, m.smtputf8, m.body_8bit, m.envid,
            m.ret, m.client, m.node) == (
        want.id, want.sender, want.received_at, want.size, want.origin, want.smtputf8,
        want.body_8bit, want.envid, want.ret, want.client, want.node)
    assert [_recipient_record(r) for r in m.recipients] == [
        _recipient_record(r) for r in want.recipients]
    # The remembered states follow the recipients to their new ids.
    by_address = {r.address: r.id for r in m.recipients}
    old_address = {r.id: r.address for r in want.recipients}
    assert dict(got.hold_from) == {by_address[old_address[i]]: s
                                   for i, s in entry.hold_from.items()}
    assert body_of(store, mid) == data
    # Released, each recipient is back in the state it had before the hold.
    assert store.release_messages([mid]) == {mid: 4}
    states = {r.address: r.state for r in (store.get_message(mid) or want).recipients}
    assert states == {"held@hosted.example": HELD, "Out@Remote.Example": OUTBOUND,
                      "later@remote.example": OUTBOUND, "onhold@remote.example": OUTBOUND}
    assert store.held_message_ids(["hosted.example"]) == [mid]


def test_import_keeps_wire_ready(store: Store) -> None:
    """`store copy` moves the flag with the message (else the copy would
    only be slower: False always sends safely)."""
    for ready in (True, False):
        mid = store.enqueue(NewMessage("", (rcpt("x@y.example"),), MessageOrigin.MX,
                                       wire_ready=ready), io.BytesIO(b"1\r\n"))
        entry = store.get_queue_entry(mid)
        assert entry is not None and entry.message.wire_ready is ready
        store.delete_messages([mid])
        store.import_message(entry, io.BytesIO(b"1\r\n"))
        got = store.get_message(mid)
        assert got is not None and got.wire_ready is ready


def test_import_keeps_the_node_of_the_entry(store_factory: StoreFactory) -> None:
    a = store_factory(node="node-a")
    b = store_factory(node="node-b")
    mid = a.enqueue(NewMessage("", (rcpt("x@y.example"),), MessageOrigin.MX), io.BytesIO(b"1"))
    entry = a.get_queue_entry(mid)
    assert entry is not None
    a.delete_messages([mid])
    b.import_message(entry, io.BytesIO(b"1"))
    got = a.get_message(mid)
    assert got is not None and got.node == "node-a"


def test_claims_are_not_imported(store: Store, clock: Clock) -> None:
    mid = store.enqueue(NewMessage("s@x.example", (rcpt("a@r.example", OUTBOUND),),
                                   MessageOrigin.SUBMISSION), io.BytesIO(b"b"))
    [claimed] = store.claim_due_outbound(clock.now, 10, "runner", 600)
    entry = store.get_queue_entry(mid)
    assert entry is not None and entry.active == frozenset({claimed.recipients[0].id})
    store.delete_messages([mid])
    store.import_message(entry, io.BytesIO(b"b"))
    got = store.get_queue_entry(mid)
    assert got is not None and got.active == frozenset()
    assert [m.id for m in store.claim_due_outbound(clock.now + 1e6, 10, "new", 60)] == [mid]


def test_import_refuses_an_existing_id(store: Store) -> None:
    mid = store.enqueue(NewMessage("", (rcpt("a@x.example"),), MessageOrigin.MX),
                        io.BytesIO(b"original"))
    entry = store.get_queue_entry(mid)
    assert entry is not None
    with pytest.raises(ValueError):
        store.import_message(entry, io.BytesIO(b"copy"))
    assert body_of(store, mid) == b"original"
    got = store.get_message(mid)
    assert got is not None and len(got.recipients) == 1


def test_a_failed_import_leaves_nothing(store: Store) -> None:
    mid = store.enqueue(NewMessage("", (rcpt("a@x.example"), rcpt("b@x.example", HOLD)),
                                   MessageOrigin.MX), io.BytesIO(b"z" * 300_000))
    entry = store.get_queue_entry(mid)
    assert entry is not None
    store.delete_messages([mid])

    class Broken(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            if self.tell() > 0:
                raise OSError("source gone")
            return super().read(size)

    with pytest.raises((OSError, StoreError)):
        store.import_message(entry, Broken(b"z" * 300_000))
    assert store.get_message(mid) is None and store.message_ids() == []
    assert store.recipient_count() == 0 and store.is_empty()
    store.import_message(entry, io.BytesIO(b"z" * 300_000))  # a retry works
    assert store.message_ids() == [mid]
