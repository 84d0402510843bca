"""What the status page reads from the store, as plain rows for the templates.

Contract:
- Every function here is synchronous (the app runs it in a worker thread)
  and uses only store calls (`queue_shape`, `queue_page`,
  `get_queue_entry`, `list_accounts`, `list_domains`, `get_domain`,
  `live_nodes`).
- `operator_overview` is the whole queue: held mail per domain, accounts
  and their domains, outbound mail deferred per destination (from the
  first `DEFERRED_SCAN` deferred messages, oldest first) with its newest
  reply, the messages matching the page's filter (at most `PAGE`), the
  nodes alive now with their live processes (`live_nodes`) and the nodes
  that accepted the queued mail among the first `NODE_SCAN`.
- `customer_held(store, account)` and `customer_message(store, account, id)`
  see only the account's domains: a message is shown with only its
  recipients in those domains (sender, size, age, state: never the
  content), and `customer_message` returns None for a message with no
  recipient there, exactly as for one that does not exist.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from fermoposta.store.base import (
    Account,
    AdminStore,
    DomainShape,
    NodeStatus,
    QueueEntry,
    QueueFilter,
    RecipientState,
)

PAGE = 100
DEFERRED_SCAN = 500
NODE_SCAN = 1000
CUSTOMER_PAGE = 200


@dataclass(slots=True)
class Deferred:
    domain: str
    recipients: int = 0
    messages: int = 0
    last_reply: str = ""
    attempts: int = 0


@dataclass(slots=True)
class Overview:
    held: list[DomainShape]
    total: DomainShape
    accounts: list[tuple[Account, list[str]]]
    deferred: list[Deferred]
    entries: list[QueueEntry]
    nodes: dict[str, int]  # queued messages each node accepted (of the oldest scanned)
    live: list[NodeStatus] = field(default_factory=list)  # nodes alive now
    deferred_scanned: int = 0
    node_scanned: int = 0
    domain_filter: str = ""
    state_filter: str = ""


@dataclass(slots=True)
class HeldRow:
    id: str
    sender: str
    size: int
    received_at: float
    recipients: list[tuple[str, str]] = field(default_factory=list)  # (address, state)


def _deferred(store: AdminStore) -> tuple[list[Deferred], int]:
    entries = store.queue_page(QueueFilter(state="deferred"), None, DEFERRED_SCAN)
    rows: dict[str, Deferred] = {}
    for entry in entries:  # oldest first: a newer message's reply wins
        seen: set[str] = set()
        for r in entry.message.recipients:
            if r.state is not RecipientState.OUTBOUND or r.attempts == 0:
                continue
            row = rows.setdefault(r.domain, Deferred(r.domain))
            row.recipients += 1
            row.attempts = max(row.attempts, r.attempts)
            if r.last_reply:
                row.last_reply = r.last_reply
            if r.domain not in seen:
                row.messages += 1
                seen.add(r.domain)
    return sorted(rows.values(), key=lambda d: (-d.recipients, d.domain)), len(entries)


def operator_overview(store: AdminStore, now: float, *, domain: str = "",
                      state: str = "") -> Overview:
    shape = store.queue_shape(now, ())
    domains = collections.defaultdict(list)
    for d in store.list_domains():
        domains[d.account].append(d.name)
    accounts = [(a, sorted(domains.get(a.name, []))) for a in store.list_accounts()]
    deferred, scanned = _deferred(store)
    where = QueueFilter(domain=domain or None, state=state or None)
    entries = store.queue_page(where, None, PAGE)
    sample = store.queue_page(QueueFilter(), None, NODE_SCAN)
    nodes = collections.Counter(e.message.node or "(unnamed)" for e in sample)
    return Overview(held=[d for d in shape.domains if d.held], total=shape.total,
                    accounts=accounts, deferred=deferred, entries=entries,
                    nodes=dict(sorted(nodes.items())), live=store.live_nodes(),
                    deferred_scanned=scanned,
                    node_scanned=len(sample), domain_filter=domain, state_filter=state)


def _row(entry: QueueEntry, domains: set[str]) -> HeldRow | None:
    m = entry.message
    mine = [(r.address, "on hold" if r.state is RecipientState.HOLD else r.state.value)
            for r in m.recipients if r.domain in domains]
    if not mine:
        return None
    return HeldRow(m.id, m.sender, m.size, m.received_at, mine)


def customer_held(store: AdminStore, account: str) -> tuple[list[str], list[HeldRow]]:
    """The account's domains and its held messages (oldest first)."""
    names = sorted(d.name for d in store.list_domains(account))
    rows: dict[str, HeldRow] = {}
    for name in names:
        for entry in store.queue_page(QueueFilter(domain=name), None, CUSTOMER_PAGE):
            row = _row(entry, set(names))
            if row is not None:
                rows[row.id] = row
    return names, sorted(rows.values(), key=lambda r: (r.received_at, r.id))


def customer_message(store: AdminStore, account: str, message_id: str) -> HeldRow | None:
    entry = store.get_queue_entry(message_id)
    if entry is None:
        return None
    return _row(entry, {d.name for d in store.list_domains(account)})
