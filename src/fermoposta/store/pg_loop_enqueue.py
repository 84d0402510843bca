"""Messages stored by the event loop itself: PostgreSQL's `enqueue_async` and
`enqueue_batch_async`.

Why: a lone message (one sender, `GroupCommit` with nothing else to do)
went to a worker thread and back, two thread hops and a wake-up of the loop
around one round trip to the server; at one sender that was a third of the
provider's CPU a message.  Sent on a connection of the loop's own
(psycopg's `AsyncConnection`), the statement costs the round trip and
nothing else, and the loop serves the other sessions meanwhile.  A batch
of several sessions' messages too: in a worker thread its statement's
parameters and reply took the GIL from the busy loop (`-s 10`, 10 A/B
pairs: 9 gained, median +9%; bench/README.md, sixteenth session).

Contract (a mixin of `PostgresStore`):
- `enqueue_async(message, body, queue_id)` stores a message whose body is
  one chunk at most (`CHUNK_SIZE`), under `queue_id` (drawn if None), in
  the one statement `_insert_whole_statement` (without ON CONFLICT: a taken
  id fails it), on autocommit: a transaction by itself, its commit flushed
  (`synchronous_commit` on) before the reply, as `enqueue`'s.
  `enqueue_batch_async(items)` does the same for several (message, body,
  queue id), each body one chunk at most, in the one statement
  `_insert_many_statement`: all stored or none; their ids in order.
- `WouldBlock`, with nothing stored and every body where it was, when it
  cannot: a bigger body (or one that cannot tell its size), the loop's
  connection busy with another statement, not connected yet (the first call
  starts connecting in the background: nobody waits for a connection; one
  that cannot be made is tried again after `RETRY` seconds), a queue id
  taken, or the connection lost before the statement was applied.
  The caller then enqueues them the usual way, in a worker thread.
- A lost connection: whether the statement was applied is told from its
  rows, once the server backend that ran it is gone
  (`PostgresMessages._found_after_loss`, shared with the pool's
  one-statement enqueue).  All found: the queue ids.  If the
  backend does not go, the look fails, or it finds some but not all:
  `StoreError` (the senders retry: at worst duplicates).  A database error
  (not a lost connection), a body that cannot be read or put back:
  `StoreError`, nothing stored.  The store closed, or its heartbeat
  failing: `StoreError`.
- Cancelled, it lets psycopg (3.3 or later: without blocking the loop)
  cancel a statement under way on the server and wait for that (10 s at
  most); the message is then stored or not, never half (at worst stored
  without a 250: a duplicate when the client sends it again).  The
  connection is then fit for the next call, or, if the cancel was not
  answered in time, closed by psycopg and made again at the next call.
  `GroupCommit` runs it in a shielded task, so that its own caller's
  cancellation does not cut it (only the loop's shutdown does).
- The connection belongs to the loop that made it; a call from another
  loop (a new `asyncio.run`) makes a new one.  `open_loop_connection()`
  makes it now (tests).  `_close_loop_connection()` (from `close()`, on the
  loop's thread or after the loop ended) closes it without a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import IO, TYPE_CHECKING, Any

import psycopg
from psycopg import errors as pg_errors

from fermoposta.store.base import (
    CHUNK_SIZE,
    NewMessage,
    StoreError,
    WouldBlock,
    bytes_after,
    new_queue_id,
)

log = logging.getLogger("fermoposta.store")

RETRY = 5.0  # seconds before a failed connection of the loop's is tried again


class PostgresLoopEnqueue:
    """`enqueue_async` and `enqueue_batch_async` of `PostgresStore`; see the
    module docstring."""

    _url: str
    _node: str
    _closed: bool
    _connect_kwargs: dict[str, Any]
    _clock: Callable[[], float]
    _SESSION_SETTINGS: tuple[str, tuple[str, ...]]

    if TYPE_CHECKING:  # provided by PostgresStore
        def _check_open(self) -> None: ...

        def _fail_fast(self) -> None: ...

        def _error(self, what: str, exc: BaseException) -> StoreError: ...

        def _found_after_loss(self, pid: int, ids: list[str], now: float) -> int: ...

        def _insert_whole_statement(self, message_id: str, message: NewMessage, now: float,
                                    data: bytes, *, on_conflict: bool = True
                                    ) -> tuple[str, tuple[object, ...]]: ...

        def _insert_many_statement(self, whole: Sequence[tuple[NewMessage, bytes, str]],
                                   now: float) -> tuple[str, tuple[object, ...]]: ...

    def _init_loop_enqueue(self) -> None:
        self._loop_conn: psycopg.AsyncConnection[Any] | None = None
        self._loop_conn_loop: asyncio.AbstractEventLoop | None = None
        self._loop_conn_pid = 0  # its server backend
        self._loop_connecting: asyncio.Task[None] | None = None
        self._loop_conn_busy = False
        self._loop_conn_retry_at = 0.0  # monotonic

    async def enqueue_async(self, message: NewMessage, body: IO[bytes],
                            queue_id: str | None = None) -> str:
        return (await self._enqueue_on_loop([(message, body, queue_id)]))[0]

    async def enqueue_batch_async(self, items: Sequence[tuple[NewMessage, IO[bytes], str | None]]
                                  ) -> list[str]:
        return await self._enqueue_on_loop(items)

    async def _enqueue_on_loop(self, items: Sequence[tuple[NewMessage, IO[bytes], str | None]]
                               ) -> list[str]:
        self._check_open()
        self._fail_fast()
        if self._loop_conn_busy:
            raise WouldBlock()
        conn = self._ready_connection()
        starts = [_start_of_small_body(body) for _, body, _ in items]
        named = [(message, body, queue_id or new_queue_id()) for message, body, queue_id in items]
        self._loop_conn_busy = True  # until `_enqueue_on` ends, however it does
        return await self._enqueue_on(conn, named, starts)

    async def open_loop_connection(self) -> None:
        """Make the loop's connection now, if it is not made (for tests)."""
        with contextlib.suppress(WouldBlock):
            self._ready_connection()
        connecting = self._loop_connecting
        if connecting is not None and connecting.get_loop() is asyncio.get_running_loop():
            await asyncio.shield(connecting)

    def _ready_connection(self) -> psycopg.AsyncConnection[Any]:
        """The loop's connection, or `WouldBlock` (connecting it meanwhile)."""
        loop = asyncio.get_running_loop()
        conn = self._loop_conn
        if conn is not None and self._loop_conn_loop is loop and not conn.closed:
            return conn
        self._close_loop_connection()  # another loop's, or a closed one
        connecting = self._loop_connecting
        if (connecting is None or connecting.done()
                or connecting.get_loop() is not loop) and \
                time.monotonic() >= self._loop_conn_retry_at:
            self._loop_connecting = loop.create_task(self._connect_loop(loop))
        raise WouldBlock()

    async def _connect_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True,
                                                         **self._connect_kwargs)
            try:
                await conn.execute(*self._SESSION_SETTINGS)
            except BaseException:
                await conn.close()
                raise
        except (psycopg.Error, OSError) as exc:
            self._loop_conn_retry_at = time.monotonic() + RETRY
            log.info("%s; messages go through worker threads for %.0f s",
                     self._error("connecting the event loop's connection failed", exc), RETRY)
            return
        if self._closed:  # the store was closed meanwhile
            await conn.close()
            return
        self._loop_conn, self._loop_conn_loop = conn, loop
        self._loop_conn_pid = conn.info.backend_pid

    async def _enqueue_on(self, conn: psycopg.AsyncConnection[Any],
                          named: Sequence[tuple[NewMessage, IO[bytes], str]],
                          starts: Sequence[int]) -> list[str]:
        try:
            try:
                whole: list[tuple[NewMessage, bytes, str]] = []
                for message, body, queue_id in named:
                    try:
                        data = body.read(CHUNK_SIZE + 1)
                    except (OSError, ValueError) as exc:
                        raise StoreError(f"cannot read the body to store: {exc}") from exc
                    if len(data) > CHUNK_SIZE:  # it grew after it was measured
                        raise WouldBlock()
                    whole.append((message, bytes(data), queue_id))
                return await self._store_on(conn, whole)
            except WouldBlock:
                for (_, body, _), start in zip(named, starts, strict=True):
                    _put_back(body, start)
                raise
        finally:
            self._loop_conn_busy = False

    async def _store_on(self, conn: psycopg.AsyncConnection[Any],
                        whole: Sequence[tuple[NewMessage, bytes, str]]) -> list[str]:
        now = self._clock()
        ids = [queue_id for _, _, queue_id in whole]
        if len(whole) == 1:
            [(message, data, queue_id)] = whole
            sql, params = self._insert_whole_statement(queue_id, message, now, data,
                                                       on_conflict=False)
        else:
            sql, params = self._insert_many_statement(whole, now)
        try:
            row = await _first_row(conn.execute(sql, params))
        except pg_errors.UniqueViolation as exc:
            raise WouldBlock() from exc  # an id is taken: nothing was stored
        except psycopg.OperationalError as exc:
            if not conn.broken:
                raise self._error("enqueue failed", exc) from exc
            pid = self._loop_conn_pid
            self._close_loop_connection()
            found = await asyncio.to_thread(self._found_after_loss, pid, ids, now)
            if found == len(ids):
                return ids
            if found == 0:
                raise WouldBlock() from exc  # never applied: the usual way stores them
            raise StoreError(f"enqueue: {found} of {len(ids)} messages found after the "
                             "connection was lost (one statement: all or none)") from exc
        except psycopg.Error as exc:
            raise self._error("enqueue failed", exc) from exc
        written = int(row[0]) if row is not None else -1
        if written != len(whole):
            raise StoreError(f"enqueue: the statement wrote {written} of {len(whole)} messages")
        return ids

    def _close_loop_connection(self) -> None:
        conn, self._loop_conn, self._loop_conn_loop = self._loop_conn, None, None
        if conn is not None and not conn.closed:
            # Without a loop (close() is synchronous): libpq's own close.
            conn.pgconn.finish()


def _start_of_small_body(body: IO[bytes]) -> int:
    """The body's position, if what follows it is one chunk at most; else
    `WouldBlock` (the position kept)."""
    remaining = bytes_after(body)
    if remaining is None or remaining > CHUNK_SIZE:
        raise WouldBlock()
    try:
        return body.tell()
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot tell where the body to store starts: {exc}") from exc


def _put_back(body: IO[bytes], start: int) -> None:
    try:
        body.seek(start)
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot rewind the body to store it: {exc}") from exc


async def _first_row(cursor: Awaitable[psycopg.AsyncCursor[Any]]) -> Any:
    return await (await cursor).fetchone()
