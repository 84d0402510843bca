"""The customer's outbox against this project's provider (its submission listener).

Mail handed to the outbox listener (swaks or a raw client) is stored durably,
pushed before the next ATRN and arrives at the provider as an OUTBOUND
recipient; refusals come back to the local sender as a notice in its
Maildir; an unreachable submission service keeps the mail for the next push.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import mailbox
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import PASSWORD
from fermoposta.customer.config import CustomerConfig
from fermoposta.customer.outbox import (
    OutboxServer,
    notice_message_ids,
    open_outbox,
    outbox_message_ids,
)
from fermoposta.customer.outbox_push import push_outbox
from fermoposta.customer.pull import pull_once
from fermoposta.store import SQLiteStore, StoreError
from fermoposta.store.base import RecipientState
from peers import free_port
from support.dialog import Dialog
from support.outbox import BODY, site_config, submit


@dataclass
class Outbox:
    config: CustomerConfig
    store: SQLiteStore
    server: OutboxServer

    @property
    def port(self) -> int:
        assert self.server.address is not None
        return self.server.address[1]

    def ids(self) -> list[str]:
        # A separate connection to the file: what is durable, not what one
        # connection happens to see.
        with SQLiteStore(self.store.path) as fresh:
            return outbox_message_ids(fresh)


@pytest.fixture
async def start_outbox() -> AsyncIterator[Callable[[CustomerConfig], Any]]:
    started: list[Outbox] = []

    async def start(config: CustomerConfig) -> Outbox:
        store = open_outbox(config)
        server = OutboxServer(config, store)
        await server.start()
        outbox = Outbox(config, store, server)
        started.append(outbox)
        return outbox

    yield start
    for outbox in started:
        await outbox.server.stop(1.0)
        outbox.store.close()


def provider_queue_id(reply: str) -> str:
    assert "queued as " in reply, reply
    return reply.rsplit("queued as ", 1)[1].split()[0].rstrip(")")


def maildir(config: CustomerConfig, domain: str, local: str) -> list[bytes]:
    path = config.path.parent / "mail" / domain / local / "Maildir"
    if not path.exists():
        return []
    return [m.as_bytes() for m in mailbox.Maildir(str(path), create=False)]


# --- the happy path -------------------------------------------------------------------------

async def test_swaks_mail_is_pushed_at_the_next_pull(provider, certs, tmp_path, start_outbox):
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed")
    outbox = await start_outbox(site_config(tmp_path, provider, certs))
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", f"127.0.0.1:{outbox.port}", "--from", "bob@example.org",
        "--to", "friend@elsewhere.test,pal@elsewhere.test", "--helo", "ws1.example.org",
        "--header", "Subject: from the site", "--body", "hello from the site",
        "--timeout", "20", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    assert b"250 2.0.0 OK queued as " in out
    (queue_id,) = outbox.ids()
    stored = outbox.store.get_message(queue_id)
    assert stored is not None and stored.sender == "bob@example.org"
    assert stored.wire_ready  # no line-leading dot: pushed without the stuffer
    assert [(r.address, r.state) for r in stored.recipients] == [
        ("friend@elsewhere.test", RecipientState.OUTBOUND),
        ("pal@elsewhere.test", RecipientState.OUTBOUND)]
    spooled = b"".join(outbox.store.read_body(queue_id))
    assert f"by mail.example.org (fermoposta) with ESMTP id {queue_id}".encode() in spooled

    summary = await pull_once(outbox.config, outbox.config.pulls[0])
    assert summary.exit_code == 0, summary.lines()
    push = summary.push
    assert push is not None and push.error is None
    assert (push.messages, push.sent, push.deferred, push.refused) == (1, 2, 0, 0)
    assert outbox.ids() == []
    text = "\n".join(summary.lines())
    assert "org: example.org: no mail" in text
    assert "outbox -> 127.0.0.1:" in text and "1 message(s), 2 recipient(s) sent" in text
    assert f"{queue_id} from <bob@example.org> to friend@elsewhere.test -> sent (250" in text

    # At the provider: one message, both recipients OUTBOUND, the same body
    # behind the provider's own Received: header.
    pid = provider_queue_id(push.outcomes[0].reply)
    queued = provider.store.get_message(pid)
    assert queued is not None and queued.sender == "bob@example.org" and queued.wire_ready
    assert sorted((r.address, r.state) for r in queued.recipients) == [
        ("friend@elsewhere.test", RecipientState.OUTBOUND),
        ("pal@elsewhere.test", RecipientState.OUTBOUND)]
    body = b"".join(provider.store.read_body(pid))
    assert body.endswith(spooled) and body.startswith(b"Received: ")
    assert b"with ESMTPSA" in body[: len(body) - len(spooled)]  # TLS and AUTH on the push


async def test_mail_to_a_site_address_comes_back_through_the_provider(
        provider, certs, tmp_path, start_outbox):
    outbox = await start_outbox(site_config(tmp_path, provider, certs))
    code, _ = await submit(outbox.port, "bob@example.org", ["carol@example.org"])
    assert code == 250
    first = await pull_once(outbox.config, outbox.config.pulls[0])
    # Pushed before the ATRN of the same session: held at the provider in
    # time to come back in that very session.
    assert first.exit_code == 0, first.lines()
    assert first.push is not None and first.push.sent == 1
    assert len(first.received) == 1
    (message,) = maildir(outbox.config, "example.org", "carol")
    assert message.endswith(b"hello world\r\n") or message.endswith(b"hello world\n")


# --- refusals and notices --------------------------------------------------------------------

async def test_refused_sender_gets_a_notice_in_its_maildir(provider, certs, tmp_path,
                                                           start_outbox):
    outbox = await start_outbox(site_config(tmp_path, provider, certs))
    code, lines = await submit(outbox.port, "carol@example.net", ["friend@elsewhere.test"],
                               b"Subject: not ours\r\nMessage-ID: <m1@example.net>\r\n\r\nx\r\n")
    assert code == 250
    queue_id = provider_queue_id(lines[0])
    summary = await pull_once(outbox.config, outbox.config.pulls[0])
    push = summary.push
    assert push is not None and push.error is None, summary.lines()
    assert (push.sent, push.refused, push.notices, push.notices_waiting) == (0, 1, 1, 0)
    assert summary.exit_code == 0  # refused for good: told to the sender, nothing to retry
    assert outbox.ids() == [] and notice_message_ids(outbox.store) == []
    assert "-> refused (553 5.7.1" in "\n".join(summary.lines())

    (raw,) = maildir(outbox.config, "example.net", "carol")
    notice = email.message_from_bytes(raw, policy=email.policy.default)
    assert notice["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.org>"
    assert notice["To"].addresses[0].addr_spec == "carol@example.net"
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    human, status, original = notice.get_payload()
    assert queue_id in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mail.example.org"
    assert per_rcpt["Final-Recipient"] == "rfc822; friend@elsewhere.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.7.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.provider.test"
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 553 5.7.1")
    assert "Message-ID: <m1@example.net>" in original.get_payload()


async def test_notice_waits_when_the_local_target_is_down(provider, certs, tmp_path,
                                                          start_outbox):
    outbox = await start_outbox(site_config(tmp_path, provider, certs))
    assert (await submit(outbox.port, "carol@example.net", ["friend@elsewhere.test"]))[0] == 250
    blocker = outbox.config.path.parent / "mail" / "example.net"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory")  # the Maildir cannot be created: 4xx
    first = await push_outbox(outbox.config)
    assert (first.refused, first.notices, first.notices_waiting) == (1, 0, 1)
    assert first.exit_code == 75 and "1 waiting" in first.lines()[0]
    assert len(notice_message_ids(outbox.store)) == 1
    blocker.unlink()
    second = await push_outbox(outbox.config)
    assert (second.messages, second.notices, second.notices_waiting) == (0, 1, 0)
    assert second.exit_code == 0
    assert len(maildir(outbox.config, "example.net", "carol")) == 1


async def test_rate_limited_mail_is_deferred_and_pushed_later(provider_factory, certs, tmp_path,
                                                              start_outbox):
    limited = await provider_factory(extra="[submission]\nrate_limit = 1\nrate_window = \"1h\"\n")
    outbox = await start_outbox(site_config(tmp_path, limited, certs))
    for n in range(3):
        code, _ = await submit(outbox.port, "bob@example.org", [f"f{n}@elsewhere.test"])
        assert code == 250
    result = await push_outbox(outbox.config)
    # The first goes; the second gets 450 4.7.1 at MAIL and the push stops there.
    assert (result.messages, result.sent, result.deferred, result.refused) == (2, 1, 1, 0)
    assert result.exit_code == 75 and result.left == 2
    kept = [outbox.store.get_message(i) for i in outbox.ids()]
    assert [m.recipients[0].attempts for m in kept if m] == [1, 0]
    assert kept[0] is not None and (kept[0].recipients[0].last_reply or "").startswith("450 4.7.1")
    limited.provider.rate_limiter.clock = lambda: time.time() + 7200  # the window has passed
    again = await push_outbox(outbox.config)
    assert (again.sent, again.deferred) == (1, 1)  # one per window
    assert again.left == 1


# --- an unreachable submission service ---------------------------------------------------

async def test_submission_down_keeps_mail_for_the_next_pull(provider, certs, tmp_path,
                                                            start_outbox):
    closed = free_port()
    outbox = await start_outbox(site_config(tmp_path, provider, certs, submission_port=closed))
    assert (await submit(outbox.port, "bob@example.org", ["friend@elsewhere.test"]))[0] == 250
    summary = await pull_once(outbox.config, outbox.config.pulls[0])
    assert summary.error is None and not summary.had_mail  # the ATRN itself worked
    assert summary.push is not None and summary.push.error is not None
    assert summary.push.error.exit_code == 69 and summary.push.left == 1
    assert summary.exit_code == 75  # the mail is safe in the outbox: try later
    lines = summary.lines()
    assert lines[0] == "org: example.org: no mail"
    assert lines[1].startswith(f"outbox -> 127.0.0.1:{closed}: failed (connection, exit 69): ")
    assert lines[1].endswith("; 1 message(s) kept in the outbox")
    assert len(outbox.ids()) == 1

    fixed = site_config(tmp_path, provider, certs)
    later = await pull_once(fixed, fixed.pulls[0])
    assert later.exit_code == 0, later.lines()
    assert later.push is not None and later.push.sent == 1
    assert outbox.ids() == []


async def test_connection_lost_after_the_dot_keeps_the_recipients(provider, certs, tmp_path,
                                                                  start_outbox):
    """A scripted submission service that drops the line after the final dot:
    the provider may have the message, the outbox keeps it (a duplicate is
    possible, a loss is not)."""
    seen: list[bytes] = []

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake.provider.test ESMTP\r\n")
        while line := await reader.readline():
            seen.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-fake.provider.test\r\n250-PIPELINING\r\n"
                             b"250 AUTH CRAM-MD5\r\n")
            elif verb == b"AUTH":
                writer.write(b"334 " + base64.b64encode(b"<1.2@fake.provider.test>") + b"\r\n")
                await writer.drain()
                seen.append(await reader.readline())
                writer.write(b"235 2.7.0 OK\r\n")
            elif verb in (b"MAIL", b"RCPT"):
                writer.write(b"250 OK\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                await writer.drain()
                while (data := await reader.readline()) not in (b".\r\n", b""):
                    seen.append(data)
                writer.close()  # the final dot is never answered
                return
            await writer.drain()

    server = await asyncio.start_server(fake, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = site_config(tmp_path, provider, certs, submission_port=port,
                             extra_provider='submission_tls = "none"\nmechanisms = ["CRAM-MD5"]')
        outbox = await start_outbox(config)
        assert (await submit(outbox.port, "bob@example.org", ["friend@elsewhere.test"]))[0] == 250
        result = await push_outbox(config)
    finally:
        server.close()
        await server.wait_closed()
    assert b"hello world\r\n" in seen  # the whole message went
    assert result.exit_code == 69 and result.deferred == 1 and result.left == 1
    (queue_id,) = outbox.ids()
    message = outbox.store.get_message(queue_id)
    assert message is not None
    (rcpt,) = message.recipients
    assert rcpt.state == RecipientState.OUTBOUND and rcpt.attempts == 1
    assert "connection to the provider lost" in (rcpt.last_reply or "")
    assert PASSWORD.encode() not in b"".join(seen)  # CRAM-MD5: no password on the wire


# --- the listener -----------------------------------------------------------------------------

async def test_client_outside_networks_is_refused(provider, certs, tmp_path, start_outbox):
    outbox = await start_outbox(site_config(tmp_path, provider, certs,
                                            outbox='networks = ["192.0.2.0/24", "::1/128"]\n'))
    d = await Dialog.connect("127.0.0.1", outbox.port)
    try:
        lines = await d.expect(554)
        assert lines == ["5.7.1 Access denied: this client is not in the outbox's networks"]
        assert await d.closed()
    finally:
        await d.close()
    assert outbox.ids() == []


async def test_message_is_stored_only_with_its_250(provider, certs, tmp_path, start_outbox,
                                                   monkeypatch):
    outbox = await start_outbox(site_config(tmp_path, provider, certs))
    # Dropped in the middle of DATA: nothing is stored.
    d = await Dialog.connect("127.0.0.1", outbox.port)
    await d.expect(220)
    await d.cmd("EHLO client.example.org", 250)
    await d.cmd("MAIL FROM:<bob@example.org>", 250)
    await d.cmd("RCPT TO:<friend@elsewhere.test>", 250)
    await d.cmd("DATA", 354)
    await d.raw(b"Subject: half\r\n\r\nhalf a message\r\n")
    await asyncio.sleep(0.1)
    assert outbox.ids() == []
    await d.close()
    await asyncio.sleep(0.1)
    assert outbox.ids() == []

    # The spool fails: 451, and the client keeps the message.
    def broken(*args: object, **kwargs: object) -> str:
        raise StoreError("disk full")

    monkeypatch.setattr(outbox.store, "enqueue", broken)
    d = await Dialog.connect("127.0.0.1", outbox.port)
    try:
        await d.expect(220)
        await d.cmd("EHLO client.example.org", 250)
        await d.cmd("MAIL FROM:<bob@example.org>", 250)
        await d.cmd("RCPT TO:<friend@elsewhere.test>", 250)
        await d.cmd("DATA", 354)
        await d.raw(BODY + b".\r\n")
        assert (await d.expect(451)) == [
            "4.3.0 Temporary local problem (outbox spool), try again later"]
    finally:
        await d.close()
    monkeypatch.undo()
    assert outbox.ids() == []

    # 250 comes with the commit: visible from another connection at once.
    code, lines = await submit(outbox.port, "bob@example.org", ["friend@elsewhere.test"])
    assert code == 250
    assert outbox.ids() == [provider_queue_id(lines[0])]


async def test_sender_restriction_and_any_recipient(provider, certs, tmp_path, start_outbox):
    outbox = await start_outbox(site_config(tmp_path, provider, certs))
    d = await Dialog.connect("127.0.0.1", outbox.port)
    try:
        await d.expect(220)
        ehlo = await d.cmd("EHLO client.example.org", 250)
        assert "DSN" in ehlo and "PIPELINING" in ehlo and not any("AUTH" in x for x in ehlo)
        await d.cmd("MAIL FROM:<eve@elsewhere.test>", 553)
        await d.cmd("MAIL FROM:<>", 250)  # a local MTA's notice: accepted
        await d.cmd("RSET", 250)
        await d.cmd("MAIL FROM:<Bob@EXAMPLE.org> RET=HDRS ENVID=env1", 250)
        await d.cmd("RCPT TO:<postmaster>", 550)
        await d.cmd("RCPT TO:<anyone@anywhere.example> NOTIFY=FAILURE,DELAY "
                    "ORCPT=rfc822;anyone@anywhere.example", 250)
        await d.cmd("DATA", 354)
        await d.raw(BODY + b".\r\n")
        await d.expect(250)
    finally:
        await d.close()
    (queue_id,) = outbox.ids()
    message = outbox.store.get_message(queue_id)
    assert message is not None and (message.ret, message.envid) == ("HDRS", "env1")
    assert message.recipients[0].notify == "FAILURE,DELAY"
    assert message.recipients[0].orcpt == "rfc822;anyone@anywhere.example"


async def test_users_file_requires_auth(provider, certs, tmp_path, start_outbox):
    users = tmp_path / "outbox-users"
    users.write_text("# LAN users\nws1:lan-secret\n\n")
    outbox = await start_outbox(site_config(
        tmp_path, provider, certs,
        outbox=f'users_file = "{users}"\nallow_plaintext_auth = true\n'))
    d = await Dialog.connect("127.0.0.1", outbox.port)
    try:
        await d.expect(220)
        ehlo = await d.cmd("EHLO client.example.org", 250)
        assert "AUTH SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN" in ehlo
        await d.cmd("MAIL FROM:<bob@example.org>", 530)
        await d.auth_plain("ws1", "wrong", 535)
    finally:
        await d.close()
    code, lines = await submit(outbox.port, "bob@example.org", ["friend@elsewhere.test"],
                               auth=("ws1", "lan-secret"))
    assert code == 250
    message = outbox.store.get_message(provider_queue_id(lines[0]))
    assert message is not None and message.client.endswith("sasl_username=ws1")


async def test_users_file_without_plaintext_offers_cram_md5_to_swaks(provider, certs, tmp_path,
                                                                     start_outbox):
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed")
    users = tmp_path / "outbox-users"
    users.write_text("ws1:lan-secret\n")
    outbox = await start_outbox(site_config(tmp_path, provider, certs,
                                            outbox=f'users_file = "{users}"\n'))
    d = await Dialog.connect("127.0.0.1", outbox.port)
    try:
        await d.expect(220)
        assert "AUTH SCRAM-SHA-256 CRAM-MD5" in await d.cmd("EHLO client.example.org", 250)
        await d.cmd("AUTH PLAIN AHdzMQBsYW4tc2VjcmV0", 538)  # never in clear
    finally:
        await d.close()
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", f"127.0.0.1:{outbox.port}", "--from", "bob@example.org",
        "--to", "friend@elsewhere.test", "--auth", "CRAM-MD5", "--auth-user", "ws1",
        "--auth-password", "lan-secret", "--timeout", "20",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    assert len(outbox.ids()) == 1


async def test_check_also_checks_the_submission_service(provider, certs, tmp_path):
    from fermoposta.customer.pull import check

    config = site_config(tmp_path, provider, certs)
    code, lines = await check(config)
    assert code == 0, lines
    text = "\n".join(lines)
    assert "OK: ready to pull" in text and text.endswith("OK: ready to push the outbox")
    assert f"submission connected to 127.0.0.1:{provider.submission[1]}: 220 " in text
    assert "submission AUTH SCRAM-SHA-256 as acme: OK (server signature verified)" in text
    assert "submission ATRN" not in text

    down = site_config(tmp_path, provider, certs, submission_port=free_port())
    code, lines = await check(down)
    assert code == 69 and "OK: ready to pull" in lines
    assert lines[-1].startswith("submission FAILED (connection, exit 69): cannot connect")
