"""WAL checkpoints of the SQLite store run in a thread of their own after
commits (store/sqlite_checkpoint.py), not inside the commit that answers a
client; the writer's own auto-checkpoint is only a backstop."""

from __future__ import annotations

import io
import logging
import threading
import time

from fermoposta.store import SQLiteStore
from fermoposta.store.base import MessageOrigin, NewMessage, NewRecipient, RecipientState
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
