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
     A lost LISTEN connection is made again every `poll_interval`, with a
     poll right after (notices sent meanwhile are lost).
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
from collections.abc import Iterable

from fermoposta.ops import metrics
from fermoposta.store.base import HeldMailNotices, HoldQueue, StoreError

log = logging.getLogger("fermoposta.odmr")

POLL_INTERVAL = 3.0
MAX_WAITING = 1000


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
                 max_waiting: int = MAX_WAITING) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.max_waiting = max_waiting
        self.closing = asyncio.Event()
        self._by_domain: dict[str, set[Waiter]] = collections.defaultdict(set)
        self._waiters: set[Waiter] = set()
        self._per_listener: collections.Counter[str] = collections.Counter()
        self._someone = asyncio.Event()  # set while anyone waits (the poll sleeps otherwise)
        self._poller: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_polls: set[asyncio.Future[None]] = set()
        # Figures for tests and logs.
        self.polls = 0
        self.notices = 0

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
        metrics.ATRN_WAITING.set(len(self._waiters))
        return waiter

    def _move(self, waiter: Waiter, domains: frozenset[str]) -> None:
        if waiter not in self._waiters:
            return
        self._forget_domains(waiter)
        waiter.domains = domains
        for domain in domains:
            self._by_domain[domain].add(waiter)

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
        self._poller = asyncio.create_task(self._poll_loop(), name="atrn-wait-poll")
        self._thread = threading.Thread(target=self._listen_loop, name="atrn-wait-notices",
                                        daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self.closing.set()
        self._stop.set()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None

    async def _poll_loop(self) -> None:
        while True:
            await self._someone.wait()
            await asyncio.sleep(self.poll_interval)
            await self.poll()

    async def poll(self) -> None:
        """One look at the store for every waiter's domains together."""
        wanted = set(self._by_domain)
        if not wanted:
            return
        self.polls += 1
        try:
            found = await asyncio.to_thread(self.store.domains_with_held_mail, wanted)
        except StoreError as exc:
            log.warning("waiting ATRNs: cannot look for held mail: %s", exc)
            return
        self.notify(found)

    def _from_thread(self, domains: set[str]) -> None:
        loop = self._loop
        if loop is None or not domains:
            return
        self.notices += 1
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
            loop.call_soon_threadsafe(self.notify, domains)

    def _listen_loop(self) -> None:
        """In a thread: the store's notices, if it has any, until `shutdown`."""
        notices: HeldMailNotices | None = None
        failing = False
        try:
            while not self._stop.is_set():
                if notices is None:
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
                    if failing:
                        log.info("waiting ATRNs: notices of new mail work again")
                        failing = False
                        # What came while we were deaf: look now.
                        loop = self._loop
                        if loop is not None:
                            with contextlib.suppress(RuntimeError):
                                loop.call_soon_threadsafe(self._poll_soon)
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

    def _poll_soon(self) -> None:
        task = asyncio.ensure_future(self.poll())
        self._pending_polls.add(task)
        task.add_done_callback(self._pending_polls.discard)

