"""The drain to a customer that offers CHUNKING (RFC 3030): each message as
MAIL, RCPT... and BDAT <n> LAST with its stored octets, several in flight at
once (up to `CHUNKING_WINDOW`), outcomes settled in order, a 503 deferring
and never failing, RSET after a transaction that did not deliver, 452
recipients in a further transaction, big bodies with DATA, and nothing
lost when the connection drops with transactions in flight."""

from __future__ import annotations

import asyncio

import pytest

from fermoposta.provider import drain as drain_module
from fermoposta.store.base import RecipientState
from support.dialog import Dialog
from test_odmr import authed, hold

EHLO = (b"250-customer.example.org\r\n250-PIPELINING\r\n250-CHUNKING\r\n"
        b"250 8BITMIME\r\n")


async def line(d: Dialog, timeout: float = 5.0) -> str:
    return (await asyncio.wait_for(d.reader.readline(), timeout)).decode().rstrip("\r\n")


async def nothing_more(d: Dialog, timeout: float = 0.5) -> bool:
    try:
        await asyncio.wait_for(d.reader.readline(), timeout)
    except TimeoutError:
        return True
    return False


async def transaction(d: Dialog) -> tuple[str, list[str], bytes]:
    """One BDAT transaction as the customer reads it: sender, recipients, octets."""
    mail = await line(d)
    assert mail.startswith("MAIL FROM:<"), mail
    rcpts: list[str] = []
    while True:
        command = await line(d)
        if command.startswith("RCPT TO:<"):
            rcpts.append(command[len("RCPT TO:<"):].split(">", 1)[0])
            continue
        verb, size, last = command.split(" ")
        assert (verb, last) == ("BDAT", "LAST"), command
        octets = await asyncio.wait_for(d.reader.readexactly(int(size)), 5.0)
        return mail, rcpts, octets


async def start(d: Dialog, ehlo: bytes = EHLO) -> None:
    await d.cmd("ATRN example.org", 250)
    await d.send("220 customer.example.org ready")
    assert (await line(d)).upper().startswith("EHLO")
    await d.raw(ehlo)


async def quit_(d: Dialog, provider) -> None:
    assert (await line(d)).upper() == "QUIT"
    await d.send("221 bye")
    await provider.sessions_ended()
    await d.close()


def stored(provider, message_id: str) -> bytes:
    return b"".join(provider.store.read_body(message_id))


async def test_messages_go_back_to_back_as_bdat_with_their_stored_octets(provider, certs):
    ids = [await hold(provider, rcpts=(f"u{i}@example.org",),
                      body=f"Subject: {i}\r\n\r\n.leading dot stays as is\r\n".encode())
           for i in range(3)]
    bodies = {mid: stored(provider, mid) for mid in ids}
    d = await authed(provider, certs)
    await start(d)
    # All three arrive before any reply: no 354 to wait for.
    seen = [await transaction(d) for _ in ids]
    assert [rcpts for _, rcpts, _ in seen] == [[f"u{i}@example.org"] for i in range(3)]
    assert [octets for _, _, octets in seen] == [bodies[mid] for mid in ids]
    assert seen[0][2].count(b"\r\n.leading dot") == 1  # no dot-stuffing in BDAT
    await d.raw(b"250 OK\r\n250 OK\r\n250 2.0.0 stored\r\n" * 3)
    await quit_(d, provider)
    assert all(provider.store.get_message(mid) is None for mid in ids)


async def test_no_more_than_the_window_is_in_flight(provider, certs, monkeypatch):
    monkeypatch.setattr(drain_module, "CHUNKING_WINDOW", 3)
    ids = [await hold(provider, rcpts=(f"u{i}@example.org",)) for i in range(5)]
    d = await authed(provider, certs)
    await start(d)
    for _ in range(3):
        await transaction(d)
    assert await nothing_more(d)  # the window is full: it waits for replies
    await d.raw(b"250 OK\r\n250 OK\r\n250 stored\r\n")
    await transaction(d)  # one answered, one more goes
    assert await nothing_more(d)
    await d.raw(b"250 OK\r\n250 OK\r\n250 stored\r\n" * 2)
    await transaction(d)
    await d.raw(b"250 OK\r\n250 OK\r\n250 stored\r\n" * 2)
    await quit_(d, provider)
    assert all(provider.store.get_message(mid) is None for mid in ids)


