"""The queue and account store interface (engine-neutral).

The store is split into the Protocols its callers need: `MessageQueue`
(enqueue, bodies, outcomes), `HoldQueue` (held mail, domain leases),
`OutboundQueue` (due recipients and their claims), `Directory` (accounts and
domains), `QueueTools` (the operator's paging and bulk actions), `Spool` (a
customer-side spool) and `RateCounter` (windowed counts); `Store` is all of
them, as an engine (SQLite, PostgreSQL) implements it.  Callers are typed
against the narrowest one they use, never against an engine class.

Contract:
- A message becomes visible only when `enqueue` returns: the body and every
  recipient row are committed in one durable transaction (fsync).  The SMTP
  layer answers 250 only after that.
- Recipients are rows; each leaves the queue only through `record_delivered`
  (a 2xx from the next hop) or `record_failed` (a 5xx, committed together
  with the DSN that tells the sender).  `record_deferred` keeps the row.
  A message whose last recipient is gone is deleted with its body.  A DSN
  passed to `record_failed` (or `mark_delay_notified`) is queued only if at
  least one of the recipients was still queued: a recipient is never
  reported twice.
- OUTBOUND recipients carry a retry schedule (`next_attempt_at`, None = due
  now; `first_failure_at`; `delay_notified`) and a *claim*:
  `claim_due_outbound` hands due recipients to one owner for `ttl` seconds
  (renewed with `renew_claims`), so two queue runners, in one process or
  several, never deliver the same recipient at once.  A claim ends with the
  recipient's outcome (`record_*`), with `release_claims`, or when it
  expires (a crashed runner's recipients become due again; a duplicate is
  possible, a loss is not).
- Bodies are streamed in and out in chunks (`CHUNK_SIZE`), so memory stays
  bounded whatever the message size.
- Domain leases are all-or-nothing and expire, so a crashed process can never
  block a domain forever and two ATRN sessions never drain one domain at once.
  An engine that can tell a holder is dead (SQLite: a lock file per process;
  PostgreSQL: a heartbeat row per process, dead after `node_timeout`
  seconds of silence) takes its leases, and its outbound claims, over at
  once; a live holder's lease is never taken.
- Several processes, and with PostgreSQL several nodes, share one store:
  every guarantee above holds across them.  `RateCounter` counts are shared
  too.  A message remembers the `node` that accepted it.
- All methods are synchronous and thread-safe; asyncio callers run them in a
  worker thread.  A failure of the engine raises `StoreError` (callers map it
  to a 4xx: a store problem defers mail, it never bounces it).
- Domains are stored lowercased in A-label form; addresses keep their case.
- A big body may be stored while it still arrives (`stage_body`, SQLite):
  its chunks are committed as they come under a placeholder that no view
  of the queue shows, and the `enqueue` that names the same queue id only
  adds the tail, the envelope and the recipients (a small commit after the
  last byte instead of the whole body).  Nothing staged is ever a message:
  `discard()`, or `sweep_stages()` once its process is dead, removes it.
- Queue tools (`fermoposta queue`, `fermoposta.provider.queue_admin`) read
  pages of the queue (`queue_page`, keyed by (received_at, id)) and act on
  explicit message ids (`delete_messages`, `hold_messages`,
  `release_messages`, `retry_outbound`, `requeue_messages`), each call one short transaction,
  so they are safe while a provider runs on the same store.  An operator
  HOLD recipient is neither drained, delivered nor expired; the state it had
  is remembered so `release_messages` restores it exactly.
"""

from __future__ import annotations

import asyncio
import enum
import io
import secrets
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Protocol

from fermoposta.smtp.credentials import CredentialsUnavailable
from fermoposta.smtp.credentials import ScramSecret as ScramSecret  # re-exported

CHUNK_SIZE = 256 * 1024


# A queue id leads with the time, so that messages stored together sit
# together in every index keyed by it (messages, body_chunks,
# recipients_message, recipients_state): a commit writes the few pages at
# the newest end of each instead of one page for every message.  Measured
# (bench/README.md, seventeenth session): a batch of ten 4 KiB messages
# committed in 0.62 ms instead of 0.99 on a SQLite store holding 200,000,
# and MX intake at `smtp-source -s 10` +7%.
QUEUE_ID_SLOTS_PER_SECOND = 256  # the time part's unit: 1/256 s
QUEUE_ID_SLOT_BITS = 20  # 5 hex digits: the time part wraps every 68 minutes
QUEUE_ID_RANDOM_BITS = 28  # 7 hex digits


