"""Issue 8, defect 2: the customer takes many recipients in one transaction.

Provider → ODMR → customer → real local targets (Dovecot LMTP, Postfix's
smtp-sink), 5 recipients in one provider transaction; RCPT-time refusals
passed on at RCPT; mixed LMTP outcomes after the dot go to the local retry
spool before the 250; a spool that cannot be written keeps the mail at the
provider."""

from __future__ import annotations

import logging
import re
import shutil

from conftest import PASSWORD
from dovecot import Dovecot, dovecot, dovecot_server
from fermoposta.customer.config import load_customer_config
from fermoposta.customer.local_retry import retry_local, retry_path, spool_status
from fermoposta.customer.pull import pull_once
from fermoposta.store import SQLiteStore
from peers import sink_messages, smtp_sink
from support.customer_config import write_customer_config
from support.dialog import send_mail

__all__ = ["dovecot", "dovecot_server"]  # fixtures

BODY = b"From: alice@sender.test\r\nSubject: five\r\n\r\nline one\r\n.dotted\r\n"
FIVE = ["bob@example.org", "carol@example.org", "bob+a@example.org", "carol+b@example.org",
        "bob+c@example.org"]


async def _queue(provider, recipients: list[str]) -> str:
    code, lines = await send_mail(*provider.mx, "alice@sender.test", recipients, BODY)
    assert code == 250
    return lines[0].rsplit(" ", 1)[1]


def _lmtp_config(provider, certs, tmp_path, dovecot: Dovecot):
    return load_customer_config(write_customer_config(
        tmp_path / "site", port=provider.odmr[1], password=PASSWORD, ca_file=certs.ca_file,
        pulls=[{"domains": ["example.org"],
                "delivery": {"type": "lmtp", "address": str(dovecot.socket)}}]))


async def test_lmtp_five_recipients_in_one_transaction(provider, certs, tmp_path,
                                                       dovecot: Dovecot):
    queue_id = await _queue(provider, FIVE)
    cfg = _lmtp_config(provider, certs, tmp_path, dovecot)
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.error is None and summary.exit_code == 0, summary.lines()
    # Before the fix: five transactions (452 4.5.3 to every second RCPT).
    [received] = summary.received
    assert sorted(received.recipients) == sorted(FIVE)
    assert received.reply == "250 2.0.0 Delivered to 5 recipients"
    assert len(dovecot.messages("bob@example.org")) == 3
    assert len(dovecot.messages("carol@example.org")) == 2
    assert provider.store.get_message(queue_id) is None
    assert summary.spooled == 0 and not retry_path(cfg).exists()


async def test_lmtp_mixed_outcomes_go_to_the_retry_spool(provider, certs, tmp_path,
                                                         dovecot: Dovecot):
    """ghost: Dovecot's 550 at RCPT, passed on at RCPT; carol: a 4xx after the
    dot (her mail directory is a file) while bob and bob+x are delivered:
    250 to the provider only once carol is in the local retry spool, and the
    next run delivers her."""
    rcpts = ["bob@example.org", "ghost@example.org", "carol@example.org",
             "bob+x@example.org", "bob+y@example.org"]
    queue_id = await _queue(provider, rcpts)
    blocker = dovecot.mail_root / "example.org" / "carol"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory\n")
    shutil.chown(blocker.parent, *_owner(dovecot))
    cfg = _lmtp_config(provider, certs, tmp_path, dovecot)

    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.error is None, summary.lines()
    assert summary.refused == 1 and summary.spooled == 1, summary.lines()
    [received] = summary.received
    assert sorted(received.recipients) == ["bob+x@example.org", "bob+y@example.org",
                                           "bob@example.org"]
    assert re.match(r"250 2\.0\.0 Delivered to 3 recipient\(s\); 1 kept in the local retry "
                    r"spool as \w+", received.reply)
    assert len(dovecot.messages("bob@example.org")) == 3
    # The provider: ghost refused at RCPT (a DSN about ghost only), the rest taken.
    assert provider.store.get_message(queue_id) is None
    dsns = [m for m in map(provider.store.get_message, _all_ids(provider.store))
            if m is not None and m.origin == "dsn"]
    [dsn] = dsns
    body = b"".join(provider.store.read_body(dsn.id))
    assert b"Final-Recipient: rfc822; ghost@example.org" in body
    assert b"carol" not in body.split(b"Content-Description: Undelivered Message")[0]
    # Carol waits in the spool, with Dovecot's temporary reply.
    spool = SQLiteStore(retry_path(cfg))
    try:
        [spooled] = [spool.get_message(i) for i in _all_ids(spool)]
        assert spooled is not None
        [rcpt] = spooled.recipients
        assert rcpt.address == "carol@example.org" and rcpt.attempts == 2  # taken, retried
        assert (rcpt.last_reply or "").startswith("4")
    finally:
        spool.close()
    assert "1 recipient(s) waiting" in (spool_status(cfg) or "")
    assert summary.retry is not None and summary.retry.deferred == 1  # retried after the pull

    blocker.unlink()
    result = await retry_local(cfg)
    assert (result.attempted, result.delivered, result.left) == (1, 1, 0), result
    [stored] = dovecot.messages("carol@example.org")
    assert b"Subject: five" in stored and f"with ESMTP id {queue_id}".encode() in stored
    assert (await retry_local(cfg)).attempted == 0  # nothing left, nothing twice


