"""Rows of the SQLite engine: column lists and batching.

Contract: shared by `sqlite.py` and its mixins (`sqlite_tools.py`,
`sqlite_directory.py`, `sqlite_etrn.py`, `sqlite_outbound.py`) so that each
reads the same columns in the same order (the row conversions are
`store.rows`, shared with PostgreSQL); pure functions, no I/O.  `_batches`
bounds the parameters of one statement (`_BATCH`; old SQLite builds allow
999).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from fermoposta.store.rows import (
    DOMAIN_COLUMNS,
    MESSAGE_COLUMNS,
    RECIPIENT_COLUMNS,
)

_BATCH = 500  # bound on SQL parameters per statement (old SQLite: 999)
# An account's last ATRN (time, name): `record_atrn`, and `acquire_leases`
# in the leases' own transaction.
_RECORD_ATRN = "UPDATE accounts SET last_atrn_at = ? WHERE name = ?"

_T = TypeVar("_T")

_RECIPIENT_COLUMNS = RECIPIENT_COLUMNS
_DOMAIN_COLUMNS = DOMAIN_COLUMNS
_MESSAGE_COLUMNS = MESSAGE_COLUMNS


def _batches(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _BATCH):
        yield items[start : start + _BATCH]


def _marks(n: int) -> str:
    return ",".join("?" * n)


