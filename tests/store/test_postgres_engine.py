"""Tests of the PostgreSQL engine itself (fermoposta.store.postgres): what the
engine-neutral contract suite (test_contract_*.py) cannot see.  Migrations
(fresh, concurrent, a newer version refused), durability settings, the pool
across a server outage (through a TCP forwarder that is cut and restarted),
passwords kept out of logs and errors, holders and their heartbeats, a dead
holder's leases and claims taken over, concurrent claims and leases of two
nodes, bounded memory for a large body.

Each test gets a fresh schema on the server of `FERMOPOSTA_TEST_PG_URL`
(tests/support/pg.py): skipped when the server is unreachable, failed when
CI is set."""

from __future__ import annotations

import contextlib
import io
import logging
import secrets
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from fermoposta.store import pg_schema, pg_shape
from fermoposta.store.base import (
    CHUNK_SIZE,
    MessageOrigin,
    NewMessage,
    QueueFilter,
    SchemaTooNew,
    StoreError,
)
from fermoposta.store.postgres import SCHEMA_VERSION, PostgresStore, redact_conninfo
from support.pg import fresh_schema, require_server, with_search_path

from .contract import HELD as HELD_STATE
from .contract import HOLD, OUTBOUND, Clock, msg, rcpt

PASSWORD = "Sekr3t-Pa55word"

EXPECTED_TABLES = {
    "messages", "body_chunks", "recipients", "recipient_holds", "accounts", "account_certs",
    "account_cert_subjects", "domains", "valid_recipients", "leases", "holders",
    "rate_events", "schema_version",
}


