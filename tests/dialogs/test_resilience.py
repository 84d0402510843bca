"""Implicit TLS, connection limits, store failures (451, nothing lost), UTF-8 and 8-bit mail."""

from __future__ import annotations

import asyncio

from conftest import PASSWORD
from fermoposta.store.base import StoreError
from support.customer import serve_reversed
from support.dialog import Dialog, send_mail
from test_odmr import authed, hold


def broken(*args, **kwargs):
    raise StoreError("disk on fire")


async def test_implicit_tls_odmr_listener(provider_factory, certs):
    p = await provider_factory(odmr_tls=True)
    await hold(p)
    d = await Dialog.connect(*p.odmr_tls, ssl_context=certs.client_context(),
                             server_hostname="localhost")
    await d.expect(220)
    lines = await d.cmd("EHLO customer.example.org", 250)
    assert not any(line.startswith("STARTTLS") for line in lines)
    assert any(line.startswith("AUTH") and "PLAIN" in line for line in lines)
    await d.auth_plain("acme", PASSWORD)
    await d.cmd("ATRN", 250)
    t = await serve_reversed(d)
    assert len(t.messages) == 1
    await d.close()


async def test_connection_limit_per_ip(provider_factory):
    p = await provider_factory(extra="[limits]\nmax_connections_per_ip = 2\n")
    first = await Dialog.connect(*p.mx)
    await first.expect(220)
    second = await Dialog.connect(*p.mx)  # per listener (tests/dialogs/test_listener_limits.py)
    await second.expect(220)
    third = await Dialog.connect(*p.mx)
    lines = await third.expect(421)
    assert lines[0].startswith("4.7.0")
    assert await third.closed()
    await first.cmd("QUIT", 221)
    await first.close()
    await asyncio.sleep(0.1)
    fourth = await Dialog.connect(*p.mx)
    await fourth.expect(220)
    await fourth.close()
    await second.close()


async def test_store_down_at_atrn_answers_451(provider, certs, monkeypatch):
    await hold(provider)
    d = await authed(provider, certs)
    monkeypatch.setattr(provider.store, "domain_names", broken)
    lines = await d.cmd("ATRN example.org", 451)
    assert lines[0].startswith("4.3.0")
    monkeypatch.undo()
    await d.cmd("ATRN example.org", 250)  # second ATRN after a failed first one
    t = await serve_reversed(d)
    assert len(t.messages) == 1


async def test_store_down_at_auth_is_temporary(provider, certs, monkeypatch):
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    await d.starttls(certs.client_context())
    await d.cmd("EHLO customer.example.org", 250)
    monkeypatch.setattr(provider.store, "get_account", broken)
    await d.auth_plain("acme", PASSWORD, 454)
    monkeypatch.undo()
    await d.auth_plain("acme", PASSWORD, 235)
    await d.close()


async def test_store_down_at_mx_defers_never_bounces(provider, monkeypatch):
    monkeypatch.setattr(provider.store, "get_domain", broken)
    monkeypatch.setattr(provider.store, "get_domain_now", broken)  # the event-loop read
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.cmd("MAIL FROM:<a@sender.test>", 250)
    await d.cmd("RCPT TO:<bob@example.org>", 451)
    monkeypatch.undo()
    await d.cmd("RCPT TO:<bob@example.org>", 250)
    monkeypatch.setattr(provider.store, "enqueue", broken)
    monkeypatch.setattr(provider.store, "enqueue_now", broken)  # a lone commit on the loop
    await d.cmd("DATA", 354)
    await d.raw(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    lines = await d.expect(451)
    assert lines[0].startswith("4.3.0")
    await d.close()


async def test_utf8_and_8bit_mail_round_trip(provider, certs):
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.cmd("MAIL FROM:<josé@sender.test>", 553)  # UTF-8 without SMTPUTF8
    await d.cmd("MAIL FROM:<josé@sender.test> SMTPUTF8 BODY=8BITMIME", 250)
    await d.cmd("RCPT TO:<bjørn@example.org>", 250)
    await d.cmd("DATA", 354)
    await d.raw("Subject: héllo\r\n\r\nçà et là\r\n.\r\n".encode())
    await d.expect(250)
    await d.close()
    customer = await authed(provider, certs)
    await customer.cmd("ATRN example.org", 250)
    t = await serve_reversed(customer)
    assert [m.recipients for m in t.messages] == [["bjørn@example.org"]]
    assert any(c.startswith("MAIL FROM:<josé@sender.test>") and "SMTPUTF8" in c
               and "BODY=8BITMIME" in c for c in t.commands)
    assert t.messages[0].body.endswith("çà et là\r\n".encode())
    await customer.close()


async def test_8bit_to_customer_without_8bitmime_bounces_with_dsn(provider, certs):
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.cmd("MAIL FROM:<a@sender.test> BODY=8BITMIME", 250)
    await d.cmd("RCPT TO:<bob@example.org>", 250)
    await d.cmd("DATA", 354)
    await d.raw("Subject: x\r\n\r\nçà\r\n.\r\n".encode())
    qid = (await d.expect(250))[0].rsplit(" ", 1)[1]
    await d.close()
    customer = await authed(provider, certs)
    await customer.cmd("ATRN example.org", 250)
    t = await serve_reversed(customer, ehlo=["old.example.org", "PIPELINING"])
    assert not any(c.startswith("MAIL") for c in t.commands)
    assert provider.store.get_message(qid) is None  # failed with a DSN, not lost
    await customer.close()


async def test_bare_lf_line_endings_in_commands_are_tolerated(provider):
    code, _ = await send_mail(*provider.mx, "a@sender.test", ["bob@example.org"],
                              b"Subject: ok\r\n\r\nfine\r\n")
    assert code == 250
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.raw(b"EHLO client.test\n")
    await d.expect(250)
    await d.raw(b"NOOP\n")
    await d.expect(250)
    await d.close()


async def test_mx_starttls_does_not_ask_for_client_certificates(provider, certs):
    """A sender presenting a certificate from an unknown CA still gets TLS on the MX."""
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.starttls(certs.client_context(certs.rogue_client_file))
    await d.cmd("EHLO client.test", 250)
    await d.cmd("QUIT", 221)
    await d.close()


def test_store_file_is_private(provider_factory, tmp_path):
    import os
    import stat

    from fermoposta.store import open_store

    store = open_store(tmp_path / "data")
    store.close()
    mode = stat.S_IMODE(os.stat(tmp_path / "data" / "fermoposta.sqlite3").st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "data").st_mode) == 0o700
