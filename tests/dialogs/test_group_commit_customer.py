"""The customer's group commit (customer/serve.py, Maildir): messages the
provider keeps in flight are written while the next ones arrive and
committed together (each file fsync()ed, renamed, one fsync of new/ for the
group); their replies go only after that commit, in order; a message that
fails alone gets its own 4xx; nothing of a message left unanswered when the
session ends stays in the Maildir.  Over the in-memory wire, so the test
decides which commands share a read."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from fermoposta.customer import serve
from fermoposta.customer.delivery import maildir as maildir_module
from fermoposta.customer.delivery.maildir import MaildirDelivery
from fermoposta.customer.serve import ReversedSession
from fermoposta.net import connection
from fermoposta.net.server_session import SessionLimits
from fermoposta.smtp.data import dot_stuff
from support.wire import MemoryPeer

LIMITS = SessionLimits(command_timeout=5.0, data_timeout=5.0, max_errors=20,
                       max_message_size=1_000_000, max_recipients=5, max_line_length=1000)


@pytest.fixture(autouse=True)
def unhurried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both time bounds far away, so these tests see how messages group
    whatever the machine's load: a group also closes at GROUP_WAIT (its own
    test below), and a MAIL or RCPT reply held for the next command also
    leaves after HOLD_DELAY (tests/dialogs/test_reply_batching.py), which a
    busy CI machine can reach (5 ms) before the first commit."""
    monkeypatch.setattr(serve, "GROUP_WAIT", 60.0)
    monkeypatch.setattr(connection, "HOLD_DELAY", 60.0)


def transaction(n: int, rcpt: str = "bob") -> bytes:
    body = b"Subject: %d\r\n\r\nmessage %d\r\n" % (n, n)
    return (b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<%s@example.org>\r\n" % rcpt.encode()
            + b"BDAT %d LAST\r\n" % len(body) + body)


def replies_written(peer: MemoryPeer) -> int:
    """Reply lines the session has written so far (what the test has read
    of them, and so removed from `peer.received`, counts too)."""
    return sum(write.count(b"\r\n") for write in peer.transport.writes)


class Spy(MaildirDelivery):
    """A real MaildirDelivery that records each group it commits and what
    the provider had been told by then."""

    def __init__(self, root: Path, peer: MemoryPeer | None = None) -> None:
        super().__init__(str(root / "{domain}" / "{local}"), create=True, aliases={},
                         catch_all=None, hostname="mail.example.org")
        self.root = root
        self.peer = peer
        self.groups: list[int] = []
        self.replies_before_commit: list[int] = []

    async def commit_staged(self, group):  # type: ignore[no-untyped-def]
        self.groups.append(len(group))
        if self.peer is not None:
            self.replies_before_commit.append(replies_written(self.peer))
        return await super().commit_staged(group)

    def files(self, sub: str, local: str = "bob") -> list[Path]:
        directory = self.root / "example.org" / local / sub
        return sorted(directory.iterdir()) if directory.is_dir() else []


async def open_session(tmp_path: Path, cls: type[Spy] = Spy, *, limits: SessionLimits = LIMITS
                       ) -> tuple[MemoryPeer, asyncio.Task[None], Spy]:
    """A reversed session over the in-memory wire, delivering into a `cls`
    Maildir under `tmp_path`, past its greeting and EHLO."""
    peer = MemoryPeer()
    spy = cls(tmp_path, peer)
    session = ReversedSession(peer.connection, hostname="mail.example.org", limits=limits,
                              accept_domains=frozenset({"example.org"}), delivery=spy,
                              session_id="GROUPTEST")
    task = asyncio.create_task(session.run())
    await peer.expect(220)
    await peer.cmd("EHLO provider.test", 250)
    return peer, task, spy


async def test_messages_in_flight_are_committed_together_then_answered(tmp_path) -> None:
    peer, task, spy = await open_session(tmp_path)
    before = replies_written(peer)
    peer.send(b"".join(transaction(n) for n in range(5)))  # one read: all in flight
    got = await peer.replies(15)
    assert [code for code, _ in got] == [250, 250, 250] * 5
    assert [text for _, text in got][2::3] == ["2.0.0 Delivered to 1 mailbox"] * 5
    assert spy.groups == [5]  # one commit for the five
    assert spy.replies_before_commit == [before]  # not one reply before it
    await peer.quit(task)
    assert len(spy.files("new")) == 5 and spy.files("tmp") == []
    texts = sorted(f.read_bytes().split(b"\nSubject: ", 1)[1] for f in spy.files("new"))
    assert texts == [b"%d\n\nmessage %d\n" % (n, n) for n in range(5)]


