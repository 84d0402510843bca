"""The DSN builder (RFC 3464 / RFC 3461 / RFC 6533): every DSN parsed back with
the stdlib `email` package, field by field."""

from __future__ import annotations

import email
import email.policy
import io
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from fermoposta.mail import dsn as dsn_module
from fermoposta.mail.dsn import (
    Action,
    RecipientReport,
    build_dsn,
    build_failure_dsn,
    read_headers,
    wants_notice,
)
from fermoposta.smtp.reply import Reply
from fermoposta.store import SQLiteStore
from fermoposta.store.base import (
    MessageOrigin,
    NewMessage,
    NewRecipient,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
)

T0 = 1_700_000_000.0
ORIGINAL = (b"From: Alice <alice@example.org>\r\nSubject: hello\r\n"
            b"Message-ID: <m1@example.org>\r\n\r\nThe body.\r\n.leading dot\r\n")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "s.sqlite3", clock=lambda: T0)
    yield s
    s.close()


def queued(store: SQLiteStore, *, sender: str = "alice@example.org", ret: str | None = None,
           envid: str | None = None, notify: str | None = None, orcpt: str | None = None,
           data: bytes = ORIGINAL, rcpts: tuple[str, ...] = ("bob@dest.test",),
           smtputf8: bool = False, body_8bit: bool = False) -> QueuedMessage:
    mid = store.enqueue(NewMessage(
        sender, tuple(NewRecipient(r, r.rsplit("@", 1)[1], RecipientState.OUTBOUND, notify, orcpt)
                      for r in rcpts),
        MessageOrigin.SUBMISSION, smtputf8=smtputf8, body_8bit=body_8bit, envid=envid, ret=ret),
        io.BytesIO(data))
    message = store.get_message(mid)
    assert message is not None
    return message


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def build(store: SQLiteStore, message: QueuedMessage, action: Action = Action.FAILED,
          reports: list[RecipientReport] | None = None, **kw: object
          ) -> tuple[NewMessage, bytes] | None:
    if reports is None:
        reply = Reply(550, "5.1.1", "<bob@dest.test>: no such user")
        reports = [RecipientReport(r, "5.1.1", reply, "mx.dest.test") for r in message.recipients]
    result = build_dsn(store, hostname="mx.provider.test", message=message, action=action,
                       reports=reports, sender_domain_hosted=False, now=T0 + 60,
                       **kw)  # type: ignore[arg-type]
    if result is None:
        return None
    notice, stream = result
    data = stream.read()
    stream.close()
    return notice, data


def fields(dsn: EmailMessage) -> list[EmailMessage]:
    status = list(dsn.iter_parts())[1]
    assert status.get_content_type() == "message/delivery-status"
    payload = status.get_payload()
    assert isinstance(payload, list)
    return payload


