"""PostgreSQL engine of the store (see `fermoposta.store.base` for the contract).

Several provider processes, on several machines, share one database through
this engine; every guarantee of the contract holds across them.

The engine is this module (connections, transactions, holders, held mail,
rate events) and mixins that use only its transactions: `pg_tools` (the
queue tools), `pg_directory` (accounts and domains), `pg_etrn` (ETRN),
`pg_messages` (enqueue, import, bodies), `pg_loop_enqueue` (a lone message
sent by the event loop on a connection of its own) and `pg_outbound`
(outcomes, leases, outbound claims); `pg_rows` has the columns and row
conversions they share, `pg_schema` the schema and its migrations.

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
  the server's or role's default, and a method returns only after COMMIT;
  the only exception is a write the caller says is not `durable` (an
  ATRN's leases and record: `synchronous_commit = off` for that one
  transaction, committed and visible to every node all the same).
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
  broken one is replaced.  The enqueue of one-chunk bodies skips that check
  (`_write_one_statement`: one statement, its own transaction, in one
  round trip); a connection that breaks there raises `CommitUnknown`, and
  the enqueue looks for its rows to tell whether it was applied before
  storing them again (`pg_messages`).
- Bodies, enqueue and reads: see `pg_messages`; `enqueue_async`: see
  `pg_loop_enqueue` (its connection is not the pool's: `close()` closes it).
- Holders: each store registers one `holders` row (`holder_id`: node, pid,
  random) and a daemon thread refreshes its `heartbeat_at` every
  `heartbeat_interval` seconds on a connection of its own (a busy pool
  cannot make a live node look dead).  Heartbeats are written and compared
  with the DATABASE clock, so clock skew between nodes does not matter.  A
  holder is dead when its row is missing or its heartbeat is older than
  `node_timeout` seconds.  `close()` stops the thread and deletes the row.
- Leases and outbound claims (see `pg_outbound`) name this store's holder
  and are free at once when it is dead.  `QueueEntry.active` and
  `retry_outbound` count a claim only while it is unexpired and its holder
  alive.
- Rate events: `add_event` serializes the events of one key with an advisory
  transaction lock, so counts are exact across nodes.
- Time comes from the injected `clock` (default `time.time`), except holder
  heartbeats (the database's clock).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

import fermoposta.store.pg_schema as pg_schema
from fermoposta.store.base import (
    StoreError,
)
from fermoposta.store.pg_directory import PostgresDirectory
from fermoposta.store.pg_domain_cache import DomainCache
from fermoposta.store.pg_etrn import PostgresEtrn
from fermoposta.store.pg_loop_enqueue import PostgresLoopEnqueue
from fermoposta.store.pg_messages import PostgresMessages
from fermoposta.store.pg_notify import PgHeldNotices
from fermoposta.store.pg_outbound import PostgresOutbound
from fermoposta.store.pg_rows import (
    _DB_NOW,
    HELD,
    CommitUnknown,
    Conn,
)
from fermoposta.store.pg_tools import PostgresQueueTools

__all__ = ["SCHEMA_VERSION", "PostgresStore", "redact_conninfo"]

SCHEMA_VERSION = pg_schema.SCHEMA_VERSION
LOCK_TIMEOUT = 30.0  # seconds: a row lock held by a stuck transaction fails the call
# A transaction left open by a client that vanished is ended by the server.
IDLE_IN_TRANSACTION_TIMEOUT = 300.0
HOLDER_PRUNE_AGE = 86400.0  # seconds: holder rows dead this long are deleted at start

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


class PostgresStore(PostgresDirectory, PostgresQueueTools, PostgresEtrn, PostgresMessages,
                    PostgresLoopEnqueue, PostgresOutbound):
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
        self._init_loop_enqueue()
        # Answers to get_domain, kept while a LISTEN proves them current.
        self._domain_cache = DomainCache(self._connect, self._scrub)
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

    # Session settings of every connection (pool, heartbeat, the event loop's).
    _SESSION_SETTINGS = (
        "SELECT set_config('synchronous_commit', 'on', false),"
        " set_config('lock_timeout', %s, false),"
        " set_config('idle_in_transaction_session_timeout', %s, false)",
        (f"{int(LOCK_TIMEOUT * 1000)}ms", f"{int(IDLE_IN_TRANSACTION_TIMEOUT * 1000)}ms"),
    )

    @staticmethod
    def _configure(conn: Conn) -> None:
        """Session settings of every connection (pool and heartbeat)."""
        conn.autocommit = True  # transactions are explicit (conn.transaction())
        conn.execute(*PostgresStore._SESSION_SETTINGS)

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
    def _write(self, what: str, *, durable: bool = True) -> Iterator[Conn]:
        """One transaction on a pooled connection: committed when the block
        ends, rolled back on any exception (`psycopg.Rollback` rolls back and
        ends the block normally).  Its BEGIN is the connection's probe.  Not
        `durable`: its COMMIT does not wait for the WAL flush
        (`synchronous_commit = off` for this transaction only, sent with
        the BEGIN: no round trip of its own)."""
        self._check_open()
        try:
            with self._connection("BEGIN" if durable else
                                  "BEGIN; SET LOCAL synchronous_commit = off") as conn:
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

    def _write_one_statement(self, what: str,
                             statement: Callable[[Conn], psycopg.Cursor[TupleRow]]
                             ) -> TupleRow | None:
        """The one statement `statement(conn)` executes, on its own, and
        the first row of its result: on the pool's autocommit connections
        it is a transaction by itself, all or nothing, its commit flushed
        (as `synchronous_commit` says, like an explicit COMMIT) before its
        reply comes, and a failed one leaves nothing open.  One round trip,
        where `_write` takes three (its BEGIN, the statements, its COMMIT),
        and no BEGIN or COMMIT for libpq to send and read back.  No probe:
        a connection a server restart broke raises `CommitUnknown` (the
        statement may have been applied before it broke, or never sent; the
        caller tells which from what it wrote).  A database error raises
        `StoreError`, nothing written; any other exception passes through."""
        self._check_open()
        self._fail_fast()
        try:
            conn = self._pool.getconn(timeout=self._connect_timeout)
        except _ENGINE_ERRORS as exc:
            raise self._error(f"{what} failed", exc) from exc
        pid = conn.info.backend_pid  # while the connection is there to ask
        try:
            return statement(conn).fetchone()
        except psycopg.OperationalError as exc:
            if conn.broken:
                raise CommitUnknown(self._scrub(str(exc)), pid) from exc
            raise self._error(f"{what} failed", exc) from exc
        except _ENGINE_ERRORS as exc:
            raise self._error(f"{what} failed", exc) from exc
        finally:
            self._pool.putconn(conn)

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
            # Index-only: the domain's range of recipients_domain, each message once.
            "SELECT count(*), COALESCE(sum(message_size), 0) FROM (SELECT DISTINCT"
            " message_received_at, message_id, message_size FROM recipients"
            " WHERE domain = %s AND state = %s) AS held",
            (domain, HELD),
        )
        return int(row[0]), int(row[1])

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the heartbeat, delete our holder row (our leases and claims are
        free at once for the others) and close the pool.  Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._domain_cache.close()
        self._close_loop_connection()
        self._stop_heartbeat()
        try:
            with self._connection() as conn:
                conn.execute("DELETE FROM holders WHERE id = %s", (self._holder,))
        except (*_ENGINE_ERRORS, StoreError) as exc:
            # The row goes dead by itself after node_timeout.  StoreError: the
            # heartbeat found the server unreachable (`_fail_fast`).
            log.warning("%s", self._error("deleting the holder row on close failed", exc))
        finally:
            self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
