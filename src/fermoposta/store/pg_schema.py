"""The schema of the PostgreSQL store engine and its migrations.

Contract:
- `SCHEMA_VERSION` is the version this code writes and reads; the database
  keeps its own in the one-row table `schema_version` (no table: version 0,
  an empty schema).
- `migrate(conn)` brings the schema of the connection's `current_schema()`
  up to `SCHEMA_VERSION` and returns (version before, version after).  It
  runs in one transaction holding `pg_advisory_xact_lock` on a key derived
  from the schema's name, so nodes starting at once apply each step once and
  never see a half-made schema; the version is re-read under the lock.  A
  version newer than `SCHEMA_VERSION` raises `SchemaTooNew` (a `StoreError`)
  naming both, and nothing is changed.  Every object is created unqualified, i.e. in the
  current schema (never a hard-coded `public.`).
- `MIGRATIONS[n]` are the statements that bring version n-1 to n; version 1
  is the whole first schema of this engine.  A later change adds a step,
  never edits one that has shipped.
- Column choices: times are `double precision` Unix seconds from the
  store's injected clock, except `holders.heartbeat_at`/`started_at`, which
  are the database's own clock (so clock skew between nodes cannot make a
  live holder look dead).  Text columns that are ordered or compared for
  pages use `COLLATE "C"` (byte order, as SQLite and Python sort), so both
  engines page and list in the same order whatever the database's locale.
  Recipient ids are an identity (a sequence): never reused.
"""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg

from fermoposta.store.base import SchemaTooNew, StoreError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "current_version", "directory_channel",
           "held_channel", "migrate"]

SCHEMA_VERSION = 5

# Version 1: the whole schema.  Same tables as the SQLite engine's version 6,
# plus `holders` (heartbeat rows: who is alive) and `schema_version`.
_V1: tuple[str, ...] = (
    """CREATE TABLE messages (
        id text COLLATE "C" PRIMARY KEY,
        sender text COLLATE "C" NOT NULL,
        received_at double precision NOT NULL,
        size bigint NOT NULL,
        origin text NOT NULL,
        smtputf8 boolean NOT NULL,
        body_8bit boolean NOT NULL,
        envid text,
        ret text,
        client text NOT NULL,
        node text NOT NULL DEFAULT ''  -- the node that accepted it
    )""",
    # Page order of the queue tools and held-mail expiry (oldest first).
    "CREATE INDEX messages_received ON messages (received_at, id)",
    """CREATE TABLE body_chunks (
        message_id text COLLATE "C" NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        seq integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (message_id, seq)
    )""",
    """CREATE TABLE recipients (
        -- never reused: callers hold ids across calls
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        message_id text COLLATE "C" NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        address text COLLATE "C" NOT NULL,
        domain text COLLATE "C" NOT NULL,
        state text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        last_reply text,
        notify text,
        orcpt text,
        updated_at double precision NOT NULL,
        -- OUTBOUND: due again at (NULL = now), or a claim's expiry
        next_attempt_at double precision,
        first_failure_at double precision,
        delay_notified boolean NOT NULL DEFAULT false,
        claimed_by text,  -- the queue runner delivering it now
        claimed_until double precision,
        claim_holder text  -- the holder (process) of that runner
    )""",
    # "What is due" is one index range, in claim order.
    "CREATE INDEX recipients_due ON recipients (state, (COALESCE(next_attempt_at, 0)), id)",
    "CREATE INDEX recipients_domain_state ON recipients (domain, state, message_id)",
    "CREATE INDEX recipients_message ON recipients (message_id)",
    "CREATE INDEX recipients_state ON recipients (state, message_id)",
    "CREATE INDEX recipients_claimed_by ON recipients (claimed_by) WHERE claimed_by IS NOT NULL",
    # Claims of holders that may have died: a small range (claims in flight).
    "CREATE INDEX recipients_claim_holder ON recipients (claim_holder, claimed_until)"
    " WHERE claim_holder IS NOT NULL",
    """CREATE TABLE recipient_holds (
        recipient_id bigint PRIMARY KEY REFERENCES recipients (id) ON DELETE CASCADE,
        previous_state text NOT NULL
    )""",
    """CREATE TABLE accounts (
        name text COLLATE "C" PRIMARY KEY,
        scram_salt bytea,
        scram_iterations integer,
        scram_stored_key bytea,
        scram_server_key bytea,
        cram_secret text,
        created_at double precision NOT NULL,
        last_atrn_at double precision
    )""",
    """CREATE TABLE account_certs (
        fingerprint text COLLATE "C" PRIMARY KEY,
        account text COLLATE "C" NOT NULL REFERENCES accounts (name) ON DELETE CASCADE
    )""",
    "CREATE INDEX account_certs_account ON account_certs (account)",
    """CREATE TABLE account_cert_subjects (
        subject text COLLATE "C" PRIMARY KEY,  -- canonical RFC 4514 string
        account text COLLATE "C" NOT NULL REFERENCES accounts (name) ON DELETE CASCADE
    )""",
    "CREATE INDEX account_cert_subjects_account ON account_cert_subjects (account)",
    """CREATE TABLE domains (
        name text COLLATE "C" PRIMARY KEY,
        account text COLLATE "C" NOT NULL REFERENCES accounts (name) ON DELETE CASCADE,
        max_messages bigint,
        max_bytes bigint,
        validate boolean NOT NULL DEFAULT false,
        hold_lifetime double precision
    )""",
    "CREATE INDEX domains_account ON domains (account)",
    """CREATE TABLE valid_recipients (
        domain text COLLATE "C" NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
        local text COLLATE "C" NOT NULL,
        PRIMARY KEY (domain, local)
    )""",
    """CREATE TABLE leases (
        domain text COLLATE "C" PRIMARY KEY,
        owner text NOT NULL,
        expires_at double precision NOT NULL,
        holder text NOT NULL DEFAULT ''  -- the holders row of the process
    )""",
    "CREATE INDEX leases_owner ON leases (owner)",
    # One row per live PostgresStore; heartbeat_at is the database's clock.
    """CREATE TABLE holders (
        id text PRIMARY KEY,
        node text NOT NULL,
        pid integer NOT NULL,
        started_at double precision NOT NULL,
        heartbeat_at double precision NOT NULL
    )""",
    """CREATE TABLE rate_events (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        key text COLLATE "C" NOT NULL,
        at double precision NOT NULL
    )""",
    "CREATE INDEX rate_events_key_at ON rate_events (key, at)",
    "CREATE TABLE schema_version (version integer NOT NULL)",
    "INSERT INTO schema_version (version) VALUES (0)",
)

