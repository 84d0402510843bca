"""Waiting ATRNs (issue 12): an account with `atrn_wait` gets 250 the moment
mail for its domains is committed, 453 when its wait ends; without it, 453 at
once.  Several waiting sessions for one domain: one drains, the others wait
on.  `[odmr] max_waiting`, the listener limits, the session deadline,
shutdown, a client that speaks or leaves while waiting, and mail committed by
another process on the same SQLite file."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import time

import pytest

from fermoposta.store import STORE_FILENAME
from fermoposta.store.base import MessageOrigin, NewMessage, NewRecipient, RecipientState
from fermoposta.store.sqlite import SQLiteStore
from support.customer import serve_reversed
from support.dialog import Dialog
from test_odmr import authed, hold


def set_wait(running, seconds: float | None, account: str = "acme") -> None:
    current = running.store.get_account(account)
    assert current is not None
    running.store.update_account(dataclasses.replace(current, atrn_wait=seconds))


async def waiting_atrn(running, certs, arg: str = "ATRN example.org") -> Dialog:
    """An authenticated session whose ATRN has been sent (and is unanswered)."""
    d = await authed(running, certs)
    await d.send(arg)
    return d


async def until_waiting(running, n: int = 1, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while running.provider.held_watch.waiting < n:
        assert time.monotonic() < deadline, running.provider.held_watch.waiting
        await asyncio.sleep(0.01)


async def test_waiting_atrn_gets_250_as_soon_as_mail_arrives(provider, certs, caplog):
    caplog.set_level(logging.INFO, logger="fermoposta")
    set_wait(provider, 60.0)
    d = await waiting_atrn(provider, certs)
    await until_waiting(provider)
    with pytest.raises(TimeoutError):
        await d.reply(timeout=0.5)  # nothing yet: it waits
    sent = time.monotonic()
    queue_id = await hold(provider)
    await d.expect(250, timeout=5.0)
    delay = time.monotonic() - sent
    assert delay < 1.0, delay
    t = await serve_reversed(d)
    assert [m.recipients for m in t.messages] == [["bob@example.org"]]
    assert provider.store.get_message(queue_id) is None
    await d.close()
    assert provider.provider.held_watch.waiting == 0
    text = caplog.text
    assert "no mail; waiting up to 60s for it" in text
    assert "woken after" in text and "mail for example.org" in text


async def test_the_wait_ends_with_453(provider, certs, caplog):
    caplog.set_level(logging.INFO, logger="fermoposta")
    set_wait(provider, 1.0)
    d = await authed(provider, certs)
    started = time.monotonic()
    await d.cmd("ATRN example.org", 453, timeout=5.0)
    waited = time.monotonic() - started
    assert 0.9 <= waited < 3.0, waited
    # The session goes on: a second ATRN waits again, QUIT works.
    await d.cmd("QUIT", 221)
    assert "waited 1s, no mail; 453" in caplog.text
    assert provider.provider.held_watch.waiting == 0


async def test_without_atrn_wait_453_comes_at_once(provider, certs):
    d = await authed(provider, certs)
    started = time.monotonic()
    await d.cmd("ATRN example.org", 453)
    assert time.monotonic() - started < 0.5
    assert provider.provider.held_watch.waiting == 0
    await d.close()


async def test_mail_already_held_is_reversed_at_once(provider, certs):
    set_wait(provider, 60.0)
    await hold(provider)
    d = await authed(provider, certs)
    started = time.monotonic()
    await d.cmd("ATRN example.org", 250)
    assert time.monotonic() - started < 0.5
    t = await serve_reversed(d)
    assert len(t.messages) == 1
    await d.close()


async def test_mail_for_another_domain_does_not_wake(provider, certs):
    set_wait(provider, 1.5)
    d = await waiting_atrn(provider, certs)
    await until_waiting(provider)
    await hold(provider, rcpts=("x@other.test",))
    await d.expect(453, timeout=5.0)  # woken by nothing: the wait ran out
    await d.close()


async def test_two_waiting_sessions_one_drains_the_other_waits_on(provider, certs):
    set_wait(provider, 3.0)
    first = await waiting_atrn(provider, certs)
    second = await waiting_atrn(provider, certs)
    await until_waiting(provider, 2)
    started = time.monotonic()
    await hold(provider)
    replies = await asyncio.gather(first.reply(timeout=5.0), second.reply(timeout=5.0),
                                   return_exceptions=True)
    codes = [r[0] if isinstance(r, tuple) else None for r in replies]
    # The other kept waiting until its own wait ended (no 451 at the first
    # sight of the busy domain); the mail was there, held by the drainer all
    # along (it drains only below), so the wait ends with 451, not 453.
    assert sorted(c for c in codes if c is not None) == [250, 451], replies
    assert time.monotonic() - started >= 2.5
    drainer = first if codes[0] == 250 else second
    t = await serve_reversed(drainer)
    assert [m.recipients for m in t.messages] == [["bob@example.org"]]
    await first.close()
    await second.close()


async def test_max_waiting(provider_factory, certs, caplog):
    caplog.set_level(logging.INFO, logger="fermoposta")
    p = await provider_factory(extra="[odmr]\nmax_waiting = 1\n")
    set_wait(p, 30.0)
    first = await waiting_atrn(p, certs)
    await until_waiting(p)
    second = await authed(p, certs)
    started = time.monotonic()
    await second.cmd("ATRN example.org", 453)
    assert time.monotonic() - started < 0.5
    assert "sessions already wait ([odmr] max_waiting); 453 now" in caplog.text
    await hold(p)
    await first.expect(250, timeout=5.0)
    await serve_reversed(first)
    await first.close()
    await second.close()


async def test_max_waiting_zero_means_never_wait(provider_factory, certs):
    p = await provider_factory(extra="[odmr]\nmax_waiting = 0\n")
    set_wait(p, 30.0)
    d = await authed(p, certs)
    started = time.monotonic()
    await d.cmd("ATRN example.org", 453)
    assert time.monotonic() - started < 0.5
    await d.close()


async def test_waiting_sessions_do_not_count_against_the_listener_limit(provider_factory, certs):
    p = await provider_factory(extra="[connections]\nodmr = { max_connections = 2 }\n")
    set_wait(p, 30.0)
    waiting = [await waiting_atrn(p, certs) for _ in range(2)]
    await until_waiting(p, 2)
    # Two sessions wait; the listener still has both of its slots.
    busy = [await Dialog.connect(*p.odmr) for _ in range(2)]
    for d in busy:
        await d.expect(220)
    third = await Dialog.connect(*p.odmr)
    await third.expect(421)  # but the limit still holds for the others
    for d in [*waiting, *busy, third]:
        await d.close()


async def test_the_wait_is_not_cut_by_the_session_deadline(provider_factory, certs):
    p = await provider_factory(extra="[limits]\nsession_deadline = \"1s\"\n")
    set_wait(p, 2.0)
    d = await authed(p, certs)
    started = time.monotonic()
    await d.cmd("ATRN example.org", 453, timeout=5.0)
    assert time.monotonic() - started >= 1.9
    await d.close()


async def test_shutdown_ends_the_wait_with_421(provider_factory, certs, caplog):
    caplog.set_level(logging.INFO, logger="fermoposta")
    p = await provider_factory()
    set_wait(p, 60.0)
    d = await waiting_atrn(p, certs)
    await until_waiting(p)
    started = time.monotonic()
    stopping = asyncio.create_task(p.provider.stop(grace=30.0))
    lines = await d.expect(421, timeout=5.0)
    assert lines[0].startswith("4.3.2")
    await asyncio.wait_for(stopping, 10.0)
    assert time.monotonic() - started < 5.0  # not the 30 s grace
    assert await d.closed()
    assert "the provider is stopping; 421" in caplog.text


async def test_quit_while_waiting(provider, certs, caplog):
    caplog.set_level(logging.INFO, logger="fermoposta")
    set_wait(provider, 60.0)
    d = await waiting_atrn(provider, certs)
    await until_waiting(provider)
    await d.send("QUIT")
    await d.expect(453)
    await d.expect(221)
    assert await d.closed()
    assert provider.provider.held_watch.waiting == 0
    assert "the client sent QUIT" in caplog.text


async def test_another_command_while_waiting_is_refused_and_the_session_goes_on(provider, certs):
    set_wait(provider, 60.0)
    d = await waiting_atrn(provider, certs)
    await until_waiting(provider)
    await d.send("NOOP")
    await d.expect(453)
    await d.expect(503)
    await d.cmd("NOOP", 250)
    await d.close()


async def test_a_client_that_hangs_up_stops_waiting(provider, certs, caplog):
    caplog.set_level(logging.INFO, logger="fermoposta")
    set_wait(provider, 60.0)
    d = await waiting_atrn(provider, certs)
    await until_waiting(provider)
    await d.close()
    deadline = time.monotonic() + 5.0
    while provider.provider.held_watch.waiting:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await provider.sessions_ended()
    assert "the client left after" in caplog.text


async def test_mail_from_another_process_on_the_sqlite_file_wakes_by_the_poll(
        provider_factory, certs):
    p = await provider_factory(extra="[odmr]\nwait_poll_interval = \"0.5s\"\n")
    set_wait(p, 30.0)
    d = await waiting_atrn(p, certs)
    await until_waiting(p)
    # Another process's store on the same file (no in-process signal at all).
    other = SQLiteStore(p.provider.config.data_dir / STORE_FILENAME)
    try:
        started = time.monotonic()
        other.enqueue(NewMessage("a@sender.test", (NewRecipient(
            "bob@example.org", "example.org", RecipientState.HELD),), MessageOrigin.MX),
            io.BytesIO(b"Subject: x\r\n\r\nx\r\n"))
        await d.expect(250, timeout=5.0)
        assert time.monotonic() - started < 1.5
        t = await serve_reversed(d)
        assert len(t.messages) == 1
    finally:
        other.close()
    await d.close()


async def test_a_bare_atrn_follows_the_accounts_domains_while_it_waits(
        provider_factory, certs, caplog):
    # A bare ATRN means every domain of the account, as it is when the mail
    # comes: one domain removed meanwhile neither refuses nor stalls the
    # session (it used to be refused at each wake-up, silently, until its
    # wait ended with a 453).
    from fermoposta.store.base import Domain

    caplog.set_level(logging.INFO, logger="fermoposta")
    p = await provider_factory(extra='[odmr]\nwait_poll_interval = "0.5s"\n')
    p.store.add_domain(Domain(name="extra.test", account="acme"))
    set_wait(p, 20.0)
    d = await waiting_atrn(p, certs, "ATRN")
    await until_waiting(p)
    assert p.store.remove_domain("extra.test")
    started = time.monotonic()
    await hold(p)  # bob@example.org: acme still owns example.org
    code, _ = await d.reply(timeout=10.0)
    assert code == 250 and time.monotonic() - started < 5.0
    t = await serve_reversed(d)
    assert t.quit and len(t.messages) == 1
    await d.close()


async def test_a_bare_atrn_takes_mail_for_a_domain_added_while_it_waits(
        provider_factory, certs, caplog):
    # Nothing wakes a waiter for a domain it does not wait for: the bare
    # ATRN reads its account's domains every BARE_REFRESH_POLLS polls itself.
    from fermoposta.provider.odmr import BARE_REFRESH_POLLS
    from fermoposta.store.base import Domain

    caplog.set_level(logging.INFO, logger="fermoposta")
    p = await provider_factory(extra='[odmr]\nwait_poll_interval = "0.2s"\n')
    set_wait(p, 30.0)
    d = await waiting_atrn(p, certs, "ATRN")
    await until_waiting(p)
    p.store.add_domain(Domain(name="new.test", account="acme"))
    started = time.monotonic()
    await hold(p, rcpts=("carol@new.test",))
    code, _ = await d.reply(timeout=10.0)
    assert code == 250
    assert time.monotonic() - started < BARE_REFRESH_POLLS * 0.2 + 1.5
    t = await serve_reversed(d)
    assert [m.recipients for m in t.messages] == [["carol@new.test"]]
    await d.close()
    assert ("the account's domains changed while it waited: now example.org,new.test"
            in caplog.text)
    assert "woken after" in caplog.text and "mail for example.org,new.test" in caplog.text


@pytest.mark.parametrize(("atrn", "looks"), [("ATRN", True), ("ATRN example.org", False)])
async def test_only_a_bare_atrn_reads_the_accounts_domains_while_it_waits(
        provider_factory, certs, atrn, looks):
    p = await provider_factory(extra='[odmr]\nwait_poll_interval = "0.05s"\n')
    set_wait(p, 1.5)
    calls = []
    real = p.store.domain_names

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    p.store.domain_names = counting
    try:
        d = await waiting_atrn(p, certs, atrn)
        await until_waiting(p)
        # Every ATRN reads them twice before it waits in earnest: its decision,
        # and the look at once after it enters the wait (mail may have come
        # between the two), in a worker thread that a busy machine may run late.
        deadline = time.monotonic() + 5.0
        while len(calls) < 2:
            assert time.monotonic() < deadline, calls
            await asyncio.sleep(0.01)
        before = len(calls)
        await d.expect(453, timeout=5.0)
    finally:
        p.store.domain_names = real
    # 0.5 s between looks over a 1.5 s wait; the watch's own polls do not count.
    assert (len(calls) - before >= 1) is looks, calls
    assert all(args == ("acme",) for args in calls)
    await d.close()


async def test_a_wait_ends_at_once_when_the_account_is_gone(provider, certs, caplog):
    caplog.set_level(logging.INFO, logger="fermoposta")
    set_wait(provider, 20.0)
    d = await waiting_atrn(provider, certs)
    await until_waiting(provider)
    assert provider.store.remove_account("acme")
    started = time.monotonic()
    provider.provider.held_watch.notify(["example.org"])  # any wake-up decides again
    code, _ = await d.reply(timeout=10.0)
    assert code == 450 and time.monotonic() - started < 5.0
    assert "the account no longer exists" in caplog.text
    await d.close()


async def test_a_busy_domain_is_waited_for_and_its_lease_release_wakes_the_waiter(
        provider_factory, certs):
    # The customer's push daemon dials again the moment a drain ends, maybe
    # before that session released its lease: the new ATRN waits (no 451),
    # and the release itself wakes it for the mail that is left (here one
    # the first session's customer deferred), without the poll (60 s here).
    p = await provider_factory(extra='[odmr]\nwait_poll_interval = "60s"\n')
    set_wait(p, 30.0)
    mid = await hold(p)
    first = await authed(p, certs)
    await first.cmd("ATRN example.org", 250)
    second = await waiting_atrn(p, certs)
    await until_waiting(p)  # not 451: it waits for the lease
    t = await serve_reversed(first, data_reply=lambda n: "451 4.3.0 local disk full")
    assert t.quit and len(t.messages) == 0 and t.transactions == 1
    released = time.monotonic()
    code, _ = await second.reply(timeout=10.0)
    assert code == 250 and time.monotonic() - released < 5.0
    t2 = await serve_reversed(second)
    assert t2.quit and len(t2.messages) == 1
    assert p.store.get_message(mid) is None
    await first.close()
    await second.close()


async def test_a_wait_on_a_domain_that_stays_busy_ends_with_451_not_453(provider, certs):
    # The mail is there all along, held by another session: "try later",
    # never "you have no mail".
    set_wait(provider, 1.0)
    await hold(provider)
    first = await authed(provider, certs)
    await first.cmd("ATRN example.org", 250)  # holds the lease, drains nothing yet
    second = await waiting_atrn(provider, certs)
    code, lines = await second.reply(timeout=10.0)
    assert code == 451 and "domain busy" in lines[-1], (code, lines)
    t = await serve_reversed(first)
    assert t.quit and len(t.messages) == 1
    await first.close()
    await second.close()
