"""The queue tools of the PostgreSQL engine (`QueueTools`, see `fermoposta.store.base`).

Contract: `PostgresQueueTools` is a mixin of `PostgresStore` and uses only its
transactions (`_read`, `_write`), clock and holder-liveness SQL (`_live`).
Every call is one short transaction, safe beside running nodes: pages are
read in one snapshot, keyed by (received_at, id); bulk actions lock the rows
they change in id order (recipients, then messages), as every write of the
engine does, so they never deadlock with a drain or a queue runner.  A claim
counts as active only while it is unexpired and its holder alive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Sequence
from typing import Any

from fermoposta.store.base import (
    NodeStatus,
    QueuedRecipient,
    QueueEntry,
    QueueFilter,
    QueueShape,
    RecipientState,
    Requeued,
)
from fermoposta.store.pg_rows import (
    _DB_NOW,
    _M_MESSAGE_COLUMNS,
    _MESSAGE_COLUMNS,
    _R_RECIPIENT_COLUMNS,
    HELD,
    HOLD,
    OUTBOUND,
    Conn,
    EnginePart,
)
from fermoposta.store.pg_shape import queue_shape as _queue_shape
from fermoposta.store.rows import SMALL_DOMAIN, domain_size_sql, filter_sql
from fermoposta.store.rows import message_from_row as _message
from fermoposta.store.rows import recipient_from_row as _recipient


def _filter_sql(conn: Conn, where: QueueFilter, after: tuple[float, str] | None
                ) -> tuple[str, list[Any]]:
    """FROM and WHERE of a page (`rows.filter_sql`), its plan chosen by the
    domain's size."""
    small = False
    size = domain_size_sql(where, mark="%s")
    if size is not None:
        row = conn.execute(size[0], size[1]).fetchone()
        small = row is not None and int(row[0]) < SMALL_DOMAIN
    return filter_sql(where, after, mark="%s", find="strpos({haystack}, {needle}) > 0",
                      small_domain=small)


def _existing(conn: Conn, message_ids: Sequence[str]) -> list[str]:
    if not message_ids:
        return []
    return sorted(
        str(r[0])
        for r in conn.execute("SELECT id FROM messages WHERE id = ANY(%s::text[])",
                              (list(message_ids),))
    )


def _lock_recipients_of(conn: Conn, message_ids: Sequence[str]) -> list[tuple[str, str]]:
    """Lock the recipients of the messages (in id order); their (message_id, state)."""
    return [
        (str(r[0]), str(r[1]))
        for r in conn.execute(
            "SELECT message_id, state FROM recipients WHERE message_id = ANY(%s::text[])"
            " ORDER BY id FOR UPDATE",
            (list(message_ids),),
        )
    ]