# Version 2: the ETRN target of a domain (RFC 1985; the SQLite engine's version 7):
# NULL = not an ETRN domain, '' = its MX hosts, else "host" or "host:port".
_V2: tuple[str, ...] = (
    "ALTER TABLE domains ADD COLUMN etrn text",
)

# Version 3 (issue 12): how long an account's fruitless ATRN may wait for
# mail, and a NOTIFY on `held_channel()` with the domain of every recipient
# that becomes HELD (inserted so, or updated to it), so a node holding a
# waiting ATRN wakes the moment another commits its mail.  NOTIFY is
# delivered on commit only, once per distinct payload of a transaction.
_V3: tuple[str, ...] = (
    "ALTER TABLE accounts ADD COLUMN atrn_wait double precision",
    """CREATE FUNCTION notify_held_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('fp_held_' || left(md5(current_schema()), 16), d.domain)
        FROM (SELECT DISTINCT domain FROM new_rows WHERE state = 'held') AS d;
        RETURN NULL;
    END $$""",
    """CREATE FUNCTION notify_held_updated() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('fp_held_' || left(md5(current_schema()), 16), d.domain)
        FROM (SELECT DISTINCT n.domain FROM new_rows n JOIN old_rows o ON o.id = n.id
              WHERE n.state = 'held' AND o.state <> 'held') AS d;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER recipients_held_inserted AFTER INSERT ON recipients"
    " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT"
    " EXECUTE FUNCTION notify_held_inserted()",
    "CREATE TRIGGER recipients_held_updated AFTER UPDATE ON recipients"
    " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT"
    " EXECUTE FUNCTION notify_held_updated()",
)

# Version 4 (issue 10; the SQLite engine's version 9): each recipient
# carries its message's arrival and size, never changed, so `queue stats`
# and the metrics read only indexes.  `recipients_domain` replaces
# `recipients_domain_state` and keeps its (domain, state) prefix for ATRN,
# quotas and ETRN; its (arrival, message, size) make the per-domain figures
# an index-only pass, with no join.  The backfill fires
# the statement trigger of version 3 once, which notifies nothing (no state
# changes).  And the notices of domain changes, for each node's cache.
_V4: tuple[str, ...] = (
    "ALTER TABLE recipients ADD COLUMN message_received_at double precision NOT NULL"
    " DEFAULT 0, ADD COLUMN message_size bigint NOT NULL DEFAULT 0",
    "UPDATE recipients AS r SET message_received_at = m.received_at, message_size = m.size"
    " FROM messages AS m WHERE m.id = r.message_id",
    # No default from now on: a node still running the code of version 3
    # (its INSERTs name neither column) gets an error, so a 4xx, instead of
    # storing zeros that quotas and queue stats would read.
    "ALTER TABLE recipients ALTER COLUMN message_received_at DROP DEFAULT,"
    " ALTER COLUMN message_size DROP DEFAULT",
    "DROP INDEX recipients_domain_state",
    "DROP INDEX recipients_state",
    "CREATE INDEX recipients_domain ON recipients"
    " (domain, state, message_received_at, message_id, message_size)",
    "CREATE INDEX recipients_state ON recipients"
    " (state, message_id, message_size, message_received_at)",
    # The held-mail notices of version 3 on the table's schema too, not the
    # writing session's search_path (a change made with qualified names from
    # another schema woke nobody).
    """CREATE OR REPLACE FUNCTION notify_held_inserted() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('fp_held_' || left(md5(TG_TABLE_SCHEMA), 16), d.domain)
        FROM (SELECT DISTINCT domain FROM new_rows WHERE state = 'held') AS d;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION notify_held_updated() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('fp_held_' || left(md5(TG_TABLE_SCHEMA), 16), d.domain)
        FROM (SELECT DISTINCT n.domain FROM new_rows n JOIN old_rows o ON o.id = n.id
              WHERE n.state = 'held' AND o.state <> 'held') AS d;
        RETURN NULL;
    END $$""",
    # A NOTIFY on `directory_channel()` for every statement that changes the
    # domains or their valid recipients (an account's removal cascades), on
    # commit: each node empties its cache of domain lookups (pg_domain_cache).
    """CREATE FUNCTION notify_directory_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        -- The table's schema, whatever the writing session's search_path.
        PERFORM pg_notify('fp_dir_' || left(md5(TG_TABLE_SCHEMA), 16), '');
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER domains_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
    " ON domains FOR EACH STATEMENT EXECUTE FUNCTION notify_directory_changed()",
    "CREATE TRIGGER valid_recipients_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
    " ON valid_recipients FOR EACH STATEMENT EXECUTE FUNCTION notify_directory_changed()",
)

