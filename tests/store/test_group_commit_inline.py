"""Inline commits: `GroupCommit` stores a lone message on the event loop
through `enqueue_now` when the engine can do so without waiting for a lock
(SQLite), falls back to a worker thread on `WouldBlock` (PostgreSQL always,
SQLite when the write lock is taken or the body is big), and stops trying
for `INLINE_PAUSE` seconds after an inline commit slower than `INLINE_SLOW`."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence

import pytest

from fermoposta.store import group_commit
from fermoposta.store.base import NewMessage, Store, StoreError, WouldBlock
from fermoposta.store.group_commit import GroupCommit
from fermoposta.store.postgres import PostgresStore
from fermoposta.store.sqlite import BUSY_TIMEOUT, INLINE_BODY, SQLiteStore

from .contract import all_ids, body_of, msg


class ThreadWatch:
    """The store, noting on which thread each enqueue ran."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.now_threads: list[int] = []
        self.batch_now_threads: list[int] = []  # one entry a batch on the loop
        self.thread_enqueues: list[int] = []
        self.async_enqueues = 0
        self.async_batches: list[int] = []  # the size of each batch offered to the loop's

    def enqueue_now(self, message, body, queue_id=None):  # type: ignore[no-untyped-def]
        self.now_threads.append(threading.get_ident())
        return self.store.enqueue_now(message, body, queue_id)

    async def enqueue_async(self, message, body, queue_id=None):  # type: ignore[no-untyped-def]
        self.async_enqueues += 1
        return await self.store.enqueue_async(message, body, queue_id)

    async def enqueue_batch_async(self, items):  # type: ignore[no-untyped-def]
        self.async_batches.append(len(items))
        return await self.store.enqueue_batch_async(items)

    def enqueue(self, message, body, queue_id=None):  # type: ignore[no-untyped-def]
        self.thread_enqueues.append(threading.get_ident())
        return self.store.enqueue(message, body, queue_id)

    def enqueue_batch(self, items):  # type: ignore[no-untyped-def]
        return self.store.enqueue_batch(items)

    def enqueue_batch_now(self, items):  # type: ignore[no-untyped-def]
        self.batch_now_threads.append(threading.get_ident())
        return self.store.enqueue_batch_now(items)


def _run(group: GroupCommit, bodies: Sequence[bytes], store: Store | None = None) -> list[str]:
    async def main() -> list[str]:
        if isinstance(store, PostgresStore):  # else the first goes to a thread meanwhile
            await store.open_loop_connection()
        return [await asyncio.wait_for(group.enqueue(msg(f"u{i}@a.example"),
                                                     io.BytesIO(body)), 20)
                for i, body in enumerate(bodies)]

    return asyncio.run(main())


def test_a_lone_message_is_stored_by_the_loop_on_either_engine(
        store: Store, engine: str) -> None:
    watch = ThreadWatch(store)
    stored: list[Sequence[NewMessage]] = []
    group = GroupCommit(watch, on_stored=stored.append)  # type: ignore[arg-type]
    loop_thread = threading.get_ident()  # asyncio.run runs the loop on this thread
    ids = _run(group, [b"one\r\n", b"two\r\n"], store)
    assert [body_of(store, i) for i in ids] == [b"one\r\n", b"two\r\n"]
    assert watch.now_threads == [loop_thread, loop_thread]  # offered on the loop each time
    assert group.commits == 2 and group.committed == 2 and group.inline_commits == 2
    assert watch.thread_enqueues == []
    assert [m[0].recipients[0].address for m in stored] == ["u0@a.example", "u1@a.example"]
    if engine == "sqlite":  # stored by enqueue_now, blocking the loop for its fsync
        assert watch.async_enqueues == 0
    else:  # enqueue_now would block on the network: enqueue_async's connection
        assert watch.async_enqueues == 2
        with pytest.raises(WouldBlock):
            store.enqueue_now(msg("a@a.example"), io.BytesIO(b"x"))
        assert sorted(all_ids(store)) == sorted(ids)  # and it stored nothing


@pytest.fixture
def sqlite_store(tmp_path) -> SQLiteStore:  # type: ignore[no-untyped-def]
    store = SQLiteStore(tmp_path / "fermoposta.sqlite3")
    yield store
    store.close()


def _busy_timeout(store: SQLiteStore) -> int:
    return int(store._conn.execute("PRAGMA busy_timeout").fetchone()[0])


