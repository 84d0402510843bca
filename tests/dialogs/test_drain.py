"""The reversed session against a scripted customer: per-recipient outcomes,
lost connections, capability mismatches, DSNs parsed back field by field."""

from __future__ import annotations

import email
import email.policy

from conftest import PASSWORD, add_customer
from fermoposta.store.base import RecipientState
from support.customer import serve_reversed
from support.dialog import Dialog
from test_odmr import authed, hold


def dsn_of(store, queue_id):
    message = store.get_message(queue_id)
    assert message is not None
    body = b"".join(store.read_body(queue_id))
    return message, email.message_from_bytes(body, policy=email.policy.default)


def only_dsns(store, domains=("sender.test", "example.org")):
    ids = []
    for mid in {*store.held_message_ids(list(domains))}:
        m = store.get_message(mid)
        if m is not None and m.origin == "dsn":
            ids.append(mid)
    return ids


async def test_per_recipient_outcomes_and_dsn(provider, certs):
    qid = await hold(provider, rcpts=("ok@example.org", "later@example.org", "gone@example.org",
                                      "stay@other.test"))
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)

    def policy(rcpt: str) -> str:
        return {"later@example.org": "450 4.2.0 mailbox busy",
                "gone@example.org": "550 5.1.1 no such user"}.get(rcpt, "250 2.1.5 OK")

    t = await serve_reversed(d, rcpt_policy=policy)
    assert t.quit
    assert [m.recipients for m in t.messages] == [["ok@example.org"]]
    message = provider.store.get_message(qid)
    assert message is not None
    left = {r.address: r for r in message.recipients}
    # Delivered and failed recipients left; the 4xx one and the other domain stay.
    assert set(left) == {"later@example.org", "stay@other.test"}
    assert left["later@example.org"].attempts == 1
    assert "450" in (left["later@example.org"].last_reply or "")
    assert left["stay@other.test"].attempts == 0
    # One DSN for the sender (sender.test is not hosted: it waits OUTBOUND).
    dsns = [m for m in _all_messages(provider.store) if m.origin == "dsn"]
    assert len(dsns) == 1
    dsn_msg = dsns[0]
    assert dsn_msg.sender == ""
    assert [(r.address, r.state) for r in dsn_msg.recipients] == [
        ("alice@sender.test", RecipientState.OUTBOUND)]
    _, parsed = dsn_of(provider.store, dsn_msg.id)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.provider.test"
    parts = list(parsed.iter_parts())
    status = parts[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; mx.provider.test"
    assert blocks[0]["Arrival-Date"]
    assert len(blocks) == 2
    assert blocks[1]["Final-Recipient"] == "rfc822; gone@example.org"
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.1.1"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert blocks[1]["Remote-MTA"] == "dns; customer.example.org"
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert "Subject: held" in parts[2].get_payload()
    await d.close()


def _all_messages(store):
    # Walk every held/outbound message through the public interface.
    import sqlite3

    rows = sqlite3.connect(store.path).execute("SELECT id FROM messages").fetchall()
    return [store.get_message(r[0]) for r in rows]


async def test_connection_lost_after_final_dot_keeps_recipients(provider, certs):
    first = await hold(provider, rcpts=("a@example.org",))
    second = await hold(provider, rcpts=("b@example.org",))
    third = await hold(provider, rcpts=("c@example.org",))
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d, drop_after_dot=2)
    assert len(t.messages) == 1
    await provider.sessions_ended()  # the drain has seen the drop and committed
    # The first was acknowledged: gone.  The second's fate is unknown: kept
    # (a duplicate is possible, a loss is not).  The third was never tried.
    assert provider.store.get_message(first) is None
    assert provider.store.get_message(second) is not None
    assert provider.store.get_message(third) is not None
    assert provider.store.held_message_ids(["example.org"]) == [second, third]
    # Leases were released: a new session collects the rest.
    d2 = await authed(provider, certs)
    await d2.cmd("ATRN example.org", 250)
    t2 = await serve_reversed(d2)
    assert [m.recipients for m in t2.messages] == [["b@example.org"], ["c@example.org"]]
    assert provider.store.held_message_ids(["example.org"]) == []
    await d2.close()


