"""The outbound delivery engine against real peers on loopback: dnsmasq for
MX/A records, Postfix's smtp-sink and a scripted SMTP server as destinations.

Every DSN is parsed back with the stdlib `email` package, field by field.
Time is an injected clock shared by the store and the runner, so retries and
expiry are tested without waiting.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import logging
import sqlite3
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import Certs, add_customer, write_config
from dnsmasq import dnsmasq_server
from fermoposta.config import ProviderConfig, load_provider_config
from fermoposta.provider.outbound import OutboundRunner, OutboundSettings
from fermoposta.store import SQLiteStore
from fermoposta.store.base import (
    MessageOrigin,
    NewMessage,
    NewRecipient,
    QueuedMessage,
    RecipientState,
)
from peers import free_port, sink_messages, smtp_sink
from support.smtp_server import Gauge, ScriptedSMTP

OUTBOUND = RecipientState.OUTBOUND
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[list[SQLiteStore]]:
    opened: list[SQLiteStore] = []
    yield opened
    for store in opened:
        store.close()


def setup(tmp_path: Path, stores: list[SQLiteStore], clock: Clock, outbound: str,
          hold: str = "") -> tuple[ProviderConfig, SQLiteStore]:
    directory = tmp_path / f"p{len(stores)}"
    directory.mkdir()
    path = write_config(directory, None, extra=f"[outbound]\n{outbound}\n{hold}")
    config = load_provider_config(path)
    store = SQLiteStore(config.store_path, clock=clock)
    stores.append(store)
    add_customer(store, "acme", ("example.org",))  # a hosted sender domain
    return config, store


def body(subject: str = "test", extra: bytes = b"") -> bytes:
    return (b"From: <alice@example.org>\r\nTo: <bob@dest.test>\r\n"
            b"Subject: " + subject.encode() + b"\r\nMessage-ID: <" + subject.encode()
            + b"@example.org>\r\n\r\nHello there.\r\n" + extra)


def submit(store: SQLiteStore, rcpts: list[str], *, sender: str = "alice@example.org",
           data: bytes | None = None, envid: str | None = None, ret: str | None = None,
           notify: str | None = None, orcpt: str | None = None, smtputf8: bool = False) -> str:
    message = NewMessage(
        sender=sender,
        recipients=tuple(NewRecipient(r, r.rsplit("@", 1)[1].lower(), OUTBOUND, notify, orcpt)
                         for r in rcpts),
        origin=MessageOrigin.SUBMISSION, envid=envid, ret=ret, smtputf8=smtputf8,
        client="test[127.0.0.1]")
    return store.enqueue(message, io.BytesIO(data if data is not None else body()))


def all_messages(store: SQLiteStore) -> list[QueuedMessage]:
    rows = sqlite3.connect(store.path).execute("SELECT id FROM messages").fetchall()
    found = [store.get_message(r[0]) for r in rows]
    return [m for m in found if m is not None]


def dsns(store: SQLiteStore) -> list[tuple[QueuedMessage, EmailMessage]]:
    out = []
    for m in all_messages(store):
        if m.origin == MessageOrigin.DSN:
            raw = b"".join(store.read_body(m.id))
            out.append((m, parse(raw)))
    return out


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    msg.raw = raw  # type: ignore[attr-defined]
    return msg


def report(dsn: EmailMessage) -> tuple[EmailMessage, list[EmailMessage]]:
    """The per-message block and the per-recipient blocks of a DSN."""
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = list(dsn.iter_parts())
    if parts[1].get_content_type() == "message/global-delivery-status":
        # RFC 6533: the same fields, UTF-8 allowed; the stdlib leaves it as text.
        raw: bytes = dsn.raw  # type: ignore[attr-defined]
        section = raw.split(b"Content-Type: message/global-delivery-status", 1)[1]
        section = section.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
        text = section.decode("utf-8")
        blocks = [email.message_from_string(b.strip() + "\n", policy=email.policy.default)
                  for b in text.replace("\r\n", "\n").split("\n\n") if b.strip()]
    else:
        assert parts[1].get_content_type() == "message/delivery-status"
        blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    return blocks[0], blocks[1:]  # type: ignore[return-value]


def runner(config: ProviderConfig, store: SQLiteStore, clock: Clock, **kw: object
           ) -> OutboundRunner:
    return OutboundRunner(config, store, clock=clock, **kw)  # type: ignore[arg-type]


# --- MX routing with dnsmasq -------------------------------------------------------------------


async def test_delivery_via_mx_to_smtp_sink(tmp_path: Path, stores: list[SQLiteStore],
                                            clock: Clock, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    caplog.set_level(logging.INFO, logger="fermoposta")
    with smtp_sink(tmp_path / "sink") as port, dnsmasq_server(
            mx=[("dest.test", "mail.dest.test", 10), ("dest.test", "backup.dest.test", 20)],
            hosts={"mail.dest.test": "127.0.0.1", "backup.dest.test": "127.0.0.2"},
    ) as (dns_ip, dns_port):
        config, store = setup(tmp_path, stores, clock,
                              f'port = {port}\nresolver = "{dns_ip}:{dns_port}"')
        qid = submit(store, ["bob@dest.test", "carol@dest.test"])
        out = runner(config, store, clock)
        assert await out.run_once() == 2
        assert store.get_message(qid) is None  # delivered: gone from the queue
        assert out.delivered == 2 and out.connections == 1
    [dump] = sink_messages(tmp_path / "sink")
    assert b"Subject: test" in dump and b"Hello there." in dump
    line = next(r.getMessage() for r in caplog.records if "to=<bob@dest.test>" in r.getMessage())
    assert line.startswith(f"{qid}: to=<bob@dest.test>, relay=")
    assert f"[127.0.0.1]:{port}" in line  # the preferred MX, not the backup
    assert "dsn=2.0.0, status=sent (250" in line


async def test_implicit_mx_null_mx_nxdomain_and_servfail(tmp_path: Path,
                                                         stores: list[SQLiteStore],
                                                         clock: Clock) -> None:
    async with ScriptedSMTP() as server:
        with dnsmasq_server(mx=[("nullmx.test", ".", 0)],
                            hosts={"implicit.test": "127.0.0.1"}) as (dns_ip, dns_port):
            config, store = setup(tmp_path, stores, clock,
                                  f'port = {server.port}\nresolver = "{dns_ip}:{dns_port}"')
            qid = submit(store, ["a@implicit.test", "b@nullmx.test", "c@nx.test",
                                 "d@refused.example"], envid="env-1")
            out = runner(config, store, clock)
            await out.run_once()
    assert [t.recipients for t in server.received] == [["a@implicit.test"]]
    left = store.get_message(qid)
    assert left is not None
    # SERVFAIL-like (dnsmasq REFUSED for a zone it does not serve): deferred, kept.
    [kept] = left.recipients
    assert kept.address == "d@refused.example" and kept.attempts == 1
    assert kept.last_reply is not None and kept.last_reply.startswith("451 4.4.3")
    # Null MX and NXDOMAIN: failed at once, one DSN, HELD for the hosted sender.
    [(dsn_msg, dsn)] = dsns(store)
    assert [(r.address, r.state) for r in dsn_msg.recipients] == [
        ("alice@example.org", RecipientState.HELD)]
    per_message, blocks = report(dsn)
    assert per_message["Original-Envelope-Id"] == "env-1"
    by_rcpt = {b["Final-Recipient"]: b for b in blocks}
    null = by_rcpt["rfc822; b@nullmx.test"]
    assert (null["Action"], null["Status"]) == ("failed", "5.1.10")
    assert "null MX" in null["Diagnostic-Code"]
    assert null["Remote-MTA"] is None  # nobody answered: our own diagnostic
    nx = by_rcpt["rfc822; c@nx.test"]
    assert (nx["Action"], nx["Status"]) == ("failed", "5.1.2")
    assert nx["Diagnostic-Code"].startswith("X-Fermoposta; 550 5.1.2")


# --- retries, bounces, expiry ------------------------------------------------------------------


async def test_4xx_then_success_on_retry(tmp_path: Path, stores: list[SQLiteStore],
                                         clock: Clock) -> None:
    replies = iter(["451 4.2.1 Mailbox busy, try later", "250 2.0.0 Ok: queued"])
    async with ScriptedSMTP(data_policy=lambda t: next(replies)) as server:
        config, store = setup(tmp_path, stores, clock,
                              f'transport = {{ "dest.test" = "127.0.0.1:{server.port}" }}\n'
                              'retry_initial = "1m"\nretry_max = "1h"')
        qid = submit(store, ["bob@dest.test"])
        out = runner(config, store, clock)
        await out.run_once()
        m = store.get_message(qid)
        assert m is not None
        [r] = m.recipients
        assert r.attempts == 1 and r.last_reply == "451 4.2.1 Mailbox busy, try later"
        assert r.next_attempt_at is not None and 48 <= r.next_attempt_at - T0 <= 72  # 1m ±20%
        assert r.first_failure_at == T0
        assert await out.run_once() == 0  # not due yet
        clock.now = r.next_attempt_at
        assert await out.run_once() == 1
        assert store.get_message(qid) is None
    assert len(server.received) == 1 and out.deferred == 1 and out.delivered == 1
    assert dsns(store) == []  # NOTIFY absent: no success notice


async def test_5xx_bounce_dsn_field_by_field(tmp_path: Path, stores: list[SQLiteStore],
                                             clock: Clock) -> None:
    """A 550 to RCPT: a failure DSN with RET=FULL, ENVID and ORCPT, which the
    engine then delivers itself (the sender's domain is not hosted)."""
    def policy(rcpt: str) -> str:
        return "550 5.1.1 <gone@dest.test>: Recipient address rejected" if "gone" in rcpt \
            else "250 2.1.5 Ok"

    async with ScriptedSMTP(rcpt_policy=policy) as dest, ScriptedSMTP(name="home.test") as home:
        config, store = setup(
            tmp_path, stores, clock,
            f'transport = {{ "dest.test" = "127.0.0.1:{dest.port}", '
            f'"sender.test" = "127.0.0.1:{home.port}" }}')
        qid = submit(store, ["ok@dest.test", "gone@dest.test"], sender="zed@sender.test",
                     envid="QQ+2B314", ret="FULL", orcpt="rfc822;gone+40dest.test",
                     notify="FAILURE")
        out = runner(config, store, clock)
        await out.run_once()  # delivers ok@, bounces gone@, then delivers the DSN
        assert store.get_message(qid) is None
    assert [t.recipients for t in dest.received] == [["ok@dest.test"]]
    [notice] = home.received
    assert notice.sender == "" and notice.recipients == ["zed@sender.test"]
    dsn = parse(notice.data)
    assert dsn["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.provider.test"
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    assert dsn["Auto-Submitted"] == "auto-replied"
    per_message, [block] = report(dsn)
    assert per_message["Reporting-MTA"] == "dns; mx.provider.test"
    assert per_message["Original-Envelope-Id"] == "QQ+314"  # xtext-decoded
    arrival = per_message["Arrival-Date"]
    assert email.utils.parsedate_to_datetime(arrival).timestamp() == T0
    assert block["Final-Recipient"] == "rfc822; gone@dest.test"
    assert block["Original-Recipient"] == "rfc822; gone@dest.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; 127.0.0.1"
    assert block["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <gone@dest.test>: Recipient address rejected")
    parts = list(dsn.iter_parts())
    assert parts[2].get_content_type() == "message/rfc822"  # RET=FULL: the whole original
    original = parts[2].get_payload()[0]
    assert original["Subject"] == "test" and "Hello there." in original.get_content()
    # DSN parameters were passed to the next hop, which advertises DSN.
    [sent] = dest.received
    assert "ENVID=QQ+2B314" in sent.mail and "RET=FULL" in sent.mail
    assert "NOTIFY=FAILURE" in sent.rcpts[0] and "ORCPT=rfc822;gone+40dest.test" in sent.rcpts[0]


async def test_unreachable_until_expiry_with_delay_notice(tmp_path: Path,
                                                          stores: list[SQLiteStore],
                                                          clock: Clock) -> None:
    closed = free_port()  # nothing listens there: connection refused
    config, store = setup(tmp_path, stores, clock,
                          f'transport = {{ "dest.test" = "127.0.0.1:{closed}" }}\n'
                          'retry_initial = "5m"\nretry_max = "10m"\nlifetime = "2h"\n'
                          'delay_notice = "30m"')
    qid = submit(store, ["bob@dest.test"], envid="e1")
    out = runner(config, store, clock)
    await out.run_once()
    m = store.get_message(qid)
    assert m is not None
    [r] = m.recipients
    assert r.last_reply == f"451 4.4.1 connect to 127.0.0.1[127.0.0.1]:{closed}: " \
                           "Connection refused"
    assert dsns(store) == []  # not yet 30 minutes
    clock.now = T0 + 40 * 60
    await out.run_once()
    [(_, delayed)] = dsns(store)
    assert delayed["Subject"] == "Delayed Mail (still being retried)"
    _, [block] = report(delayed)
    assert (block["Action"], block["Status"]) == ("delayed", "4.4.1")
    assert email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == \
        T0 + 7200
    assert "Connection refused" in block["Diagnostic-Code"]
    clock.now = T0 + 60 * 60
    await out.run_once()
    assert len(dsns(store)) == 1  # the delay notice is sent once
    m = store.get_message(qid)
    assert m is not None and m.recipients[0].next_attempt_at == pytest.approx(
        min(T0 + 7200, m.recipients[0].next_attempt_at or 0))
    clock.now = T0 + 7200
    await out.run_once()
    assert store.get_message(qid) is None  # expired with a DSN
    [expired] = [d for _, d in dsns(store) if d["Subject"].startswith("Undelivered")]
    per_message, [block] = report(expired)
    assert per_message["Original-Envelope-Id"] == "e1"
    assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
    assert block["Final-Recipient"] == "rfc822; bob@dest.test"
    assert block["Diagnostic-Code"].startswith("X-Fermoposta; 451 4.4.1 connect to")
    assert list(expired.iter_parts())[2].get_content_type() == "text/rfc822-headers"


async def test_smtputf8_to_a_server_without_it_fails_5_6_7(tmp_path: Path,
                                                           stores: list[SQLiteStore],
                                                           clock: Clock) -> None:
    async with ScriptedSMTP(extensions=("PIPELINING", "8BITMIME")) as server:
        config, store = setup(tmp_path, stores, clock,
                              f'transport = {{ "dest.test" = "127.0.0.1:{server.port}" }}')
        submit(store, ["josé@dest.test"], smtputf8=True)
        await runner(config, store, clock).run_once()
    assert server.received == []
    [(_, dsn)] = dsns(store)
    _, [block] = report(dsn)
    assert block["Status"] == "5.6.7" and block["Action"] == "failed"
    assert block["Final-Recipient"] == "utf-8; josé@dest.test"


async def test_success_notice_when_next_hop_lacks_dsn(tmp_path: Path,
                                                      stores: list[SQLiteStore],
                                                      clock: Clock) -> None:
    async with ScriptedSMTP(extensions=("PIPELINING", "8BITMIME")) as plain, \
            ScriptedSMTP() as with_dsn:
        config, store = setup(tmp_path, stores, clock,
                              f'transport = {{ "plain.test" = "127.0.0.1:{plain.port}", '
                              f'"dsn.test" = "127.0.0.1:{with_dsn.port}" }}')
        submit(store, ["a@plain.test", "b@dsn.test"], notify="SUCCESS,FAILURE")
        await runner(config, store, clock).run_once()
    assert "NOTIFY" not in plain.received[0].rcpts[0]
    assert "NOTIFY=SUCCESS,FAILURE" in with_dsn.received[0].rcpts[0]
    [(_, dsn)] = dsns(store)  # only for the hop without DSN (RFC 3461 §4.2)
    _, [block] = report(dsn)
    assert (block["Final-Recipient"], block["Action"], block["Status"]) == (
        "rfc822; a@plain.test", "relayed", "2.0.0")


# --- routes and TLS ----------------------------------------------------------------------------


async def test_transport_map_wins_over_smarthost(tmp_path: Path, stores: list[SQLiteStore],
                                                 clock: Clock) -> None:
    async with ScriptedSMTP(name="mapped.test") as mapped:
        config, store = setup(tmp_path, stores, clock,
                              f'smarthost = "127.0.0.1:{free_port()}"\nsmarthost_tls = "none"\n'
                              f'transport = {{ "dest.test" = "127.0.0.1:{mapped.port}" }}')
        qid = submit(store, ["bob@dest.test", "x@elsewhere.test"])
        await runner(config, store, clock).run_once()
    assert [t.recipients for t in mapped.received] == [["bob@dest.test"]]
    m = store.get_message(qid)
    assert m is not None and [r.address for r in m.recipients] == ["x@elsewhere.test"]
    assert "connect to" in (m.recipients[0].last_reply or "")


async def test_smarthost_with_auth_over_starttls(tmp_path: Path, stores: list[SQLiteStore],
                                                 clock: Clock, certs: Certs) -> None:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certs.cert_file), str(certs.key_file))
    password = tmp_path / "smarthost.pw"
    password.write_text("s3cret\n")
    async with ScriptedSMTP(name="relay.test", tls=context, auth=("relayuser", "s3cret"),
                            extensions=("PIPELINING", "8BITMIME")) as relay:
        config, store = setup(tmp_path, stores, clock,
                              f'smarthost = "127.0.0.1:{relay.port}"\n'
                              f'smarthost_username = "relayuser"\n'
                              f'smarthost_password_file = "{password}"')
        qid = submit(store, ["bob@far.example", "carol@other.example"])
        await runner(config, store, clock).run_once()
    assert store.get_message(qid) is None
    [txn] = relay.received  # both domains in one transaction through the smarthost
    assert txn.tls and txn.user == "relayuser"
    assert sorted(txn.recipients) == ["bob@far.example", "carol@other.example"]


