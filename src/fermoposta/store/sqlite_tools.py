"""The queue tools of the SQLite engine (`QueueTools`, see `fermoposta.store.base`).

Contract: `SQLiteQueueTools` is a mixin of `SQLiteStore` and uses only its
transactions (`_read`, `_write`), its extra readers and clock.  Every call
is one short transaction (an IMMEDIATE one for the bulk actions), safe
while a provider runs on the same file; `queue_shape` reads on several
connections in one snapshot (`sqlite_shape`); pages are keyed by
(received_at, id); statements are batched to at most `_BATCH` parameters.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import fermoposta.store.sqlite_shape as sqlite_shape
from fermoposta.store.base import (
    NodeStatus,
    QueuedRecipient,
    QueueEntry,
    QueueFilter,
    QueueShape,
    RecipientState,
    Requeued,
    StoreError,
    WouldBlock,
)
from fermoposta.store.holders import Holders
from fermoposta.store.rows import SMALL_DOMAIN, domain_size_sql, filter_sql
from fermoposta.store.rows import message_from_row as _message
from fermoposta.store.rows import recipient_from_row as _recipient
from fermoposta.store.sqlite_rows import (
    _MESSAGE_COLUMNS,
    _RECIPIENT_COLUMNS,
    _batches,
    _marks,
)


def _filter_sql(conn: sqlite3.Connection, where: QueueFilter,
                after: tuple[float, str] | None) -> tuple[str, list[Any]]:
    """FROM and WHERE of a page (`rows.filter_sql`), its plan chosen by the
    domain's size; `+r.domain` keeps SQLite from probing every message's
    EXISTS through the domain's whole range of `recipients_domain`."""
    small = False
    size = domain_size_sql(where, mark="?")
    if size is not None:
        small = int(conn.execute(size[0], size[1]).fetchone()[0]) < SMALL_DOMAIN
    return filter_sql(where, after, mark="?", find="instr({haystack}, {needle}) > 0",
                      small_domain=small, unindexed="+{}",
                      domain_index=" INDEXED BY recipients_domain")


def _existing(conn: sqlite3.Connection, message_ids: Sequence[str]) -> list[str]:
    found: list[str] = []
    for batch in _batches(message_ids):
        found += [
            str(r[0])
            for r in conn.execute(
                f"SELECT id FROM messages WHERE id IN ({_marks(len(batch))})"
                " AND size >= 0", batch  # not a staged body (size -1, sqlite_stage)
            )
        ]
    return sorted(found)


# `queue_shape`'s tries at the write lock (0.1 s in all), before it reads
# on one connection instead.
_LOCK_TRIES = 20
_LOCK_PAUSE = 0.005