async def test_outcomes_in_order_503_defers_and_rset_follows_a_failure(provider, certs,
                                                                      monkeypatch):
    monkeypatch.setattr(drain_module, "CHUNKING_WINDOW", 2)
    first = await hold(provider, rcpts=("a@example.org", "b@example.org"))
    second = await hold(provider, rcpts=("c@example.org",))
    third = await hold(provider, rcpts=("d@example.org",))
    fourth = await hold(provider, rcpts=("e@example.org",))
    d = await authed(provider, certs)
    await start(d)
    await transaction(d)
    await transaction(d)
    # first: b refused for good, a delivered (the transaction itself went well)
    await d.raw(b"250 OK\r\n250 OK\r\n550 5.1.1 no such user\r\n250 stored\r\n")
    _, rcpts, _ = await transaction(d)
    assert rcpts == ["d@example.org"]  # no RSET after a delivered message
    # second: deferred at BDAT: the next group starts with RSET
    await d.raw(b"250 OK\r\n250 OK\r\n451 4.3.0 disk full\r\n")
    assert (await line(d)).upper() == "RSET"
    _, rcpts, _ = await transaction(d)
    assert rcpts == ["e@example.org"]
    # third: out of sequence (503) at MAIL: deferred, never failed
    await d.raw(b"503 5.5.1 nested MAIL\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no RCPT\r\n")
    await d.raw(b"250 reset\r\n250 OK\r\n250 OK\r\n250 stored\r\n")
    await quit_(d, provider)
    message = provider.store.get_message(first)
    assert message is None or all(r.state != RecipientState.HELD for r in message.recipients)
    for deferred in (second, third):
        kept = provider.store.get_message(deferred)
        assert kept is not None
        assert [(r.state, r.attempts) for r in kept.recipients] == [(RecipientState.HELD, 1)]
    assert provider.store.get_message(fourth) is None


async def test_452_recipients_go_in_a_further_transaction(provider, certs):
    mid = await hold(provider, rcpts=("a@example.org", "b@example.org"))
    octets = stored(provider, mid)
    d = await authed(provider, certs)
    await start(d)
    _, rcpts, sent = await transaction(d)
    assert rcpts == ["a@example.org", "b@example.org"] and sent == octets
    await d.raw(b"250 OK\r\n250 OK\r\n452 4.5.3 one at a time\r\n250 stored\r\n")
    _, rcpts, sent = await transaction(d)
    assert rcpts == ["b@example.org"] and sent == octets
    await d.raw(b"250 OK\r\n250 OK\r\n250 stored\r\n")
    await quit_(d, provider)
    assert provider.store.get_message(mid) is None


async def test_a_dropped_connection_keeps_what_was_not_answered(provider, certs):
    ids = [await hold(provider, rcpts=(f"u{i}@example.org",)) for i in range(3)]
    d = await authed(provider, certs)
    await start(d)
    for _ in ids:
        await transaction(d)
    await d.raw(b"250 OK\r\n250 OK\r\n250 stored\r\n250 OK\r\n")  # the 2nd half-answered
    d.writer.close()
    await provider.sessions_ended()
    assert provider.store.get_message(ids[0]) is None
    for kept in ids[1:]:
        message = provider.store.get_message(kept)
        assert message is not None
        # No reply to its BDAT: possibly delivered, so kept and not counted.
        assert [(r.state, r.attempts) for r in message.recipients] == [(RecipientState.HELD, 0)]


async def test_a_big_body_goes_with_data_after_the_window_is_answered(provider, certs,
                                                                    monkeypatch):
    monkeypatch.setattr(drain_module, "PREFETCH_BYTES", 1024)
    small = await hold(provider, rcpts=("a@example.org",))
    big = await hold(provider, rcpts=("b@example.org",),
                     body=b"Subject: big\r\n\r\n" + (b"z" * 70 + b"\r\n") * 40)
    d = await authed(provider, certs)
    await start(d)
    await transaction(d)
    # The DATA group waits until the BDAT transaction is answered.
    assert await nothing_more(d)
    await d.raw(b"250 OK\r\n250 OK\r\n250 stored\r\n")
    assert (await line(d)).startswith("MAIL FROM:")
    assert [await line(d), await line(d)] == ["RCPT TO:<b@example.org>", "DATA"]
    await d.raw(b"250 OK\r\n250 OK\r\n354 go\r\n")
    while await line(d) != ".":
        pass
    await d.send("250 stored")
    await quit_(d, provider)
    assert provider.store.get_message(small) is None
    assert provider.store.get_message(big) is None


