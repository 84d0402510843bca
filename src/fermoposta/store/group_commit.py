"""Group commit: messages taken in by many sessions at once share one durable commit.

Contract:
- `GroupCommit(queue).enqueue(message, body, queue_id)` returns the queue id
  once the message is durably stored, exactly like `MessageQueue.enqueue`
  run in a thread: a caller answers 250 only after it returned.
- Messages that arrive while a commit is under way wait for it to end and
  are then stored together by `MessageQueue.enqueue_batch` (one transaction,
  one fsync or WAL flush), at most `max_batch` at a time.
- Gathering: the sessions say when a transaction opens (MAIL accepted) and
  closes (`transaction_opened(key)`, `transaction_closed(key)`, `key` the
  session; the close comes before its message's `enqueue`).  While other
  transactions are open, a batch waits for their messages, at most `gather`
  seconds after its oldest message was handed over; it goes as soon as none
  is open or the batch is full.  A transaction open for more than `STALE`
  seconds (a client that sits after MAIL, a big message on a slow link) is
  not waited for.  A lone message (no other transaction open) is committed at once,
  so a single sender waits for nothing; a busy provider pays one commit for
  several sessions' messages instead of one for every two or three (the
  commit's CPU per message, and the worker threads' pull on the GIL, fall
  with the batch's size: bench/README.md).
- Inline: a lone message (nothing pending, no commit under way, no other
  transaction open) is first offered to `MessageQueue.enqueue_now` on the
  event loop itself, which spares the two thread hops (SQLite: a commit
  that copies at most one chunk of body, none of it staged, and waits for
  no lock, only for its fsync); on `WouldBlock` it goes the usual way, in
  a worker thread.
  The loop is held for as long as that commit lasts: one slower than
  `INLINE_SLOW` seconds (a disk that stalls, SQLite's own checkpoint when
  its thread fell far behind), or commits that take `INLINE_TYPICAL`
  seconds on average (a slow disk; a moving average, left at that limit
  after the pause: a disk still slow pauses them again at its first
  commit), turn inline commits off for `INLINE_PAUSE` seconds (logged).
  Its errors reach the caller as a lone commit's would, and count as a
  commit like a failed lone commit.  When the engine says `WouldBlock`
  there, the message is offered to `enqueue_async` (PostgreSQL: the
  statement sent on a connection of the loop's own, the loop free
  meanwhile); messages that arrive while it is under way wait for it as
  for a commit under way.  `WouldBlock` there too: a worker thread.
- A batch is inline too: first offered to `MessageQueue.enqueue_batch_now`
  on the loop (SQLite: at most one chunk of body in all, no lock to wait
  for), under the same pause; its time counts against the limits less
  `INLINE_PER_MESSAGE` for each message beyond the first (the engine's own
  work, not the disk's).  On `WouldBlock` or while paused, it is offered
  to `enqueue_batch_async` (PostgreSQL: one statement on the loop's own
  connection, the loop free meanwhile; never paused, it holds nothing);
  when both say `WouldBlock`, a worker thread stores it.  A batch that
  fails on the loop (either way) is stored one message at a time in a
  worker thread (each body rewound).  Measured: at `-s 10` the worker
  thread's commits waited for the GIL the busy loop holds, and the loop
  for the GIL between their statements (bench/README.md, fifteenth and
  sixteenth sessions).  `inline_commits` counts the messages stored on
  the loop, whichever way.
- A batch that fails is retried one message at a time (each body rewound
  first), so one message's failure (an unreadable body, a store error that
  passes) never fails the others; each caller gets its own message's
  result or exception.  Retrying is safe: a failed batch stored nothing.
- A caller cancelled while it waits does not stop the commit (as with a
  thread that was already running): its message may be stored without a
  250, which at worst makes the client's retry a duplicate, never a loss.
- `on_stored(messages)`, if given, is called on the event loop after each
  commit with the messages it stored (before their callers are answered),
  e.g. to wake waiting ATRNs (`provider.atrn_wait`); an exception it
  raises is logged and ignored.
- Runs on one asyncio event loop; the store is called on it (inline) or in
  worker threads (`asyncio.to_thread`), one batch at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO

from fermoposta.store.base import MessageQueue, NewMessage, WouldBlock

log = logging.getLogger("fermoposta.store")

MAX_BATCH = 64
# Seconds a batch may wait for the messages of transactions still open
# (measured: bench/README.md, "seventh session").
GATHER = 0.002
STALE = 1.0  # seconds after which an open transaction is not waited for
INLINE_SLOW = 0.1  # seconds: an inline commit slower than this ...
INLINE_TYPICAL = 0.002  # ... or inline commits this slow on average ...
INLINE_PAUSE = 10.0  # ... turn inline commits off for this long
# The latest commit's weight in the moving average: low, so that one slow
# commit among fast ones does not pause them (measured on a VM disk: 0.9 ms
# median, 4 ms at the 99th percentile, 17 ms seen once), and about fifty
# commits of 10 ms (a slow disk) do.
INLINE_WEIGHT = 0.01
# Seconds of a batch's commit on the loop not held against the disk for
# each message beyond the first: the engine's own work (SQLite: 40 µs a
# 4 KiB message on the benchmark machine; bench/README.md, fifteenth
# session).  A slow fsync still shows whole.
INLINE_PER_MESSAGE = 0.0001


@dataclass(slots=True)
class _Pending:
    message: NewMessage
    body: IO[bytes]
    queue_id: str | None
    result: asyncio.Future[str] = field(repr=False)
    handed_at: float = 0.0  # loop time of the enqueue


def _items(batch: Sequence[_Pending]) -> list[tuple[NewMessage, IO[bytes], str | None]]:
    """The batch as the store's `enqueue_batch*` take it."""
    return [(item.message, item.body, item.queue_id) for item in batch]


