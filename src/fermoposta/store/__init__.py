"""The queue and account store.

Contract: `open_store(data_dir)` opens (creating it if needed) the SQLite store
`<data_dir>/fermoposta.sqlite3`; the interface and its data types are those of
`fermoposta.store.base`, re-exported here.  See the modules for their contracts.
"""

from __future__ import annotations

import os
from pathlib import Path

from fermoposta.store.base import (
    CHUNK_SIZE,
    Account,
    Domain,
    MessageOrigin,
    NewMessage,
    NewRecipient,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    ScramSecret,
    Store,
    StoreError,
)
from fermoposta.store.sqlite import SQLiteStore

STORE_FILENAME = "fermoposta.sqlite3"

__all__ = [
    "CHUNK_SIZE",
    "STORE_FILENAME",
    "Account",
    "Domain",
    "MessageOrigin",
    "NewMessage",
    "NewRecipient",
    "QueuedMessage",
    "QueuedRecipient",
    "RecipientState",
    "SQLiteStore",
    "ScramSecret",
    "Store",
    "StoreError",
    "open_store",
]


def open_store(data_dir: str | os.PathLike[str]) -> SQLiteStore:
    """Open `<data_dir>/fermoposta.sqlite3`, creating the directory and schema."""
    return SQLiteStore(Path(data_dir) / STORE_FILENAME)
