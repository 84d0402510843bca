"""MX listener dialogs over real sockets on 127.0.0.1."""

from __future__ import annotations

from support.dialog import Dialog, send_mail

BODY = b"Subject: hello\r\n\r\nHello Bob.\r\n"


async def test_hosted_domain_is_held_with_queue_id(provider):
    code, lines = await send_mail(*provider.mx, "alice@sender.test", ["bob@example.org"], BODY)
    assert code == 250, lines
    assert lines[0].startswith("2.0.0 OK queued as ")
    queue_id = lines[0].rsplit(" ", 1)[1]
    message = provider.store.get_message(queue_id)
    assert message is not None
    assert message.sender == "alice@sender.test"
    assert [r.address for r in message.recipients] == ["bob@example.org"]
    assert [r.state for r in message.recipients] == ["held"]
    body = b"".join(provider.store.read_body(queue_id))
    assert body.startswith(b"Received: from client.test ([127.0.0.1])")
    assert body.endswith(BODY)


async def test_foreign_domain_is_relay_denied(provider):
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.cmd("MAIL FROM:<eve@example.org>", 250)
    lines = await d.cmd("RCPT TO:<eve@elsewhere.test>", 550)
    assert lines[0].startswith("5.7.1")
    # Even with a hosted recipient alongside, the foreign one stays refused.
    await d.cmd("RCPT TO:<bob@example.org>", 250)
    await d.cmd("RCPT TO:<x@[127.0.0.1]>", 550)
    await d.cmd("RCPT TO:<postmaster>", 550)
    await d.cmd("QUIT", 221)
    await d.close()
    assert provider.store.held_message_ids(["elsewhere.test"]) == []


async def test_ehlo_advertises_extensions(provider):
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    lines = await d.cmd("EHLO client.test", 250)
    keywords = {line.split()[0] for line in lines[1:]}
    assert {"SIZE", "8BITMIME", "PIPELINING", "SMTPUTF8", "ENHANCEDSTATUSCODES",
            "STARTTLS"} <= keywords
    assert "AUTH" not in keywords and "ATRN" not in keywords
    await d.close()


