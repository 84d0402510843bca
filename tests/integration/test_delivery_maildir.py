"""Maildir delivery: resolution, path safety, two-phase commit and failure paths."""

from __future__ import annotations

import errno
import io
import mailbox
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fermoposta.customer.delivery import maildir as maildir_module
from fermoposta.customer.delivery.base import DeliveryOutcome, LocalEnvelope, LocalRecipient
from fermoposta.customer.delivery.factory import make_delivery
from fermoposta.customer.delivery.maildir import MaildirDelivery

HOSTNAME = "mail.example.org"
BODY = (b"Received: from mx.provider.test by mail.example.org; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
        b"From: alice@sender.test\r\nSubject: hello\r\n\r\nHello.\r\n.dot line\r\n")


def rcpt(address: str) -> LocalRecipient:
    local, domain = address.rsplit("@", 1)
    return LocalRecipient(address, local, domain)


def envelope(*addresses: str) -> LocalEnvelope:
    return LocalEnvelope("alice@sender.test", tuple(rcpt(a) for a in addresses),
                         queue_hint="TESTQ")


def make(root: Path, *, create: bool = False, aliases: dict[str, str] | None = None,
         catch_all: str | None = None, **kwargs: Any) -> MaildirDelivery:
    return MaildirDelivery(str(root / "{domain}" / "{local}" / "Maildir"), create=create,
                           aliases=aliases or {}, catch_all=catch_all, hostname=HOSTNAME,
                           **kwargs)


def maildir(root: Path, address: str, *, make_it: bool = True) -> Path:
    local, domain = address.split("@")
    path = root / domain / local / "Maildir"
    if make_it:
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def files(path: Path, sub: str = "new") -> list[Path]:
    directory = path / sub
    return sorted(directory.iterdir()) if directory.is_dir() else []


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def deliver(delivery: MaildirDelivery, *addresses: str, body: bytes = BODY
                  ) -> DeliveryOutcome:
    return await delivery.deliver(envelope(*addresses), io.BytesIO(body), len(body))


def expected(address: str, body: bytes = BODY) -> bytes:
    return f"Delivered-To: {address}\n".encode() + body.replace(b"\r\n", b"\n")


# --- resolution ------------------------------------------------------------------------------

async def test_existing_maildir_gets_the_message(tmp_path: Path) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    delivery = make(tmp_path)
    assert delivery.max_recipients is None
    assert await delivery.check_recipient(rcpt("bob@example.org")) is None
    outcome = await deliver(delivery, "bob@example.org")
    assert (outcome.reply.code, outcome.reply.enhanced) == (250, "2.0.0")
    [path] = files(bob)
    assert outcome.where == f"maildir:{path}"
    assert path.read_bytes() == expected("bob@example.org")
    assert files(bob, "tmp") == []
    assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+R[0-9a-f]{16}\.mail\.example\.org", path.name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Readable by the stdlib as a Maildir message.
    [message] = list(mailbox.Maildir(bob, create=False))
    assert message["Subject"] == "hello"
    assert message["Delivered-To"] == "bob@example.org"


async def test_unknown_user_is_550_511_without_create(tmp_path: Path) -> None:
    maildir(tmp_path, "bob@example.org")
    delivery = make(tmp_path)
    reply = await delivery.check_recipient(rcpt("nobody@example.org"))
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.1.1")
    assert "user unknown" in reply.text
    # Accepted at RCPT time but gone by delivery: defer, never bounce or lose.
    outcome = await deliver(delivery, "nobody@example.org")
    assert outcome.reply.code == 451
    assert all_files(tmp_path) == []


async def test_create_makes_the_maildir(tmp_path: Path) -> None:
    delivery = make(tmp_path / "mail", create=True)
    assert await delivery.check_recipient(rcpt("New.User@Example.ORG")) is None
    outcome = await deliver(delivery, "New.User@Example.ORG")
    assert outcome.reply.code == 250
    box = tmp_path / "mail" / "example.org" / "new.user" / "Maildir"
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((box / sub).stat().st_mode) == 0o700
    [path] = files(box)
    assert path.read_bytes() == expected("New.User@Example.ORG")


