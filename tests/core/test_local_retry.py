"""The customer's local retry spool (customer/local_retry.py), with Maildir
delivery and a dead LMTP socket as local targets (no network peers)."""

from __future__ import annotations

import io
import mailbox
import time
from pathlib import Path

import pytest

from fermoposta.customer.config import CustomerConfig, load_customer_config
from fermoposta.customer.delivery.base import LocalEnvelope, LocalRecipient
from fermoposta.customer.local_retry import retry_local, retry_path, spool_failures
from fermoposta.customer.outbox import open_outbox, outbox_message_ids
from fermoposta.smtp.reply import Reply
from fermoposta.store import SQLiteStore
from fermoposta.store.base import MessageOrigin, RecipientState
from support.customer_config import write_customer_config

MESSAGE = (b"Received: from mx.provider.test by mail.example.org; Thu, 1 Jan 2026 00:00:00 "
           b"+0000\r\nFrom: someone\r\nSubject: spooled\r\nMessage-ID: <1@x>\r\n\r\nHello.\r\n")


def _config(tmp_path: Path, delivery: dict[str, object] | None = None) -> CustomerConfig:
    pull: dict[str, object] = {"domains": ["example.org"]}
    if delivery is not None:
        pull["delivery"] = delivery
    return load_customer_config(write_customer_config(tmp_path, port=1, password="x",
                                                      ca_file=None, pulls=[pull]))


def _envelope(sender: str, *addresses: str) -> LocalEnvelope:
    return LocalEnvelope(sender, tuple(LocalRecipient(a, *a.split("@")) for a in addresses),
                         queue_hint="PROVIDERQ")


def _messages(spool_path: Path) -> list[tuple[str, list[str], MessageOrigin]]:
    import sqlite3

    store = SQLiteStore(spool_path)
    try:
        ids = [r[0] for r in sqlite3.connect(spool_path).execute("SELECT id FROM messages")]
        out = []
        for message_id in ids:
            m = store.get_message(message_id)
            assert m is not None
            out.append((m.sender, [r.address for r in m.recipients], m.origin))
        return out
    finally:
        store.close()


def _maildir(tmp_path: Path, address: str) -> list[bytes]:
    local, domain = address.split("@")
    box = mailbox.Maildir(tmp_path / "mail" / domain / local / "Maildir", create=False)
    return [box.get_bytes(k) for k in box.iterkeys()]


async def test_temporary_failure_is_retried_and_delivered(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    qid = spool_failures(cfg, _envelope("alice@sender.test", "carol@example.org"),
                         io.BytesIO(MESSAGE), [(LocalRecipient("carol@example.org", "carol",
                                                               "example.org"),
                                                Reply(451, "4.2.0", "try later"))],
                         "lmtp:/run/lmtp")
    assert _messages(retry_path(cfg)) == [("alice@sender.test", ["carol@example.org"],
                                           MessageOrigin.MX)]
    result = await retry_local(cfg)
    assert (result.attempted, result.delivered, result.left) == (1, 1, 0)
    [stored] = _maildir(tmp_path, "carol@example.org")
    assert b"Subject: spooled" in stored
    assert _messages(retry_path(cfg)) == []
    assert qid


async def test_permanent_failure_notifies_a_local_sender_through_the_site(tmp_path: Path
                                                                           ) -> None:
    cfg = _config(tmp_path)
    spool_failures(cfg, _envelope("alice@example.org", "carol@example.org"),
                   io.BytesIO(MESSAGE),
                   [(LocalRecipient("carol@example.org", "carol", "example.org"),
                     Reply(552, "5.2.2", "carol is over quota"))], "lmtp:/run/lmtp")
    # Carol is gone from the spool; the notice to alice waits for local delivery.
    [(sender, rcpts, origin)] = _messages(retry_path(cfg))
    assert (sender, rcpts, origin) == ("", ["alice@example.org"], MessageOrigin.DSN)
    result = await retry_local(cfg)
    assert result.delivered == 1 and result.left == 0
    [notice] = _maildir(tmp_path, "alice@example.org")
    assert b"Final-Recipient: rfc822; carol@example.org" in notice
    assert b"Status: 5.2.2" in notice and b"carol is over quota" in notice
    assert b"Subject: spooled" in notice  # the original's headers


async def test_permanent_failure_notice_to_a_remote_sender_goes_to_the_outbox(tmp_path: Path
                                                                               ) -> None:
    cfg = _config(tmp_path)
    spool_failures(cfg, _envelope("alice@sender.test", "carol@example.org"),
                   io.BytesIO(MESSAGE),
                   [(LocalRecipient("carol@example.org", "carol", "example.org"),
                     Reply(550, "5.1.1", "no such user"))], "lmtp:/run/lmtp")
    result = await retry_local(cfg)
    assert result.moved == 1 and result.left == 0
    outbox = open_outbox(cfg)
    try:
        [message_id] = outbox_message_ids(outbox)
        message = outbox.get_message(message_id)
        assert message is not None and message.sender == ""  # RFC 5321 §4.5.5
        assert [(r.address, r.state) for r in message.recipients] == [
            ("alice@sender.test", RecipientState.OUTBOUND)]
        assert b"no such user" in b"".join(outbox.read_body(message_id))
    finally:
        outbox.close()


async def test_null_sender_gets_no_notice(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    spool_failures(cfg, _envelope("", "carol@example.org"), io.BytesIO(MESSAGE),
                   [(LocalRecipient("carol@example.org", "carol", "example.org"),
                     Reply(550, "5.1.1", "no such user"))], "lmtp:/run/lmtp")
    assert _messages(retry_path(cfg)) == []


async def test_expiry_after_the_lifetime_fails_with_a_notice(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"type": "lmtp", "address": str(tmp_path / "down.sock")})
    spool_failures(cfg, _envelope("alice@example.org", "carol@example.org"),
                   io.BytesIO(MESSAGE),
                   [(LocalRecipient("carol@example.org", "carol", "example.org"),
                     Reply(451, "4.4.1", "down"))], "lmtp:x")
    early = await retry_local(cfg)
    assert (early.deferred, early.bounced, early.left) == (1, 0, 1)
    late = await retry_local(cfg, now=time.time() + cfg.local_retry_lifetime + 1)
    assert late.bounced == 1
    # The notice about carol now waits (the LMTP target is still down).
    [(sender, rcpts, origin)] = _messages(retry_path(cfg))
    assert (sender, rcpts, origin) == ("", ["alice@example.org"], MessageOrigin.DSN)
    spool = SQLiteStore(retry_path(cfg))
    try:
        import sqlite3

        [nid] = [r[0] for r in sqlite3.connect(retry_path(cfg)).execute(
            "SELECT id FROM messages")]
        body = b"".join(spool.read_body(nid))
    finally:
        spool.close()
    assert b"Status: 5.4.7" in body and b"local retry spool" in body


def test_local_retry_lifetime_key(tmp_path: Path) -> None:
    path = write_customer_config(tmp_path, port=1, password="x", ca_file=None)
    assert load_customer_config(path).local_retry_lifetime == 5 * 86400
    path.write_text('local_retry_lifetime = "2h"\n' + path.read_text())
    assert load_customer_config(path).local_retry_lifetime == 7200
    path.write_text('local_retry_lifetime = "0s"\n' + path.read_text().split("\n", 1)[1])
    with pytest.raises(Exception, match="local_retry_lifetime"):
        load_customer_config(path)