async def test_final_replies_451_and_552(provider, certs):
    q1 = await hold(provider, rcpts=("a@example.org",))
    q2 = await hold(provider, rcpts=("b@example.org",))
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    replies = {1: "451 4.3.0 try later", 2: "552 5.3.4 too big for us"}
    t = await serve_reversed(d, data_reply=lambda n: replies[n])
    assert t.quit and t.messages == []
    m1 = provider.store.get_message(q1)
    assert m1 is not None and m1.recipients[0].attempts == 1
    assert provider.store.get_message(q2) is None  # failed, DSN queued
    dsns = [m for m in _all_messages(provider.store) if m.origin == "dsn"]
    assert len(dsns) == 1
    await d.close()


async def test_mail_451_defers_and_rset(provider, certs):
    qid = await hold(provider)
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d, mail_reply="451 4.3.0 not now")
    assert "RSET" in t.commands and t.quit
    message = provider.store.get_message(qid)
    assert message is not None and message.recipients[0].attempts == 1
    await d.close()


async def test_no_pipelining_lockstep_and_helo_fallback(provider, certs):
    await hold(provider, rcpts=("a@example.org", "b@example.org"))
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)

    # A customer that refuses EHLO (502) forces HELO: no extensions at all.
    async def run():
        await d.send("220 old.example.org SMTP")
        line = await d.reader.readline()
        assert line.startswith(b"EHLO")
        await d.send("502 5.5.1 what")
        assert (await d.reader.readline()).startswith(b"HELO")
        await d.send("250 old.example.org")
        mail = await d.reader.readline()
        assert mail == b"MAIL FROM:<alice@sender.test>\r\n"  # no SIZE/BODY without EHLO
        await d.send("250 ok")
        assert (await d.reader.readline()).startswith(b"RCPT TO:<a@example.org>")
        await d.send("250 ok")
        assert (await d.reader.readline()).startswith(b"RCPT TO:<b@example.org>")
        await d.send("250 ok")
        assert await d.reader.readline() == b"DATA\r\n"
        await d.send("354 go")
        while await d.reader.readline() != b".\r\n":
            pass
        await d.send("250 ok")
        assert await d.reader.readline() == b"QUIT\r\n"
        await d.send("221 bye")

    await run()
    assert provider.store.held_message_ids(["example.org"]) == []
    await d.close()


async def test_size_too_big_for_customer_bounces_without_sending(provider, certs):
    qid = await hold(provider, body=b"Subject: big\r\n\r\n" + b"x" * 500 + b"\r\n")
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d, ehlo=["customer.example.org", "SIZE 100", "PIPELINING"])
    assert not any(c.startswith("MAIL") for c in t.commands)
    assert provider.store.get_message(qid) is None
    dsns = [m for m in _all_messages(provider.store) if m.origin == "dsn"]
    assert len(dsns) == 1
    await d.close()


async def test_customer_greeting_554_and_garbage(provider, certs):
    qid = await hold(provider)
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d, greeting="554 go away")
    assert t.quit
    assert provider.store.get_message(qid) is not None
    await d.close()
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    await d.raw(b"2x0 garbage\r\n")
    assert await d.closed()
    assert provider.store.held_message_ids(["example.org"]) == [qid]


async def test_null_sender_failure_gets_no_dsn(provider, certs):
    qid = await hold(provider, sender="")
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    await serve_reversed(d, rcpt_policy=lambda r: "550 5.1.1 unknown")
    assert provider.store.get_message(qid) is None
    assert [m for m in _all_messages(provider.store) if m.origin == "dsn"] == []
    await d.close()


async def test_dsn_to_hosted_sender_is_held_for_its_customer(provider, certs):
    add_customer(provider.store, "third", ("third.test",))
    await hold(provider, sender="someone@third.test")
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    await serve_reversed(d, rcpt_policy=lambda r: "550 5.1.1 unknown")
    await d.close()
    dsn_ids = provider.store.held_message_ids(["third.test"])
    assert len(dsn_ids) == 1
    message = provider.store.get_message(dsn_ids[0])
    assert message is not None and message.origin == "dsn"


async def test_no_mail_reply_quit_mode(provider_factory, certs):
    p = await provider_factory(extra='[odmr]\nno_mail_reply = "quit"\n')
    d = await authed(p, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d)
    assert t.quit and t.messages == []
    assert t.commands == ["EHLO mx.provider.test", "QUIT"]
    await d.close()