async def test_local_part_is_lowercased_and_unquoted(tmp_path: Path) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    delivery = make(tmp_path)
    for address in ("BOB@example.org", '"bob"@example.org', '"Bo\\b"@Example.Org'):
        assert await delivery.check_recipient(rcpt(address)) is None, address
        assert (await deliver(delivery, address)).reply.code == 250
    assert len(files(bob)) == 3


async def test_aliases(tmp_path: Path) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    delivery = make(tmp_path, aliases={"Postmaster@Example.org": "bob@example.org",
                                       "ghost@example.org": "nobody@example.org"})
    assert await delivery.check_recipient(rcpt("postmaster@example.org")) is None
    assert await delivery.check_recipient(rcpt("POSTMASTER@example.org")) is None
    reply = await delivery.check_recipient(rcpt("ghost@example.org"))  # target has no Maildir
    assert reply is not None and reply.code == 550
    outcome = await deliver(delivery, "postmaster@example.org")
    assert outcome.reply.code == 250
    [path] = files(bob)
    assert path.read_bytes() == expected("postmaster@example.org")


async def test_catch_all(tmp_path: Path) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    catch = maildir(tmp_path, "catchall@example.org")
    delivery = make(tmp_path, catch_all="catchall@example.org")
    assert await delivery.check_recipient(rcpt("whoever@example.org")) is None
    assert (await deliver(delivery, "whoever@example.org")).reply.code == 250
    assert (await deliver(delivery, "bob@example.org")).reply.code == 250
    assert [p.read_bytes() for p in files(catch)] == [expected("whoever@example.org")]
    assert [p.read_bytes() for p in files(bob)] == [expected("bob@example.org")]


async def test_catch_all_without_a_maildir_is_user_unknown(tmp_path: Path) -> None:
    delivery = make(tmp_path, catch_all="catchall@example.org")
    reply = await delivery.check_recipient(rcpt("whoever@example.org"))
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.1.1")


@pytest.mark.parametrize("local", ["../etc", "..", ".", ".hidden", "a/b", "/abs", "a..b",
                                   "nul\x00", "new\nline", "", '"../x"'])
async def test_path_escapes_are_refused(tmp_path: Path, local: str) -> None:
    delivery = make(tmp_path / "mail", create=True)
    recipient = LocalRecipient(f"{local}@example.org", local, "example.org")
    reply = await delivery.check_recipient(recipient)
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.1.3")
    outcome = await delivery.deliver(LocalEnvelope("", (recipient,)), io.BytesIO(BODY),
                                     len(BODY))
    assert outcome.reply.code == 451
    assert all_files(tmp_path) == []


async def test_with_create_a_rcpt_check_needs_no_thread(tmp_path: Path, monkeypatch) -> None:
    """With create = true the check touches no file: it runs on the event
    loop (a thread hop per message cost the pull time), refusing what it
    refused before."""
    def no_thread(*args: object, **kwargs: object) -> None:
        raise AssertionError("a thread hop for a RCPT check with create = true")

    delivery = make(tmp_path / "mail", create=True)
    monkeypatch.setattr(maildir_module.asyncio, "to_thread", no_thread)
    assert await delivery.check_recipient(rcpt("bob@example.org")) is None
    reply = await delivery.check_recipient(LocalRecipient("../x@example.org", "../x",
                                                          "example.org"))
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.1.3")
    # Without create the Maildir's existence is looked up, in a thread.
    checking = make(tmp_path / "mail")
    with pytest.raises(AssertionError, match="thread hop"):
        await checking.check_recipient(rcpt("bob@example.org"))


@pytest.mark.parametrize("domain", ["..", "a/b", ".example.org", ""])
async def test_bad_domains_are_refused(tmp_path: Path, domain: str) -> None:
    delivery = make(tmp_path / "mail", create=True)
    reply = await delivery.check_recipient(LocalRecipient(f"bob@{domain}", "bob", domain))
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.1.3")


@pytest.mark.parametrize("template", ["/m/{user}/Maildir", "/m/{local.__class__}", "/m/{}",
                                      "/m/{domain}/Maildir", "/m/{0}"])
def test_bad_templates_are_refused(template: str) -> None:
    with pytest.raises(ValueError, match="template"):
        MaildirDelivery(template, create=False, aliases={}, catch_all=None, hostname=HOSTNAME)


