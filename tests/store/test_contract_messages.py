"""Store contract, messages and bodies: `enqueue` is atomic and durable, bodies
stream in bounded chunks, recipients leave only through `record_delivered` /
`record_failed`, a message goes with its last recipient, a DSN is queued in
the same transaction and only for a recipient still queued, and an engine
failure is a `StoreError`.  Run on every engine (see conftest.py)."""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import threading
import tracemalloc

import pytest

from fermoposta.store.base import (
    CHUNK_SIZE,
    MessageOrigin,
    NewMessage,
    NewRecipient,
    RecipientState,
    Store,
    StoreError,
)
from fermoposta.store.sqlite import SQLiteStore

from .contract import (
    HELD,
    OUTBOUND,
    Clock,
    StoreFactory,
    all_ids,
    body_of,
    dsn_for,
    msg,
    rcpt,
    rcpt_ids,
)


def assert_queue_empty(store: Store) -> None:
    """Nothing queued, as every public view of the queue tells it."""
    assert all_ids(store) == []
    shape = store.queue_shape(2e9, [60.0])
    assert (shape.total.messages, shape.total.recipients, shape.total.bytes) == (0, 0, 0)
    assert shape.domains == ()
    assert [(m, b) for _, m, b, _ in store.queue_summary()] == [(0, 0)] * len(RecipientState)


def test_enqueue_and_read_back_multichunk(store: Store, clock: Clock) -> None:
    data = os.urandom(CHUNK_SIZE * 2 + 12345)
    message = NewMessage(
        sender="",
        recipients=(
            NewRecipient("A@Ex.Example", "ex.example", HELD, notify="SUCCESS,FAILURE",
                         orcpt="rfc822;A@Ex.Example"),
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
    assert (q.id, q.sender, q.size, q.received_at, q.origin) == (
        mid, "", len(data), clock.now, MessageOrigin.MX)
    assert (q.smtputf8, q.body_8bit, q.envid, q.ret, q.client) == (
        True, True, "ENV1", "HDRS", "mx.peer[192.0.2.1]")
    (r,) = q.recipients
    assert (r.message_id, r.address, r.domain, r.state, r.attempts, r.last_reply) == (
        mid, "A@Ex.Example", "ex.example", HELD, 0, None)
    assert (r.notify, r.orcpt) == ("SUCCESS,FAILURE", "rfc822;A@Ex.Example")
    assert (r.next_attempt_at, r.first_failure_at, r.delay_notified) == (None, None, False)


def test_defaults_round_trip(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example", origin=MessageOrigin.SUBMISSION), io.BytesIO(b"x"))
    q = store.get_message(mid)
    assert q is not None
    assert (q.sender, q.origin, q.smtputf8, q.body_8bit, q.envid, q.ret, q.client) == (
        "s@sender.example", MessageOrigin.SUBMISSION, False, False, None, None, "")
    assert (q.recipients[0].notify, q.recipients[0].orcpt) == (None, None)


@pytest.mark.parametrize("size", [5, CHUNK_SIZE * 2 + 7])  # one statement, or chunks
def test_wire_ready_round_trips_and_defaults_to_false(store: Store, size: int) -> None:
    body = b"x" * size
    ready = NewMessage("s@sender.example", (rcpt("a@x.example"),), MessageOrigin.MX,
                       wire_ready=True)
    plain = NewMessage("s@sender.example", (rcpt("a@x.example"),), MessageOrigin.MX)
    ids = [store.enqueue(ready, io.BytesIO(body)), store.enqueue(plain, io.BytesIO(body)),
           *store.enqueue_batch([(ready, io.BytesIO(body), None),
                                 (plain, io.BytesIO(body), None)])]
    got = [store.get_message(mid) for mid in ids]
    assert [m.wire_ready if m else None for m in got] == [True, False, True, False]
    entry = store.get_queue_entry(ids[0])
    assert entry is not None and entry.message.wire_ready


def test_recipients_in_the_order_given(store: Store) -> None:
    addresses = [f"r{i}@{d}.example" for i, d in enumerate("zyxwvu")]
    mid = store.enqueue(msg(*addresses), io.BytesIO(b"b"))
    q = store.get_message(mid)
    assert q is not None and [r.address for r in q.recipients] == addresses
    assert len({r.id for r in q.recipients}) == len(addresses)


def test_empty_body(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b""))
    assert list(store.read_body(mid)) == []
    m = store.get_message(mid)
    assert m is not None and m.size == 0


def test_body_of_exactly_one_chunk(store: Store) -> None:
    data = b"c" * CHUNK_SIZE
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(data))
    assert list(store.read_body(mid)) == [data]


def test_unknown_message(store: Store) -> None:
    assert store.get_message("000000000000") is None
    with pytest.raises(StoreError):
        store.read_body("000000000000")


def test_read_body_raises_if_message_vanishes(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"x" * (CHUNK_SIZE + 1)))
    it = store.read_body(mid)
    assert next(it) == b"x" * CHUNK_SIZE
    store.record_delivered(rcpt_ids(store, mid).values(), "250 ok")
    with pytest.raises(StoreError):  # not a short body that looks complete
        next(it)


