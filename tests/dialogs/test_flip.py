"""The ATRN flip is a hand-off (issue 8, defect 4): after the 250 to ATRN the
provider is the SMTP client, so an unexpected error in the drain must never
put a server reply (`451 4.3.0 Local error`) on the reversed stream; it drops
the connection and what was not acknowledged stays queued."""

from __future__ import annotations

import asyncio

import pytest

from fermoposta.provider import drain as drain_module
from support.dialog import Dialog
from test_odmr import authed, hold


async def _read_all(d: Dialog, timeout: float = 10.0) -> bytes:
    received = b""
    while True:
        try:
            chunk = await asyncio.wait_for(d.reader.read(65536), timeout)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


@pytest.mark.parametrize("where", ["before_first_message", "after_ehlo_reply"])
async def test_a_bug_in_the_drain_never_writes_a_server_reply(provider, certs, monkeypatch,
                                                              where):
    queue_id = await hold(provider)

    async def broken(self: drain_module.Drain) -> None:
        raise RuntimeError("a bug in the drain")

    if where == "before_first_message":
        monkeypatch.setattr(drain_module.Drain, "_deliver_all", broken)
    else:
        monkeypatch.setattr(drain_module.Drain, "_quit", broken)
        monkeypatch.setattr(drain_module.Drain, "_deliver_all", broken)
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    # We are the server now: greet and answer the provider's EHLO.
    await d.send("220 customer.example.org ESMTP ready")
    ehlo = await asyncio.wait_for(d.reader.readline(), 10)
    assert ehlo.startswith(b"EHLO "), ehlo
    await d.send("250 customer.example.org")
    rest = await _read_all(d)
    # Nothing that looks like a server reply (a 3-digit code) reaches us.
    for line in rest.splitlines():
        assert not line[:3].isdigit(), f"server reply after the flip: {rest!r}"
    # The connection was dropped and the message is still held, lease released.
    message = provider.store.get_message(queue_id)
    assert message is not None and [r.address for r in message.recipients] == ["bob@example.org"]
    await asyncio.sleep(0.1)
    assert provider.store.acquire_leases(["example.org"], "probe", 60.0)
    await d.close()
