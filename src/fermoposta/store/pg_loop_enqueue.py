"""A lone message stored by the event loop itself: PostgreSQL's `enqueue_async`.

Why: a lone message (one sender, `GroupCommit` with nothing else to do)
went to a worker thread and back, two thread hops and a wake-up of the loop
around one round trip to the server; at one sender that was a third of the
provider's CPU a message.  Sent on a connection of the loop's own
(psycopg's `AsyncConnection`), the statement costs the round trip and
nothing else, and the loop serves the other sessions meanwhile.

Contract (a mixin of `PostgresStore`):
- `enqueue_async(message, body, queue_id)` stores a message whose body is
  one chunk at most (`CHUNK_SIZE`), under `queue_id` (drawn if None), in
  the one statement `_insert_whole_statement` (without ON CONFLICT: a taken
  id fails it), on autocommit: a transaction by itself, its commit flushed
  (`synchronous_commit` on) before the reply, as `enqueue`'s.
- `WouldBlock`, with nothing stored and the body where it was, when it
  cannot: a bigger body (or one that cannot tell its size), the loop's
  connection busy, not connected (a failed connection is tried again after
  `RETRY` seconds; meanwhile every call says `WouldBlock` at once), the
  queue id taken, or the connection lost before the statement was applied
  (found out by a look for its rows: queue id, node and arrival time).
  The caller then enqueues it the usual way, in a worker thread.
- A lost connection after the statement was applied: the queue id.  If the
  look for its rows fails too: `StoreError` (the sender retries: at worst a
  duplicate).  A database error (not a lost connection): `StoreError`,
  nothing stored.  The store closed, or its heartbeat failing: `StoreError`.
- The statement is not cut short by a caller that is cancelled (its
  outcome is then at most a message stored without a 250: a duplicate when
  the client sends it again, never half a message); the connection stays
  consistent.
- The connection belongs to the loop that made it; a call from another
  loop (a new `asyncio.run`) makes a new one.  `_close_loop_connection()`
  (from `close()`) closes it without a loop.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Awaitable, Callable
from typing import IO, TYPE_CHECKING, Any

import psycopg
from psycopg import errors as pg_errors

from fermoposta.store.base import CHUNK_SIZE, NewMessage, StoreError, WouldBlock, new_queue_id

log = logging.getLogger("fermoposta.store")

RETRY = 5.0  # seconds before a failed connection of the loop's is tried again


class PostgresLoopEnqueue:
    """`enqueue_async` of `PostgresStore`; see the module docstring."""

    _url: str
    _node: str
    _connect_kwargs: dict[str, Any]
    _clock: Callable[[], float]
    _SESSION_SETTINGS: tuple[str, tuple[str, ...]]

    if TYPE_CHECKING:  # provided by PostgresStore
        def _check_open(self) -> None: ...

        def _fail_fast(self) -> None: ...

        def _error(self, what: str, exc: BaseException) -> StoreError: ...

        def _query(self, what: str, sql: str, params: Any = (), *,
                   binary: bool = False) -> list[Any]: ...

        def _insert_whole_statement(self, message_id: str, message: NewMessage, now: float,
                                    data: bytes, *, on_conflict: bool = True
                                    ) -> tuple[str, tuple[object, ...]]: ...

    def _init_loop_enqueue(self) -> None:
        self._loop_conn: psycopg.AsyncConnection[Any] | None = None
        self._loop_conn_loop: asyncio.AbstractEventLoop | None = None
        self._loop_conn_busy = False
        self._loop_conn_retry_at = 0.0  # monotonic

    async def enqueue_async(self, message: NewMessage, body: IO[bytes],
                            queue_id: str | None = None) -> str:
        self._check_open()
        self._fail_fast()
        if self._loop_conn_busy:
            raise WouldBlock()
        start = _start_of_small_body(body)
        self._loop_conn_busy = True
        try:
            conn = await self._loop_connection()
            data = body.read()
            try:
                return await self._store_on_loop(conn, message, bytes(data),
                                                 queue_id or new_queue_id())
            except WouldBlock:
                body.seek(start)
                raise
        finally:
            self._loop_conn_busy = False

    async def _loop_connection(self) -> psycopg.AsyncConnection[Any]:
        loop = asyncio.get_running_loop()
        conn = self._loop_conn
        if conn is not None and self._loop_conn_loop is loop and not conn.closed:
            return conn
        self._close_loop_connection()  # another loop's, or a closed one
        if time.monotonic() < self._loop_conn_retry_at:
            raise WouldBlock()
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
            log.info("%s; lone messages go through worker threads for %.0f s",
                     self._error("connecting the event loop's connection failed", exc), RETRY)
            raise WouldBlock() from exc
        self._loop_conn, self._loop_conn_loop = conn, loop
        return conn

    async def _store_on_loop(self, conn: psycopg.AsyncConnection[Any], message: NewMessage,
                             data: bytes, queue_id: str) -> str:
        now = self._clock()
        sql, params = self._insert_whole_statement(queue_id, message, now, data,
                                                   on_conflict=False)
        # Shielded: a cancelled caller does not cut the statement short.
        statement = asyncio.ensure_future(_first_row(conn.execute(sql, params)))
        statement.add_done_callback(_retrieve)
        try:
            row = await asyncio.shield(statement)
        except pg_errors.UniqueViolation as exc:
            raise WouldBlock() from exc  # the id is taken: nothing was stored
        except psycopg.OperationalError as exc:
            if not conn.broken:
                raise self._error("enqueue failed", exc) from exc
            self._close_loop_connection()
            if await self._rows_found(queue_id, now):
                return queue_id
            raise WouldBlock() from exc  # never applied: the usual way stores it
        except psycopg.Error as exc:
            raise self._error("enqueue failed", exc) from exc
        written = int(row[0]) if row is not None else -1
        if written != 1:
            raise StoreError(f"enqueue: the statement wrote {written} of 1 messages")
        return queue_id

    async def _rows_found(self, queue_id: str, now: float) -> bool:
        """Whether the statement whose connection broke was applied: our row,
        not an older message's that drew the same id (this node's, received
        at this very `now`).  `StoreError` if the look fails."""
        rows = await asyncio.to_thread(
            self._query, "enqueue (was the commit applied?)",
            "SELECT count(*) FROM messages WHERE id = %s AND received_at = %s AND node = %s",
            (queue_id, now, self._node))
        return int(rows[0][0]) == 1

    def _close_loop_connection(self) -> None:
        conn, self._loop_conn, self._loop_conn_loop = self._loop_conn, None, None
        if conn is not None and not conn.closed:
            # Without a loop (close() is synchronous): libpq's own close.
            conn.pgconn.finish()


def _start_of_small_body(body: IO[bytes]) -> int:
    """The body's position, if what follows it is one chunk at most; else
    `WouldBlock` (the position kept)."""
    try:
        if not body.seekable():
            raise WouldBlock()
        start = body.tell()
        end = body.seek(0, io.SEEK_END)
        body.seek(start)
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot tell the size of the body to store: {exc}") from exc
    if end - start > CHUNK_SIZE:
        raise WouldBlock()
    return start


async def _first_row(cursor: Awaitable[psycopg.AsyncCursor[Any]]) -> Any:
    return await (await cursor).fetchone()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a shielded statement's outcome as seen, when its caller was
    cancelled before it ended (asyncio would log it as never retrieved)."""
    if not task.cancelled():
        task.exception()
