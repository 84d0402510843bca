"""PostgreSQL notices of held mail: LISTEN on a connection of its own.

Contract:
- `PgHeldNotices(connect)` opens a dedicated autocommit connection with
  `connect()` (configured like the pool's) and LISTENs on the channel of
  its current schema (`pg_schema.held_channel`), on which the triggers of
  schema version 3 NOTIFY the domain of every recipient that becomes HELD,
  on commit only.
- `wait(timeout)` blocks up to `timeout` seconds and returns the domains
  noticed (empty when none came); it never returns a domain whose mail is
  not committed.  A lost connection raises `StoreError` (the caller makes a
  new listener: notices sent meanwhile are lost, so it should also look
  with `domains_with_held_mail` after reconnecting).  `close()` is
  idempotent.  One thread uses a listener at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from fermoposta.store.base import StoreError
from fermoposta.store.pg_schema import held_channel

__all__ = ["PgHeldNotices"]


class PgHeldNotices:
    def __init__(self, connect: Callable[[], psycopg.Connection[Any]],
                 scrub: Callable[[str], str] = str) -> None:
        self._scrub = scrub
        try:
            self._conn = connect()
        except psycopg.Error as exc:
            raise StoreError(scrub(f"PostgreSQL store: cannot LISTEN: {exc}")) from exc
        try:
            self._conn.autocommit = True
            row = self._conn.execute("SELECT current_schema()").fetchone()
            if row is None or row[0] is None:
                raise StoreError("the PostgreSQL search_path names no existing schema")
            self.channel = held_channel(str(row[0]))
            self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except psycopg.Error as exc:
            self.close()
            raise StoreError(scrub(f"PostgreSQL store: cannot LISTEN: {exc}")) from exc

    def wait(self, timeout: float) -> set[str]:
        domains: set[str] = set()
        try:
            for notice in self._conn.notifies(timeout=max(0.0, timeout), stop_after=1):
                domains.add(notice.payload)
            if domains:
                # Take what is already here too (not nested: the generator
                # holds the connection's lock), then return at once.
                domains.update(n.payload for n in self._conn.notifies(timeout=0.0))
        except psycopg.Error as exc:
            raise StoreError(self._scrub(f"PostgreSQL store: LISTEN connection lost: {exc}")
                             ) from exc
        return domains

    def close(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