def test_sqlite_enqueue_now_refuses_while_another_connection_writes(
        sqlite_store: SQLiteStore, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = sqlite3.connect(tmp_path / "fermoposta.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # an admin command's write, another process
    try:
        with pytest.raises(WouldBlock):
            sqlite_store.enqueue_now(msg("a@a.example"), io.BytesIO(b"x"))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert all_ids(sqlite_store) == []
    queue_id = sqlite_store.enqueue_now(msg("a@a.example"), io.BytesIO(b"x"))
    assert all_ids(sqlite_store) == [queue_id]
    assert _busy_timeout(sqlite_store) == 0  # kept while commits go inline
    sqlite_store.enqueue(msg("b@a.example"), io.BytesIO(b"y"))  # a worker thread's write
    assert _busy_timeout(sqlite_store) == int(BUSY_TIMEOUT * 1000)  # waits again


def test_sqlite_enqueue_now_refuses_while_another_thread_writes(
        sqlite_store: SQLiteStore) -> None:
    # The write connection in use, as by a worker thread's commit:
    with sqlite_store._write(), pytest.raises(WouldBlock):
        sqlite_store.enqueue_now(msg("a@a.example"), io.BytesIO(b"x"))
    assert all_ids(sqlite_store) == []


def test_sqlite_enqueue_now_refuses_a_big_body_but_takes_one_chunk(
        sqlite_store: SQLiteStore) -> None:
    big = io.BytesIO(b"y" * (INLINE_BODY + 1))
    with pytest.raises(WouldBlock):
        sqlite_store.enqueue_now(msg("a@a.example"), big)
    assert big.tell() == 0 and all_ids(sqlite_store) == []  # the body is where it was
    chunk = b"z" * INLINE_BODY
    queue_id = sqlite_store.enqueue_now(msg("a@a.example"), io.BytesIO(chunk))
    assert body_of(sqlite_store, queue_id) == chunk


def test_sqlite_enqueue_now_leaves_a_staged_body_to_a_thread(
        sqlite_store: SQLiteStore) -> None:
    # Its commit's fsync would also flush the staged part: not on the loop.
    staged = b"s" * 1000  # small: refused for the stage, not for its size
    body = io.BytesIO()
    stage = sqlite_store.stage_body("AAAAAAAAAAA1", body)
    body.write(staged)
    stage.append(staged)  # stored while it arrived
    body.write(b"tail\r\n")
    body.seek(0)
    with pytest.raises(WouldBlock):
        sqlite_store.enqueue_now(msg("a@a.example"), body, "AAAAAAAAAAA1")
    assert body.tell() == 0
    queue_id = sqlite_store.enqueue(msg("a@a.example"), body, "AAAAAAAAAAA1")
    assert queue_id == "AAAAAAAAAAA1"
    assert body_of(sqlite_store, queue_id) == staged + b"tail\r\n"


def test_sqlite_enqueue_now_fails_when_it_cannot_put_the_body_back(
        sqlite_store: SQLiteStore) -> None:
    class Unrewindable(io.BytesIO):
        def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
            if whence == io.SEEK_SET and self.tell() != offset:
                raise OSError("spool gone")
            return super().seek(offset, whence)

    with pytest.raises(StoreError, match="rewind"):  # not WouldBlock: no thread
        sqlite_store.enqueue_now(msg("a@a.example"), Unrewindable(b"x" * 10))  # reads it
    assert all_ids(sqlite_store) == []


def test_sqlite_enqueue_now_refuses_a_body_that_cannot_seek(
        sqlite_store: SQLiteStore) -> None:
    class Stream(io.RawIOBase):
        def readable(self) -> bool:
            return True

    with pytest.raises(WouldBlock):
        sqlite_store.enqueue_now(msg("a@a.example"), Stream())  # type: ignore[arg-type]


def test_a_message_the_loop_cannot_store_goes_to_a_thread(sqlite_store: SQLiteStore) -> None:
    watch = ThreadWatch(sqlite_store)
    group = GroupCommit(watch)  # type: ignore[arg-type]
    big = b"y" * (INLINE_BODY + 1)
    ids = _run(group, [big, b"small\r\n"])
    assert body_of(sqlite_store, ids[0]) == big and body_of(sqlite_store, ids[1]) == b"small\r\n"
    assert len(watch.thread_enqueues) == 1 and group.inline_commits == 1
    assert group.commits == 2


def test_a_lone_message_waits_in_a_thread_for_another_process_write(
        sqlite_store: SQLiteStore, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = sqlite3.connect(tmp_path / "fermoposta.sqlite3", isolation_level=None,
                            check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    group = GroupCommit(sqlite_store)

    async def main() -> str:
        waiting = asyncio.ensure_future(group.enqueue(msg("a@a.example"), io.BytesIO(b"a")))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the loop is free: the wait is in a thread
        other.execute("ROLLBACK")
        return await asyncio.wait_for(waiting, 10)

    try:
        queue_id = asyncio.run(main())
    finally:
        other.close()
    assert all_ids(sqlite_store) == [queue_id] and group.inline_commits == 0


def test_an_inline_error_reaches_the_caller_and_stores_nothing(
        sqlite_store: SQLiteStore) -> None:
    class BrokenBody(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError("spool read failed")

    watch = ThreadWatch(sqlite_store)
    group = GroupCommit(watch)  # type: ignore[arg-type]

    async def main() -> None:
        await group.enqueue(msg("a@a.example"), BrokenBody(b"x"))

    with pytest.raises((OSError, StoreError)):
        asyncio.run(main())
    assert len(watch.now_threads) == 1 and watch.thread_enqueues == []  # failed inline
    assert all_ids(sqlite_store) == [] and group.committed == 0 and group.commits == 1


def test_a_slow_inline_commit_sends_the_next_ones_to_threads(
        sqlite_store: SQLiteStore, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(group_commit, "INLINE_SLOW", 0.0)  # every commit counts as slow
    watch = ThreadWatch(sqlite_store)
    group = GroupCommit(watch)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="fermoposta.store"):
        ids = _run(group, [b"1", b"2", b"3"])
    assert group.inline_commits == 1 and len(watch.now_threads) == 1
    assert len(watch.thread_enqueues) == 2
    assert sorted(all_ids(sqlite_store)) == sorted(ids)
    assert any("worker threads for the next 10 s" in r.getMessage() for r in caplog.records)


def test_inline_commits_resume_after_the_pause(
        sqlite_store: SQLiteStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(group_commit, "INLINE_SLOW", 0.0)
    monkeypatch.setattr(group_commit, "INLINE_PAUSE", 0.0)  # over as soon as it began
    group = GroupCommit(sqlite_store)
    _run(group, [b"1", b"2"])
    assert group.inline_commits == 2


def test_no_inline_commit_while_another_transaction_is_open(
        sqlite_store: SQLiteStore) -> None:
    watch = ThreadWatch(sqlite_store)
    group = GroupCommit(watch, gather=0.01)  # type: ignore[arg-type]
    group.transaction_opened("another session, after MAIL")
    started = time.monotonic()
    ids = _run(group, [b"1"])
    # Not stored alone at once: it waited for the other session's message,
    # then went as a batch (of one), still on the loop.
    assert time.monotonic() - started >= 0.01
    assert watch.now_threads == [] and watch.thread_enqueues == []
    assert watch.batch_now_threads == [threading.get_ident()]
    assert all_ids(sqlite_store) == ids


def test_commits_slow_on_average_send_the_next_ones_to_threads(
        sqlite_store: SQLiteStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    class SlowDisk(ThreadWatch):
        def enqueue_now(self, message, body, queue_id=None):  # type: ignore[no-untyped-def]
            time.sleep(0.005)  # each under INLINE_SLOW, 2.5 x INLINE_TYPICAL
            return super().enqueue_now(message, body, queue_id)

    monkeypatch.setattr(group_commit, "INLINE_SLOW", 10.0)  # only the average counts
    monkeypatch.setattr(group_commit, "INLINE_WEIGHT", 0.1)  # a short test
    assert group_commit.INLINE_TYPICAL < 0.005
    watch = SlowDisk(sqlite_store)
    group = GroupCommit(watch)  # type: ignore[arg-type]
    ids = _run(group, [b"%d" % i for i in range(8)])
    # The moving average (weight 0.1) of commits of 5 ms or more passes 2 ms
    # at the fifth at the latest; the others go to threads.
    assert 1 <= group.inline_commits <= 5
    assert len(watch.thread_enqueues) == 8 - group.inline_commits
    assert sorted(all_ids(sqlite_store)) == sorted(ids)


class ScheduledDisk(ThreadWatch):
    """Inline commits that first sleep the given seconds, one per commit."""

    def __init__(self, store: Store, delays: list[float]) -> None:
        super().__init__(store)
        self.delays = delays

    def enqueue_now(self, message, body, queue_id=None):  # type: ignore[no-untyped-def]
        time.sleep(self.delays.pop(0) if self.delays else 0.0)
        return super().enqueue_now(message, body, queue_id)


def _pauses(caplog) -> int:  # type: ignore[no-untyped-def]
    return sum("commits go to worker threads" in r.getMessage() for r in caplog.records)


def test_one_very_slow_commit_pauses_once_then_fast_ones_resume(
        sqlite_store: SQLiteStore, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(group_commit, "INLINE_PAUSE", 0.0)  # the pause is over at once
    monkeypatch.setattr(group_commit, "INLINE_WEIGHT", 0.1)
    # Limits far above a loaded machine's commits, so only the one slow
    # commit can pass them: 0.6 s, over INLINE_SLOW and (0.06 s) the average.
    monkeypatch.setattr(group_commit, "INLINE_TYPICAL", 0.05)
    monkeypatch.setattr(group_commit, "INLINE_SLOW", 0.5)
    watch = ScheduledDisk(sqlite_store, [0.6])
    group = GroupCommit(watch)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="fermoposta.store"):
        _run(group, [b"%d" % i for i in range(6)])
    assert group.inline_commits == 6
    assert _pauses(caplog) == 1  # the average was left at its limit, and fell


def test_a_disk_still_slow_after_the_pause_pauses_again_at_once(
        sqlite_store: SQLiteStore, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(group_commit, "INLINE_PAUSE", 0.0)
    monkeypatch.setattr(group_commit, "INLINE_WEIGHT", 0.1)
    monkeypatch.setattr(group_commit, "INLINE_SLOW", 10.0)
    watch = ScheduledDisk(sqlite_store, [0.005] * 8)
    group = GroupCommit(watch)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="fermoposta.store"):
        _run(group, [b"%d" % i for i in range(8)])
    # The average passes 2 ms at the fifth commit at the latest; from then
    # on every 5 ms commit pauses them again.
    assert _pauses(caplog) >= 4


# --- batches of several sessions, committed on the loop (enqueue_batch_now) ---------------

def _run_sessions(group: GroupCommit, bodies: Sequence[io.BytesIO]) -> list[str | BaseException]:
    """Sessions that all gave MAIL, then each closes its transaction and hands
    its message over, 10 ms apart: the batch waits for all of them."""
    async def main() -> list[str | BaseException]:
        for i in range(len(bodies)):
            group.transaction_opened(f"session {i}")

        async def final_dot(i: int) -> str:
            group.transaction_closed(f"session {i}")
            return await group.enqueue(msg(f"u{i}@a.example"), bodies[i])

        waiting = []
        for i in range(len(bodies)):
            waiting.append(asyncio.ensure_future(final_dot(i)))
            await asyncio.sleep(0.01)
        return list(await asyncio.gather(*waiting, return_exceptions=True))

    return asyncio.run(asyncio.wait_for(main(), 20))


def test_a_batch_of_small_messages_is_one_commit_on_the_loop(sqlite_store: SQLiteStore) -> None:
    watch = ThreadWatch(sqlite_store)
    stored: list[Sequence[NewMessage]] = []
    group = GroupCommit(watch, gather=10.0, on_stored=stored.append)  # type: ignore[arg-type]
    ids = _run_sessions(group, [io.BytesIO(b"body %d\r\n" % i) for i in range(4)])
    assert watch.batch_now_threads == [threading.get_ident()]  # one commit, the loop's
    assert watch.thread_enqueues == [] and watch.now_threads == []
    assert group.commits == 1 and group.inline_commits == 4 and group.committed == 4
    assert [len(s) for s in stored] == [4]
    assert sorted(all_ids(sqlite_store)) == sorted(ids)  # type: ignore[type-var]
    assert [body_of(sqlite_store, str(i)) for i in ids] == [b"body %d\r\n" % i for i in range(4)]


def test_a_batch_over_one_chunk_of_bodies_goes_to_a_worker_thread(
        sqlite_store: SQLiteStore) -> None:
    watch = ThreadWatch(sqlite_store)
    group = GroupCommit(watch, gather=10.0)  # type: ignore[arg-type]
    half = INLINE_BODY // 2 + 1  # two of them are more than the loop copies
    bodies = [b"a" * half, b"b" * half]
    ids = _run_sessions(group, [io.BytesIO(b) for b in bodies])
    assert group.inline_commits == 0 and group.commits == 1
    assert len(watch.batch_now_threads) == 1  # asked, and it said WouldBlock
    assert [body_of(sqlite_store, str(i)) for i in ids] == bodies


def test_a_batch_waits_in_a_worker_thread_for_another_writer(
        sqlite_store: SQLiteStore, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = sqlite3.connect(tmp_path / "fermoposta.sqlite3", isolation_level=None,
                            check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    threading.Timer(0.3, other.execute, ("COMMIT",)).start()
    watch = ThreadWatch(sqlite_store)
    group = GroupCommit(watch, gather=10.0)  # type: ignore[arg-type]
    ids = _run_sessions(group, [io.BytesIO(b"%d" % i) for i in range(3)])
    other.close()
    assert group.inline_commits == 0 and len(watch.batch_now_threads) == 1
    assert sorted(all_ids(sqlite_store)) == sorted(ids)  # type: ignore[type-var]


def test_a_batch_that_fails_on_the_loop_is_stored_one_by_one(
        sqlite_store: SQLiteStore, caplog) -> None:  # type: ignore[no-untyped-def]
    class BrokenBody(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError("spool read failed (test)")

    watch = ThreadWatch(sqlite_store)
    group = GroupCommit(watch, gather=10.0)  # type: ignore[arg-type]
    bodies = [io.BytesIO(b"first\r\n"), BrokenBody(b"x"), io.BytesIO(b"third\r\n")]
    with caplog.at_level(logging.INFO, logger="fermoposta.store"):
        outcomes = _run_sessions(group, bodies)
    assert isinstance(outcomes[1], (OSError, StoreError))
    good = [outcomes[0], outcomes[2]]
    assert all(isinstance(o, str) for o in good)
    # The loop's try read the first body; the worker read it again from the start.
    assert [body_of(sqlite_store, str(o)) for o in good] == [b"first\r\n", b"third\r\n"]
    assert sorted(all_ids(sqlite_store)) == sorted(good)  # type: ignore[type-var]
    assert len(watch.batch_now_threads) == 1 and len(watch.thread_enqueues) == 3
    assert any("on the event loop failed" in r.getMessage() for r in caplog.records)


def test_batches_go_to_worker_threads_while_inline_commits_are_paused(
        sqlite_store: SQLiteStore) -> None:
    watch = ThreadWatch(sqlite_store)
    group = GroupCommit(watch, gather=10.0)  # type: ignore[arg-type]
    group._inline_paused_until = time.monotonic() + 60  # a slow disk paused them
    ids = _run_sessions(group, [io.BytesIO(b"%d" % i) for i in range(3)])
    assert watch.batch_now_threads == [] and group.inline_commits == 0
    assert sorted(all_ids(sqlite_store)) == sorted(ids)  # type: ignore[type-var]


def test_enqueue_batch_now_per_engine(store: Store, engine: str) -> None:
    items = [(msg(f"u{i}@a.example"), io.BytesIO(b"%d" % i), None) for i in range(3)]
    if engine == "postgresql":
        with pytest.raises(WouldBlock):  # a round trip: never on the event loop
            store.enqueue_batch_now(items)
        assert all_ids(store) == [] and all(body.tell() == 0 for _, body, _ in items)
        return
    ids = store.enqueue_batch_now(items)
    assert sorted(all_ids(store)) == sorted(ids)
    assert [body_of(store, i) for i in ids] == [b"0", b"1", b"2"]


def test_a_lone_batch_that_fails_on_the_loop_is_read_again_from_its_start(
        sqlite_store: SQLiteStore) -> None:
    class OnceBroken(io.BytesIO):
        """Its first read succeeds, the next one fails once (the loop's try)."""
        reads = 0

        def read(self, size: int | None = -1) -> bytes:
            self.reads += 1
            if self.reads == 2:
                raise OSError("spool read failed once (test)")
            return super().read(size)

    watch = ThreadWatch(sqlite_store)
    group = GroupCommit(watch, gather=0.02)  # type: ignore[arg-type]
    group.transaction_opened("another session that never sends")  # not alone: a batch of one
    body = OnceBroken(b"the whole body\r\n")

    async def one() -> str:
        return await asyncio.wait_for(group.enqueue(msg("v@a.example"), body), 20)

    stored = asyncio.run(one())
    assert len(watch.batch_now_threads) == 1 and len(watch.thread_enqueues) == 1
    assert body_of(sqlite_store, stored) == b"the whole body\r\n"
    assert all_ids(sqlite_store) == [stored]


def test_a_batch_is_judged_less_its_engines_work_for_each_message(
        sqlite_store: SQLiteStore, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    class SlowBatches(ThreadWatch):
        def enqueue_batch_now(self, items):  # type: ignore[no-untyped-def]
            time.sleep(0.025)
            return super().enqueue_batch_now(items)

    monkeypatch.setattr(group_commit, "INLINE_WEIGHT", 1.0)  # the average is the latest
    monkeypatch.setattr(group_commit, "INLINE_TYPICAL", 0.01)
    monkeypatch.setattr(group_commit, "INLINE_PER_MESSAGE", 0.01)
    watch = SlowBatches(sqlite_store)
    group = GroupCommit(watch, gather=10.0)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="fermoposta.store"):
        _run_sessions(group, [io.BytesIO(b"%d" % i) for i in range(4)])
        assert group.inline_commits == 4 and _pauses(caplog) == 0  # 25 ms - 3 x 10 ms
        one = GroupCommit(watch, gather=0.02)  # type: ignore[arg-type]
        one.transaction_opened("another session that never sends")  # a batch of one
        _run(one, [b"alone in its batch"])
    assert one.inline_commits == 1 and _pauses(caplog) == 1  # 25 ms for one message


def test_a_batch_on_the_loop_replaces_each_taken_id_and_keeps_every_figure(
        sqlite_store: SQLiteStore, tmp_path) -> None:  # type: ignore[no-untyped-def]
    taken = sqlite_store.enqueue(msg("x@a.example"), io.BytesIO(b"x"), "AAAAAAAAAAA1")
    items = [(msg("a@a.example"), io.BytesIO(b"first\r\n"), "AAAAAAAAAAA2"),
             (msg("b@a.example", "c@b.example"), io.BytesIO(b"second body\r\n"), taken),
             (msg("d@a.example"), io.BytesIO(b"third\r\n"), "AAAAAAAAAAA3"),
             (msg("e@a.example"), io.BytesIO(b""), "AAAAAAAAAAA3")]  # taken in the batch
    ids = sqlite_store.enqueue_batch_now(items)
    assert ids[0] == "AAAAAAAAAAA2" and ids[2] == "AAAAAAAAAAA3"
    assert len(set(ids)) == 4 and taken not in ids
    assert sorted(all_ids(sqlite_store)) == sorted([taken, *ids])  # each stored once
    bodies = [b"first\r\n", b"second body\r\n", b"third\r\n", b""]
    assert [body_of(sqlite_store, i) for i in ids] == bodies
    assert body_of(sqlite_store, taken) == b"x"  # the message that had the id is untouched
    for message_id, (message, _, _), body in zip(ids, items, bodies, strict=True):
        stored = sqlite_store.get_message(message_id)
        assert stored is not None and stored.size == len(body)
        assert [r.address for r in stored.recipients] == [r.address
                                                          for r in message.recipients]
    # The copies the queue figures read: each recipient has its message's size.
    with sqlite3.connect(tmp_path / "fermoposta.sqlite3") as conn:
        rows = conn.execute("SELECT r.message_id, r.message_size, r.message_received_at,"
                            " m.size, m.received_at FROM recipients r"
                            " JOIN messages m ON m.id = r.message_id").fetchall()
    assert len(rows) == 6
    assert all(size == m_size and at == m_at for _, size, at, m_size, m_at in rows)


def test_a_batch_that_breaks_another_rule_fails_whole_and_draws_nothing(
        sqlite_store: SQLiteStore) -> None:
    # Only a taken queue id is drawn again: any other constraint (here the
    # sender NOT NULL) fails the batch at once, with nothing stored.
    broken = dataclasses.replace(msg("b@a.example"), sender=None)  # type: ignore[arg-type]
    items = [(msg("a@a.example"), io.BytesIO(b"a"), None), (broken, io.BytesIO(b"b"), None)]
    with pytest.raises(StoreError, match="NOT NULL"):
        sqlite_store.enqueue_batch_now(items)
    with pytest.raises(StoreError, match="NOT NULL"):
        sqlite_store.enqueue(broken, io.BytesIO(b"b"))
    assert all_ids(sqlite_store) == []
