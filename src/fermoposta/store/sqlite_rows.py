"""Rows of the SQLite engine: column lists, row -> dataclass, batching.

Contract: shared by `sqlite.py` and its mixins (`sqlite_tools.py`,
`sqlite_directory.py`) so that each reads the same columns in the same
order; pure functions, no I/O.  `_batches` bounds the parameters of one
statement (`_BATCH`; old SQLite builds allow 999).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from fermoposta.store.base import MessageOrigin, QueuedMessage, QueuedRecipient, RecipientState

_BATCH = 500  # bound on SQL parameters per statement (old SQLite: 999)

_T = TypeVar("_T")

_RECIPIENT_COLUMNS = (
    "id, message_id, address, domain, state, attempts, last_reply, notify, orcpt,"
    " next_attempt_at, first_failure_at, delay_notified"
)
_DOMAIN_COLUMNS = "name, account, max_messages, max_bytes, validate, hold_lifetime"
_MESSAGE_COLUMNS = (
    "id, sender, received_at, size, origin, smtputf8, body_8bit, envid, ret, client, node"
)


def _batches(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _BATCH):
        yield items[start : start + _BATCH]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _recipient(r: Any) -> QueuedRecipient:
    return QueuedRecipient(
        id=r[0],
        message_id=r[1],
        address=r[2],
        domain=r[3],
        state=RecipientState(r[4]),
        attempts=r[5],
        last_reply=r[6],
        notify=r[7],
        orcpt=r[8],
        next_attempt_at=r[9],
        first_failure_at=r[10],
        delay_notified=bool(r[11]),
    )


def _message(row: Any, recipients: Sequence[QueuedRecipient]) -> QueuedMessage:
    return QueuedMessage(
        id=row[0],
        sender=row[1],
        received_at=row[2],
        size=row[3],
        origin=MessageOrigin(row[4]),
        smtputf8=bool(row[5]),
        body_8bit=bool(row[6]),
        envid=row[7],
        ret=row[8],
        client=row[9],
        recipients=tuple(recipients),
        node=row[10],
    )
