"""Invisible and look-alike characters in domains at the MX (issue 8, defect 9):
the queue, the log and the customer see one canonical A-label form, and
what IDNA refuses is refused for MAIL FROM and RCPT TO alike."""

from __future__ import annotations

import logging

from support.dialog import Dialog


async def _open(provider) -> Dialog:
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    return d


async def test_zero_width_space_in_a_recipient_domain_is_stored_canonical(provider, caplog):
    caplog.set_level(logging.INFO)
    d = await _open(provider)
    await d.cmd("MAIL FROM:<alice@sender.test> SMTPUTF8", 250)
    await d.cmd("RCPT TO:<bob@example\u200b.org>".encode(), 250)
    await d.cmd("RCPT TO:<carol@\uff45xample\u3002org>".encode(), 250)
    await d.cmd("DATA", 354)
    await d.raw(b"Subject: t\r\n\r\nbody\r\n.\r\n")
    lines = await d.expect(250)
    queue_id = lines[0].rsplit(" ", 1)[1]
    await d.cmd("QUIT", 221)
    message = provider.store.get_message(queue_id)
    assert message is not None
    assert [r.address for r in message.recipients] == ["bob@example.org", "carol@example.org"]
    assert {r.domain for r in message.recipients} == {"example.org"}
    assert "\u200b" not in caplog.text and "\uff45" not in caplog.text


async def test_bad_a_labels_are_refused_in_mail_from_as_in_rcpt_to(provider):
    d = await _open(provider)
    lines = await d.cmd("MAIL FROM:<0@00--0.xn--bcher-kva>", 501)
    assert lines[0].startswith("5.1.7")
    await d.cmd("MAIL FROM:<alice@sender.test> SMTPUTF8", 250)
    lines = await d.cmd("RCPT TO:<0@00--0.xn--bcher-kva>", 501)
    assert lines[0].startswith("5.1.3")
    lines = await d.cmd("RCPT TO:<bob@bad\u2028.example.org>".encode(), 501)
    assert lines[0].startswith("5.1.3")
    await d.cmd("QUIT", 221)