class PostgresQueueTools(EnginePart):
    """Paging and bulk actions: the `QueueTools` part of `PostgresStore`."""

    def queue_ids(
        self, where: QueueFilter, after: tuple[float, str] | None, limit: int
    ) -> list[tuple[float, str]]:
        if limit <= 0:
            self._check_open()
            return []
        # No snapshot: the domain's size only picks the plan of the one query.
        with self._read("queue page", snapshot=False) as conn:
            sql, params = _filter_sql(conn, where, after)
            return [
                (float(r[0]), str(r[1]))
                for r in conn.execute(
                    f"SELECT m.received_at, m.id FROM{sql}"
                    " ORDER BY m.received_at, m.id LIMIT %s",
                    (*params, limit),
                )
            ]

    def count_queue(self, where: QueueFilter, received_after: float | None = None) -> int:
        with self._read("queue count", snapshot=False) as conn:
            sql, params = _filter_sql(conn, where, None)
            if received_after is not None:
                sql += " AND m.received_at > %s"
                params.append(received_after)
            row = conn.execute(f"SELECT count(*) FROM{sql}", params).fetchone()
            return int(row[0]) if row is not None else 0

    def queue_page(
        self, where: QueueFilter, after: tuple[float, str] | None, limit: int
    ) -> list[QueueEntry]:
        if limit <= 0:
            self._check_open()
            return []
        with self._read("queue page") as conn:
            sql, params = _filter_sql(conn, where, after)
            rows = conn.execute(
                f"SELECT {_M_MESSAGE_COLUMNS} FROM{sql}"
                " ORDER BY m.received_at, m.id LIMIT %s",
                (*params, limit),
            ).fetchall()
            return self._entries(conn, rows)

    def get_queue_entry(self, message_id: str) -> QueueEntry | None:
        with self._read("queue entry") as conn:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = %s", (message_id,)
            ).fetchone()
            if row is None:
                return None
            return self._entries(conn, [row])[0]

    def _entries(self, conn: Conn, rows: Sequence[Sequence[Any]]) -> list[QueueEntry]:
        """Entries for message rows (in their order), with all recipients."""
        now = self._clock()
        ids = [str(row[0]) for row in rows]
        recipients: dict[str, list[QueuedRecipient]] = {i: [] for i in ids}
        active: dict[str, set[int]] = {i: set() for i in ids}
        previous: dict[str, dict[int, RecipientState]] = {i: {} for i in ids}
        if ids:
            for r in conn.execute(
                f"SELECT {_R_RECIPIENT_COLUMNS},"
                # Active: an unexpired claim of a live holder.
                " (r.claimed_by IS NOT NULL AND r.claimed_until > %s"
                f" AND {self._live('r.claim_holder')}),"
                " h.previous_state"
                " FROM recipients r LEFT JOIN recipient_holds h ON h.recipient_id = r.id"
                " WHERE r.message_id = ANY(%s::text[]) ORDER BY r.id",
                (now, ids),
            ):
                rcpt = _recipient(r)
                recipients[rcpt.message_id].append(rcpt)
                if r[12]:
                    active[rcpt.message_id].add(rcpt.id)
                if rcpt.state == RecipientState.HOLD and r[13] is not None:
                    with contextlib.suppress(ValueError):
                        previous[rcpt.message_id][rcpt.id] = RecipientState(r[13])
        return [
            QueueEntry(_message(row, recipients[str(row[0])]),
                       frozenset(active[str(row[0])]), previous[str(row[0])])
            for row in rows
        ]

    def delete_messages(self, message_ids: Collection[str]) -> list[str]:
        wanted = sorted(set(message_ids))
        with self._write("delete messages") as conn:
            if not wanted:
                return []
            # Recipients before messages, as every write locks them.
            _lock_recipients_of(conn, wanted)
            # ON DELETE CASCADE removes the body chunks and the recipients.
            return sorted(
                str(r[0])
                for r in conn.execute(
                    "DELETE FROM messages WHERE id = ANY(%s::text[]) RETURNING id", (wanted,)
                )
            )

    def hold_messages(self, message_ids: Collection[str]) -> dict[str, int]:
        wanted = sorted(set(message_ids))
        now = self._clock()
        with self._write("hold messages") as conn:
            found = _existing(conn, wanted)
            result = dict.fromkeys(found, 0)
            if not found:
                return result
            for message_id, state in _lock_recipients_of(conn, found):
                if state != HOLD and message_id in result:
                    result[message_id] += 1
            conn.execute(
                "INSERT INTO recipient_holds (recipient_id, previous_state)"
                " SELECT id, state FROM recipients WHERE message_id = ANY(%s::text[])"
                " AND state <> %s"
                " ON CONFLICT (recipient_id) DO UPDATE"
                " SET previous_state = EXCLUDED.previous_state",
                (found, HOLD),
            )
            conn.execute(
                "UPDATE recipients SET state = %s, updated_at = %s"
                " WHERE message_id = ANY(%s::text[]) AND state <> %s",
                (HOLD, now, found, HOLD),
            )
        return result

    def release_messages(self, message_ids: Collection[str]) -> dict[str, int]:
        wanted = sorted(set(message_ids))
        now = self._clock()
        with self._write("release messages") as conn:
            found = _existing(conn, wanted)
            result = dict.fromkeys(found, 0)
            if not found:
                return result
            for message_id, state in _lock_recipients_of(conn, found):
                if state == HOLD and message_id in result:
                    result[message_id] += 1
            conn.execute(
                "UPDATE recipients SET updated_at = %s, state = COALESCE("
                " (SELECT h.previous_state FROM recipient_holds h"
                "  WHERE h.recipient_id = recipients.id),"
                " CASE WHEN EXISTS (SELECT 1 FROM domains d WHERE d.name = recipients.domain)"
                " THEN %s ELSE %s END)"
                " WHERE message_id = ANY(%s::text[]) AND state = %s",
                (now, HELD, OUTBOUND, found, HOLD),
            )
            conn.execute(
                "DELETE FROM recipient_holds WHERE recipient_id IN"
                " (SELECT id FROM recipients WHERE message_id = ANY(%s::text[]) AND state <> %s)",
                (found, HOLD),
            )
        return result

    def retry_outbound(
        self, now: float, *, message_ids: Collection[str] | None = None,
        domain: str | None = None
    ) -> dict[str, int]:
        # Not claimed by a runner right now: no claim, an expired one, or one
        # of a dead holder (whose claim ends here).
        scope = ("state = %s AND (claimed_until IS NULL OR claimed_until <= %s"
                 f" OR NOT {self._live('claim_holder')})")
        params: list[Any] = [OUTBOUND, now]
        if domain is not None:
            scope += " AND domain = %s"
            params.append(domain)
        result: dict[str, int] = {}
        with self._write("retry outbound") as conn:
            if message_ids is not None:
                found = _existing(conn, sorted(set(message_ids)))
                result = dict.fromkeys(found, 0)
                if not found:
                    return result
                scope += " AND message_id = ANY(%s::text[])"
                params.append(found)
            for (message_id,) in conn.execute(
                "UPDATE recipients r SET next_attempt_at = %s, updated_at = %s,"
                " claimed_by = CASE WHEN r.claimed_until > %s THEN NULL ELSE r.claimed_by END,"
                " claim_holder = CASE WHEN r.claimed_until > %s THEN NULL"
                " ELSE r.claim_holder END,"
                " claimed_until = CASE WHEN r.claimed_until > %s THEN NULL"
                " ELSE r.claimed_until END"
                f" FROM (SELECT id FROM recipients WHERE {scope} ORDER BY id FOR UPDATE) l"
                " WHERE r.id = l.id RETURNING r.message_id",
                (now, now, now, now, now, *params),
            ).fetchall():
                result[str(message_id)] = result.get(str(message_id), 0) + 1
        return result

    def requeue_messages(self, message_ids: Collection[str], now: float) -> dict[str, Requeued]:
        wanted = sorted(set(message_ids))
        hosted = "EXISTS (SELECT 1 FROM domains d WHERE d.name = r.domain)"
        # Not claimed by a runner right now (as in retry_outbound).
        unclaimed = (f"(r.claimed_until IS NULL OR r.claimed_until <= %s"
                     f" OR NOT {self._live('r.claim_holder')})")
        with self._write("requeue messages") as conn:
            found = _existing(conn, wanted)
            counts = {mid: {"to_outbound": 0, "to_held": 0, "on_hold": 0} for mid in found}
            if not found:
                return {}
            _lock_recipients_of(conn, found)  # in id order, as every writer does
            for key, sql, params in (
                ("to_outbound",
                 "UPDATE recipients r SET state = %s, next_attempt_at = %s, updated_at = %s,"
                 " claimed_by = NULL, claimed_until = NULL, claim_holder = NULL"
                 f" WHERE r.message_id = ANY(%s::text[]) AND r.state = %s AND NOT {hosted}"
                 " RETURNING r.message_id",
                 (OUTBOUND, now, now, found, HELD)),
                ("to_held",
                 "UPDATE recipients r SET state = %s, next_attempt_at = NULL, updated_at = %s,"
                 " claimed_by = NULL, claimed_until = NULL, claim_holder = NULL"
                 f" WHERE r.message_id = ANY(%s::text[]) AND r.state = %s AND {hosted}"
                 f" AND {unclaimed} RETURNING r.message_id",
                 (HELD, now, found, OUTBOUND, now)),
                # On hold: correct the state that release restores.
                ("on_hold",
                 "UPDATE recipient_holds h SET previous_state = CASE h.previous_state"
                 " WHEN %s THEN %s ELSE %s END FROM recipients r"
                 " WHERE r.id = h.recipient_id AND r.message_id = ANY(%s::text[])"
                 f" AND r.state = %s AND ((h.previous_state = %s AND NOT {hosted})"
                 f" OR (h.previous_state = %s AND {hosted})) RETURNING r.message_id",
                 (HELD, OUTBOUND, HELD, found, HOLD, HELD, OUTBOUND)),
            ):
                for (message_id,) in conn.execute(sql, params).fetchall():
                    counts[str(message_id)][key] += 1
        return {mid: Requeued(**c) for mid, c in counts.items()}

    def queue_shape(self, now: float, age_limits: Sequence[float]) -> QueueShape:
        with self._read("queue shape") as conn:
            return _queue_shape(conn, now, age_limits)

    def live_nodes(self) -> list[NodeStatus]:
        rows = self._query(
            "live nodes",
            f"SELECT node, count(*), min(started_at), {_DB_NOW} - max(heartbeat_at)"
            f" FROM holders WHERE heartbeat_at > {_DB_NOW} - %s GROUP BY node ORDER BY node",
            (self._node_timeout,))
        return [NodeStatus(str(r[0]), int(r[1]), float(r[2]), max(0.0, float(r[3])))
                for r in rows]

    def queue_summary(self) -> list[tuple[str, int, int, float | None]]:
        with self._read("queue summary", snapshot=False) as conn:
            rows = {
                str(r[0]): (int(r[1]), int(r[2] or 0), r[3])
                for r in conn.execute(
                    # Index-only (recipients_state, schema 4): each (state, message) once.
                    "SELECT state, count(*), sum(size), min(received_at) FROM"
                    " (SELECT DISTINCT state, message_id, message_size AS size,"
                    " message_received_at AS received_at FROM recipients) AS s"
                    " GROUP BY state"
                )
            }
        return [(str(state), *rows.get(str(state), (0, 0, None))) for state in RecipientState]