def test_failed_dsn_with_headers(store: SQLiteStore) -> None:
    message = queued(store, envid="ID+2B7", orcpt="rfc822;Bob+40Dest.test", ret="HDRS")
    built = build(store, message)
    assert built is not None
    notice, raw = built
    assert notice.sender == "" and notice.origin == MessageOrigin.DSN
    assert [(r.address, r.domain, r.state) for r in notice.recipients] == [
        ("alice@example.org", "example.org", RecipientState.OUTBOUND)]
    assert not notice.body_8bit and not notice.smtputf8
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    dsn = parse(raw)
    assert dsn["To"].addresses[0].addr_spec == "alice@example.org"
    assert dsn["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.provider.test"
    per_message, block = fields(dsn)
    assert per_message["Reporting-MTA"] == "dns; mx.provider.test"
    assert per_message["Original-Envelope-Id"] == "ID+7"
    assert per_message["X-Fermoposta-Queue-ID"] == message.id
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == T0
    assert block["Original-Recipient"] == "rfc822; Bob@Dest.test"
    assert block["Final-Recipient"] == "rfc822; bob@dest.test"
    assert (block["Action"], block["Status"]) == ("failed", "5.1.1")
    assert block["Remote-MTA"] == "dns; mx.dest.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@dest.test>: no such user"
    assert email.utils.parsedate_to_datetime(block["Last-Attempt-Date"]).timestamp() == T0 + 60
    headers = list(dsn.iter_parts())[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: hello" in headers.get_payload()
    assert "The body." not in headers.get_payload()


def test_ret_full_includes_the_whole_original_up_to_the_limit(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    message = queued(store, ret="FULL")
    built = build(store, message)
    assert built is not None
    original = list(parse(built[1]).iter_parts())[2]
    assert original.get_content_type() == "message/rfc822"
    inner = original.get_payload()[0]
    assert inner["Subject"] == "hello" and ".leading dot" in inner.get_content()
    # Over the limit: only the headers.
    monkeypatch.setattr(dsn_module, "FULL_LIMIT", 10)
    built = build(store, message)
    assert built is not None
    assert list(parse(built[1]).iter_parts())[2].get_content_type() == "text/rfc822-headers"
    # A delay notice never carries the content (RFC 3461 §4.3).
    built = build(store, message, Action.DELAYED, [
        RecipientReport(message.recipients[0], "4.4.1", diagnostic="connect failed")],
        will_retry_until=T0 + 86400)
    assert built is not None
    monkeypatch.undo()
    dsn = parse(built[1])
    assert list(dsn.iter_parts())[2].get_content_type() == "text/rfc822-headers"
    _, block = fields(dsn)
    assert (block["Action"], block["Status"]) == ("delayed", "4.4.1")
    assert block["Diagnostic-Code"] == "X-Fermoposta; connect failed"
    assert block["Remote-MTA"] is None
    assert email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == \
        T0 + 86400


def test_8bit_only_when_needed(store: SQLiteStore) -> None:
    eight = ORIGINAL.replace(b"The body.", "Caffè.".encode())
    message = queued(store, ret="FULL", data=eight, body_8bit=True)
    built = build(store, message)
    assert built is not None and built[0].body_8bit
    message = queued(store, ret="HDRS", data=eight, body_8bit=True)
    built = build(store, message)  # the 8-bit part is in the body, not the headers
    assert built is not None and not built[0].body_8bit


@pytest.mark.parametrize(("notify", "action", "wanted"), [
    (None, Action.FAILED, True), (None, Action.DELAYED, True), (None, Action.RELAYED, False),
    ("NEVER", Action.FAILED, False), ("SUCCESS", Action.DELIVERED, True),
    ("success,delay", Action.DELAYED, True), ("FAILURE", Action.DELAYED, False),
    ("SUCCESS", Action.FAILED, False),
])
def test_notify(notify: str | None, action: Action, wanted: bool) -> None:
    rcpt = QueuedRecipient(1, "Q", "b@x.test", "x.test", RecipientState.OUTBOUND, 0, None,
                           notify, None)
    assert wants_notice(rcpt, action) is wanted


def test_no_dsn_for_null_sender_or_never(store: SQLiteStore) -> None:
    assert build(store, queued(store, sender="")) is None
    assert build(store, queued(store, notify="NEVER")) is None
    assert build(store, queued(store, notify="SUCCESS")) is None  # no FAILURE asked


def test_success_notice(store: SQLiteStore) -> None:
    message = queued(store, notify="SUCCESS")
    built = build(store, message, Action.RELAYED, [RecipientReport(
        message.recipients[0], "2.0.0", Reply(250, "2.0.0", "Ok: queued as X"), "mx.dest.test")])
    assert built is not None
    dsn = parse(built[1])
    assert dsn["Subject"] == "Successful Mail Delivery Report"
    _, block = fields(dsn)
    assert (block["Action"], block["Status"]) == ("relayed", "2.0.0")


def test_remote_text_cannot_inject_fields_and_long_lines_fold(store: SQLiteStore) -> None:
    message = queued(store)
    evil = Reply(550, "5.7.1", "bad\x00\x1b X-Injected: yes", "x" * 60 + " " + "y" * 60)
    built = build(store, message, reports=[
        RecipientReport(message.recipients[0], "5.7.1", evil, "mx.dest.test")])
    assert built is not None
    raw = built[1]
    assert b"\x00" not in raw and b"\x1b" not in raw
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    _, block = fields(parse(raw))
    assert "X-Injected" not in block or block["X-Injected"] is None
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.7.1 bad")
    assert "y" * 60 in block["Diagnostic-Code"]


def test_smtputf8_message_gets_global_types(store: SQLiteStore) -> None:
    message = queued(store, sender="ålice@example.org", rcpts=("bøb@dest.test",), smtputf8=True)
    built = build(store, message)
    assert built is not None
    notice, raw = built
    assert notice.smtputf8 and notice.body_8bit  # the DSN goes to a UTF-8 address
    assert b"Content-Type: message/global-delivery-status" in raw
    assert "Final-Recipient: utf-8; bøb@dest.test".encode() in raw
    assert b"Content-Type: message/global-headers" in raw


def test_hosted_sender_gets_a_held_dsn_and_compat_builder(store: SQLiteStore) -> None:
    message = queued(store)
    headers = read_headers(store, message.id)
    assert headers.endswith(b"\r\n") and b"The body." not in headers
    result = build_failure_dsn(
        hostname="mx.provider.test", message=message,
        failures=[(message.recipients[0], Reply(554, None, "rejected"))], headers=headers,
        remote_mta="mx.dest.test", sender_domain_hosted=True, now=T0)
    assert result is not None
    notice, stream = result
    assert notice.recipients[0].state == RecipientState.HELD
    _, block = fields(parse(stream.read()))
    assert block["Status"] == "5.0.0"