def test_read_ahead_gives_messages_and_small_bodies_in_order(store: Store) -> None:
    small = store.enqueue(msg("a@x.example", "b@y.example", "c@x.example"),
                          io.BytesIO(b"small body\r\n"))
    empty = store.enqueue(msg("d@x.example"), io.BytesIO(b""))
    exact = store.enqueue(msg("e@x.example"), io.BytesIO(b"e" * CHUNK_SIZE))
    big = store.enqueue(msg("f@x.example"), io.BytesIO(b"f" * (CHUNK_SIZE + 1)))
    over_limit = store.enqueue(msg("g@x.example"), io.BytesIO(b"g" * 100))
    ids = [exact, "000000000000", big, small, over_limit, empty, small]
    got = store.read_ahead(ids, CHUNK_SIZE)
    assert [m.id if m else None for m, _ in got] == [exact, None, big, small, over_limit,
                                                      empty, small]
    # Each message is what get_message says, recipients in their order.
    for message, _ in got:
        if message is not None:
            assert message == store.get_message(message.id)
    assert [r.address for r in got[3][0].recipients] == ["a@x.example", "b@y.example",
                                                         "c@x.example"]
    assert [body for _, body in got] == [b"e" * CHUNK_SIZE, None, None, b"small body\r\n",
                                         b"g" * 100, b"", b"small body\r\n"]
    # Bodies over the limit are left to read_body.
    limited = store.read_ahead([small, over_limit], 50)
    assert [body for _, body in limited] == [b"small body\r\n", None]
    assert store.read_ahead([], CHUNK_SIZE) == []


def test_read_ahead_bodies_stay_within_the_budget_in_id_order(store: Store) -> None:
    ids = [store.enqueue(msg(f"r{i}@x.example"), io.BytesIO(bytes([65 + i]) * 100))
           for i in range(5)]
    empty = store.enqueue(msg("e@x.example"), io.BytesIO(b""))
    wanted = [ids[3], ids[0], empty, ids[4], ids[1], ids[2]]
    got = store.read_ahead(wanted, CHUNK_SIZE, 250)
    # The first two bodies in the order asked fit; the third would pass 250
    # bytes, so it and the rest are left to read_body (the empty body costs
    # nothing).  Every message is there all the same.
    assert [m.id if m else None for m, _ in got] == wanted
    assert [body for _, body in got] == [b"D" * 100, b"A" * 100, b"", None, None, None]
    assert [body for _, body in store.read_ahead(wanted, CHUNK_SIZE, 0)] == [
        None, None, b"", None, None, None]


def test_read_ahead_of_many_messages(store: Store) -> None:
    # More ids than SQLite takes in one statement: batched inside, one answer.
    ids = store.enqueue_batch([(msg(f"r{i}@x.example"), io.BytesIO(f"body {i}".encode()), None)
                               for i in range(1100)])
    wanted = ids[::-1]
    got = store.read_ahead(wanted, CHUNK_SIZE)
    assert [(m.id if m else None, b) for m, b in got] == [
        (mid, f"body {ids.index(mid)}".encode()) for mid in wanted]