async def test_large_drain_over_tls(provider, certs):
    """1,000 held messages collected in one TLS session, nothing lost or doubled."""
    import io

    from fermoposta.store.base import MessageOrigin, NewMessage, NewRecipient

    body = b"Subject: bulk\r\n\r\n" + b"line of text\r\n" * 20
    ids = []
    for i in range(1000):
        message = NewMessage(sender="bulk@sender.test",
                             recipients=(NewRecipient(f"u{i}@example.org", "example.org",
                                                      RecipientState.HELD),),
                             origin=MessageOrigin.MX)
        ids.append(provider.store.enqueue(message, io.BytesIO(body)))
    d = await authed(provider, certs)
    await d.cmd("ATRN", 250)
    t = await serve_reversed(d)
    assert len(t.messages) == 1000
    assert sorted(m.recipients[0] for m in t.messages) == sorted(
        f"u{i}@example.org" for i in range(1000))
    assert all(m.body == body for m in t.messages)
    assert provider.store.held_message_ids(["example.org"]) == []
    await d.close()


async def test_452_too_many_recipients_splits_transactions(provider, certs):
    """A customer that takes one recipient per transaction (as an LMTP hand-off
    does) still gets every recipient in this session, each exactly once."""
    qid = await hold(provider, rcpts=("a@example.org", "b@example.org", "c@example.org"))
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    taken: list[str] = []

    def one_per_transaction(rcpt: str) -> str:
        if taken and taken[-1] == "open":
            return "452 4.5.3 Too many recipients"
        taken.append("open")
        return "250 2.1.5 OK"

    def data_reply(n: int) -> str:
        taken.append("closed")
        return "250 2.0.0 OK"

    t = await serve_reversed(d, rcpt_policy=one_per_transaction, data_reply=data_reply)
    assert [m.recipients for m in t.messages] == [["a@example.org"], ["b@example.org"],
                                                  ["c@example.org"]]
    assert provider.store.get_message(qid) is None
    await d.close()


async def test_452_for_every_recipient_defers_without_looping(provider, certs):
    qid = await hold(provider, rcpts=("a@example.org",))
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d, rcpt_policy=lambda r: "452 4.5.3 Too many recipients")
    assert t.quit and t.messages == []
    message = provider.store.get_message(qid)
    assert message is not None and message.recipients[0].attempts == 1
    await d.close()


async def test_out_of_place_positive_replies_never_deliver(provider, certs):
    """252 to MAIL, or 250 instead of 354 to DATA, must not count as delivery."""
    q1 = await hold(provider, rcpts=("a@example.org",))
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d, mail_reply="252 2.1.0 odd")
    # The pipelined DATA then got 354 with no recipient of ours accepted: the
    # provider drops the connection rather than risk an empty message.
    assert not t.quit and t.messages == []
    m = provider.store.get_message(q1)
    assert m is not None and "Unexpected reply" in (m.recipients[0].last_reply or "")
    await d.close()

    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    await d.send("220 customer.example.org")
    assert (await d.reader.readline()).startswith(b"EHLO")
    await d.send("250 customer.example.org")
    assert (await d.reader.readline()).startswith(b"MAIL")
    await d.send("250 ok")
    assert (await d.reader.readline()).startswith(b"RCPT")
    await d.send("250 ok")
    assert await d.reader.readline() == b"DATA\r\n"
    await d.send("250 2.0.0 thanks")  # a 2xx where 354 belongs
    assert await d.reader.readline() == b"RSET\r\n"
    await d.send("250 ok")
    assert await d.reader.readline() == b"QUIT\r\n"
    await d.send("221 bye")
    await d.close()
    m = provider.store.get_message(q1)
    assert m is not None and m.recipients[0].attempts == 2


async def test_ascii_dsn_reaches_a_customer_without_8bitmime(provider, certs):
    add_customer(provider.store, "third", ("third.test",))
    await hold(provider, sender="someone@third.test")
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    await serve_reversed(d, rcpt_policy=lambda r: "550 5.1.1 unknown")
    await d.close()
    [dsn_id] = provider.store.held_message_ids(["third.test"])
    dsn = provider.store.get_message(dsn_id)
    assert dsn is not None and not dsn.body_8bit
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    await d.starttls(certs.client_context())
    await d.cmd("EHLO customer.example.org", 250)
    await d.auth_plain("third", PASSWORD)
    await d.cmd("ATRN third.test", 250)
    t = await serve_reversed(d, ehlo=["old.third.test", "PIPELINING"])  # no 8BITMIME
    assert len(t.messages) == 1 and t.messages[0].sender == ""
    assert b"multipart/report" in t.messages[0].body
    await d.close()


