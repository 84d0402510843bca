"""The drain sends the next message's MAIL, RCPT and DATA right after a final
dot, before its reply (RFC 2920 §3.1: message content may start a group),
reads the replies in order, and loses nothing when the customer closes
after a dot with the next group already sent."""

from __future__ import annotations

import asyncio

from support.dialog import Dialog
from test_odmr import authed, hold

EHLO = b"250-customer.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


async def line(d: Dialog, timeout: float = 5.0) -> str:
    return (await asyncio.wait_for(d.reader.readline(), timeout)).decode().rstrip("\r\n")


async def body(d: Dialog) -> None:
    while await line(d) != ".":
        pass


async def start(d: Dialog) -> None:
    await d.send("220 customer.example.org ready")
    assert (await line(d)).upper().startswith("EHLO")
    await d.raw(EHLO)


async def test_next_group_follows_the_dot_before_its_reply(provider, certs):
    first = await hold(provider, rcpts=("a@example.org",))
    second = await hold(provider, rcpts=("b@example.org",))
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    await start(d)
    assert [await line(d) for _ in range(3)][1:] == ["RCPT TO:<a@example.org>", "DATA"]
    await d.raw(b"250 OK\r\n250 OK\r\n354 go\r\n")
    await body(d)
    # Not yet answered, the dot is followed by the next message's group.
    assert (await line(d)).startswith("MAIL FROM:")
    assert [await line(d), await line(d)] == ["RCPT TO:<b@example.org>", "DATA"]
    await d.raw(b"250 first delivered\r\n250 OK\r\n250 OK\r\n354 go\r\n")
    await body(d)
    # The last message: nothing more comes until we answer its dot.
    try:
        extra = await line(d, timeout=0.5)
    except TimeoutError:
        extra = None
    assert extra is None
    await d.send("250 second delivered")
    assert (await line(d)).upper() == "QUIT"
    await d.send("221 bye")
    await provider.sessions_ended()
    assert provider.store.get_message(first) is None
    assert provider.store.get_message(second) is None
    await d.close()


async def test_421_to_a_dot_with_the_next_group_sent_keeps_both(provider, certs):
    first = await hold(provider, rcpts=("a@example.org",))
    second = await hold(provider, rcpts=("b@example.org",))
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    await start(d)
    for _ in range(3):
        await line(d)
    await d.raw(b"250 OK\r\n250 OK\r\n354 go\r\n")
    await body(d)
    assert (await line(d)).startswith("MAIL FROM:")  # the next group is on its way
    await d.send("421 4.3.2 shutting down")
    d.writer.close()
    await provider.sessions_ended()
    # The first got a 4xx (deferred, one attempt), the second no reply: both kept.
    held = provider.store.held_message_ids(["example.org"])
    assert sorted(held) == sorted([first, second])
    message = provider.store.get_message(first)
    assert message is not None and message.recipients[0].attempts == 1
    again = provider.store.get_message(second)
    assert again is not None and again.recipients[0].attempts == 0