def new_queue_id() -> str:
    """A Postfix-like queue id: 12 uppercase hex digits, the time in 1/256 s
    modulo 2**20 (5 digits) then 28 random bits (7 digits).  Two ids are
    alike only when drawn in the same 1/256 s, or a multiple of 68 minutes
    apart (the time part wraps), with the same random part; the stores then
    draw again (either engine's enqueue), so a queue id stays unique in the
    store."""
    slot = int(time.time() * QUEUE_ID_SLOTS_PER_SECOND) & ((1 << QUEUE_ID_SLOT_BITS) - 1)
    return f"{slot:05X}{secrets.randbits(QUEUE_ID_RANDOM_BITS):07X}"


class StoreError(CredentialsUnavailable):
    """The store cannot answer now (I/O error, locked, disk full, ...).

    A `CredentialsUnavailable`, so the SASL mechanisms (which know nothing of
    the store) fail temporarily when the account lookup cannot be made."""


class WouldBlock(Exception):
    """A `..._now` read cannot be answered without waiting (for a lock, the
    network or a busy file): make the call in a worker thread instead."""


class SchemaTooNew(StoreError):
    """The store was written by a newer fermoposta: a permanent condition (no
    retry will help; upgrade this node), unlike other `StoreError`s."""


class RecipientState(enum.StrEnum):
    HELD = "held"  # waiting for its customer to collect it over ODMR
    OUTBOUND = "outbound"  # waiting for outbound delivery (DSNs, submissions)
    HOLD = "hold"  # operator hold: neither drained nor delivered


class MessageOrigin(enum.StrEnum):
    MX = "mx"
    DSN = "dsn"
    SUBMISSION = "submission"


@dataclass(frozen=True, slots=True)
class NewRecipient:
    address: str
    domain: str
    state: RecipientState
    notify: str | None = None  # RFC 3461 NOTIFY value, as received
    orcpt: str | None = None  # RFC 3461 ORCPT value (addr-type;xtext), as received


@dataclass(frozen=True, slots=True)
class NewMessage:
    sender: str  # "" is the null reverse-path
    recipients: tuple[NewRecipient, ...]
    origin: MessageOrigin
    smtputf8: bool = False
    body_8bit: bool = False
    envid: str | None = None
    ret: str | None = None  # "FULL" | "HDRS" | None
    client: str = ""  # "helo[ip]" of the peer that handed it to us, for logs
    # The body goes on the wire as it is (see `QueuedMessage.wire_ready`):
    # set only by an intake that checked it.
    wire_ready: bool = False


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    id: int
    message_id: str
    address: str
    domain: str
    state: RecipientState
    attempts: int
    last_reply: str | None
    notify: str | None
    orcpt: str | None
    next_attempt_at: float | None = None  # OUTBOUND: when it is due again (None = now)
    first_failure_at: float | None = None  # time of the first deferral, if any
    delay_notified: bool = False  # a "delayed" DSN has been sent for it


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    id: str
    sender: str
    received_at: float  # Unix time
    size: int
    origin: MessageOrigin
    smtputf8: bool
    body_8bit: bool
    envid: str | None
    ret: str | None
    client: str
    recipients: tuple[QueuedRecipient, ...]
    node: str = ""  # the node that accepted it ("" if stored before nodes had names)
    # The stored body is SMTP text that needs no rewriting: CRLF line ends
    # only, a final CRLF (or nothing), and no line that begins with "." (the
    # intake's DATA reader saw no line-leading dot).  It then goes out as it
    # is: before ".CRLF" in DATA, or as BDAT octets (`net.client`), with no
    # pass over it.  False (the default, and every message stored before
    # this was recorded): the sender normalises and dot-stuffs as ever.
    wire_ready: bool = False


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    scram: ScramSecret | None
    # CRAM-MD5 (RFC 2195) needs a password-equivalent secret; None disables it
    # for this account.  See docs/security.md for the trade-off.
    cram_secret: str | None
    cert_fingerprints: tuple[str, ...] = ()  # lowercase hex SHA-256 of DER client certs
    # Subjects of client certificates (verified against `[tls] client_ca`), in
    # the canonical RFC 4514 form of `fermoposta.smtp.sasl.certificate_subject`:
    # a renewed certificate with the same subject keeps working.
    cert_subjects: tuple[str, ...] = ()
    created_at: float = 0.0
    last_atrn_at: float | None = None
    # Seconds a fruitless ATRN may wait for mail (RFC 2645 §4: the client
    # waits at least 10 minutes for the reply); None = answer 453 at once.
    atrn_wait: float | None = None


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    account: str
    max_messages: int | None = None  # quota of held messages; None = unlimited
    max_bytes: int | None = None  # quota of held bytes; None = unlimited
    # Known local parts; None means "accept any local part" (no validation).
    valid_recipients: frozenset[str] | None = field(default=None)
    # Seconds held mail waits for collection before it expires with a DSN;
    # None = the `[hold] lifetime` of the config.
    hold_lifetime: float | None = None
    # ETRN (RFC 1985): None = not an ETRN domain; "" = its held mail goes to
    # the domain's MX hosts better than this provider on ETRN; "host" or
    # "host:port" = to that server.  Never set from what an SMTP client says.
    etrn: str | None = None


