"""The drain records deliveries in the background: several per transaction,
all of them before the customer sees QUIT, and a failed commit stops the
drain with every unrecorded recipient still queued (a duplicate later,
never a loss)."""

from __future__ import annotations

import logging
import time

import pytest

from fermoposta.provider import delivery_commits as commits_module
from fermoposta.store.base import StoreError
from support.customer import serve_reversed
from test_odmr import authed, hold


class SlowCommits:
    """record_delivered that takes 30 ms (a slow disk) and counts its calls."""

    def __init__(self, store, failures: int = 0) -> None:
        self.real = store.record_delivered
        self.calls: list[int] = []
        self.failures = failures  # the first calls that fail
        self.delay = 0.03

    def __call__(self, ids, reply, dsn=None):
        self.calls.append(len(ids))
        time.sleep(self.delay)
        if len(self.calls) <= self.failures:
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
    # The disk stays broken: every commit, retries included, fails.
    ids = [await hold(provider, rcpts=(f"u{i}@example.org",)) for i in range(5)]
    slow = SlowCommits(provider.store, failures=1_000)
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


async def test_deliveries_gather_into_batches_and_the_last_is_not_kept_waiting(
        provider, certs, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fast store: commits would keep up one by one; the drain gathers them
    # (COMMIT_BATCH at a time, or what COMMIT_GATHER seconds bring), and at
    # the end commits what is left at once, not after the gathering time.
    monkeypatch.setattr(commits_module, "COMMIT_GATHER", 30.0)
    monkeypatch.setattr(commits_module, "COMMIT_BATCH", 6)
    ids = [await hold(provider, rcpts=(f"u{i}@example.org",)) for i in range(20)]
    counted = SlowCommits(provider.store)
    counted.delay = 0.0
    provider.store.record_delivered = counted  # type: ignore[method-assign]
    d = await authed(provider, certs)
    started = time.monotonic()
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d)
    assert t.quit and len(t.messages) == 20
    assert time.monotonic() - started < 15.0  # the last batch did not wait 30 s
    assert sum(counted.calls) == 20
    assert all(n >= 6 for n in counted.calls[:-1]), counted.calls
    assert 1 < len(counted.calls) <= 4, counted.calls
    assert provider.store.held_message_ids(["example.org"]) == []
    assert all(provider.store.get_message(i) is None for i in ids)
    await d.close()


async def test_a_drain_cancelled_during_a_commit_lets_it_land_before_the_leases_go(
        provider, certs) -> None:
    # Shutdown cancels the session while a delivery commit runs in its
    # thread: the commit still ends before the domain's lease is given
    # back (else another session could send that mail again at once).
    import asyncio

    await hold(provider)
    events: list[str] = []
    real_delivered = provider.store.record_delivered
    real_release = provider.store.release_leases

    def slow_delivered(ids, reply, dsn=None):
        events.append("commit started")
        time.sleep(0.5)
        result = real_delivered(ids, reply, dsn)
        events.append("commit done")
        return result

    def release(owner):
        events.append("leases released")
        return real_release(owner)

    provider.store.record_delivered = slow_delivered  # type: ignore[method-assign]
    provider.store.release_leases = release  # type: ignore[method-assign]
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    customer = asyncio.ensure_future(serve_reversed(d))
    while "commit started" not in events:
        await asyncio.sleep(0.01)
    for task in list(provider.provider.sessions):
        task.cancel()
    await provider.sessions_ended()
    customer.cancel()
    assert events.index("commit done") < events.index("leases released"), events
    assert provider.store.held_message_ids(["example.org"]) == []
    await d.close()


async def test_a_commit_refused_once_is_tried_again_and_the_drain_goes_on(
        provider, certs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commits_module, "RETRY_PAUSE", 0.001)
    ids = [await hold(provider, rcpts=(f"u{i}@example.org",)) for i in range(5)]
    slow = SlowCommits(provider.store, failures=1)
    provider.store.record_delivered = slow  # type: ignore[method-assign]
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d)
    assert t.quit and len(t.messages) == 5
    assert len(slow.calls) >= 2  # the refused one and its retry
    assert provider.store.held_message_ids(["example.org"]) == []
    assert all(provider.store.get_message(i) is None for i in ids)
    await d.close()
