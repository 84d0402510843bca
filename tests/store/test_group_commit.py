"""Group commit on every engine: `enqueue_batch` stores all or nothing in one
transaction; `GroupCommit` shares one commit among messages that are ready
together, answers each caller with its own result, keeps one message's
failure from failing the others, commits a lone message at once, and waits
(boundedly) for the messages of transactions still open."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest

from fermoposta.store import group_commit
from fermoposta.store.base import Store, StoreError, WouldBlock
from fermoposta.store.group_commit import GroupCommit

from .contract import all_ids, body_of, msg, rcpt_ids


class BrokenBody(io.BytesIO):
    """A body whose read fails after the first chunk (a spool file gone bad)."""

    def read(self, size: int | None = -1) -> bytes:
        raise OSError("spool read failed")


def test_enqueue_batch_stores_every_message_in_order(store: Store) -> None:
    items = [(msg(f"u{i}@a.example"), io.BytesIO(b"body %d\r\n" % i), None) for i in range(5)]
    ids = store.enqueue_batch(items)
    assert len(set(ids)) == 5
    assert sorted(all_ids(store)) == sorted(ids)
    for i, message_id in enumerate(ids):
        assert body_of(store, message_id) == b"body %d\r\n" % i
        assert list(rcpt_ids(store, message_id)) == [f"u{i}@a.example"]


def test_enqueue_batch_keeps_the_queue_ids_it_was_given(store: Store) -> None:
    ids = store.enqueue_batch([(msg("a@a.example"), io.BytesIO(b"x"), "AAAAAAAAAAA1"),
                               (msg("b@a.example"), io.BytesIO(b"y"), "AAAAAAAAAAA2")])
    assert ids == ["AAAAAAAAAAA1", "AAAAAAAAAAA2"]


def test_enqueue_batch_draws_a_fresh_id_on_a_collision(store: Store) -> None:
    taken = store.enqueue(msg("x@a.example"), io.BytesIO(b"x"), "AAAAAAAAAAA1")
    big = b"y" * (3 * 256 * 1024 + 5)  # several chunks: the other path of the engines
    ids = store.enqueue_batch([(msg("a@a.example"), io.BytesIO(b"a"), taken),
                               (msg("b@a.example"), io.BytesIO(b"b"), "AAAAAAAAAAA2"),
                               (msg("c@a.example"), io.BytesIO(b"c"), "AAAAAAAAAAA2"),
                               (msg("d@a.example"), io.BytesIO(big), taken)])
    assert ids[1] == "AAAAAAAAAAA2"
    assert len(set(ids)) == 4 and taken not in ids
    assert [body_of(store, i) for i in ids] == [b"a", b"b", b"c", big]
    assert body_of(store, taken) == b"x"  # the message that had the id is untouched


def test_enqueue_batch_is_all_or_nothing(store: Store) -> None:
    items = [(msg("a@a.example"), io.BytesIO(b"good"), None),
             (msg("b@a.example"), BrokenBody(), None),
             (msg("c@a.example"), io.BytesIO(b"good"), None)]
    with pytest.raises((OSError, StoreError)):
        store.enqueue_batch(items)
    assert all_ids(store) == []


class CountingStore:
    """The store, with a count of its commits and a gate that holds the first
    one open until the test lets it go (so that the others pile up)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batches: list[int] = []
        self.singles = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def enqueue_batch(self, items):  # type: ignore[no-untyped-def]
        self.batches.append(len(items))
        return self.store.enqueue_batch(items)

    def enqueue_now(self, message, body, queue_id=None):  # type: ignore[no-untyped-def]
        raise WouldBlock()  # these tests are about the worker thread's commits

    def enqueue_batch_now(self, items):  # type: ignore[no-untyped-def]
        raise WouldBlock()

    async def enqueue_async(self, message, body, queue_id=None):  # type: ignore[no-untyped-def]
        raise WouldBlock()

    async def enqueue_batch_async(self, items):  # type: ignore[no-untyped-def]
        raise WouldBlock()

    def enqueue(self, message, body, queue_id=None):  # type: ignore[no-untyped-def]
        self.singles += 1
        self.entered.set()
        self.gate.wait(10)
        return self.store.enqueue(message, body, queue_id)


