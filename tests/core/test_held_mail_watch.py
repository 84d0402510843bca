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
    # The poll far too slow to matter; a retry of a listener that cannot
    # be opened waits as long: the test that needs it sets it shorter.
    w = HeldMailWatch(store, poll_interval=60.0, linger=1.0)  # type: ignore[arg-type]
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
    left = time.monotonic()
    first.leave()
    await asyncio.sleep(0.1)
    if time.monotonic() - left < watch.linger:  # else the machine stalled: nothing to see
        assert store.open_listeners() == 1
    await until(lambda: store.open_listeners() == 0, "closed after the linger")
    assert time.monotonic() - left >= watch.linger
    assert watch.listens == 1
    again = watch.enter({"example.org"})
    assert again is not None
    await until(lambda: watch.catch_ups == 2, "opened again for the next waiter")
    assert watch.listens == 2 and store.open_listeners() == 1
    again.leave()


async def test_a_waiter_within_the_linger_keeps_the_same_listener(
        watch: HeldMailWatch, store: FakeStore):
    first = watch.enter({"example.org"})
    assert first is not None
    await until(lambda: watch.catch_ups == 1, "opened")
    first.leave()
    await asyncio.sleep(0.3)  # the thread sees nobody waiting (its turns are 50 ms here)
    second = watch.enter({"example.org"})
    assert second is not None
    await asyncio.sleep(watch.linger + 0.3)  # past the first one's linger, but someone waits
    assert watch.listens == 1 and store.open_listeners() == 1
    second.leave()


async def test_a_listener_that_cannot_open_is_tried_again_then_looked_after(
        watch: HeldMailWatch, store: FakeStore):
    watch.poll_interval = 0.2  # the retry's wait (no poll runs: `poll` looks only if
    store.refuse = 1           # mail is there, and the fake has it only once listening)
    original = store.domains_with_held_mail

    def held_once_listening(domains: Collection[str]) -> set[str]:
        store.held = {"example.org"} if store.open_listeners() else set()
        return original(domains)

    store.domains_with_held_mail = held_once_listening  # type: ignore[method-assign]
    waiter = watch.enter({"example.org"})
    assert waiter is not None
    await until(lambda: watch.catch_ups == 1, "opened on the second try, then looked")
    await until(lambda: waiter.event.is_set(), "the look after it opened woke the waiter")
    assert watch.listens == 1 and len(store.listeners) == 1
    waiter.leave()


async def test_shutdown_stops_a_thread_that_waits_for_a_waiter(store: FakeStore):
    w = HeldMailWatch(store, poll_interval=60.0, linger=1.0)  # type: ignore[arg-type]
    await w.start()
    thread = w._thread
    assert thread is not None and thread.is_alive()
    await asyncio.sleep(0.1)  # the thread waits for a waiter
    started = time.monotonic()
    await w.shutdown()
    assert not thread.is_alive()
    assert time.monotonic() - started < 0.9  # woken, not left to its 1 s wait
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


async def test_a_waiter_whose_domains_grow_looks_again(watch: HeldMailWatch, store: FakeStore):
    waiter = watch.enter({"example.org"})
    assert waiter is not None
    await until(lambda: watch.catch_ups == 1, "opened")
    waiter.event.clear()
    waiter.watch_domains({"example.org"})  # the same: nothing to look for
    assert not waiter.event.is_set()
    # Notices for example.net were dropped until now: look once.
    waiter.watch_domains({"example.org", "example.net"})
    assert waiter.event.is_set()
    waiter.leave()


async def test_shutdown_cancels_a_look_still_under_way(store: FakeStore):
    started, release = threading.Event(), threading.Event()

    def slow_look(domains: Collection[str]) -> set[str]:
        started.set()
        release.wait(5.0)
        return set()

    store.domains_with_held_mail = slow_look  # type: ignore[method-assign]
    w = HeldMailWatch(store, poll_interval=60.0, linger=1.0)  # type: ignore[arg-type]
    await w.start()
    waiter = w.enter({"example.org"})
    assert waiter is not None
    await until(started.is_set, "the look after the listener opened is under way")
    pending = list(w._pending_polls)
    assert pending
    try:
        await w.shutdown()  # the look still blocks its worker thread
        assert all(task.done() for task in pending)
    finally:
        release.set()
