"""WAL checkpoints of the SQLite store run in a thread of their own after
commits (store/sqlite_checkpoint.py), not inside the commit that answers a
client; the writer's own auto-checkpoint is only a backstop."""

from __future__ import annotations

import io
import logging
import sqlite3
import threading
import time

from fermoposta.store import SQLiteStore
from fermoposta.store.base import (
    MessageOrigin,
    NewMessage,
    NewRecipient,
    RecipientState,
    StoreError,
)
from fermoposta.store.sqlite_checkpoint import BACKSTOP_PAGES, Checkpointer


def _message() -> NewMessage:
    return NewMessage(sender="a@sender.test", origin=MessageOrigin.MX, client="test",
                      recipients=(NewRecipient("b@example.org", "example.org",
                                               RecipientState.HELD),))


def _wait(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sqlite-checkpoint"]


def test_commits_are_checkpointed_by_the_thread_not_the_writer(tmp_path):
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    try:
        writer_setting = store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        assert writer_setting == BACKSTOP_PAGES
        assert store._checkpointer.checkpoints == 0
        before = path.stat().st_size
        body = b"x" * (5 << 20)  # 5 MiB: past SQLite's default 1000-page threshold
        store.enqueue(_message(), io.BytesIO(body))
        # The commit wrote the WAL only (the writer's threshold is far):
        # the database file has not grown yet...
        grew_in_commit = path.stat().st_size - before
        assert grew_in_commit < (1 << 20), grew_in_commit
        # ...until the thread has copied the WAL into it.
        assert _wait(lambda: path.stat().st_size - before > (4 << 20))
        assert _wait(lambda: store._checkpointer.checkpoints >= 1)
        assert store.read_body(store.held_message_ids(["example.org"])[0]).__next__()
    finally:
        store.close()
    assert not any(t.is_alive() for t in _checkpoint_threads())


def test_a_store_that_never_writes_starts_no_thread_and_closes(tmp_path):
    before = len(_checkpoint_threads())
    store = SQLiteStore(tmp_path / "store.db")
    store.held_message_ids(["example.org"])
    assert len(_checkpoint_threads()) == before
    store.close()
    store.close()  # idempotent


def test_a_failing_checkpoint_is_logged_once_and_tried_again(tmp_path, caplog):
    missing = tmp_path / "no-such-dir" / "store.db"
    checkpointer = Checkpointer(missing, delay=0.0, interval=0.0)
    caplog.set_level(logging.WARNING, logger="fermoposta.store")
    try:
        checkpointer.poke()
        assert _wait(lambda: "WAL checkpoint failed" in caplog.text)
        checkpointer.poke()
        checkpointer.poke()
        time.sleep(0.2)
    finally:
        checkpointer.close()
    failures = [r for r in caplog.records if "WAL checkpoint failed" in r.getMessage()]
    assert len(failures) == 1
    assert str(missing) in failures[0].getMessage()
    assert checkpointer.checkpoints == 0


def _wal_restarts(path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each
    time the WAL starts again from its beginning."""
    with open(f"{path}-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


def test_a_quiet_store_starts_the_wal_again_before_the_next_commit(tmp_path):
    # SQLite fsyncs a new WAL's header before its first frames: the first
    # commit after a quiet spell would pay two fsyncs before its 250.  The
    # checkpointer starts the WAL again while the store is quiet, so that
    # the commit only appends.
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    try:
        version = store.schema_version()
        store.enqueue(_message(), io.BytesIO(b"first"))
        assert _wait(lambda: store._checkpointer.restarts == 1)
        restarted = _wal_restarts(path)
        time.sleep(0.2)  # quiet: no commit, no checkpoint, no second restart
        assert store._checkpointer.restarts == 1
        store.enqueue(_message(), io.BytesIO(b"second"))
        assert _wal_restarts(path) == restarted  # appended, not started again
        # Checkpointed, then started again for the next one; the schema
        # version written back is the same.
        assert _wait(lambda: store._checkpointer.restarts == 2)
        assert _wal_restarts(path) == restarted + 1
        assert store.schema_version() == version
        assert len(store.held_message_ids(["example.org"])) == 2
    finally:
        store.close()


def test_without_the_restart_the_next_commit_starts_the_wal(tmp_path):
    # The same sequence with the hook left out: what the test above guards.
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    store._checkpointer._restart = None
    try:
        store.enqueue(_message(), io.BytesIO(b"first"))
        assert _wait(lambda: store._checkpointer.checkpoints >= 1)
        time.sleep(0.1)
        before = _wal_restarts(path)
        store.enqueue(_message(), io.BytesIO(b"second"))
        assert _wal_restarts(path) == before + 1
        assert store._checkpointer.restarts == 0
    finally:
        store.close()


def test_a_busy_store_is_not_started_again_and_nothing_waits(tmp_path):
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        store.enqueue(_message(), io.BytesIO(b"first"))
        started = time.monotonic()
        with store._lock:  # a writer of this process (or close()) holds the store
            store._start_wal_again()
        other.execute("BEGIN IMMEDIATE")  # another process holds the file's write lock
        store._start_wal_again()
        other.execute("ROLLBACK")
        assert time.monotonic() - started < 0.5  # neither waited
    finally:
        other.close()
        store.close()


def test_a_failing_restart_is_logged_once(tmp_path, caplog):
    calls = []

    def restart() -> None:
        calls.append(1)
        raise StoreError("disk I/O error")

    path = tmp_path / "store.db"
    SQLiteStore(path).close()
    checkpointer = Checkpointer(path, delay=0.0, interval=0.0, restart=restart,
                                idle_restart=0.01)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("CREATE TABLE scratch (n INTEGER)")
    caplog.set_level(logging.WARNING, logger="fermoposta.store")
    try:
        for n in range(3):
            writer.execute("INSERT INTO scratch (n) VALUES (?)", (n,))
            checkpointer.poke()
            assert _wait(lambda n=n: len(calls) > n)
    finally:
        checkpointer.close()
        writer.close()
    failures = [r for r in caplog.records if "could not start the WAL again" in r.getMessage()]
    assert len(failures) == 1 and "disk I/O error" in failures[0].getMessage()
    assert checkpointer.restarts == 0
