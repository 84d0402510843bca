"""Big bodies stored while they arrive (store/sqlite_stage.py): the staged
placeholder is invisible to every view of the queue, the enqueue that names
its queue id turns it into the message with the whole body, and whatever is
not enqueued is removed by discard() or, once its process is dead, by
sweep_stages()."""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from fermoposta.store import SQLiteStore
from fermoposta.store.base import (
    MessageOrigin,
    NewMessage,
    NewRecipient,
    QueueFilter,
    RecipientState,
    StoreError,
)

CHUNK = 256 * 1024


def _message() -> NewMessage:
    return NewMessage(sender="a@sender.test", origin=MessageOrigin.MX, client="client[1.2.3.4]",
                      recipients=(NewRecipient("b@example.org", "example.org",
                                               RecipientState.HELD),))


def _body(size: int) -> bytes:
    return (os.urandom(64).hex().encode() * (size // 128 + 1))[:size]


def _read(store: SQLiteStore, message_id: str) -> bytes:
    return b"".join(store.read_body(message_id))


def _placeholders(path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM messages WHERE size = -1").fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "store.db")
    yield s
    s.close()


def test_a_staged_body_becomes_the_message_with_every_byte(store, tmp_path):
    body = _body(5 * CHUNK + 12345)
    spool = io.BytesIO(body)
    stage = store.stage_body("ABCDEF012345", spool)
    stage.append(body[:2 * CHUNK])
    stage.append(body[2 * CHUNK:4 * CHUNK + 7])  # not chunk-aligned: still whole bytes
    assert stage.size == 4 * CHUNK + 7 and not stage.failed
    # The staged commits do not fsync; the writer is back at FULL after them.
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    message_id = store.enqueue(_message(), spool, "ABCDEF012345")
    assert message_id == "ABCDEF012345"
    assert _read(store, message_id) == body
    got = store.get_message(message_id)
    assert got is not None and got.size == len(body) and got.sender == "a@sender.test"
    assert got.client == "client[1.2.3.4]"
    assert store.held_message_ids(["example.org"]) == [message_id]
    stage.discard()  # after the enqueue: a no-op
    assert _read(store, message_id) == body
    assert _placeholders(tmp_path / "store.db") == 0


@pytest.mark.parametrize("ready", [True, False])
def test_a_staged_message_gets_its_wire_ready(store, ready):
    body = _body(3 * CHUNK)
    spool = io.BytesIO(body)
    stage = store.stage_body("ABCDEF012346", spool)
    stage.append(body[:2 * CHUNK])
    message = NewMessage(sender="a@sender.test", origin=MessageOrigin.MX, wire_ready=ready,
                         recipients=(NewRecipient("b@example.org", "example.org",
                                                  RecipientState.HELD),))
    assert store.enqueue(message, spool, "ABCDEF012346") == "ABCDEF012346"
    got = store.get_message("ABCDEF012346")
    assert got is not None and got.wire_ready is ready and _read(store, got.id) == body


def test_while_staged_no_view_of_the_queue_shows_it(store, tmp_path):
    stage = store.stage_body("0123456789AB", io.BytesIO())
    stage.append(_body(2 * CHUNK))
    assert _placeholders(tmp_path / "store.db") == 1
    assert store.get_message("0123456789AB") is None
    assert store.get_queue_entry("0123456789AB") is None
    assert store.queue_page(QueueFilter(), None, 10) == []
    assert store.queue_ids(QueueFilter(), None, 10) == []
    assert store.message_ids() == []
    shape = store.queue_shape(2e9, [60.0])
    assert (shape.total.messages, shape.total.bytes) == (0, 0)
    assert store.is_empty()
    assert store.delete_messages(["0123456789AB"]) == []  # not an operator's to touch
    with pytest.raises(StoreError):
        store.read_body("0123456789AB")
    stage.discard()
    assert _placeholders(tmp_path / "store.db") == 0
    conn = sqlite3.connect(tmp_path / "store.db")
    try:
        assert conn.execute("SELECT COUNT(*) FROM body_chunks").fetchone()[0] == 0
    finally:
        conn.close()


def test_a_stage_whose_id_is_taken_fails_and_the_enqueue_stores_it_all(store, tmp_path, caplog):
    taken = store.enqueue(_message(), io.BytesIO(b"first\r\n"))
    body = _body(3 * CHUNK)
    spool = io.BytesIO(body)
    stage = store.stage_body(taken, spool)
    stage.append(body[:CHUNK])
    assert stage.size == 0 and stage.failed  # nothing staged
    assert "storing the body while it arrives failed" in caplog.text
    other = store.enqueue(_message(), spool, taken)
    assert other != taken  # a fresh queue id, as for any collision
    assert _read(store, other) == body
    assert _read(store, taken) == b"first\r\n"  # never touched
    stage.discard()
    assert _read(store, taken) == b"first\r\n"


def test_a_placeholder_gone_before_the_enqueue_is_a_store_error(store, tmp_path):
    spool = io.BytesIO(_body(2 * CHUNK))
    stage = store.stage_body("FEDCBA987654", spool)
    stage.append(spool.getvalue()[:CHUNK])
    conn = sqlite3.connect(tmp_path / "store.db")
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("DELETE FROM messages WHERE id = 'FEDCBA987654'")
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(StoreError, match="no longer in the store"):
        store.enqueue(_message(), spool, "FEDCBA987654")
    assert store.held_message_ids(["example.org"]) == []


def test_a_batch_with_a_staged_message_stores_each_whole(store):
    big = _body(3 * CHUNK + 1)
    spool = io.BytesIO(big)
    stage = store.stage_body("AAAAAAAAAAAA", spool)
    stage.append(big[:3 * CHUNK])
    ids = store.enqueue_batch([(_message(), io.BytesIO(b"small one\r\n"), None),
                               (_message(), spool, "AAAAAAAAAAAA"),
                               (_message(), io.BytesIO(b"small two\r\n"), None)])
    assert ids[1] == "AAAAAAAAAAAA"
    assert [_read(store, i) for i in ids] == [b"small one\r\n", big, b"small two\r\n"]


def test_sweep_removes_what_a_dead_process_staged_and_spares_a_live_one(store, tmp_path):
    path = tmp_path / "store.db"
    script = textwrap.dedent(f"""
        import os, sys
        from fermoposta.store import SQLiteStore
        store = SQLiteStore({str(path)!r})
        stage = store.stage_body("DEAD00000000", None)
        stage.append(b"x" * {CHUNK})
        os._exit(0)  # killed mid-DATA: no discard, no close
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    body = _body(CHUNK + 5)
    spool = io.BytesIO(body)
    mine = store.stage_body("A11VE0000000", spool)
    mine.append(body[:CHUNK])
    assert _placeholders(path) == 2
    assert store.sweep_stages() == 1
    assert _placeholders(path) == 1  # ours: this process is alive
    assert store.enqueue(_message(), spool, "A11VE0000000") == "A11VE0000000"
    assert hashlib.sha256(_read(store, "A11VE0000000")).digest() == hashlib.sha256(body).digest()
    assert store.sweep_stages() == 0
    assert _placeholders(path) == 0


def test_a_message_that_drew_the_same_queue_id_never_takes_the_stage(store):
    """Two DATA transfers with one queue id (a collision): B's stage fails at
    its placeholder, and B's enqueue stores B's own body under a fresh id;
    A's stage stays A's."""
    a_body, b_body = _body(3 * CHUNK + 3), _body(3 * CHUNK + 9)
    a_spool, b_spool = io.BytesIO(a_body), io.BytesIO(b_body)
    a = store.stage_body("C0111DED0000", a_spool)
    a.append(a_body[:2 * CHUNK])
    b = store.stage_body("C0111DED0000", b_spool)
    b.append(b_body[:2 * CHUNK])
    assert b.failed and not a.failed
    b_id = store.enqueue(_message(), b_spool, "C0111DED0000")
    assert b_id != "C0111DED0000"
    assert _read(store, b_id) == b_body
    b.discard()  # B's failure path: A's placeholder is not B's to remove
    a.append(a_body[2 * CHUNK:3 * CHUNK])
    assert store.enqueue(_message(), a_spool, "C0111DED0000") == "C0111DED0000"
    assert _read(store, "C0111DED0000") == a_body


def test_a_discard_that_failed_is_done_with_the_next_big_message(store, tmp_path, monkeypatch):
    stage = store.stage_body("0DD000000000", io.BytesIO())
    stage.append(_body(CHUNK))
    real = store._write

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise StoreError("disk full")

    monkeypatch.setattr(store, "_write", broken)
    stage.discard()  # fails: logged, remembered
    monkeypatch.setattr(store, "_write", real)
    assert _placeholders(tmp_path / "store.db") == 1
    other = store.stage_body("0DD000000001", io.BytesIO())
    other.append(_body(CHUNK))
    conn = sqlite3.connect(tmp_path / "store.db")
    try:
        left = [r[0] for r in conn.execute("SELECT id FROM messages WHERE size = -1")]
    finally:
        conn.close()
    assert left == ["0DD000000001"]
    other.discard()
    assert _placeholders(tmp_path / "store.db") == 0
