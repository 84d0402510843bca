"""The customer's outbox: the site's SMTP listener for outgoing mail, and its spool.

Contract:
- The spool is a store of its own (`open_spool`, a SQLite file) at ``<data_dir>/outbox.sqlite3``
  (`open_outbox`), never the provider's store.  An outgoing message is one
  stored message whose recipients are OUTBOUND (waiting for the push to the
  provider's submission service, `fermoposta.customer.outbox_push`); a
  recipient leaves only through the store's `record_delivered` (the provider
  answered 2xx to the final dot) or `record_failed` (5xx, committed together
  with the notice for the local sender).  Such a notice is a message in the
  same spool whose one recipient (the local sender) is HELD: waiting for the
  site's own delivery, not for the provider.  `outbox_message_ids` and
  `notice_message_ids` list the two kinds, oldest first.
- `OutboxServer` listens on ``[outbox] listen`` (no TLS: a LAN service) and
  runs an `OutboxSession` per client:
  * a client outside ``[outbox] networks`` gets ``554 5.7.1`` instead of the
    greeting and is disconnected;
  * with ``users_file`` every client must AUTH before MAIL (``530 5.7.0``):
    SCRAM-SHA-256 and CRAM-MD5 (no password on the wire), PLAIN and LOGIN
    only with ``allow_plaintext_auth`` (the same `Authenticator` as the
    provider's listeners, over the users of that file);
  * with ``restrict_senders`` the envelope sender must be in one of the
    site's domains (``553 5.7.1``; the null sender is accepted: a local MTA's notices);
  * ANY recipient with a domain is accepted: the outbox is the site's
    smarthost; ``RCPT TO:<postmaster>`` without a domain gets ``550 5.1.3``;
  * SIZE (``[outbox] max_message_size``), 8BITMIME, SMTPUTF8, PIPELINING,
    DSN (NOTIFY, ORCPT, RET, ENVID are stored and passed on to the
    provider), ENHANCEDSTATUSCODES; smuggling-safe DATA (`TransactionSession`);
  * the final dot is answered ``250 2.0.0 OK queued as <qid>`` only after
    the SQLite commit (``451 4.3.0`` when the spool fails: the client keeps
    the message); then `on_queued` is called (the continuous push wakes up);
  * a client's whole DATA must end within 10 minutes and its session within
    an hour (``421 4.4.2`` then, nothing of an unfinished message kept).
- Logs are Postfix-like lines of component ``outbox`` keyed by the outbox's
  own queue id (12 hex digits, also in our ``Received:`` header):
  ``<qid>: client=<helo>[<ip>][, sasl_username=<user>]`` and
  ``<qid>: from=<sender>, size=<n>, nrcpt=<n>, status=queued``.
- `read_users_file` parses a users file; its errors name the file and line,
  never a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ClassVar, cast

from fermoposta.customer.config import CustomerConfig, OutboxConfig
from fermoposta.customer.errors import ConfigFailure, CustomerError
from fermoposta.mail.auth import Authenticator
from fermoposta.net.connection import Connection, start_server
from fermoposta.net.server_session import SessionLimits
from fermoposta.net.transaction import Recipient, Transaction, TransactionSession
from fermoposta.ops.log import event
from fermoposta.smtp import reply as R
from fermoposta.smtp.command import Path as MailPath
from fermoposta.smtp.command import normalize_domain, split_address
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.sasl import make_scram_secret
from fermoposta.smtp.server import AUTH_IN_TRANSACTION, Needs, VerbSpec, verb_table
from fermoposta.store import Spool, open_spool
from fermoposta.store.base import (
    Account,
    Directory,
    MessageOrigin,
    MessageQueue,
    NewMessage,
    NewRecipient,
    RecipientState,
    StoreError,
    new_queue_id,
)

__all__ = [
    "OUTBOX_FILENAME",
    "ListenFailure",
    "OutboxServer",
    "OutboxSession",
    "notice_message_ids",
    "open_outbox",
    "outbox_message_ids",
    "outbox_path",
    "read_users_file",
]

log = logging.getLogger("fermoposta.outbox")

OUTBOX_FILENAME = "outbox.sqlite3"
#: Concurrent client sessions; more get 421 (a LAN service, not an MX).
MAX_SESSIONS = 100
# The provider's [limits] defaults: one message's DATA, one whole session.
OUTBOX_DATA_DEADLINE = 600.0
OUTBOX_SESSION_DEADLINE = 3600.0
#: The mechanisms offered with a users file, strongest first; PLAIN and LOGIN
#: are filtered out by the `Authenticator` unless ``allow_plaintext_auth``.
OUTBOX_MECHANISMS = ("SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN")

NOT_ALLOWED = Reply(554, "5.7.1", "Access denied: this client is not in the outbox's networks")
TOO_MANY_SESSIONS = Reply(421, "4.3.2", "Too many connections, try again later")
SENDER_NOT_LOCAL = Reply(553, "5.7.1", "Sender address rejected: not a domain of this site")
RECIPIENT_NEEDS_DOMAIN = Reply(550, "5.1.3", "Recipient address rejected: a domain is required")
SPOOL_FAILED = Reply(451, "4.3.0", "Temporary local problem (outbox spool), try again later")


class ListenFailure(CustomerError):
    """The outbox listener cannot listen on its address (in use, not ours): exit 71."""

    exit_code = 71  # EX_OSERR, as the provider's "cannot listen"
    kind = "listen"


# ---------------------------------------------------------------------------
# The spool.
# ---------------------------------------------------------------------------


def outbox_path(config: CustomerConfig) -> Path:
    return config.data_dir / OUTBOX_FILENAME


def open_outbox(config: CustomerConfig) -> Spool:
    """Open (creating it if needed) ``<data_dir>/outbox.sqlite3``.  Raises `StoreError`."""
    return open_spool(outbox_path(config))


def outbox_message_ids(store: Spool) -> list[str]:
    """Ids of the messages with recipients still to push (OUTBOUND), oldest first."""
    return store.message_ids(RecipientState.OUTBOUND)


def notice_message_ids(store: Spool) -> list[str]:
    """Ids of the notices waiting for local delivery (HELD recipients), oldest first."""
    return store.message_ids(RecipientState.HELD)


# ---------------------------------------------------------------------------
# AUTH for LAN clients.
# ---------------------------------------------------------------------------


def read_users_file(path: Path) -> dict[str, str]:
    """``user:password`` lines (``#`` comments, blank lines ignored) as a dict.

    Raises ValueError naming the file and the line, never the password."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{path}: line {number}: expected user:password")
        if user != user.strip() or any(ord(c) < 0x21 or ord(c) == 0x7F for c in user):
            raise ValueError(f"{path}: line {number}: a user name without spaces or controls")
        if user in users:
            raise ValueError(f"{path}: line {number}: user {user!r} is listed twice")
        users[user] = password
    return users


