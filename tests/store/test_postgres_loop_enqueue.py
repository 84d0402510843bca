"""PostgreSQL's `enqueue_async` and `enqueue_batch_async`: messages stored by
the event loop on a connection of its own (`store/pg_loop_enqueue.py`).  What this file proves:

- the message is one statement on the loop's connection (not the pool's),
  kept across calls, and stored with its queue id and body;
- `WouldBlock`, with nothing stored and the body where it was, while the
  connection is being made (in the background) or busy with another
  message, for a body over one chunk, a taken queue id, a connection lost
  before the statement was applied, and (without trying again for `RETRY`
  s) a connection that cannot be made; the loop's connection is made again
  afterwards;
- a statement applied before its connection broke gives its id (stored
  once), told after the backend that ran it is gone (terminated and waited
  for); a failed look for its rows, a body that cannot be read, or a
  database error, is `StoreError`;
- a cancelled enqueue leaves the connection fit for the next; at
  `GroupCommit`, a cancelled caller does not cut the commit short, nor its
  count and `on_stored`;
- `GroupCommit`: messages that come while the loop's statement is under way
  wait for it, then go together in one batch, itself one statement on the
  loop's connection;
- `enqueue_batch_async`: several messages in one statement on that
  connection, all or none; `WouldBlock` with every body where it was for a
  body over one chunk, a taken queue id, a connection lost before the
  statement; applied before the connection broke: the ids, and a look
  that finds some but not all, or a statement that counts fewer, is
  `StoreError`; at `GroupCommit`, a batch refused there, or that failed
  after reading its bodies, is stored one by one in a worker thread, each
  body whole; one cut by the shutdown leaves none of its callers, nor the
  messages waiting behind it, waiting.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import psycopg
import pytest

from fermoposta.store import pg_loop_enqueue
from fermoposta.store.base import CHUNK_SIZE, StoreError, WouldBlock
from fermoposta.store.group_commit import GroupCommit
from fermoposta.store.postgres import PostgresStore

from .contract import all_ids, body_of, msg
from .test_postgres_enqueue import _refused_by_the_schema
from .test_postgres_enqueue import store as store  # the fixture: a PostgresStore, fresh schema


def _enqueue(store: PostgresStore, body: io.BytesIO, queue_id: str | None = None,
             message: Any = None) -> str:
    async def main() -> str:
        await store.open_loop_connection()
        return await store.enqueue_async(message or msg("a@x.example"), body, queue_id)

    return asyncio.run(main())


def _terminate(store: PostgresStore, pid: int) -> None:
    with psycopg.connect(store._url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _forbid_the_pool(store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def no(*args: object) -> None:
        raise AssertionError("the pool was used")

    monkeypatch.setattr(store, "_write_one_statement", no)
    monkeypatch.setattr(store, "_write", no)


def test_a_lone_message_is_one_statement_on_the_loops_own_connection(
        store: PostgresStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _forbid_the_pool(store, monkeypatch)

    async def main() -> tuple[str, str, int, int]:
        body = io.BytesIO(b"one\r\n")
        with pytest.raises(WouldBlock):  # not connected: nobody waits for it
            await store.enqueue_async(msg("a@x.example"), body)
        assert body.tell() == 0
        await store.open_loop_connection()  # (it was being made meanwhile)
        first = await store.enqueue_async(msg("a@x.example"), io.BytesIO(b"one\r\n"),
                                          "AAAAAAAAAAA1")
        assert store._loop_conn is not None
        pid = store._loop_conn.info.backend_pid
        second = await store.enqueue_async(msg("b@x.example"), io.BytesIO(b"two\r\n"))
        return first, second, pid, store._loop_conn.info.backend_pid

    first, second, pid, pid_after = asyncio.run(main())
    assert first == "AAAAAAAAAAA1" and pid == pid_after  # one connection, kept
    monkeypatch.undo()
    assert sorted(all_ids(store)) == sorted([first, second])
    assert body_of(store, first) == b"one\r\n" and body_of(store, second) == b"two\r\n"
    assert [r.address for r in store.get_message(second).recipients] == ["b@x.example"]


def test_a_body_over_one_chunk_would_block(store: PostgresStore) -> None:
    body = io.BytesIO(b"y" * (CHUNK_SIZE + 1))
    with pytest.raises(WouldBlock):
        _enqueue(store, body)
    assert body.tell() == 0 and all_ids(store) == []
    whole = io.BytesIO(b"z" * CHUNK_SIZE)
    assert body_of(store, _enqueue(store, whole)) == b"z" * CHUNK_SIZE


def test_a_taken_queue_id_would_block_and_stores_nothing(store: PostgresStore) -> None:
    store.enqueue(msg("old@x.example"), io.BytesIO(b"older"), "AAAAAAAAAAA2")
    body = io.BytesIO(b"newer")
    with pytest.raises(WouldBlock):
        _enqueue(store, body, "AAAAAAAAAAA2")
    assert body.tell() == 0  # put back for the thread's enqueue, which draws a fresh id
    assert all_ids(store) == ["AAAAAAAAAAA2"] and body_of(store, "AAAAAAAAAAA2") == b"older"
    fresh = store.enqueue(msg("a@x.example"), body, "AAAAAAAAAAA2")
    assert fresh != "AAAAAAAAAAA2" and body_of(store, fresh) == b"newer"


def test_a_connection_lost_before_the_statement_would_block_then_comes_back(
        store: PostgresStore) -> None:
    async def main() -> tuple[str, str]:
        await store.open_loop_connection()
        first = await store.enqueue_async(msg("a@x.example"), io.BytesIO(b"1"))
        assert store._loop_conn is not None
        _terminate(store, store._loop_conn.info.backend_pid)  # as a server restart would
        body = io.BytesIO(b"2")
        with pytest.raises(WouldBlock):
            await store.enqueue_async(msg("b@x.example"), body, "AAAAAAAAAAA3")
        assert body.tell() == 0 and store._loop_conn is None
        assert "AAAAAAAAAAA3" not in all_ids(store)  # never applied
        await store.open_loop_connection()
        third = await store.enqueue_async(msg("c@x.example"), io.BytesIO(b"3"))
        return first, third

    first, third = asyncio.run(main())
    assert sorted(all_ids(store)) == sorted([first, third])


def test_a_statement_applied_before_its_connection_broke_gives_its_id(
        store: PostgresStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real = pg_loop_enqueue._first_row

    async def applied_then_broke(cursor):  # type: ignore[no-untyped-def]
        await real(cursor)  # the statement is applied and its reply read...
        conn = store._loop_conn
        assert conn is not None
        _terminate(store, conn.info.backend_pid)
        await conn.execute("SELECT 1")  # ...and the connection breaks: OperationalError

    monkeypatch.setattr(pg_loop_enqueue, "_first_row", applied_then_broke)
    queue_id = _enqueue(store, io.BytesIO(b"once"), "AAAAAAAAAAA4")
    assert queue_id == "AAAAAAAAAAA4"
    assert all_ids(store) == ["AAAAAAAAAAA4"] and body_of(store, queue_id) == b"once"


def test_a_failed_look_for_the_rows_is_a_store_error(store: PostgresStore,
                                                      monkeypatch) -> None:
    def look_fails(pid: int, ids: list[str], now: float) -> int:
        raise StoreError("PostgreSQL store: unreachable (test)")

    async def main() -> None:
        await store.open_loop_connection()
        await store.enqueue_async(msg("a@x.example"), io.BytesIO(b"1"))
        assert store._loop_conn is not None
        _terminate(store, store._loop_conn.info.backend_pid)
        monkeypatch.setattr(store, "_found_after_loss", look_fails)
        await store.enqueue_async(msg("b@x.example"), io.BytesIO(b"2"))

    with pytest.raises(StoreError, match="unreachable"):
        asyncio.run(main())


def test_a_database_error_is_a_store_error_and_the_connection_goes_on(
        store: PostgresStore) -> None:
    async def main() -> str:
        await store.open_loop_connection()
        with pytest.raises(StoreError, match="enqueue failed"):
            await store.enqueue_async(_refused_by_the_schema(), io.BytesIO(b"bad"))
        return await store.enqueue_async(msg("a@x.example"), io.BytesIO(b"good"))

    good = asyncio.run(main())
    assert all_ids(store) == [good]


def test_a_connection_that_cannot_be_made_is_not_tried_again_at_once(
        store: PostgresStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    attempts = []
    real_connect = psycopg.AsyncConnection.connect

    async def refused(*args: object, **kwargs: object) -> None:
        attempts.append(1)
        raise psycopg.OperationalError("connection refused (test)")

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", refused)

    async def main() -> None:
        for _ in range(3):
            with pytest.raises(WouldBlock):
                await store.enqueue_async(msg("a@x.example"), io.BytesIO(b"x"))
            await store.open_loop_connection()  # the attempt under way ends

    asyncio.run(main())
    assert len(attempts) == 1  # then WouldBlock at once, for RETRY seconds
    monkeypatch.setattr(psycopg.AsyncConnection, "connect", real_connect)
    store._loop_conn_retry_at = 0.0  # RETRY seconds later
    queue_id = _enqueue(store, io.BytesIO(b"x"))
    assert all_ids(store) == [queue_id]


def test_a_cancelled_enqueue_leaves_the_connection_fit_for_the_next(
        store: PostgresStore) -> None:
    admin = psycopg.connect(store._url)
    admin.execute("LOCK TABLE messages IN EXCLUSIVE MODE")  # the INSERT waits for it

    async def main() -> str:
        await store.open_loop_connection()
        caller = asyncio.ensure_future(
            store.enqueue_async(msg("a@x.example"), io.BytesIO(b"1"), "AAAAAAAAAAA5"))
        try:
            await asyncio.sleep(0.3)
            waiting = not caller.done()
            caller.cancel()  # psycopg cancels the statement on the server
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(caller, 20)
        finally:
            await asyncio.to_thread(admin.rollback)
        assert waiting
        return await store.enqueue_async(msg("b@x.example"), io.BytesIO(b"2"))

    try:
        after = asyncio.run(main())
    finally:
        admin.close()
    assert all_ids(store) == [after]  # the cancelled statement stored nothing


def test_each_loop_gets_its_own_connection_and_close_ends_it(store: PostgresStore) -> None:
    _enqueue(store, io.BytesIO(b"1"))
    first = store._loop_conn
    _enqueue(store, io.BytesIO(b"2"))  # another asyncio.run: another loop
    second = store._loop_conn
    assert first is not None and second is not None and first is not second
    assert first.closed and len(all_ids(store)) == 2
    store.close()
    assert second.closed
    with pytest.raises(StoreError, match="closed"):
        _enqueue(store, io.BytesIO(b"3"))


def test_messages_that_come_meanwhile_wait_and_go_together(store: PostgresStore) -> None:
    batches: list[int] = []
    real_batch = store.enqueue_batch_async

    async def counting_batch(items):  # type: ignore[no-untyped-def]
        batches.append(len(items))
        return await real_batch(items)

    def no_thread(items):  # type: ignore[no-untyped-def]
        raise AssertionError("a worker thread stored the batch")

    store.enqueue_batch_async = counting_batch  # type: ignore[method-assign]
    store.enqueue_batch = no_thread  # type: ignore[method-assign]
    group = GroupCommit(store)
    admin = psycopg.connect(store._url)
    admin.execute("LOCK TABLE messages IN EXCLUSIVE MODE")

    async def main() -> list[str]:
        await store.open_loop_connection()
        lone = asyncio.ensure_future(group.enqueue(msg("lone@x.example"), io.BytesIO(b"0")))
        await asyncio.sleep(0.2)  # its statement waits for the lock, on the loop's connection
        others = [asyncio.ensure_future(group.enqueue(msg(f"u{i}@x.example"),
                                                      io.BytesIO(b"%d" % i)))
                  for i in range(1, 4)]
        try:
            await asyncio.sleep(0.2)
            waited = not any(o.done() for o in others) and batches == []
        finally:
            await asyncio.to_thread(admin.rollback)  # (a failure must not hang on the lock)
        assert waited  # they waited for it
        return [await asyncio.wait_for(t, 20) for t in [lone, *others]]

    try:
        ids = asyncio.run(main())
    finally:
        admin.close()
    # The batch of three, on the loop's connection too, in one statement.
    assert group.inline_commits == 4 and batches == [3] and group.commits == 2
    assert sorted(all_ids(store)) == sorted(ids)
    assert [body_of(store, i) for i in ids] == [b"0", b"1", b"2", b"3"]


def test_the_connection_busy_with_a_message_would_block_for_another(
        store: PostgresStore) -> None:
    admin = psycopg.connect(store._url)
    admin.execute("LOCK TABLE messages IN EXCLUSIVE MODE")

    async def main() -> str:
        await store.open_loop_connection()
        first = asyncio.ensure_future(
            store.enqueue_async(msg("a@x.example"), io.BytesIO(b"1"), "AAAAAAAAAAA6"))
        try:
            await asyncio.sleep(0.2)
            body = io.BytesIO(b"2")
            with pytest.raises(WouldBlock):  # at once, not after the first
                await asyncio.wait_for(store.enqueue_async(msg("b@x.example"), body), 1)
            assert body.tell() == 0
        finally:
            await asyncio.to_thread(admin.rollback)
        return await asyncio.wait_for(first, 20)

    try:
        assert asyncio.run(main()) == "AAAAAAAAAAA6"
    finally:
        admin.close()
    assert all_ids(store) == ["AAAAAAAAAAA6"]


def test_a_body_that_cannot_be_read_is_a_store_error(store: PostgresStore) -> None:
    class Unreadable(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError("spool read failed")

    with pytest.raises(StoreError, match="cannot read the body"):
        _enqueue(store, Unreadable(b"x"))
    assert all_ids(store) == []
    assert _enqueue(store, io.BytesIO(b"y"))  # the connection was left free


def test_a_lost_connections_backend_is_ended_before_its_row_is_looked_for(
        store: PostgresStore) -> None:
    # A backend still running (only our side of the connection died) could
    # yet commit: it is terminated and waited for, then the row decides.
    other = psycopg.connect(store._url)
    pid = other.info.backend_pid
    now = 1234.5
    other.execute("INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
                  " body_8bit, client, node) VALUES ('AAAAAAAAAAA7', '', %s, 0, 'mx', false,"
                  " false, '', %s)", (now, store.node))  # not committed yet
    try:
        assert store._found_after_loss(pid, ["AAAAAAAAAAA7"], now) == 0
        with psycopg.connect(store._url) as admin:
            assert admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                 (pid,)).fetchone() == (0,)
        assert all_ids(store) == []
        store.enqueue(msg("a@x.example"), io.BytesIO(b"x"), "AAAAAAAAAAA8")
        row = store._query("t", "SELECT received_at FROM messages WHERE id = 'AAAAAAAAAAA8'")
        assert store._found_after_loss(pid, ["AAAAAAAAAAA8"], float(row[0][0])) == 1
    finally:
        other.close()


def test_a_cancelled_group_commit_caller_leaves_the_commit_to_finish(
        store: PostgresStore) -> None:
    reported: list[str] = []
    group = GroupCommit(store, on_stored=lambda ms: reported.extend(
        m.recipients[0].address for m in ms))
    admin = psycopg.connect(store._url)
    admin.execute("LOCK TABLE messages IN EXCLUSIVE MODE")

    async def main() -> None:
        await store.open_loop_connection()
        caller = asyncio.ensure_future(group.enqueue(msg("gone@x.example"), io.BytesIO(b"1")))
        try:
            await asyncio.sleep(0.2)
            caller.cancel()  # the client went away mid-commit
            await asyncio.sleep(0.05)
            assert group._on_loop is not None  # still under way: others would wait
        finally:
            await asyncio.to_thread(admin.rollback)
        for _ in range(200):
            if group._on_loop is None:
                break
            await asyncio.sleep(0.02)

    try:
        asyncio.run(main())
    finally:
        admin.close()
    assert len(all_ids(store)) == 1  # stored without its 250: a duplicate at worst
    assert reported == ["gone@x.example"] and group.committed == 1 and group.commits == 1


def test_a_connection_made_after_the_store_closed_is_not_kept(
        store: PostgresStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    made: list[psycopg.AsyncConnection[Any]] = []
    real_connect = psycopg.AsyncConnection.connect

    async def connect(*args: Any, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
        made.append(await real_connect(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", connect)

    async def main() -> None:
        with pytest.raises(WouldBlock):
            await store.enqueue_async(msg("a@x.example"), io.BytesIO(b"x"))  # connecting
        connecting = store._loop_connecting
        assert connecting is not None
        store._closed = True  # as close() from the provider's shutdown, meanwhile
        await connecting

    try:
        asyncio.run(main())
    finally:
        store._closed = False  # for the fixture's close()
    assert store._loop_conn is None and len(made) == 1 and made[0].closed


def test_a_commit_task_cancelled_before_it_ran_leaves_nothing_waiting(
        store: PostgresStore) -> None:
    group = GroupCommit(store)

    async def main() -> str:
        await store.open_loop_connection()
        caller = asyncio.ensure_future(group.enqueue(msg("a@x.example"), io.BytesIO(b"1")))
        await asyncio.sleep(0)  # the caller made the commit's task, not yet run
        [work] = [t for t in asyncio.all_tasks()
                  if t.get_coro().__name__ == "_store_on_loop"]  # type: ignore[union-attr]
        # A message that comes meanwhile waits for that commit, in a batch...
        other = asyncio.ensure_future(group.enqueue(msg("b@x.example"), io.BytesIO(b"2")))
        work.cancel()  # ...which is cancelled before it ran, as at the loop's shutdown
        with pytest.raises(asyncio.CancelledError):
            await caller
        queue_id = await asyncio.wait_for(other, 10)  # not waiting for it forever
        # The lone commit stored nothing; the batch after it went on the
        # loop's connection too.
        assert group._on_loop is None and group.inline_commits == 1
        return queue_id

    queue_id = asyncio.run(main())
    assert all_ids(store) == [queue_id]


# --- batches on the loop's connection (enqueue_batch_async) --------------------------------


def _batch_async(store: PostgresStore, items: list[tuple[Any, io.BytesIO, str | None]]
                 ) -> list[str]:
    async def main() -> list[str]:
        await store.open_loop_connection()
        return await store.enqueue_batch_async(items)

    return asyncio.run(main())


def _items(n: int, first: str | None = None) -> list[tuple[Any, io.BytesIO, str | None]]:
    return [(msg(f"u{i}@x.example", f"v{i}@y.example"), io.BytesIO(b"body %d\r\n" % i),
             first if i == 0 else None) for i in range(n)]


def test_a_batch_is_one_statement_on_the_loops_own_connection(
        store: PostgresStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _forbid_the_pool(store, monkeypatch)
    statements: list[str] = []
    real = store._insert_many_statement

    def noting(whole, now):  # type: ignore[no-untyped-def]
        statements.append("many")
        return real(whole, now)

    monkeypatch.setattr(store, "_insert_many_statement", noting)
    ids = _batch_async(store, _items(3, "AAAAAAAAAAB1"))
    monkeypatch.undo()
    assert statements == ["many"] and ids[0] == "AAAAAAAAAAB1" and len(set(ids)) == 3
    assert sorted(all_ids(store)) == sorted(ids)
    assert [body_of(store, i) for i in ids] == [b"body %d\r\n" % i for i in range(3)]
    assert [[r.address for r in store.get_message(i).recipients] for i in ids] == [
        [f"u{i}@x.example", f"v{i}@y.example"] for i in range(3)]


def test_a_batch_with_a_body_over_one_chunk_would_block(store: PostgresStore) -> None:
    items = _items(3)
    items[2] = (items[2][0], io.BytesIO(b"y" * (CHUNK_SIZE + 1)), None)
    items[0][1].seek(2)  # a body need not start at 0: it is put back where it was
    with pytest.raises(WouldBlock):
        _batch_async(store, items)
    assert [body.tell() for _, body, _ in items] == [2, 0, 0] and all_ids(store) == []


def test_a_batch_with_a_taken_queue_id_would_block_and_stores_none(
        store: PostgresStore) -> None:
    store.enqueue(msg("old@x.example"), io.BytesIO(b"older"), "AAAAAAAAAAB2")
    items = _items(3)
    items[1] = (items[1][0], items[1][1], "AAAAAAAAAAB2")
    with pytest.raises(WouldBlock):
        _batch_async(store, items)
    assert [body.tell() for _, body, _ in items] == [0, 0, 0]  # all read, all put back
    assert all_ids(store) == ["AAAAAAAAAAB2"] and body_of(store, "AAAAAAAAAAB2") == b"older"


def test_a_batch_lost_before_its_statement_would_block(store: PostgresStore) -> None:
    async def main() -> list[tuple[Any, io.BytesIO, str | None]]:
        await store.open_loop_connection()
        assert store._loop_conn is not None
        _terminate(store, store._loop_conn.info.backend_pid)
        items = _items(2)
        with pytest.raises(WouldBlock):
            await store.enqueue_batch_async(items)
        return items

    items = asyncio.run(main())
    assert [body.tell() for _, body, _ in items] == [0, 0] and all_ids(store) == []


@pytest.mark.parametrize("found", ["all", "some"])
def test_a_batch_applied_before_its_connection_broke(
        store: PostgresStore, monkeypatch, found: str) -> None:  # type: ignore[no-untyped-def]
    real = pg_loop_enqueue._first_row

    async def applied_then_broke(cursor):  # type: ignore[no-untyped-def]
        await real(cursor)
        conn = store._loop_conn
        assert conn is not None
        _terminate(store, conn.info.backend_pid)
        await conn.execute("SELECT 1")

    monkeypatch.setattr(pg_loop_enqueue, "_first_row", applied_then_broke)
    if found == "all":
        ids = _batch_async(store, _items(2, "AAAAAAAAAAB3"))
        assert ids[0] == "AAAAAAAAAAB3" and sorted(all_ids(store)) == sorted(ids)
        return
    # A look that finds some but not all cannot be: one statement, all or none.
    monkeypatch.setattr(store, "_found_after_loss", lambda pid, ids, now: 1)
    with pytest.raises(StoreError, match="1 of 2 messages found"):
        _batch_async(store, _items(2))


def _final_dots(group: GroupCommit, messages: list[Any], bodies: list[bytes]
                ) -> list[asyncio.Future[str]]:
    """Sessions that all gave MAIL, then each closes its transaction and hands
    its message over: one batch (on the running loop)."""
    for i in range(len(messages)):
        group.transaction_opened(i)

    async def final_dot(i: int) -> str:
        group.transaction_closed(i)
        return await group.enqueue(messages[i], io.BytesIO(bodies[i]))

    return [asyncio.ensure_future(final_dot(i)) for i in range(len(messages))]


def test_a_batch_refused_on_the_loops_connection_is_stored_one_by_one(
        store: PostgresStore, caplog) -> None:  # type: ignore[no-untyped-def]
    group = GroupCommit(store, gather=10.0)
    bodies = [b"first\r\n", b"bad", b"third\r\n"]
    messages = [msg("a@x.example"), _refused_by_the_schema(), msg("c@x.example")]

    async def main() -> list[str | BaseException]:
        await store.open_loop_connection()
        return list(await asyncio.gather(*_final_dots(group, messages, bodies),
                                         return_exceptions=True))

    with caplog.at_level("INFO", logger="fermoposta.store"):
        outcomes = asyncio.run(asyncio.wait_for(main(), 20))
    assert isinstance(outcomes[1], StoreError)
    good = [str(outcomes[0]), str(outcomes[2])]
    assert sorted(all_ids(store)) == sorted(good)
    assert [body_of(store, i) for i in good] == [b"first\r\n", b"third\r\n"]
    assert group.inline_commits == 0 and group.committed == 2
    assert any("on the event loop's connection failed" in r.getMessage()
               for r in caplog.records)


def test_a_batch_that_failed_after_reading_its_bodies_is_stored_whole(
        store: PostgresStore) -> None:
    class FailsOnce:
        """The store, but the loop's batch reads every body, then fails."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def enqueue_batch_async(self, items):  # type: ignore[no-untyped-def]
            for _, body, _ in items:
                body.read()
            raise StoreError("PostgreSQL store: enqueue failed (test)")

    group = GroupCommit(FailsOnce(), gather=10.0)  # type: ignore[arg-type]

    async def main() -> list[str]:
        await store.open_loop_connection()
        return list(await asyncio.gather(*_final_dots(
            group, [msg(f"u{i}@x.example") for i in range(2)],
            [b"whole %d\r\n" % i for i in range(2)])))

    ids = asyncio.run(asyncio.wait_for(main(), 20))
    assert [body_of(store, i) for i in ids] == [b"whole 0\r\n", b"whole 1\r\n"]