async def test_one_fsync_of_new_for_the_group(tmp_path, monkeypatch) -> None:
    synced: list[Path] = []
    real = maildir_module._fsync_dir
    monkeypatch.setattr(maildir_module, "_fsync_dir",
                        lambda path: (synced.append(path), real(path))[1])
    peer, task, _spy = await open_session(tmp_path)
    peer.send(b"".join(transaction(n) for n in range(4)))
    assert [code for code, _ in await peer.replies(12)] == [250] * 12
    await peer.quit(task)
    new = tmp_path / "example.org" / "bob" / "new"
    assert synced.count(new) == 1


async def test_one_message_failing_alone_gets_its_own_4xx(tmp_path, monkeypatch) -> None:
    real_rename = os.rename

    def rename(src, dst):  # type: ignore[no-untyped-def]
        if "carol" in str(dst):
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(maildir_module.os, "rename", rename)
    peer, task, spy = await open_session(tmp_path)
    peer.send(transaction(0) + transaction(1, "carol") + transaction(2))
    got = await peer.replies(9)
    assert [code for code, _ in got] == [250, 250, 250, 250, 250, 451, 250, 250, 250]
    await peer.quit(task)
    assert spy.groups == [3]
    assert len(spy.files("new")) == 2
    assert spy.files("new", "carol") == [] and spy.files("tmp", "carol") == []


async def test_a_failed_fsync_of_new_fails_the_whole_group(tmp_path, monkeypatch) -> None:
    def broken(path: Path) -> None:
        raise OSError(5, "Input/output error")

    peer, task, spy = await open_session(tmp_path)
    monkeypatch.setattr(maildir_module, "_fsync_dir", broken)  # after create=True made dirs
    peer.send(transaction(0) + transaction(1))
    got = await peer.replies(6)
    assert [code for code, _ in got] == [250, 250, 451, 250, 250, 451]
    await peer.quit(task)
    assert spy.files("new") == [] and spy.files("tmp") == []


async def test_data_never_overtakes_the_replies_kept_for_a_commit(tmp_path) -> None:
    peer, task, spy = await open_session(tmp_path)
    message = b"Subject: d\r\n\r\nby DATA\r\n"
    peer.send(transaction(0) + b"MAIL FROM:<alice@sender.test>\r\n"
              b"RCPT TO:<bob@example.org>\r\nDATA\r\n")
    got = await peer.replies(6)
    # The staged message's 250s, then MAIL's, RCPT's and only then the 354.
    assert [code for code, _ in got] == [250, 250, 250, 250, 250, 354]
    assert got[2][1] == "2.0.0 Delivered to 1 mailbox"
    peer.send(b"".join(dot_stuff([message])))
    assert (await peer.replies(1))[0][0] == 250
    await peer.quit(task)
    assert len(spy.files("new")) == 2


async def test_an_unanswered_message_leaves_nothing_when_the_session_ends(tmp_path) -> None:
    """The session is cancelled (the customer shuts down) while a message is
    being written and before its reply: the provider keeps it, so nothing of
    it may stay here, committed or not."""
    written = asyncio.Event()

    class Slow(Spy):
        async def stage(self, envelope, body):  # type: ignore[no-untyped-def]
            staged = await super().stage(envelope, body)
            written.set()
            await asyncio.sleep(0.3)
            return staged

    peer, task, spy = await open_session(tmp_path, Slow)
    peer.send(transaction(0))
    await asyncio.wait_for(written.wait(), 5)
    assert len(spy.files("tmp")) == 1  # written, not committed
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert spy.groups == []
    assert spy.files("new") == [] and spy.files("tmp") == []
    assert b"Delivered" not in bytes(peer.received)


async def test_a_reply_is_not_kept_while_the_chunk_is_still_on_its_way(tmp_path) -> None:
    """With a staged message waiting, a BDAT whose octets are not all here
    yet sends the replies first: the provider may be waiting for them."""
    peer, task, spy = await open_session(tmp_path)
    second = transaction(1)
    cut = second.index(b"LAST\r\n") + 6
    peer.send(transaction(0) + second[:cut])  # the BDAT line, none of its octets
    got = await peer.replies(5)  # the first message's three and MAIL, RCPT
    assert [code for code, _ in got] == [250] * 5
    assert spy.groups == [1]
    peer.send(second[cut:])
    assert (await peer.replies(1))[0][0] == 250
    await peer.quit(task)
    assert len(spy.files("new")) == 2


