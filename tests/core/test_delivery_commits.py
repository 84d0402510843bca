"""`DeliveredCommits`: removals of delivered recipients gathered into few
commits, a flush that waits only for what came before it, retries of a
refused commit, and a failure that leaves the recipients queued (logged with
their queue ids).  A fake store records the calls; its commits take time in
a worker thread, as a real one's fsync does."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

import fermoposta.provider.delivery_commits as commits_module
from fermoposta.provider.delivery_commits import DeliveredCommits
from fermoposta.store.base import StoreError

LOG = logging.getLogger("fermoposta.test")


class FakeStore:
    def __init__(self, delay: float = 0.0, refusals: int = 0) -> None:
        self.delay = delay
        self.refusals = refusals
        self.commits: list[list[int]] = []
        self.lock = threading.Lock()

    def record_delivered(self, ids, reply, dsn=None):  # type: ignore[no-untyped-def]
        time.sleep(self.delay)
        with self.lock:
            if self.refusals:
                self.refusals -= 1
                raise StoreError("database is locked")
            self.commits.append(list(ids))
        return None


def committed(store: FakeStore) -> list[int]:
    return [i for batch in store.commits for i in batch]


async def test_removals_are_gathered_and_flush_waits_for_them() -> None:
    store = FakeStore(delay=0.002)
    delivered = DeliveredCommits(store, LOG)  # type: ignore[arg-type]
    for i in range(30):
        delivered.add(f"Q{i}", [i])
        await asyncio.sleep(0)  # the sender goes on between messages
    await delivered.flush()
    assert sorted(committed(store)) == list(range(30))
    assert len(store.commits) < 30 and delivered.commits == len(store.commits)
    await delivered.flush()  # nothing new: returns at once


async def test_a_flush_is_not_kept_waiting_by_later_removals() -> None:
    # Other batches keep adding while each commit runs: a flush returns once
    # what was added before it is committed, not when the queue runs dry.
    store = FakeStore(delay=0.003)
    delivered = DeliveredCommits(store, LOG)  # type: ignore[arg-type]
    delivered.add("MINE", [1, 2])
    stop = asyncio.Event()

    async def others(first: int) -> None:
        n = first
        while not stop.is_set():
            delivered.add(f"Q{n}", [n])
            n += 1
            await asyncio.sleep(0.002)

    producers = [asyncio.create_task(others(100_000 * (k + 1))) for k in range(3)]
    try:
        started = time.monotonic()
        await asyncio.wait_for(delivered.flush(), 1.0)
        assert time.monotonic() - started < 0.5
        assert {1, 2} <= set(committed(store))
    finally:
        stop.set()
        await asyncio.gather(*producers)
    await delivered.flush()
    assert len(committed(store)) == len(set(committed(store)))  # each once


async def test_a_refused_commit_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commits_module, "RETRY_PAUSE", 0.001)
    store = FakeStore(refusals=2)
    delivered = DeliveredCommits(store, LOG)  # type: ignore[arg-type]
    delivered.add("Q1", [7])
    await delivered.flush()
    assert committed(store) == [7] and delivered.commits == 1


async def test_a_commit_refused_every_time_is_logged_with_its_queue_ids(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(commits_module, "RETRY_PAUSE", 0.001)
    caplog.set_level(logging.WARNING, logger="fermoposta")
    store = FakeStore(refusals=commits_module.ATTEMPTS)
    delivered = DeliveredCommits(store, LOG)  # type: ignore[arg-type]
    delivered.add("AAAA", [1])
    delivered.add("BBBB", [2, 3])
    await delivered.flush()  # returns: the failure is settled, nothing hangs
    assert committed(store) == [] and delivered.commits == 0
    [line] = [r.getMessage() for r in caplog.records]
    assert "cannot record 3 delivered recipients of AAAA, BBBB" in line
    assert "go again" in line and "database is locked" in line
    delivered.add("CCCC", [4])  # the next removal is tried afresh
    await delivered.flush()
    assert committed(store) == [4]


async def test_a_cancelled_flush_does_not_cancel_the_commit() -> None:
    store = FakeStore(delay=0.05)
    delivered = DeliveredCommits(store, LOG)  # type: ignore[arg-type]
    delivered.add("Q1", [1])
    waiting = asyncio.create_task(delivered.flush())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await delivered.flush()
    assert committed(store) == [1]