class _UserAccounts:
    """The users file seen as the part of a `Store` the `Authenticator` reads:
    accounts by name (a SCRAM verifier and the CRAM-MD5 secret); no
    certificates (there is no TLS on this listener)."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self.accounts = {
            name: Account(name=name, scram=make_scram_secret(password), cram_secret=password)
            for name, password in users.items()
        }

    def get_account(self, name: str) -> Account | None:
        return self.accounts.get(name)

    def account_by_fingerprint(self, fingerprint: str) -> Account | None:
        return None

    def account_by_subject(self, subject: str) -> Account | None:
        return None


@dataclass(frozen=True, slots=True)
class _AuthPolicy:
    mechanisms: tuple[str, ...]
    allow_plaintext_auth: bool
    require_tls: bool = False
    max_auth_failures: int = 3


# ---------------------------------------------------------------------------
# The session.
# ---------------------------------------------------------------------------


class OutboxSession(TransactionSession):
    """One client of the outbox; see the module docstring."""

    component = "outbox"
    dsn_extension = True

    def __init__(
        self,
        conn: Connection,
        *,
        config: CustomerConfig,
        limits: SessionLimits,
        store: MessageQueue,
        accounts: _UserAccounts | None,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(conn, hostname=config.hostname, limits=limits, tls_context=None)
        self.config = config
        self.outbox: OutboxConfig = config.outbox
        self.store = store
        self.on_queued = on_queued
        self.auth: Authenticator | None = None
        if accounts is not None:
            policy = _AuthPolicy(OUTBOX_MECHANISMS, self.outbox.allow_plaintext_auth)
            # The Authenticator reads only accounts by name (and certificates,
            # of which there are none here) from its store.
            self.auth = Authenticator(self, cast(Directory, accounts), policy)

    @property
    def authenticated_as(self) -> str | None:  # type: ignore[override]
        return self.auth.account if self.auth is not None else None

    async def on_connect(self) -> Reply | None:
        if not self.outbox.allows(self.conn.peer_ip):
            self.log.info("%s: reject: connect from [%s]: not in [outbox] networks",
                          self.session_id, self.conn.peer_ip)
            return NOT_ALLOWED
        self.log.info("%s: connect from [%s]", self.session_id, self.conn.peer_ip)
        return None

    def greeting(self) -> Reply:
        return Reply(220, None, f"{self.hostname} ESMTP fermoposta outbox")

    def extensions(self) -> list[str]:
        auth: list[str] = []
        if self.auth is not None and self.auth.account is None:
            mechanisms = self.auth.offered_mechanisms()
            if mechanisms:
                auth = [f"AUTH {' '.join(mechanisms)}"]
        return [*auth, *super().extensions()]

    async def smtp_auth(self, arg: str) -> Reply | None:
        if self.auth is None:
            return R.NOT_IMPLEMENTED
        return await self.auth.smtp_auth(arg)

    async def smtp_mail(self, arg: str) -> Reply:
        if self.auth is not None and self.auth.account is None:
            return R.AUTH_REQUIRED
        return await super().smtp_mail(arg)

    async def check_sender(self, sender: MailPath) -> Reply | None:
        if not self.outbox.restrict_senders:
            return None
        if not sender.address:
            # The null sender: a local MTA's own delivery notices (RFC 5321
            # §4.5.5), which the provider's submission service accepts too.
            return None
        if "@" not in sender.address:
            return SENDER_NOT_LOCAL
        try:
            domain = normalize_domain(split_address(sender.address)[1])
        except ValueError:
            return SENDER_NOT_LOCAL
        if domain not in self.config.domains:
            self.log.info("%s: reject: MAIL from <%s>: not a domain of this site",
                          self.session_id, sender.address)
            return SENDER_NOT_LOCAL
        return None

    async def check_recipient(self, txn: Transaction, rcpt: Recipient) -> Reply | None:
        return RECIPIENT_NEEDS_DOMAIN if not rcpt.domain else None

    def trace_header(self, txn: Transaction) -> bytes:
        txn.queue_id = new_queue_id()  # named in our Received: header, then stored under it
        return super().trace_header(txn)

    async def accept_message(self, txn: Transaction, body: IO[bytes], size: int) -> Reply:
        user = self.authenticated_as
        client = self.peer_description() + (f" sasl_username={user}" if user else "")
        message = NewMessage(
            sender=txn.sender.address,
            recipients=tuple(
                NewRecipient(address=r.path.address, domain=r.domain,
                             state=RecipientState.OUTBOUND, notify=r.notify, orcpt=r.orcpt)
                for r in txn.recipients
            ),
            origin=MessageOrigin.SUBMISSION,
            smtputf8=txn.smtputf8,
            body_8bit=txn.body_8bit,
            envid=txn.envid,
            ret=txn.ret,
            client=client,
            wire_ready=txn.wire_ready,  # pushed as it is, like the provider's mail
        )
        try:
            queue_id = await asyncio.to_thread(self.store.enqueue, message, body, txn.queue_id)
        except StoreError as exc:
            self.log.warning("%s: outbox spool error at DATA: %s", self.session_id, exc)
            return SPOOL_FAILED
        event("outbox", queue_id, client=self.peer_description(), sasl_username=user)
        event("outbox", queue_id, **{"from": f"<{txn.sender.address}>"}, size=size,
              nrcpt=len(txn.recipients), status="queued")
        if self.on_queued is not None:
            self.on_queued()
        return Reply(250, "2.0.0", f"OK queued as {queue_id}")

    # MAIL needs AUTH only when the outbox has users (`smtp_mail` checks it).
    VERBS: ClassVar[Mapping[str, VerbSpec]] = verb_table(
        VerbSpec("AUTH", "smtp_auth", Needs.NO_TRANSACTION, sequence_reply=AUTH_IN_TRANSACTION),
        base=TransactionSession.VERBS,
    )


# ---------------------------------------------------------------------------
# The listener.
# ---------------------------------------------------------------------------


class OutboxServer:
    """The outbox listener.  `start()` binds ``[outbox] listen`` (ListenFailure
    if it cannot; ConfigFailure for an unreadable users file); `stop()` stops
    accepting and lets the sessions in progress end within `grace` seconds
    (a session cut before its 250 leaves nothing in the spool: its client
    keeps the message)."""

    def __init__(self, config: CustomerConfig, store: MessageQueue,
                 on_queued: Callable[[], None] | None = None) -> None:
        if config.outbox.listen is None:
            raise ValueError("[outbox] listen is not configured")
        self.config = config
        self.store = store
        self.on_queued = on_queued
        # The provider's default deadlines (docs/customer-config.md): a LAN
        # client dripping DATA must not hold a session slot for ever.
        self.limits = SessionLimits(max_message_size=config.outbox.max_message_size,
                                    data_deadline=OUTBOX_DATA_DEADLINE,
                                    session_deadline=OUTBOX_SESSION_DEADLINE)
        self.accounts: _UserAccounts | None = None
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self.sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        outbox = self.config.outbox
        assert outbox.listen is not None
        if outbox.users_file is not None:
            try:
                users = read_users_file(outbox.users_file)
            except ValueError as exc:
                raise ConfigFailure(f"{self.config.path}: [outbox] users_file: {exc}") from None
            self.accounts = await asyncio.to_thread(_UserAccounts, users)
        host, port = outbox.listen
        try:
            self.server = await start_server(self._handle, host, port)
        except OSError as exc:
            raise ListenFailure(f"cannot listen on {host}:{port} ([outbox] listen): "
                                f"{exc.strerror or exc}") from exc
        sockname = self.server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        log.info("outbox listening on %s:%d", *self.address)
        return self.address

    async def _handle(self, conn: Connection) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self.sessions) >= MAX_SESSIONS:
            log.warning("too many outbox connections: refusing [%s]", conn.peer_ip)
            with contextlib.suppress(Exception):
                await conn.write(TOO_MANY_SESSIONS.to_bytes(), 5.0)
            await conn.close(1.0)
            return
        self.sessions.add(task)
        try:
            await OutboxSession(conn, config=self.config, limits=self.limits, store=self.store,
                                accounts=self.accounts, on_queued=self.on_queued).run()
        finally:
            self.sessions.discard(task)

    async def stop(self, grace: float = 10.0) -> None:
        if self.server is None:
            return
        self.server.close()
        if self.sessions:
            _, pending = await asyncio.wait(set(self.sessions), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        await self.server.wait_closed()
        self.server = None
