"""Delivered recipients removed in the background, many per commit.

Contract (`DeliveredCommits(store, log, label)`, one per ODMR drain and one
per `OutboundRunner`, used on its event loop):
- `add(message_id, recipient_ids)` queues the removal of recipients the
  next hop accepted (a 2xx to the end of data, no DSN to generate).  A
  background task commits the queued removals, gathered for up to
  `COMMIT_GATHER` seconds or `COMMIT_BATCH` of them per transaction (one
  fsync for many), so the next message goes out without waiting for the
  last one's commit.
- `await flush()` returns once every removal added before the call is
  committed or has failed, not later: removals added meanwhile do not keep
  it waiting.  While a flush waits, commits do not gather.  Callers flush
  before their recipients could be sent by someone else (the drain before
  QUIT and before its leases go, the outbound runner before it releases a
  batch's claims).  Shielded: a cancelled caller does not cancel the commit.
- A commit the store refuses is tried `ATTEMPTS` times in all (the leases or
  claims are still held, so nothing else sends those recipients meanwhile);
  then it is logged on `log`, after `label` and with the queue ids it
  concerned, and `error` keeps the StoreError: those recipients stay queued
  and go again (a duplicate, never a loss; a crash before the commit does
  the same).  Later removals are still tried; the drain stops at `error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fermoposta.store.base import MessageQueue, StoreError

__all__ = ["DeliveredCommits"]

COMMIT_GATHER = 0.01  # seconds a delivery's removal may wait for others
COMMIT_BATCH = 100  # removals per transaction at most before committing at once
ATTEMPTS = 3  # tries of one commit before its recipients are left to go again
RETRY_PAUSE = 0.05  # seconds before the second try (doubled before the third)


class DeliveredCommits:
    def __init__(self, store: MessageQueue, log: logging.Logger, label: str = "") -> None:
        self.store = store
        self.log = log
        self.label = label  # a prefix for the log line ("<session id>: ")
        self.error: StoreError | None = None  # the last commit that failed for good
        self._ids: list[int] = []
        self._messages: list[str] = []  # queue ids of _ids, for the log
        self._added = 0  # removals added so far
        self._done = 0  # removals committed or failed so far
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # (_added at flush, ...)
        self._committer: asyncio.Task[None] | None = None
        self._gathered = asyncio.Event()  # COMMIT_BATCH are waiting, or a flush is
        self.commits = 0  # for tests and benchmarks

    def add(self, message_id: str, recipient_ids: list[int]) -> None:
        self._ids.extend(recipient_ids)
        self._messages.append(message_id)
        self._added += len(recipient_ids)
        if len(self._ids) >= COMMIT_BATCH:
            self._gathered.set()
        self._ensure_committer()

    async def flush(self) -> None:
        target = self._added
        if self._done >= target:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        self._gathered.set()
        self._ensure_committer()
        await asyncio.shield(waiter)

    def _ensure_committer(self) -> None:
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit())

    async def _commit(self) -> None:
        try:
            while self._ids:
                if len(self._ids) < COMMIT_BATCH and not self._waiters:
                    self._gathered.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._gathered.wait(), COMMIT_GATHER)
                ids, self._ids = self._ids, []
                messages, self._messages = self._messages, []
                try:
                    await self._record(ids, messages)
                finally:
                    self._done += len(ids)
                    self._wake(all_of_them=False)
        finally:
            if self._ids or self._waiters:  # cancelled (the loop is closing): let none hang
                self._wake(all_of_them=True)

    async def _record(self, ids: list[int], messages: list[str]) -> None:
        pause = RETRY_PAUSE
        for attempt in range(1, ATTEMPTS + 1):
            try:
                await asyncio.to_thread(self.store.record_delivered, ids, "", None)
                self.commits += 1
                return
            except StoreError as exc:
                if attempt < ATTEMPTS:
                    await asyncio.sleep(pause)
                    pause *= 2
                    continue
                self.error = exc
            except Exception as exc:  # a bug: the same, never a loss
                self.log.exception("%srecording delivered recipients failed", self.label)
                self.error = StoreError(f"{type(exc).__name__}: {exc}")
            shown = ", ".join(messages[:10]) + (", ..." if len(messages) > 10 else "")
            self.log.warning("%scannot record %d delivered recipients of %s (they stay queued "
                             "and go again): %s", self.label, len(ids), shown, self.error)
            return

    def _wake(self, *, all_of_them: bool) -> None:
        waiting = []
        for target, waiter in self._waiters:
            if all_of_them or target <= self._done:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((target, waiter))
        self._waiters = waiting