@pytest.mark.parametrize(("aliases", "catch_all"), [({"a@example.org": "../x@example.org"}, None),
                                                    ({"a@example.org": "bob"}, None),
                                                    ({}, ".hidden@example.org")])
def test_unsafe_alias_targets_are_refused(aliases: dict[str, str], catch_all: str | None
                                          ) -> None:
    with pytest.raises(ValueError):
        MaildirDelivery("/m/{address}", create=False, aliases=aliases, catch_all=catch_all,
                        hostname=HOSTNAME)


def test_address_template(tmp_path: Path) -> None:
    delivery = MaildirDelivery(str(tmp_path / "{address}"), create=True, aliases={},
                               catch_all=None, hostname=HOSTNAME)
    assert delivery.maildir_for("bob", "example.org") == tmp_path / "bob@example.org"


# --- unwritable, full, and the two phases ----------------------------------------------------

async def test_parent_is_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "example.org").write_text("not a directory")
    for create in (True, False):
        delivery = make(tmp_path, create=create)
        reply = await delivery.check_recipient(rcpt("bob@example.org"))
        if not create:
            assert reply is not None and (reply.code, reply.enhanced) == (451, "4.3.0")
        outcome = await deliver(delivery, "bob@example.org")
        assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.3.0")
    assert all_files(tmp_path) == [tmp_path / "example.org"]


async def test_maildir_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "example.org" / "bob").mkdir(parents=True)
    (tmp_path / "example.org" / "bob" / "Maildir").write_text("oops")
    reply = await make(tmp_path).check_recipient(rcpt("bob@example.org"))
    assert reply is not None and reply.code == 451


async def test_new_is_not_a_directory_rolls_back(tmp_path: Path) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    (bob / "new").rmdir()
    (bob / "new").write_text("in the way")
    outcome = await deliver(make(tmp_path), "bob@example.org")
    assert outcome.reply.code == 451
    assert files(bob, "tmp") == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
async def test_disk_full_is_452_431(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    code: int) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    real_open = os.open

    def full_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if "/tmp/" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", full_open)
    outcome = await deliver(make(tmp_path), "bob@example.org")
    assert (outcome.reply.code, outcome.reply.enhanced) == (452, "4.3.1")
    assert files(bob) == [] and files(bob, "tmp") == []


def _fail_on_nth_file_fsync(monkeypatch: pytest.MonkeyPatch, n: int, exc: OSError
                            ) -> list[str]:
    """Make the n-th fsync of a regular file raise `exc`; returns the event log."""
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    count = 0

    def fsync(fd: int) -> None:
        nonlocal count
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        if not is_dir:
            count += 1
            if count == n:
                raise exc
        events.append("fsync-dir" if is_dir else "fsync-file")
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        events.append(f"rename {Path(src).parent.name}->{Path(dst).parent.name}")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return events


