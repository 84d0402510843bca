"""Rows as both engines read them: column lists and row -> dataclass.

Contract: the SQLite and PostgreSQL engines select `RECIPIENT_COLUMNS`,
`MESSAGE_COLUMNS`, `DOMAIN_COLUMNS` and `ACCOUNT_COLUMNS` in this order and
build the contract's dataclasses with `recipient_from_row`,
`message_from_row`, `domain_from_row` and `account_from_row`, so the two
engines cannot drift apart in what a row means; `filter_sql` is the queue tools' WHERE
clause in either dialect.  Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fermoposta.store.base import (
    Account,
    Domain,
    DomainShape,
    MessageOrigin,
    QueuedMessage,
    QueuedRecipient,
    QueueFilter,
    QueueShape,
    RecipientState,
    ScramSecret,
)

RECIPIENT_COLUMNS = (
    "id, message_id, address, domain, state, attempts, last_reply, notify, orcpt,"
    " next_attempt_at, first_failure_at, delay_notified"
)
MESSAGE_COLUMNS = (
    "id, sender, received_at, size, origin, smtputf8, body_8bit, envid, ret, client, node"
)
DOMAIN_COLUMNS = "name, account, max_messages, max_bytes, validate, hold_lifetime"
ACCOUNT_COLUMNS = (
    "name, scram_salt, scram_iterations, scram_stored_key, scram_server_key, cram_secret,"
    " created_at, last_atrn_at"
)


def qualified(columns: str, alias: str) -> str:
    """`columns` with each name prefixed by `alias.` (for joins)."""
    return ", ".join(f"{alias}.{c.strip()}" for c in columns.split(","))


def recipient_from_row(r: Sequence[Any]) -> QueuedRecipient:
    """A `QueuedRecipient` from a row of `RECIPIENT_COLUMNS`."""
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


def message_from_row(row: Sequence[Any], recipients: Sequence[QueuedRecipient]
                     ) -> QueuedMessage:
    """A `QueuedMessage` from a row of `MESSAGE_COLUMNS` and its recipients."""
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


def account_from_row(row: Sequence[Any], fingerprints: Sequence[str],
                     subjects: Sequence[str]) -> Account:
    """An `Account` from a row of `ACCOUNT_COLUMNS` and its certificate bindings."""
    scram = None
    if row[1] is not None:
        scram = ScramSecret(salt=bytes(row[1]), iterations=int(row[2]),
                            stored_key=bytes(row[3]), server_key=bytes(row[4]))
    return Account(name=row[0], scram=scram, cram_secret=row[5],
                   cert_fingerprints=tuple(str(f) for f in fingerprints),
                   cert_subjects=tuple(str(s) for s in subjects),
                   created_at=row[6], last_atrn_at=row[7])


def domain_from_row(row: Sequence[Any], valid: Iterable[str] | None) -> Domain:
    """A `Domain` from a row of `DOMAIN_COLUMNS`; `valid` is its list of valid
    local parts, used only when the row says the domain validates them."""
    return Domain(name=row[0], account=row[1], max_messages=row[2], max_bytes=row[3],
                  valid_recipients=frozenset(str(v) for v in valid or ()) if row[4] else None,
                  hold_lifetime=row[5])


def filter_sql(where: QueueFilter, after: tuple[float, str] | None, *, mark: str,
               find: str) -> tuple[str, list[Any]]:
    """The WHERE clause (on messages `m`) of a queue tool's `where` and page key
    `after`, and its parameters, in an engine's dialect: `mark` is its
    placeholder ("?", "%s"), `find` its substring test with ``{haystack}`` and
    ``{needle}`` (SQLite's ``instr(...) > 0``, PostgreSQL's ``strpos(...) > 0``).
    Text is compared with lower() on both sides: ASCII case folding, as the
    contract says (the PostgreSQL columns use COLLATE "C")."""
    def contains(column: str) -> str:
        return find.format(haystack=f"lower({column})", needle=f"lower({mark})")

    clauses: list[str] = []
    params: list[Any] = []
    if after is not None:
        clauses.append(f"(m.received_at > {mark} OR (m.received_at = {mark} AND m.id > {mark}))")
        params += [after[0], after[0], after[1]]
    if where.received_before is not None:
        clauses.append(f"m.received_at < {mark}")
        params.append(where.received_before)
    if where.sender is not None:
        clauses.append(f"lower(m.sender) = lower({mark})" if where.sender_exact
                       else contains("m.sender"))
        params.append(where.sender)
    inner: list[str] = []
    if where.domain is not None:
        inner.append(f"r.domain = {mark}")
        params.append(where.domain)
    if where.recipient is not None:
        inner.append(f"lower(r.address) = lower({mark})" if where.recipient_exact
                     else contains("r.address"))
        params.append(where.recipient)
    if where.state is not None:
        if where.state == "deferred":
            inner.append(f"r.state = {mark} AND r.attempts > 0")
            params.append(str(RecipientState.OUTBOUND))
        else:
            inner.append(f"r.state = {mark}")
            params.append(str(RecipientState(where.state)))
    if inner:
        clauses.append("EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id AND "
                       + " AND ".join(inner) + ")")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def shape_from_rows(figures: Mapping[str, Sequence[Any]], sizes: Mapping[str, int],
                    ages: Mapping[str, Sequence[int]], total_row: Sequence[Any],
                    message_row: Sequence[Any], buckets: int) -> QueueShape:
    """`QueueShape` from `queue_shape`'s query results, the same in both
    engines: per domain (messages, recipients, oldest, held, outbound,
    deferred, hold), bytes per domain, recipients per age bucket; the
    recipients' totals by state and (messages, bytes, oldest) of the queue."""
    domains = [
        DomainShape(domain, int(f[0]), int(f[1]), sizes.get(domain, 0), f[2],
                    int(f[3] or 0), int(f[4] or 0), int(f[5] or 0), int(f[6] or 0),
                    tuple(ages[domain]))
        for domain, f in figures.items()
    ]
    domains.sort(key=lambda d: (-d.recipients, d.domain))
    total_ages = [sum(d.ages[i] for d in domains) for i in range(buckets)]
    total = DomainShape("", int(message_row[0]), int(total_row[0]), int(message_row[1]),
                        message_row[2], int(total_row[1] or 0), int(total_row[2] or 0),
                        int(total_row[3] or 0), int(total_row[4] or 0), tuple(total_ages))
    return QueueShape(total, tuple(domains))
