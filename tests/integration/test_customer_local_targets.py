"""Provider → ODMR → customer → real local targets: Dovecot over LMTP and
Postfix's smtp-sink as the local MTA, end to end."""

from __future__ import annotations

import email
import email.policy

from conftest import PASSWORD
from dovecot import Dovecot, dovecot, dovecot_server
from fermoposta.customer.config import load_customer_config
from fermoposta.customer.pull import pull_once
from peers import sink_messages, smtp_sink
from support.customer_config import write_customer_config
from support.dialog import send_mail

__all__ = ["dovecot", "dovecot_server"]  # fixtures

BODY = b"From: alice@sender.test\r\nSubject: to the site\r\n\r\nline one\r\n.dotted\r\n"


async def test_lmtp_to_dovecot_with_a_rejected_recipient(provider, certs, tmp_path,
                                                        dovecot: Dovecot):
    code, lines = await send_mail(*provider.mx, "alice@sender.test",
                                  ["bob@example.org", "ghost@example.org", "carol@example.org"],
                                  BODY)
    assert code == 250
    queue_id = lines[0].rsplit(" ", 1)[1]
    cfg = load_customer_config(write_customer_config(
        tmp_path / "site", port=provider.odmr[1], password=PASSWORD, ca_file=certs.ca_file,
        pulls=[{"domains": ["example.org"],
                "delivery": {"type": "lmtp", "address": str(dovecot.socket)}}]))
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.error is None, summary.lines()
    # One LMTP transaction per recipient: bob and carol once each.
    for address in ("bob@example.org", "carol@example.org"):
        [raw] = dovecot.messages(address)
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert message["Subject"] == "to the site"
        assert ".dotted" in message.get_content()
        assert f"with ESMTP id {queue_id}" in raw.decode()
    assert sorted(r for m in summary.received for r in m.recipients) == [
        "bob@example.org", "carol@example.org"]
    # Dovecot refused ghost: 550 to the provider, which dropped it with a DSN.
    assert provider.store.get_message(queue_id) is None
    dsns = [provider.store.get_message(i) for i in _all_ids(provider.store)]
    [dsn] = [m for m in dsns if m is not None and m.origin == "dsn"]
    body = b"".join(provider.store.read_body(dsn.id))
    assert b"Final-Recipient: rfc822; ghost@example.org" in body
    assert b"Action: failed" in body


def _all_ids(store):
    import sqlite3

    return [row[0] for row in sqlite3.connect(store.path).execute("SELECT id FROM messages")]


async def test_lmtp_target_down_keeps_everything_held(provider, certs, tmp_path):
    code, lines = await send_mail(*provider.mx, "alice@sender.test", ["bob@example.org"], BODY)
    assert code == 250
    queue_id = lines[0].rsplit(" ", 1)[1]
    cfg = load_customer_config(write_customer_config(
        tmp_path / "site", port=provider.odmr[1], password=PASSWORD, ca_file=certs.ca_file,
        pulls=[{"domains": ["example.org"],
                "delivery": {"type": "lmtp", "address": str(tmp_path / "down.sock")}}]))
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.exit_code == 75 and summary.received == [] and summary.deferred == 1
    message = provider.store.get_message(queue_id)
    assert message is not None and "451 4.4.1" in (message.recipients[0].last_reply or "")


async def test_lmtp_message_with_25_recipients(provider, certs, tmp_path, dovecot: Dovecot):
    """25 recipients in one LMTP transaction (RFC 5321 §4.5.3.1.8: at least 100)."""
    # Dovecot's recipient_delimiter "+" sends bob+N to bob.
    rcpts = [f"bob+{i}@example.org" for i in range(25)]
    code, _ = await send_mail(*provider.mx, "alice@sender.test", rcpts, BODY)
    assert code == 250
    cfg = load_customer_config(write_customer_config(
        tmp_path / "site", port=provider.odmr[1], password=PASSWORD, ca_file=certs.ca_file,
        pulls=[{"domains": ["example.org"],
                "delivery": {"type": "lmtp", "address": str(dovecot.socket)}}]))
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.error is None, summary.lines()
    assert provider.store.held_message_ids(["example.org"]) == []
    assert summary.messages == 1 and summary.refused == 0
    [received] = summary.received  # one transaction
    assert sorted(received.recipients) == sorted(rcpts)
    assert len(dovecot.messages("bob@example.org")) == 25


async def test_smtp_to_local_mta(provider, certs, tmp_path):
    code, _ = await send_mail(*provider.mx, "alice@sender.test",
                              ["bob@example.org", "carol@example.org"], BODY)
    assert code == 250
    with smtp_sink(tmp_path / "sink") as port:
        cfg = load_customer_config(write_customer_config(
            tmp_path / "site", port=provider.odmr[1], password=PASSWORD, ca_file=certs.ca_file,
            pulls=[{"domains": ["example.org"],
                    "delivery": {"type": "smtp", "address": f"127.0.0.1:{port}"}}]))
        summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.error is None, summary.lines()
    dumps = sink_messages(tmp_path / "sink")
    assert len(dumps) == 1  # one transaction for both recipients
    assert summary.messages == 1
    assert all(b"Subject: to the site" in d for d in dumps)
    assert provider.store.held_message_ids(["example.org"]) == []