def test_a_batch_whose_statement_counts_fewer_messages_is_a_store_error(
        store: PostgresStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async def one_row_short(cursor):  # type: ignore[no-untyped-def]
        row = await (await cursor).fetchone()
        return (int(row[0]) - 1,)

    monkeypatch.setattr(pg_loop_enqueue, "_first_row", one_row_short)
    with pytest.raises(StoreError, match="wrote 1 of 2 messages"):
        _batch_async(store, _items(2))


def test_a_batch_cut_by_the_shutdown_leaves_no_caller_waiting(store: PostgresStore) -> None:
    group = GroupCommit(store, gather=10.0)
    admin = psycopg.connect(store._url)
    admin.execute("LOCK TABLE messages IN EXCLUSIVE MODE")  # the batch's INSERT waits for it

    async def main() -> list[BaseException | str]:
        await store.open_loop_connection()
        callers = _final_dots(group, [msg(f"u{i}@x.example") for i in range(2)], [b"0", b"1"])
        try:
            await asyncio.sleep(0.3)  # the batch's statement waits on the loop's connection
            late = asyncio.ensure_future(group.enqueue(msg("late@x.example"), io.BytesIO(b"")))
            await asyncio.sleep(0)
            assert group._committer is not None
            group._committer.cancel()  # as at the loop's shutdown
            return list(await asyncio.wait_for(
                asyncio.gather(*callers, late, return_exceptions=True), 20))
        finally:
            await asyncio.to_thread(admin.rollback)

    try:
        outcomes = asyncio.run(main())
    finally:
        admin.close()
    assert [type(o) for o in outcomes] == [asyncio.CancelledError] * 3
    assert all_ids(store) == []  # the cancelled statement stored nothing
