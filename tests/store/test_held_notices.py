"""Notices of held mail (`HoldQueue.held_mail_notices`, issue 12): PostgreSQL
notifies a listener on another connection (another node) of the domain of
every recipient that becomes HELD, on commit only; SQLite has none (its
callers poll).  Run on every engine."""

from __future__ import annotations

import io

from fermoposta.store.base import Account, Domain, MessageOrigin, NewMessage, Store

from .contract import HELD, OUTBOUND, StoreFactory, msg, rcpt


def test_notices_of_held_mail(store_factory: StoreFactory) -> None:
    store: Store = store_factory()
    other: Store = store_factory()  # another node on the same data
    notices = other.held_mail_notices()
    if store_factory.engine == "sqlite":
        assert notices is None
        return
    assert notices is not None
    try:
        assert notices.wait(0.2) == set()
        store.enqueue(msg("a@one.example", "b@two.example", "c@two.example"), io.BytesIO(b"x"))
        got = notices.wait(5.0)
        while len(got) < 2:
            more = notices.wait(2.0)
            assert more, got
            got |= more
        assert got == {"one.example", "two.example"}
        # OUTBOUND mail is nobody's ATRN: no notice.
        store.enqueue(NewMessage("", (rcpt("d@three.example", OUTBOUND),), MessageOrigin.DSN),
                      io.BytesIO(b"x"))
        assert notices.wait(0.5) == set()
        # A batch: one notice per domain, after the one commit.
        store.enqueue_batch([(msg("e@four.example"), io.BytesIO(b"1"), None),
                             (msg("f@four.example"), io.BytesIO(b"2"), None)])
        assert notices.wait(5.0) == {"four.example"}
    finally:
        notices.close()


def test_released_mail_is_noticed(store_factory: StoreFactory) -> None:
    """Operator HOLD -> HELD (`release_messages`) wakes waiters too; an
    update that leaves a recipient HELD (a deferral during a drain) does not."""
    store: Store = store_factory()
    notices = store.held_mail_notices()
    if notices is None:
        assert store_factory.engine == "sqlite"
        return
    try:
        store.add_account(Account("acme", None, None))
        store.add_domain(Domain("one.example", "acme"))
        mid = store.enqueue(NewMessage("", (rcpt("a@one.example", HELD),), MessageOrigin.MX),
                            io.BytesIO(b"x"))
        assert notices.wait(5.0) == {"one.example"}
        store.hold_messages([mid])
        assert notices.wait(0.3) == set()
        store.release_messages([mid])
        assert notices.wait(5.0) == {"one.example"}
        message = store.get_message(mid)
        assert message is not None
        store.record_deferred([message.recipients[0].id], "451 later")
        assert notices.wait(0.3) == set()
    finally:
        notices.close()