async def test_dsn_parameters_reach_a_dsn_customer_and_relayed_notice_otherwise(provider,
                                                                                certs):
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.cmd("MAIL FROM:<alice@sender.test> RET=HDRS ENVID=abc", 250)
    await d.cmd("RCPT TO:<bob@example.org> NOTIFY=SUCCESS ORCPT=rfc822;bob@example.org", 250)
    await d.cmd("DATA", 354)
    await d.raw(b"Subject: dsn\r\n\r\nx\r\n.\r\n")
    await d.expect(250)
    await d.close()
    # A customer that offers DSN gets the parameters and owes the notice itself.
    c = await authed(provider, certs)
    await c.cmd("ATRN example.org", 250)
    t = await serve_reversed(c, ehlo=["customer.example.org", "PIPELINING", "DSN"])
    await c.close()
    assert any(x.startswith("MAIL FROM:<alice@sender.test>") and "RET=HDRS" in x
               and "ENVID=abc" in x for x in t.commands)
    assert any(x.startswith("RCPT TO:<bob@example.org>") and "NOTIFY=SUCCESS" in x
               and "ORCPT=rfc822;bob@example.org" in x for x in t.commands)
    assert [m for m in _all_messages(provider.store) if m.origin == "dsn"] == []

    # One without DSN: the provider sends a "relayed" notice to the sender.
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.cmd("MAIL FROM:<alice@sender.test>", 250)
    await d.cmd("RCPT TO:<bob@example.org> NOTIFY=SUCCESS", 250)
    await d.cmd("DATA", 354)
    await d.raw(b"Subject: dsn2\r\n\r\nx\r\n.\r\n")
    await d.expect(250)
    await d.close()
    c = await authed(provider, certs)
    await c.cmd("ATRN example.org", 250)
    t = await serve_reversed(c)
    await c.close()
    assert not any("NOTIFY" in x for x in t.commands)
    [dsn] = [m for m in _all_messages(provider.store) if m.origin == "dsn"]
    _, parsed = dsn_of(provider.store, dsn.id)
    blocks = list(parsed.iter_parts())[1].get_payload()
    assert blocks[1]["Action"] == "relayed" and blocks[1]["Status"] == "2.0.0"


async def test_a_node_that_loses_the_store_starts_no_new_transaction(provider, certs,
                                                                     monkeypatch):
    """Issue 9: when this node's store heartbeat fails, another node may soon
    take its leases; the drain stops before the next message (QUIT), and what
    it did not send stays queued for the next ATRN, on any node."""
    ids = [await hold(provider, rcpts=(f"r{i}@example.org",)) for i in range(3)]
    calls = {"n": 0}

    def current() -> bool:
        calls["n"] += 1
        return calls["n"] <= 1  # the first message goes, then the heartbeat is "lost"

    monkeypatch.setattr(provider.store, "holder_is_current", current)
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d)
    assert t.quit and len(t.messages) == 1
    left = [i for i in ids if provider.store.get_message(i) is not None]
    assert len(left) == 2


async def test_a_message_deleted_during_the_drain_is_skipped(provider, certs):
    # The drain lists the held mail, then reads the messages in batches
    # ahead of sending them: one that `queue delete` removed before its
    # batch was read is skipped, and the others all go out and leave the
    # queue.
    ids = [await hold(provider, rcpts=(f"u{i}@example.org",)) for i in range(8)]
    store = provider.store
    real_get = store.get_message
    real_read_ahead = store.read_ahead
    gone = ids[5]
    batches = []

    def read_ahead(message_ids, *limits):
        batches.append(list(message_ids))
        if gone in message_ids and real_get(gone) is not None:
            assert store.delete_messages([gone]) == [gone]
        return real_read_ahead(message_ids, *limits)

    store.read_ahead = read_ahead  # type: ignore[method-assign]
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d)
    assert t.quit
    assert sorted(m.recipients[0] for m in t.messages) == sorted(
        f"u{i}@example.org" for i in range(8) if i != 5)
    assert store.held_message_ids(["example.org"]) == []
    assert all(real_get(i) is None for i in ids)
    assert [i for batch in batches for i in batch] == ids  # each read once, in order
    await d.close()