async def test_smarthost_smtp_sink_without_tls_or_auth(tmp_path: Path,
                                                       stores: list[SQLiteStore],
                                                       clock: Clock) -> None:
    with smtp_sink(tmp_path / "sink") as port:
        config, store = setup(tmp_path, stores, clock,
                              f'smarthost = "127.0.0.1:{port}"\nsmarthost_tls = "none"')
        qid = submit(store, ["bob@far.example", "carol@other.example"])
        out = runner(config, store, clock)
        await out.run_once()
        assert store.get_message(qid) is None and out.delivered == 2
    [dump] = sink_messages(tmp_path / "sink")
    assert b"Hello there." in dump


async def test_smarthost_without_starttls_is_deferred(tmp_path: Path,
                                                      stores: list[SQLiteStore],
                                                      clock: Clock) -> None:
    async with ScriptedSMTP(name="relay.test") as relay:  # no STARTTLS offered
        config, store = setup(tmp_path, stores, clock, f'smarthost = "127.0.0.1:{relay.port}"')
        qid = submit(store, ["bob@far.example"])
        await runner(config, store, clock).run_once()
    assert relay.received == []
    m = store.get_message(qid)
    assert m is not None and (m.recipients[0].last_reply or "").startswith("451 4.7.5")


async def test_require_tls_and_opportunistic_tls(tmp_path: Path, stores: list[SQLiteStore],
                                                 clock: Clock, certs: Certs) -> None:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certs.cert_file), str(certs.key_file))
    async with ScriptedSMTP() as no_tls, ScriptedSMTP(tls=context) as tls:
        config, store = setup(
            tmp_path, stores, clock,
            f'transport = {{ "secure.test" = "127.0.0.1:{no_tls.port}", '
            f'"plain.test" = "127.0.0.1:{no_tls.port}", '
            f'"tls.test" = "127.0.0.1:{tls.port}" }}\n'
            'require_tls_domains = ["secure.test"]')
        qid = submit(store, ["a@secure.test", "b@plain.test", "c@tls.test"])
        await runner(config, store, clock).run_once()
    assert [t.recipients for t in no_tls.received] == [["b@plain.test"]]
    assert [(t.recipients, t.tls) for t in tls.received] == [(["c@tls.test"], True)]
    m = store.get_message(qid)
    assert m is not None
    [kept] = m.recipients
    assert kept.address == "a@secure.test"
    assert kept.last_reply is not None and kept.last_reply.startswith("451 4.7.5 TLS is required")