class Schema:
    """A fresh schema and the stores opened on it (closed at teardown)."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.stores: list[PostgresStore] = []

    def open(self, url: str | None = None, **options: Any) -> PostgresStore:
        store = PostgresStore(url or self.url, **options)
        self.stores.append(store)
        return store

    def raw(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=5)

    def sql(self, query: str, params: Any = None) -> list[Any]:
        with self.raw() as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def close_all(self) -> None:
        for store in reversed(self.stores):
            store.close()


@pytest.fixture
def pg() -> Iterator[Schema]:
    with fresh_schema() as (name, url):
        schema = Schema(name, url)
        try:
            yield schema
        finally:
            schema.close_all()


def _outbound(store: PostgresStore, messages: int, per_message: int = 1) -> list[int]:
    ids: list[int] = []
    for i in range(messages):
        mid = store.enqueue(
            msg(*(f"r{i}-{j}@remote{j}.example" for j in range(per_message)), state=OUTBOUND),
            io.BytesIO(b"body\r\n"),
        )
        m = store.get_message(mid)
        assert m is not None
        ids += [r.id for r in m.recipients]
    return ids


def _claimed(got: list[Any]) -> list[int]:
    return [r.id for m in got for r in m.recipients]


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `condition` until true; return the seconds it took (fail after `timeout`)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_netloc(url: str, *, port: int, password: str | None = None) -> str:
    """`url` pointing at 127.0.0.1:`port`, with `password` if given."""
    parts = urlsplit(url)
    user = quote(parts.username or "postgres", safe="")
    secret = f":{quote(password, safe='')}" if password is not None else (
        f":{parts.password}" if parts.password is not None else "")
    return urlunsplit(parts._replace(netloc=f"{user}{secret}@127.0.0.1:{port}"))


# --- migrations ------------------------------------------------------------------------------


def test_a_fresh_schema_gets_every_table_in_the_current_schema(pg: Schema) -> None:
    store = pg.open()
    assert store.schema_version() == SCHEMA_VERSION == 5
    assert store.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
    tables = {r[0] for r in pg.sql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (pg.name,))}
    assert tables == EXPECTED_TABLES
    # Nothing went anywhere else (the search_path names only our schema).
    assert pg.sql("SELECT count(*) FROM information_schema.tables WHERE table_name = 'holders'"
                  " AND table_schema = 'public'") == [(0,)]
    columns = {r[0]: r[1] for r in pg.sql(
        "SELECT column_name, is_identity FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = 'recipients'", (pg.name,))}
    assert columns["id"] == "YES"  # an identity: never reused
    assert "claim_holder" in columns
    assert pg.sql("SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
                  " AND table_name = 'messages' AND column_name = 'node'", (pg.name,))
    assert pg.sql("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


def test_migrate_reports_the_versions_and_is_idempotent(pg: Schema) -> None:
    with pg.raw() as conn:
        assert pg_schema.current_version(conn) == 0
        assert pg_schema.migrate(conn) == (0, SCHEMA_VERSION)
        assert pg_schema.migrate(conn) == (SCHEMA_VERSION, SCHEMA_VERSION)
        assert pg_schema.current_version(conn) == SCHEMA_VERSION


def test_migration_from_version_1_adds_the_etrn_column(pg: Schema) -> None:
    """A database of version 1 (no ETRN column) migrates to the current
    version with its domains, none of them an ETRN domain, and its accounts,
    none of them waiting (version 3)."""
    from fermoposta.store.base import Account, Domain
    with pg.raw() as conn, conn.transaction():
        for statement in pg_schema.MIGRATIONS[1]:
            conn.execute(statement)
        conn.execute("UPDATE schema_version SET version = 1")
        conn.execute("INSERT INTO accounts (name, created_at) VALUES ('acme', 0)")
        conn.execute("INSERT INTO domains (name, account) VALUES ('a.example', 'acme')")
    store = pg.open()
    assert store.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)  # done on opening
    assert store.get_domain("a.example") == Domain("a.example", "acme")
    store.update_domain(Domain("a.example", "acme", etrn=""))
    assert store.etrn_domains("a.example") == ["a.example"]
    assert store.get_account("acme") == Account("acme", None, None)


def test_migration_from_version_4_adds_wire_ready_false(pg: Schema) -> None:
    """A message stored by version 4's code is not known to be in wire form:
    after the migration it reads back False (sent through the stuffer), and
    a node still on version 4's code, whose INSERT names no such column,
    stores False too."""
    with pg.raw() as conn, conn.transaction():
        for step in (1, 2, 3, 4):
            for statement in pg_schema.MIGRATIONS[step]:
                conn.execute(statement)
        conn.execute("UPDATE schema_version SET version = 4")
        conn.execute("INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
                     " body_8bit, client) VALUES ('AAAAAAAAAAAA', 's@x.example', 1, 5, 'mx',"
                     " false, false, 'c')")
    store = pg.open()
    assert store.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)  # done on opening
    with pg.raw() as conn:
        conn.execute("INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
                     " body_8bit, client) VALUES ('BBBBBBBBBBBB', 's@x.example', 1, 5, 'mx',"
                     " false, false, 'c')")
    assert pg.sql("SELECT id, wire_ready FROM messages ORDER BY id") == [
        ("AAAAAAAAAAAA", False), ("BBBBBBBBBBBB", False)]
    got = store.get_message("AAAAAAAAAAAA")
    assert got is not None and got.wire_ready is False


def test_migration_from_version_3_copies_arrival_and_size(pg: Schema) -> None:
    """A database of version 3 migrates to version 4: each recipient gets
    its message's arrival and size, queue stats reads them, and the indexes
    are those of a new database."""
    with pg.raw() as conn, conn.transaction():
        for step in (1, 2, 3):
            for statement in pg_schema.MIGRATIONS[step]:
                conn.execute(statement)
        conn.execute("UPDATE schema_version SET version = 3")
        for mid, at, size in (("AAAAAAAAAAAA", 1_000.0, 5), ("BBBBBBBBBBBB", 1_600.0, 7)):
            conn.execute("INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
                         " body_8bit, client) VALUES (%s, 's@x.example', %s, %s, 'mx', false,"
                         " false, 'c')", (mid, at, size))
        for mid, address in (("AAAAAAAAAAAA", "x@a.example"), ("AAAAAAAAAAAA", "y@a.example"),
                             ("BBBBBBBBBBBB", "z@a.example")):
            conn.execute("INSERT INTO recipients (message_id, address, domain, state,"
                         " updated_at) VALUES (%s, %s, 'a.example', 'held', 0)", (mid, address))
    store = pg.open()
    assert store.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)  # done on opening
    assert pg.sql("SELECT message_id, message_received_at, message_size FROM recipients"
                  " ORDER BY id") == [("AAAAAAAAAAAA", 1_000.0, 5), ("AAAAAAAAAAAA", 1_000.0, 5),
                                      ("BBBBBBBBBBBB", 1_600.0, 7)]
    indexes = pg.sql("SELECT indexdef FROM pg_indexes WHERE schemaname = %s"
                     " AND tablename = 'recipients' ORDER BY indexname", (pg.name,))
    # A node still running version 3's code cannot store zeros for them: its
    # INSERT fails (the sender gets a 4xx and tries again, maybe elsewhere).
    with pytest.raises(psycopg.errors.NotNullViolation), pg.raw() as conn:
        conn.execute("INSERT INTO recipients (message_id, address, domain, state,"
                     " updated_at) VALUES ('AAAAAAAAAAAA', 'v@a.example', 'a.example',"
                     " 'held', 0)")
    shape = store.queue_shape(1_700.0, [300.0])
    (a,) = shape.domains
    # Two messages (12 bytes), three recipients: one young (100 s), two old (700 s).
    assert (a.messages, a.recipients, a.bytes, a.oldest, a.held, a.ages) == (
        2, 3, 12, 1_000.0, 3, (1, 2))
    other = f"fp_fresh_{secrets.token_hex(4)}"
    with pg.raw() as conn:  # a new database, for its indexes
        conn.execute(f"CREATE SCHEMA {other}")
        conn.execute(f"SET search_path = {other}")
        try:
            pg_schema.migrate(conn)
            fresh = conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = %s"
                " AND tablename = 'recipients' ORDER BY indexname", (other,)).fetchall()
        finally:
            conn.execute(f"DROP SCHEMA {other} CASCADE")
    assert [str(r[0]).replace(f"{other}.", "") for r in fresh] == [
        str(r[0]).replace(f"{pg.name}.", "") for r in indexes]


def test_queue_shape_in_ranges_of_domains_is_the_one_pass_answer(pg: Schema,
                                                                 clock: Clock) -> None:
    """`queue stats` cuts its pass into ranges of domains by ANALYZE's
    statistics (pg_shape); each domain is in one range, whatever the cut."""
    store = pg.open()
    for i in range(900):
        # 30 domains of 20 messages (ANALYZE's most common values), 300 of one
        # (its histogram).
        domain = f"d{i % 30:02d}.example" if i < 600 else f"s{i}.example"
        clock.now += 1.0
        if i % 7 == 0:  # several recipients in one domain, in two states
            message = NewMessage("s@x.example", (rcpt(f"a@{domain}", HELD_STATE),
                                                 rcpt(f"b@{domain}", HOLD),
                                                 rcpt("c@other.example", OUTBOUND)),
                                 MessageOrigin.MX)
        else:
            message = msg(f"a{i}@{domain}")
        store.enqueue(message, io.BytesIO(b"x" * (i + 1)))
    ages = [60.0, 300.0]
    with pg.raw() as conn:
        assert pg_shape.domain_splits(conn) == []  # no statistics yet: one pass
    one_pass = store.queue_shape(clock.now, ages)
    assert len(one_pass.domains) == 331 and one_pass.total.messages == 900
    pg.sql("ANALYZE recipients")
    domains = {d.domain for d in one_pass.domains}
    for workers, ranges in ((0, 1), (1, 2), (2, 3), (3, 4), (50, pg_shape.MAX_RANGES)):
        with pg.raw() as conn, conn.transaction():
            conn.execute(f"SET LOCAL max_parallel_workers_per_gather = {workers}")
            splits = pg_shape.domain_splits(conn)
            assert len(splits) == ranges - 1 and splits == sorted(splits)
            assert set(splits) <= domains  # each split a domain: its range's first
            assert pg_shape.queue_shape(conn, clock.now, ages) == one_pass
    assert store.queue_shape(clock.now, ages) == one_pass


def test_splits_from_stats_cut_equal_rows() -> None:
    cut = pg_shape.splits_from_stats
    assert cut(["a", "b", "c", "d"], [0.25] * 4, [], 2) == ["c"]
    assert cut(["a", "b", "c", "d"], [0.25] * 4, [], 4) == ["b", "c", "d"]
    # Histogram buckets hold equal rows; a common value its own share.
    assert cut([], [], ["a", "b", "c", "d", "e"], 2) == ["d"]
    assert cut(["m"], [0.5], ["a", "c", "e"], 3) == ["m"]
    assert cut(["b"], [0.9], ["a", "c", "e"], 2) == ["c"]
    # Fewer values than ranges, no statistics, one range: fewer or no splits.
    assert cut(["a", "b"], [0.5, 0.5], [], 8) == ["b"]
    assert cut([], [], [], 3) == [] and cut(["a"], [1.0], [], 3) == []
    assert cut(["a", "b"], [0.5, 0.5], [], 1) == []


def test_concurrent_migrations_create_the_schema_once(pg: Schema) -> None:
    barrier = threading.Barrier(4)
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with pg.raw() as conn:
                barrier.wait()
                results.append(pg_schema.migrate(conn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # Exactly one of them made it; the others waited on the lock and found it done.
    v = SCHEMA_VERSION
    assert sorted(results) == [(0, v), (v, v), (v, v), (v, v)]
    assert pg.sql("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


def test_concurrent_stores_on_a_fresh_schema(pg: Schema) -> None:
    barrier = threading.Barrier(4)
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            stores.append(pg.open())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(stores) == 4
    assert pg.sql("SELECT count(*) FROM holders") == [(4,)]
    mid = stores[0].enqueue(msg("a@x.example"), io.BytesIO(b"m"))
    assert all(s.message_ids() == [mid] for s in stores)


def test_a_newer_schema_is_refused(pg: Schema) -> None:
    store = pg.open()
    pg.sql("UPDATE schema_version SET version = 99")
    with pytest.raises(SchemaTooNew) as err:
        store.migrate()
    assert "99" in str(err.value) and str(SCHEMA_VERSION) in str(err.value)
    with pytest.raises(SchemaTooNew) as err:  # a StoreError, permanent
        pg.open()
    assert "schema version 99" in str(err.value)
    assert f"up to {SCHEMA_VERSION}" in str(err.value)
    assert pg.sql("SELECT version FROM schema_version") == [(99,)]  # left alone


def test_no_schema_to_create_in_is_a_store_error() -> None:
    url = require_server()
    with pytest.raises(StoreError, match="search_path"):
        PostgresStore(with_search_path(url, "fp_no_such_schema_here"), connect_timeout=5)


# --- connections ------------------------------------------------------------------------------


def test_synchronous_commit_is_forced_on() -> None:
    url = require_server()
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, "options=-csynchronous_commit%3Doff") if q)
    off_url = urlunsplit(parts._replace(query=query))
    with fresh_schema(off_url) as (_name, schema_url):
        # The URL alone turns it off, so the store has something to undo.
        with psycopg.connect(schema_url, autocommit=True) as raw:
            assert raw.execute("SHOW synchronous_commit").fetchone() == ("off",)
        store = PostgresStore(schema_url, pool_size=3)
        try:
            conns = [store._pool.getconn() for _ in range(3)]  # every connection of the pool
            try:
                for conn in conns:
                    assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
            finally:
                for conn in conns:
                    store._pool.putconn(conn)
            beat = store._connect()  # the heartbeat's kind of connection
            try:
                assert beat.execute("SHOW synchronous_commit").fetchone() == ("on",)
            finally:
                beat.close()
        finally:
            store.close()


def test_an_unreachable_server_fails_the_constructor_quickly(caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{_free_port()}/test"
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG), pytest.raises(StoreError) as err:
        PostgresStore(url, connect_timeout=1)
    assert time.monotonic() - started < 5
    assert "cannot connect" in str(err.value)
    assert PASSWORD not in str(err.value)
    assert PASSWORD not in caplog.text


def test_a_password_is_never_shown(pg: Schema, caplog: pytest.LogCaptureFixture) -> None:
    parts = urlsplit(pg.url)
    url = _with_netloc(pg.url, port=parts.port or 5432,
                       password=parts.password if parts.password else PASSWORD)
    secret = urlsplit(url).password
    assert secret
    with caplog.at_level(logging.DEBUG):
        store = pg.open(url)
        assert store.enqueue(msg("a@x.example"), io.BytesIO(b"m"))
    for shown in (store.url_for_logs, repr(store), caplog.text):
        assert secret not in shown
    assert store.url_for_logs.startswith(f"postgresql://{parts.username or 'postgres'}@127.0.0.1")
    assert f"search_path%3D{pg.name}" in store.url_for_logs


def test_a_password_the_server_repeats_is_scrubbed_from_errors() -> None:
    url = require_server()
    parts = urlsplit(url)
    # The server names the database in its error: here, the database is the password.
    secret = "fp_pw_" + PASSWORD.replace("-", "_").lower()
    bad = urlunsplit(parts._replace(
        netloc=f"{parts.username or 'postgres'}:{secret}@{parts.hostname}:{parts.port or 5432}",
        path=f"/{secret}"))
    with pytest.raises(StoreError) as err:
        PostgresStore(bad, connect_timeout=5)
    assert "***" in str(err.value)
    assert secret not in str(err.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://fp:pa%40ss@db.example:5432/mail?sslmode=require",
     "postgresql://fp@db.example:5432/mail?sslmode=require"),
    ("postgres://fp@db.example/mail?password=pa%40ss&sslmode=require",
     "postgres://fp@db.example/mail?sslmode=require"),
    ("postgresql://db1.example,db2.example/mail", "postgresql://db1.example,db2.example/mail"),
    ("host=db.example user=fp password=pa@ss dbname=mail",
     "host=db.example user=fp dbname=mail"),
])
def test_redact_conninfo(url: str, shown: str) -> None:
    redacted, secrets = redact_conninfo(url)
    if url.startswith("postgres"):
        assert redacted == shown
    else:  # key=value: the same pairs (libpq's order)
        assert conninfo_to_dict(redacted) == conninfo_to_dict(shown)
    assert "pa@ss" not in redacted and "pa%40ss" not in redacted
    if "pa" in url:
        assert "pa@ss" in secrets


def test_bad_options_are_value_errors() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval"):
        PostgresStore("postgresql://unused", heartbeat_interval=15.0, node_timeout=15.0)
    with pytest.raises(ValueError, match="pool_size"):
        PostgresStore("postgresql://unused", pool_size=0)
    with pytest.raises(ValueError, match="connect_timeout"):
        PostgresStore("postgresql://unused", connect_timeout=0)
    with pytest.raises(ValueError, match="node_timeout"):
        PostgresStore("postgresql://unused", node_timeout=0)


def test_the_default_heartbeat_follows_a_short_node_timeout(pg: Schema) -> None:
    assert pg.open()._heartbeat_interval == 3.0  # the default 15 s timeout
    store = pg.open(node_timeout=1.0)  # a config may set a short one
    assert store._heartbeat_interval == 0.2
    time.sleep(1.5)
    assert _heartbeat_age(pg, store) < 1.0  # alive for the others


class Forwarder:
    """A TCP forwarder on 127.0.0.1 to the server: `cut()` closes every
    forwarded connection and stops listening (a server gone); `start()`
    listens again on the same port (the server back)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._accepting: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = int(listener.getsockname()[1])
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._accepting.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
            listener.close()
        if self._accepting is not None:
            self._accepting.join(5)
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_the_store_fails_fast_while_the_server_is_away_and_recovers(
        pg: Schema, caplog: pytest.LogCaptureFixture) -> None:
    parts = urlsplit(pg.url)
    forwarder = Forwarder((parts.hostname or "127.0.0.1", parts.port or 5432))
    forwarder.start()
    try:
        url = _with_netloc(pg.url, port=forwarder.port,
                           password=None if parts.password else PASSWORD)
        secret = urlsplit(url).password or ""
        store = pg.open(url, connect_timeout=2, pool_size=3, heartbeat_interval=0.2,
                        node_timeout=30.0)
        mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"before"))
        assert forwarder._sockets  # the store really goes through the forwarder

        forwarder.cut()
        with caplog.at_level(logging.DEBUG):
            for call in (lambda: store.get_message(mid),
                         lambda: store.enqueue(msg("b@x.example"), io.BytesIO(b"during")),
                         lambda: store.claim_due_outbound(time.time(), 10, "o", 60.0)):
                started = time.monotonic()
                with pytest.raises(StoreError) as err:
                    call()
                assert time.monotonic() - started < 2 + 3  # connect_timeout, plus slack
                assert secret not in str(err.value)
            time.sleep(0.5)  # a few failed heartbeats
        assert secret not in caplog.text

        forwarder.start()  # the server is back, on the same port

        def works() -> bool:
            try:
                return store.get_message(mid) is not None
            except StoreError:
                return False

        took = _wait_for(works, 20.0, "the store works again once the server is back")
        assert took < 20.0
        assert b"".join(store.read_body(mid)) == b"before"
        other = store.enqueue(msg("c@x.example"), io.BytesIO(b"after"))
        assert store.message_ids() == [mid, other]
        # The heartbeat reconnected too: our holder beats again.
        _wait_for(lambda: _heartbeat_age(pg, store) < 1.0, 10.0, "the heartbeat resumes")

        # A restart between two calls is not seen at all: every pooled
        # connection is broken, each is checked and replaced before use.
        # The heartbeat is set aside first: a beat that fell inside the
        # restart would mark the server away (rightly) and the call after it
        # would fail fast, which is the part above, not this one.
        store._heartbeat_interval = 3600.0
        time.sleep(0.5)  # the beat under way ends; the next is an hour away
        pooled = [store._pool.getconn() for _ in range(3)]
        for conn in pooled:
            store._pool.putconn(conn)
        forwarder.cut()
        forwarder.start()
        assert store.get_message(mid) is not None
        assert store.enqueue(msg("d@x.example"), io.BytesIO(b"again"))
        print(f"recovered {took:.2f} s after the server came back")
        store.close()  # while the server is there: its holder row goes
        assert pg.sql("SELECT count(*) FROM holders") == [(0,)]
    finally:
        forwarder.cut()


