"""Group commit seen from the MX: many senders at once each get their own
queue id once their message is stored; a commit that fails (a full disk)
answers every sender of the batch 451 and stores nothing; when the disk is
back the same senders get 250.  Every transaction a session opens is closed
again (the group commit waits for open ones, boundedly)."""

from __future__ import annotations

import asyncio

from conftest import PASSWORD
from fermoposta.store.base import StoreError
from support.dialog import Dialog, open_data, send_mail

BODY = b"Subject: group\r\n\r\nhello\r\n"


async def burst(provider, n: int) -> list[tuple[int, list[str]]]:
    return list(await asyncio.gather(*(
        send_mail(*provider.mx, "alice@sender.test", [f"u{i}@example.org"], BODY)
        for i in range(n))))


LIMITS = "[limits]\nmax_connections_per_ip = 50\n"  # every sender is 127.0.0.1


async def test_concurrent_senders_share_commits_and_get_their_own_ids(provider_factory):
    provider = await provider_factory(extra=LIMITS)
    batches: list[int] = []
    real, real_now = provider.store.enqueue_batch, provider.store.enqueue_batch_now

    def counting(items):
        batches.append(len(items))
        return real(items)

    def counting_now(items):  # on the loop (SQLite); WouldBlock, uncounted, on PostgreSQL
        stored = real_now(items)
        batches.append(len(items))
        return stored

    provider.store.enqueue_batch = counting
    provider.store.enqueue_batch_now = counting_now
    results = await burst(provider, 30)
    assert [code for code, _ in results] == [250] * 30
    ids = [lines[0].rsplit(" ", 1)[1] for _, lines in results]
    assert len(set(ids)) == 30
    assert sorted(provider.store.held_message_ids(["example.org"])) == sorted(ids)
    for i, queue_id in enumerate(ids):  # each sender's id names its own message
        message = provider.store.get_message(queue_id)
        assert message is not None and [r.address for r in message.recipients] == \
            [f"u{i}@example.org"]
    assert provider.provider.intake.committed == 30
    # Senders finishing together shared commits (30 senders, fewer commits).
    assert sum(batches) <= 30 and provider.provider.intake.commits < 30, batches
    assert any(n > 1 for n in batches), batches


async def test_a_failed_commit_answers_451_and_stores_nothing(provider_factory):
    provider = await provider_factory(extra=LIMITS)
    def full(*args, **kwargs):
        raise StoreError("database or disk is full")

    real_batch, real_one = provider.store.enqueue_batch, provider.store.enqueue
    real_now, real_batch_now = provider.store.enqueue_now, provider.store.enqueue_batch_now
    provider.store.enqueue_batch = full
    provider.store.enqueue = full
    provider.store.enqueue_now = full  # a sender alone at its final dot: on the loop
    provider.store.enqueue_batch_now = full  # senders finishing together: on the loop too
    results = await burst(provider, 12)
    assert [code for code, _ in results] == [451] * 12
    assert provider.store.held_message_ids(["example.org"]) == []
    provider.store.enqueue_batch, provider.store.enqueue = real_batch, real_one
    provider.store.enqueue_now, provider.store.enqueue_batch_now = real_now, real_batch_now
    again = await burst(provider, 12)
    assert [code for code, _ in again] == [250] * 12
    assert len(provider.store.held_message_ids(["example.org"])) == 12


async def wait_for_no_open_transaction(provider) -> None:
    for _ in range(200):  # the sessions' ends run after the client's last read
        if provider.provider.intake.open_transactions == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{provider.provider.intake.open_transactions} transactions left open")


async def test_every_transaction_the_sessions_open_is_closed(provider_factory, certs):
    """The group commit waits for open transactions: each way a transaction
    ends (its message, RSET, EHLO, a refused message, QUIT, a hang-up in
    DATA) must close it, or every later commit would wait its full bound."""
    provider = await provider_factory(extra=LIMITS)
    intake = provider.provider.intake
    d = await Dialog.connect(*provider.mx)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    await d.cmd("MAIL FROM:<a@sender.test>", 250)
    assert intake.open_transactions == 1
    await d.cmd("RSET", 250)
    assert intake.open_transactions == 0
    await d.cmd("MAIL FROM:<a@sender.test>", 250)
    await d.cmd("EHLO client.test", 250)
    assert intake.open_transactions == 0
    await d.cmd("MAIL FROM:<a@sender.test>", 250)
    await d.cmd("RCPT TO:<nobody@not-hosted.test>", 550)
    await d.cmd("DATA", 554)  # no valid recipient: the transaction stays open...
    assert intake.open_transactions == 1
    await d.cmd("RCPT TO:<bob@example.org>", 250)
    await d.cmd("DATA", 354)
    await d.raw(b"Subject: bad\r\n\r\nbare\nLF\r\n.\r\n")
    await d.expect(550)  # ...until its message, refused here, ends it
    assert intake.open_transactions == 0
    await d.cmd("MAIL FROM:<a@sender.test>", 250)
    await d.starttls(certs.client_context())  # RFC 3207 §4.2: forgets the transaction
    await d.cmd("NOOP", 250)  # the server is past its handshake (NOOP resets nothing)
    assert intake.open_transactions == 0
    await d.cmd("EHLO client.test", 250)
    await d.cmd("MAIL FROM:<a@sender.test>", 250)
    await d.cmd("QUIT", 221)
    await d.close()
    await wait_for_no_open_transaction(provider)

    hangs_up = await open_data(*provider.mx)
    await hangs_up.raw(b"Subject: half\r\n\r\nhalf a mess")
    await hangs_up.close()
    await wait_for_no_open_transaction(provider)

    code, _ = await send_mail(*provider.mx, "a@sender.test", ["bob@example.org"], BODY)
    assert code == 250
    submission = await Dialog.connect(*provider.submission)
    await submission.expect(220)
    await submission.cmd("EHLO mail.example.org", 250)
    await submission.starttls(certs.client_context())
    await submission.cmd("EHLO mail.example.org", 250)
    await submission.auth_plain("acme", PASSWORD)
    await submission.cmd("MAIL FROM:<bob@example.org>", 250)
    assert intake.open_transactions == 1  # submission shares the provider's group commit
    await submission.cmd("RCPT TO:<x@other.test>", 250)
    await submission.cmd("DATA", 354)
    await submission.raw(BODY + b".\r\n")
    await submission.expect(250)
    assert intake.open_transactions == 0
    await submission.cmd("QUIT", 221)
    await submission.close()


async def test_an_idle_open_transaction_delays_a_commit_only_briefly(provider_factory):
    """A client that gave MAIL and then sits does not hold others' 250."""
    provider = await provider_factory(extra=LIMITS)
    idle = await Dialog.connect(*provider.mx)
    await idle.expect(220)
    await idle.cmd("EHLO idle.test", 250)
    await idle.cmd("MAIL FROM:<a@sender.test>", 250)
    loop = asyncio.get_running_loop()
    began = loop.time()
    results = [await send_mail(*provider.mx, "a@sender.test", ["bob@example.org"], BODY)
               for _ in range(5)]
    assert [code for code, _ in results] == [250] * 5
    # Each commit waited at most GATHER (2 ms), not until the idle one went
    # stale (STALE, 1 s).
    assert loop.time() - began < 0.9
    assert provider.provider.intake.open_transactions == 1
    await idle.cmd("QUIT", 221)
    await idle.close()
