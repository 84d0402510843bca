"""`queue stats` on SQLite (`store.sqlite_shape`): the domains in ranges, one
connection each, side by side, in one snapshot; the answer is the one
connection's."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from fermoposta.store import SQLiteStore, sqlite_shape, sqlite_tools
from fermoposta.store.base import MessageOrigin, NewMessage, QueueShape, StoreError

from .contract import HELD, HOLD, OUTBOUND, Clock, msg, rcpt

AGES = [60.0, 300.0]


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[SQLiteStore]:
    with SQLiteStore(tmp_path / "data" / "fermoposta.sqlite3", clock=clock) as store:
        yield store


def fill(store: SQLiteStore, clock: Clock, count: int = 300) -> None:
    """`count` messages over some 110 domains, some with several recipients
    in one domain, in two states, and one outbound."""
    for i in range(count):
        domain = f"d{i % 10:02d}.example" if i < count // 2 else f"s{i % 100:02d}.example"
        clock.now += 1.0
        if i % 7 == 0:
            message = NewMessage("s@x.example", (rcpt(f"a@{domain}", HELD),
                                                 rcpt(f"b@{domain}", HOLD),
                                                 rcpt(f"c{i % 3}@out.example", OUTBOUND)),
                                 MessageOrigin.MX)
        else:
            message = msg(f"a{i}@{domain}")
        store.enqueue(message, io.BytesIO(b"x" * (i + 1)))


def shape_on(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, cores: int,
             now: float) -> tuple[QueueShape, int]:
    """The shape with `cores` cores, and how many extra connections it opened."""
    opened: list[sqlite3.Connection] = []
    extra_reader = store._extra_reader

    def counting() -> sqlite3.Connection:
        opened.append(extra_reader())
        return opened[-1]

    monkeypatch.setattr(sqlite_tools, "_cores", lambda: cores)
    monkeypatch.setattr(store, "_extra_reader", counting)
    try:
        return store.queue_shape(now, AGES), len(opened)
    finally:
        monkeypatch.undo()


def test_ranges_on_several_connections_give_the_one_connection_answer(
        store: SQLiteStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(store, clock)
    one, extra = shape_on(store, monkeypatch, 1, clock.now)
    assert extra == 0  # one core: the store's own reader, one pass
    assert len(one.domains) == 111 and one.total.messages == 300
    assert one.total.recipients == 300 + 2 * 43  # 43 messages of three recipients
    assert sum(one.total.ages) == one.total.recipients
    for cores in (2, 3, 7, 20):
        shape, extra = shape_on(store, monkeypatch, cores, clock.now)
        assert extra == min(sqlite_shape.MAX_PARTS, cores + 1)
        assert shape == one, cores


def test_an_empty_queue_on_several_connections(store: SQLiteStore, clock: Clock,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    shape, extra = shape_on(store, monkeypatch, 4, clock.now)
    assert extra == 5
    assert shape.domains == ()
    assert (shape.total.messages, shape.total.recipients, shape.total.oldest) == (0, 0, None)
    assert shape == shape_on(store, monkeypatch, 1, clock.now)[0]


def test_range_bounds_cut_the_domains_in_equal_parts() -> None:
    bounds = sqlite_shape.range_bounds
    assert bounds(["a", "b", "c", "d"], 2) == ["a", "c"]
    assert bounds(["a", "b", "c", "d", "e"], 3) == ["a", "b", "d"]
    assert bounds(["a", "b"], 5) == ["a", "b"]  # never more ranges than domains
    assert bounds(["a", "b", "c"], 1) == ["a"]
    assert bounds([], 3) == []


def test_every_connection_reads_the_snapshot_of_the_moment_the_write_lock_was_held(
        store: SQLiteStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit just before the lock is taken is counted by every part; one
    just after it is let go is counted by none, though every query runs
    after it: the snapshots started under the lock."""
    fill(store, clock, 40)
    write = store._write
    armed = [True]

    @contextmanager
    def around(**kwargs: bool) -> Iterator[sqlite3.Connection]:
        if not armed[0]:
            with write(**kwargs) as conn:
                yield conn
            return
        armed[0] = False
        clock.now += 1.0
        store.enqueue(msg("before@before.example", "x@d00.example"), io.BytesIO(b"before"))
        with write(**kwargs) as conn:
            yield conn
        store.enqueue(msg("after@after.example", "y@d00.example", "z@out.example",
                          state=OUTBOUND), io.BytesIO(b"after"))

    before = store.queue_shape(clock.now, AGES)
    writes: Callable[..., AbstractContextManager[sqlite3.Connection]] = around
    monkeypatch.setattr(sqlite_tools, "_cores", lambda: 2)
    monkeypatch.setattr(store, "_write", writes)
    shape = store.queue_shape(clock.now, AGES)
    monkeypatch.undo()
    assert not armed[0]  # the shape took the write lock
    domains = {d.domain: d for d in shape.domains}
    assert "before.example" in domains and "after.example" not in domains
    assert domains["d00.example"].messages == \
        {d.domain: d for d in before.domains}["d00.example"].messages + 1
    assert shape.total.messages == before.total.messages + 1
    assert shape.total.outbound == before.total.outbound
    later = store.queue_shape(clock.now, AGES)
    assert later.total.messages == before.total.messages + 2  # it was there to see


