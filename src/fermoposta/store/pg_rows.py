"""Rows of the PostgreSQL engine: qualified column lists, state names, SQL bits.

Contract: shared by `postgres.py` and its mixins (`pg_tools.py`,
`pg_directory.py`, `pg_etrn.py`, `pg_messages.py`, `pg_outbound.py`) so that
each reads and writes the same columns in the same order (the row
conversions are `store.rows`, shared with SQLite); pure functions, no I/O.
`EnginePart` is the base of the mixins: it names what they use of
`PostgresStore` (for the type checker).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from typing import IO, TYPE_CHECKING, Any

import psycopg
from psycopg.rows import TupleRow

from fermoposta.store.base import NewMessage, QueuedMessage, RecipientState, StoreError

if TYPE_CHECKING:
    from fermoposta.store.pg_domain_cache import DomainCache
from fermoposta.store.rows import (
    MESSAGE_COLUMNS,
    RECIPIENT_COLUMNS,
    qualified,
)

Conn = psycopg.Connection[TupleRow]

HELD = str(RecipientState.HELD)
OUTBOUND = str(RecipientState.OUTBOUND)
HOLD = str(RecipientState.HOLD)

# The database's clock, in Unix seconds: heartbeats are written and compared with it.
_DB_NOW = "extract(epoch FROM clock_timestamp())::float8"

_RECIPIENT_COLUMNS = RECIPIENT_COLUMNS
_R_RECIPIENT_COLUMNS = qualified(RECIPIENT_COLUMNS, "r")
_MESSAGE_COLUMNS = MESSAGE_COLUMNS
_M_MESSAGE_COLUMNS = qualified(MESSAGE_COLUMNS, "m")
# An account's last ATRN (time, name): `record_atrn`, and `acquire_leases`
# in the leases' own transaction.
_RECORD_ATRN = "UPDATE accounts SET last_atrn_at = %s WHERE name = %s"
# Lock recipient rows in id order (as every write does): no deadlock between
# two transactions on overlapping sets.
_LOCK_RECIPIENTS = "SELECT id FROM recipients WHERE id = ANY(%s::bigint[]) ORDER BY id FOR UPDATE"


class CommitUnknown(Exception):
    """A one-statement write (`PostgresStore._write_one_statement`) lost its
    connection: it may or may not have been applied; the caller finds out
    from what it wrote, once `backend_pid` (the server process that ran it;
    0: unknown) is gone."""

    def __init__(self, message: str, backend_pid: int = 0) -> None:
        super().__init__(message)
        self.backend_pid = backend_pid


def _ids(recipient_ids: Collection[int]) -> list[int]:
    return sorted({int(i) for i in recipient_ids})


class EnginePart:
    """Base of the engine's mixins: what they use of `PostgresStore`."""

    _clock: Callable[[], float]
    _node_timeout: float
    _holder: str
    _domain_cache: DomainCache

    if TYPE_CHECKING:  # provided by PostgresStore
        def _read(self, what: str, *, snapshot: bool = True
                  ) -> AbstractContextManager[Conn]: ...

        def _write(self, what: str, *, durable: bool = True
                   ) -> AbstractContextManager[Conn]: ...

        def _write_one_statement(self, what: str,
                                 statement: Callable[[Conn], psycopg.Cursor[TupleRow]]
                                 ) -> TupleRow | None: ...

        def _query(self, what: str, sql: str, params: Sequence[Any] = (), *,
                   binary: bool = False) -> list[TupleRow]: ...

        def _check_open(self) -> None: ...

        def _found_after_loss(self, pid: int, ids: list[str], now: float) -> int: ...

        def _error(self, what: str, exc: BaseException) -> StoreError: ...

        def _live(self, column: str) -> str: ...

        def _enqueue(self, conn: Conn, message: NewMessage, body: IO[bytes],
                     queue_id: str | None = None,
                     head: tuple[bytes, bytes] | None = None) -> str: ...

        @staticmethod
        def _messages_of(conn: Conn, recipient_ids: Sequence[int]
                         ) -> list[QueuedMessage]: ...