async def test_spool_failure_keeps_the_mail_at_the_provider(provider, certs, tmp_path,
                                                            dovecot: Dovecot):
    queue_id = await _queue(provider, ["bob@example.org", "carol@example.org"])
    blocker = dovecot.mail_root / "example.org" / "carol"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory\n")
    shutil.chown(blocker.parent, *_owner(dovecot))
    cfg = _lmtp_config(provider, certs, tmp_path, dovecot)
    retry_path(cfg).mkdir(parents=True)  # the spool cannot be opened
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.received == [] and summary.deferred == 2, summary.lines()
    assert summary.exit_code == 75
    message = provider.store.get_message(queue_id)
    assert message is not None and len(message.recipients) == 2  # nothing lost
    assert all("451 4.3.0" in (r.last_reply or "") for r in message.recipients)


async def test_smtp_sink_five_recipients_in_one_transaction(provider, certs, tmp_path):
    queue_id = await _queue(provider, FIVE)
    with smtp_sink(tmp_path / "sink") as port:
        cfg = load_customer_config(write_customer_config(
            tmp_path / "site", port=provider.odmr[1], password=PASSWORD, ca_file=certs.ca_file,
            pulls=[{"domains": ["example.org"],
                    "delivery": {"type": "smtp", "address": f"127.0.0.1:{port}"}}]))
        summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.error is None and summary.exit_code == 0, summary.lines()
    [dump] = sink_messages(tmp_path / "sink")  # before the fix: five dumps
    assert re.findall(rb"X-Rcpt-Args: <([^>]+)>", dump) == [r.encode() for r in FIVE]
    assert b"Subject: five" in dump
    [received] = summary.received
    assert sorted(received.recipients) == sorted(FIVE)
    assert provider.store.get_message(queue_id) is None


async def test_smtp_sink_refusal_at_rcpt_is_passed_on_at_rcpt(provider, certs, tmp_path,
                                                             caplog):
    """smtp-sink -r RCPT answers 450 to every RCPT: each of the five gets that
    450 at RCPT from us (before the fix: one got it after the dot and the other
    four a 452 4.5.3), and the provider keeps them all."""
    caplog.set_level(logging.INFO, logger="fermoposta.customer")
    queue_id = await _queue(provider, FIVE)
    with smtp_sink(tmp_path / "sink", "-r", "RCPT") as port:
        cfg = load_customer_config(write_customer_config(
            tmp_path / "site", port=provider.odmr[1], password=PASSWORD, ca_file=certs.ca_file,
            pulls=[{"domains": ["example.org"],
                    "delivery": {"type": "smtp", "address": f"127.0.0.1:{port}"}}]))
        summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.received == [] and summary.deferred == 5, summary.lines()
    assert sink_messages(tmp_path / "sink") == []
    message = provider.store.get_message(queue_id)
    assert message is not None and len(message.recipients) == 5
    assert all((r.last_reply or "").startswith("450 4.3.0") for r in message.recipients), \
        [r.last_reply for r in message.recipients]
    at_rcpt = [r.getMessage() for r in caplog.records
               if r.name == "fermoposta.customer" and "at RCPT: 450 4.3.0" in r.getMessage()]
    assert len(at_rcpt) == 5, at_rcpt


def _owner(dovecot: Dovecot) -> tuple[int, int]:
    st = dovecot.mail_root.stat()
    return st.st_uid, st.st_gid


def _all_ids(store):
    import sqlite3

    conn = sqlite3.connect(store.path)
    try:
        return [row[0] for row in conn.execute("SELECT id FROM messages")]
    finally:
        conn.close()
