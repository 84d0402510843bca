"""Outcomes, outbound claims and leases of the SQLite engine (see `fermoposta.store.base`).

Contract: `SQLiteOutbound` is a mixin of `SQLiteStore` and uses only its
transactions (`_read`, `_write`), clock, lease holders (`_holders`, lock files
of `store.holders`) and its `_enqueue` (a DSN is queued in the transaction of
the outcome that causes it) and `_messages_of`.  Every call is one
transaction (an IMMEDIATE one for writes); statements are batched to at most
`_BATCH` parameters.
- Outcomes: a delivered or failed recipient leaves the queue (and its message
  with its last recipient); a deferred one counts an attempt and is due again
  at `next_attempt_at`.
- Outbound claims: "what is due" is one index range, `recipients_due` on
  `(state, COALESCE(next_attempt_at, 0))`.  A claim also moves
  `next_attempt_at` to the claim's expiry, so claimed recipients leave the
  due range and an expired claim (a crashed runner) makes them due again; a
  claim whose holder process died is free at once, and its recipients come
  first.
- Leases: a lease names the process that holds it; a lease whose holder is
  dead is taken over at once, so a provider killed mid-drain blocks its
  domains for no time; a live holder's lease is busy until it expires.
  `held_older_than` leaves out domains leased now.  Held-mail expiry scans
  `messages_received` (received_at) from the oldest.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import IO, TYPE_CHECKING, Any

from fermoposta.store.base import NewMessage, QueuedMessage, RecipientState
from fermoposta.store.holders import Holders
from fermoposta.store.sqlite_rows import _BATCH, _RECORD_ATRN, _batches, _marks


class SQLiteOutbound:
    """Outcomes, the outbound queue and leases: a part of `SQLiteStore`."""

    _clock: Callable[[], float]
    _holders: Holders

    if TYPE_CHECKING:  # provided by SQLiteStore
        def _read(self) -> AbstractContextManager[sqlite3.Connection]: ...

        def _write(self, *, durable: bool = True
                   ) -> AbstractContextManager[sqlite3.Connection]: ...

        def _enqueue(self, conn: sqlite3.Connection, message: NewMessage, body: IO[bytes],
                     queue_id: str | None = None) -> str: ...

        @staticmethod
        def _messages_of(conn: sqlite3.Connection, recipient_ids: Sequence[int]
                         ) -> list[QueuedMessage]: ...

    # --- outcomes ------------------------------------------------------------------------

    def record_delivered(self, recipient_ids: Collection[int], reply: str,
                         dsn: tuple[NewMessage, IO[bytes]] | None = None) -> str | None:
        with self._write() as conn:
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
        ids = sorted(set(recipient_ids))
        with self._write() as conn:
            if isinstance(next_attempt_at, Mapping):
                conn.executemany(
                    "UPDATE recipients SET attempts = attempts + 1, last_reply = ?,"
                    " updated_at = ?, first_failure_at = COALESCE(first_failure_at, ?),"
                    " next_attempt_at = ?, claimed_by = NULL, claimed_until = NULL"
                    " WHERE id = ?",
                    [(reply, now, now, next_attempt_at.get(rid), rid) for rid in ids],
                )
                return
            for batch in _batches(ids):
                conn.execute(
                    "UPDATE recipients SET attempts = attempts + 1, last_reply = ?,"
                    " updated_at = ?, first_failure_at = COALESCE(first_failure_at, ?),"
                    " next_attempt_at = ?, claimed_by = NULL, claimed_until = NULL"
                    f" WHERE id IN ({_marks(len(batch))})",
                    (reply, now, now, next_attempt_at, *batch),
                )

    def record_failed(
        self,
        recipient_ids: Collection[int],
        reply: str,
        dsn: tuple[NewMessage, IO[bytes]] | None,
    ) -> str | None:
        with self._write() as conn:
            removed = self._remove_recipients(conn, recipient_ids)
            if dsn is None or not removed:
                return None
            return self._enqueue(conn, dsn[0], dsn[1])

    def _remove_recipients(self, conn: sqlite3.Connection, recipient_ids: Collection[int]) -> int:
        """Delete the recipients (and messages left without any); return how many were."""
        ids = sorted(set(recipient_ids))
        touched: set[str] = set()
        removed = 0
        for batch in _batches(ids):
            marks = _marks(len(batch))
            touched.update(
                r[0]
                for r in conn.execute(
                    f"SELECT DISTINCT message_id FROM recipients WHERE id IN ({marks})", batch
                )
            )
            removed += conn.execute(f"DELETE FROM recipients WHERE id IN ({marks})", batch).rowcount
        for ids_batch in _batches(sorted(touched)):
            conn.execute(
                f"DELETE FROM messages WHERE id IN ({_marks(len(ids_batch))}) AND NOT EXISTS"
                " (SELECT 1 FROM recipients WHERE recipients.message_id = messages.id)",
                ids_batch,
            )
        return removed

    # --- outbound queue ------------------------------------------------------------------

    def claim_due_outbound(
        self, now: float, limit: int, owner: str, ttl: float
    ) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        until = now + ttl
        holder = self._holders.me()
        with self._write() as conn:
            # Claims of a runner whose process died (kill -9) are free now,
            # not when they expire: their recipients come first.
            dead = [h for h in self._claim_holders(conn, now) if not self._holders.is_alive(h)]
            ids: list[int] = []
            for batch in _batches(dead):
                ids += [
                    int(r[0])
                    for r in conn.execute(
                        "SELECT id FROM recipients WHERE claimed_by IS NOT NULL"
                        f" AND claimed_until > ? AND claim_holder IN ({_marks(len(batch))})"
                        " AND state = ? ORDER BY id LIMIT ?",
                        (now, *batch, str(RecipientState.OUTBOUND), limit - len(ids)),
                    )
                ]
                if len(ids) >= limit:
                    break
            if len(ids) < limit:
                ids += [
                    int(r[0])
                    for r in conn.execute(
                        "SELECT id FROM recipients WHERE state = ?"
                        " AND COALESCE(next_attempt_at, 0) <= ?"
                        " AND (claimed_until IS NULL OR claimed_until <= ?)"
                        " ORDER BY COALESCE(next_attempt_at, 0), id LIMIT ?",
                        (str(RecipientState.OUTBOUND), now, now, limit - len(ids)),
                    )
                ]
            for batch_ids in _batches(ids):
                conn.execute(
                    "UPDATE recipients SET claimed_by = ?, claimed_until = ?, next_attempt_at = ?,"
                    f" claim_holder = ? WHERE id IN ({_marks(len(batch_ids))})",
                    (owner, until, until, holder, *batch_ids),
                )
            return self._messages_of(conn, ids)

    @staticmethod
    def _claim_holders(conn: sqlite3.Connection, now: float) -> list[str]:
        """Holders of unexpired claims (an index range on `recipients_claimed_by`)."""
        return [
            str(r[0])
            for r in conn.execute(
                "SELECT DISTINCT claim_holder FROM recipients WHERE claimed_by IS NOT NULL"
                " AND claimed_until > ? AND claim_holder IS NOT NULL",
                (now,),
            )
        ]

    def renew_claims(self, owner: str, now: float, ttl: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE recipients SET claimed_until = ?, next_attempt_at = ?"
                " WHERE claimed_by = ?",
                (now + ttl, now + ttl, owner),
            )

    def release_claims(self, owner: str, recipient_ids: Collection[int] | None = None,
                       next_attempt_at: float | None = None) -> None:
        with self._write() as conn:
            if recipient_ids is None:
                conn.execute(
                    "UPDATE recipients SET claimed_by = NULL, claimed_until = NULL,"
                    " next_attempt_at = ? WHERE claimed_by = ?",
                    (next_attempt_at, owner),
                )
                return
            for batch in _batches(sorted(set(recipient_ids))):
                conn.execute(
                    "UPDATE recipients SET claimed_by = NULL, claimed_until = NULL,"
                    f" next_attempt_at = ? WHERE claimed_by = ? AND id IN ({_marks(len(batch))})",
                    (next_attempt_at, owner, *batch),
                )

    def mark_delay_notified(
        self, recipient_ids: Collection[int], dsn: tuple[NewMessage, IO[bytes]] | None = None
    ) -> str | None:
        with self._write() as conn:
            marked = 0
            for batch in _batches(sorted(set(recipient_ids))):
                marked += conn.execute(
                    "UPDATE recipients SET delay_notified = 1"
                    f" WHERE id IN ({_marks(len(batch))}) AND delay_notified = 0",
                    batch,
                ).rowcount
            if dsn is None or not marked:
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
            return []
        if domains is not None and len(set(domains)) > _BATCH:
            raise ValueError(f"held_older_than: at most {_BATCH} domains at once")
        sql = (
            "SELECT r.id FROM messages m JOIN recipients r ON r.message_id = m.id"
            " WHERE m.received_at < ? AND r.state = ?"
            " AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.domain = r.domain"
            " AND l.expires_at > ?)"
        )
        params: list[Any] = [cutoff, str(RecipientState.HELD), self._clock()]
        if domains is not None:
            wanted = sorted(set(domains))
            sql += f" AND r.domain IN ({_marks(len(wanted))})"
            params += wanted
        if default_lifetime_only:
            sql += (" AND r.domain NOT IN"
                    " (SELECT name FROM domains WHERE hold_lifetime IS NOT NULL)")
        if delay_notified is not None:
            sql += " AND r.delay_notified = ?"
            params.append(int(delay_notified))
        sql += " ORDER BY m.received_at, r.id LIMIT ?"
        params.append(limit)
        with self._read() as conn:
            ids = [int(r[0]) for r in conn.execute(sql, params)]
            return self._messages_of(conn, ids)

    def outbound_older_than(self, cutoff: float, limit: int) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        with self._read() as conn:
            ids = [
                int(r[0])
                for r in conn.execute(
                    "SELECT r.id FROM messages m JOIN recipients r ON r.message_id = m.id"
                    " WHERE m.received_at < ? AND r.state = ?"
                    " ORDER BY m.received_at, r.id LIMIT ?",
                    (cutoff, str(RecipientState.OUTBOUND), limit),
                )
            ]
            return self._messages_of(conn, ids)

    # --- leases --------------------------------------------------------------------------

    def acquire_leases(self, domains: Collection[str], owner: str, ttl: float, *,
                       atrn_by: tuple[str, float] | None = None,
                       durable: bool = True) -> bool:
        wanted = sorted(set(domains))
        # Our lock file exists (and is locked) before our name is in a row.
        holder = self._holders.me()
        with self._write(durable=durable) as conn:
            now = self._clock()
            for batch in _batches(wanted):
                live = conn.execute(
                    f"SELECT DISTINCT holder FROM leases WHERE domain IN ({_marks(len(batch))})"
                    " AND owner != ? AND expires_at > ?",
                    (*batch, owner, now),
                ).fetchall()
                # A lease of a process that died (kill -9, OOM, power) is
                # free now, not when it expires; one of a live process, or
                # of a row without a holder, is busy until it expires.
                if any(not row[0] or self._holders.is_alive(str(row[0])) for row in live):
                    return False  # nothing written yet: the commit is empty
            conn.executemany(
                "INSERT INTO leases (domain, owner, expires_at, holder) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(domain) DO UPDATE SET owner = excluded.owner,"
                " expires_at = excluded.expires_at, holder = excluded.holder",
                [(d, owner, now + ttl, holder) for d in wanted],
            )
            if atrn_by is not None:
                conn.execute(_RECORD_ATRN, (atrn_by[1], atrn_by[0]))
        return True

    def renew_leases(self, owner: str, ttl: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE leases SET expires_at = ? WHERE owner = ?", (self._clock() + ttl, owner)
            )

    def release_leases(self, owner: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE owner = ?", (owner,))
