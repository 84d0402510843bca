"""Outcomes, outbound claims and leases of the PostgreSQL engine (see `fermoposta.store.base`).

Contract: `PostgresOutbound` is a mixin of `PostgresStore` and uses only its
transactions (`_read`, `_write`), clock, holder (`_holder`, its liveness SQL
`_live`) and its `_enqueue` (a DSN is queued in the transaction of the outcome
that causes it) and `_messages_of`.  Rows that several nodes may touch are
locked in a fixed order (recipients by id, then messages by id), so
concurrent outcomes neither deadlock nor leave a message without recipients.
- Leases: free when expired (injected clock), when their holder is dead, or
  when held by the same owner; taken all-or-nothing by one INSERT ... ON
  CONFLICT DO UPDATE ... WHERE <free> RETURNING in domain order, rolled
  back unless every domain was taken, so two nodes racing for overlapping
  sets never both succeed.  `held_older_than` leaves out domains leased now
  by a live holder (at most `MAX_DOMAINS` domains per call).
- Outbound claims: `claim_due_outbound` takes recipients with SELECT ...
  FOR UPDATE SKIP LOCKED (first the claims of dead holders, then the due
  ones in the order of SQLite's engine) and records the owner, expiry and
  this store's holder (`claim_holder`) in the same transaction, so two nodes
  never claim one recipient.  A claim of a dead holder is free at once.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import IO, Any

import psycopg

from fermoposta.store.base import NewMessage, QueuedMessage
from fermoposta.store.pg_rows import (
    _LOCK_RECIPIENTS,
    _RECORD_ATRN,
    HELD,
    OUTBOUND,
    Conn,
    EnginePart,
    _ids,
)

MAX_DOMAINS = 500  # held_older_than's bound (the SQLite engine's batch size)


class PostgresOutbound(EnginePart):
    """Outcomes, the outbound queue and leases: a part of `PostgresStore`."""

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

    def acquire_leases(self, domains: Collection[str], owner: str, ttl: float, *,
                       atrn_by: tuple[str, float] | None = None,
                       durable: bool = True) -> bool:
        wanted = sorted(set(domains))
        with self._write("acquire leases", durable=durable) as conn:
            if not wanted:
                if atrn_by is not None:
                    conn.execute(_RECORD_ATRN, (atrn_by[1], atrn_by[0]))
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
            if atrn_by is not None:
                conn.execute(_RECORD_ATRN, (atrn_by[1], atrn_by[0]))
            return True
        return False

    def renew_leases(self, owner: str, ttl: float) -> None:
        with self._write("renew leases") as conn:
            conn.execute("UPDATE leases SET expires_at = %s WHERE owner = %s",
                         (self._clock() + ttl, owner))

    def release_leases(self, owner: str) -> None:
        with self._write("release leases") as conn:
            conn.execute("DELETE FROM leases WHERE owner = %s", (owner,))
