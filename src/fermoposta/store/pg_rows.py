"""Rows of the PostgreSQL engine: column lists, row -> dataclass, state names.

Contract: shared by `postgres.py` and its mixins (`pg_tools.py`,
`pg_directory.py`) so that each reads and writes the same columns in the
same order; pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from fermoposta.store.base import MessageOrigin, QueuedMessage, QueuedRecipient, RecipientState

Conn = psycopg.Connection[TupleRow]

HELD = str(RecipientState.HELD)
OUTBOUND = str(RecipientState.OUTBOUND)
HOLD = str(RecipientState.HOLD)

# The database's clock, in Unix seconds: heartbeats are written and compared with it.
_DB_NOW = "extract(epoch FROM clock_timestamp())::float8"

_RECIPIENT_COLUMNS = (
    "id, message_id, address, domain, state, attempts, last_reply, notify, orcpt,"
    " next_attempt_at, first_failure_at, delay_notified"
)
_R_RECIPIENT_COLUMNS = ", ".join("r." + c.strip() for c in _RECIPIENT_COLUMNS.split(","))
_MESSAGE_COLUMNS = (
    "id, sender, received_at, size, origin, smtputf8, body_8bit, envid, ret, client, node"
)
_M_MESSAGE_COLUMNS = ", ".join("m." + c.strip() for c in _MESSAGE_COLUMNS.split(","))
# Lock recipient rows in id order (as every write does): no deadlock between
# two transactions on overlapping sets.
_LOCK_RECIPIENTS = "SELECT id FROM recipients WHERE id = ANY(%s::bigint[]) ORDER BY id FOR UPDATE"


def _recipient(r: Sequence[Any]) -> QueuedRecipient:
    return QueuedRecipient(
        id=int(r[0]),
        message_id=r[1],
        address=r[2],
        domain=r[3],
        state=RecipientState(r[4]),
        attempts=int(r[5]),
        last_reply=r[6],
        notify=r[7],
        orcpt=r[8],
        next_attempt_at=r[9],
        first_failure_at=r[10],
        delay_notified=bool(r[11]),
    )


def _message(row: Sequence[Any], recipients: Sequence[QueuedRecipient]) -> QueuedMessage:
    return QueuedMessage(
        id=row[0],
        sender=row[1],
        received_at=row[2],
        size=int(row[3]),
        origin=MessageOrigin(row[4]),
        smtputf8=bool(row[5]),
        body_8bit=bool(row[6]),
        envid=row[7],
        ret=row[8],
        client=row[9],
        recipients=tuple(recipients),
        node=row[10],
    )


def _ids(recipient_ids: Collection[int]) -> list[int]:
    return sorted({int(i) for i in recipient_ids})