@pytest.mark.parametrize(("bound", "value", "messages", "groups"), [
    ("GROUP_MAX", 3, 7, [3, 3, 1]),  # a group is at most GROUP_MAX messages
    ("GROUP_WAIT", 0.0, 3, [1, 1, 1]),  # ... and closes at GROUP_WAIT (all too old here)
])
async def test_a_group_closes_at_its_bounds(tmp_path, monkeypatch, bound: str, value: float,
                                            messages: int, groups: list[int]) -> None:
    monkeypatch.setattr(serve, bound, value)
    peer, task, spy = await open_session(tmp_path)
    peer.send(b"".join(transaction(n) for n in range(messages)))
    assert [code for code, _ in await peer.replies(3 * messages)] == [250] * 3 * messages
    await peer.quit(task)
    assert spy.groups == groups
    assert len(spy.files("new")) == messages


async def test_a_big_body_is_written_before_its_reply_and_still_grouped(tmp_path,
                                                                        monkeypatch) -> None:
    monkeypatch.setattr(serve, "BACKGROUND_STAGE_MAX", 10)  # every body is "big"
    peer, task, spy = await open_session(tmp_path)
    peer.send(b"".join(transaction(n) for n in range(3)))
    assert [code for code, _ in await peer.replies(9)] == [250] * 9
    await peer.quit(task)
    assert spy.groups == [3] and len(spy.files("new")) == 3


def foreign(n: int) -> bytes:
    """A transaction whose only recipient is refused (not a domain of ours)."""
    body = b"Subject: %d\r\n\r\nnot ours\r\n" % n
    return (b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
            + b"BDAT %d LAST\r\n" % len(body) + body)


async def test_many_messages_refused_at_rcpt_never_end_the_session(tmp_path) -> None:
    """Their BDAT gets 554 (as DATA would), no protocol error: the message
    behind 25 refused ones is still delivered in the same session."""
    peer, task, spy = await open_session(tmp_path)
    peer.send(b"".join(foreign(n) for n in range(25)) + transaction(99))
    got = await peer.replies(78)
    assert [code for code, _ in got] == [250, 550, 554] * 25 + [250, 250, 250]
    await peer.quit(task)
    assert len(spy.files("new")) == 1


async def test_too_many_errors_421_comes_in_order_and_nothing_after_it(tmp_path) -> None:
    limits = SessionLimits(command_timeout=5.0, data_timeout=5.0, max_errors=3,
                           max_message_size=1_000_000, max_recipients=5)
    peer, task, spy = await open_session(tmp_path, limits=limits)
    peer.send(transaction(0) + b"FOO\r\nFOO\r\nFOO\r\n" + transaction(1))
    got = await peer.replies(7)
    assert [code for code, _ in got] == [250, 250, 250, 500, 500, 500, 421]
    assert got[2][1] == "2.0.0 Delivered to 1 mailbox"  # committed before the 421
    await asyncio.wait_for(task, 5)
    assert peer.server_closed
    assert len(spy.files("new")) == 1  # the second was never read
    assert spy.files("tmp") == []


async def test_deliveries_between_errors_reset_the_count_as_they_happen(tmp_path) -> None:
    limits = SessionLimits(command_timeout=5.0, data_timeout=5.0, max_errors=3,
                           max_message_size=1_000_000, max_recipients=5)
    peer, task, spy = await open_session(tmp_path, limits=limits)
    peer.send(b"".join(b"FOO\r\nFOO\r\n" + transaction(n) for n in range(4)))
    got = await peer.replies(20)
    assert [code for code, _ in got] == [500, 500, 250, 250, 250] * 4
    await peer.quit(task)
    assert len(spy.files("new")) == 4


async def test_nothing_is_committed_once_no_reply_can_reach_the_provider(tmp_path,
                                                                        monkeypatch) -> None:
    """The provider's TLS close arrived after its messages: a 250 can no
    longer reach it, so they are not committed (it keeps them)."""
    from fermoposta.net.connection import Connection

    gone = False
    monkeypatch.setattr(Connection, "can_reply",
                        property(lambda self: not gone and not self._transport.is_closing()))

    class Closing(Spy):
        async def stage(self, envelope, body):  # type: ignore[no-untyped-def]
            nonlocal gone
            staged = await super().stage(envelope, body)
            gone = True
            return staged

    peer, task, spy = await open_session(tmp_path, Closing)
    peer.send(transaction(0))
    await asyncio.wait_for(task, 5)
    assert spy.groups == []
    assert spy.files("new") == [] and spy.files("tmp") == []
    assert b"Delivered" not in bytes(peer.received)
