"""ETRN (RFC 1985) in the SQLite engine: `etrn_domains`, `start_etrn` and
`return_to_held` (see `fermoposta.store.base`).

Contract: `SQLiteEtrn` is a mixin of `SQLiteStore` and uses only its
transactions (`_read`, `_write`) and clock.  `start_etrn` is one IMMEDIATE
transaction, so a recipient it moves is never claimed half-way; domains
leased right now (an ATRN session draining them) are left alone.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from fermoposta.store.base import EtrnStarted, RecipientState
from fermoposta.store.sqlite_rows import _BATCH, _batches, _marks


class SQLiteEtrn:
    """The ETRN part of `SQLiteStore`."""

    _clock: Callable[[], float]

    if TYPE_CHECKING:  # provided by SQLiteStore
        def _read(self) -> AbstractContextManager[sqlite3.Connection]: ...

        def _write(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def etrn_domains(self, name: str, *, subdomains: bool = False) -> list[str]:
        suffix = "." + name
        with self._read() as conn:
            if subdomains:
                rows = conn.execute(
                    "SELECT name FROM domains WHERE etrn IS NOT NULL"
                    " AND (name = ? OR substr(name, -?) = ?) ORDER BY name",
                    (name, len(suffix), suffix)).fetchall()
            else:
                rows = conn.execute("SELECT name FROM domains WHERE etrn IS NOT NULL"
                                    " AND name = ?", (name,)).fetchall()
        return [str(r[0]) for r in rows]

    def start_etrn(self, domains: Collection[str], now: float) -> EtrnStarted:
        wanted = sorted(set(domains))
        if len(wanted) > _BATCH:
            raise ValueError(f"start_etrn: at most {_BATCH} domains at once")
        if not wanted:
            return EtrnStarted()
        held, outbound = str(RecipientState.HELD), str(RecipientState.OUTBOUND)
        with self._write() as conn:
            marks = _marks(len(wanted))
            busy = sorted(str(r[0]) for r in conn.execute(
                f"SELECT domain FROM leases WHERE domain IN ({marks}) AND expires_at > ?",
                (*wanted, now)))
            free = [d for d in wanted if d not in busy]
            if not free:
                return EtrnStarted(busy=tuple(busy))
            marks = _marks(len(free))
            # HELD, or OUTBOUND and not claimed: `state IN` lets the plan seek
            # each (domain, state) range; inside an OR it would read the domain.
            found = conn.execute(
                "SELECT id, message_id FROM recipients"
                f" WHERE domain IN ({marks}) AND state IN (?, ?)"
                " AND (state = ? OR claimed_until IS NULL OR claimed_until <= ?)",
                (*free, held, outbound, held, now)).fetchall()
            ids = [int(r[0]) for r in found]
            for batch in _batches(ids):
                conn.execute(
                    "UPDATE recipients SET state = ?, next_attempt_at = ?, updated_at = ?,"
                    " claimed_by = NULL, claimed_until = NULL, claim_holder = NULL"
                    f" WHERE id IN ({_marks(len(batch))})", (outbound, now, now, *batch))
        return EtrnStarted(messages=len({str(r[1]) for r in found}), recipients=len(ids),
                           busy=tuple(busy))

    def return_to_held(self, recipient_ids: Collection[int], reply: str) -> None:
        now = self._clock()
        ids = sorted(set(recipient_ids))
        with self._write() as conn:
            for batch in _batches(ids):
                conn.execute(
                    "UPDATE recipients SET state = ?, attempts = attempts + 1, last_reply = ?,"
                    " updated_at = ?, first_failure_at = COALESCE(first_failure_at, ?),"
                    " next_attempt_at = NULL, claimed_by = NULL, claimed_until = NULL,"
                    f" claim_holder = NULL WHERE state = ? AND id IN ({_marks(len(batch))})",
                    (str(RecipientState.HELD), reply, now, now,
                     str(RecipientState.OUTBOUND), *batch))