# --- holders ----------------------------------------------------------------------------------


def _heartbeat_age(pg: Schema, store: PostgresStore) -> float:
    """Seconds since the holder's last heartbeat, by the database's clock (inf: no row)."""
    rows = pg.sql("SELECT extract(epoch FROM clock_timestamp())::float8 - heartbeat_at"
                  " FROM holders WHERE id = %s", (store.holder_id,))
    return float(rows[0][0]) if rows else float("inf")


def test_a_holder_registers_beats_and_leaves_on_close(pg: Schema) -> None:
    store = pg.open(node="node-a", heartbeat_interval=0.1, node_timeout=5.0)
    rows = pg.sql("SELECT node, pid, heartbeat_at - started_at FROM holders WHERE id = %s",
                  (store.holder_id,))
    assert len(rows) == 1 and rows[0][0] == "node-a"
    assert store.holder_id.startswith("node-a-")
    first = pg.sql("SELECT heartbeat_at FROM holders WHERE id = %s", (store.holder_id,))[0][0]
    _wait_for(lambda: pg.sql("SELECT heartbeat_at FROM holders WHERE id = %s",
                             (store.holder_id,))[0][0] > first, 5.0, "a heartbeat")
    # A row that went missing comes back with the next beat: we are alive.
    pg.sql("DELETE FROM holders WHERE id = %s", (store.holder_id,))
    _wait_for(lambda: bool(pg.sql("SELECT 1 FROM holders WHERE id = %s", (store.holder_id,))),
              5.0, "the row is back")
    thread = store._beat_thread
    assert thread is not None and thread.is_alive()
    store.close()
    assert not thread.is_alive()
    assert pg.sql("SELECT count(*) FROM holders WHERE id = %s", (store.holder_id,)) == [(0,)]
    store.close()  # harmless
    with pytest.raises(StoreError, match="closed"):
        store.get_message("X")