# --- concurrency and claims --------------------------------------------------------------------


async def test_concurrency_limits(tmp_path: Path, stores: list[SQLiteStore],
                                  clock: Clock) -> None:
    both = Gauge()
    async with ScriptedSMTP(delay=0.15, shared=both) as one, \
            ScriptedSMTP(delay=0.15, shared=both) as two:
        config, store = setup(tmp_path, stores, clock,
                              f'transport = {{ "one.test" = "127.0.0.1:{one.port}", '
                              f'"two.test" = "127.0.0.1:{two.port}" }}\n'
                              'concurrency = 3\nconcurrency_per_destination = 2')
        for i in range(6):
            submit(store, [f"r{i}@one.test"])
            submit(store, [f"r{i}@two.test"])
        out = runner(config, store, clock)
        await out.run_once()
    assert len(one.received) == 6 and len(two.received) == 6
    assert one.gauge.peak <= 2 and two.gauge.peak <= 2
    assert both.peak == 3  # the global limit, reached
    assert out.max_connections_seen <= 3


async def test_421_too_many_connections_leaves_mail_to_the_open_one(
        tmp_path: Path, stores: list[SQLiteStore], clock: Clock) -> None:
    async with ScriptedSMTP(max_sessions=1, delay=0.02) as server:
        config, store = setup(tmp_path, stores, clock,
                              f'transport = {{ "dest.test" = "127.0.0.1:{server.port}" }}\n'
                              'concurrency_per_destination = 3')
        for i in range(6):
            submit(store, [f"r{i}@dest.test"])
        out = runner(config, store, clock)
        await out.run_once()
    assert server.refused >= 1  # the extra connections were turned away...
    assert len(server.received) == 6 and out.deferred == 0  # ...and nothing waited for it


