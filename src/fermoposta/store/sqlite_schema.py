"""The schema of the SQLite store engine and its migrations.

Contract:
- `SCHEMA_VERSION` is the version this code writes and reads; the file keeps
  its own in `PRAGMA user_version` (0: a new, empty file).
- `migrate(conn, path)` brings the file up to `SCHEMA_VERSION` and returns
  the version it found.  A new file gets the whole schema (`_SCHEMA`); an
  older one runs the steps of `_MIGRATIONS` up to `SCHEMA_VERSION`, in one
  `BEGIN IMMEDIATE` transaction (the version is re-read under the write
  lock: another process may have just done it), rolled back on any error.
  A file written by a newer version raises `SchemaTooNew` naming both, and
  nothing is changed.
- `_MIGRATIONS[n]` are the statements that bring version n-1 to n (version
  2 added `account_cert_subjects`; version 3 the outbound retry schedule and
  claims of recipients, and the per-domain hold lifetime; version 4
  `recipient_holds`; version 5 the `holder` of a lease; version 7 the ETRN
  target of a domain; version 8 an account's ATRN wait; version 9 each
  recipient's copy of its message's arrival and size, and the indexes
  that answer `queue stats` from them; version 10 the messages'
  `wire_ready`).  A later change
  adds a step, never edits one that has shipped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from fermoposta.store.base import SchemaTooNew

SCHEMA_VERSION = 10


# Version 2: subject bindings of client certificates.
_ACCOUNT_CERT_SUBJECTS = """
CREATE TABLE IF NOT EXISTS account_cert_subjects (
    subject TEXT PRIMARY KEY,  -- canonical RFC 4514 string (certificate_subject)
    account TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS account_cert_subjects_account ON account_cert_subjects(account);
"""

# Version 3: outbound retry schedule and claims; per-domain hold lifetime.
_OUTBOUND_INDEXES = """
CREATE INDEX IF NOT EXISTS recipients_due
    ON recipients(state, COALESCE(next_attempt_at, 0));
CREATE INDEX IF NOT EXISTS recipients_claimed_by
    ON recipients(claimed_by) WHERE claimed_by IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_received ON messages(received_at);
"""
_V3 = """
ALTER TABLE recipients ADD COLUMN next_attempt_at REAL;
ALTER TABLE recipients ADD COLUMN first_failure_at REAL;
ALTER TABLE recipients ADD COLUMN delay_notified INTEGER NOT NULL DEFAULT 0;
ALTER TABLE recipients ADD COLUMN claimed_by TEXT;
ALTER TABLE recipients ADD COLUMN claimed_until REAL;
ALTER TABLE domains ADD COLUMN hold_lifetime REAL;
""" + _OUTBOUND_INDEXES

# The whole schema, for a new file.
# The state a recipient had before an operator hold (`queue hold`), so that
# `queue release` restores it exactly.  Deleting the recipient deletes it.
_RECIPIENT_HOLDS = """
CREATE TABLE IF NOT EXISTS recipient_holds (
    recipient_id INTEGER PRIMARY KEY REFERENCES recipients(id) ON DELETE CASCADE,
    previous_state TEXT NOT NULL
);
"""

# Version 6: windowed rate events (per-account submission rates), shared
# by every process on the file.
_RATE_EVENTS = """
CREATE TABLE IF NOT EXISTS rate_events (
    key TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rate_events_key_at ON rate_events(key, at);
"""

# Version 9: the indexes that answer `queue stats` and the metrics without
# reading a table (issue 10).  `recipients_domain` replaces
# `recipients_domain_state` and keeps its (domain, state) prefix, so ATRN,
# quotas and ETRN still seek straight to a domain's mail in one state; the
# (arrival, message, size) after it make a domain's age buckets range counts
# and its distinct messages a DISTINCT over the index alone.
# `recipients_state` carries what a message contributes per state.
_SHAPE_INDEXES = """
CREATE INDEX IF NOT EXISTS recipients_domain ON recipients(
    domain, state, message_received_at, message_id, message_size);
CREATE INDEX IF NOT EXISTS recipients_state
    ON recipients(state, message_id, message_size, message_received_at);
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    received_at REAL NOT NULL,
    size INTEGER NOT NULL,
    origin TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL,
    body_8bit INTEGER NOT NULL,
    envid TEXT,
    ret TEXT,
    client TEXT NOT NULL,
    node TEXT NOT NULL DEFAULT '',  -- the node that accepted it
    wire_ready INTEGER NOT NULL DEFAULT 0  -- the body goes out as stored (QueuedMessage)
);
CREATE TABLE IF NOT EXISTS body_chunks (
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (message_id, seq)
);
CREATE TABLE IF NOT EXISTS recipients (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: callers hold ids across calls
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_reply TEXT,
    notify TEXT,
    orcpt TEXT,
    updated_at REAL NOT NULL,
    next_attempt_at REAL,  -- OUTBOUND: due again at (NULL = now), or a claim's expiry
    first_failure_at REAL,
    delay_notified INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT,  -- the queue runner delivering it now
    claimed_until REAL,
    claim_holder TEXT,  -- the process of that runner (holders.py)
    message_received_at REAL NOT NULL DEFAULT 0,  -- the message's, copied: queue_shape
    message_size INTEGER NOT NULL DEFAULT 0  -- and queue_summary read only indexes
);
CREATE INDEX IF NOT EXISTS recipients_message ON recipients(message_id);
CREATE TABLE IF NOT EXISTS accounts (
    name TEXT PRIMARY KEY,
    scram_salt BLOB,
    scram_iterations INTEGER,
    scram_stored_key BLOB,
    scram_server_key BLOB,
    cram_secret TEXT,
    created_at REAL NOT NULL,
    last_atrn_at REAL,
    atrn_wait REAL  -- seconds a fruitless ATRN may wait for mail (NULL: none)
);
CREATE TABLE IF NOT EXISTS account_certs (
    fingerprint TEXT PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS account_certs_account ON account_certs(account);
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE,
    max_messages INTEGER,
    max_bytes INTEGER,
    validate INTEGER NOT NULL DEFAULT 0,
    hold_lifetime REAL,
    etrn TEXT  -- NULL: not an ETRN domain, '': its MX hosts, else host[:port]
);
CREATE INDEX IF NOT EXISTS domains_account ON domains(account);
CREATE TABLE IF NOT EXISTS valid_recipients (
    domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    local TEXT NOT NULL,
    PRIMARY KEY (domain, local)
);
CREATE TABLE IF NOT EXISTS leases (
    domain TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL,
    holder TEXT NOT NULL DEFAULT ''  -- the process (holders.py), or '' (expiry only)
);
CREATE INDEX IF NOT EXISTS leases_owner ON leases(owner);
""" + _ACCOUNT_CERT_SUBJECTS + _OUTBOUND_INDEXES + _RECIPIENT_HOLDS + _RATE_EVENTS \
    + _SHAPE_INDEXES


# Version 5: the process holding a lease, so a dead one's leases are taken at once.
_V5 = """
ALTER TABLE leases ADD COLUMN holder TEXT NOT NULL DEFAULT '';
"""

# Version 6: the node that accepted a message, the holder of an outbound
# claim (a dead runner's claims are free at once), and windowed rate events.
_V6 = """
ALTER TABLE messages ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE recipients ADD COLUMN claim_holder TEXT;
""" + _RATE_EVENTS

# Version 7: the ETRN target of a domain (RFC 1985).
_V7 = """
ALTER TABLE domains ADD COLUMN etrn TEXT;
"""

# Version 8: how long an account's fruitless ATRN may wait for mail (issue 12).
_V8 = """
ALTER TABLE accounts ADD COLUMN atrn_wait REAL;
"""

# Version 9: each recipient carries its message's arrival and size.
_V9 = """
ALTER TABLE recipients ADD COLUMN message_received_at REAL NOT NULL DEFAULT 0;
ALTER TABLE recipients ADD COLUMN message_size INTEGER NOT NULL DEFAULT 0;
UPDATE recipients SET
    message_received_at = (SELECT received_at FROM messages WHERE id = recipients.message_id),
    message_size = (SELECT size FROM messages WHERE id = recipients.message_id)
    WHERE EXISTS (SELECT 1 FROM messages WHERE id = recipients.message_id);
DROP INDEX IF EXISTS recipients_domain_state;
DROP INDEX IF EXISTS recipients_state;
""" + _SHAPE_INDEXES

# Version 10: whether a message's body goes on the wire as it is stored.
_V10 = """
ALTER TABLE messages ADD COLUMN wire_ready INTEGER NOT NULL DEFAULT 0;
"""

# Statements that bring a file from version N-1 to N.
_MIGRATIONS: dict[int, str] = {
    2: _ACCOUNT_CERT_SUBJECTS,
    3: _V3,
    4: _RECIPIENT_HOLDS,
    5: _V5,
    6: _V6,
    7: _V7,
    8: _V8,
    9: _V9,
    10: _V10,
}


def _statements(script: str) -> Iterator[str]:
    for statement in script.split(";"):
        if statement.strip():
            yield statement


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the file of `conn` (named `path` in errors) up to
    `SCHEMA_VERSION`; return the version it had."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    found = int(version)
    if version == SCHEMA_VERSION:
        return found
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{path} has schema version {version}; this fermoposta knows "
            f"up to {SCHEMA_VERSION}"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the write lock: another process may have just done it.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:  # a new file
            for statement in _statements(_SCHEMA):
                conn.execute(statement)
        elif version < SCHEMA_VERSION:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _statements(_MIGRATIONS[step]):
                    conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found
