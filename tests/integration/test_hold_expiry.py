"""Held mail that nobody collects: expiry DSNs (5.4.7) after `[hold] lifetime`
or the domain's own lifetime, and the optional hold delay notice; with an
injected clock shared by the store and the expirer."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import add_customer, write_config
from fermoposta.config import ProviderConfig, load_provider_config
from fermoposta.provider.expiry import HoldExpirer
from fermoposta.store import SQLiteStore
from fermoposta.store.base import (
    Domain,
    MessageOrigin,
    NewMessage,
    NewRecipient,
    QueuedMessage,
    RecipientState,
)

HELD = RecipientState.HELD
T0 = 1_700_000_000.0
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def env(tmp_path: Path, clock: Clock) -> Iterator[tuple[ProviderConfig, SQLiteStore]]:
    path = write_config(tmp_path, None, extra='[hold]\nlifetime = "30d"\ndelay_notice = "2d"\n')
    config = load_provider_config(path)
    store = SQLiteStore(config.store_path, clock=clock)
    add_customer(store, "acme", ("example.org",))
    add_customer(store, "brief", ())
    store.add_domain(Domain("brief.test", "brief", hold_lifetime=5 * DAY))
    yield config, store
    store.close()


def hold(store: SQLiteStore, rcpts: list[str], sender: str = "alice@sender.test",
         notify: str | None = None) -> str:
    return store.enqueue(
        NewMessage(sender, tuple(NewRecipient(r, r.rsplit("@", 1)[1], HELD, notify)
                                 for r in rcpts), MessageOrigin.MX, envid="hold-1"),
        io.BytesIO(b"Subject: waiting\r\nMessage-ID: <w@sender.test>\r\n\r\nbody\r\n"))


def dsn_messages(store: SQLiteStore) -> list[tuple[QueuedMessage, EmailMessage]]:
    import sqlite3

    out = []
    for (mid,) in sqlite3.connect(store.path).execute("SELECT id FROM messages"):
        m = store.get_message(mid)
        if m is not None and m.origin == MessageOrigin.DSN:
            parsed = email.message_from_bytes(b"".join(store.read_body(mid)),
                                              policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            out.append((m, parsed))
    return out


def blocks(dsn: EmailMessage) -> list[EmailMessage]:
    status = list(dsn.iter_parts())[1]
    assert status.get_content_type() == "message/delivery-status"
    payload = status.get_payload()
    assert isinstance(payload, list)
    return payload


async def test_hold_expiry_and_delay_notice(env: tuple[ProviderConfig, SQLiteStore],
                                           clock: Clock) -> None:
    config, store = env
    default = hold(store, ["bob@example.org"])
    brief = hold(store, ["eve@brief.test"], sender="carol@example.org")
    never = hold(store, ["dan@example.org"], notify="NEVER")
    woken: list[bool] = []
    expirer = HoldExpirer(config, store, clock=clock, on_outbound_dsn=lambda: woken.append(True))

    assert await expirer.run_once() == (0, 0)
    clock.now = T0 + 3 * DAY  # past the delay notice, before any lifetime
    assert await expirer.run_once() == (0, 2)  # NOTIFY=NEVER gets no DSN
    delayed = dsn_messages(store)
    assert len(delayed) == 2
    for m, dsn in delayed:
        assert dsn["Subject"] == "Delayed Mail (still being retried)"
        _, block = blocks(dsn)
        assert block["Action"] == "delayed"
        until = email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp()
        if block["Final-Recipient"] == "rfc822; eve@brief.test":
            assert until == T0 + 5 * DAY  # the domain's own lifetime
            # The sender's domain is hosted: the notice waits for its customer.
            assert m.recipients[0].state == HELD
        else:
            assert until == T0 + 30 * DAY
            assert m.recipients[0].state == RecipientState.OUTBOUND
    assert await expirer.run_once() == (0, 0)  # once only
    assert woken == [True]  # the notice to sender.test goes out through the engine

    clock.now = T0 + 6 * DAY  # brief.test's 5 days are over
    assert await expirer.run_once() == (1, 0)
    assert store.get_message(brief) is None
    assert store.get_message(default) is not None
    clock.now = T0 + 31 * DAY
    assert await expirer.run_once() == (2, 0)
    assert store.get_message(default) is None and store.get_message(never) is None
    failed = [d for _, d in dsn_messages(store) if d["Subject"].startswith("Undelivered")]
    assert len(failed) == 2  # eve's and bob's; dan asked for NEVER
    by_rcpt = {blocks(d)[1]["Final-Recipient"]: d for d in failed}
    bob = by_rcpt["rfc822; bob@example.org"]
    per_message, block = blocks(bob)
    assert per_message["Original-Envelope-Id"] == "hold-1"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == T0
    assert (block["Action"], block["Status"]) == ("failed", "5.4.7")
    assert block["Diagnostic-Code"] == (
        "X-Fermoposta; 550 5.4.7 Delivery time expired: not collected by the customer "
        "within 30d")
    assert block["Remote-MTA"] is None
    assert "Subject: waiting" in list(bob.iter_parts())[2].get_payload()


async def test_leased_domains_wait_for_the_next_pass(env: tuple[ProviderConfig, SQLiteStore],
                                                     clock: Clock) -> None:
    config, store = env
    qid = hold(store, ["bob@example.org"])
    assert store.acquire_leases(["example.org"], "atrn-session", 60 * DAY)
    clock.now = T0 + 31 * DAY
    expirer = HoldExpirer(config, store, clock=clock)
    assert await expirer.run_once() == (0, 0)  # the drain owns it right now
    store.release_leases("atrn-session")
    assert await expirer.run_once() == (1, 0)
    assert store.get_message(qid) is None


async def test_start_and_stop(env: tuple[ProviderConfig, SQLiteStore], clock: Clock) -> None:
    config, store = env
    qid = hold(store, ["bob@example.org"])
    clock.now = T0 + 31 * DAY
    expirer = HoldExpirer(config, store, clock=clock)
    await expirer.start()
    for _ in range(100):
        if store.get_message(qid) is None:
            break
        await asyncio.sleep(0.02)
    await expirer.stop()
    assert store.get_message(qid) is None and expirer.expired == 1


async def test_one_node_runs_the_expiry_passes_and_another_takes_over(
        env: tuple[ProviderConfig, SQLiteStore]) -> None:
    """Two providers on one store (issue 9): the passes run on one of them, and
    when it stops the other takes over at its next interval."""
    import dataclasses

    config, _ = env  # that store's clock stands still: both of these use the real one
    config = dataclasses.replace(config, hold=dataclasses.replace(config.hold,
                                                                   expiry_interval=0.05))
    one, other = SQLiteStore(config.store_path), SQLiteStore(config.store_path)
    passes = {"a": 0, "b": 0}
    expirers = {"a": HoldExpirer(config, one), "b": HoldExpirer(config, other)}
    for name, expirer in expirers.items():
        async def counted(name: str = name) -> tuple[int, int]:
            passes[name] += 1
            return 0, 0
        expirer.run_once = counted  # type: ignore[method-assign]
        await expirer.start()
    await asyncio.sleep(0.5)
    assert sorted(passes.values())[0] == 0 and sorted(passes.values())[1] >= 3
    first = "a" if passes["a"] else "b"
    second = "b" if first == "a" else "a"
    await expirers[first].stop()
    before = passes[second]
    await asyncio.sleep(0.5)
    assert passes[second] >= before + 3
    await expirers[second].stop()
    one.close()
    other.close()
