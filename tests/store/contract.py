"""Helpers of the store contract suite: the injected clock, the factory type
the `store_factory` fixture yields, and builders of messages.

Contract: nothing here knows an engine; a store is only reached through the
`fermoposta.store.base.Store` Protocol.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from fermoposta.store.base import (
    MessageOrigin,
    NewMessage,
    NewRecipient,
    QueueFilter,
    RecipientState,
    Store,
)

HELD = RecipientState.HELD
OUTBOUND = RecipientState.OUTBOUND
HOLD = RecipientState.HOLD


class Clock:
    """A settable clock for the store (`clock.now += 60` moves time on)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Opener = Callable[..., Store]


class StoreFactory:
    """Opens stores of one engine on one test's data: every call opens another
    store (another connection, as another process or node would) on the same
    data; all are closed when the test ends."""

    def __init__(self, engine: str, opener: Opener, clock: Clock) -> None:
        self.engine = engine  # "sqlite" | "postgresql"
        self.clock = clock  # the default clock of the stores opened
        self._open = opener
        self._opened: list[Store] = []

    def __call__(self, *, clock: Callable[[], float] | None = None, **options: Any) -> Store:
        """A new store on this test's data, with `clock` (default: the test's
        `Clock`) and engine options (e.g. `node=`) passed on."""
        store = self._open(clock=clock or self.clock, **options)
        self._opened.append(store)
        return store

    def close_all(self) -> None:
        """Close every store opened (closing a closed store is harmless)."""
        errors: list[BaseException] = []
        for store in reversed(self._opened):
            try:
                store.close()
            except Exception as exc:  # close the others before reporting it
                errors.append(exc)
        self._opened.clear()
        if errors:
            raise errors[0]


def rcpt(address: str, state: RecipientState = HELD, *, notify: str | None = None,
         orcpt: str | None = None) -> NewRecipient:
    return NewRecipient(address=address, domain=address.rpartition("@")[2].lower(), state=state,
                        notify=notify, orcpt=orcpt)


def msg(*addresses: str, state: RecipientState = HELD, sender: str = "s@sender.example",
        origin: MessageOrigin = MessageOrigin.MX) -> NewMessage:
    return NewMessage(sender=sender, recipients=tuple(rcpt(a, state) for a in addresses),
                      origin=origin)


def dsn_for(address: str = "s@sender.example") -> tuple[NewMessage, io.BytesIO]:
    """A DSN to the sender, as `record_failed`/`mark_delay_notified` take it."""
    return (NewMessage("", (rcpt(address, OUTBOUND),), MessageOrigin.DSN),
            io.BytesIO(b"DSN\r\n"))


def body_of(store: Store, message_id: str) -> bytes:
    return b"".join(store.read_body(message_id))


def rcpt_ids(store: Store, message_id: str) -> dict[str, int]:
    """Recipient ids of a queued message, by address."""
    m = store.get_message(message_id)
    assert m is not None, message_id
    return {r.address: r.id for r in m.recipients}


def all_ids(store: Store) -> list[str]:
    """Every message id in the queue, oldest first (through the queue tools)."""
    return [i for _, i in store.queue_ids(QueueFilter(), None, 100_000)]