def test_read_ahead_leaves_a_body_that_does_not_add_up_to_read_body(store: Store) -> None:
    # A body whose chunk no longer matches the message's size (it was being
    # removed between the two reads) is None: the drain's read_body reports it.
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"whole body"))
    sql = "UPDATE body_chunks SET data = {} WHERE message_id = {}"
    if isinstance(store, SQLiteStore):
        with contextlib.closing(sqlite3.connect(store._path)) as raw, raw:
            raw.execute(sql.format("?", "?"), (b"whole", mid))
    else:
        with store._pool.connection() as raw:  # type: ignore[attr-defined]
            raw.execute(sql.format("%s", "%s"), (b"whole", mid))
    [(message, body)] = store.read_ahead([mid], CHUNK_SIZE)
    assert message is not None and message.size == len(b"whole body")
    assert body is None


def test_read_ahead_without_the_message_of_a_delivered_one(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"x"))
    store.record_delivered(rcpt_ids(store, mid).values(), "250 ok")
    assert store.read_ahead([mid], CHUNK_SIZE) == [(None, None)]


def test_queue_id_collision_retries(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from fermoposta.store import base

    # One 1/256 s slot (time part 00001), and random parts that repeat; the
    # clock and the randomness replaced for the queue ids alone.
    monkeypatch.setattr(base, "time", types.SimpleNamespace(time=lambda: 1 / 256))
    values = iter([0xAAAAAAA, 0xAAAAAAA, 0xBBBBBBB])
    monkeypatch.setattr(base, "secrets",
                        types.SimpleNamespace(randbits=lambda bits: next(values)))
    first = store.enqueue(msg("a@x.example"), io.BytesIO(b"1"))
    second = store.enqueue(msg("a@x.example"), io.BytesIO(b"2"))
    assert (first, second) == ("00001AAAAAAA", "00001BBBBBBB")
    assert body_of(store, first) == b"1"
    assert body_of(store, second) == b"2"


def test_given_queue_id_is_used_and_a_colliding_one_replaced(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"1"), queue_id="0123456789AB")
    assert mid == "0123456789AB"
    other = store.enqueue(msg("b@x.example"), io.BytesIO(b"2"), queue_id="0123456789AB")
    assert other != mid and len(other) == 12
    assert (body_of(store, mid), body_of(store, other)) == (b"1", b"2")
    m = store.get_message(mid)
    assert m is not None and [r.address for r in m.recipients] == ["a@x.example"]


def test_a_colliding_id_is_replaced_for_a_body_of_several_chunks(store: Store) -> None:
    big = bytes(range(256)) * (CHUNK_SIZE // 128 + 7)  # three chunks
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"1"), queue_id="0123456789AB")
    other = store.enqueue(msg("b@x.example", "c@x.example"), io.BytesIO(big),
                          queue_id="0123456789AB")
    assert other != mid
    assert (body_of(store, mid), body_of(store, other)) == (b"1", big)
    first, second = store.get_message(mid), store.get_message(other)
    assert first is not None and second is not None
    assert [r.address for r in first.recipients] == ["a@x.example"]
    assert [r.address for r in second.recipients] == ["b@x.example", "c@x.example"]
    assert (first.size, second.size) == (1, len(big))


def test_durable_and_visible_after_reopen(store_factory: StoreFactory) -> None:
    s1 = store_factory()
    mid = s1.enqueue(msg("a@x.example"), io.BytesIO(b"hello"))
    s1.close()
    s2 = store_factory()
    assert body_of(s2, mid) == b"hello"
    assert s2.held_message_ids(["x.example"]) == [mid]


def test_invisible_until_enqueue_returns(store_factory: StoreFactory) -> None:
    writer = store_factory()
    reader = store_factory()
    seen: list[tuple[list[str], list[str]]] = []

    class Body(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            seen.append((reader.held_message_ids(["x.example"]), all_ids(reader)))
            return super().read(size)

    mid = writer.enqueue(msg("a@x.example"), Body(b"z" * (CHUNK_SIZE + 10)))
    assert len(seen) >= 2 and all(s == ([], []) for s in seen)
    assert reader.held_message_ids(["x.example"]) == [mid]
    assert body_of(reader, mid) == b"z" * (CHUNK_SIZE + 10)


def test_failed_body_read_leaves_nothing(store: Store) -> None:
    class Broken(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            if self.tell() > 0:
                raise OSError("disk gone")
            return super().read(size)

    with pytest.raises(StoreError):
        store.enqueue(msg("a@x.example"), Broken(b"x" * (CHUNK_SIZE * 2)))
    assert store.held_message_ids(["x.example"]) == []
    assert_queue_empty(store)
    # The store still works after the rollback.
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"ok"))
    assert all_ids(store) == [mid] and body_of(store, mid) == b"ok"


