"""The queue and account store.

Contract: `open_store(data_dir, url=...)` is the one place that chooses an
engine: an empty `url` opens (creating it if needed) the SQLite store
`<data_dir>/fermoposta.sqlite3`, ``sqlite://PATH`` a SQLite file, and
``postgresql://...`` (or ``postgres://``) the PostgreSQL engine (imported only
then).  It returns the engine typed as the `Store` Protocol.  The interface
and its data types are those of `fermoposta.store.base`, re-exported here;
`open_spool(path)` opens a customer-side spool (always a SQLite file);
`redact_url` removes a password from a URL for logs and messages.  See the
modules for their contracts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from fermoposta.store.base import (
    CHUNK_SIZE,
    Account,
    AdminStore,
    Directory,
    Domain,
    HoldQueue,
    HostedMail,
    Importer,
    MessageOrigin,
    MessageQueue,
    NewMessage,
    NewRecipient,
    OutboundMail,
    OutboundQueue,
    QueuedMessage,
    QueuedRecipient,
    QueueTools,
    RateCounter,
    RecipientState,
    SchemaTooNew,
    ScramSecret,
    Spool,
    Store,
    StoreError,
)
from fermoposta.store.sqlite import SQLiteStore

STORE_FILENAME = "fermoposta.sqlite3"

__all__ = [
    "CHUNK_SIZE",
    "STORE_FILENAME",
    "Account",
    "AdminStore",
    "Directory",
    "Domain",
    "HoldQueue",
    "HostedMail",
    "Importer",
    "MessageOrigin",
    "MessageQueue",
    "NewMessage",
    "NewRecipient",
    "OutboundMail",
    "OutboundQueue",
    "QueueTools",
    "QueuedMessage",
    "QueuedRecipient",
    "RateCounter",
    "RecipientState",
    "SQLiteStore",
    "SchemaTooNew",
    "ScramSecret",
    "Spool",
    "Store",
    "StoreError",
    "open_spool",
    "open_store",
    "redact_url",
]


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(
    data_dir: str | os.PathLike[str],
    *,
    url: str = "",
    node: str | None = None,
    password: str | None = None,
    pool_size: int = 10,
    node_timeout: float = 15.0,
    clock: Callable[[], float] = time.time,
    presize_wal: bool = False,
) -> Store:
    """Open the store `url` names (see the module docstring), creating its
    schema or bringing it up to date.  Raises `StoreError`.  `presize_wal`:
    a SQLite store's WAL is made at its full size first (`SQLiteStore`)."""
    if url.startswith(POSTGRES_SCHEMES):
        from fermoposta.store.postgres import PostgresStore

        if password:
            url = _with_password(url, password)
        return PostgresStore(url, node=node or None, clock=clock, pool_size=pool_size,
                             node_timeout=node_timeout)
    if url.startswith("sqlite://"):
        return SQLiteStore(Path(url[len("sqlite://"):]), clock, node=node or None,
                           presize_wal=presize_wal)
    if url:
        raise StoreError(f"unknown store url {redact_url(url)!r}: expected sqlite:// or "
                         "postgresql://")
    return SQLiteStore(Path(data_dir) / STORE_FILENAME, clock, node=node or None,
                       presize_wal=presize_wal)


def open_spool(path: str | os.PathLike[str]) -> Spool:
    """Open (creating it if needed) a customer-side spool: a SQLite file."""
    return SQLiteStore(path)


def _with_password(url: str, password: str) -> str:
    """`url` with `password` in its query (libpq's ``password`` parameter):
    psycopg reads it from there, no environment variable (visible in /proc)
    carries it, and multi-host URLs (``host1,host2``) keep working."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k != "password"]
    query.append(("password", password))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


def redact_url(url: str) -> str:
    """`url` with any password (in its user part or its query) replaced by
    ``***``, for logs and messages."""
    try:
        parts = urlsplit(url)
        userinfo, at, hosts = parts.netloc.rpartition("@")
        netloc = parts.netloc
        if at and ":" in userinfo:
            netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(k == "password" for k, _ in query):
            query = [(k, "***" if k == "password" else v) for k, v in query]
            return urlunsplit(parts._replace(netloc=netloc,
                                             query=urlencode(query, safe="*")))
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable url>"