def test_messages_ready_together_share_one_commit(store: Store) -> None:
    counting = CountingStore(store)
    counting.gate.clear()  # the first commit stalls, as a slow fsync would
    group = GroupCommit(counting)  # type: ignore[arg-type]

    async def main() -> list[str]:
        first = asyncio.ensure_future(group.enqueue(msg("first@a.example"), io.BytesIO(b"1")))
        await asyncio.to_thread(counting.entered.wait, 10)
        others = [asyncio.ensure_future(group.enqueue(msg(f"u{i}@a.example"),
                                                      io.BytesIO(b"%d" % i)))
                  for i in range(20)]
        await asyncio.sleep(0.05)
        counting.gate.set()
        return [await first, *[await o for o in others]]

    ids = asyncio.run(main())
    assert counting.singles == 1  # the lone first message went alone, at once
    assert counting.batches == [20]  # the 20 that waited: one commit
    assert group.commits == 2 and group.committed == 21
    assert sorted(all_ids(store)) == sorted(ids)
    assert body_of(store, ids[5]) == b"4"  # each caller got its own message's id


def test_one_bad_message_does_not_fail_the_others(store: Store) -> None:
    counting = CountingStore(store)
    counting.gate.clear()
    group = GroupCommit(counting)  # type: ignore[arg-type]

    async def main() -> list[str | BaseException]:
        first = asyncio.ensure_future(group.enqueue(msg("first@a.example"), io.BytesIO(b"1")))
        await asyncio.to_thread(counting.entered.wait, 10)
        bodies: list[io.BytesIO] = [io.BytesIO(b"good 0"), BrokenBody(), io.BytesIO(b"good 2")]
        others = [asyncio.ensure_future(group.enqueue(msg(f"u{i}@a.example"), body))
                  for i, body in enumerate(bodies)]
        await asyncio.sleep(0.05)
        counting.gate.set()
        return await asyncio.gather(first, *others, return_exceptions=True)

    first, good0, bad, good2 = asyncio.run(main())
    assert isinstance(bad, OSError | StoreError)
    assert isinstance(good0, str) and isinstance(good2, str)
    assert counting.batches == [3]  # tried together, failed, then one by one
    assert sorted(all_ids(store)) == sorted([first, good0, good2])  # type: ignore[list-item]
    assert body_of(store, good0) == b"good 0" and body_of(store, good2) == b"good 2"


def test_a_lone_message_is_committed_without_waiting(store: Store) -> None:
    group = GroupCommit(store)

    async def main() -> list[str]:
        return [await group.enqueue(msg(f"u{i}@a.example"), io.BytesIO(b"x")) for i in range(3)]

    ids = asyncio.run(main())
    assert group.commits == 3 and group.committed == 3
    assert sorted(all_ids(store)) == sorted(ids)


def test_a_cancelled_caller_leaves_the_others_batch_alone(store: Store) -> None:
    counting = CountingStore(store)
    counting.gate.clear()
    group = GroupCommit(counting)  # type: ignore[arg-type]

    async def main() -> tuple[str, list[str]]:
        first = asyncio.ensure_future(group.enqueue(msg("first@a.example"), io.BytesIO(b"1")))
        await asyncio.to_thread(counting.entered.wait, 10)
        others = [asyncio.ensure_future(group.enqueue(msg(f"u{i}@a.example"), io.BytesIO(b"x")))
                  for i in range(3)]
        await asyncio.sleep(0.01)
        others[0].cancel()  # its client went away
        counting.gate.set()
        return await first, [await o for o in others[1:]]

    first, rest = asyncio.run(main())
    stored = set(all_ids(store))
    assert first in stored and set(rest) <= stored
    # The cancelled one may be stored (a duplicate when its client retries), never half.
    assert len(stored) in (3, 4)


