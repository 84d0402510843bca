"""PostgreSQL enqueue in one round trip: messages whose bodies are one chunk
go as one statement for all (`_insert_many_query`; a lone one
`_insert_whole_query`), a transaction by itself on an autocommit connection
(`PostgresStore._write_one_statement`).  What this file proves:

- such a batch takes no three-trip transaction, and stores what it was given
  (every column, recipients in order); a lone message sends one statement
  and neither BEGIN, COMMIT nor a pipeline, and every case below holds for
  it too;
- a queue id that collides fails the statement (nothing stored) and the
  slower way draws a fresh one, the older message untouched, with no
  ROLLBACK sent for a transaction that is not there;
- a connection that broke with the statement's fate unknown is resolved
  from our rows (queue id, node, arrival): stored once if it was applied,
  stored again (once) if it never was, also when an older message has the
  same id; a pool whose connections a restart broke is not seen;
- a statement that fails partway (a recipient the schema refuses) stores
  nothing of the batch, and the store goes on working.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import pq

from fermoposta.store.base import (
    CHUNK_SIZE,
    MessageOrigin,
    NewMessage,
    NewRecipient,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    StoreError,
)
from fermoposta.store.pg_rows import CommitUnknown
from fermoposta.store.postgres import PostgresStore
from support.pg import fresh_schema

from .contract import all_ids, body_of, msg, rcpt_ids


@pytest.fixture
def store() -> Iterator[PostgresStore]:
    with fresh_schema() as (_, url):
        opened = PostgresStore(url, pool_size=3)
        try:
            yield opened
        finally:
            opened.close()


def _batch(n: int, tag: str = "m") -> list[tuple[Any, io.BytesIO, str | None]]:
    return [(msg(f"{tag}{i}@x.example"), io.BytesIO(b"%s %d\r\n" % (tag.encode(), i)), None)
            for i in range(n)]


def test_one_chunk_bodies_take_no_three_trip_transaction(store: PostgresStore,
                                                         monkeypatch) -> None:
    def no(what: str) -> None:
        raise AssertionError(f"a three-trip transaction for {what}")

    monkeypatch.setattr(store, "_write", no)
    ids = store.enqueue_batch(_batch(5))
    single = store.enqueue(msg("one@x.example"), io.BytesIO(b"one\r\n"), "AAAAAAAAAAA9")
    assert single == "AAAAAAAAAAA9"
    assert sorted(all_ids(store)) == sorted([*ids, single])
    assert [body_of(store, i) for i in ids] == [b"m %d\r\n" % i for i in range(5)]
    assert list(rcpt_ids(store, ids[3])) == ["m3@x.example"]


def test_a_body_of_several_chunks_still_goes_in_a_transaction(store: PostgresStore) -> None:
    big = b"y" * (2 * CHUNK_SIZE + 7)
    ids = store.enqueue_batch([(msg("a@x.example"), io.BytesIO(b"small"), None),
                               (msg("b@x.example"), io.BytesIO(big), None)])
    assert [body_of(store, i) for i in ids] == [b"small", big]


def test_bodies_after_a_big_one_are_read_as_they_go_in(store: PostgresStore) -> None:
    """Heads are read up to the first body of several chunks only (memory);
    the transaction reads the rest itself, in order."""
    read: list[str] = []

    class Watched(io.BytesIO):
        def __init__(self, name: str, data: bytes) -> None:
            super().__init__(data)
            self.name = name

        def read(self, size: int | None = -1, /) -> bytes:
            read.append(self.name)
            return super().read(size)

    big = b"B" * (CHUNK_SIZE + 3)
    bodies = [Watched("small", b"s"), Watched("big", big), Watched("after", b"a"),
              Watched("big2", big + b"2")]
    ids = store.enqueue_batch([(msg(f"u{i}@x.example"), body, None)
                               for i, body in enumerate(bodies)])
    assert [body_of(store, i) for i in ids] == [b"s", big, b"a", big + b"2"]
    assert read.index("after") > max(i for i, name in enumerate(read) if name == "big")


def test_a_colliding_id_draws_a_fresh_one_in_one_trip(store: PostgresStore) -> None:
    taken = store.enqueue(msg("old@x.example"), io.BytesIO(b"old"), "AAAAAAAAAAA1")
    ids = store.enqueue_batch([(msg("a@x.example"), io.BytesIO(b"a"), "AAAAAAAAAAA2"),
                               (msg("b@x.example"), io.BytesIO(b"b"), taken)])
    assert ids[0] == "AAAAAAAAAAA2" and ids[1] not in (taken, "AAAAAAAAAAA2")
    assert [body_of(store, i) for i in ids] == [b"a", b"b"]
    assert body_of(store, taken) == b"old"  # the message that had the id is untouched
    assert len(all_ids(store)) == 3


@pytest.mark.parametrize("size", [1, 3])
def test_a_commit_applied_before_the_connection_broke_is_stored_once(
        store: PostgresStore, monkeypatch, size: int) -> None:
    real = store._write_one_statement

    def applied_then_broke(what, statement):  # type: ignore[no-untyped-def]
        real(what, statement)
        raise CommitUnknown("server closed the connection unexpectedly (test)")

    monkeypatch.setattr(store, "_write_one_statement", applied_then_broke)
    ids = store.enqueue_batch(_batch(size))
    assert sorted(all_ids(store)) == sorted(ids)  # each message once, not twice
    assert [body_of(store, i) for i in ids] == [b"m %d\r\n" % i for i in range(size)]


def test_a_commit_that_never_reached_the_server_is_made_again(
        store: PostgresStore, monkeypatch) -> None:
    def broke_before(what, statements):  # type: ignore[no-untyped-def]
        raise CommitUnknown("server closed the connection unexpectedly (test)")

    monkeypatch.setattr(store, "_write_one_statement", broke_before)
    ids = store.enqueue_batch([(msg("a@x.example"), io.BytesIO(b"a"), "AAAAAAAAAAA3"),
                               (msg("b@x.example"), io.BytesIO(b"b"), None)])
    assert ids[0] == "AAAAAAAAAAA3"  # stored the slower way, under the ids it had
    assert sorted(all_ids(store)) == sorted(ids)
    assert [body_of(store, i) for i in ids] == [b"a", b"b"]


def test_connections_a_restart_broke_are_not_seen(store: PostgresStore) -> None:
    first = store.enqueue(msg("a@x.example"), io.BytesIO(b"before"))
    pooled = [store._pool.getconn() for _ in range(3)]
    backends = [conn.info.backend_pid for conn in pooled]
    for conn in pooled:
        store._pool.putconn(conn)
    with psycopg.connect(store._url, autocommit=True) as admin:  # as a restart would
        for pid in backends:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    ids = store.enqueue_batch(_batch(2, "after"))
    assert sorted(all_ids(store)) == sorted([first, *ids])  # each stored once
    assert [body_of(store, i) for i in ids] == [b"after 0\r\n", b"after 1\r\n"]


def test_a_lost_statement_names_its_server_backend(store: PostgresStore) -> None:
    # So that the enqueue can wait for that backend to go before it looks
    # for its rows (`_found_after_loss`).
    pooled = [store._pool.getconn() for _ in range(3)]
    backends = {conn.info.backend_pid for conn in pooled}
    for conn in pooled:
        store._pool.putconn(conn)
    with psycopg.connect(store._url, autocommit=True) as admin:
        for pid in backends:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(CommitUnknown) as lost:
        store._write_one_statement("test", lambda conn: conn.execute("SELECT 1"))
    assert lost.value.backend_pid in backends


def _refused_by_the_schema() -> NewMessage:
    """A message whose last recipient breaks a NOT NULL constraint: its
    statement fails after the rows before it were written."""
    return NewMessage(sender="s@x.example", origin=MessageOrigin.MX, recipients=(
        NewRecipient("a@x.example", "x.example", RecipientState.HELD),
        NewRecipient("b@x.example", None, RecipientState.HELD)))  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [1, 3])
def test_a_statement_that_fails_partway_stores_nothing(store: PostgresStore,
                                                       size: int) -> None:
    batch = [*_batch(size - 1), (_refused_by_the_schema(), io.BytesIO(b"bad"), None)]
    with pytest.raises(StoreError, match="null value"):
        store.enqueue_batch(batch)
    assert all_ids(store) == []
    assert store._query("count", "SELECT (SELECT count(*) FROM body_chunks)"
                        " + (SELECT count(*) FROM recipients)")[0][0] == 0
    for _ in range(4):  # every pooled connection works again
        ids = store.enqueue_batch(_batch(2, "ok"))
        assert [body_of(store, i) for i in ids] == [b"ok 0\r\n", b"ok 1\r\n"]
    assert len(all_ids(store)) == 8


def test_a_batch_in_one_statement_keeps_every_column_and_the_recipients_order(
        store: PostgresStore) -> None:
    """What one statement for the batch stores is what one message at a time
    stores: every column of the message and of each recipient, recipient ids
    in the order given, an empty body as no chunk at all."""
    rich = NewMessage(
        sender="s@x.example", origin=MessageOrigin.SUBMISSION, smtputf8=True, body_8bit=True,
        envid="ENV+2B1", ret="HDRS", client="c.example[192.0.2.1]", wire_ready=True,
        recipients=(NewRecipient("z@b.example", "b.example", RecipientState.OUTBOUND,
                                 notify="SUCCESS,FAILURE", orcpt="rfc822;z@b.example"),
                    NewRecipient("a@a.example", "a.example", RecipientState.HELD),
                    NewRecipient("m@b.example", "b.example", RecipientState.OUTBOUND,
                                 notify="NEVER")))
    plain = msg("p@x.example")
    items = [(rich, b"rich\r\n"), (plain, b""), (rich, b"again\r\n")]
    batch = store.enqueue_batch([(m, io.BytesIO(b), None) for m, b in items])
    alone = [store.enqueue(m, io.BytesIO(b)) for m, b in items]
    for in_batch, by_itself in zip(batch, alone, strict=True):
        got, want = _message(store, in_batch), _message(store, by_itself)
        assert body_of(store, in_batch) == body_of(store, by_itself)
        for field in ("sender", "origin", "smtputf8", "body_8bit", "envid", "ret", "client",
                      "wire_ready", "size", "node"):
            assert getattr(got, field) == getattr(want, field), field
        assert _recipients(got) == _recipients(want)
        assert got.received_at == pytest.approx(want.received_at, abs=60)
        assert got.size == len(body_of(store, in_batch))
    # The columns the queue tools read, and no chunk row for the empty body.
    rows = store._query("columns", "SELECT r.message_id, r.attempts, r.message_size,"
                        " r.message_received_at, r.updated_at, m.received_at, m.size"
                        " FROM recipients r JOIN messages m ON m.id = r.message_id"
                        " WHERE r.message_id = ANY(%s)", (batch,))
    assert len(rows) == 7
    for _, attempts, message_size, message_received_at, updated_at, received_at, size in rows:
        assert attempts == 0 and message_size == size
        assert message_received_at == received_at == updated_at
    assert store._query("chunks", "SELECT count(*) FROM body_chunks WHERE message_id = %s",
                        (batch[1],))[0][0] == 0
    # Recipient ids follow the batch's order: message by message, as given.
    stored = [r for i in batch for r in sorted(_message(store, i).recipients, key=_by_id)]
    assert [r.address for r in stored] == [r.address for m, _ in items for r in m.recipients]
    assert [r.id for r in stored] == sorted(r.id for r in stored)


def _message(store: PostgresStore, message_id: str) -> QueuedMessage:
    found = store.get_message(message_id)
    assert found is not None, message_id
    return found


def _by_id(r: QueuedRecipient) -> int:
    return r.id


def _recipients(m: QueuedMessage) -> list[tuple[object, ...]]:
    return [(r.address, r.domain, r.state, r.notify, r.orcpt)
            for r in sorted(m.recipients, key=_by_id)]


def test_a_lost_commit_is_not_mistaken_for_an_older_message_with_the_same_id(
        store: PostgresStore, monkeypatch) -> None:
    taken = store.enqueue(msg("old@x.example"), io.BytesIO(b"old"), "AAAAAAAAAAA4")

    def broke_before(what, statements):  # type: ignore[no-untyped-def]
        raise CommitUnknown("server closed the connection unexpectedly (test)")

    monkeypatch.setattr(store, "_write_one_statement", broke_before)
    [new] = store.enqueue_batch([(msg("a@x.example"), io.BytesIO(b"new"), taken)])
    assert new != taken  # stored, under a fresh id: not taken for the older one
    assert body_of(store, new) == b"new" and body_of(store, taken) == b"old"
    assert sorted(all_ids(store)) == sorted([taken, new])


def test_part_of_a_batch_found_after_a_lost_connection_is_an_error(
        store: PostgresStore, monkeypatch) -> None:
    def broke(what, statements):  # type: ignore[no-untyped-def]
        raise CommitUnknown("server closed the connection unexpectedly (test)")

    monkeypatch.setattr(store, "_write_one_statement", broke)
    monkeypatch.setattr(store, "_query", lambda what, sql, params=(): [(1,)])  # 1 of 2
    with pytest.raises(StoreError, match="cannot tell whether the commit was applied"):
        store.enqueue_batch(_batch(2))


# --- a lone message: its one statement, a transaction by itself ----------------------------


class _Counting:
    """A connection whose `execute` calls are counted (the rest passes)."""

    def __init__(self, conn: psycopg.Connection[Any], sent: list[str]) -> None:
        self._conn, self._sent = conn, sent

    def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self._sent.append(query.split()[0])
        return self._conn.execute(query, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_a_lone_message_or_a_batch_is_one_statement_without_begin_or_pipeline(
        store: PostgresStore, monkeypatch) -> None:
    def no(*args: object) -> None:
        raise AssertionError("a three-trip transaction")

    monkeypatch.setattr(store, "_write", no)
    sent: list[str] = []
    real_statement = store._write_one_statement

    def watched(what, statement):  # type: ignore[no-untyped-def]
        def recording(conn):  # type: ignore[no-untyped-def]
            # Autocommit, nothing begun, no pipeline: the statement is its
            # own transaction, committed when its reply comes.
            assert conn.autocommit
            assert conn.info.transaction_status == pq.TransactionStatus.IDLE
            assert conn.pgconn.pipeline_status == pq.PipelineStatus.OFF
            cursor = statement(_Counting(conn, sent))
            assert conn.info.transaction_status == pq.TransactionStatus.IDLE
            return cursor
        return real_statement(what, recording)

    monkeypatch.setattr(store, "_write_one_statement", watched)
    mid = store.enqueue(msg("one@x.example"), io.BytesIO(b"one\r\n"), "AAAAAAAAAAB1")
    assert mid == "AAAAAAAAAAB1" and sent == ["WITH"]
    ids = store.enqueue_batch(_batch(3))
    assert sent == ["WITH", "WITH"]  # the batch too: one statement
    assert body_of(store, mid) == b"one\r\n"
    assert list(rcpt_ids(store, mid)) == ["one@x.example"]
    assert [body_of(store, i) for i in ids] == [b"m %d\r\n" % i for i in range(3)]


def test_a_lone_message_with_a_taken_id_gets_a_fresh_one(store: PostgresStore,
                                                        monkeypatch) -> None:
    taken = store.enqueue(msg("old@x.example"), io.BytesIO(b"old"), "AAAAAAAAAAB2")
    left_open: list[object] = []
    real_statement = store._write_one_statement

    def watched(what, statement):  # type: ignore[no-untyped-def]
        def failing(conn):  # type: ignore[no-untyped-def]
            try:
                return statement(conn)
            finally:  # before the pool gets it back (and would roll back)
                left_open.append(conn.info.transaction_status)
        return real_statement(what, failing)

    # The failed statement leaves no transaction for anyone to roll back.
    monkeypatch.setattr(store, "_write_one_statement", watched)
    again = store.enqueue(msg("new@x.example"), io.BytesIO(b"new"), taken)
    assert left_open == [pq.TransactionStatus.IDLE]
    assert again != taken
    assert body_of(store, again) == b"new" and body_of(store, taken) == b"old"
    assert sorted(all_ids(store)) == sorted([taken, again])
    for _ in range(4):  # every pooled connection works on
        body_of(store, store.enqueue(msg("ok@x.example"), io.BytesIO(b"ok")))


def test_a_lone_message_that_never_reached_the_server_is_stored_again(
        store: PostgresStore, monkeypatch) -> None:
    def broke_before(what, statement):  # type: ignore[no-untyped-def]
        raise CommitUnknown("server closed the connection unexpectedly (test)")

    monkeypatch.setattr(store, "_write_one_statement", broke_before)
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"a"), "AAAAAAAAAAB4")
    assert mid == "AAAAAAAAAAB4" and all_ids(store) == [mid]
    assert body_of(store, mid) == b"a"


def test_a_lone_message_on_a_connection_a_restart_broke(store: PostgresStore) -> None:
    pooled = [store._pool.getconn() for _ in range(3)]
    backends = [conn.info.backend_pid for conn in pooled]
    for conn in pooled:
        store._pool.putconn(conn)
    with psycopg.connect(store._url, autocommit=True) as admin:
        for pid in backends:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"after"))
    assert all_ids(store) == [mid] and body_of(store, mid) == b"after"


def test_a_lone_message_whose_statement_fails_stores_nothing(
        store: PostgresStore, monkeypatch) -> None:
    monkeypatch.setattr(store, "_insert_whole_query",
                        lambda conn, *args, **options: conn.execute("SELECT 1 / 0"))
    with pytest.raises(StoreError, match="division by zero"):
        store.enqueue(msg("a@x.example"), io.BytesIO(b"a"))
    assert all_ids(store) == []


@pytest.mark.parametrize("size", [1, 3])
def test_a_statement_that_wrote_fewer_messages_than_given_is_an_error(
        store: PostgresStore, monkeypatch, size: int) -> None:
    """Each id the enqueue returns is answered 250: the statement's count of
    the messages it wrote must be all of them, else it is an error."""
    def wrote_none(conn, *args, **options):  # type: ignore[no-untyped-def]
        return conn.execute("SELECT 0")

    monkeypatch.setattr(store, "_insert_whole_query", wrote_none)
    monkeypatch.setattr(store, "_insert_many_query", wrote_none)
    with pytest.raises(StoreError, match=f"wrote 0 of {size} messages"):
        store.enqueue_batch(_batch(size))
