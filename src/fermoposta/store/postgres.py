"""PostgreSQL engine of the store (see `fermoposta.store.base` for the contract).

Several provider processes, on several machines, share one database through
this engine; every guarantee of the contract holds across them.

The engine is this module (connections, transactions, holders, messages,
held mail, leases, outbound claims, rate events) and two mixins that use
only its transactions: `pg_tools` (the queue tools) and `pg_directory`
(accounts and domains); `pg_rows` has the columns and row conversions they
share, `pg_schema` the schema and its migrations.

Contract and choices:
- `PostgresStore(url, node=..., clock=..., pool_size=..., node_timeout=...,
  heartbeat_interval=..., connect_timeout=...)` (heartbeat_interval default:
  min(3 s, node_timeout / 5); ValueError unless 0 < heartbeat_interval <
  node_timeout, pool_size >= 1, connect_timeout > 0): a psycopg 3 connection
  pool of at most `pool_size` connections on `url` (a libpq URL or
  key=value string).  The constructor migrates the schema
  (`pg_schema.migrate`, safe when nodes start at once), registers this
  store's holder row and starts its heartbeat; it raises `StoreError` when
  the server cannot be reached within `connect_timeout` seconds.
- Tables live in the connection's `current_schema()` (set it with
  `options=-csearch_path=...` in the URL); nothing names `public`.
- Durability: every connection runs with `synchronous_commit = on`, whatever
  the server's or role's default, and a method returns only after COMMIT.
  Writes are one READ COMMITTED transaction each; rows that several nodes
  may touch are locked in a fixed order (recipients by id, then messages by
  id), so concurrent outcomes neither deadlock nor leave a message without
  recipients behind.  Multi-query reads run in one REPEATABLE READ READ ONLY
  transaction (one snapshot, like SQLite's).
- Errors: `psycopg.Error`, `PoolTimeout` and `OSError` become `StoreError`,
  whose message names what failed and the URL without its password (the
  password is also scrubbed from the server's text); misuse raises
  `ValueError` as documented; any other exception inside a write rolls it
  back and propagates unchanged.  A queue id collision draws a new id
  inside a SAVEPOINT.
- A server that is down or restarting: methods fail with `StoreError` after
  at most about `connect_timeout` seconds (pool wait, libpq connect
  timeout, TCP keepalives and `tcp_user_timeout` for a silent peer,
  `lock_timeout` for a lock that is never released) and work again once it
  is back: every connection is checked when taken from the pool and a
  broken one is replaced.
- Bodies: `body_chunks` rows of at most `CHUNK_SIZE` bytes, written one at a
  time inside the enqueue transaction and read one per query, so memory
  stays bounded; a body that leaves the queue while it is read raises
  `StoreError` instead of ending short.
- Holders: each store registers one `holders` row (`holder_id`: node, pid,
  random) and a daemon thread refreshes its `heartbeat_at` every
  `heartbeat_interval` seconds on a connection of its own (a busy pool
  cannot make a live node look dead).  Heartbeats are written and compared
  with the DATABASE clock, so clock skew between nodes does not matter.  A
  holder is dead when its row is missing or its heartbeat is older than
  `node_timeout` seconds.  `close()` stops the thread and deletes the row.
- Leases: free when expired (injected clock), when their holder is dead, or
  when held by the same owner; taken all-or-nothing by one INSERT ... ON
  CONFLICT DO UPDATE ... WHERE <free> RETURNING in domain order, rolled
  back unless every domain was taken, so two nodes racing for overlapping
  sets never both succeed.  `held_older_than` leaves out domains leased now
  by a live holder.
- Outbound claims: `claim_due_outbound` takes recipients with SELECT ...
  FOR UPDATE SKIP LOCKED (first the claims of dead holders, then the due
  ones in the order of SQLite's engine) and records the owner, expiry and
  this store's holder (`claim_holder`) in the same transaction, so two nodes
  never claim one recipient.  A claim of a dead holder is free at once.
  `QueueEntry.active` and `retry_outbound` count a claim only while it is
  unexpired and its holder alive.
- Rate events: `add_event` serializes the events of one key with an advisory
  transaction lock, so counts are exact across nodes.
- Time comes from the injected `clock` (default `time.time`), except holder
  heartbeats (the database's clock).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

import fermoposta.store.pg_schema as pg_schema
from fermoposta.store.base import (
    CHUNK_SIZE,
    NewMessage,
    QueuedMessage,
    QueuedRecipient,
    QueueEntry,
    RecipientState,
    StoreError,
    new_queue_id,
)
from fermoposta.store.pg_directory import PostgresDirectory
from fermoposta.store.pg_etrn import PostgresEtrn
from fermoposta.store.pg_notify import PgHeldNotices
from fermoposta.store.pg_rows import (
    _DB_NOW,
    _LOCK_RECIPIENTS,
    _M_MESSAGE_COLUMNS,
    _MESSAGE_COLUMNS,
    _R_RECIPIENT_COLUMNS,
    _RECIPIENT_COLUMNS,
    HELD,
    OUTBOUND,
    Conn,
    _ids,
)
from fermoposta.store.pg_tools import PostgresQueueTools
from fermoposta.store.rows import message_from_row as _message
from fermoposta.store.rows import recipient_from_row as _recipient

__all__ = ["SCHEMA_VERSION", "PostgresStore", "redact_conninfo"]

SCHEMA_VERSION = pg_schema.SCHEMA_VERSION
LOCK_TIMEOUT = 30.0  # seconds: a row lock held by a stuck transaction fails the call
# A transaction left open by a client that vanished is ended by the server.
IDLE_IN_TRANSACTION_TIMEOUT = 300.0
HOLDER_PRUNE_AGE = 86400.0  # seconds: holder rows dead this long are deleted at start
MAX_DOMAINS = 500  # held_older_than's bound (the SQLite engine's batch size)

log = logging.getLogger("fermoposta.store")

_ENGINE_ERRORS = (psycopg.Error, PoolTimeout, OSError)


def redact_conninfo(url: str) -> tuple[str, tuple[str, ...]]:
    """`url` without its password, for logs; and the password's spellings
    (as written and percent-decoded) to scrub from any text."""
    secrets_found: list[str] = []
    if url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(url)
        userinfo, at, hosts = parts.netloc.rpartition("@")
        netloc = parts.netloc
        if at:
            user, colon, password = userinfo.partition(":")
            if colon:
                secrets_found += [password, unquote(password)]
                netloc = f"{user}@{hosts}"
        query = parts.query
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key == "password" for key, _ in pairs):
            secrets_found += [value for key, value in pairs if key == "password"]
            query = urlencode([(k, v) for k, v in pairs if k != "password"])
        redacted = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    else:
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error:
            return "<unparsable PostgreSQL conninfo>", (url,)
        if "password" in params:
            secrets_found.append(str(params.pop("password")))
        redacted = make_conninfo("", **params)
    return redacted, tuple(sorted({s for s in secrets_found if s}, key=len, reverse=True))


class PostgresStore(PostgresDirectory, PostgresQueueTools, PostgresEtrn):
    """The `Store` on a PostgreSQL database shared by many nodes; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        node: str | None = None,
        clock: Callable[[], float] = time.time,
        pool_size: int = 10,
        node_timeout: float = 15.0,
        heartbeat_interval: float | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, not {pool_size}")
        if not connect_timeout > 0 or not math.isfinite(connect_timeout):
            raise ValueError(f"connect_timeout must be a positive number, not {connect_timeout}")
        if not node_timeout > 0 or not math.isfinite(node_timeout):
            raise ValueError(f"node_timeout must be a positive number, not {node_timeout}")
        if heartbeat_interval is None:
            # Five beats per timeout: 3 s for the default 15 s, and a short
            # configured timeout never makes a live node look dead.
            heartbeat_interval = min(3.0, node_timeout / 5)
        if not (0 < heartbeat_interval < node_timeout):
            raise ValueError(
                f"need 0 < heartbeat_interval ({heartbeat_interval}) < node_timeout "
                f"({node_timeout}): a live holder must beat before it is declared dead"
            )
        self._url = url
        self._url_for_logs, self._secrets = redact_conninfo(url)
        self._node = node or socket.gethostname()
        self._clock = clock
        self._node_timeout = float(node_timeout)
        self._heartbeat_interval = float(heartbeat_interval)
        self._connect_timeout = float(connect_timeout)
        host = re.sub(r"[^A-Za-z0-9.-]", "-", self._node)[:60] or "node"
        self._holder = f"{host}-{os.getpid()}-{secrets.token_hex(4)}"
        self._closed = False
        self._close_lock = threading.Lock()
        # Monotonic time of the last heartbeat that reached the database, and
        # whether the last attempt failed (the server is unreachable from here).
        self._last_beat = time.monotonic()
        self._unreachable = threading.Event()
        self._stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        seconds = max(1, math.ceil(connect_timeout))
        self._connect_kwargs: dict[str, Any] = {
            "connect_timeout": seconds,
            # A peer that vanishes without a FIN or RST (a cut cable, a dead
            # host) is noticed within about 2 * connect_timeout, not hours.
            "keepalives": 1,
            "keepalives_idle": seconds,
            "keepalives_interval": max(1, seconds // 3),
            "keepalives_count": 3,
            "tcp_user_timeout": seconds * 1000,
        }
        self._pool: ConnectionPool[Conn] = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs=self._connect_kwargs,
            configure=self._configure,
            # No `check=`: the pool's check loop backs off 1, 2, 4 s per
            # broken connection, so after a restart a caller would time out
            # before it reached a good one; `_connection` checks instead.
            timeout=self._connect_timeout,
            # Give up a chain of reconnection attempts (whose delays double)
            # soon, so a caller's request starts a fresh, immediate one.
            reconnect_timeout=max(2 * self._connect_timeout, 5.0),
            name="fermoposta-store",
            open=False,
        )
        # The first connection is a direct one: its failure says why (refused,
        # authentication, no such database), where a pool only times out.  It
        # migrates, registers our holder row, then is the heartbeat's own.
        try:
            beat_conn = self._connect()
        except _ENGINE_ERRORS as exc:
            raise self._error("cannot connect", exc) from exc
        try:
            try:
                pg_schema.migrate(beat_conn)
                with beat_conn.transaction():
                    self._register(beat_conn)
                self._last_beat = time.monotonic()
            except _ENGINE_ERRORS as exc:
                raise self._error("cannot open the store", exc) from exc
            try:
                self._pool.open(wait=True, timeout=self._connect_timeout)
            except _ENGINE_ERRORS as exc:
                raise self._error("cannot connect", exc) from exc
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                beat_conn.close()
            self._pool.close()
            raise
        self._beat_thread = threading.Thread(
            target=self._heartbeat_loop, args=(beat_conn,),
            name=f"store-heartbeat-{self._holder}", daemon=True,
        )
        self._beat_thread.start()

    # --- descriptive ------------------------------------------------------------------------

    @property
    def node(self) -> str:
        return self._node

    @property
    def url_for_logs(self) -> str:
        """The URL without any password: the only form of it to log or show."""
        return self._url_for_logs

    @property
    def holder_id(self) -> str:
        """This store's row in `holders`: what its leases and claims name."""
        return self._holder

    def __repr__(self) -> str:
        return f"PostgresStore({self._url_for_logs!r}, node={self._node!r})"

    # --- connections and transactions -------------------------------------------------------

    @staticmethod
    def _configure(conn: Conn) -> None:
        """Session settings of every connection (pool and heartbeat)."""
        conn.autocommit = True  # transactions are explicit (conn.transaction())
        conn.execute(
            "SELECT set_config('synchronous_commit', 'on', false),"
            " set_config('lock_timeout', %s, false),"
            " set_config('idle_in_transaction_session_timeout', %s, false)",
            (f"{int(LOCK_TIMEOUT * 1000)}ms", f"{int(IDLE_IN_TRANSACTION_TIMEOUT * 1000)}ms"),
        )

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, what: str, exc: BaseException) -> StoreError:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return StoreError(self._scrub(f"PostgreSQL store {self._url_for_logs}: {what}: {detail}"))

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    def _fail_fast(self) -> None:
        if self._unreachable.is_set():
            raise StoreError(self._scrub(
                f"PostgreSQL store {self._url_for_logs}: unreachable (the heartbeat has failed"
                f" for {time.monotonic() - self._last_beat:.0f} s; retried every"
                f" {self._heartbeat_interval:g} s)"))

    def holder_is_current(self) -> bool:
        """False once our heartbeat has not reached the database for half of
        `node_timeout`: the other nodes may soon take our leases and claims,
        so the drain and the outbound engine start no new transaction."""
        return time.monotonic() - self._last_beat < self._node_timeout / 2

    @contextmanager
    def _connection(self, first: str = "") -> Iterator[Conn]:
        """A pooled connection that answered just now, within `connect_timeout`.

        `first` (a BEGIN, or an empty query: one round trip, no statement) is
        the probe: a connection a server restart broke fails it at once, goes
        back to the pool (which drops it and starts a new one) and the next
        is tried, so a restart between two calls is not seen at all.  A BEGIN
        as the probe costs no round trip of its own."""
        self._fail_fast()
        deadline = time.monotonic() + self._connect_timeout
        while True:
            conn = self._pool.getconn(timeout=max(0.001, deadline - time.monotonic()))
            try:
                conn.execute(first)
            except psycopg.OperationalError:
                self._pool.putconn(conn)
                if time.monotonic() >= deadline:
                    raise
                continue
            except BaseException:
                self._pool.putconn(conn)
                raise
            break
        try:
            yield conn
        finally:
            self._pool.putconn(conn)

    @contextmanager
    def _write(self, what: str) -> Iterator[Conn]:
        """One transaction on a pooled connection: committed when the block
        ends, rolled back on any exception (`psycopg.Rollback` rolls back and
        ends the block normally).  Its BEGIN is the connection's probe."""
        self._check_open()
        try:
            with self._connection("BEGIN") as conn:
                try:
                    yield conn
                except psycopg.Rollback:  # an all-or-nothing write that took nothing
                    conn.execute("ROLLBACK")
                    return
                except BaseException:
                    # Nothing to keep; a broken connection is the pool's to drop.
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        except _ENGINE_ERRORS as exc:
            raise self._error(f"{what} failed", exc) from exc

    @contextmanager
    def _read(self, what: str, *, snapshot: bool = True) -> Iterator[Conn]:
        """A pooled connection for reading; with `snapshot`, every query of the
        block sees one snapshot (REPEATABLE READ READ ONLY)."""
        self._check_open()
        try:
            with self._connection("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
                                  if snapshot else "") as conn:
                try:
                    yield conn
                finally:
                    if conn.info.transaction_status != TransactionStatus.IDLE:
                        # Nothing to keep; a broken connection is the pool's to drop.
                        with contextlib.suppress(psycopg.Error):
                            conn.execute("ROLLBACK")
        except _ENGINE_ERRORS as exc:
            raise self._error(f"{what} failed", exc) from exc

    def _query(self, what: str, sql: str, params: Sequence[Any] = (), *,
               binary: bool = False) -> list[TupleRow]:
        """The rows of ONE read-only statement (one snapshot by itself), with
        no probe round trip: the statement is the probe, and a connection a
        server restart broke is replaced and the statement run again (a read
        may be repeated), within `connect_timeout`."""
        self._check_open()
        self._fail_fast()
        deadline = time.monotonic() + self._connect_timeout
        try:
            while True:
                conn = self._pool.getconn(timeout=max(0.001, deadline - time.monotonic()))
                try:
                    return conn.execute(sql, params, binary=binary).fetchall()
                except psycopg.OperationalError:
                    if not conn.broken or time.monotonic() >= deadline:
                        raise
                finally:
                    self._pool.putconn(conn)
        except _ENGINE_ERRORS as exc:
            raise self._error(f"{what} failed", exc) from exc

    def _live(self, column: str) -> str:
        """SQL: the holder named by `column` is alive (its row beat recently,
        by the database's clock)."""
        return (f"EXISTS (SELECT 1 FROM holders h WHERE h.id = {column}"
                f" AND h.heartbeat_at > {_DB_NOW} - {self._node_timeout!r})")

    # --- schema -------------------------------------------------------------------------------

    def schema_version(self) -> int:
        with self._read("schema version", snapshot=False) as conn:
            return pg_schema.current_version(conn)

    def migrate(self) -> tuple[int, int]:
        self._check_open()
        try:
            with self._connection() as conn:
                return pg_schema.migrate(conn)
        except _ENGINE_ERRORS as exc:
            raise self._error("schema migration failed", exc) from exc

    # --- holders ------------------------------------------------------------------------------

    def _beat(self, conn: Conn) -> None:
        conn.execute(
            "INSERT INTO holders (id, node, pid, started_at, heartbeat_at)"
            f" VALUES (%s, %s, %s, {_DB_NOW}, {_DB_NOW})"
            " ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at",
            (self._holder, self._node, os.getpid()),
        )

    def _register(self, conn: Conn) -> None:
        """Our holder row, before any lease or claim can name it."""
        self._beat(conn)
        # Rows of processes that died long ago: any reader counts them dead anyway.
        conn.execute(f"DELETE FROM holders WHERE heartbeat_at < {_DB_NOW} - %s",
                     (max(HOLDER_PRUNE_AGE, 100 * self._node_timeout),))

    def _connect(self) -> Conn:
        """A connection outside the pool, configured like the pool's."""
        conn = psycopg.connect(self._url, **self._connect_kwargs)
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _heartbeat_loop(self, conn: Conn | None) -> None:
        failing = False  # one warning per outage, not one per beat
        delay = self._heartbeat_interval
        try:
            while not self._stop.wait(delay):
                delay = self._heartbeat_interval
                try:
                    if conn is None or conn.closed:
                        conn = self._connect()
                    # Recreates the row if it went missing: we are alive.
                    self._beat(conn)
                    self._last_beat = time.monotonic()
                    self._unreachable.clear()
                    if failing:
                        log.info("PostgreSQL store %s: heartbeat of holder %s resumed",
                                 self._url_for_logs, self._holder)
                        failing = False
                except _ENGINE_ERRORS as exc:
                    error = self._error(f"heartbeat of holder {self._holder} failed", exc)
                    log.log(logging.DEBUG if failing else logging.WARNING, "%s", error)
                    if failing:
                        # Twice in a row (a fresh connection failed too): the
                        # server is unreachable; calls fail at once until a
                        # beat gets through, instead of each waiting for its
                        # own timeout in a worker thread.
                        self._unreachable.set()
                    else:
                        delay = 0.0  # one failure may be one lost connection: again now
                    failing = True
                    if conn is not None:
                        with contextlib.suppress(psycopg.Error):
                            conn.close()
                    conn = None
        finally:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()

    def _stop_heartbeat(self) -> None:
        """Stop beating, leaving the row (tests: a holder that dies without a word)."""
        self._stop.set()
        thread = self._beat_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._connect_timeout + self._heartbeat_interval + 5.0)

    # --- messages -----------------------------------------------------------------------------

    def enqueue(self, message: NewMessage, body: IO[bytes], queue_id: str | None = None) -> str:
        with self._write("enqueue") as conn:
            return self._enqueue(conn, message, body, queue_id)

    def enqueue_batch(self, items: Sequence[tuple[NewMessage, IO[bytes], str | None]]
                      ) -> list[str]:
        """One transaction; the messages whose body is one chunk go in one
        pipeline (one round trip for all of them, libpq pipeline mode), the
        others one statement at a time."""
        with self._write("enqueue") as conn:
            now = self._clock()
            ids: list[str] = [""] * len(items)
            whole: list[tuple[int, NewMessage, bytes, str]] = []
            for index, (message, body, queue_id) in enumerate(items):
                first = body.read(CHUNK_SIZE)
                second = body.read(CHUNK_SIZE) if first else b""
                if second:
                    ids[index] = self._enqueue(conn, message, body, queue_id,
                                               head=(first, second))
                else:
                    whole.append((index, message, bytes(first), queue_id or new_queue_id()))
            with conn.pipeline():
                cursors = [self._insert_whole_query(conn, message_id, message, now, data)
                           for _, message, data, message_id in whole]
            for (index, message, data, message_id), cursor in zip(whole, cursors, strict=True):
                row = cursor.fetchone()
                if row is not None and int(row[0]) == 1:
                    ids[index] = message_id
                else:  # a colliding id wrote nothing: draw a fresh one
                    ids[index] = self._enqueue(conn, message, io.BytesIO(), None,
                                               head=(data, b""))
            return ids

    def _enqueue(self, conn: Conn, message: NewMessage, body: IO[bytes],
                 queue_id: str | None = None,
                 head: tuple[bytes, bytes] | None = None) -> str:
        """`head`: the first two chunks, if the caller has read them already."""
        now = self._clock()
        if head is None:
            first = body.read(CHUNK_SIZE)
            second = body.read(CHUNK_SIZE) if first else b""
        else:
            first, second = head
        while True:
            message_id = queue_id or new_queue_id()
            queue_id = None  # on a collision, draw a fresh one
            if not second:  # the whole body is in `first`: one statement
                if self._insert_whole(conn, message_id, message, now, bytes(first)):
                    return message_id
                continue  # a colliding id wrote nothing
            row = conn.execute(
                "INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
                " body_8bit, envid, ret, client, node)"
                " VALUES (%s, %s, %s, 0, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO NOTHING RETURNING id",
                (message_id, message.sender, now, str(message.origin),
                 bool(message.smtputf8), bool(message.body_8bit), message.envid,
                 message.ret, message.client, self._node),
            ).fetchone()
            if row is not None:
                break
        size = 0
        seq = 0
        data: bytes = first
        while data:
            # %b: sent in binary, not as a hex text twice its size.
            conn.execute(
                "INSERT INTO body_chunks (message_id, seq, data) VALUES (%s, %s, %b)",
                (message_id, seq, bytes(data)),
            )
            size += len(data)
            seq += 1
            if second:
                data, second = second, b""
            else:
                data = body.read(CHUNK_SIZE)
        del first, data
        conn.execute("UPDATE messages SET size = %s WHERE id = %s", (size, message_id))
        self._insert_recipients(conn, message_id, message, now)
        return message_id

    _RECIPIENTS_SELECT = (
        "INSERT INTO recipients (message_id, address, domain, state, attempts, notify,"
        " orcpt, updated_at)"
        " SELECT {id}, u.address, u.domain, u.state, 0, u.notify, u.orcpt, %s"
        " FROM {source}unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[])"
        # WITH ORDINALITY keeps the ids in the message's order.
        " WITH ORDINALITY AS u(address, domain, state, notify, orcpt, n) ORDER BY u.n"
    )

    @staticmethod
    def _recipient_arrays(message: NewMessage) -> tuple[list[str | None], ...]:
        rs = message.recipients
        return ([r.address for r in rs], [r.domain for r in rs], [str(r.state) for r in rs],
                [r.notify for r in rs], [r.orcpt for r in rs])

    def _insert_recipients(self, conn: Conn, message_id: str, message: NewMessage,
                           now: float) -> None:
        if message.recipients:
            conn.execute(self._RECIPIENTS_SELECT.format(id="%s", source=""),
                         (message_id, now, *self._recipient_arrays(message)))

    def _insert_whole(self, conn: Conn, message_id: str, message: NewMessage, now: float,
                      data: bytes) -> bool:
        """The message, its one-chunk body and its recipients in one statement
        (one round trip); False, with nothing written, if `message_id` exists.
        The foreign keys are checked at the end of the statement, when the
        message row is there."""
        row = self._insert_whole_query(conn, message_id, message, now, data).fetchone()
        return row is not None and int(row[0]) == 1

    def _insert_whole_query(self, conn: Conn, message_id: str, message: NewMessage,
                            now: float, data: bytes) -> psycopg.Cursor[TupleRow]:
        """The statement of `_insert_whole`, executed; its one row counts the
        messages written (0 or 1)."""
        return conn.execute(
            "WITH m AS (INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
            " body_8bit, envid, ret, client, node)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING RETURNING id),"
            " c AS (INSERT INTO body_chunks (message_id, seq, data)"
            " SELECT m.id, 0, %b FROM m WHERE %s),"
            " r AS (" + self._RECIPIENTS_SELECT.format(id="m.id", source="m, ") + ")"
            " SELECT count(*) FROM m",
            (message_id, message.sender, now, len(data), str(message.origin),
             bool(message.smtputf8), bool(message.body_8bit), message.envid, message.ret,
             message.client, self._node,
             data, bool(data),
             now, *self._recipient_arrays(message)),
        )

    def is_empty(self) -> bool:
        with self._read("is empty") as conn:
            return all(conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None
                       for table in ("accounts", "domains", "messages"))

    def import_message(self, entry: QueueEntry, body: IO[bytes]) -> None:
        m = entry.message
        now = self._clock()
        with self._write("import message") as conn:
            try:
                with conn.transaction():  # a SAVEPOINT, so the error is ours to word
                    conn.execute(
                        "INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
                        " body_8bit, envid, ret, client, node)"
                        " VALUES (%s, %s, %s, 0, %s, %s, %s, %s, %s, %s, %s)",
                        (m.id, m.sender, m.received_at, str(m.origin), bool(m.smtputf8),
                         bool(m.body_8bit), m.envid, m.ret, m.client, m.node),
                    )
            except pg_errors.UniqueViolation:
                raise ValueError(f"message {m.id} is already in the store") from None
            size = 0
            seq = 0
            while data := body.read(CHUNK_SIZE):
                conn.execute(
                    "INSERT INTO body_chunks (message_id, seq, data) VALUES (%s, %s, %b)",
                    (m.id, seq, bytes(data)),
                )
                size += len(data)
                seq += 1
                del data
            conn.execute("UPDATE messages SET size = %s WHERE id = %s", (size, m.id))
            for r in m.recipients:
                row = conn.execute(
                    "INSERT INTO recipients (message_id, address, domain, state, attempts,"
                    " last_reply, notify, orcpt, updated_at, next_attempt_at, first_failure_at,"
                    " delay_notified) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " RETURNING id",
                    (m.id, r.address, r.domain, str(r.state), r.attempts, r.last_reply,
                     r.notify, r.orcpt, now, r.next_attempt_at, r.first_failure_at,
                     bool(r.delay_notified)),
                ).fetchone()
                previous = entry.hold_from.get(r.id)
                if r.state == RecipientState.HOLD and previous is not None and row is not None:
                    conn.execute("INSERT INTO recipient_holds (recipient_id, previous_state)"
                                 " VALUES (%s, %s)", (row[0], str(previous)))

    def get_message(self, message_id: str) -> QueuedMessage | None:
        # One statement (one snapshot): the message and its recipients.
        columns = _MESSAGE_COLUMNS.count(",") + 1
        rows = self._query(
            "get message",
            f"SELECT {_M_MESSAGE_COLUMNS}, {_R_RECIPIENT_COLUMNS} FROM messages m"
            " LEFT JOIN recipients r ON r.message_id = m.id WHERE m.id = %s ORDER BY r.id",
            (message_id,),
        )
        if not rows:
            return None
        return _message(rows[0][:columns],
                        [_recipient(r[columns:]) for r in rows if r[columns] is not None])

    @staticmethod
    def _messages_of(conn: Conn, recipient_ids: Sequence[int]) -> list[QueuedMessage]:
        """The messages of `recipient_ids`, each with only those recipients, in
        the order of their first recipient in `recipient_ids`."""
        if not recipient_ids:
            return []
        recipients = {
            int(r[0]): _recipient(r)
            for r in conn.execute(
                f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE id = ANY(%s::bigint[])",
                (list(recipient_ids),),
            )
        }
        grouped: dict[str, list[QueuedRecipient]] = {}
        for rid in recipient_ids:
            found = recipients.get(rid)
            if found is not None:
                grouped.setdefault(found.message_id, []).append(found)
        rows = {
            row[0]: row
            for row in conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ANY(%s::text[])",
                (list(grouped),),
            )
        }
        return [_message(rows[mid], rcpts) for mid, rcpts in grouped.items() if mid in rows]

    def read_body(self, message_id: str) -> Iterator[bytes]:
        """Check the message exists now (StoreError if not), then stream its chunks.

        Each chunk is fetched by its own query; if the message disappears while
        it is read, the iterator raises `StoreError` instead of ending short.
        """
        # The size and the first chunk in one round trip (most bodies are
        # one chunk); the others are read one per query.
        rows = self._query(
            "read body",
            "SELECT m.size, c.data FROM messages m LEFT JOIN body_chunks c"
            " ON c.message_id = m.id AND c.seq = 0 WHERE m.id = %s",
            (message_id,), binary=True,
        )
        if not rows:
            raise StoreError(f"message {message_id} is not in the queue")
        row = rows[0]
        first = None if row[1] is None else bytes(row[1])
        return self._chunks(message_id, int(row[0]), first)

    def _chunks(self, message_id: str, size: int, first: bytes | None) -> Iterator[bytes]:
        seq = 0
        done = 0
        if size > 0 and first is not None:
            done, seq = len(first), 1
            yield first
            del first
        while done < size:
            rows = self._query(
                "read body",
                "SELECT data FROM body_chunks WHERE message_id = %s AND seq = %s",
                (message_id, seq),
                binary=True,  # the bytes as they are, not a hex text to decode
            )
            if not rows:
                raise StoreError(f"message {message_id} left the queue while being read")
            data = bytes(rows[0][0])
            del rows
            done += len(data)
            seq += 1
            yield data

    def message_ids(self, state: RecipientState | None = None) -> list[str]:
        sql = "SELECT m.id FROM messages m WHERE EXISTS (SELECT 1 FROM recipients r" \
              " WHERE r.message_id = m.id"
        params: tuple[str, ...] = ()
        if state is not None:
            sql += " AND r.state = %s"
            params = (str(state),)
        with self._read("list messages", snapshot=False) as conn:
            return [str(r[0]) for r in conn.execute(sql + ") ORDER BY m.received_at, m.id",
                                                    params)]

    def recipient_count(self) -> int:
        with self._read("count recipients", snapshot=False) as conn:
            row = conn.execute("SELECT count(*) FROM recipients").fetchone()
        return int(row[0]) if row is not None else 0

    # --- rate events ----------------------------------------------------------------------------

    def add_event(self, key: str, at: float, window: float) -> int:
        start = float(at) - float(window)
        with self._write("add event") as conn:
            # One key's events are counted one transaction at a time, on every
            # node: two concurrent events both see each other.
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended("
                "'fermoposta.rate:' || current_schema() || ':' || %s, 0))",
                (key,),
            )
            conn.execute("DELETE FROM rate_events WHERE key = %s AND at <= %s", (key, start))
            conn.execute("INSERT INTO rate_events (key, at) VALUES (%s, %s)", (key, float(at)))
            row = conn.execute(
                "SELECT count(*) FROM rate_events WHERE key = %s AND at > %s AND at <= %s",
                (key, start, float(at)),
            ).fetchone()
        return int(row[0]) if row is not None else 0

    def count_events(self, key: str, since: float) -> int:
        rows = self._query("count events",
                           "SELECT count(*) FROM rate_events WHERE key = %s AND at > %s",
                           (key, float(since)))
        return int(rows[0][0]) if rows else 0

    # --- held mail ------------------------------------------------------------------------------

    def held_message_ids(self, domains: Collection[str]) -> list[str]:
        wanted = sorted(set(domains))
        if not wanted:
            self._check_open()
            return []
        with self._read("list held messages", snapshot=False) as conn:
            found = {
                str(r[0]): float(r[1])
                for r in conn.execute(
                    "SELECT m.id, m.received_at FROM messages m WHERE m.id IN ("
                    " SELECT message_id FROM recipients"
                    " WHERE state = %s AND domain = ANY(%s::text[]))",
                    (HELD, wanted),
                )
            }
        return sorted(found, key=lambda i: (found[i], i))

    def held_mail_notices(self) -> PgHeldNotices:
        """A LISTEN on a connection of its own (`store.pg_notify`)."""
        self._check_open()
        return PgHeldNotices(self._connect, self._scrub)

    def domains_with_held_mail(self, domains: Collection[str]) -> set[str]:
        wanted = sorted(set(domains))
        if not wanted:
            self._check_open()
            return set()
        with self._read("domains with held mail", snapshot=False) as conn:
            return {
                str(r[0])
                for r in conn.execute(
                    "SELECT DISTINCT domain FROM recipients"
                    " WHERE domain = ANY(%s::text[]) AND state = %s",
                    (wanted, HELD),
                )
            }

    def domain_usage(self, domain: str) -> tuple[int, int]:
        (row,) = self._query(
            "domain usage",
            "SELECT count(*), COALESCE(sum(size), 0) FROM messages WHERE id IN ("
            " SELECT message_id FROM recipients WHERE domain = %s AND state = %s)",
            (domain, HELD),
        )
        return int(row[0]), int(row[1])

    # --- outcomes -------------------------------------------------------------------------------

    def record_delivered(self, recipient_ids: Collection[int], reply: str,
                         dsn: tuple[NewMessage, IO[bytes]] | None = None) -> str | None:
        with self._write("record delivered") as conn:
            removed = self._remove_recipients(conn, recipient_ids)
            if dsn is None or not removed:
                return None
            return self._enqueue(conn, dsn[0], dsn[1])

    def record_deferred(
        self,
        recipient_ids: Collection[int],
        reply: str,
        next_attempt_at: float | Mapping[int, float] | None = None,
    ) -> None:
        now = self._clock()
        ids = _ids(recipient_ids)
        with self._write("record deferred") as conn:
            if not ids:
                return
            update = (
                "UPDATE recipients r SET attempts = r.attempts + 1, last_reply = %s,"
                " updated_at = %s, first_failure_at = COALESCE(r.first_failure_at, %s),"
                " next_attempt_at = {at}, claimed_by = NULL, claimed_until = NULL,"
                " claim_holder = NULL"
                f" FROM ({_LOCK_RECIPIENTS}) l{{join}} WHERE r.id = l.id"
            )
            if isinstance(next_attempt_at, Mapping):
                times = [next_attempt_at.get(rid) for rid in ids]
                conn.execute(
                    update.format(
                        at="v.at",
                        join=" JOIN unnest(%s::bigint[], %s::float8[]) AS v(id, at)"
                             " ON v.id = l.id",
                    ),
                    (reply, now, now, ids, ids,
                     [None if t is None else float(t) for t in times]),
                )
                return
            conn.execute(
                update.format(at="%s::float8", join=""),
                (reply, now, now,
                 None if next_attempt_at is None else float(next_attempt_at), ids),
            )

    def record_failed(
        self,
        recipient_ids: Collection[int],
        reply: str,
        dsn: tuple[NewMessage, IO[bytes]] | None,
    ) -> str | None:
        with self._write("record failed") as conn:
            removed = self._remove_recipients(conn, recipient_ids)
            if dsn is None or not removed:
                return None
            return self._enqueue(conn, dsn[0], dsn[1])

    @staticmethod
    def _remove_recipients(conn: Conn, recipient_ids: Collection[int]) -> int:
        """Delete the recipients (and messages left without any); return how many were."""
        ids = _ids(recipient_ids)
        if not ids:
            return 0
        # One statement: lock the recipients in id order and delete them, then
        # lock their messages in id order.  The messages are locked before we
        # look for recipients left (in the next statement, with a fresh
        # snapshot): two nodes each removing one of a message's last two
        # recipients would otherwise each see the other's (not yet committed
        # as gone) and leave the message behind with none.  The second waits
        # for the first's lock, then sees its deletion.
        rows = conn.execute(
            "WITH locked AS (SELECT id FROM recipients WHERE id = ANY(%s::bigint[])"
            " ORDER BY id FOR UPDATE),"
            " gone AS (DELETE FROM recipients r USING locked l WHERE r.id = l.id"
            " RETURNING r.message_id)"
            " SELECT m.id, g.n FROM messages m JOIN (SELECT message_id, count(*) AS n"
            " FROM gone GROUP BY message_id) g ON g.message_id = m.id"
            " ORDER BY m.id FOR UPDATE OF m",
            (ids,),
        ).fetchall()
        if not rows:
            return 0
        touched = [str(r[0]) for r in rows]
        removed = sum(int(r[1]) for r in rows)
        conn.execute(
            "DELETE FROM messages m WHERE m.id = ANY(%s::text[]) AND NOT EXISTS"
            " (SELECT 1 FROM recipients r WHERE r.message_id = m.id)",
            (touched,),
        )
        return max(removed, 0)

    # --- outbound queue -------------------------------------------------------------------------

    def claim_due_outbound(
        self, now: float, limit: int, owner: str, ttl: float
    ) -> list[QueuedMessage]:
        if limit <= 0:
            self._check_open()
            return []
        until = now + ttl
        with self._write("claim outbound") as conn:
            # Holders of unexpired claims that have stopped beating: their
            # claims are free now, and their recipients come first.
            dead = [
                str(r[0])
                for r in conn.execute(
                    "SELECT c.holder FROM (SELECT DISTINCT claim_holder AS holder"
                    " FROM recipients WHERE claim_holder IS NOT NULL AND claimed_until > %s) c"
                    f" WHERE c.holder <> %s AND NOT {self._live('c.holder')}",
                    (now, self._holder),
                )
            ]
            ids: list[int] = []
            if dead:
                ids += [
                    int(r[0])
                    for r in conn.execute(
                        "SELECT id FROM recipients WHERE claim_holder = ANY(%s::text[])"
                        " AND claimed_until > %s AND state = %s ORDER BY id LIMIT %s"
                        " FOR UPDATE SKIP LOCKED",
                        (dead, now, OUTBOUND, limit),
                    )
                ]
            if len(ids) < limit:
                # SKIP LOCKED: rows another node is claiming right now are its;
                # a row it claimed and committed fails the re-checked WHERE.
                ids += [
                    int(r[0])
                    for r in conn.execute(
                        "SELECT id FROM recipients WHERE state = %s"
                        " AND COALESCE(next_attempt_at, 0) <= %s"
                        " AND (claimed_until IS NULL OR claimed_until <= %s)"
                        " ORDER BY COALESCE(next_attempt_at, 0), id LIMIT %s"
                        " FOR UPDATE SKIP LOCKED",
                        (OUTBOUND, now, now, limit - len(ids)),
                    )
                ]
            if not ids:
                return []
            conn.execute(
                "UPDATE recipients SET claimed_by = %s, claimed_until = %s,"
                " next_attempt_at = %s, claim_holder = %s WHERE id = ANY(%s::bigint[])",
                (owner, until, until, self._holder, ids),
            )
            return self._messages_of(conn, ids)

    def renew_claims(self, owner: str, now: float, ttl: float) -> None:
        with self._write("renew claims") as conn:
            conn.execute(
                "UPDATE recipients SET claimed_until = %s, next_attempt_at = %s"
                " WHERE claimed_by = %s",
                (now + ttl, now + ttl, owner),
            )

    def release_claims(self, owner: str, recipient_ids: Collection[int] | None = None,
                       next_attempt_at: float | None = None) -> None:
        at = None if next_attempt_at is None else float(next_attempt_at)
        with self._write("release claims") as conn:
            sql = ("UPDATE recipients SET claimed_by = NULL, claimed_until = NULL,"
                   " claim_holder = NULL, next_attempt_at = %s::float8 WHERE claimed_by = %s")
            if recipient_ids is None:
                conn.execute(sql, (at, owner))
            else:
                conn.execute(sql + " AND id = ANY(%s::bigint[])", (at, owner, _ids(recipient_ids)))

    def mark_delay_notified(
        self, recipient_ids: Collection[int], dsn: tuple[NewMessage, IO[bytes]] | None = None
    ) -> str | None:
        ids = _ids(recipient_ids)
        with self._write("mark delay notified") as conn:
            marked = 0
            if ids:
                marked = conn.execute(
                    "UPDATE recipients r SET delay_notified = true"
                    f" FROM ({_LOCK_RECIPIENTS}) l WHERE r.id = l.id AND NOT r.delay_notified",
                    (ids,),
                ).rowcount
            if dsn is None or marked <= 0:
                return None
            return self._enqueue(conn, dsn[0], dsn[1])

    def held_older_than(
        self,
        cutoff: float,
        limit: int,
        *,
        domains: Collection[str] | None = None,
        default_lifetime_only: bool = False,
        delay_notified: bool | None = None,
    ) -> list[QueuedMessage]:
        if limit <= 0 or (domains is not None and not domains):
            self._check_open()
            return []
        if domains is not None and len(set(domains)) > MAX_DOMAINS:
            raise ValueError(f"held_older_than: at most {MAX_DOMAINS} domains at once")
        sql = (
            "SELECT r.id FROM messages m JOIN recipients r ON r.message_id = m.id"
            " WHERE m.received_at < %s AND r.state = %s"
            # A domain leased by a live ATRN session: the drain owns its mail.
            " AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.domain = r.domain"
            f" AND l.expires_at > %s AND {self._live('l.holder')})"
        )
        params: list[Any] = [cutoff, HELD, self._clock()]
        if domains is not None:
            sql += " AND r.domain = ANY(%s::text[])"
            params.append(sorted(set(domains)))
        if default_lifetime_only:
            sql += (" AND r.domain NOT IN"
                    " (SELECT name FROM domains WHERE hold_lifetime IS NOT NULL)")
        if delay_notified is not None:
            sql += " AND r.delay_notified = %s"
            params.append(bool(delay_notified))
        sql += " ORDER BY m.received_at, r.id LIMIT %s"
        params.append(limit)
        with self._read("list expired held mail") as conn:
            ids = [int(r[0]) for r in conn.execute(sql, params)]
            return self._messages_of(conn, ids)

    def outbound_older_than(self, cutoff: float, limit: int) -> list[QueuedMessage]:
        if limit <= 0:
            self._check_open()
            return []
        with self._read("list old outbound mail") as conn:
            ids = [
                int(r[0])
                for r in conn.execute(
                    "SELECT r.id FROM messages m JOIN recipients r ON r.message_id = m.id"
                    " WHERE m.received_at < %s AND r.state = %s"
                    " ORDER BY m.received_at, r.id LIMIT %s",
                    (cutoff, OUTBOUND, limit),
                )
            ]
            return self._messages_of(conn, ids)

    # --- leases ---------------------------------------------------------------------------------

    def acquire_leases(self, domains: Collection[str], owner: str, ttl: float) -> bool:
        wanted = sorted(set(domains))
        with self._write("acquire leases") as conn:
            if not wanted:
                return True
            now = self._clock()
            # In domain order, so two sessions racing for overlapping sets
            # wait for each other instead of deadlocking.  A row another
            # session holds is re-checked once that one commits; a lease is
            # taken only if it is free (ours, expired, or its holder dead).
            taken = conn.execute(
                "INSERT INTO leases (domain, owner, expires_at, holder)"
                " SELECT d, %s, %s, %s FROM unnest(%s::text[]) AS d ORDER BY d"
                " ON CONFLICT (domain) DO UPDATE SET owner = EXCLUDED.owner,"
                " expires_at = EXCLUDED.expires_at, holder = EXCLUDED.holder"
                " WHERE leases.owner = EXCLUDED.owner OR leases.expires_at <= %s"
                f" OR NOT {self._live('leases.holder')}"
                " RETURNING domain",
                (owner, now + ttl, self._holder, wanted, now),
            ).fetchall()
            if len(taken) < len(wanted):
                # All or nothing: psycopg.Rollback undoes the transaction (what
                # was taken) and ends the block normally.
                raise psycopg.Rollback()
            return True
        return False

    def renew_leases(self, owner: str, ttl: float) -> None:
        with self._write("renew leases") as conn:
            conn.execute("UPDATE leases SET expires_at = %s WHERE owner = %s",
                         (self._clock() + ttl, owner))

    def release_leases(self, owner: str) -> None:
        with self._write("release leases") as conn:
            conn.execute("DELETE FROM leases WHERE owner = %s", (owner,))

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the heartbeat, delete our holder row (our leases and claims are
        free at once for the others) and close the pool.  Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stop_heartbeat()
        try:
            with self._connection() as conn:
                conn.execute("DELETE FROM holders WHERE id = %s", (self._holder,))
        except _ENGINE_ERRORS as exc:
            # The row goes dead by itself after node_timeout.
            log.warning("%s", self._error("deleting the holder row on close failed", exc))
        finally:
            self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