async def test_size_limit_declared_and_streamed(provider_factory):
    p = await provider_factory(extra="[limits]\nmax_message_size = 1024\n")
    d = await Dialog.connect(*p.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    lines = await d.cmd("MAIL FROM:<a@b.test> SIZE=5000", 552)
    assert lines[0].startswith("5.3.4")
    await d.cmd("MAIL FROM:<a@b.test>", 250)
    await d.cmd("RCPT TO:<bob@example.org>", 250)
    await d.cmd("DATA", 354)
    await d.raw(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + (b"y" * 76 + b"\r\n") * 40)
    await d.raw(b".\r\n")
    await d.expect(552)
    # The session goes on after the refusal.
    await d.cmd("NOOP", 250)
    await d.close()
    assert p.store.held_message_ids(["example.org"]) == []


async def test_smuggling_bare_lf_dot_does_not_end_data(provider):
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.cmd("MAIL FROM:<a@sender.test>", 250)
    await d.cmd("RCPT TO:<bob@example.org>", 250)
    await d.cmd("DATA", 354)
    smuggled = (b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@sender.test>\r\n"
                b"RCPT TO:<victim@example.org>\r\nDATA\r\n")
    await d.raw(smuggled)
    await d.raw(b"\r\n.\r\n")
    lines = await d.expect(550)
    assert lines[0].startswith("5.5.2")
    await d.cmd("QUIT", 221)
    await d.close()
    assert provider.store.held_message_ids(["example.org"]) == []


async def test_sequence_errors_and_limits(provider_factory):
    p = await provider_factory(extra="[limits]\nmax_recipients = 2\nmax_errors = 50\n")
    d = await Dialog.connect(*p.mx)
    await d.expect(220)
    await d.cmd("MAIL FROM:<a@b.test>", 503)
    await d.cmd("EHLO client.test", 250)
    await d.cmd("RCPT TO:<bob@example.org>", 503)
    await d.cmd("DATA", 503)
    await d.cmd("MAIL FROM:<a@b.test> FOO=bar", 555)
    await d.cmd("MAIL FROM:<a@b.test>", 250)
    await d.cmd("MAIL FROM:<a@b.test>", 503)
    await d.cmd("DATA", 554)
    await d.cmd("RCPT TO:<one@example.org>", 250)
    await d.cmd("RCPT TO:<one@example.org>", 250)  # duplicate: accepted once
    await d.cmd("RCPT TO:<two@example.org>", 250)
    lines = await d.cmd("RCPT TO:<three@example.org>", 452)
    assert lines[0].startswith("4.5.3")
    await d.cmd("X" * 600, 500)
    await d.cmd("FOOBAR", 500)
    await d.cmd(b"NOOP\x00", 500)
    await d.cmd("QUIT", 221)
    await d.close()


async def test_too_many_errors_closes(provider_factory):
    p = await provider_factory(extra="[limits]\nmax_errors = 3\n")
    d = await Dialog.connect(*p.mx)
    await d.expect(220)
    await d.cmd("BOGUS", 500)
    await d.cmd("BOGUS", 500)
    await d.send("BOGUS")
    await d.expect(500)
    await d.expect(421)
    assert await d.closed()


async def test_pipelined_transaction(provider):
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.raw(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<x@nowhere.test>\r\n"
                b"DATA\r\n")
    await d.expect(250)
    await d.expect(250)
    await d.expect(550)
    await d.expect(354)
    await d.raw(b"Subject: p\r\n\r\n..dot line\r\n.\r\nQUIT\r\n")
    lines = await d.expect(250)
    await d.expect(221)
    queue_id = lines[0].rsplit(" ", 1)[1]
    body = b"".join(provider.store.read_body(queue_id))
    assert body.endswith(b"\r\n.dot line\r\n")


async def test_domain_quota_answers_452(provider):
    from fermoposta.store.base import Domain

    provider.store.update_domain(Domain(name="example.org", account="acme", max_messages=1))
    code, _ = await send_mail(*provider.mx, "a@b.test", ["bob@example.org"], BODY)
    assert code == 250
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.cmd("MAIL FROM:<a@b.test>", 250)
    lines = await d.cmd("RCPT TO:<bob@example.org>", 452)
    assert lines[0].startswith("4.2.2")
    await d.close()


async def test_valid_recipient_list(provider):
    from fermoposta.store.base import Domain

    provider.store.update_domain(Domain(name="example.org", account="acme",
                                        valid_recipients=frozenset({"bob"})))
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.cmd("MAIL FROM:<a@b.test>", 250)
    await d.cmd("RCPT TO:<Bob@example.org>", 250)
    lines = await d.cmd("RCPT TO:<mallory@example.org>", 550)
    assert lines[0].startswith("5.1.1")
    await d.close()


async def test_dsn_parameters_are_accepted_and_stored(provider):
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    lines = await d.cmd("EHLO client.test", 250)
    assert "DSN" in [line.split()[0] for line in lines[1:]]
    await d.cmd("MAIL FROM:<a@sender.test> RET=HDRS ENVID=QQ+2Bid", 250)
    await d.cmd("RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2Bx@example.org",
                250)
    await d.cmd("RCPT TO:<carol@example.org> NOTIFY=NEVER", 250)
    await d.cmd("DATA", 354)
    await d.raw(b"Subject: dsn\r\n\r\nx\r\n.\r\n")
    queue_id = (await d.expect(250))[0].rsplit(" ", 1)[1]
    await d.cmd("MAIL FROM:<a@sender.test> RET=MAYBE", 501)
    await d.cmd("MAIL FROM:<a@sender.test> ENVID=bad=value", 501)
    await d.cmd("MAIL FROM:<a@sender.test>", 250)
    await d.cmd("RCPT TO:<bob@example.org> NOTIFY=NEVER,SUCCESS", 501)
    await d.cmd("RCPT TO:<bob@example.org> NOTIFY=SOMETIMES", 501)
    await d.cmd("RCPT TO:<bob@example.org> ORCPT=no-semicolon", 501)
    await d.close()
    message = provider.store.get_message(queue_id)
    assert message is not None
    assert message.ret == "HDRS" and message.envid == "QQ+2Bid"
    by_address = {r.address: r for r in message.recipients}
    assert by_address["bob@example.org"].notify == "SUCCESS,FAILURE"
    assert by_address["bob@example.org"].orcpt == "rfc822;bob+2Bx@example.org"
    assert by_address["carol@example.org"].notify == "NEVER"