@pytest.mark.parametrize("capabilities", [
    b"250-customer.example.org\r\n250-CHUNKING\r\n250 8BITMIME\r\n",  # no PIPELINING
    b"250-customer.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n",  # no CHUNKING
])
async def test_without_chunking_and_pipelining_it_is_data(provider, certs, capabilities):
    mid = await hold(provider)
    d = await authed(provider, certs)
    await start(d, capabilities)
    assert (await line(d)).startswith("MAIL FROM:")
    if b"PIPELINING" in capabilities:
        assert [await line(d), await line(d)] == ["RCPT TO:<bob@example.org>", "DATA"]
        await d.raw(b"250 OK\r\n250 OK\r\n354 go\r\n")
    else:
        await d.send("250 OK")
        assert await line(d) == "RCPT TO:<bob@example.org>"
        await d.send("250 OK")
        assert await line(d) == "DATA"
        await d.send("354 go")
    while await line(d) != ".":
        pass
    await d.send("250 stored")
    await quit_(d, provider)
    assert provider.store.get_message(mid) is None


async def test_a_delivery_is_recorded_even_when_a_refusal_in_its_replies_ends_the_drain(
        provider, certs):
    mid = await hold(provider, rcpts=("a@example.org", "b@example.org"))
    d = await authed(provider, certs)
    await start(d)
    await transaction(d)
    # a accepted, b refused with 421 (closing), yet the message was stored for a.
    await d.raw(b"250 OK\r\n250 OK\r\n421 4.3.2 closing\r\n250 stored\r\n")
    d.writer.close()
    await provider.sessions_ended()
    message = provider.store.get_message(mid)
    assert message is not None
    assert [(r.address, r.state, r.attempts) for r in message.recipients] == [
        ("b@example.org", RecipientState.HELD, 1)]


async def test_452_with_the_others_refused_still_gets_a_further_transaction(provider, certs):
    mid = await hold(provider, rcpts=("a@example.org", "b@example.org"))
    d = await authed(provider, certs)
    await start(d)
    await transaction(d)
    await d.raw(b"250 OK\r\n550 5.1.1 no such user\r\n452 4.5.3 later\r\n"
                b"554 5.5.1 No valid recipients\r\n")
    assert (await line(d)).upper() == "RSET"  # nothing was delivered: RSET first
    _, rcpts, _ = await transaction(d)
    assert rcpts == ["b@example.org"]
    await d.raw(b"250 reset\r\n250 OK\r\n250 OK\r\n250 stored\r\n")
    await quit_(d, provider)
    assert provider.store.get_message(mid) is None  # a bounced, b delivered


async def test_a_refused_rset_ends_the_drain_and_keeps_the_mail(provider, certs, monkeypatch):
    monkeypatch.setattr(drain_module, "CHUNKING_WINDOW", 2)
    first = await hold(provider, rcpts=("a@example.org",))
    second = await hold(provider, rcpts=("b@example.org",))
    third = await hold(provider, rcpts=("c@example.org",))
    d = await authed(provider, certs)
    await start(d)
    await transaction(d)
    await transaction(d)
    await d.raw(b"250 OK\r\n250 OK\r\n451 4.3.0 later\r\n")  # the first: deferred
    assert (await line(d)).upper() == "RSET"
    _, rcpts, _ = await transaction(d)
    assert rcpts == ["c@example.org"]
    await d.raw(b"250 OK\r\n250 OK\r\n250 stored\r\n")  # the second: delivered
    # RSET refused: what follows it cannot be trusted; the drain ends, no QUIT.
    await d.raw(b"500 5.5.1 what RSET\r\n250 OK\r\n250 OK\r\n250 stored\r\n")
    assert await line(d) == ""  # closed without QUIT
    d.writer.close()
    await provider.sessions_ended()
    kept = provider.store.get_message(first)
    assert kept is not None
    assert [(r.state, r.attempts) for r in kept.recipients] == [(RecipientState.HELD, 1)]
    assert provider.store.get_message(second) is None
    unknown = provider.store.get_message(third)  # possibly stored there: a duplicate later
    assert unknown is not None
    assert [(r.state, r.attempts) for r in unknown.recipients] == [(RecipientState.HELD, 0)]
