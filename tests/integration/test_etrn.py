"""ETRN (RFC 1985) end to end: mail held by the provider's MX for an ETRN
domain is delivered to the domain's own server (Postfix's smtp-sink on a
loopback port) when the customer's MTA sends ETRN over a raw SMTP
connection (swaks has no ETRN); every reply of RFC 1985 §5 we send, the rate
limit, and that nothing the client says chooses where the mail goes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import RunningProvider
from fermoposta.store.base import Domain, RecipientState
from peers import free_port, need, sink_messages, smtp_sink

pytestmark = pytest.mark.asyncio

ETRN_CONFIG = '[mx]\netrn_interval = "1h"\n'


def _send(mx: tuple[str, int], rcpt: str, subject: str) -> None:
    with smtplib.SMTP(mx[0], mx[1], timeout=10) as smtp:
        smtp.sendmail("alice@sender.test", [rcpt],
                      f"From: alice@sender.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\n"
                      "held for ETRN\r\n")


def _etrn(mx: tuple[str, int], *args: str, helo: str = "customer.etrn.test"
          ) -> list[tuple[int, str]]:
    """One connection: EHLO, then each ETRN argument; the (code, text) replies."""
    replies = []
    with smtplib.SMTP(mx[0], mx[1], timeout=10) as smtp:
        assert smtp.ehlo(helo)[0] == 250
        assert smtp.has_extn("etrn")  # advertised (RFC 1985 §3)
        for arg in args:
            code, text = smtp.docmd("ETRN", arg) if arg else smtp.docmd("ETRN")
            replies.append((code, text.decode()))
    return replies


async def _until(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _provider(provider_factory: Callable[..., Any], sink_port: int) -> RunningProvider:
    running: RunningProvider = await provider_factory(tls=False, extra=ETRN_CONFIG)
    store = running.store
    target = f"127.0.0.1:{sink_port}"
    for name in ("etrn.test", "sub.etrn.test", "empty.test"):
        store.add_domain(Domain(name, "acme", etrn=target))
    return running


async def test_etrn_delivers_held_mail_to_the_configured_server(
        provider_factory: Callable[..., Any], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    need("smtp-sink")
    caplog.set_level(logging.INFO, logger="fermoposta")
    with smtp_sink(tmp_path / "sink") as sink_port:
        running = await _provider(provider_factory, sink_port)
        store, mx = running.store, running.mx
        for i in range(2):
            await asyncio.to_thread(_send, mx, f"bob{i}@etrn.test", f"top {i}")
        await asyncio.to_thread(_send, mx, "carol@sub.etrn.test", "sub")
        held = store.held_message_ids(["etrn.test", "sub.etrn.test"])
        assert len(held) == 3
        await asyncio.sleep(0.3)
        assert sink_messages(tmp_path / "sink") == []  # held until an ETRN comes

        # The client's name and HELO choose nothing; only the domain's config does.
        [reply] = await asyncio.to_thread(_etrn, mx, "etrn.test", helo="evil.example")
        assert reply == (253, "2.0.0 OK, 2 pending messages for node etrn.test started")
        dumps = await _until(lambda: len(sink_messages(tmp_path / "sink")) == 2
                             and sink_messages(tmp_path / "sink"))
        assert sorted(b"top 0" in d or b"top 1" in d for d in dumps) == [True, True]
        await _until(lambda: all(store.get_message(m) is None for m in held[:2]))
        assert store.held_message_ids(["sub.etrn.test"]) == held[2:]  # not asked for

        replies = await asyncio.to_thread(
            _etrn, mx, "etrn.test", "@etrn.test", "sub.etrn.test", "empty.test")
        assert replies == [
            # Rate limit: one ETRN per domain per etrn_interval.
            (458, "4.7.0 Unable to queue messages for node etrn.test: one ETRN per 3600 "
                  "seconds"),
            # @domain: the domain and its subdomains (etrn.test itself is still limited).
            (253, "2.0.0 OK, 1 pending messages for node @etrn.test started"),
            (458, "4.7.0 Unable to queue messages for node sub.etrn.test: one ETRN per 3600 "
                  "seconds"),
            (251, "2.0.0 OK, no messages waiting for node empty.test"),
        ]
        await _until(lambda: len(sink_messages(tmp_path / "sink")) == 3)
        await _until(lambda: store.get_message(held[2]) is None)
        assert sum(b"Subject: sub" in d for d in sink_messages(tmp_path / "sink")) == 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ETRN from")]
    assert lines[0] == ("ETRN from evil.example[127.0.0.1]: node=etrn.test, domains=1, "
                        "result=253, messages=2, recipients=2")
    assert any("node=etrn.test" in line and "result=458" in line
               and "reason=rate_limit" in line for line in lines)


async def test_etrn_refusals(provider_factory: Callable[..., Any], tmp_path: Path) -> None:
    running = await _provider(provider_factory, free_port())
    mx = running.mx
    await asyncio.to_thread(_send, mx, "bob@example.org", "odmr")  # hosted, not ETRN
    replies = await asyncio.to_thread(
        _etrn, mx, "example.org", "nowhere.test", "#etrn.test", "", "etrn.test extra",
        "etrn.test:2525", "[127.0.0.1]", "@", "bad_name.test")
    assert replies == [
        (459, "4.7.1 Node example.org not allowed: not an ETRN domain here"),
        (459, "4.7.1 Node nowhere.test not allowed: not an ETRN domain here"),
        (459, "4.7.1 Node #etrn.test not allowed: named queues are not supported"),
        *[(501, "5.5.4 Syntax: ETRN [@]domain or ETRN #queue")] * 6,
    ]
    # The ODMR customer's mail stays held for its ATRN.
    assert len(running.store.held_message_ids(["example.org"])) == 1

    # ETRN needs a HELO/EHLO and no open transaction.
    def sequence() -> list[int]:
        with smtplib.SMTP(*mx, timeout=10) as smtp:
            first = smtp.docmd("ETRN", "etrn.test")[0]
            smtp.ehlo("c.test")
            smtp.mail("a@sender.test")
            second = smtp.docmd("ETRN", "etrn.test")[0]
            return [first, second]

    assert await asyncio.to_thread(sequence) == [503, 503]


async def test_a_failed_etrn_delivery_goes_back_on_hold(
        provider_factory: Callable[..., Any]) -> None:
    """The customer's server is gone again: the mail waits for the next ETRN
    (HELD, with the reason), no bounce, no outbound retry schedule."""
    dead = free_port()  # nothing listens there
    running = await _provider(provider_factory, dead)
    store, mx = running.store, running.mx
    await asyncio.to_thread(_send, mx, "bob@etrn.test", "again")
    [mid] = store.held_message_ids(["etrn.test"])
    [reply] = await asyncio.to_thread(_etrn, mx, "etrn.test")
    assert reply[0] == 253

    def back_on_hold() -> bool:
        m = store.get_message(mid)
        assert m is not None
        [r] = m.recipients
        return r.state == RecipientState.HELD and r.attempts == 1

    await _until(back_on_hold)
    m = store.get_message(mid)
    assert m is not None
    [r] = m.recipients
    assert r.next_attempt_at is None and r.last_reply is not None
    assert f"127.0.0.1:{dead}" in r.last_reply or "refused" in r.last_reply.lower(), r.last_reply
    assert store.held_message_ids(["etrn.test"]) == [mid]
    # No DSN went to the sender: the queue holds only this message.
    assert sum(n for _, n, _, _ in store.queue_summary()) == 1


async def test_mail_of_a_domain_that_stops_being_etrn_while_out_goes_back_on_hold(
        provider_factory: Callable[..., Any]) -> None:
    """`domain set --no-etrn` while an ETRN's delivery is under way: the
    deferred mail goes back on hold for the customer's ATRN, where the hold
    lifetime ends it, not `[outbound] lifetime` (here 1 s, long passed:
    treated as the Internet's mail it would have bounced at once)."""
    greeted = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # accept, never greet: the delivery waits
        greeted.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    running: RunningProvider = await provider_factory(
        tls=False, extra=ETRN_CONFIG + '\n[outbound]\nlifetime = "1s"\n')
    store, mx = running.store, running.mx
    store.add_domain(Domain("etrn.test", "acme", etrn=f"127.0.0.1:{port}"))
    try:
        await asyncio.to_thread(_send, mx, "bob@etrn.test", "in flight")
        [mid] = store.held_message_ids(["etrn.test"])
        await asyncio.sleep(1.2)  # older than [outbound] lifetime
        [reply] = await asyncio.to_thread(_etrn, mx, "etrn.test")
        assert reply[0] == 253
        await asyncio.wait_for(greeted.wait(), 15)
        domain = store.get_domain("etrn.test")
        assert domain is not None
        store.update_domain(dataclasses.replace(domain, etrn=None))  # --no-etrn
        for writer in writers:
            writer.close()  # the connection drops: a 4xx outcome

        def back_on_hold() -> bool:
            m = store.get_message(mid)
            assert m is not None, "bounced: treated as outbound mail past its lifetime"
            return [r.state for r in m.recipients] == [RecipientState.HELD]

        await _until(back_on_hold)
        assert store.held_message_ids(["etrn.test"]) == [mid]
        assert sum(n for _, n, _, _ in store.queue_summary()) == 1  # no DSN
    finally:
        server.close()


def _etrn_from(mx: tuple[str, int], source: str, node: str) -> int:
    with smtplib.SMTP(mx[0], mx[1], timeout=10, source_address=(source, 0)) as smtp:
        smtp.ehlo("c.etrn.test")
        return smtp.docmd("ETRN", node)[0]


async def test_the_rate_limit_is_per_domain_and_holds_under_a_race(
        provider_factory: Callable[..., Any]) -> None:
    running = await _provider(provider_factory, free_port())
    mx = running.mx
    await asyncio.to_thread(_send, mx, "bob@etrn.test", "limit")
    # Per domain, whoever asks: another address gets no ETRN of its own.
    assert await asyncio.to_thread(_etrn_from, mx, "127.0.0.2", "etrn.test") == 253
    assert await asyncio.to_thread(_etrn_from, mx, "127.0.0.1", "etrn.test") == 458
    # Part of @etrn.test is limited and the rest has no mail: not "251 no
    # messages waiting", which would be wrong for the limited part.
    assert await asyncio.to_thread(_etrn_from, mx, "127.0.0.1", "@etrn.test") == 458
    # Eight connections at once from one client: never two get through (at
    # worst none, when all of them counted at once).  (Their own threads:
    # the in-process provider needs the default executor.)
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = await asyncio.gather(*(
            loop.run_in_executor(pool, _etrn_from, mx, "127.0.0.3", "empty.test")
            for _ in range(8)))
    assert codes.count(458) >= 7 and set(codes) <= {251, 458}, codes