async def test_mail_goes_out_as_the_mx_took_it_in_with_or_without_dots(provider, certs,
                                                                        monkeypatch):
    """The MX records which bodies need no rewriting (no line-leading dot);
    those go out unchanged, the others through the dot-stuffer, and a body
    whose flag lies (a line "." and commands behind it) still reaches the
    customer whole: its data never ends early."""
    import io

    from fermoposta.store.base import MessageOrigin, NewMessage, NewRecipient

    plain = b"Subject: plain\r\n\r\nNo dot leads a line. Dots inside are fine.\r\n"
    dotted = b"Subject: dots\r\n\r\n.\r\n..two\r\n.leading\r\nend\r\n"
    ids = [await hold(provider, body=plain), await hold(provider, body=dotted)]
    stored = [provider.store.get_message(mid) for mid in ids]
    assert [m.wire_ready if m else None for m in stored] == [True, False]
    lying = b"Subject: lie\r\n\r\nbefore\r\n.\r\nMAIL FROM:<evil@sender.test>\r\nafter\r\n"
    ids.append(provider.store.enqueue(
        NewMessage("alice@sender.test",
                   (NewRecipient("bob@example.org", "example.org", RecipientState.HELD),),
                   MessageOrigin.MX, wire_ready=True),
        io.BytesIO(lying)))
    bodies = [b"".join(provider.store.read_body(mid)) for mid in ids]
    from fermoposta.net import client
    stuffed: list[object] = []

    class CountedStuffer(client.DotStuffer):
        def __init__(self) -> None:
            super().__init__()
            stuffed.append(self)

    monkeypatch.setattr(client, "DotStuffer", CountedStuffer)
    d = await authed(provider, certs)
    await d.cmd("ATRN", 250)
    t = await serve_reversed(d)
    assert [m.body for m in t.messages] == bodies
    assert bodies[2] == lying and bodies[1].endswith(dotted)
    assert not any(c.startswith("MAIL FROM:<evil") for c in t.commands)
    assert len(stuffed) == 1  # only the dotted body went through the stuffer
    assert provider.store.held_message_ids(["example.org"]) == []
    await d.close()


async def test_bodies_past_the_read_ahead_budget_are_streamed_whole(provider, certs,
                                                                    monkeypatch):
    """The drain reads at most PREFETCH_BATCH_BYTES of bodies per batch; the
    bodies left out are read from the store when their message goes, and
    every message still arrives whole and in order."""
    import fermoposta.provider.drain as drain_module

    monkeypatch.setattr(drain_module, "PREFETCH_MESSAGES", 4)
    monkeypatch.setattr(drain_module, "PREFETCH_BATCH_BYTES", 600)
    bodies = [f"Subject: m{i}\r\n\r\n".encode() + bytes([65 + i]) * 300 + b"\r\n"
              for i in range(9)]
    for i, body in enumerate(bodies):
        await hold(provider, rcpts=(f"u{i}@example.org",), body=body)
    store = provider.store
    real_read_ahead, real_read_body = store.read_ahead, store.read_body
    prefetched, streamed = [], []

    def read_ahead(message_ids, *limits):
        got = real_read_ahead(message_ids, *limits)
        prefetched.extend(m.id for m, body in got if m is not None and body is not None)
        return got

    def read_body(message_id):
        streamed.append(message_id)
        return real_read_body(message_id)

    store.read_ahead = read_ahead  # type: ignore[method-assign]
    store.read_body = read_body  # type: ignore[method-assign]
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d)
    assert t.quit
    assert [m.recipients[0] for m in t.messages] == [f"u{i}@example.org" for i in range(9)]
    for i, received in enumerate(t.messages):
        assert bytes([65 + i]) * 300 in received.body, i
    # About 350 bytes each: one body per batch of four fits in 600 bytes.
    assert len(prefetched) == 3 and len(streamed) == 6
    assert not set(prefetched) & set(streamed)
    assert store.held_message_ids(["example.org"]) == []
    await d.close()
