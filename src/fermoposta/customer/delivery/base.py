"""The local delivery interface of the customer (two-phase, never lossy).

Contract:
- The reversed session opens one `LocalTransaction` per provider transaction
  (`Delivery.transaction(LocalSender)`), at the first recipient: each RCPT
  goes through `add_recipient()` (None accepts it; a refusal, e.g. 550 5.1.1
  unknown user or a 4xx, is mirrored to the provider at RCPT), the message
  through `data()` once it is spooled, and `abort()` ends it (always called;
  idempotent; a transaction aborted before `data()` delivers nothing).
- `data()` returns ONE reply per accepted recipient, in the order they were
  accepted: 2xx ONLY after the message is committed for that recipient
  (Maildir: tmp, fsync, rename to new, fsync of the directory) or accepted
  by the next hop (LMTP: that recipient's reply after the dot; SMTP: the one
  final reply, repeated).  Anything else is a 4xx (temporary) or a 5xx
  (permanent) for that recipient.  The session maps mixed outcomes (LMTP)
  onto its single DATA reply (see serve.py); nothing here may ever leave a
  recipient delivered AND reported failed, or the reverse.
- `deliver()` delivers a whole envelope at once (Maildir: any number of
  recipients, all or nothing; SMTP/LMTP: exactly one recipient, through a
  transaction) and is what the local retry spool and the notices use.
- `max_recipients` is None for every backend: recipients per transaction
  are bounded by the session (100, RFC 5321 §4.5.3.1.8).
- When the local target is down or fails, the reply is 4xx; a bug (an
  unexpected exception) is mapped to 4xx by the caller.
- `body` is a binary file positioned at 0 holding the complete message
  (trace header included) with CRLF line endings; backends stream it.
- `GroupCommit` is what a backend offers to commit several messages at once
  (Maildir): `stage()` each (nothing durable yet, nothing visible), then
  `commit_staged()` the group (one outcome per message, 2xx only once it is
  durable) or `discard_staged()` it.
- `WholeMessageTransaction` adapts a backend that commits all recipients
  together (Maildir) to the transaction interface: `check_recipient()` at
  RCPT, `deliver()` at the end with the same reply for every recipient.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol, runtime_checkable

from fermoposta.smtp.reply import Reply


@dataclass(frozen=True, slots=True)
class LocalRecipient:
    address: str  # as the provider sent it
    local: str
    domain: str  # lowercase A-label


@dataclass(frozen=True, slots=True)
class LocalEnvelope:
    sender: str  # "" for the null reverse-path
    recipients: tuple[LocalRecipient, ...]
    smtputf8: bool = False
    body_8bit: bool = False
    queue_hint: str = ""  # the provider's queue id when known, for logs


@dataclass(frozen=True, slots=True)
class LocalSender:
    """What a local transaction knows at MAIL: the reverse-path and its parameters."""

    sender: str  # "" for the null reverse-path
    smtputf8: bool = False
    body_8bit: bool = False
    size: int | None = None  # SIZE= declared by the provider, if any
    queue_hint: str = ""


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """What happened, for the session log and the `pull` summary."""

    reply: Reply
    where: str  # e.g. "maildir:/var/mail/example.org/bob/Maildir/new/..." or "lmtp:/run/lmtp"


class LocalTransaction(Protocol):
    where: str  # e.g. "lmtp:/run/lmtp", for the logs

    async def add_recipient(self, rcpt: LocalRecipient) -> Reply | None:
        """None to accept; the refusal (4xx or 5xx) to mirror at RCPT."""
        ...

    async def data(self, body: IO[bytes], size: int) -> list[Reply]:
        """One reply per accepted recipient, in order (see the docstring)."""
        ...

    async def abort(self) -> None:
        """End the transaction (idempotent; nothing is delivered if before `data()`)."""
        ...


class Delivery(Protocol):
    name: str
    max_recipients: int | None  # None for every backend: the session bounds it

    def transaction(self, start: LocalSender) -> LocalTransaction:
        """A new transaction; nothing is opened before its first recipient."""
        ...

    async def check_recipient(self, rcpt: LocalRecipient) -> Reply | None:
        """None to accept; a 5xx (unknown user) or 4xx (cannot check now) to refuse."""
        ...

    async def deliver(self, envelope: LocalEnvelope, body: IO[bytes], size: int
                      ) -> DeliveryOutcome:
        ...

    async def close(self) -> None: ...


@runtime_checkable
class GroupCommit(Protocol):
    """Several messages committed together (see the module docstring)."""

    async def stage(self, envelope: LocalEnvelope, body: IO[bytes]) -> Any:
        """A handle of the staged message, or its `DeliveryOutcome` if phase 1 failed."""
        ...

    async def commit_staged(self, group: Sequence[Any]) -> list[DeliveryOutcome]: ...

    async def discard_staged(self, group: Sequence[Any]) -> None: ...


class _WholeMessageDelivery(Protocol):
    name: str

    async def check_recipient(self, rcpt: LocalRecipient) -> Reply | None: ...

    async def deliver(self, envelope: LocalEnvelope, body: IO[bytes], size: int
                      ) -> DeliveryOutcome: ...


class WholeMessageTransaction:
    """A transaction over a backend that commits every recipient at once (Maildir)."""

    def __init__(self, delivery: _WholeMessageDelivery, start: LocalSender) -> None:
        self.delivery = delivery
        self.start = start
        self.accepted: list[LocalRecipient] = []
        self.where = delivery.name

    async def add_recipient(self, rcpt: LocalRecipient) -> Reply | None:
        refusal = await self.delivery.check_recipient(rcpt)
        if refusal is None:
            self.accepted.append(rcpt)
        return refusal

    async def data(self, body: IO[bytes], size: int) -> list[Reply]:
        if not self.accepted:
            return []
        s = self.start
        envelope = LocalEnvelope(sender=s.sender, recipients=tuple(self.accepted),
                                 smtputf8=s.smtputf8, body_8bit=s.body_8bit,
                                 queue_hint=s.queue_hint)
        outcome = await self.delivery.deliver(envelope, body, size)
        self.where = outcome.where
        return [outcome.reply] * len(self.accepted)

    async def abort(self) -> None:
        return None