def test_a_stopped_heartbeat_goes_stale(pg: Schema) -> None:
    store = pg.open(heartbeat_interval=0.1, node_timeout=5.0)
    _wait_for(lambda: _heartbeat_age(pg, store) < 0.5, 5.0, "a fresh heartbeat")
    store._stop_heartbeat()
    time.sleep(0.6)
    assert _heartbeat_age(pg, store) > 0.5  # the row stays, unrefreshed


def test_a_dead_holders_leases_are_taken_and_a_live_ones_never(pg: Schema, clock: Clock) -> None:
    a = pg.open(node="a", clock=clock, heartbeat_interval=0.1, node_timeout=2.0)
    b = pg.open(node="b", clock=clock, heartbeat_interval=0.1, node_timeout=2.0)
    mid = a.enqueue(msg("u@alice.example", "u@bob.example"), io.BytesIO(b"m"))
    clock.now += 100
    assert a.acquire_leases(["alice.example", "bob.example"], "A-SESSION", 600.0)
    assert not b.acquire_leases(["alice.example"], "B-SESSION", 600.0)
    # The drain of a live holder owns its domains' mail.
    assert [r.domain for m in b.held_older_than(clock.now, 10) for r in m.recipients] == []
    time.sleep(2.5)  # longer than node_timeout: a beating holder stays alive
    assert not b.acquire_leases(["bob.example", "carol.example"], "B-SESSION", 600.0)
    assert b.acquire_leases(["carol.example"], "B-SESSION", 600.0)  # not leased by a
    a._stop_heartbeat()  # a dies without a word: its row stays, unrefreshed
    # Ten minutes left on its leases, but its holder is dead: free now.
    _wait_for(lambda: b.acquire_leases(["alice.example", "bob.example"], "B2", 600.0),
              8.0, "b takes the dead holder's leases")
    assert a.acquire_leases(["alice.example"], "A-SESSION", 600.0) is False  # b is alive
    b.release_leases("B2")
    assert a.acquire_leases(["alice.example"], "A-SESSION", 600.0)  # its own owner: free
    # held_older_than no longer hides mail leased by a dead holder.
    got = b.held_older_than(clock.now, 10)
    assert [m.id for m in got] == [mid]
    assert {r.domain for r in got[0].recipients} == {"alice.example", "bob.example"}