def test_other_body_errors_propagate_unchanged(store: Store) -> None:
    class Broken(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            raise RuntimeError("caller bug")

    with pytest.raises(RuntimeError, match="caller bug"):
        store.enqueue(msg("a@x.example"), Broken(b"x"))
    assert_queue_empty(store)


def test_delivered_keeps_other_recipients_then_deletes(store: Store) -> None:
    mid = store.enqueue(msg("a@one.example", "b@two.example"), io.BytesIO(b"body"))
    ids = rcpt_ids(store, mid)
    assert store.record_delivered([ids["a@one.example"]], "250 2.0.0 ok") is None
    m = store.get_message(mid)
    assert m is not None and [r.address for r in m.recipients] == ["b@two.example"]
    assert store.held_message_ids(["one.example"]) == []
    assert store.held_message_ids(["two.example"]) == [mid]
    assert body_of(store, mid) == b"body"
    store.record_delivered([ids["b@two.example"]], "250 2.0.0 ok")
    # The last recipient took the message and its body with it.
    assert store.get_message(mid) is None
    with pytest.raises(StoreError):
        store.read_body(mid)
    assert store.get_queue_entry(mid) is None
    assert_queue_empty(store)
    store.record_delivered([ids["b@two.example"]], "250 again")  # idempotent
    store.record_delivered([], "250")
    assert_queue_empty(store)


def test_delivered_leaves_other_messages_alone(store: Store) -> None:
    keep = store.enqueue(msg("k@x.example"), io.BytesIO(b"keep"))
    gone = store.enqueue(msg("g@x.example"), io.BytesIO(b"gone"))
    store.record_delivered(rcpt_ids(store, gone).values(), "250 ok")
    assert all_ids(store) == [keep] and body_of(store, keep) == b"keep"


def test_delivered_with_a_success_notice(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example", "b@x.example", state=OUTBOUND), io.BytesIO(b"b"))
    ids = rcpt_ids(store, mid)
    notice = store.record_delivered([ids["a@x.example"]], "250 ok", dsn_for())
    assert notice is not None and notice != mid
    assert body_of(store, notice) == b"DSN\r\n"
    n = store.get_message(notice)
    assert n is not None and n.origin == MessageOrigin.DSN and n.sender == ""
    assert [(r.address, r.state) for r in n.recipients] == [("s@sender.example", OUTBOUND)]
    # Already delivered: no second notice.
    assert store.record_delivered([ids["a@x.example"]], "250 ok", dsn_for()) is None
    assert sorted(all_ids(store)) == sorted([mid, notice])


def test_deferred(store: Store, clock: Clock) -> None:
    mid = store.enqueue(msg("a@x.example", "b@x.example"), io.BytesIO(b"b"))
    ids = rcpt_ids(store, mid)
    store.record_deferred([ids["a@x.example"]], "451 4.3.0 later")
    clock.now += 10
    store.record_deferred([ids["a@x.example"]], "452 4.2.2 full")
    m = store.get_message(mid)
    assert m is not None
    a, b = m.recipients
    assert (a.attempts, a.last_reply, a.state) == (2, "452 4.2.2 full", HELD)
    assert a.first_failure_at == clock.now - 10  # the first deferral's time is kept
    assert (b.attempts, b.last_reply, b.first_failure_at) == (0, None, None)
    assert store.held_message_ids(["x.example"]) == [mid]  # deferring keeps the row
    assert body_of(store, mid) == b"b"


def test_failed_with_dsn_is_atomic(store: Store) -> None:
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
    assert all_ids(store) == [mid]  # and no half-written DSN

    dsn_id = store.record_failed([ids["a@x.example"]], "550 5.1.1 no", (dsn, io.BytesIO(b"DSN")))
    assert dsn_id is not None and dsn_id != mid
    assert body_of(store, dsn_id) == b"DSN"
    d = store.get_message(dsn_id)
    assert d is not None and d.origin == MessageOrigin.DSN and d.recipients[0].state == OUTBOUND
    m = store.get_message(mid)
    assert m is not None and [r.address for r in m.recipients] == ["b@x.example"]
    assert store.record_failed([ids["b@x.example"]], "550", None) is None
    assert store.get_message(mid) is None
    assert all_ids(store) == [dsn_id]


def test_failed_twice_reports_once(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example", state=OUTBOUND), io.BytesIO(b"b"))
    rid = rcpt_ids(store, mid)["a@x.example"]
    first = store.record_failed([rid], "550 no", dsn_for())
    assert first is not None
    assert store.get_message(mid) is None
    # Already gone: no second DSN.
    assert store.record_failed([rid], "550 no", dsn_for()) is None
    assert all_ids(store) == [first]


def test_failed_partly_gone_still_reports_the_rest(store: Store) -> None:
    mid = store.enqueue(msg("a@x.example", "b@x.example", state=OUTBOUND), io.BytesIO(b"b"))
    ids = rcpt_ids(store, mid)
    store.record_delivered([ids["a@x.example"]], "250 ok")
    dsn_id = store.record_failed(ids.values(), "550 no", dsn_for())
    assert dsn_id is not None
    assert store.get_message(mid) is None and all_ids(store) == [dsn_id]


def test_concurrent_enqueue_threads(store: Store) -> None:
    done: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                done.append(store.enqueue(msg("a@x.example"), io.BytesIO(b"x" * 1000)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.domain_usage("x.example") == (40, 40_000)
    assert sorted(all_ids(store)) == sorted(done) and len(set(done)) == 40


def test_concurrent_reads_and_writes_across_stores(store_factory: StoreFactory) -> None:
    stores = [store_factory() for _ in range(3)]
    errors: list[BaseException] = []

    def work(s: Store) -> None:
        try:
            for i in range(8):
                mid = s.enqueue(msg(f"r{i}@x.example"), io.BytesIO(b"y" * 300))
                assert body_of(s, mid) == b"y" * 300
                s.record_deferred(rcpt_ids(s, mid).values(), "451 later")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert stores[0].domain_usage("x.example") == (24, 24 * 300)


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


def test_big_body_bounded_memory(store: Store) -> None:
    size = 50 * 1024 * 1024
    tracemalloc.start()
    try:
        mid = store.enqueue(msg("a@x.example"), io.BufferedReader(_Stream(size)))
        total = 0
        for chunk in store.read_body(mid):
            assert len(chunk) <= CHUNK_SIZE and chunk == b"m" * len(chunk)
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert peak < 10 * 1024 * 1024
    m = store.get_message(mid)
    assert m is not None and m.size == size


# --- Spool: the queue read whole (customer spools) ------------------------------------------


def test_message_ids_oldest_first_and_by_state(store: Store, clock: Clock) -> None:
    held = store.enqueue(msg("a@x.example"), io.BytesIO(b"1"))
    clock.now += 1
    mixed = store.enqueue(NewMessage("s@sender.example", (
        rcpt("b@x.example", HELD), rcpt("c@y.example", OUTBOUND)), MessageOrigin.MX),
        io.BytesIO(b"2"))
    out = store.enqueue(msg("d@y.example", state=OUTBOUND), io.BytesIO(b"3"))  # same time
    clock.now -= 5
    old_hold = store.enqueue(msg("e@x.example", state=RecipientState.HOLD), io.BytesIO(b"4"))
    same_time = sorted([mixed, out])
    assert store.message_ids() == [old_hold, held, *same_time]
    assert store.message_ids(HELD) == [held, mixed]
    assert store.message_ids(OUTBOUND) == same_time
    assert store.message_ids(RecipientState.HOLD) == [old_hold]
    assert store.recipient_count() == 5
    store.record_delivered(rcpt_ids(store, mixed).values(), "250 ok")
    assert store.message_ids() == [old_hold, held, out]
    assert store.message_ids(HELD) == [held]
    assert store.recipient_count() == 3


def test_message_ids_and_count_of_an_empty_store(store: Store) -> None:
    assert store.message_ids() == [] and store.recipient_count() == 0
    assert all(store.message_ids(state) == [] for state in RecipientState)

