"""The submission listener (RFC 6409): AUTH required, senders restricted,
rate limit, recipients split between the hold queue and outbound."""

from __future__ import annotations

import base64

from conftest import PASSWORD
from fermoposta.store.base import RecipientState
from support.dialog import Dialog

BODY = b"Subject: out\r\n\r\nfrom the site\r\n"


async def authenticated(provider, certs) -> Dialog:
    d = await Dialog.connect(*provider.submission)
    await d.expect(220)
    lines = await d.cmd("EHLO mail.example.org", 250)
    assert "STARTTLS" in [line.split()[0] for line in lines[1:]]
    await d.starttls(certs.client_context())
    lines = await d.cmd("EHLO mail.example.org", 250)
    keywords = {line.split()[0]: line for line in lines[1:]}
    assert "PLAIN" in keywords["AUTH"] and "DSN" in keywords and "ATRN" not in keywords
    await d.auth_plain("acme", PASSWORD)
    return d


async def test_submission_splits_hosted_and_outbound(provider, certs):
    d = await authenticated(provider, certs)
    await d.cmd("MAIL FROM:<bob@example.org>", 250)
    await d.cmd("RCPT TO:<friend@elsewhere.test>", 250)
    await d.cmd("RCPT TO:<x@other.test>", 250)  # hosted for another customer
    await d.cmd("DATA", 354)
    await d.raw(BODY + b".\r\n")
    queue_id = (await d.expect(250))[0].rsplit(" ", 1)[1]
    await d.cmd("QUIT", 221)
    message = provider.store.get_message(queue_id)
    assert message is not None and message.origin == "submission"
    states = {r.address: r.state for r in message.recipients}
    assert states == {"friend@elsewhere.test": RecipientState.OUTBOUND,
                      "x@other.test": RecipientState.HELD}
    body = b"".join(provider.store.read_body(queue_id))
    assert b"with ESMTPSA" in body.split(b"\r\n\r\n")[0]


async def test_submission_requires_auth(provider):
    d = await Dialog.connect(*provider.submission)
    await d.expect(220)
    await d.cmd("EHLO mail.example.org", 250)
    lines = await d.cmd("MAIL FROM:<bob@example.org>", 530)
    assert lines[0].startswith("5.7.0")
    await d.cmd("RCPT TO:<friend@elsewhere.test>", 503)
    await d.cmd("AUTH PLAIN " + base64.b64encode(f"\0acme\0{PASSWORD}".encode()).decode(), 538)
    await d.close()


async def test_foreign_sender_refused(provider, certs):
    d = await authenticated(provider, certs)
    for sender in ("<eve@elsewhere.test>", "<x@other.test>"):
        lines = await d.cmd(f"MAIL FROM:{sender}", 553)
        assert lines[0].startswith("5.7.1")
    # The null sender: a site's own delivery notice (its local retry spool).
    await d.cmd("MAIL FROM:<>", 250)
    await d.cmd("RSET", 250)
    await d.cmd("MAIL FROM:<Bob@EXAMPLE.org>", 250)  # case does not matter
    lines = await d.cmd("RCPT TO:<postmaster>", 550)  # no domain: nowhere to send it
    assert lines[0].startswith("5.1.3")
    await d.close()


async def test_rate_limit(provider_factory, certs):
    p = await provider_factory(extra="[submission]\nrate_limit = 2\n")
    d = await authenticated(p, certs)
    for _ in range(2):
        await d.cmd("MAIL FROM:<bob@example.org>", 250)
        await d.cmd("RCPT TO:<friend@elsewhere.test>", 250)
        await d.cmd("DATA", 354)
        await d.raw(BODY + b".\r\n")
        await d.expect(250)
    lines = await d.cmd("MAIL FROM:<bob@example.org>", 450)
    assert lines[0].startswith("4.7.1")
    await d.close()


async def test_wrong_password_and_mx_still_no_relay(provider, certs):
    d = await Dialog.connect(*provider.submission)
    await d.expect(220)
    await d.cmd("EHLO mail.example.org", 250)
    await d.starttls(certs.client_context())
    await d.cmd("EHLO mail.example.org", 250)
    await d.auth_plain("acme", "wrong", 535)
    await d.cmd("MAIL FROM:<bob@example.org>", 530)
    await d.close()
    # The MX never relays, even for a sender in a hosted domain.
    mx = await Dialog.connect(*provider.mx)
    await mx.expect(220)
    await mx.cmd("EHLO mail.example.org", 250)
    await mx.cmd("MAIL FROM:<bob@example.org>", 250)
    await mx.cmd("RCPT TO:<friend@elsewhere.test>", 550)
    await mx.close()


async def test_a_big_submission_is_stored_while_it_arrives(provider, certs, monkeypatch):
    """Submission stages a big body like the MX (net/body_stager.py): the
    outbound message is byte for byte what the site sent."""
    import hashlib

    stages = []
    make = provider.store.stage_body

    def stage_body(queue_id, body):  # type: ignore[no-untyped-def]
        stage = make(queue_id, body)
        stages.append(stage)
        return stage

    monkeypatch.setattr(provider.store, "stage_body", stage_body)
    content = b"Subject: big\r\n\r\n" + b"".join(
        b"line %07d of a big attachment, base64-ish ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n" % i
        for i in range(60_000))  # ~4.4 MB
    d = await authenticated(provider, certs)
    await d.cmd("MAIL FROM:<bob@example.org>", 250)
    await d.cmd("RCPT TO:<friend@elsewhere.test>", 250)
    await d.cmd("DATA", 354)
    for i in range(0, len(content), 65536):
        await d.raw(content[i:i + 65536])
    await d.raw(b".\r\n")
    queue_id = (await d.expect(250))[0].rsplit(" ", 1)[1]
    await d.cmd("QUIT", 221)
    assert sum(stage.size for stage in stages) >= 2 * 1024 * 1024
    stored = b"".join(provider.store.read_body(queue_id))
    assert hashlib.sha256(stored[len(stored) - len(content):]).digest() == \
        hashlib.sha256(content).digest()
    message = provider.store.get_message(queue_id)
    assert message is not None and message.origin == "submission"
    assert [r.state for r in message.recipients] == [RecipientState.OUTBOUND]