async def test_two_runners_never_deliver_a_recipient_twice(tmp_path: Path,
                                                           stores: list[SQLiteStore],
                                                           clock: Clock) -> None:
    async with ScriptedSMTP(delay=0.01) as server:
        config, store = setup(tmp_path, stores, clock,
                              f'transport = {{ "dest.test" = "127.0.0.1:{server.port}" }}')
        for i in range(40):
            submit(store, [f"r{i}@dest.test"], data=body(f"m{i}"))
        second = SQLiteStore(config.store_path, clock=clock)  # another process, as it were
        stores.append(second)
        small = OutboundSettings(claim_batch=5)
        a = runner(config, store, clock, settings=small)
        b = runner(config, second, clock, settings=small)
        await asyncio.gather(a.run_once(), b.run_once())
    subjects = sorted(t.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0]
                      for t in server.received)
    assert subjects == sorted(f"m{i}".encode() for i in range(40))  # each exactly once
    assert a.delivered > 0 and b.delivered > 0 and a.delivered + b.delivered == 40
    assert all_messages(store) == []


async def test_start_wake_stop(tmp_path: Path, stores: list[SQLiteStore], clock: Clock) -> None:
    async with ScriptedSMTP() as server:
        config, store = setup(tmp_path, stores, clock,
                              f'transport = {{ "dest.test" = "127.0.0.1:{server.port}" }}\n'
                              'queue_interval = "1h"')
        out = runner(config, store, clock)
        await out.start()
        try:
            await asyncio.sleep(0.05)  # the first pass found nothing
            submit(store, ["bob@dest.test"])
            out.wake()
            for _ in range(100):
                if server.received:
                    break
                await asyncio.sleep(0.02)
        finally:
            await out.stop(grace=2)
    assert [t.recipients for t in server.received] == [["bob@dest.test"]]