def test_a_lease_whose_holder_row_is_gone_is_free(pg: Schema, clock: Clock) -> None:
    a = pg.open(clock=clock, heartbeat_interval=0.1, node_timeout=5.0)
    b = pg.open(clock=clock, heartbeat_interval=0.1, node_timeout=5.0)
    assert a.acquire_leases(["x.example"], "A", 600.0)
    a._stop_heartbeat()
    assert not b.acquire_leases(["x.example"], "B", 600.0)  # stale only 5 s from now
    pg.sql("DELETE FROM holders WHERE id = %s", (a.holder_id,))
    assert b.acquire_leases(["x.example"], "B", 600.0)


def test_a_closed_stores_leases_and_claims_are_free_at_once(pg: Schema, clock: Clock) -> None:
    a = pg.open(clock=clock)
    b = pg.open(clock=clock)
    _outbound(a, 2)
    assert len(_claimed(a.claim_due_outbound(clock.now, 10, "A", 900.0))) == 2
    assert a.acquire_leases(["x.example"], "A", 600.0)
    a.close()  # its holder row goes with it
    assert b.acquire_leases(["x.example"], "B", 600.0)
    assert len(_claimed(b.claim_due_outbound(clock.now, 10, "B", 900.0))) == 2


def test_a_dead_holders_claims_are_taken_and_a_live_ones_never(pg: Schema, clock: Clock) -> None:
    a = pg.open(node="a", clock=clock, heartbeat_interval=0.1, node_timeout=2.0)
    b = pg.open(node="b", clock=clock, heartbeat_interval=0.1, node_timeout=2.0)
    ids = _outbound(a, 5)
    now = clock.now
    mine = _claimed(a.claim_due_outbound(now, 3, "A-RUNNER", 900.0))
    assert mine == ids[:3]
    assert _claimed(b.claim_due_outbound(now, 10, "B-RUNNER", 900.0)) == ids[3:]
    time.sleep(2.5)  # longer than node_timeout: a beating holder keeps its claims
    assert b.claim_due_outbound(now, 10, "B-RUNNER2", 900.0) == []
    # The queue tools see a's claims as active, and retry leaves them alone.
    entries = b.queue_page(QueueFilter(), None, 10)
    assert set().union(*(e.active for e in entries)) == set(ids)
    assert b.retry_outbound(now) == {}

    a._stop_heartbeat()
    _wait_for(lambda: not set(mine) & set().union(*(e.active for e in
                                                     b.queue_page(QueueFilter(), None, 10))),
              8.0, "a's claims no longer count as active")
    # Fifteen minutes left on its claims, but its holder is dead: free now.
    taken = _claimed(b.claim_due_outbound(now, 10, "B-RUNNER3", 900.0))
    assert sorted(taken) == mine
    assert b.claim_due_outbound(now, 10, "B-RUNNER4", 900.0) == []  # claimed by b now
    # a's runner, back from the dead, cannot release or renew what b has.
    a.release_claims("A-RUNNER")
    a.renew_claims("A-RUNNER", now, 900.0)
    entries = b.queue_page(QueueFilter(), None, 10)
    assert set().union(*(e.active for e in entries)) == set(ids)


def test_retry_frees_a_dead_holders_claims(pg: Schema, clock: Clock) -> None:
    a = pg.open(clock=clock, heartbeat_interval=0.1, node_timeout=1.0)
    b = pg.open(clock=clock, heartbeat_interval=0.1, node_timeout=1.0)
    ids = _outbound(a, 2)
    assert len(_claimed(a.claim_due_outbound(clock.now, 10, "A", 900.0))) == 2
    a._stop_heartbeat()
    time.sleep(1.3)
    mids = b.message_ids()
    assert b.retry_outbound(clock.now) == dict.fromkeys(mids, 1)
    assert pg.sql("SELECT count(*) FROM recipients WHERE claimed_by IS NOT NULL") == [(0,)]
    assert sorted(_claimed(b.claim_due_outbound(clock.now, 10, "B", 900.0))) == ids


# --- concurrency ------------------------------------------------------------------------------


def test_two_nodes_claiming_at_once_never_share_a_recipient(pg: Schema) -> None:
    a = pg.open(node="a")
    b = pg.open(node="b")
    ids = _outbound(a, 100, per_message=10)
    assert len(ids) == 1000
    now = time.time()
    barrier = threading.Barrier(2)
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def run(name: str, store: PostgresStore) -> None:
        try:
            barrier.wait()
            while got := store.claim_due_outbound(now, 7, f"runner-{name}", 600.0):
                claimed[name] += _claimed(got)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert claimed["a"] and claimed["b"]  # both really took part
    assert not set(claimed["a"]) & set(claimed["b"])
    assert len(claimed["a"]) + len(claimed["b"]) == 1000
    assert sorted(claimed["a"] + claimed["b"]) == sorted(ids)


