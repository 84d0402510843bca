"""Messages of the PostgreSQL engine: enqueue, import, read (see `fermoposta.store.base`).

Contract: `PostgresMessages` is a mixin of `PostgresStore` and uses only its
transactions (`_read`, `_write`, `_query`), clock and node name; durability
and errors are those of `fermoposta.store.postgres`.
- Enqueue: one transaction per call (`enqueue_batch`: one for the batch).
  When every body is one chunk (most mail), the batch is one statement
  (`_insert_many_query`, a lone message `_insert_whole_query`), a
  transaction by itself (`_write_one_statement`): one round trip, all or
  nothing; if its connection breaks, the messages' rows tell whether it was
  applied (`_found_after_loss`: once the backend that ran it is gone, by
  queue id, node and arrival time: all of them, done; none, stored again
  through `_write`, whose probe replaces broken connections).  Other
  bodies, and a batch with a queue id that is taken: a transaction of
  three round trips or more, where a collision writes
  nothing and draws a new id.
  `_enqueue` is also what the outcomes use to queue a DSN in their own
  transaction.
- Bodies: `body_chunks` rows of at most `CHUNK_SIZE` bytes, written one at a
  time inside the enqueue transaction and read one per query, so memory
  stays bounded; a body that leaves the queue while it is read raises
  `StoreError` instead of ending short.
- `_messages_of` groups recipients by message, in the order asked for.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from typing import IO

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import TupleRow

from fermoposta.store.base import (
    CHUNK_SIZE,
    NewMessage,
    QueuedMessage,
    QueuedRecipient,
    QueueEntry,
    RecipientState,
    StoreError,
    WouldBlock,
    bodies_within,
    new_queue_id,
    read_ahead_result,
)
from fermoposta.store.pg_rows import (
    _M_MESSAGE_COLUMNS,
    _MESSAGE_COLUMNS,
    _R_RECIPIENT_COLUMNS,
    _RECIPIENT_COLUMNS,
    CommitUnknown,
    Conn,
    EnginePart,
)
from fermoposta.store.rows import message_from_row as _message
from fermoposta.store.rows import recipient_from_row as _recipient

LOST_WAIT = 5.0  # seconds to wait for the server backend of a lost connection to go


class PostgresMessages(EnginePart):
    """The messages part of `PostgresStore`."""

    _node: str

    def stage_body(self, queue_id: str, body: IO[bytes]) -> None:
        """PostgreSQL stores a body at `enqueue` only (see `base.MessageQueue`)."""
        return None

    def sweep_stages(self) -> int:
        return 0

    def enqueue(self, message: NewMessage, body: IO[bytes], queue_id: str | None = None) -> str:
        return self.enqueue_batch([(message, body, queue_id)])[0]

    def enqueue_now(self, message: NewMessage, body: IO[bytes],
                    queue_id: str | None = None) -> str:
        """Always `WouldBlock`: every commit is a round trip to the server."""
        raise WouldBlock()

    def enqueue_batch_now(self, items: Sequence[tuple[NewMessage, IO[bytes], str | None]]
                          ) -> list[str]:
        """Always `WouldBlock`: every commit is a round trip to the server."""
        raise WouldBlock()

    def enqueue_batch(self, items: Sequence[tuple[NewMessage, IO[bytes], str | None]]
                      ) -> list[str]:
        """One transaction.  When every body is one chunk (most mail): one
        statement for all, a transaction by itself, in one round trip
        (`_write_one_statement`); else the one-chunk messages in one pipeline
        and the others a statement at a time, in a transaction of three
        round trips or more."""
        # The first two chunks of each body, up to the first body of more
        # than one (then the one trip is out; the rest is read as it goes in).
        heads: list[tuple[bytes, bytes]] = []
        try:
            for _, body, _ in items:
                first = body.read(CHUNK_SIZE)
                heads.append((first, body.read(CHUNK_SIZE) if first else b""))
                if heads[-1][1]:
                    break
        except OSError as exc:  # a spool gone bad: nothing was written
            raise self._error("enqueue failed", exc) from exc
        named = [(message, body, queue_id or new_queue_id()) for message, body, queue_id in items]
        if len(heads) == len(items) and not (heads and heads[-1][1]):
            stored = self._enqueue_in_one_trip(
                [(message, bytes(first), queue_id)
                 for (message, _, queue_id), (first, _) in zip(named, heads, strict=True)])
            if stored:
                return [queue_id for _, _, queue_id in named]
        return self._enqueue_in_transaction(named, heads)

    def _enqueue_in_one_trip(self, whole: Sequence[tuple[NewMessage, bytes, str]]) -> bool:
        """Messages whose whole body is given, each under its queue id, all
        or nothing; False when nothing was stored (a queue id taken, or a
        broken connection before the statement was applied): the caller
        stores them the slower way, which draws fresh ids and replaces
        broken connections."""
        now = self._clock()
        try:
            if len(whole) == 1:
                [(message, data, queue_id)] = whole
                row = self._write_one_statement("enqueue", lambda conn: self._insert_whole_query(
                    conn, queue_id, message, now, data, on_conflict=False))
            else:
                row = self._write_one_statement("enqueue", lambda conn: self._insert_many_query(
                    conn, whole, now))
            # Without ON CONFLICT a taken id fails the statement: it wrote
            # them all.  Checked all the same: a 250 rests on it.
            written = int(row[0]) if row is not None else -1
            if written != len(whole):
                raise StoreError(f"enqueue: the statement wrote {written} of {len(whole)}"
                                 " messages")
        except CommitUnknown as lost:
            # Applied or not: all our rows are there, or none is.
            ids = [queue_id for _, _, queue_id in whole]
            found = self._found_after_loss(lost.backend_pid, ids, now)
            if found and found != len(ids):
                raise StoreError(f"enqueue: {found} of {len(ids)} messages found after a lost"
                                 " connection; cannot tell whether the commit was applied"
                                 ) from None
            return found == len(ids)
        except StoreError as exc:
            if isinstance(exc.__cause__, pg_errors.UniqueViolation):
                return False  # a queue id was taken: nothing was stored
            raise
        return True

    def _found_after_loss(self, pid: int, ids: list[str], now: float) -> int:
        """How many of the messages `ids`, written at `now` by a statement
        whose connection broke, were stored.  Its server backend `pid`, if
        still there (only our side of the connection died), could yet
        commit it: it is terminated and waited for first (`LOST_WAIT`
        seconds, else `StoreError`: cannot tell).  Then our rows, not an
        older message's that drew the same id: this node's, received at
        this very `now`."""
        what = "enqueue (was the commit applied?)"
        alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
        if pid and int(self._query(what, alive, (pid,))[0][0]):
            gone_by = time.monotonic() + LOST_WAIT
            self._query(what, "SELECT pg_terminate_backend(%s)", (pid,))
            while int(self._query(what, alive, (pid,))[0][0]):
                if time.monotonic() > gone_by:
                    raise StoreError(f"enqueue: the server backend {pid} of a lost connection"
                                     " is still there; cannot tell whether its statement was"
                                     " applied")
                time.sleep(0.02)
        return int(self._query(
            what, "SELECT count(*) FROM messages WHERE id = ANY(%s) AND received_at = %s"
            " AND node = %s", (ids, now, self._node))[0][0])

    def _enqueue_in_transaction(self, items: Sequence[tuple[NewMessage, IO[bytes], str]],
                                heads: Sequence[tuple[bytes, bytes]]) -> list[str]:
        """`items`' bodies, the first `len(heads)` of them read as far as
        `heads` (their first two chunks), the others not at all."""
        with self._write("enqueue") as conn:
            now = self._clock()
            ids: list[str] = [""] * len(items)
            whole: list[tuple[int, NewMessage, bytes, str]] = []
            for index, (message, body, queue_id) in enumerate(items):
                if index < len(heads):
                    first, second = heads[index]
                else:
                    first = body.read(CHUNK_SIZE)
                    second = body.read(CHUNK_SIZE) if first else b""
                if second:
                    ids[index] = self._enqueue(conn, message, body, queue_id,
                                               head=(first, second))
                else:
                    whole.append((index, message, bytes(first), queue_id))
            cursors = []
            if whole:  # else an empty pipeline would cost a round trip
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
                " body_8bit, envid, ret, client, node, wire_ready)"
                " VALUES (%s, %s, %s, 0, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO NOTHING RETURNING id",
                (message_id, message.sender, now, str(message.origin),
                 bool(message.smtputf8), bool(message.body_8bit), message.envid,
                 message.ret, message.client, self._node, bool(message.wire_ready)),
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
        self._insert_recipients(conn, message_id, message, now, size)
        return message_id

    _RECIPIENTS_SELECT = (
        "INSERT INTO recipients (message_id, address, domain, state, attempts, notify,"
        " orcpt, updated_at, message_received_at, message_size)"
        " SELECT {id}, u.address, u.domain, u.state, 0, u.notify, u.orcpt, %s, %s, %s"
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
                           now: float, size: int) -> None:
        """The recipients of a message received at `now` with `size` bytes."""
        if message.recipients:
            conn.execute(self._RECIPIENTS_SELECT.format(id="%s", source=""),
                         (message_id, now, now, size, *self._recipient_arrays(message)))

    def _insert_whole(self, conn: Conn, message_id: str, message: NewMessage, now: float,
                      data: bytes) -> bool:
        """The message, its one-chunk body and its recipients in one statement
        (one round trip); False, with nothing written, if `message_id` exists.
        The foreign keys are checked at the end of the statement, when the
        message row is there."""
        row = self._insert_whole_query(conn, message_id, message, now, data).fetchone()
        return row is not None and int(row[0]) == 1

    def _insert_whole_query(self, conn: Conn, message_id: str, message: NewMessage,
                            now: float, data: bytes, *, on_conflict: bool = True
                            ) -> psycopg.Cursor[TupleRow]:
        """The statement of `_insert_whole`, executed; its one row counts the
        messages written (0 or 1).  Without `on_conflict`, a queue id that is
        taken fails the statement (and its transaction) instead."""
        return conn.execute(*self._insert_whole_statement(message_id, message, now, data,
                                                          on_conflict=on_conflict))

    def _insert_whole_statement(self, message_id: str, message: NewMessage, now: float,
                                data: bytes, *, on_conflict: bool = True
                                ) -> tuple[str, tuple[object, ...]]:
        """`_insert_whole_query`'s SQL and parameters (also sent by the event
        loop's own connection: `pg_loop_enqueue`)."""
        return (
            "WITH m AS (INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
            " body_8bit, envid, ret, client, node, wire_ready)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            + (" ON CONFLICT (id) DO NOTHING" if on_conflict else "") + " RETURNING id),"
            " c AS (INSERT INTO body_chunks (message_id, seq, data)"
            " SELECT m.id, 0, %b FROM m WHERE %s),"
            " r AS (" + self._RECIPIENTS_SELECT.format(id="m.id", source="m, ") + ")"
            " SELECT count(*) FROM m",
            (message_id, message.sender, now, len(data), str(message.origin),
             bool(message.smtputf8), bool(message.body_8bit), message.envid, message.ret,
             message.client, self._node, bool(message.wire_ready),
             data, bool(data),
             now, now, len(data), *self._recipient_arrays(message)),
        )

    # Several messages, their one-chunk bodies and their recipients, each
    # column a parameter array: one statement whatever their number.
    _INSERT_MANY = (
        "WITH m AS (INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
        " body_8bit, envid, ret, client, node, wire_ready)"
        " SELECT u.id, u.sender, %s, u.size, u.origin, u.smtputf8, u.body_8bit, u.envid,"
        " u.ret, u.client, %s, u.wire_ready"
        " FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::boolean[],"
        " %s::boolean[], %s::text[], %s::text[], %s::text[], %s::boolean[])"
        " AS u(id, sender, size, origin, smtputf8, body_8bit, envid, ret, client, wire_ready)"
        " RETURNING id),"
        " c AS (INSERT INTO body_chunks (message_id, seq, data)"
        " SELECT u.id, 0, u.data FROM unnest(%s::text[], %b::bytea[]) AS u(id, data)"
        " WHERE octet_length(u.data) > 0),"
        " r AS (INSERT INTO recipients (message_id, address, domain, state, attempts, notify,"
        " orcpt, updated_at, message_received_at, message_size)"
        " SELECT u.id, u.address, u.domain, u.state, 0, u.notify, u.orcpt, %s, %s, u.size"
        " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],"
        " %s::bigint[])"
        # WITH ORDINALITY: the recipients' ids in the messages' and their own order.
        " WITH ORDINALITY AS u(id, address, domain, state, notify, orcpt, size, n)"
        " ORDER BY u.n)"
        " SELECT count(*) FROM m"
    )

    def _insert_many_query(self, conn: Conn, whole: Sequence[tuple[NewMessage, bytes, str]],
                           now: float) -> psycopg.Cursor[TupleRow]:
        """`whole` (messages, their whole bodies, their queue ids) in one
        statement; its one row counts the messages written.  A queue id that
        is taken fails it, and nothing is written.  Against a pipeline of
        one `_insert_whole_query` a message: half the client's CPU for ten
        (bench/README.md), which the worker thread would take from the
        event loop's GIL.  The foreign keys are checked at the end of the
        statement, when the message rows are there."""
        return conn.execute(*self._insert_many_statement(whole, now))

    def _insert_many_statement(self, whole: Sequence[tuple[NewMessage, bytes, str]],
                               now: float) -> tuple[str, tuple[object, ...]]:
        """`_insert_many_query`'s SQL and parameters (also sent by the event
        loop's own connection: `pg_loop_enqueue`)."""
        messages = [message for message, _, _ in whole]
        ids = [queue_id for _, _, queue_id in whole]
        sizes = [len(data) for _, data, _ in whole]
        recipients = [(queue_id, r, len(data)) for message, data, queue_id in whole
                      for r in message.recipients]
        return self._INSERT_MANY, (
            now, self._node,
            ids, [m.sender for m in messages], sizes, [str(m.origin) for m in messages],
            [bool(m.smtputf8) for m in messages], [bool(m.body_8bit) for m in messages],
            [m.envid for m in messages], [m.ret for m in messages],
            [m.client for m in messages], [bool(m.wire_ready) for m in messages],
            ids, [data for _, data, _ in whole],
            now, now,
            [queue_id for queue_id, _, _ in recipients],
            [r.address for _, r, _ in recipients], [r.domain for _, r, _ in recipients],
            [str(r.state) for _, r, _ in recipients], [r.notify for _, r, _ in recipients],
            [r.orcpt for _, r, _ in recipients], [size for _, _, size in recipients],
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
                        " body_8bit, envid, ret, client, node, wire_ready)"
                        " VALUES (%s, %s, %s, 0, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (m.id, m.sender, m.received_at, str(m.origin), bool(m.smtputf8),
                         bool(m.body_8bit), m.envid, m.ret, m.client, m.node,
                         bool(m.wire_ready)),
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
                    " delay_notified, message_received_at, message_size)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " RETURNING id",
                    (m.id, r.address, r.domain, str(r.state), r.attempts, r.last_reply,
                     r.notify, r.orcpt, now, r.next_attempt_at, r.first_failure_at,
                     bool(r.delay_notified), m.received_at, size),
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

    def read_ahead(self, message_ids: Sequence[str], body_limit: int,
                   body_budget: int | None = None
                   ) -> list[tuple[QueuedMessage | None, bytes | None]]:
        """Two statements (two round trips) for the whole batch; like
        `get_message` then `read_body`, each sees its own snapshot."""
        columns = _MESSAGE_COLUMNS.count(",") + 1
        ids = list(dict.fromkeys(message_ids))
        rows = self._query(
            "read ahead",
            f"SELECT {_M_MESSAGE_COLUMNS}, {_R_RECIPIENT_COLUMNS} FROM messages m"
            " LEFT JOIN recipients r ON r.message_id = m.id WHERE m.id = ANY(%s::text[])"
            " ORDER BY m.id, r.id",
            (ids,),
        )
        grouped: dict[str, tuple[TupleRow, list[QueuedRecipient]]] = {}
        for row in rows:
            entry = grouped.setdefault(str(row[0]), (row, []))
            if row[columns] is not None:
                entry[1].append(_recipient(row[columns:]))
        messages = {mid: _message(row[:columns], rcpts) for mid, (row, rcpts) in grouped.items()}
        small = bodies_within(messages, message_ids, body_limit, body_budget)
        bodies: dict[str, bytes] = {}
        if small:
            for mid, data in self._query(
                "read ahead",
                "SELECT message_id, data FROM body_chunks"
                " WHERE message_id = ANY(%s::text[]) AND seq = 0",
                (small,), binary=True,
            ):
                bodies[str(mid)] = bytes(data)
        return read_ahead_result(message_ids, messages, bodies)

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
