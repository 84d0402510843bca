"""The drain records deliveries in the background: several per transaction,
all of them before the customer sees QUIT, and a failed commit stops the
drain with every unrecorded recipient still queued (a duplicate later,
never a loss)."""

from __future__ import annotations

import logging
import time

import pytest

from fermoposta.store.base import StoreError
from support.customer import serve_reversed
from test_odmr import authed, hold


class SlowCommits:
    """record_delivered that takes 30 ms (a slow disk) and counts its calls."""

    def __init__(self, store, fail_first: bool = False) -> None:
        self.real = store.record_delivered
        self.calls: list[int] = []
        self.fail_first = fail_first

    def __call__(self, ids, reply, dsn=None):
        self.calls.append(len(ids))
        time.sleep(0.03)
        if self.fail_first and len(self.calls) == 1:
            raise StoreError("disk I/O error (injected)")
        return self.real(ids, reply, dsn)


async def test_deliveries_share_commits_and_are_all_recorded_before_quit(provider, certs):
    ids = [await hold(provider, rcpts=(f"u{i}@example.org",)) for i in range(20)]
    slow = SlowCommits(provider.store)
    provider.store.record_delivered = slow  # type: ignore[method-assign]
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d)
    assert t.quit
    # At QUIT (the provider's session may still be closing) nothing is left.
    assert provider.store.held_message_ids(["example.org"]) == []
    assert len(t.messages) == 20
    assert sum(slow.calls) == 20
    # The drain did not wait 30 ms per message: commits held several each.
    assert len(slow.calls) < 20 / 2, slow.calls
    assert all(provider.store.get_message(i) is None for i in ids)
    await d.close()


async def test_a_failed_commit_stops_the_drain_and_keeps_the_mail(
        provider, certs, caplog: pytest.LogCaptureFixture) -> None:
    ids = [await hold(provider, rcpts=(f"u{i}@example.org",)) for i in range(5)]
    slow = SlowCommits(provider.store, fail_first=True)
    provider.store.record_delivered = slow  # type: ignore[method-assign]
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    with caplog.at_level(logging.WARNING, logger="fermoposta"):
        t = await serve_reversed(d)
        await provider.sessions_ended()
    assert not t.quit  # the drain stopped at the store error, without QUIT
    # The customer took some (perhaps all: they go out while the first
    # commit is under way); none was recorded: all are still queued.
    assert 1 <= len(t.messages) <= 5
    assert sorted(provider.store.held_message_ids(["example.org"])) == sorted(ids)
    assert any("cannot record" in r.getMessage() and "stay queued" in r.getMessage()
               for r in caplog.records)
    # The leases were released: the next session gets everything (again).
    provider.store.record_delivered = slow.real  # type: ignore[method-assign]
    d2 = await authed(provider, certs)
    await d2.cmd("ATRN example.org", 250)
    t2 = await serve_reversed(d2)
    assert t2.quit and len(t2.messages) == 5
    assert provider.store.held_message_ids(["example.org"]) == []
    await d.close()
    await d2.close()
