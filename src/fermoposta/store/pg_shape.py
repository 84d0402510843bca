"""`queue stats` of the PostgreSQL engine: the queue's shape per domain in one snapshot.

Contract: `queue_shape(conn, now, age_limits)` reads, in the transaction
`conn` is in (the caller's REPEATABLE READ snapshot), the figures
`rows.shape_from_domains` turns into a `QueueShape`: per domain its
messages (each once, however many of its recipients the domain has),
recipients, bytes (each message's size once), oldest arrival, recipients
by state, deferred recipients and recipients by age bucket; and the
queue's messages, bytes and oldest arrival.  The answer never depends on
the table's statistics or the server's settings; only its speed does.

How (issue 10; bench/README.md, sixteenth session):
- One ordered pass over `recipients_domain` (domain, state, arrival,
  message, size; schema 4), index-only: a domain's figures come from its
  range, its messages counted distinct there (a sort of the domain's own
  message ids).  Its bytes are its recipients' message sizes summed; only
  for a domain where a message has several recipients (fewer messages
  than recipients) are they summed again over its messages, each once.
- The pass is cut into ranges of domains, about equal in recipients by
  the statistics ANALYZE keeps of `recipients.domain` (`pg_stats`: its
  most common domains and a histogram of the others), one
  for each process the server may give the statement
  (`max_parallel_workers_per_gather` and the leader), as the branches of
  one UNION ALL: the server runs them side by side (Parallel Append), in
  the one snapshot.  Without statistics or parallel workers: one range.
- JIT off for the transaction: the server compiled the statement in each
  process (50-80 ms), and with it on the whole took 1.15-1.49 s against
  0.67-0.88 s off at 1,000,000 held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fermoposta.store.base import QueueShape
from fermoposta.store.pg_rows import HELD, HOLD, OUTBOUND, Conn
from fermoposta.store.rows import shape_from_domains

__all__ = ["MAX_RANGES", "domain_splits", "queue_shape", "splits_from_stats"]

MAX_RANGES = 8  # branches of the UNION ALL at most


def domain_splits(conn: Conn) -> list[str]:
    """Domains that cut `recipients` into ranges of about equal rows, one
    range for each process the server may give a statement, in order;
    empty (one range) without statistics or parallel workers."""
    row = conn.execute(
        "SELECT s.most_common_vals::text::text[], s.most_common_freqs,"
        " s.histogram_bounds::text::text[],"
        " current_setting('max_parallel_workers_per_gather')::int"
        " FROM (SELECT 1) AS one LEFT JOIN pg_stats AS s ON s.schemaname = current_schema()"
        " AND s.tablename = 'recipients' AND s.attname = 'domain'"
    ).fetchone()
    if row is None:
        return []
    return splits_from_stats(row[0] or [], row[1] or [], row[2] or [],
                             min(int(row[3]) + 1, MAX_RANGES))


def splits_from_stats(common: Sequence[str], frequencies: Sequence[float],
                      histogram: Sequence[str], ranges: int) -> list[str]:
    """At most `ranges - 1` split points, in order, that cut a column into
    `ranges` parts of about equal rows, from its statistics (`pg_stats`):
    its most common values with their frequencies, and the bounds of a
    histogram of the other values (each bucket as many rows)."""
    weight: dict[str, float] = {}
    for value, frequency in zip(common, frequencies, strict=False):
        weight[str(value)] = weight.get(str(value), 0.0) + float(frequency)
    if len(histogram) > 1:
        each = max(0.0, 1.0 - sum(float(f) for f in frequencies)) / (len(histogram) - 1)
        for bound in histogram[1:]:  # a bucket's rows: up to its upper bound
            weight[str(bound)] = weight.get(str(bound), 0.0) + each
    total = sum(weight.values())
    # Python orders str by code point, as the column's COLLATE "C" orders
    # UTF-8 by byte: the splits come out in the server's order, so the
    # ranges `[low, high)` are disjoint.
    splits: list[str] = []
    below = 0.0  # the rows before the value at hand
    for value in sorted(weight):
        # A split at `value`: the range before it ends below it.
        if below > 0 and len(splits) < ranges - 1 and below >= total * (len(splits) + 1) / ranges:
            splits.append(value)
        below += weight[value]
    return splits


def queue_shape(conn: Conn, now: float, age_limits: Sequence[float]) -> QueueShape:
    """The queue's shape (module docstring), read in `conn`'s transaction."""
    limits = [float(a) for a in age_limits]
    ages: list[str] = []
    age_params: list[Any] = []
    for i in range(len(limits) + 1):
        # Bucket i: limits[i-1] <= age < limits[i], age = now - received_at.
        bounds: list[str] = []
        if i < len(limits):
            bounds.append("message_received_at > %s::float8")
            age_params.append(float(now) - limits[i])
        if i > 0:
            bounds.append("message_received_at <= %s::float8")
            age_params.append(float(now) - limits[i - 1])
        ages.append(("count(*) FILTER (WHERE " + " AND ".join(bounds) + ")"
                     if bounds else "count(*)") + f" AS age{i}")
    pass_sql = (
        "SELECT domain, count(DISTINCT message_id) AS messages, count(*) AS recipients,"
        " sum(message_size)::bigint AS recipient_bytes, min(message_received_at) AS oldest,"
        " count(*) FILTER (WHERE state = %s) AS held,"
        " count(*) FILTER (WHERE state = %s) AS outbound,"
        " count(*) FILTER (WHERE state = %s) AS hold, " + ", ".join(ages) +
        " FROM recipients{where} GROUP BY domain")
    splits = domain_splits(conn)
    branches: list[str] = []
    params: list[Any] = []
    for low, high in zip([None, *splits], [*splits, None], strict=True):
        # Each domain in exactly one range, whatever the statistics said.
        where = [*(["domain >= %s"] if low is not None else []),
                 *(["domain < %s"] if high is not None else [])]
        branches.append(pass_sql.format(where=" WHERE " + " AND ".join(where) if where else ""))
        params += [HELD, OUTBOUND, HOLD, *age_params,
                   *(b for b in (low, high) if b is not None)]
    buckets = ", ".join(f"a.age{i}" for i in range(len(ages)))
    # For this transaction only; a server without the setting (before 11)
    # has no JIT to turn off.
    conn.execute("SELECT set_config('jit', 'off', true)"
                 " WHERE current_setting('jit', true) IS NOT NULL")
    rows = conn.execute(
        "SELECT a.domain, a.messages, a.recipients,"
        " CASE WHEN a.messages = a.recipients THEN a.recipient_bytes ELSE"
        # A bigint sum: numeric would come back as Decimal.
        " (SELECT sum(size)::bigint FROM (SELECT max(message_size) AS size"
        " FROM recipients AS r WHERE r.domain = a.domain GROUP BY message_id) AS each) END,"
        f" a.oldest, a.held, a.outbound, a.hold, {buckets}"
        " FROM (" + " UNION ALL ".join(branches) + ") AS a",
        params,
    ).fetchall()
    deferred = {
        str(r[0]): int(r[1])
        for r in conn.execute(
            "SELECT domain, count(*) FROM recipients WHERE state = %s AND attempts > 0"
            " GROUP BY domain", (OUTBOUND,))
    }
    message_row = conn.execute(
        "SELECT count(*), COALESCE(sum(size), 0), min(received_at) FROM messages"
    ).fetchone()
    assert message_row is not None
    return shape_from_domains(rows, deferred, message_row, len(limits) + 1)