def test_two_nodes_racing_for_overlapping_leases_never_both_win(pg: Schema, clock: Clock) -> None:
    a = pg.open(clock=clock)
    b = pg.open(clock=clock)
    errors: list[BaseException] = []
    outcomes: list[tuple[bool, bool]] = []
    for i in range(30):
        barrier = threading.Barrier(2)
        won: dict[str, bool] = {}
        wanted = {"a": [f"d{i}-1", f"d{i}-2", f"d{i}-3"], "b": [f"d{i}-4", f"d{i}-3", f"d{i}-1"]}

        def run(name: str, store: PostgresStore, won: dict[str, bool] = won,
                barrier: threading.Barrier = barrier, wanted: dict[str, list[str]] = wanted
                ) -> None:
            try:
                barrier.wait()
                won[name] = store.acquire_leases(wanted[name], name.upper(), 600.0)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=item) for item in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outcomes.append((won.get("a", False), won.get("b", False)))
    assert errors == []  # no deadlock, no error
    assert all(x != y for x, y in outcomes), outcomes  # exactly one wins each race
    # The loser took nothing: no lease row of its own.
    rows = pg.sql("SELECT owner, count(*) FROM leases GROUP BY owner ORDER BY owner")
    assert sum(n for _, n in rows) == sum(3 for _ in outcomes)


def test_outcomes_racing_on_one_message_never_leave_it_behind(pg: Schema) -> None:
    a = pg.open()
    b = pg.open()
    pairs: list[tuple[int, int]] = []
    for i in range(40):
        mid = a.enqueue(msg(f"x{i}@one.example", f"y{i}@two.example", state=OUTBOUND),
                        io.BytesIO(b"m"))
        m = a.get_message(mid)
        assert m is not None
        pairs.append((m.recipients[0].id, m.recipients[1].id))
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(store: PostgresStore, index: int) -> None:
        try:
            barrier.wait()
            for pair in pairs:
                store.record_delivered([pair[index]], "250 ok")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s, i)) for i, s in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert a.recipient_count() == 0
    assert pg.sql("SELECT count(*) FROM messages") == [(0,)]  # no message without recipients
    assert pg.sql("SELECT count(*) FROM body_chunks") == [(0,)]


