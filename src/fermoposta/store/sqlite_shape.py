"""`queue stats` of the SQLite engine: the queue's shape per domain, read by
several connections in one snapshot, side by side.

Contract: `queue_shape(connections, now, age_limits)` reads the figures
`rows.shape_from_domains` turns into a `QueueShape` (per domain its
messages, recipients, bytes, oldest arrival, recipients by state, deferred
recipients and recipients by age bucket; the queue's messages, bytes and
oldest arrival).  Every connection must already be in a read transaction
of the same snapshot (the caller, `SQLiteQueueTools.queue_shape`, starts
them while it holds the file's write lock, so no commit lands between
them, or gives one connection when a writer keeps that lock); the answer
is then exactly the one a single connection would give.
`sqlite3.Error` propagates; the caller turns it into `StoreError`.

How (issue 10; bench/README.md, nineteenth session):
- Index-only (`recipients_domain`, schema 9); no message row is read
  (0.65 s at 1,000,000 held, where joining each recipient to its message
  took 5).  The domains come from a skip-scan of the index (one seek a
  domain, not a step a recipient: 0.03 s for 10,000 domains over 1,100,000
  recipients), and each domain's figures from its (domain, state) ranges:
  a count and the first arrival a state, its distinct (arrival, message,
  size) triples, one count an age bucket.  Grouping every recipient by
  domain took 0.55 s where this takes 0.43 (fifteenth session).
- The domains are cut into as many ranges of equal numbers of domains as
  there are connections but one; each range's pass runs on a connection of
  its own in a thread of its own (SQLite lets go of the GIL while it
  steps), and the last connection reads the per-domain deferred counts and
  the messages' totals meanwhile.  On two cores that took the whole from
  0.89-1.01 s to 0.59-0.64 s at 1,000,000 held.  A range holding one huge
  domain is as slow as that domain: a domain is never split.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fermoposta.store.base import QueueShape, RecipientState
from fermoposta.store.rows import shape_from_domains
from fermoposta.store.sqlite_rows import _marks

__all__ = ["MAX_PARTS", "queue_shape", "range_bounds"]

MAX_PARTS = 8  # connections (and threads) at most, the totals' one included

_DOMAINS = (
    "WITH RECURSIVE r(domain) AS (SELECT MIN(domain) FROM recipients"
    " UNION ALL SELECT (SELECT MIN(domain) FROM recipients WHERE domain > r.domain)"
    " FROM r WHERE r.domain IS NOT NULL) SELECT domain FROM r WHERE domain IS NOT NULL")


_STATES = [str(s) for s in RecipientState]


def _range_sql(now: float, limits: Sequence[float], low: str, high: str | None
               ) -> tuple[str, list[Any]]:
    """The statement of one range of domains, `low` <= domain < `high`
    (`high` None: to the end), and its parameters: one row a domain, which
    `_domain_row` turns into the row `shape_from_domains` takes."""
    states = _STATES
    ages: list[str] = []
    age_params: list[Any] = []
    for i in range(len(limits) + 1):
        # Bucket i: limits[i-1] <= age < limits[i], age = now - received_at.
        # Every state named: the arrival is a range after (domain, state).
        bounds = ["domain = r.domain", f"state IN ({_marks(len(states))})"]
        age_params += states
        if i < len(limits):
            bounds.append("message_received_at > ?")
            age_params.append(now - limits[i])
        if i > 0:
            bounds.append("message_received_at <= ?")
            age_params.append(now - limits[i - 1])
        ages.append("(SELECT COUNT(*) FROM recipients WHERE " + " AND ".join(bounds) + ")")
    per_state = [
        f"(SELECT {what} FROM recipients WHERE domain = r.domain AND state = ?)"
        for what in ("COUNT(*)", "MIN(message_received_at)") for _ in states]
    until = "" if high is None else " AND r.domain < ?"
    sql = ("WITH RECURSIVE r(domain) AS (SELECT MIN(domain) FROM recipients WHERE domain >= ?"
           " UNION ALL SELECT (SELECT MIN(domain) FROM recipients WHERE domain > r.domain)"
           f" FROM r WHERE r.domain IS NOT NULL{until})"
           " SELECT domain, (SELECT COUNT(*) || ' ' || SUM(message_size) FROM"
           " (SELECT DISTINCT message_received_at, message_id, message_size"
           " FROM recipients WHERE domain = r.domain)), "
           + ", ".join(per_state + ages) + " FROM r WHERE r.domain IS NOT NULL" + until)
    high_param = [] if high is None else [high]
    return sql, [low, *high_param, *states, *states, *age_params, *high_param]


def _domain_row(row: Sequence[Any]) -> tuple[Any, ...]:
    """A range statement's row as `shape_from_domains` takes it."""
    states = _STATES
    # Two figures of one subquery: (messages, bytes) of the domain.
    messages, size = str(row[1]).split()
    counts = [int(n) for n in row[2:2 + len(states)]]
    arrivals = [a for a in row[2 + len(states):2 + 2 * len(states)] if a is not None]
    by_state = dict(zip(states, counts, strict=True))
    return (row[0], int(messages), sum(counts), int(size),
            min(arrivals) if arrivals else None,
            by_state[str(RecipientState.HELD)], by_state[str(RecipientState.OUTBOUND)],
            by_state[str(RecipientState.HOLD)], *row[2 + 2 * len(states):])


