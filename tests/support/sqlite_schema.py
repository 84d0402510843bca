"""Older SQLite schemas made from a current file, for migration tests.

Contract: `back_to_version_9(conn)` undoes schema 10 on a current file (the
messages' `wire_ready`) and sets `user_version` to 9; `back_to_version_8(conn)`
also undoes schema 9 (each recipient's copy of its message's arrival and
size, and the indexes that read them) and sets it to 8; older steps are the
caller's.
"""

from __future__ import annotations

import sqlite3


def back_to_version_9(conn: sqlite3.Connection) -> None:
    """Undo schema 10 on a current file: the messages' `wire_ready`."""
    conn.executescript("""
        ALTER TABLE messages DROP COLUMN wire_ready;
        PRAGMA user_version = 9;
    """)


def back_to_version_8(conn: sqlite3.Connection) -> None:
    """Undo schemas 10 and 9 on a current file: `wire_ready`, then the
    recipient columns and indexes."""
    back_to_version_9(conn)
    conn.executescript("""
        DROP INDEX recipients_domain;
        DROP INDEX recipients_state;
        ALTER TABLE recipients DROP COLUMN message_received_at;
        ALTER TABLE recipients DROP COLUMN message_size;
        CREATE INDEX recipients_domain_state ON recipients(domain, state, message_id);
        CREATE INDEX recipients_state ON recipients(state, message_id);
        PRAGMA user_version = 8;
    """)