def test_rate_events_are_exact_across_nodes(pg: Schema) -> None:
    a = pg.open()
    b = pg.open()
    counts: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(2)

    def run(store: PostgresStore) -> None:
        barrier.wait()
        for _ in range(25):
            n = store.add_event("account:alice", 1000.0, 60.0)
            with lock:
                counts.append(n)

    threads = [threading.Thread(target=run, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each event saw every one before it, whichever node added it.
    assert sorted(counts) == list(range(1, 51))
    assert b.count_events("account:alice", 999.0) == 50


# --- bodies -----------------------------------------------------------------------------------


class _Stream(io.RawIOBase):
    """`size` bytes produced on the fly, never all in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = b"m" * n
        self.left -= n
        return n


def test_a_200_mb_body_in_bounded_memory(pg: Schema) -> None:
    store = pg.open()
    size = 200 * 1024 * 1024
    tracemalloc.start()
    try:
        mid = store.enqueue(msg("a@x.example"), io.BufferedReader(_Stream(size)))
        total = 0
        chunks = 0
        for chunk in store.read_body(mid):
            assert len(chunk) <= CHUNK_SIZE
            assert chunk == b"m" * len(chunk)
            total += len(chunk)
            chunks += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert chunks == size // CHUNK_SIZE
    assert peak < 10 * 1024 * 1024, peak
    m = store.get_message(mid)
    assert m is not None and m.size == size
    assert pg.sql("SELECT count(*), max(octet_length(data)) FROM body_chunks") == [
        (size // CHUNK_SIZE, CHUNK_SIZE)]


def test_a_body_deleted_while_it_is_read_raises(pg: Schema) -> None:
    reader = pg.open()
    admin = pg.open()
    data = b"x" * (CHUNK_SIZE * 3)
    mid = admin.enqueue(msg("a@x.example"), io.BytesIO(data))
    chunks = reader.read_body(mid)
    assert next(chunks) == b"x" * CHUNK_SIZE
    assert admin.delete_messages([mid]) == [mid]
    with pytest.raises(StoreError, match="left the queue"):
        next(chunks)


def test_the_due_query_uses_its_index(pg: Schema) -> None:
    pg.open()
    with pg.raw() as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(str(r[0]) for r in conn.execute(
            "EXPLAIN SELECT id FROM recipients WHERE state = 'outbound'"
            " AND COALESCE(next_attempt_at, 0) <= 5 AND (claimed_until IS NULL"
            " OR claimed_until <= 5) ORDER BY COALESCE(next_attempt_at, 0), id LIMIT 7"
            " FOR UPDATE SKIP LOCKED"))
    assert "recipients_due" in plan
    assert "Sort" not in plan  # read in claim order, not sorted afterwards


# --- a node that loses the database ------------------------------------------------------------


@contextlib.contextmanager
def _behind_forwarder(pg: Schema) -> Iterator[tuple[PostgresStore, Forwarder]]:
    """A store that reaches the server through a forwarder the test can cut,
    beating every 0.1 s; the forwarder is cut again at the end."""
    parts = urlsplit(pg.url)
    forwarder = Forwarder((parts.hostname or "127.0.0.1", parts.port or 5432))
    forwarder.start()
    try:
        url = _with_netloc(pg.url, port=forwarder.port,
                           password=None if parts.password else PASSWORD)
        yield pg.open(url, connect_timeout=1, pool_size=2, heartbeat_interval=0.1,
                      node_timeout=2.0), forwarder
    finally:
        forwarder.cut()


def _fails_fast(store: PostgresStore) -> bool:
    """Whether a call fails at once because the heartbeat found the server gone."""
    try:
        store.count_events("k", 0.0)
    except StoreError as exc:
        return "unreachable" in str(exc)
    return False


def test_a_failing_heartbeat_makes_calls_fail_fast_and_the_holder_not_current(
        pg: Schema) -> None:
    """With the server unreachable, once the heartbeat has failed twice every
    call fails at once (no worker thread waits its own timeout); after half of
    `node_timeout` without a beat the holder is not current (the drain and the
    outbound engine start nothing new); both clear when a beat gets through."""
    with _behind_forwarder(pg) as (store, forwarder):
        mid = store.enqueue(msg("a@x.example"), io.BytesIO(b"x"))
        assert store.holder_is_current()
        forwarder.cut()
        _wait_for(lambda: _fails_fast(store), 10.0, "the heartbeat notices")
        started = time.monotonic()
        for call in (lambda: store.get_message(mid), lambda: store.domain_usage("x.example"),
                     lambda: store.enqueue(msg("b@x.example"), io.BytesIO(b"y"))):
            with pytest.raises(StoreError, match="unreachable"):
                call()
        assert time.monotonic() - started < 0.5  # at once, not 3 x connect_timeout
        _wait_for(lambda: not store.holder_is_current(), 5.0, "the holder stops being current")
        forwarder.start()
        _wait_for(store.holder_is_current, 10.0, "a beat gets through again")

        def works() -> bool:
            try:
                return store.get_message(mid) is not None
            except StoreError:  # the pool may still be waiting to reconnect
                return False

        _wait_for(works, 20.0, "calls work again")


def test_closing_a_store_whose_server_is_unreachable_does_not_raise(
        pg: Schema, caplog: pytest.LogCaptureFixture) -> None:
    """A provider stopping during an outage: `close()` logs that the holder
    row stays (it goes dead after node_timeout) and returns."""
    with _behind_forwarder(pg) as (store, forwarder):
        forwarder.cut()
        _wait_for(lambda: _fails_fast(store), 10.0, "the heartbeat notices")
        with caplog.at_level(logging.WARNING, logger="fermoposta.store"):
            store.close()
        assert any("deleting the holder row on close failed" in r.getMessage()
                   and "unreachable" in r.getMessage() for r in caplog.records)
        store.close()  # idempotent


def test_start_etrn_waits_for_a_lease_being_taken_and_then_leaves_the_domain(
        pg: Schema) -> None:
    # An ATRN session is taking the domain's lease (its transaction not yet
    # committed): ETRN must not move the mail under it (the drain and the
    # outbound runner would both send it); it waits for that transaction
    # and then finds the domain busy.
    store = pg.open(node="a")
    mid = store.enqueue(msg("bob@etrn.example"), io.BytesIO(b"body\r\n"))
    with pg.raw() as other:
        other.autocommit = False
        other.execute("INSERT INTO leases (domain, owner, expires_at, holder)"
                      " VALUES ('etrn.example', 'atrn-session', %s, %s)",
                      (time.time() + 600, store._holder))
        result: list[Any] = []
        etrn = threading.Thread(
            target=lambda: result.append(store.start_etrn(["etrn.example"], time.time())))
        etrn.start()
        etrn.join(1.0)
        assert etrn.is_alive()  # waiting for the lease's transaction
        other.commit()
        etrn.join(10.0)
    assert not etrn.is_alive()
    [started] = result
    assert started.messages == 0 and started.busy == ("etrn.example",)
    message = store.get_message(mid)
    assert message is not None and [r.state for r in message.recipients] == [HELD_STATE]
    assert [r[0] for r in pg.sql("SELECT owner FROM leases")] == ["atrn-session"]


# --- the cache of domain lookups (pg_domain_cache) ------------------------------------------


def _now_or_none(store: PostgresStore, name: str) -> tuple[bool, Any]:
    """(True, answer) when get_domain_now answered from the cache."""
    from fermoposta.store.base import WouldBlock
    try:
        return True, store.get_domain_now(name)
    except WouldBlock:
        return False, None


def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _cached(store: PostgresStore, name: str) -> Any:
    """Look `name` up until the cache answers it; return the answer."""
    answer: list[Any] = []

    def hit() -> bool:
        found, value = _now_or_none(store, name)
        if found:
            answer.append(value)
            return True
        store.get_domain(name)  # what lookup_domain does after WouldBlock
        return False

    _until(hit, f"the cache to answer {name}")
    return answer[0]


def _two_nodes(pg: Schema) -> tuple[PostgresStore, PostgresStore]:
    """(node, other): `other` made account acme with a.example, and `node`
    has a.example in its cache."""
    from fermoposta.store.base import Account, Domain
    node = pg.open()
    other = pg.open()
    other.add_account(Account("acme", None, None))
    other.add_domain(Domain("a.example", "acme"))
    _cached(node, "a.example")
    return node, other


def test_domain_lookups_are_cached_until_another_node_changes_a_domain(pg: Schema) -> None:
    """One node's cache answers RCPT lookups without the database and is
    emptied, on commit, by any node's change: add, update, valid recipients,
    removal, an account's removal (cascade), and a domain that was unknown."""
    from fermoposta.store.base import Account, Domain
    node = pg.open()
    other = pg.open()
    other.add_account(Account("acme", None, None))
    other.add_domain(Domain("a.example", "acme", max_messages=5))
    assert _cached(node, "a.example") == Domain("a.example", "acme", max_messages=5)
    assert _cached(node, "nobody.example") is None  # a negative answer is kept too

    changes = [
        lambda: other.update_domain(Domain("a.example", "acme", max_messages=7)),
        lambda: other.update_domain(Domain("a.example", "acme", max_messages=7,
                                           valid_recipients=frozenset({"x"}))),
        lambda: other.add_domain(Domain("nobody.example", "acme")),
        lambda: other.remove_domain("nobody.example"),
        lambda: other.remove_account("acme"),
    ]
    for change in changes:
        _cached(node, "a.example")
        _cached(node, "nobody.example")
        change()
        # Gone from the cache at once: the next lookup reads the database.
        _until(lambda: not _now_or_none(node, "a.example")[0]
               and not _now_or_none(node, "nobody.example")[0], "the change's notice")
        assert node.get_domain("a.example") == other.get_domain("a.example")
        assert node.get_domain("nobody.example") == other.get_domain("nobody.example")
    assert node.get_domain("a.example") is None  # the account's removal took its domain


def test_an_answer_read_before_a_change_is_not_kept_after_it(pg: Schema) -> None:
    from fermoposta.store.base import Domain
    node, other = _two_nodes(pg)
    cache = node._domain_cache
    before = cache.generation()  # a lookup begins ...
    stale = node.get_domain("a.example")
    other.update_domain(Domain("a.example", "acme", max_messages=1))  # ... a change commits
    _until(lambda: cache.generation() != before, "the change's notice")
    cache.keep("a.example", stale, before)  # ... and the lookup ends: not kept
    assert cache.lookup("a.example") == (False, None)


def test_a_store_that_never_asks_now_caches_nothing(pg: Schema) -> None:
    """CLI commands use get_domain only: no LISTEN, no cached answer."""
    from fermoposta.store.base import Account, Domain
    store = pg.open()
    store.add_account(Account("acme", None, None))
    store.add_domain(Domain("a.example", "acme"))
    assert store.get_domain("a.example") == Domain("a.example", "acme")
    assert store._domain_cache.lookup("a.example") == (False, None)
    assert pg.sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN \"fp_dir_%%'"
                  " AND datname = current_database()") == [(0,)]


def test_a_lost_listen_stops_the_cache_until_it_is_back(pg: Schema,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Notices sent while the LISTEN connection is gone are missed: the cache
    answers nothing until a new LISTEN is in place, then works again."""
    from fermoposta.store.base import Domain
    node, other = _two_nodes(pg)
    cache = node._domain_cache
    connect = cache._connect

    def refused() -> psycopg.Connection[Any]:
        raise psycopg.OperationalError("connection refused (test)")

    cache._connect = refused  # the listener cannot come back for now
    channel = pg_schema.directory_channel(pg.name)
    listeners = pg.sql("SELECT pid FROM pg_stat_activity WHERE query = %s",
                       (f'LISTEN "{channel}"',))
    assert len(listeners) == 1
    with caplog.at_level(logging.WARNING, logger="fermoposta.store"):
        pg.sql("SELECT pg_terminate_backend(%s)", (listeners[0][0],))
        other.update_domain(Domain("a.example", "acme", max_messages=2))  # nobody hears it
        _until(lambda: not _now_or_none(node, "a.example")[0], "the cache to stop")
        node.get_domain("a.example")  # read while not listening: not kept
        assert not _now_or_none(node, "a.example")[0]
        # One warning for the outage, not one per failed attempt.
        _until(lambda: any("lost the LISTEN for domain changes" in r.getMessage()
                           for r in caplog.records), "the warning")
        time.sleep(2.5)  # more than RETRY: at least one more attempt failed
    assert not any("cannot LISTEN" in r.getMessage() for r in caplog.records)
    cache._connect = connect
    assert _cached(node, "a.example") == Domain("a.example", "acme", max_messages=2)


def test_the_cache_is_bounded(pg: Schema, monkeypatch: pytest.MonkeyPatch) -> None:
    """RCPT to random domains cannot grow it without end: a full cache is emptied."""
    from fermoposta.store import pg_domain_cache
    monkeypatch.setattr(pg_domain_cache, "MAX_ENTRIES", 3)
    node = pg.open()
    for name in ("a.example", "b.example", "c.example"):
        _cached(node, name)
    assert all(_now_or_none(node, n)[0] for n in ("a.example", "b.example", "c.example"))
    node.get_domain("d.example")
    assert _now_or_none(node, "d.example") == (True, None)
    assert not any(_now_or_none(node, n)[0] for n in ("a.example", "b.example", "c.example"))


def test_a_change_from_another_search_path_still_empties_the_cache(
        pg: Schema, monkeypatch: pytest.MonkeyPatch) -> None:
    """The notice names the table's schema, not the writer's search_path: a
    removal done with qualified names from another schema reaches the cache."""
    from fermoposta.store import pg_domain_cache
    from fermoposta.store.base import Account, Domain
    monkeypatch.setattr(pg_domain_cache, "TTL", 3600.0)  # the notice, not the backstop
    node = pg.open()
    node.add_account(Account("acme", None, None))
    node.add_domain(Domain("a.example", "acme"))
    _cached(node, "a.example")
    with psycopg.connect(require_server(), autocommit=True, connect_timeout=5) as conn:
        conn.execute("SET search_path = public")
        conn.execute(f'DELETE FROM "{pg.name}".domains WHERE name = %s', ("a.example",))
    _until(lambda: not _now_or_none(node, "a.example")[0], "the change's notice", timeout=5)
    assert node.get_domain("a.example") is None


def test_an_answer_is_given_for_a_bounded_time(pg: Schema,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A backstop for notices that never come: an answer older than TTL is
    read again from the database."""
    from fermoposta.store import pg_domain_cache
    from fermoposta.store.base import Account, Domain
    monkeypatch.setattr(pg_domain_cache, "TTL", 0.3)
    node = pg.open()
    node.add_account(Account("acme", None, None))
    node.add_domain(Domain("a.example", "acme"))
    _cached(node, "a.example")
    time.sleep(0.4)
    assert _now_or_none(node, "a.example") == (False, None)


def test_held_mail_from_another_search_path_wakes_the_listener(pg: Schema) -> None:
    """Held-mail notices (schema 3, fixed in 4) also name the table's schema."""
    node = pg.open()
    notices = node.held_mail_notices()
    try:
        with psycopg.connect(require_server(), autocommit=True, connect_timeout=5) as conn:
            conn.execute("SET search_path = public")
            conn.execute(f'INSERT INTO "{pg.name}".messages (id, sender, received_at, size,'
                         " origin, smtputf8, body_8bit, client) VALUES ('AAAAAAAAAAAA',"
                         " 's@x.example', 1, 1, 'mx', false, false, 'c')")
            conn.execute(f'INSERT INTO "{pg.name}".recipients (message_id, address, domain,'
                         " state, updated_at, message_received_at, message_size) VALUES"
                         " ('AAAAAAAAAAAA', 'x@a.example', 'a.example', 'held', 1, 1, 1)")
        assert notices.wait(5.0) == {"a.example"}
    finally:
        notices.close()


def test_a_write_that_is_not_durable_skips_the_flush_for_itself_only(pg: Schema) -> None:
    # An ATRN's leases and record (`durable=False`): synchronous_commit off
    # for that transaction alone; the pool's connections stay at "on".
    store = pg.open(pool_size=1)
    with store._write("probe", durable=False) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
    with store._write("probe") as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    from fermoposta.store.base import Account
    store.add_account(Account("acme", None, None))
    assert store.acquire_leases(["a.example"], "one", 60, atrn_by=("acme", 5.0), durable=False)
    other = pg.open()  # committed: another node sees the lease and the record at once
    assert not other.acquire_leases(["a.example"], "two", 60)
    account = other.get_account("acme")
    assert account is not None and account.last_atrn_at == 5.0
    store.record_atrn("acme", 6.0, durable=False)
    account = other.get_account("acme")
    assert account is not None and account.last_atrn_at == 6.0
    conn = store._pool.getconn()
    try:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    finally:
        store._pool.putconn(conn)