def test_a_connection_that_cannot_open_is_a_store_error_and_none_is_left_open(
        store: SQLiteStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(store, clock, 20)
    opened: list[sqlite3.Connection] = []
    extra_reader = store._extra_reader

    def failing() -> sqlite3.Connection:
        if len(opened) == 2:
            raise sqlite3.OperationalError("unable to open database file")
        opened.append(extra_reader())
        return opened[-1]

    monkeypatch.setattr(sqlite_tools, "_cores", lambda: 4)
    monkeypatch.setattr(store, "_extra_reader", failing)
    with pytest.raises(StoreError, match="store read failed: unable to open database file"):
        store.queue_shape(clock.now, AGES)
    monkeypatch.undo()
    assert len(opened) == 2
    for conn in opened:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")
    assert store.queue_shape(clock.now, AGES).total.messages == 20  # the store still reads


def test_a_query_that_fails_is_a_store_error(store: SQLiteStore, clock: Clock,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    fill(store, clock, 20)

    def broken(*args: object) -> object:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite_tools, "_cores", lambda: 2)
    monkeypatch.setattr(sqlite_shape, "_totals", broken)
    with pytest.raises(StoreError, match="store read failed: disk I/O error"):
        store.queue_shape(clock.now, AGES)


def shapes_read_on(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many connections each `sqlite_shape.queue_shape` call was given."""
    calls: list[int] = []
    real = sqlite_shape.queue_shape

    def counting(connections: list[sqlite3.Connection], now: float,
                 age_limits: list[float]) -> QueueShape:
        calls.append(len(connections))
        return real(connections, now, age_limits)

    monkeypatch.setattr(sqlite_shape, "queue_shape", counting)
    return calls


def test_a_writer_that_keeps_the_lock_gets_the_one_connection_answer_at_once(
        store: SQLiteStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """`queue stats` does not wait for a long bulk action's lock (10 s,
    then an error): after its tries it reads on one connection."""
    fill(store, clock, 60)
    one, _ = shape_on(store, monkeypatch, 1, clock.now)
    writer = sqlite3.connect(store.path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # the file's write lock, kept
        monkeypatch.setattr(sqlite_tools, "_cores", lambda: 3)
        calls = shapes_read_on(monkeypatch)
        started = time.monotonic()
        shape = store.queue_shape(clock.now, AGES)
        waited = time.monotonic() - started
    finally:
        writer.close()
    assert shape == one
    assert calls == [1]
    assert waited < 2.0  # the tries (0.1 s), not the busy timeout (10 s)


def test_a_lock_let_go_during_the_tries_gets_the_ranges(
        store: SQLiteStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(store, clock, 60)
    one, _ = shape_on(store, monkeypatch, 1, clock.now)
    writer = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    let_go = threading.Timer(0.03, writer.rollback)
    let_go.start()
    try:
        monkeypatch.setattr(sqlite_tools, "_cores", lambda: 2)
        calls = shapes_read_on(monkeypatch)
        shape = store.queue_shape(clock.now, AGES)
    finally:
        let_go.join()
        writer.close()
    assert shape == one
    assert calls == [3]