def _cores() -> int:
    """The cores this process may run on (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


class SQLiteQueueTools:
    """Paging and bulk actions: the `QueueTools` part of `SQLiteStore`."""

    _clock: Callable[[], float]

    if TYPE_CHECKING:  # provided by SQLiteStore
        def _read(self) -> AbstractContextManager[sqlite3.Connection]: ...

        def _write(self, *, wait: bool = True, poke: bool = True
                   ) -> AbstractContextManager[sqlite3.Connection]: ...

        def _extra_reader(self) -> sqlite3.Connection: ...

        _holders: Holders
        _node: str

    def queue_ids(
        self, where: QueueFilter, after: tuple[float, str] | None, limit: int
    ) -> list[tuple[float, str]]:
        if limit <= 0:
            return []
        with self._read() as conn:
            sql, params = _filter_sql(conn, where, after)
            return [
                (float(r[0]), str(r[1]))
                for r in conn.execute(
                    f"SELECT m.received_at, m.id FROM{sql}"
                    " ORDER BY m.received_at, m.id LIMIT ?",
                    (*params, limit),
                )
            ]

    def count_queue(self, where: QueueFilter, received_after: float | None = None) -> int:
        with self._read() as conn:
            sql, params = _filter_sql(conn, where, None)
            if received_after is not None:
                sql += " AND m.received_at > ?"
                params.append(received_after)
            return int(conn.execute(f"SELECT count(*) FROM{sql}", params).fetchone()[0])

    def queue_page(
        self, where: QueueFilter, after: tuple[float, str] | None, limit: int
    ) -> list[QueueEntry]:
        if limit <= 0:
            return []
        with self._read() as conn:
            sql, params = _filter_sql(conn, where, after)
            rows = conn.execute(
                f"SELECT {', '.join('m.' + c.strip() for c in _MESSAGE_COLUMNS.split(','))}"
                f" FROM{sql} ORDER BY m.received_at, m.id LIMIT ?",
                (*params, limit),
            ).fetchall()
            return self._entries(conn, rows)

    def get_queue_entry(self, message_id: str) -> QueueEntry | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ? AND size >= 0",
                (message_id,)).fetchone()
            if row is None:
                return None
            return self._entries(conn, [row])[0]

    def _entries(self, conn: sqlite3.Connection, rows: Sequence[Any]) -> list[QueueEntry]:
        """Entries for message rows (in their order), with all recipients."""
        now = self._clock()
        ids = [str(row[0]) for row in rows]
        recipients: dict[str, list[QueuedRecipient]] = {i: [] for i in ids}
        active: dict[str, set[int]] = {i: set() for i in ids}
        previous: dict[str, dict[int, RecipientState]] = {i: {} for i in ids}
        hold_column = (
            "(SELECT h.previous_state FROM recipient_holds h WHERE h.recipient_id = r.id)"
        )
        columns = ", ".join("r." + c.strip() for c in _RECIPIENT_COLUMNS.split(","))
        for batch in _batches(ids):
            for r in conn.execute(
                f"SELECT {columns}, r.claimed_by, r.claimed_until, {hold_column}"
                f" FROM recipients r WHERE r.message_id IN ({_marks(len(batch))})"
                " ORDER BY r.id",
                batch,
            ):
                rcpt = _recipient(r)
                recipients[rcpt.message_id].append(rcpt)
                if r[12] is not None and r[13] is not None and r[13] > now:
                    active[rcpt.message_id].add(rcpt.id)
                if rcpt.state == RecipientState.HOLD and r[14] is not None:
                    with contextlib.suppress(ValueError):
                        previous[rcpt.message_id][rcpt.id] = RecipientState(r[14])
        return [
            QueueEntry(_message(row, recipients[str(row[0])]),
                       frozenset(active[str(row[0])]), previous[str(row[0])])
            for row in rows
        ]

    def delete_messages(self, message_ids: Collection[str]) -> list[str]:
        wanted = sorted(set(message_ids))
        with self._write() as conn:
            found = _existing(conn, wanted)
            for batch in _batches(found):
                # ON DELETE CASCADE removes the body chunks and the recipients.
                conn.execute(f"DELETE FROM messages WHERE id IN ({_marks(len(batch))})", batch)
        return found

    def _count_by_message(self, conn: sqlite3.Connection, batch: Sequence[str],
                          condition: str, params: Sequence[Any]) -> dict[str, int]:
        return {
            str(r[0]): int(r[1])
            for r in conn.execute(
                "SELECT message_id, COUNT(*) FROM recipients"
                f" WHERE message_id IN ({_marks(len(batch))}) AND {condition}"
                " GROUP BY message_id",
                (*batch, *params),
            )
        }

    def hold_messages(self, message_ids: Collection[str]) -> dict[str, int]:
        wanted = sorted(set(message_ids))
        hold = str(RecipientState.HOLD)
        now = self._clock()
        with self._write() as conn:
            found = _existing(conn, wanted)
            result = dict.fromkeys(found, 0)
            for batch in _batches(found):
                marks = _marks(len(batch))
                result.update(self._count_by_message(conn, batch, "state != ?", (hold,)))
                conn.execute(
                    "INSERT OR REPLACE INTO recipient_holds (recipient_id, previous_state)"
                    f" SELECT id, state FROM recipients WHERE message_id IN ({marks})"
                    " AND state != ?",
                    (*batch, hold),
                )
                conn.execute(
                    f"UPDATE recipients SET state = ?, updated_at = ? WHERE message_id IN ({marks})"
                    " AND state != ?",
                    (hold, now, *batch, hold),
                )
        return result

    def release_messages(self, message_ids: Collection[str]) -> dict[str, int]:
        wanted = sorted(set(message_ids))
        hold = str(RecipientState.HOLD)
        now = self._clock()
        with self._write() as conn:
            found = _existing(conn, wanted)
            result = dict.fromkeys(found, 0)
            for batch in _batches(found):
                marks = _marks(len(batch))
                result.update(self._count_by_message(conn, batch, "state = ?", (hold,)))
                conn.execute(
                    "UPDATE recipients SET updated_at = ?, state = COALESCE("
                    " (SELECT h.previous_state FROM recipient_holds h"
                    "  WHERE h.recipient_id = recipients.id),"
                    " CASE WHEN EXISTS (SELECT 1 FROM domains d WHERE d.name = recipients.domain)"
                    " THEN ? ELSE ? END)"
                    f" WHERE message_id IN ({marks}) AND state = ?",
                    (now, str(RecipientState.HELD), str(RecipientState.OUTBOUND), *batch, hold),
                )
                conn.execute(
                    "DELETE FROM recipient_holds WHERE recipient_id IN"
                    f" (SELECT id FROM recipients WHERE message_id IN ({marks}) AND state != ?)",
                    (*batch, hold),
                )
        return result

    def retry_outbound(
        self, now: float, *, message_ids: Collection[str] | None = None,
        domain: str | None = None
    ) -> dict[str, int]:
        condition = "state = ? AND (claimed_until IS NULL OR claimed_until <= ?)"
        params: list[Any] = [str(RecipientState.OUTBOUND), now]
        result: dict[str, int] = {}
        with self._write() as conn:
            if message_ids is None:
                batches: list[Sequence[str] | None] = [None]
            else:
                found = _existing(conn, sorted(set(message_ids)))
                result = dict.fromkeys(found, 0)
                batches = list(_batches(found))
            for batch in batches:
                scope = condition
                scope_params = list(params)
                # A whole domain: its (domain, state) range.  SQLite keeps no
                # statistics and would walk every OUTBOUND recipient through
                # recipients_state, whose order saves the GROUP BY a sort.
                table = ("recipients INDEXED BY recipients_domain"
                         if domain is not None and batch is None else "recipients")
                if domain is not None:
                    # With ids, +domain: their few rows, not the domain's range.
                    scope += " AND domain = ?" if batch is None else " AND +domain = ?"
                    scope_params.append(domain)
                if batch is not None:
                    scope += f" AND message_id IN ({_marks(len(batch))})"
                    scope_params += batch
                result.update(
                    (str(r[0]), int(r[1]))
                    for r in conn.execute(
                        f"SELECT message_id, COUNT(*) FROM {table} WHERE {scope}"
                        " GROUP BY message_id",
                        scope_params,
                    )
                )
                conn.execute(
                    f"UPDATE {table} SET next_attempt_at = ?, updated_at = ? WHERE {scope}",
                    (now, now, *scope_params),
                )
        return result

    def requeue_messages(self, message_ids: Collection[str], now: float) -> dict[str, Requeued]:
        wanted = sorted(set(message_ids))
        held, outbound, hold = (str(s) for s in (RecipientState.HELD, RecipientState.OUTBOUND,
                                                  RecipientState.HOLD))
        hosted = "EXISTS (SELECT 1 FROM domains d WHERE d.name = r.domain)"
        # (what changes, its recipients' condition, the parameters of that condition)
        moves = (
            ("to_outbound", f"r.state = ? AND NOT {hosted}", (held,)),
            ("to_held", f"r.state = ? AND {hosted}"
             " AND (r.claimed_until IS NULL OR r.claimed_until <= ?)", (outbound, now)),
        )
        with self._write() as conn:
            found = _existing(conn, wanted)
            counts = {mid: {"to_outbound": 0, "to_held": 0, "on_hold": 0} for mid in found}
            for batch in _batches(found):
                marks = _marks(len(batch))
                # The ids first, then one UPDATE by id: the two moves select
                # disjoint recipients (hosted or not), so neither sees the other's.
                for key, condition, params in moves:
                    ids = [(int(r[0]), str(r[1])) for r in conn.execute(
                        f"SELECT r.id, r.message_id FROM recipients r"
                        f" WHERE r.message_id IN ({marks}) AND {condition}", (*batch, *params))]
                    for _, mid in ids:
                        counts[mid][key] += 1
                    new_state, due = (outbound, now) if key == "to_outbound" else (held, None)
                    for chunk in _batches([rid for rid, _ in ids]):
                        conn.execute(
                            "UPDATE recipients SET state = ?, next_attempt_at = ?, updated_at = ?,"
                            " claimed_by = NULL, claimed_until = NULL, claim_holder = NULL"
                            f" WHERE id IN ({_marks(len(chunk))})",
                            (new_state, due, now, *chunk))
                # On hold: correct the state that release restores.
                for before, after, test in ((held, outbound, f"NOT {hosted}"),
                                            (outbound, held, hosted)):
                    ids = [(int(r[0]), str(r[1])) for r in conn.execute(
                        "SELECT r.id, r.message_id FROM recipients r"
                        " JOIN recipient_holds h ON h.recipient_id = r.id"
                        f" WHERE r.message_id IN ({marks}) AND r.state = ?"
                        f" AND h.previous_state = ? AND {test}", (*batch, hold, before))]
                    for _, mid in ids:
                        counts[mid]["on_hold"] += 1
                    for chunk in _batches([rid for rid, _ in ids]):
                        conn.execute(
                            "UPDATE recipient_holds SET previous_state = ?"
                            f" WHERE recipient_id IN ({_marks(len(chunk))})", (after, *chunk))
        return {mid: Requeued(**c) for mid, c in counts.items()}

    def queue_shape(self, now: float, age_limits: Sequence[float]) -> QueueShape:
        # Several connections side by side (`sqlite_shape`): a range of
        # domains for each core and one for the totals, MAX_PARTS at most.
        # Their read transactions start while this store holds the file's
        # write lock, so no commit can land between them: one snapshot, as
        # one connection would read.  The lock is held only while they
        # start (no query runs under it); the write commits nothing.
        cores = _cores()
        connections: list[sqlite3.Connection] = []
        try:
            if cores > 1:
                try:
                    for _ in range(min(sqlite_shape.MAX_PARTS, cores + 1)):
                        connections.append(self._extra_reader())
                    if self._one_snapshot(connections):
                        return sqlite_shape.queue_shape(connections, now, age_limits)
                except sqlite3.Error as exc:
                    raise StoreError(f"store read failed: {exc}") from exc
            # One core, or a writer that kept the lock: one connection.
            with self._read() as conn:
                return sqlite_shape.queue_shape([conn], now, age_limits)
        finally:
            for conn in connections:
                conn.close()  # ends its read transaction

    def _one_snapshot(self, connections: Sequence[sqlite3.Connection]) -> bool:
        """Start the read transactions of `connections` in one snapshot,
        under the write lock, taken without waiting for it: a few tries
        `_LOCK_PAUSE` apart.  False when a writer held it all along (a
        long bulk action): nothing started, and the caller reads on one
        connection, so `queue stats` never waits long for a writer."""
        for _ in range(_LOCK_TRIES):
            try:
                with self._write(wait=False, poke=False):
                    for conn in connections:
                        conn.execute("BEGIN")
                        conn.execute("SELECT 1 FROM messages LIMIT 1")  # the snapshot starts
                return True
            except WouldBlock:
                time.sleep(_LOCK_PAUSE)
        return False

    def live_nodes(self) -> list[NodeStatus]:
        holders = self._holders
        me = holders.me()
        alive = [me] + [path.stem for path in sorted(holders.directory.glob("*.lock"))
                        if path.stem != me and holders.is_alive(path.stem)]
        return [NodeStatus(self._node, len(alive), None, 0.0)]

    def queue_summary(self) -> list[tuple[str, int, int, float | None]]:
        with self._read() as conn:
            # Index-only (recipients_state, schema 9): each (state, message) once.
            rows = {
                str(r[0]): (int(r[1]), int(r[2] or 0), r[3])
                for r in conn.execute(
                    "SELECT state, COUNT(*), SUM(size), MIN(received_at) FROM"
                    " (SELECT DISTINCT state, message_id, message_size AS size,"
                    " message_received_at AS received_at FROM recipients)"
                    " GROUP BY state"
                )
            }
        return [(str(state), *rows.get(str(state), (0, 0, None))) for state in RecipientState]