async def test_stop_releases_claims(tmp_path: Path, stores: list[SQLiteStore],
                                    clock: Clock) -> None:
    async with ScriptedSMTP(delay=5) as server:  # slower than the grace period
        config, store = setup(tmp_path, stores, clock,
                              f'transport = {{ "dest.test" = "127.0.0.1:{server.port}" }}')
        qid = submit(store, ["bob@dest.test"])
        out = runner(config, store, clock)
        await out.start()
        for _ in range(100):
            if server.connections:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # in the middle of the transaction
        await out.stop(grace=0.1)
    m = store.get_message(qid)
    assert m is not None  # kept: the outcome is unknown
    # Claim released: another runner may take it at once.
    assert store.claim_due_outbound(clock.now, 10, "other", 60) != []


async def test_drain_dsn_is_delivered_by_the_engine(provider_factory: object,
                                                    certs: Certs) -> None:
    """A 5xx in the ODMR drain queues a DSN for a sender we do not host
    (OUTBOUND); the outbound engine delivers it."""
    from conftest import PASSWORD
    from support.customer import serve_reversed
    from support.dialog import Dialog, send_mail

    async with ScriptedSMTP(name="sender.test") as home:
        provider = await provider_factory(  # type: ignore[operator]
            extra=f'[outbound]\ntransport = {{ "sender.test" = "127.0.0.1:{home.port}" }}\n')
        code, _ = await send_mail(*provider.mx, "alice@sender.test", ["gone@example.org"],
                                  b"Subject: held\r\n\r\nfor you\r\n")
        assert code == 250
        d = await Dialog.connect(*provider.odmr)
        await d.expect(220)
        await d.cmd("EHLO customer.example.org", 250)
        await d.starttls(certs.client_context())
        await d.cmd("EHLO customer.example.org", 250)
        await d.auth_plain("acme", PASSWORD)
        await d.cmd("ATRN example.org", 250)
        await serve_reversed(d, rcpt_policy=lambda r: "550 5.1.1 no such user")
        await d.close()
        out = OutboundRunner(provider.provider.config, provider.store)
        assert await out.run_once() == 1
    [notice] = home.received
    assert notice.recipients == ["alice@sender.test"] and notice.sender == ""
    _, [block] = report(parse(notice.data))
    assert (block["Final-Recipient"], block["Status"]) == ("rfc822; gone@example.org", "5.1.1")