def _range_rows(conn: sqlite3.Connection, now: float, limits: Sequence[float], low: str,
                high: str | None) -> list[tuple[Any, ...]]:
    sql, params = _range_sql(now, limits, low, high)
    return [_domain_row(row) for row in conn.execute(sql, params)]


def _totals(conn: sqlite3.Connection) -> tuple[dict[str, int], Sequence[Any]]:
    """Deferred recipients per domain, and the queue's (messages, bytes, oldest)."""
    deferred = {
        str(r[0]): int(r[1])
        for r in conn.execute(
            "SELECT domain, COUNT(*) FROM recipients WHERE state = ? AND attempts > 0"
            " GROUP BY domain", (str(RecipientState.OUTBOUND),))
    }
    message_row = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(received_at) FROM messages"
        " WHERE size >= 0").fetchone()
    return deferred, message_row


def range_bounds(domains: Sequence[str], ranges: int) -> list[str]:
    """The first domain of each of at most `ranges` ranges of about as many
    domains (`domains` in order, none repeated); empty for no domain."""
    if not domains:
        return []
    ranges = max(1, min(ranges, len(domains)))
    return [domains[len(domains) * i // ranges] for i in range(ranges)]


def queue_shape(connections: Sequence[sqlite3.Connection], now: float,
                age_limits: Sequence[float]) -> QueueShape:
    """The queue's shape (module docstring) from `connections`, all in one snapshot."""
    if not connections:
        raise ValueError("queue_shape needs a connection")
    limits = [float(a) for a in age_limits]
    if len(connections) == 1:
        conn = connections[0]
        rows = _range_rows(conn, now, limits, "", None)  # "" sorts before every domain
        deferred, message_row = _totals(conn)
        return shape_from_domains(rows, deferred, message_row, len(limits) + 1)
    *passes, last = connections
    with ThreadPoolExecutor(max_workers=len(connections)) as pool:
        totals = pool.submit(_totals, last)  # while the domains are listed, too
        domains = [str(r[0]) for r in passes[0].execute(_DOMAINS)]
        lows = range_bounds(domains, len(passes))
        highs: list[str | None] = [*lows[1:], None]
        parts = [pool.submit(_range_rows, conn, now, limits, low, high)
                 for conn, low, high in zip(passes, lows, highs, strict=False)]
        rows = [row for part in parts for row in part.result()]
        deferred, message_row = totals.result()
    return shape_from_domains(rows, deferred, message_row, len(limits) + 1)
