"""`HeldMailWatch`'s listener (issue 10 on issue 12's watch): the store's
notices are read only while someone waits (and `linger` seconds after), the
store is looked at once each time the listener opens, and only notices for
waited-for domains reach the event loop.  A fake store stands for
PostgreSQL's LISTEN connection."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection

import pytest

from fermoposta.provider.atrn_wait import HeldMailWatch
from fermoposta.store.base import StoreError


class FakeNotices:
    """A listener: `wait` hands out what the test `send`s."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.closed = False

    def wait(self, timeout: float) -> set[str]:
        try:
            return self.store.outbox.get(timeout=min(timeout, 0.05))
        except queue.Empty:
            return set()

    def close(self) -> None:
        self.closed = True


class FakeStore:
    """The two things the watch asks of a store: a listener and a look."""

    def __init__(self) -> None:
        self.outbox: queue.Queue[set[str]] = queue.Queue()
        self.listeners: list[FakeNotices] = []
        self.held: set[str] = set()  # domains with held mail, for the look
        self.looks: list[set[str]] = []
        self.refuse = 0  # listeners to refuse (a server that is down) before one opens
        self.lock = threading.Lock()

    def held_mail_notices(self) -> FakeNotices:
        with self.lock:
            if self.refuse:
                self.refuse -= 1
                raise StoreError("connection refused")
            notices = FakeNotices(self)
            self.listeners.append(notices)
            return notices

    def domains_with_held_mail(self, domains: Collection[str]) -> set[str]:
        self.looks.append(set(domains))
        return self.held & set(domains)

    def open_listeners(self) -> int:
        return sum(not n.closed for n in self.listeners)


async def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


@pytest.fixture
async def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
async def watch(store: FakeStore) -> AsyncIterator[HeldMailWatch]:
    w = HeldMailWatch(store, poll_interval=0.2, linger=0.3)  # type: ignore[arg-type]
    await w.start()
    try:
        yield w
    finally:
        await w.shutdown()


async def test_no_listener_while_nobody_waits(watch: HeldMailWatch, store: FakeStore):
    await asyncio.sleep(1.2)  # longer than the thread's own wake-up
    assert store.listeners == []
    assert watch.listens == 0


async def test_a_waiter_opens_the_listener_and_the_store_is_looked_at_once(
        watch: HeldMailWatch, store: FakeStore):
    # Mail committed before the LISTEN took hold: only the look finds it.
    store.held = {"example.org"}
    waiter = watch.enter({"example.org"})
    assert waiter is not None
    await until(lambda: waiter.event.is_set(), "the look after the LISTEN woke the waiter")
    assert watch.listens == 1 and store.open_listeners() == 1
    assert watch.catch_ups == 1 and watch.polls == 0
    assert store.looks[0] == {"example.org"}
    waiter.leave()


async def test_only_notices_for_waited_domains_reach_the_loop(
        watch: HeldMailWatch, store: FakeStore):
    waiter = watch.enter({"example.org"})
    assert waiter is not None
    await until(lambda: watch.catch_ups == 1, "the listener opened")
    store.outbox.put({"other.example"})
    await until(lambda: store.outbox.empty(), "the notice was read")
    await asyncio.sleep(0.1)
    assert watch.notices == 0 and not waiter.event.is_set()
    store.outbox.put({"other.example", "example.org"})
    await until(lambda: waiter.event.is_set(), "the notice woke the waiter")
    assert watch.notices == 1
    waiter.leave()


async def test_the_listener_closes_after_the_linger_and_opens_again(
        watch: HeldMailWatch, store: FakeStore):
    first = watch.enter({"example.org"})
    assert first is not None
    await until(lambda: store.open_listeners() == 1, "opened for the first waiter")
    first.leave()
    await asyncio.sleep(0.1)  # within the linger: still open
    assert store.open_listeners() == 1
    await until(lambda: store.open_listeners() == 0, "closed after the linger")
    assert watch.listens == 1
    again = watch.enter({"example.org"})
    assert again is not None
    await until(lambda: store.open_listeners() == 1, "opened again for the next waiter")
    assert watch.listens == 2 and watch.catch_ups == 2
    again.leave()


async def test_a_waiter_within_the_linger_keeps_the_same_listener(
        watch: HeldMailWatch, store: FakeStore):
    first = watch.enter({"example.org"})
    assert first is not None
    await until(lambda: watch.catch_ups == 1, "opened")
    first.leave()
    second = watch.enter({"example.org"})
    assert second is not None
    await asyncio.sleep(0.6)  # past the linger, but someone waits
    assert watch.listens == 1 and store.open_listeners() == 1
    second.leave()


async def test_a_listener_that_cannot_open_is_tried_again_then_looked_after(
        watch: HeldMailWatch, store: FakeStore):
    store.refuse = 1
    store.held = {"example.org"}
    waiter = watch.enter({"example.org"})
    assert waiter is not None
    await until(lambda: watch.listens == 1, "opened on the second try", timeout=5.0)
    await until(lambda: waiter.event.is_set(), "looked at once after it opened")
    assert watch.catch_ups == 1
    waiter.leave()


async def test_shutdown_stops_a_thread_that_waits_for_a_waiter(store: FakeStore):
    w = HeldMailWatch(store, poll_interval=0.2, linger=0.3)  # type: ignore[arg-type]
    await w.start()
    thread = w._thread
    assert thread is not None and thread.is_alive()
    started = time.monotonic()
    await w.shutdown()
    assert not thread.is_alive()
    assert time.monotonic() - started < 0.5  # woken, not left to its 1 s wait
    assert store.listeners == []


async def test_an_engine_without_notices_ends_the_thread_at_the_first_waiter():
    class NoNotices(FakeStore):
        def held_mail_notices(self) -> None:  # type: ignore[override]
            return None

    store = NoNotices()
    w = HeldMailWatch(store, poll_interval=0.2, linger=0.3)  # type: ignore[arg-type]
    await w.start()
    try:
        thread = w._thread
        assert thread is not None
        waiter = w.enter({"example.org"})
        assert waiter is not None
        await until(lambda: not thread.is_alive(), "the thread ended: the poll alone")
        assert w.listens == 0 and w.catch_ups == 0
        store.held = {"example.org"}
        await until(lambda: waiter.event.is_set(), "the poll found the mail")
        assert w.polls >= 1
        waiter.leave()
    finally:
        await w.shutdown()