async def test_deliveries_are_committed_many_at_a_time_before_their_claims_go(
        tmp_path: Path, stores: list[SQLiteStore], clock: Clock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Plain deliveries (no DSN) are removed in the background, gathered:
    # thirty messages over one connection take far fewer commits than
    # thirty, and every removal is committed before the batch's claims are
    # released.
    events: list[str] = []
    with smtp_sink(tmp_path / "sink") as port:
        config, store = setup(tmp_path, stores, clock,
                              f'smarthost = "127.0.0.1:{port}"\nsmarthost_tls = "none"')
        ids = [submit(store, [f"r{i}@far.example"]) for i in range(30)]
        real_delivered, real_release = store.record_delivered, store.release_claims

        def record_delivered(recipient_ids, reply, dsn=None):  # type: ignore[no-untyped-def]
            events.append(f"delivered {len(recipient_ids)}")
            return real_delivered(recipient_ids, reply, dsn)

        def release_claims(*args):  # type: ignore[no-untyped-def]
            events.append("release")
            return real_release(*args)

        monkeypatch.setattr(store, "record_delivered", record_delivered)
        monkeypatch.setattr(store, "release_claims", release_claims)
        out = runner(config, store, clock)
        assert await out.run_once() == 30
        assert out.delivered == 30
        assert all(store.get_message(i) is None for i in ids)
    commits = [e for e in events if e.startswith("delivered")]
    assert sum(int(e.split()[1]) for e in commits) == 30
    assert len(commits) < 30 and out.delivered_commits.commits == len(commits)
    first_release = events.index("release")
    assert all(events.index(e) < first_release for e in commits)


async def test_a_failed_delivery_commit_keeps_the_recipients_for_another_go(
        tmp_path: Path, stores: list[SQLiteStore], clock: Clock,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The store refuses the background removal: the mail was delivered, but
    # the queue still holds it, released with the retry delay: it goes again
    # (a duplicate), it is never lost.
    from fermoposta.store.base import StoreError

    caplog.set_level(logging.WARNING, logger="fermoposta")
    with smtp_sink(tmp_path / "sink") as port:
        config, store = setup(tmp_path, stores, clock,
                              f'smarthost = "127.0.0.1:{port}"\nsmarthost_tls = "none"')
        qid = submit(store, ["bob@far.example"])

        def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise StoreError("disk full")

        monkeypatch.setattr(store, "record_delivered", refuse)
        out = runner(config, store, clock)
        await out.run_once()
        message = store.get_message(qid)
        assert message is not None and [r.state for r in message.recipients] == [OUTBOUND]
        assert any("cannot record 1 delivered recipients" in r.getMessage()
                   for r in caplog.records)
        monkeypatch.undo()
        clock.now += 3600  # past the retry delay
        assert await out.run_once() == 1
        assert store.get_message(qid) is None
    assert len(sink_messages(tmp_path / "sink")) == 2  # delivered twice, never lost
