"""The whole post office, one round trip: a message written at the site's
outbox reaches a server "on the Internet" (smtp-sink behind the provider's
outbound delivery, found through a real DNS server, dnsmasq) in one session;
the reply comes back to the provider's MX, is held, and reaches the site's
Maildir at the next ATRN."""

from __future__ import annotations

import asyncio
import mailbox
import time

from test_outbox import start_outbox

from dnsmasq import dnsmasq_server
from fermoposta.customer.pull import pull_once
from peers import sink_messages, smtp_sink
from support.dialog import send_mail
from support.outbox import site_config, submit

__all__ = ["start_outbox"]


async def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return False


async def test_outbox_to_the_internet_and_the_reply_back(provider_factory, certs, tmp_path,
                                                        start_outbox):
    with smtp_sink(tmp_path / "internet") as sink_port, dnsmasq_server(
            mx=[("elsewhere.test", "mx.elsewhere.test", 10)],
            hosts={"mx.elsewhere.test": "127.0.0.1"}) as (_, dns_port):
        provider = await provider_factory(extra=(
            f'[outbound]\nresolver = "127.0.0.1:{dns_port}"\nport = {sink_port}\n'
            'queue_interval = "1s"\n'))
        outbox = await start_outbox(site_config(tmp_path, provider, certs, net_block=False))
        code, _ = await submit(outbox.port, "bob@example.org", ["friend@elsewhere.test"])
        assert code == 250
        summary = await pull_once(outbox.config, outbox.config.pulls[0])
        assert summary.exit_code == 0, summary.lines()
        assert summary.push is not None and summary.push.sent == 1
        # The provider looked up elsewhere.test's MX at dnsmasq and delivered.
        assert await wait_until(lambda: len(sink_messages(tmp_path / "internet")) == 1)
        [delivered] = sink_messages(tmp_path / "internet")
        assert b"hello world" in delivered and b"From: bob@example.org" in delivered

    # The friend replies: Internet -> provider MX -> hold -> ATRN -> Maildir.
    code, _ = await send_mail(*provider.mx, "friend@elsewhere.test", ["bob@example.org"],
                              b"Subject: Re: out\r\n\r\nthanks\r\n")
    assert code == 250
    summary = await pull_once(outbox.config, outbox.config.pulls[0])
    assert summary.exit_code == 0 and summary.messages == 1, summary.lines()
    box = mailbox.Maildir(str(tmp_path / "site/mail/example.org/bob/Maildir"), create=False)
    assert [m["Subject"] for m in box] == ["Re: out"]