async def test_fsync_before_rename_then_directory_fsync(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    maildir(tmp_path, "bob@example.org")
    maildir(tmp_path, "carol@example.org")
    events = _fail_on_nth_file_fsync(monkeypatch, 0, OSError())
    outcome = await deliver(make(tmp_path), "bob@example.org", "carol@example.org")
    assert outcome.reply.code == 250
    # Both files written and synced, then both renamed, then both new/ directories synced.
    assert events == ["fsync-file", "fsync-file", "rename tmp->new", "rename tmp->new",
                      "fsync-dir", "fsync-dir"]


async def test_create_syncs_the_new_directories(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    events = _fail_on_nth_file_fsync(monkeypatch, 0, OSError())
    assert (await deliver(make(tmp_path, create=True), "bob@example.org")).reply.code == 250
    first_file = events.index("fsync-file")
    assert events[:first_file].count("fsync-dir") >= 4  # domain, user, Maildir, tmp/new/cur
    assert events[-1] == "fsync-dir"


async def test_multi_recipient_all_or_nothing(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    carol = maildir(tmp_path, "carol@example.org")
    _fail_on_nth_file_fsync(monkeypatch, 2, OSError(errno.EIO, "I/O error"))
    outcome = await deliver(make(tmp_path), "bob@example.org", "carol@example.org")
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.3.0")
    for box in (bob, carol):
        assert files(box) == [] and files(box, "tmp") == []


async def test_rename_failure_rolls_back_the_renamed(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    carol = maildir(tmp_path, "carol@example.org")
    real_rename = os.rename
    calls = 0

    def rename(src: Any, dst: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.EIO, "I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    outcome = await deliver(make(tmp_path), "bob@example.org", "carol@example.org")
    assert outcome.reply.code == 451
    for box in (bob, carol):
        assert files(box) == [] and files(box, "tmp") == []


async def test_multi_recipient_success(tmp_path: Path) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    carol = maildir(tmp_path, "carol@example.org")
    outcome = await deliver(make(tmp_path), "bob@example.org", "carol@example.org")
    assert outcome.reply.code == 250 and "2 mailboxes" in outcome.reply.text
    [b], [c] = files(bob), files(carol)
    assert outcome.where == f"maildir:{b}, maildir:{c}"
    assert b.read_bytes() == expected("bob@example.org")
    assert c.read_bytes() == expected("carol@example.org")


async def test_recipients_sharing_a_maildir_get_one_copy(tmp_path: Path) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    delivery = make(tmp_path, aliases={"robert@example.org": "bob@example.org"})
    outcome = await deliver(delivery, "robert@example.org", "bob@example.org")
    assert outcome.reply.code == 250
    assert [p.read_bytes() for p in files(bob)] == [expected("robert@example.org")]


async def test_no_delivered_to_and_line_ends(tmp_path: Path) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    chunk = maildir_module.CHUNK
    # A CRLF split across the chunk boundary, and a bare CR that must be kept.
    body = b"Subject: x\r\n\r\n" + b"a" * (chunk - 15) + b"\r\nbare\rCR\r\nend\r\n"
    assert body[chunk - 1 : chunk + 1] == b"\r\n"
    outcome = await deliver(make(tmp_path, delivered_to=False), "bob@example.org", body=body)
    assert outcome.reply.code == 250
    [path] = files(bob)
    assert path.read_bytes() == body.replace(b"\r\n", b"\n")
    assert b"bare\rCR\n" in path.read_bytes()


class _CountingBody(io.BytesIO):
    largest_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.largest_read = max(self.largest_read, len(data))
        return data


async def test_big_message_is_streamed(tmp_path: Path) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    body = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 4000  # 4 MB
    counting = _CountingBody(body)
    outcome = await make(tmp_path).deliver(envelope("bob@example.org"), counting, len(body))
    assert outcome.reply.code == 250
    assert counting.largest_read <= maildir_module.CHUNK
    [path] = files(bob)
    assert path.read_bytes() == expected("bob@example.org", body)


# --- a Maildir checked once; staged files start their writeback --------------------------------

async def test_a_checked_maildir_is_not_checked_again_for_each_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    delivery = make(tmp_path)
    checks: list[Path] = []
    real_prepare = MaildirDelivery._prepare

    def prepare(self: MaildirDelivery, path: Path) -> None:
        checks.append(path)
        real_prepare(self, path)

    monkeypatch.setattr(MaildirDelivery, "_prepare", prepare)
    for _ in range(3):
        assert (await deliver(delivery, "bob@example.org")).reply.code == 250
    assert checks == [bob] and len(files(bob)) == 3


@pytest.mark.parametrize("gone", ["tmp", "new"])
async def test_a_maildir_that_lost_a_directory_is_completed_again(tmp_path: Path,
                                                                  gone: str) -> None:
    """The check is remembered, but a tmp/ or new/ removed since (an admin
    cleaning up) is made again, and the message is delivered."""
    bob = maildir(tmp_path, "bob@example.org")
    delivery = make(tmp_path)
    assert (await deliver(delivery, "bob@example.org")).reply.code == 250
    for path in files(bob, gone):
        path.rename(tmp_path / path.name)
    (bob / gone).rmdir()
    outcome = await deliver(delivery, "bob@example.org")
    assert outcome.reply.code == 250, outcome
    assert len(files(bob)) == (2 if gone == "tmp" else 1)
    assert files(bob, "tmp") == []


async def test_a_new_directory_removed_between_stage_and_commit(tmp_path: Path) -> None:
    bob = maildir(tmp_path, "bob@example.org")
    delivery = make(tmp_path)
    staged = await delivery.stage(envelope("bob@example.org"), io.BytesIO(BODY))
    assert isinstance(staged, maildir_module.Staged)
    (bob / "new").rmdir()
    [outcome] = await delivery.commit_staged([staged])
    assert outcome.reply.code == 250
    [path] = files(bob)
    assert path.read_bytes() == expected("bob@example.org")


async def test_a_maildir_removed_for_good_still_fails_cleanly(tmp_path: Path) -> None:
    """Without create, a Maildir that has gone is not made again: 550 as before."""
    bob = maildir(tmp_path, "bob@example.org")
    delivery = make(tmp_path)
    assert (await deliver(delivery, "bob@example.org")).reply.code == 250
    for sub in ("tmp", "new", "cur"):
        for path in files(bob, sub):
            path.unlink()
        (bob / sub).rmdir()
    bob.rmdir()
    assert (await deliver(delivery, "bob@example.org")).reply.code == 451
    assert not bob.exists()


async def test_staging_starts_the_writeback_and_delivering_does_not_need_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    maildir(tmp_path, "bob@example.org")
    maildir(tmp_path, "carol@example.org")
    hinted: list[str] = []
    monkeypatch.setattr(maildir_module, "start_writeback",
                        lambda fd: hinted.append(os.readlink(f"/proc/self/fd/{fd}")))
    delivery = make(tmp_path)
    assert (await deliver(delivery, "bob@example.org")).reply.code == 250
    assert hinted == []  # deliver() fsyncs the file itself
    staged = await delivery.stage(envelope("bob@example.org", "carol@example.org"),
                                  io.BytesIO(BODY))
    assert isinstance(staged, maildir_module.Staged)
    assert sorted(hinted) == sorted(str(t.tmp) for t in staged.targets)
    [outcome] = await delivery.commit_staged([staged])
    assert outcome.reply.code == 250


def test_start_writeback_is_a_hint_that_never_raises(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from fermoposta.customer.delivery import writeback
    path = tmp_path / "f"
    with path.open("wb") as out:
        out.write(b"x" * 10000)
        out.flush()
        writeback.start_writeback(out.fileno())
    writeback.start_writeback(-1)  # EBADF: ignored
    assert path.read_bytes() == b"x" * 10000
    if os.uname().sysname == "Linux":
        assert writeback._lookup() is not None
    monkeypatch.setattr(writeback, "_call", writeback._call)  # restored afterwards
    monkeypatch.setattr(writeback.sys, "platform", "freebsd14")
    assert writeback._lookup() is None
    monkeypatch.setattr(writeback, "_looked_up", False)
    writeback.start_writeback(0)  # no sync_file_range: nothing happens
    assert writeback._call is None


# --- factory ---------------------------------------------------------------------------------

def test_factory(tmp_path: Path) -> None:
    delivery = make_delivery("maildir", hostname=HOSTNAME,
                             path_template=str(tmp_path / "{domain}/{local}"), create=True,
                             aliases={"a@example.org": "b@example.org"},
                             catch_all="c@example.org")
    assert isinstance(delivery, MaildirDelivery) and delivery.name == "maildir"
    assert make_delivery("smtp", hostname=HOSTNAME, hostport=("127.0.0.1", 25)).name == "smtp"
    assert make_delivery("lmtp", hostname=HOSTNAME, socket_path=tmp_path / "s").name == "lmtp"
    bad: list[Callable[[], object]] = [
        lambda: make_delivery("mbox", hostname=HOSTNAME),
        lambda: make_delivery("maildir", hostname=HOSTNAME),
        lambda: make_delivery("maildir", hostname=HOSTNAME, path_template="/m/{local}",
                              hostport=("h", 1)),
        lambda: make_delivery("lmtp", hostname=HOSTNAME),
        lambda: make_delivery("lmtp", hostname=HOSTNAME, socket_path=tmp_path,
                              hostport=("h", 1)),
        lambda: make_delivery("lmtp", hostname=HOSTNAME, socket_path=tmp_path, create=True),
        lambda: make_delivery("smtp", hostname=HOSTNAME, socket_path=tmp_path),
        lambda: make_delivery("smtp", hostname=HOSTNAME, hostport=("h", 1),
                              catch_all="x@example.org"),
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()
