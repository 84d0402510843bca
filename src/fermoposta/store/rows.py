"""Rows as both engines read them: column lists and row -> dataclass.

Contract: the SQLite and PostgreSQL engines select `RECIPIENT_COLUMNS`,
`MESSAGE_COLUMNS`, `DOMAIN_COLUMNS` and `ACCOUNT_COLUMNS` in this order and
build the contract's dataclasses with `recipient_from_row`,
`message_from_row`, `domain_from_row` and `account_from_row`, so the two
engines cannot drift apart in what a row means; `filter_sql` is the queue tools' FROM
and WHERE clauses in either dialect (`domain_size_sql` picks its plan).  Pure functions, no I/O.
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
    "id, sender, received_at, size, origin, smtputf8, body_8bit, envid, ret, client, node,"
    " wire_ready"
)
DOMAIN_COLUMNS = "name, account, max_messages, max_bytes, validate, hold_lifetime, etrn"
ACCOUNT_COLUMNS = (
    "name, scram_salt, scram_iterations, scram_stored_key, scram_server_key, cram_secret,"
    " created_at, last_atrn_at, atrn_wait"
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
        wire_ready=bool(row[11]),
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
                   created_at=row[6], last_atrn_at=row[7], atrn_wait=row[8])


def domain_from_row(row: Sequence[Any], valid: Iterable[str] | None) -> Domain:
    """A `Domain` from a row of `DOMAIN_COLUMNS`; `valid` is its list of valid
    local parts, used only when the row says the domain validates them."""
    return Domain(name=row[0], account=row[1], max_messages=row[2], max_bytes=row[3],
                  valid_recipients=frozenset(str(v) for v in valid or ()) if row[4] else None,
                  hold_lifetime=row[5], etrn=row[6])


# A domain filter with fewer matching recipients than this starts from the
# domain's recipients (index recipients_domain) and sorts them; a larger
# one walks the messages in page order and tests each (see `filter_sql`).
SMALL_DOMAIN = 20_000


def domain_size_sql(where: QueueFilter, *, mark: str) -> tuple[str, list[Any]] | None:
    """A query of how many recipients (at most `SMALL_DOMAIN`) the domain
    filter of `where` selects, one range of `recipients_domain`; None
    without a domain filter.  Its answer is `filter_sql`'s `small_domain`."""
    if where.domain is None:
        return None
    sql = f"SELECT count(*) FROM (SELECT 1 FROM recipients WHERE domain = {mark}"
    params: list[Any] = [where.domain]
    if where.state is not None:
        sql += f" AND state = {mark}"
        params.append(str(RecipientState.OUTBOUND) if where.state == "deferred"
                      else str(RecipientState(where.state)))
    return sql + f" LIMIT {mark}) AS s", [*params, SMALL_DOMAIN]


def filter_sql(where: QueueFilter, after: tuple[float, str] | None, *, mark: str,
               find: str, small_domain: bool = False, unindexed: str = "{}",
               domain_index: str = "") -> tuple[str, list[Any]]:
    """The FROM and WHERE clauses (messages `m`) of a queue tool's `where`
    and page key `after`, and its parameters, in an engine's dialect: `mark`
    is its placeholder ("?", "%s"), `find` its substring test with
    ``{haystack}`` and ``{needle}`` (SQLite's ``instr(...) > 0``,
    PostgreSQL's ``strpos(...) > 0``), `unindexed` what keeps a column
    reference ``{}`` from choosing an index (SQLite's ``+{}``), and
    `domain_index` what makes the small-domain plan read `recipients_domain`
    (SQLite's `` INDEXED BY recipients_domain``: without statistics it
    would rather walk every recipient in the state through `recipients_state`,
    whose order saves the DISTINCT a sort).
    Text is compared with lower() on both sides: ASCII case folding, as the
    contract says (the PostgreSQL columns use COLLATE "C").

    Plans: the page key is one range of the arrival index
    (``received_at >= t``, then the ties); with `small_domain` (the domain
    filter selects fewer than `SMALL_DOMAIN` recipients: `domain_size_sql`)
    the rows come from the domain's recipients, one range of
    `recipients_domain`, and only those messages are sorted; otherwise
    the messages are walked in page order and each is tested through its
    own recipients (`recipients_message`), so a page costs about its length
    divided by the share of messages that match."""
    def contains(column: str) -> str:
        return find.format(haystack=f"lower({column})", needle=f"lower({mark})")

    clauses: list[str] = []
    params: list[Any] = []
    if after is not None:
        clauses.append(f"m.received_at >= {mark} AND (m.received_at > {mark} OR m.id > {mark})")
        params += [after[0], after[0], after[1]]
    if where.received_before is not None:
        clauses.append(f"m.received_at < {mark}")
        params.append(where.received_before)
    if where.sender is not None:
        clauses.append(f"lower(m.sender) = lower({mark})" if where.sender_exact
                       else contains("m.sender"))
        params.append(where.sender)
    inner: list[str] = []
    inner_params: list[Any] = []
    if where.domain is not None:
        inner.append(f"r.domain = {mark}" if small_domain
                     else f"{unindexed.format('r.domain')} = {mark}")
        inner_params.append(where.domain)
    if where.state is not None:
        if where.state == "deferred":
            inner.append(f"r.state = {mark} AND r.attempts > 0")
            inner_params.append(str(RecipientState.OUTBOUND))
        else:
            inner.append(f"r.state = {mark}")
            inner_params.append(str(RecipientState(where.state)))
    if where.recipient is not None:
        inner.append(f"lower(r.address) = lower({mark})" if where.recipient_exact
                     else contains("r.address"))
        inner_params.append(where.recipient)
    source = "messages m"
    clauses.append("m.size >= 0")  # never a body still arriving (sqlite_stage)
    if inner and small_domain and where.domain is not None:
        source = (f"(SELECT DISTINCT r.message_id AS id FROM recipients r{domain_index} WHERE "
                  + " AND ".join(inner) + ") AS f CROSS JOIN messages m")
        clauses.insert(0, "m.id = f.id")
        params = inner_params + params
    elif inner:
        clauses.append("EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id AND "
                       + " AND ".join(inner) + ")")
        params += inner_params
    return f" {source}" + ((" WHERE " + " AND ".join(clauses)) if clauses else ""), params


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


def shape_from_domains(rows: Iterable[Sequence[Any]], deferred: Mapping[str, int],
                       message_row: Sequence[Any], buckets: int) -> QueueShape:
    """`QueueShape` from the one row per domain both engines compute from
    their index of (domain, state, arrival, message, size): (domain,
    messages, recipients, bytes, oldest, held, outbound, hold, then the
    recipients of each of the `buckets` age buckets); `deferred` is per
    domain, `message_row` the queue's (messages, bytes, oldest)."""
    figures: dict[str, list[Any]] = {}
    sizes: dict[str, int] = {}
    ages: dict[str, list[int]] = {}
    for row in rows:
        name = str(row[0])
        figures[name] = [int(row[1]), int(row[2]), row[4], int(row[5] or 0), int(row[6] or 0),
                         deferred.get(name, 0), int(row[7] or 0)]
        sizes[name] = int(row[3] or 0)
        ages[name] = [int(n or 0) for n in row[8:8 + buckets]]
    total_row = [sum(int(f[i]) for f in figures.values()) for i in (1, 3, 4, 5, 6)]
    return shape_from_rows(figures, sizes, ages, total_row, message_row, buckets)