def test_a_batch_waits_for_the_messages_of_open_transactions(store: Store) -> None:
    counting = CountingStore(store)
    group = GroupCommit(counting, gather=30.0)  # type: ignore[arg-type]

    async def main() -> list[str]:
        for i in range(3):
            group.transaction_opened(f"session {i}")  # three sessions gave MAIL

        async def final_dot(i: int) -> str:
            group.transaction_closed(f"session {i}")  # as a session does: close, then enqueue
            return await group.enqueue(msg(f"u{i}@a.example"), io.BytesIO(b"%d" % i))

        waiting = []
        for i in range(3):
            waiting.append(asyncio.ensure_future(final_dot(i)))
            await asyncio.sleep(0.02)
        return [await w for w in waiting]

    started = time.monotonic()
    ids = asyncio.run(asyncio.wait_for(main(), 10))
    assert counting.batches == [3] and counting.singles == 0  # one commit for the three
    assert group.commits == 1 and group.open_transactions == 0
    assert sorted(all_ids(store)) == sorted(ids)
    # The last close ended the wait, not the 30 s bound.
    assert time.monotonic() - started < 5


def test_the_wait_ends_after_gather_seconds_when_a_transaction_stays_open(
        store: Store) -> None:
    counting = CountingStore(store)
    group = GroupCommit(counting, gather=0.2)  # type: ignore[arg-type]

    async def main() -> tuple[str, float]:
        group.transaction_opened("sender")
        group.transaction_opened("idle")  # this one never sends its data
        group.transaction_closed("sender")
        loop = asyncio.get_running_loop()
        began = loop.time()
        queue_id = await group.enqueue(msg("a@a.example"), io.BytesIO(b"a"))
        return queue_id, loop.time() - began

    queue_id, waited = asyncio.run(asyncio.wait_for(main(), 10))
    assert 0.15 <= waited < 5  # about `gather`, then committed without the idle one
    assert all_ids(store) == [queue_id] and counting.singles == 1
    assert group.open_transactions == 1


def test_a_transaction_closed_without_a_message_ends_the_wait(store: Store) -> None:
    group = GroupCommit(store, gather=30.0)

    async def main() -> str:
        group.transaction_opened("sender")
        group.transaction_opened("other")
        group.transaction_closed("sender")
        waiting = asyncio.ensure_future(group.enqueue(msg("a@a.example"), io.BytesIO(b"a")))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # it waits for the other open transaction...
        group.transaction_closed("other")  # ...which ends with RSET (or a refusal, a hang-up)
        return await asyncio.wait_for(waiting, 5)

    queue_id = asyncio.run(main())
    assert all_ids(store) == [queue_id] and group.open_transactions == 0


def test_a_full_batch_goes_without_waiting(store: Store) -> None:
    counting = CountingStore(store)
    group = GroupCommit(counting, gather=30.0, max_batch=3)  # type: ignore[arg-type]

    async def main() -> list[str]:
        for i in range(5):
            group.transaction_opened(i)  # two of them stay open

        async def final_dot(i: int) -> str:
            group.transaction_closed(i)
            return await group.enqueue(msg(f"u{i}@a.example"), io.BytesIO(b"x"))

        waiting = []
        for i in range(3):  # the committer is gathering when the third comes
            waiting.append(asyncio.ensure_future(final_dot(i)))
            await asyncio.sleep(0.02)
        return list(await asyncio.wait_for(asyncio.gather(*waiting), 5))

    ids = asyncio.run(main())
    assert counting.batches == [3] and sorted(all_ids(store)) == sorted(ids)


def test_closing_a_transaction_twice_or_unknown_is_harmless(store: Store) -> None:
    group = GroupCommit(store)
    group.transaction_closed("never opened")
    group.transaction_opened("once")
    group.transaction_closed("once")
    group.transaction_closed("once")
    assert group.open_transactions == 0

    async def main() -> str:
        return await asyncio.wait_for(group.enqueue(msg("a@a.example"), io.BytesIO(b"a")), 5)

    queue_id = asyncio.run(main())
    assert all_ids(store) == [queue_id] and group.commits == 1


def test_a_transaction_open_too_long_is_not_waited_for(store: Store, monkeypatch) -> None:
    monkeypatch.setattr(group_commit, "STALE", 0.05)
    group = GroupCommit(store, gather=30.0)

    async def main() -> str:
        group.transaction_opened("sits after MAIL")
        await asyncio.sleep(0.1)  # older than STALE now
        return await asyncio.wait_for(group.enqueue(msg("a@a.example"), io.BytesIO(b"a")), 5)

    queue_id = asyncio.run(main())
    assert all_ids(store) == [queue_id] and group.open_transactions == 1
