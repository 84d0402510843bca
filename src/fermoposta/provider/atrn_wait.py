"""Waiting ATRNs (issue 12): one shared watch per node wakes the sessions
whose domains just got mail.

Contract:
- `HeldMailWatch(store, poll_interval=..., max_waiting=...)` is one per
  provider process.  `enter(domains, listener)` gives a `Waiter` (its
  `event` is set when mail for one of its domains may have been committed)
  or None when `max_waiting` sessions already wait (the caller answers 453
  at once).  `Waiter.leave()` ends the wait (idempotent).  `waiting` and
  `waiting_on(listener)` count the waiters (the listeners' connection limits
  leave them out: they have their own, `max_waiting`).
- A waiter holds no lease and costs no query of its own.  Wake-ups come
  from three places, all for the whole node:
  1. `notify(domains)`, in-process and at once: the provider calls it when
     its group commit stored held mail (`GroupCommit(on_stored=...)`).
  2. The store's notices (`HoldQueue.held_mail_notices`; PostgreSQL: LISTEN
     on the NOTIFY its triggers send on commit), read by one thread: mail
     committed by any node or process wakes the waiter within milliseconds.
     The listener is opened only while someone waits, and closed once
     nobody has waited for `linger` seconds (`LINGER`): every held message
     of every node is a notice, which a node with no waiter would read for
     nothing (its intake paid for it: bench/README.md).  A lost
     connection is made again at once, then every `poll_interval` while
     it cannot be made, and only while someone waits.  Each time the
     listener opens, the store is looked at once right after
     (`catch_ups`), for mail committed before the LISTEN took hold.  Only
     notices for domains someone waits on reach the event loop (`notices`
     counts those): one for another domain was committed before any waiter
     of that domain entered, and a waiter looks once after it enters or
     when its domains grow (`Waiter.watch_domains`).
  3. A poll every `poll_interval` seconds while anyone waits: one
     `domains_with_held_mail` over the union of the waited-for domains (an
     indexed query per node, not per session).  The cross-process fallback
     for SQLite (another process on the same file: `fermoposta queue
     release`, a second provider), and a safety net everywhere.
  A woken waiter decides for itself (in `provider.odmr`): the wake-up is a
  hint, never a promise of mail.
- `shutdown()` sets `closing` (every waiter ends its wait: the provider is
  stopping) and stops the thread and the poll; `start()` starts them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

from fermoposta.ops import metrics
from fermoposta.store.base import HeldMailNotices, HoldQueue, StoreError

log = logging.getLogger("fermoposta.odmr")

POLL_INTERVAL = 3.0
MAX_WAITING = 1000
LINGER = 30.0  # seconds the listener stays open after the last waiter left


class Waiter:
    __slots__ = ("_watch", "domains", "event", "listener")

    def __init__(self, watch: HeldMailWatch, domains: frozenset[str], listener: str) -> None:
        self.domains = domains
        self.listener = listener
        self.event = asyncio.Event()
        self._watch: HeldMailWatch | None = watch

    def leave(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch._leave(self)

    def watch_domains(self, domains: Iterable[str]) -> None:
        """Wait for these domains from now on (the account's changed)."""
        if self._watch is not None:
            self._watch._move(self, frozenset(domains))


class HeldMailWatch:
    def __init__(self, store: HoldQueue, *, poll_interval: float = POLL_INTERVAL,
                 max_waiting: int = MAX_WAITING, linger: float = LINGER) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.max_waiting = max_waiting
        self.linger = linger
        self.closing = asyncio.Event()
        self._by_domain: dict[str, set[Waiter]] = collections.defaultdict(set)
        self._waiters: set[Waiter] = set()
        self._per_listener: collections.Counter[str] = collections.Counter()
        self._someone = asyncio.Event()  # set while anyone waits (the poll sleeps otherwise)
        # The same for the notices' thread (it listens only then), and when
        # the last waiter left (monotonic; the listener lingers after it).
        self._wanted = threading.Event()
        self._idle_since = 0.0
        self._poller: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_polls: set[asyncio.Future[None]] = set()
        # Figures for tests and logs: polls made, looks after the listener
        # opened, notices that reached the loop, listeners opened.
        self.polls = 0
        self.catch_ups = 0
        self.notices = 0
        self.listens = 0

    # --- waiters ---------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def waiting_on(self, listener: str) -> int:
        return self._per_listener[listener]

    def enter(self, domains: Iterable[str], listener: str = "odmr") -> Waiter | None:
        if self.closing.is_set() or len(self._waiters) >= self.max_waiting:
            return None
        waiter = Waiter(self, frozenset(domains), listener)
        self._waiters.add(waiter)
        self._per_listener[listener] += 1
        for domain in waiter.domains:
            self._by_domain[domain].add(waiter)
        self._someone.set()
        self._wanted.set()
        metrics.ATRN_WAITING.set(len(self._waiters))
        return waiter

    def _move(self, waiter: Waiter, domains: frozenset[str]) -> None:
        if waiter not in self._waiters:
            return
        added = domains - waiter.domains
        self._forget_domains(waiter)
        waiter.domains = domains
        for domain in domains:
            self._by_domain[domain].add(waiter)
        if added:
            # Their notices were dropped until now (`_from_thread`): the
            # waiter looks once, as it did when it entered.
            waiter.event.set()

    def _forget_domains(self, waiter: Waiter) -> None:
        for domain in waiter.domains:
            group = self._by_domain.get(domain)
            if group is not None:
                group.discard(waiter)
                if not group:
                    del self._by_domain[domain]

    def _leave(self, waiter: Waiter) -> None:
        if waiter not in self._waiters:
            return
        self._waiters.discard(waiter)
        self._per_listener[waiter.listener] -= 1
        if self._per_listener[waiter.listener] <= 0:
            del self._per_listener[waiter.listener]
        self._forget_domains(waiter)
        if not self._waiters:
            self._someone.clear()
            self._idle_since = time.monotonic()  # before the thread may see it clear
            self._wanted.clear()
        metrics.ATRN_WAITING.set(len(self._waiters))

    def notify(self, domains: Iterable[str]) -> int:
        """Wake the waiters of `domains`; returns how many were woken."""
        woken = 0
        for domain in domains:
            for waiter in self._by_domain.get(domain, ()):
                if not waiter.event.is_set():
                    waiter.event.set()
                    woken += 1
        return woken

    # --- the node's background work ----------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        if not self._waiters:
            self._wanted.clear()
        self._poller = asyncio.create_task(self._poll_loop(), name="atrn-wait-poll")
        self._thread = threading.Thread(target=self._listen_loop, name="atrn-wait-notices",
                                        daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self.closing.set()
        self._stop.set()
        self._wanted.set()  # wakes the thread if it waits for a waiter
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None
        for task in list(self._pending_polls):
            task.cancel()
        await asyncio.gather(*self._pending_polls, return_exceptions=True)

    async def _poll_loop(self) -> None:
        while True:
            await self._someone.wait()
            await asyncio.sleep(self.poll_interval)
            await self.poll()

    async def poll(self, *, catch_up: bool = False) -> None:
        """One look at the store for every waiter's domains together
        (`catch_up`: the one after the listener opened)."""
        wanted = set(self._by_domain)
        if not wanted:
            return
        if catch_up:
            self.catch_ups += 1
        else:
            self.polls += 1
        try:
            found = await asyncio.to_thread(self.store.domains_with_held_mail, wanted)
        except StoreError as exc:
            log.warning("waiting ATRNs: cannot look for held mail: %s", exc)
            return
        self.notify(found)

    def _from_thread(self, domains: set[str]) -> None:
        if not domains:
            return
        # Lookups only (`in` neither iterates the loop's dict nor inserts
        # into it): safe from this thread.
        waited = {domain for domain in domains if domain in self._by_domain}
        if not waited:
            return
        self.notices += 1
        self._to_loop(self.notify, waited)

    def _to_loop(self, callback: Callable[..., object], *args: object) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
                loop.call_soon_threadsafe(callback, *args)

    def _listen_loop(self) -> None:
        """In a thread: the store's notices, if it has any, while anyone
        waits (and `linger` seconds after), until `shutdown`."""
        notices: HeldMailNotices | None = None
        failing = False
        try:
            while not self._stop.is_set():
                if notices is None:
                    if not self._wanted.is_set():
                        self._wanted.wait(1.0)  # nobody waits: no listener
                        continue
                    if self._stop.is_set():
                        break  # woken by shutdown: open nothing
                    try:
                        notices = self.store.held_mail_notices()
                    except StoreError as exc:
                        if not failing:
                            log.warning("waiting ATRNs: no notices of new mail (%s); "
                                        "polling every %g s", exc, self.poll_interval)
                        failing = True
                        self._stop.wait(self.poll_interval)
                        continue
                    if notices is None:
                        return  # the engine has none: the poll alone
                    self.listens += 1
                    if failing:
                        log.info("waiting ATRNs: notices of new mail work again")
                        failing = False
                    # What was committed before the LISTEN took hold: look now.
                    self._to_loop(self._catch_up_soon)
                elif (not self._wanted.is_set()
                      and time.monotonic() - self._idle_since >= self.linger):
                    notices.close()  # nobody has waited for a while
                    notices = None
                    continue
                try:
                    self._from_thread(notices.wait(1.0))
                except StoreError as exc:
                    log.warning("waiting ATRNs: %s", exc)
                    failing = True
                    notices.close()
                    notices = None
        finally:
            if notices is not None:
                notices.close()

    def _catch_up_soon(self) -> None:
        task = asyncio.ensure_future(self.poll(catch_up=True))
        self._pending_polls.add(task)
        task.add_done_callback(self._pending_polls.discard)