# Version 5: whether a message's body goes on the wire as it is stored.
_V5: tuple[str, ...] = (
    "ALTER TABLE messages ADD COLUMN wire_ready boolean NOT NULL DEFAULT false",
)

# Statements that bring a database from version N-1 to N.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: _V1,
    2: _V2,
    3: _V3,
    4: _V4,
    5: _V5,
}


def held_channel(schema: str) -> str:
    """The NOTIFY channel of held mail for `schema` (what the triggers of
    version 3 compute with `md5(current_schema())`, version 4 with the
    table's schema)."""
    return "fp_held_" + hashlib.md5(schema.encode()).hexdigest()[:16]


def directory_channel(schema: str) -> str:
    """The NOTIFY channel of domain changes for `schema` (the triggers of
    version 4)."""
    return "fp_dir_" + hashlib.md5(schema.encode()).hexdigest()[:16]

# The advisory lock key: per schema, so tests (one schema each) and
# several deployments on one database do not serialize each other.
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('fermoposta.migrate:' || %s, 0))"


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The schema version of the connection's current schema (0: none yet)."""
    # pg_class read with the statement's snapshot, not to_regclass(): the
    # catalog cache may still hold "no such table" from before the advisory
    # lock wait (taking that lock does not process invalidations), so a node
    # that waited for another's migration would create the tables again.
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = current_schema() AND c.relname = 'schema_version')"
    ).fetchone()
    if row is None or not row[0]:
        return 0
    found = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(found[0]) if found is not None and found[0] is not None else 0


def migrate(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """Bring the current schema up to `SCHEMA_VERSION` (see the module docstring).

    `conn` is in autocommit mode; the work is one transaction of its own."""
    row = conn.execute("SELECT current_schema()").fetchone()
    schema = None if row is None else row[0]
    if schema is None:
        # search_path names no existing schema: nowhere to create the tables.
        raise StoreError("the PostgreSQL search_path names no existing schema")
    # Outside the lock first: the usual case (up to date) takes no lock at all.
    before = current_version(conn)
    if before == SCHEMA_VERSION:
        return before, before
    if before > SCHEMA_VERSION:
        raise _too_new(str(schema), before)
    with conn.transaction():
        conn.execute(_LOCK, (str(schema),))
        # Re-read under the lock: another node may have just done it.
        before = current_version(conn)
        if before > SCHEMA_VERSION:
            raise _too_new(str(schema), before)
        for step in range(before + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = %s", (step,))
    return before, SCHEMA_VERSION


def _too_new(schema: str, version: int) -> SchemaTooNew:
    return SchemaTooNew(
        f"the PostgreSQL store (schema {schema}) has schema version {version}; "
        f"this fermoposta knows up to {SCHEMA_VERSION}"
    )