@dataclass(frozen=True, slots=True)
class EtrnStarted:
    """What `HoldQueue.start_etrn` did."""

    messages: int = 0  # distinct messages with at least one recipient made due
    recipients: int = 0  # HELD recipients now OUTBOUND, plus OUTBOUND ones made due
    busy: tuple[str, ...] = ()  # domains left alone: an ATRN session holds their lease


# --- queue tools (`fermoposta queue`) ----------------------------------------------------

QUEUE_STATES = ("held", "outbound", "deferred", "hold")
"""Values of `QueueFilter.state`: a RecipientState, or "deferred" (OUTBOUND
with at least one failed attempt)."""


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """Which messages a queue tool sees.  A message matches when its sender
    and arrival match and at least one of its recipients matches every
    recipient criterion (domain, recipient, state).  Text is compared
    case-insensitively (ASCII); "exact" compares the whole value, otherwise
    it is a substring.  `sender=""` with `sender_exact` is the null sender."""

    domain: str | None = None  # recipient domain, exactly (lowercase A-label)
    sender: str | None = None
    sender_exact: bool = False
    recipient: str | None = None
    recipient_exact: bool = False
    received_before: float | None = None  # Unix time
    state: str | None = None  # one of QUEUE_STATES


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """A message with all its recipients, as the queue tools show it."""

    message: QueuedMessage
    # Recipients a queue runner is delivering right now (an unexpired claim).
    active: frozenset[int] = frozenset()
    # For recipients on operator HOLD: the state `release_messages` restores.
    hold_from: Mapping[int, RecipientState] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A node (the `[store] node` name of its processes) sharing the store."""

    node: str
    processes: int  # its live processes
    started_at: float | None  # when the oldest of them started (None: not known)
    last_seen: float | None  # seconds since its latest heartbeat (0: now; None: not kept)


@dataclass(frozen=True, slots=True)
class DomainShape:
    """Queue figures for one recipient domain (or the whole queue)."""

    domain: str
    messages: int  # distinct messages with a recipient here
    recipients: int
    bytes: int  # size of those messages, each counted once
    oldest: float | None  # received_at of the oldest of them
    held: int  # recipients by state; `deferred` is the part of `outbound`
    outbound: int  # that has failed at least once
    deferred: int
    hold: int
    ages: tuple[int, ...]  # recipients per age bucket (see `Store.queue_shape`)


@dataclass(frozen=True, slots=True)
class Requeued:
    """What `QueueTools.requeue_messages` changed in one message."""

    to_outbound: int = 0  # HELD recipients of a domain no longer hosted, now OUTBOUND
    to_held: int = 0  # OUTBOUND recipients of a domain hosted now, now HELD
    on_hold: int = 0  # HOLD recipients whose remembered state was corrected so


@dataclass(frozen=True, slots=True)
class QueueShape:
    total: DomainShape  # domain "": every recipient and message once
    domains: tuple[DomainShape, ...]  # most recipients first, then by name


class BodyStage(Protocol):
    """A body being stored while it arrives (`MessageQueue.stage_body`)."""

    @property
    def size(self) -> int:
        """Bytes stored so far (an `enqueue` of this queue id adds the rest)."""
        ...

    @property
    def failed(self) -> bool:
        """Whether staging has ended in a failure (nothing more is stored)."""
        ...

    def append(self, data: bytes) -> None:
        """Store the next bytes, committed (blocking).  Never raises: a store
        failure ends the staging (logged); the `enqueue` then stores the
        whole body as usual."""
        ...

    def discard(self) -> None:
        """Remove what was staged unless an `enqueue` made it a message
        (blocking, idempotent; a failure is logged and left to
        `sweep_stages`)."""
        ...


class MessageQueue(Protocol):
    """Messages and their recipients' outcomes: what every session that takes
    mail in or hands it on needs (the MX, submission, the drain, the outbound
    engine, the customer's spools)."""

    def stage_body(self, queue_id: str, body: IO[bytes]) -> BodyStage | None:
        """Start storing `body` (the file the message's body is being written
        to), to be enqueued as `queue_id`, while it still arrives; None when
        the engine stores bodies only at `enqueue` (PostgreSQL).  The
        placeholder is made by the first `append`; `enqueue(..., body,
        queue_id)` with that same file object (the staged part is skipped)
        turns it into the message: a stage is never taken by another
        message, even one that drew the same queue id."""
        ...

    def sweep_stages(self) -> int:
        """Remove what processes that are gone had staged (a crash before
        the end of DATA: that mail was never accepted); return how many
        bodies.  PostgreSQL stages nothing: 0."""
        ...

    @property
    def node(self) -> str:
        """The name of this node (process group) in logs, metrics and `queue show`."""
        ...

    def holder_is_current(self) -> bool:
        """Whether this process's leases and claims are surely still its own.
        An engine whose holders can be declared dead while they run
        (PostgreSQL: a heartbeat that has not reached the database for half of
        `node_timeout`) says False before another node may take them over;
        the drain and the outbound engine then start no new transaction.
        Never blocks (no I/O).  SQLite: always True (a live process's lock
        file is never taken)."""
        ...

    def enqueue(self, message: NewMessage, body: IO[bytes], queue_id: str | None = None) -> str:
        """Store durably; return the queue id.  `body` is read in chunks.

        `queue_id` (from `new_queue_id()`) lets the caller name the message in
        its trace header before storing it; a colliding id is replaced."""
        ...

    def enqueue_now(self, message: NewMessage, body: IO[bytes],
                    queue_id: str | None = None) -> str:
        """`enqueue` on the caller's thread when it needs no wait but the
        commit's own fsync (the event loop calls it for a lone message, to
        spare two thread hops): `WouldBlock` when it would wait for a lock
        or the network, or copy more than a little of the body; then call
        `enqueue` in a worker thread.  Nothing is stored, and the body is
        where it was, when it raises `WouldBlock`."""
        ...

    async def enqueue_async(self, message: NewMessage, body: IO[bytes],
                            queue_id: str | None = None) -> str:
        """`enqueue` by the event loop without blocking it (PostgreSQL: a
        connection of the loop's own), for a lone message: `WouldBlock`
        when the engine cannot (SQLite: always, it has `enqueue_now`), the
        body is more than one chunk, or the statement could not be applied
        (nothing is stored then, and the body is where it was); then call
        `enqueue` in a worker thread."""
        ...

    async def enqueue_batch_async(self, items: Sequence[tuple[NewMessage, IO[bytes], str | None]]
                                  ) -> list[str]:
        """`enqueue_batch` by the event loop without blocking it, under
        `enqueue_async`'s terms (PostgreSQL: one statement on the loop's
        connection; SQLite: always `WouldBlock`, it has `enqueue_batch_now`):
        every body one chunk at most; all stored or none.  Nothing is
        stored, and every body is where it was, when it raises `WouldBlock`;
        then call `enqueue_batch` in a worker thread."""
        ...

    def enqueue_batch(self, items: Sequence[tuple[NewMessage, IO[bytes], str | None]]
                      ) -> list[str]:
        """Store every item (message, body, queue id) in ONE transaction with
        one durable commit; return their queue ids in order.  All or nothing:
        on any failure nothing is stored and the exception propagates (the
        caller may retry the items one by one: `group_commit.GroupCommit`)."""
        ...

    def enqueue_batch_now(self, items: Sequence[tuple[NewMessage, IO[bytes], str | None]]
                          ) -> list[str]:
        """`enqueue_batch` on the caller's thread (the event loop's group
        commit) under `enqueue_now`'s terms: `WouldBlock` when it would wait
        for a lock or the network, or copy more than a little body in all;
        then call `enqueue_batch` in a worker thread.  Nothing is stored, and
        every body is where it was, when it raises `WouldBlock`."""
        ...

    def get_message(self, message_id: str) -> QueuedMessage | None: ...

    def read_body(self, message_id: str) -> Iterator[bytes]:
        """Yield the body in chunks of at most CHUNK_SIZE bytes."""
        ...

    def read_ahead(self, message_ids: Sequence[str], body_limit: int,
                   body_budget: int | None = None
                   ) -> list[tuple[QueuedMessage | None, bytes | None]]:
        """`get_message` of each id, in order (None: no longer queued), with
        the whole body of each message of at most `body_limit` (<=
        CHUNK_SIZE) bytes, else None (stream it with `read_body`), in one
        read (the drain reads ahead in batches: one thread hop and a few
        queries instead of several per message).  `body_budget` bounds the
        bytes of the bodies returned: taken in id order while their total
        stays within it (None: no bound).  A body that does not add up to
        its message's size (the message left the queue meanwhile) is None
        too, so the caller's `read_body` reports it."""
        ...

    def record_delivered(self, recipient_ids: Collection[int], reply: str,
                         dsn: tuple[NewMessage, IO[bytes]] | None = None) -> str | None:
        """Remove the recipients (a 2xx from the next hop), and queue `dsn` (a
        success notice, RFC 3461 SUCCESS) in the same transaction if given and
        at least one recipient was still queued; return its id."""
        ...

    def record_deferred(
        self,
        recipient_ids: Collection[int],
        reply: str,
        next_attempt_at: float | Mapping[int, float] | None = None,
    ) -> None:
        """Keep the recipients: attempts + 1, `last_reply`, `first_failure_at`
        set on the first deferral, claim released.  `next_attempt_at` (one
        time for all, or per recipient id) is when an OUTBOUND recipient is due
        again; None means at once (HELD recipients wait for ATRN anyway)."""
        ...

    def record_failed(
        self,
        recipient_ids: Collection[int],
        reply: str,
        dsn: tuple[NewMessage, IO[bytes]] | None,
    ) -> str | None:
        """Remove the recipients and enqueue `dsn` in one transaction; return its id.

        The DSN is queued only if at least one recipient was still queued."""
        ...


class Spool(MessageQueue, Protocol):
    """A customer-side spool (the outbox, the local retry spool): a queue read
    whole, oldest first."""

    def message_ids(self, state: RecipientState | None = None) -> list[str]:
        """Ids of messages with at least one recipient (in `state` if given),
        oldest first (received_at, then id)."""
        ...

    def recipient_count(self) -> int:
        """How many recipients the store holds, in every state."""
        ...

    def close(self) -> None: ...


class HeldMailNotices(Protocol):
    """Notices that recipients became HELD (committed), by domain."""

    def wait(self, timeout: float) -> set[str]:
        """The domains noticed within `timeout` seconds (empty: none); blocks.
        `StoreError` when the connection is lost: make a new listener."""
        ...

    def close(self) -> None: ...


class HoldQueue(MessageQueue, Protocol):
    """Held mail and the domain leases of ATRN sessions: what the MX (quotas),
    the ODMR service, the drain and held-mail expiry need."""

    def held_message_ids(self, domains: Collection[str]) -> list[str]:
        """Ids of messages with HELD recipients in `domains`, oldest first."""
        ...

    def domains_with_held_mail(self, domains: Collection[str]) -> set[str]: ...

    def held_mail_notices(self) -> HeldMailNotices | None:
        """A listener for "held mail was committed for these domains" from
        every process and node on this store, or None when the engine has
        none (SQLite: the caller polls `domains_with_held_mail`)."""
        ...

    def domain_usage(self, domain: str) -> tuple[int, int]:
        """(messages, bytes) held for `domain`, for quotas."""
        ...

    def acquire_leases(self, domains: Collection[str], owner: str, ttl: float, *,
                       atrn_by: tuple[str, float] | None = None,
                       durable: bool = True) -> bool:
        """Lease every domain to `owner` or none; expired leases, and those of a
        holder known to be dead, are taken over.  `atrn_by` (account, time):
        when the leases are taken, that account's ATRN is recorded in the same
        transaction (`record_atrn`); when they are not, nothing is recorded.
        Not `durable`: the commit is visible to every session and node at
        once but does not wait for the disk (SQLite `synchronous=NORMAL`,
        PostgreSQL `synchronous_commit=off`), for an ATRN's leases: a crash
        that forgets them also ends the drain that held them (at worst a
        message goes twice, as after any crash), and the next durable
        commit makes them durable too."""
        ...

    def renew_leases(self, owner: str, ttl: float) -> None: ...

    def release_leases(self, owner: str) -> None: ...

    def held_older_than(
        self,
        cutoff: float,
        limit: int,
        *,
        domains: Collection[str] | None = None,
        default_lifetime_only: bool = False,
        delay_notified: bool | None = None,
    ) -> list[QueuedMessage]:
        """HELD recipients of messages received before `cutoff`, oldest first,
        at most `limit`, as messages with only those recipients.  Only in
        `domains` if given (at most 500; ValueError beyond); with
        `default_lifetime_only`, not in a domain that has its own
        `hold_lifetime`; with `delay_notified` equal to the given value if not
        None.  Recipients of a domain leased by an ATRN session right now are
        left out (the drain owns them)."""
        ...

    def start_etrn(self, domains: Collection[str], now: float) -> EtrnStarted:
        """ETRN (RFC 1985) for `domains` (at most 500; ValueError beyond), in
        one transaction: their HELD recipients become OUTBOUND, due at `now`
        (attempts, replies and first failure kept), and their OUTBOUND ones
        not claimed by a runner right now are made due at `now`.  A domain
        leased by a live ATRN session is left alone (the drain owns its
        mail) and named in `busy`."""
        ...

    # Shared with OutboundQueue: delay notices for held and outbound mail alike.
    def mark_delay_notified(
        self, recipient_ids: Collection[int], dsn: tuple[NewMessage, IO[bytes]] | None = None
    ) -> str | None:
        """Set `delay_notified` and queue `dsn` (a "delayed" DSN) in one
        transaction; return the DSN's id (None if none was queued)."""
        ...


class OutboundQueue(MessageQueue, Protocol):
    """Mail for the Internet: due recipients claimed by one queue runner at a
    time, across processes and nodes."""

    def claim_due_outbound(
        self, now: float, limit: int, owner: str, ttl: float
    ) -> list[QueuedMessage]:
        """Claim up to `limit` OUTBOUND recipients due at `now` (not claimed by
        anyone, or whose claim has expired) for `owner` until `now + ttl`,
        oldest due first.  Returns their messages, each with only the claimed
        recipients."""
        ...

    def renew_claims(self, owner: str, now: float, ttl: float) -> None:
        """Extend every claim of `owner` to `now + ttl`."""
        ...

    def release_claims(self, owner: str, recipient_ids: Collection[int] | None = None,
                       next_attempt_at: float | None = None) -> None:
        """End the claims of `owner` (all, or only on `recipient_ids`); the
        recipients are due at `next_attempt_at` (None = at once).  Recipients
        claimed by someone else are left alone."""
        ...

    def return_to_held(self, recipient_ids: Collection[int], reply: str) -> None:
        """A deferral that puts OUTBOUND recipients back on hold (an ETRN
        delivery that failed for now: it waits for the next ETRN or the hold
        lifetime): attempts + 1, `last_reply`, `first_failure_at` set on the
        first deferral, state HELD, no retry time, claim released.
        Recipients in another state are left alone."""
        ...

    def outbound_older_than(self, cutoff: float, limit: int) -> list[QueuedMessage]:
        """OUTBOUND recipients of messages received before `cutoff`, oldest
        first, at most `limit` (claimed or not): for queue tools and checks."""
        ...

    def mark_delay_notified(
        self, recipient_ids: Collection[int], dsn: tuple[NewMessage, IO[bytes]] | None = None
    ) -> str | None: ...


class Directory(Protocol):
    """Accounts (credentials, certificate bindings) and their hosted domains."""

    def add_account(self, account: Account) -> None:
        """Raise KeyError-free `ValueError` if the name exists, or if one of its
        certificate fingerprints or subjects is bound to another account."""
        ...

    def update_account(self, account: Account) -> None: ...

    def get_account(self, name: str) -> Account | None: ...

    def account_by_fingerprint(self, fingerprint: str) -> Account | None: ...

    def account_by_subject(self, subject: str) -> Account | None:
        """The account bound to a certificate subject (compared exactly, as stored)."""
        ...

    def list_accounts(self) -> list[Account]: ...

    def remove_account(self, name: str) -> bool:
        """Remove the account and its domains; False if it did not exist."""
        ...

    def record_atrn(self, name: str, at: float, *, durable: bool = True) -> None:
        """The account's last ATRN (`last_atrn_at`); not `durable`: as for
        `acquire_leases` (a crash may forget it: the rate limit then lets
        the next ATRN through sooner)."""
        ...

    def add_domain(self, domain: Domain) -> None:
        """Raise `ValueError` if the domain exists or the account does not."""
        ...

    def update_domain(self, domain: Domain) -> None: ...

    def get_domain(self, name: str) -> Domain | None: ...

    def get_domain_now(self, name: str) -> Domain | None:
        """`get_domain`, answered at once on the calling thread (the event
        loop: the MX asks it for every RCPT) or `WouldBlock` when that would
        mean waiting.  SQLite: a read on a second, read-only connection (a WAL
        reader never waits for the writer), `WouldBlock` while it is in use
        or the file is busy.  PostgreSQL: from the process's cache of answers
        while a LISTEN proves it current (`store.pg_domain_cache`), else
        `WouldBlock` (the network)."""
        ...

    def list_domains(self, account: str | None = None) -> list[Domain]: ...

    def domain_names(self, account: str) -> frozenset[str]:
        """The names of the account's domains (empty for an unknown account):
        what an ATRN checks, without `list_domains`' `Domain` objects and
        valid recipients (0.29 against 0.06 ms for 100 domains)."""
        ...

    def remove_domain(self, name: str) -> bool: ...

    def etrn_domains(self, name: str, *, subdomains: bool = False) -> list[str]:
        """The ETRN domains (`Domain.etrn` set) named `name`, and with
        `subdomains` also those under it (``sub.name``), sorted."""
        ...


def bytes_after(body: IO[bytes]) -> int | None:
    """How many bytes follow `body`'s position (what an enqueue would read);
    None when it cannot tell (not seekable, or `tell`/`seek` fail).  The
    position is kept: `StoreError` if it cannot be put back."""
    try:
        if not body.seekable():
            return None
        start = body.tell()
    except (OSError, ValueError):
        return None
    try:
        return body.seek(0, io.SEEK_END) - start
    except (OSError, ValueError):
        return None
    finally:
        try:
            body.seek(start)
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot rewind the body to store it: {exc}") from exc


def bodies_within(messages: dict[str, QueuedMessage], message_ids: Sequence[str],
                  body_limit: int, body_budget: int | None) -> list[str]:
    """The ids whose bodies `read_ahead` returns: non-empty, at most
    `body_limit` (and CHUNK_SIZE: one chunk) bytes, in id order while their
    total stays within `body_budget`."""
    chosen: list[str] = []
    total = 0
    for message_id in dict.fromkeys(message_ids):
        message = messages.get(message_id)
        if message is None or not 0 < message.size <= min(body_limit, CHUNK_SIZE):
            continue
        if body_budget is not None and total + message.size > body_budget:
            break
        total += message.size
        chosen.append(message_id)
    return chosen


def read_ahead_result(message_ids: Sequence[str], messages: dict[str, QueuedMessage],
                      bodies: dict[str, bytes]
                      ) -> list[tuple[QueuedMessage | None, bytes | None]]:
    """`read_ahead`'s answer from what an engine read: in id order, a body
    only where it adds up to its message's size (b"" for an empty one)."""
    result: list[tuple[QueuedMessage | None, bytes | None]] = []
    for message_id in message_ids:
        message = messages.get(message_id)
        body = None
        if message is not None:
            body = b"" if message.size == 0 else bodies.get(message_id)
            if body is not None and len(body) != message.size:
                body = None
        result.append((message, body))
    return result


async def lookup_domain(directory: Directory, name: str) -> Domain | None:
    """`get_domain` for a coroutine: answered on the event loop when the
    engine can do so at once (`get_domain_now`), else in a worker thread;
    a thread hop costs more than the read."""
    try:
        return directory.get_domain_now(name)
    except WouldBlock:
        return await asyncio.to_thread(directory.get_domain, name)



class QueueTools(Protocol):
    """Operator commands (`fermoposta queue`), safe on a live queue: every call
    is one short transaction, so the providers keep running meanwhile."""

    def queue_page(
        self, where: QueueFilter, after: tuple[float, str] | None, limit: int
    ) -> list[QueueEntry]:
        """Up to `limit` messages matching `where`, oldest first (by
        received_at, then id), after the key `after` (the (received_at, id)
        of the last message of the previous page; None for the first page).
        Each entry has all the message's recipients."""
        ...

    def queue_ids(
        self, where: QueueFilter, after: tuple[float, str] | None, limit: int
    ) -> list[tuple[float, str]]:
        """Like `queue_page`, only the (received_at, id) keys."""
        ...

    def count_queue(self, where: QueueFilter, received_after: float | None = None) -> int:
        """How many messages match `where` (and arrived strictly after
        `received_after`, if given): what paging through `queue_ids` would
        count, in one query."""
        ...

    def get_queue_entry(self, message_id: str) -> QueueEntry | None: ...

    def delete_messages(self, message_ids: Collection[str]) -> list[str]:
        """Delete the messages, bodies and recipients, without any DSN (like
        `postsuper -d`); return the ids that were in the queue."""
        ...

    def hold_messages(self, message_ids: Collection[str]) -> dict[str, int]:
        """Put every recipient of the messages on operator HOLD (neither
        drained nor delivered), remembering its state; return, for each id in
        the queue, how many recipients were newly put on hold."""
        ...

    def release_messages(self, message_ids: Collection[str]) -> dict[str, int]:
        """Return the HOLD recipients of the messages to the state they had
        before `hold_messages` (HELD for a hosted domain, else OUTBOUND, when
        none was remembered); their retry schedule is unchanged.  Return, for
        each id in the queue, how many recipients were released."""
        ...

    def retry_outbound(
        self, now: float, *, message_ids: Collection[str] | None = None,
        domain: str | None = None
    ) -> dict[str, int]:
        """Make OUTBOUND recipients due at `now` (of `message_ids` and/or of
        `domain`; all if both are None), except those claimed by a runner
        right now.  Return, per message in the queue (each of `message_ids`
        that exists, or each message touched), the recipients made due."""
        ...

    def requeue_messages(self, message_ids: Collection[str], now: float) -> dict[str, Requeued]:
        """Run the recipients of the messages through the routing check again
        (like `postsuper -r`), as after a domain was added or removed: a HELD
        recipient whose domain is no longer hosted becomes OUTBOUND, due at
        `now`; an OUTBOUND one whose domain is hosted now becomes HELD (no
        retry time); attempts, replies and first failure are kept.  A HOLD
        recipient stays on hold, its remembered state corrected the same way,
        so `release_messages` puts it where it now belongs.  OUTBOUND
        recipients claimed by a runner right now are left alone.  Return, for
        each id in the queue, what changed (all zeros: nothing to change)."""
        ...

    def queue_shape(self, now: float, age_limits: Sequence[float]) -> QueueShape:
        """Per recipient domain: messages, recipients, bytes, oldest, counts
        by state, and recipients per age bucket, like Postfix's qshape: bucket
        i holds ages below `age_limits[i]` seconds (and at least the previous
        limit), the last one (len(age_limits)) the rest."""
        ...

    def queue_summary(self) -> list[tuple[str, int, int, float | None]]:
        """(state, messages, bytes, oldest received_at) for each
        RecipientState, zeros included, for the metrics collector.  A message
        with recipients in several states counts in each."""
        ...

    def live_nodes(self) -> list[NodeStatus]:
        """The nodes whose processes are alive now, by name.  PostgreSQL:
        every node whose heartbeat is younger than `node_timeout`, with its
        live processes and its latest heartbeat (by the database's clock).
        SQLite (one machine): this node, with the live processes that hold a
        lock file under `holders/` (this one included); no heartbeat kept."""
        ...


class RateCounter(Protocol):
    """Events counted in a sliding window, shared by every process and node on
    the store (per-account submission rates)."""

    def add_event(self, key: str, at: float, window: float) -> int:
        """Record one event of `key` at `at`, forget those older than
        `at - window`, and return how many events of `key` fall in
        (at - window, at], this one included."""
        ...

    def count_events(self, key: str, since: float) -> int:
        """How many events of `key` are later than `since`."""
        ...


class Importer(Protocol):
    """The receiving side of `fermoposta store copy` (growing from one node)."""

    def is_empty(self) -> bool:
        """True when the store holds no account, no domain and no message."""
        ...

    def import_message(self, entry: QueueEntry, body: IO[bytes]) -> None:
        """Store a message exactly as `entry` has it: its id, arrival time,
        node and parameters, and every recipient with its state, attempts,
        last reply, retry schedule, delay flag and the state an operator HOLD
        remembers (`entry.hold_from`); in one durable transaction.  Recipient
        ids are new; claims are not copied (the copy is made with the
        providers stopped).  `ValueError` if a message with that id exists."""
        ...


class HostedMail(HoldQueue, Directory, Protocol):
    """Held mail with the domains it is held for: the MX, the ODMR service,
    the drain and held-mail expiry."""


class OutboundMail(OutboundQueue, Directory, Protocol):
    """Outbound mail with the hosted domains (a DSN to a hosted sender is held)."""


class AdminStore(QueueTools, MessageQueue, Directory, Protocol):
    """What the queue tools use: paging and bulk actions, bodies, bounces."""


class Store(HoldQueue, OutboundQueue, Directory, QueueTools, RateCounter, Spool, Importer,
            Protocol):
    """The whole store, as an engine implements it and `open_store` returns it.
    Callers take the narrowest of the Protocols above that they need."""

    def schema_version(self) -> int:
        """The version of the schema the store holds now."""
        ...

    def migrate(self) -> tuple[int, int]:
        """Bring the schema up to date (also done on opening); return the
        versions (before, after).  Safe when several processes start at once."""
        ...

    def close(self) -> None: ...