class GroupCommit:
    def __init__(self, queue: MessageQueue, *, max_batch: int = MAX_BATCH,
                 gather: float = GATHER,
                 on_stored: Callable[[Sequence[NewMessage]], None] | None = None) -> None:
        self.queue = queue
        self.on_stored = on_stored
        self.max_batch = max(1, max_batch)
        self.gather = max(0.0, gather)
        self._pending: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None
        # Transactions open that may still hand a message over: key -> when
        # it opened (monotonic), oldest first (dicts keep insertion order).
        self._open: dict[object, float] = {}
        self._gathering: asyncio.Future[None] | None = None  # set when the wait may end
        self._on_loop: asyncio.Future[None] | None = None  # done when the loop's commit task ends
        self._inline_paused_until = 0.0  # monotonic
        self._inline_average = 0.0  # seconds an inline commit takes (moving average)
        # Figures for tests and metrics: commits made, messages they held,
        # and the messages stored by the loop itself (inline).
        self.commits = 0
        self.committed = 0
        self.inline_commits = 0

    @property
    def open_transactions(self) -> int:
        return len(self._open)

    def transaction_opened(self, key: object) -> None:
        self._open.pop(key, None)  # re-inserted: the newest is last
        self._open[key] = time.monotonic()

    def transaction_closed(self, key: object) -> None:
        if self._open.pop(key, None) is not None and not self._awaited():
            self._end_gathering()

    def _awaited(self) -> bool:
        """Whether an open transaction is young enough to be waited for
        (the newest is enough to tell)."""
        if not self._open:
            return False
        newest = self._open[next(reversed(self._open))]
        return time.monotonic() - newest < STALE

    def _end_gathering(self) -> None:
        waiter = self._gathering
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def enqueue(self, message: NewMessage, body: IO[bytes],
                      queue_id: str | None = None) -> str:
        if self._alone():
            stored = self._commit_inline(message, body, queue_id)
            if stored is None:
                stored = await self._commit_on_loop(message, body, queue_id)
            if stored is not None:
                return stored
        loop = asyncio.get_running_loop()
        pending = _Pending(message, body, queue_id, loop.create_future(), loop.time())
        self._pending.append(pending)
        if len(self._pending) >= self.max_batch:
            self._end_gathering()
        if self._committer is None or self._committer.done():
            self._committer = loop.create_task(self._commit_all())
        # A cancelled caller cancels only its own future; the committer task
        # is not its to cancel, so the others' batch goes on.
        return await pending.result

    def _alone(self) -> bool:
        return (not self._pending and not self._open and self._on_loop is None
                and (self._committer is None or self._committer.done())
                and time.monotonic() >= self._inline_paused_until)

    def _commit_inline(self, message: NewMessage, body: IO[bytes],
                       queue_id: str | None) -> str | None:
        """The lone message stored on the loop, or None (`WouldBlock`)."""
        started = time.monotonic()
        try:
            stored = self.queue.enqueue_now(message, body, queue_id)
        except WouldBlock:
            return None
        except BaseException:
            self._timed_inline(started)
            raise
        self._timed_inline(started)
        self.committed += 1
        self.inline_commits += 1
        self._report_stored([message])
        return stored

    async def _commit_on_loop(self, message: NewMessage, body: IO[bytes],
                              queue_id: str | None) -> str | None:
        """The lone message stored by the loop without blocking it
        (`enqueue_async`), or None (`WouldBlock`).  Shielded: a cancelled
        caller leaves the commit, its count and `on_stored` to finish, and
        the messages that came meanwhile waiting for it.  If the commit's
        task itself is cancelled (the loop's shutdown, even before it ran),
        the caller gets `CancelledError` and nothing waits for it."""
        loop = asyncio.get_running_loop()
        self._on_loop = flight = loop.create_future()
        work = loop.create_task(self._store_on_loop(message, body, queue_id))
        # Ended however the task ends.  Added before `shield` adds its own
        # callback, so it runs first: `_on_loop` is clear when the caller
        # resumes.
        work.add_done_callback(lambda task: self._landed(flight, task))
        return await asyncio.shield(work)

    def _landed(self, flight: asyncio.Future[None], work: asyncio.Task[str | None]) -> None:
        if self._on_loop is flight:
            self._on_loop = None
        if not flight.done():
            flight.set_result(None)
        if not work.cancelled():
            work.exception()  # seen, also when the caller was cancelled before it ended

    async def _store_on_loop(self, message: NewMessage, body: IO[bytes],
                             queue_id: str | None) -> str | None:
        try:
            stored = await self.queue.enqueue_async(message, body, queue_id)
        except WouldBlock:
            return None
        except Exception:
            self.commits += 1
            raise
        self.commits += 1
        self.committed += 1
        self.inline_commits += 1
        self._report_stored([message])
        return stored

    def _timed_inline(self, started: float, messages: int = 1) -> None:
        """Count an inline commit of `messages` that was made (stored or
        failed) and pause them if it, or they on average, held the loop too
        long (`INLINE_PER_MESSAGE` allowed for each message beyond the first)."""
        self.commits += 1
        now = time.monotonic()
        elapsed = now - started
        judged = max(0.0, elapsed - (messages - 1) * INLINE_PER_MESSAGE)
        average = self._inline_average + INLINE_WEIGHT * (judged - self._inline_average)
        self._inline_average = average
        if judged > INLINE_SLOW or average > INLINE_TYPICAL:
            self._inline_paused_until = now + INLINE_PAUSE
            # At the limit: after the pause one more slow commit pauses them
            # again (a slow disk), fast ones bring it down (one slow commit).
            self._inline_average = min(average, INLINE_TYPICAL)
            log.info("a commit on the event loop took %.1f ms (%.1f ms on average); commits "
                     "go to worker threads for the next %.0f s", elapsed * 1000,
                     average * 1000, INLINE_PAUSE)

    def _report_stored(self, stored: list[NewMessage]) -> None:
        if self.on_stored is None or not stored:
            return
        try:
            self.on_stored(stored)
        except Exception:
            log.exception("on_stored callback failed")

    async def _gather(self) -> None:
        """Wait for the messages of the transactions still open, until
        none is, the batch is full or the oldest pending message has waited
        `gather` seconds; first for a commit made by the loop that is
        under way (`enqueue_async`)."""
        if self._on_loop is not None:
            await asyncio.shield(self._on_loop)
        if not self.gather or len(self._pending) >= self.max_batch or not self._awaited():
            return
        loop = asyncio.get_running_loop()
        delay = self._pending[0].handed_at + self.gather - loop.time()
        if delay <= 0:
            return
        self._gathering = waiter = loop.create_future()
        timer = loop.call_later(delay, self._end_gathering)
        try:
            await waiter
        finally:
            timer.cancel()
            self._gathering = None

    async def _commit_all(self) -> None:
        while self._pending:
            try:
                await self._gather()
            except BaseException:  # cancelled at shutdown: nothing of theirs is stored
                for item in self._pending:
                    item.result.cancel()
                self._pending.clear()
                raise
            batch = self._pending[: self.max_batch]
            del self._pending[: len(batch)]
            outcomes, tried = self._store_inline(batch)
            try:
                if outcomes is None and not tried:
                    outcomes, tried = await self._store_on_loop_connection(batch)
                if outcomes is None:
                    # After a failed try on the loop, one by one (bodies rewound).
                    outcomes = await asyncio.to_thread(self._store, batch, not tried)
                    self.commits += 1
            except BaseException as exc:  # cancelled at shutdown: tell every waiter
                for item in [*batch, *self._pending]:
                    if item.result.done():
                        continue
                    if isinstance(exc, Exception):
                        item.result.set_exception(exc)
                    else:
                        item.result.cancel()
                self._pending.clear()
                raise
            self._report_stored([item.message for item, outcome
                                 in zip(batch, outcomes, strict=True)
                                 if not isinstance(outcome, BaseException)])
            for item, outcome in zip(batch, outcomes, strict=True):
                if item.result.done():
                    continue  # its caller is gone (cancelled)
                if isinstance(outcome, BaseException):
                    item.result.set_exception(outcome)
                else:
                    self.committed += 1
                    item.result.set_result(outcome)

    def _store_inline(self, batch: list[_Pending]
                      ) -> tuple[list[str | BaseException] | None, bool]:
        """On the loop: (the outcomes, True) of the batch in one commit
        (`enqueue_batch_now`); (None, False) when it was not tried
        (`WouldBlock`: nothing read or stored; inline commits paused);
        (None, True) when it failed (nothing stored; its bodies read)."""
        started = time.monotonic()
        if started < self._inline_paused_until:
            return None, False
        try:
            stored = self.queue.enqueue_batch_now(_items(batch))
        except WouldBlock:
            return None, False
        except Exception as exc:
            self._timed_inline(started, len(batch))
            log.info("group commit of %d messages on the event loop failed (%s); "
                     "storing them one by one in a worker thread", len(batch), exc)
            return None, True
        self._timed_inline(started, len(batch))
        self.inline_commits += len(batch)
        return list(stored), True

    async def _store_on_loop_connection(self, batch: list[_Pending]
                                        ) -> tuple[list[str | BaseException] | None, bool]:
        """`_store_inline`'s answers for `MessageQueue.enqueue_batch_async`:
        the batch in one statement sent by the loop, which serves the
        sessions meanwhile (PostgreSQL); not counted against the inline
        limits (it does not hold the loop)."""
        try:
            stored = await self.queue.enqueue_batch_async(_items(batch))
        except WouldBlock:
            return None, False
        except Exception as exc:
            self.commits += 1
            log.info("group commit of %d messages on the event loop's connection failed (%s); "
                     "storing them one by one in a worker thread", len(batch), exc)
            return None, True
        self.commits += 1
        self.inline_commits += len(batch)
        return list(stored), True

    def _store(self, batch: list[_Pending], whole: bool = True) -> list[str | BaseException]:
        """In a worker thread: the batch in one commit, or one by one if that
        failed or `whole` is false (a commit on the loop failed)."""
        if whole and len(batch) > 1:
            try:
                return list(self.queue.enqueue_batch(_items(batch)))
            except Exception as exc:
                log.info("group commit of %d messages failed (%s); storing them one by one",
                         len(batch), exc)
        outcomes: list[str | BaseException] = []
        for item in batch:
            try:
                if len(batch) > 1 or not whole:
                    item.body.seek(0)
                outcomes.append(self.queue.enqueue(item.message, item.body, item.queue_id))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes
