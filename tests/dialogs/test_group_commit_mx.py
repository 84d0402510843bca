"""Group commit seen from the MX: many senders at once each get their own
queue id once their message is stored; a commit that fails (a full disk)
answers every sender of the batch 451 and stores nothing; when the disk is
back the same senders get 250."""

from __future__ import annotations

import asyncio

from fermoposta.store.base import StoreError
from support.dialog import send_mail

BODY = b"Subject: group\r\n\r\nhello\r\n"


async def burst(provider, n: int) -> list[tuple[int, list[str]]]:
    return list(await asyncio.gather(*(
        send_mail(*provider.mx, "alice@sender.test", [f"u{i}@example.org"], BODY)
        for i in range(n))))


LIMITS = "[limits]\nmax_connections_per_ip = 50\n"  # every sender is 127.0.0.1


async def test_concurrent_senders_share_commits_and_get_their_own_ids(provider_factory):
    provider = await provider_factory(extra=LIMITS)
    batches: list[int] = []
    real = provider.store.enqueue_batch

    def counting(items):
        batches.append(len(items))
        return real(items)

    provider.store.enqueue_batch = counting
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


async def test_a_failed_commit_answers_451_and_stores_nothing(provider_factory):
    provider = await provider_factory(extra=LIMITS)
    def full(*args, **kwargs):
        raise StoreError("database or disk is full")

    real_batch, real_one = provider.store.enqueue_batch, provider.store.enqueue
    provider.store.enqueue_batch = full
    provider.store.enqueue = full
    results = await burst(provider, 12)
    assert [code for code, _ in results] == [451] * 12
    assert provider.store.held_message_ids(["example.org"]) == []
    provider.store.enqueue_batch, provider.store.enqueue = real_batch, real_one
    again = await burst(provider, 12)
    assert [code for code, _ in again] == [250] * 12
    assert len(provider.store.held_message_ids(["example.org"])) == 12
