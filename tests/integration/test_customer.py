"""The customer against this project's provider over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import mailbox
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PASSWORD, add_customer
from fermoposta.customer.config import load_customer_config
from fermoposta.customer.pull import check, pull_once
from support.customer_config import write_customer_config
from support.dialog import send_mail

BODY = b"From: alice@sender.test\r\nSubject: for the site\r\n\r\nhello site\r\n"


async def hold(provider, rcpts=("bob@example.org",)):
    code, lines = await send_mail(*provider.mx, "alice@sender.test", list(rcpts), BODY)
    assert code == 250, lines
    return lines[0].rsplit(" ", 1)[1]


def maildir_messages(root: Path, domain: str, local: str) -> list[bytes]:
    path = root / "mail" / domain / local / "Maildir"
    if not path.exists():
        return []
    return [m.as_bytes() for m in mailbox.Maildir(str(path), create=False)]


def config(tmp_path, provider, certs, **kw):
    kw.setdefault("password", PASSWORD)
    kw.setdefault("ca_file", certs.ca_file)
    return load_customer_config(write_customer_config(tmp_path / "site", port=provider.odmr[1],
                                                      **kw))


@pytest.mark.parametrize("mechanisms", [(), ("SCRAM-SHA-256",), ("PLAIN",), ("CRAM-MD5",),
                                        ("LOGIN",)])
async def test_pull_over_starttls_each_mechanism(provider, certs, tmp_path, mechanisms):
    queue_id = await hold(provider, ("bob@example.org", "carol@example.org"))
    cfg = config(tmp_path, provider, certs, mechanisms=mechanisms)
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.error is None, summary.lines()
    assert summary.exit_code == 0
    assert len(summary.received) == 1
    assert summary.received[0].provider_queue_id == queue_id
    for local in ("bob", "carol"):
        messages = maildir_messages(tmp_path / "site", "example.org", local)
        assert len(messages) == 1
        assert messages[0].endswith(b"hello site\n") or messages[0].endswith(b"hello site\r\n")
        assert b"by mail.example.org (fermoposta) with ESMTPS" in messages[0]
    assert provider.store.held_message_ids(["example.org"]) == []
    text = "\n".join(summary.lines())
    assert queue_id in text and "1 message(s) received" in text


async def test_pull_with_external_client_certificate(provider, certs, tmp_path):
    queue_id = await hold(provider)  # one recipient: the Received: header has "for <...>"
    cfg = config(tmp_path, provider, certs, username=None, password=None,
                 client_cert=certs.client_cert_file)
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.error is None, summary.lines()
    assert summary.received[0].provider_queue_id == queue_id
    assert len(maildir_messages(tmp_path / "site", "example.org", "bob")) == 1


async def test_bare_atrn_and_many_pull_blocks(provider, certs, tmp_path):
    add_customer(provider.store, "multi", ("a.test", "b.test", "c.test"))
    await hold(provider, ("x@a.test",))
    await hold(provider, ("y@b.test", "z@c.test"))
    site = tmp_path / "site"
    pulls = [
        {"name": "first", "domains": ["a.test"],
         "delivery": {"type": "maildir", "path": str(site / "one/{domain}/{local}/Maildir"),
                      "create": True}},
        {"name": "rest", "domains": [],
         "delivery": {"type": "maildir", "path": str(site / "two/{domain}/{local}/Maildir"),
                      "create": True}},
    ]
    cfg = config(tmp_path, provider, certs, username="multi", pulls=pulls,
                 site_domains=("a.test", "b.test", "c.test"))
    first = await pull_once(cfg, cfg.pulls[0])
    assert first.error is None and len(first.received) == 1
    rest = await pull_once(cfg, cfg.pulls[1])
    assert rest.error is None and len(rest.received) == 1
    assert (site / "one/a.test/x/Maildir").is_dir()
    assert (site / "two/b.test/y/Maildir").is_dir() and (site / "two/c.test/z/Maildir").is_dir()
    again = await pull_once(cfg, cfg.pulls[1])
    assert again.error is None and not again.had_mail
    assert again.lines()[0].endswith("no mail")


async def test_check_reports_and_does_not_atrn(provider, certs, tmp_path):
    qid = await hold(provider)
    cfg = config(tmp_path, provider, certs)
    code, lines = await check(cfg)
    assert code == 0, lines
    text = "\n".join(lines)
    assert "TLS: TLSv1" in text and "certificate verified for localhost" in text
    assert "AUTH SCRAM-SHA-256 as acme: OK (server signature verified)" in text
    assert provider.store.held_message_ids(["example.org"]) == [qid]


# --- failure paths: exact exit codes, nothing lost ---------------------------------------

async def expect_failure(cfg, code, fragment, provider=None, held=None):
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.exit_code == code, summary.lines()
    assert fragment in str(summary.error)
    if provider is not None:
        assert provider.store.held_message_ids(["example.org"]) == held


async def test_provider_unreachable(certs, tmp_path):
    from peers import free_port

    cfg = load_customer_config(write_customer_config(tmp_path, port=free_port(),
                                                     password=PASSWORD, ca_file=certs.ca_file))
    await expect_failure(cfg, 69, "cannot connect")


async def test_tls_not_offered(provider_factory, certs, tmp_path):
    p = await provider_factory(tls=False)
    qid = await hold(p)
    cfg = config(tmp_path, p, certs)
    await expect_failure(cfg, 74, "does not offer STARTTLS", p, [qid])


async def test_certificate_name_mismatch(provider, certs, tmp_path):
    qid = await hold(provider)
    cfg = config(tmp_path, provider, certs, server_name="mx.wrong.test")
    await expect_failure(cfg, 74, "certificate", provider, [qid])


async def test_untrusted_ca_and_pin_mismatch(provider, certs, tmp_path):
    cfg = config(tmp_path, provider, certs, ca_file=None)  # system store does not know trustme
    await expect_failure(cfg, 74, "certificate")
    cfg = config(tmp_path, provider, certs, extra_provider='pin_sha256 = "' + "00" * 32 + '"')
    await expect_failure(cfg, 74, "pin mismatch")


async def test_wrong_password(provider, certs, tmp_path):
    qid = await hold(provider)
    cfg = config(tmp_path, provider, certs, password="not the password")
    await expect_failure(cfg, 77, "refused", provider, [qid])


async def test_plaintext_never_uses_plain(provider, certs, tmp_path):
    # tls = "none" and only PLAIN allowed: refuse to send a password in clear.
    cfg = config(tmp_path, provider, certs, tls="none", mechanisms=("PLAIN", "LOGIN"))
    await expect_failure(cfg, 77, "no usable AUTH mechanism")


async def test_provider_without_atrn(provider, certs, tmp_path):
    # The MX port speaks SMTP with STARTTLS but has no ATRN.
    cfg = load_customer_config(write_customer_config(tmp_path, port=provider.mx[1],
                                                     password=PASSWORD, ca_file=certs.ca_file))
    await expect_failure(cfg, 76, "does not support ATRN")


async def test_atrn_450_for_foreign_domain(provider, certs, tmp_path):
    await hold(provider, ("x@other.test",))
    cfg = config(tmp_path, provider, certs, pulls=[{"domains": ["example.org", "other.test"]}])
    await expect_failure(cfg, 67, "refused")
    assert provider.store.held_message_ids(["other.test"]) != []


async def test_atrn_451_domain_busy(provider, certs, tmp_path):
    qid = await hold(provider)
    assert provider.store.acquire_leases(["example.org"], "someone-else", 60)
    cfg = config(tmp_path, provider, certs)
    await expect_failure(cfg, 75, "451", provider, [qid])


async def test_atrn_453_no_mail_is_success(provider, certs, tmp_path):
    cfg = config(tmp_path, provider, certs)
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.exit_code == 0 and not summary.had_mail


async def test_local_target_down_keeps_mail_held(provider, certs, tmp_path):
    qid = await hold(provider)
    pulls = [{"domains": ["example.org"],
              "delivery": {"type": "lmtp", "address": str(tmp_path / "no-such-socket")}}]
    cfg = config(tmp_path, provider, certs, pulls=pulls)
    summary = await pull_once(cfg, cfg.pulls[0])
    # The session worked but delivery was deferred: 75 tells cron, and the
    # mail is still held at the provider.
    assert summary.error is None and summary.exit_code == 75
    assert summary.received == [] and summary.deferred == 1 and summary.refused == 0
    assert "1 deferred (still held at the provider)" in summary.lines()[0]
    message = provider.store.get_message(qid)
    assert message is not None and message.recipients[0].attempts == 1


async def test_many_refused_recipients_do_not_end_the_session(provider, certs, tmp_path):
    """25 unknown users in one message, then a normal one: the refusals are
    not 'errors' of the provider, so the session goes on and delivers both."""
    (tmp_path / "site/mail/example.org/bob/Maildir").mkdir(parents=True)
    first = await hold(provider, (*(f"ghost{i}@example.org" for i in range(25)),
                                  "bob@example.org"))
    second = await hold(provider, ("bob@example.org",))
    pulls = [{"domains": ["example.org"],
              "delivery": {"type": "maildir",
                           "path": str(tmp_path / "site/mail/{domain}/{local}/Maildir"),
                           "create": False}}]
    cfg = config(tmp_path, provider, certs, pulls=pulls)
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.exit_code == 0, summary.lines()
    assert summary.messages == 2 and summary.refused == 25
    assert len(maildir_messages(tmp_path / "site", "example.org", "bob")) == 2
    assert provider.store.get_message(first) is None
    assert provider.store.get_message(second) is None


async def test_unknown_user_bounces_at_the_provider(provider, certs, tmp_path):
    await hold(provider, ("nobody@example.org",))
    pulls = [{"domains": ["example.org"],
              "delivery": {"type": "maildir",
                           "path": str(tmp_path / "site/mail/{domain}/{local}/Maildir"),
                           "create": False}}]
    cfg = config(tmp_path, provider, certs, pulls=pulls)
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.exit_code == 0 and summary.received == []
    # 550 5.1.1 at RCPT: the provider removed the recipient and queued a DSN.
    assert provider.store.held_message_ids(["example.org"]) == []


async def test_second_pull_while_one_runs(provider, certs, tmp_path):
    from fermoposta.customer.pull import pull_lock

    cfg = config(tmp_path, provider, certs)
    async with pull_lock(cfg.data_dir / f"pull-{cfg.pulls[0].name}.lock", wait=False):
        summary = await pull_once(cfg, cfg.pulls[0])
        assert summary.exit_code == 73
        waiting = asyncio.create_task(pull_once(cfg, cfg.pulls[0], wait=True))
        await asyncio.sleep(0.3)
        assert not waiting.done()
    summary = await asyncio.wait_for(waiting, 10)
    assert summary.exit_code == 0


def test_cli_pull_exit_codes_and_summary(tmp_path, certs):
    """`fermoposta customer pull -c FILE` as a user runs it (no provider: exit 69)."""
    from peers import free_port

    path = write_customer_config(tmp_path, port=free_port(), password=PASSWORD,
                                 ca_file=certs.ca_file)
    result = subprocess.run([sys.executable, "-m", "fermoposta", "customer", "pull", "-c",
                             str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 69, result.stderr
    assert "failed (connection, exit 69)" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('hostname = "x"\n')
    result = subprocess.run([sys.executable, "-m", "fermoposta", "customer", "check", "-c",
                             str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert "bad.toml" in result.stderr


def test_cli_log_format_json(tmp_path, certs):
    """`--log-format json`: one JSON object a line on stderr, for log pipelines."""
    import json

    from peers import free_port

    path = write_customer_config(tmp_path, port=free_port(), password=PASSWORD,
                                 ca_file=certs.ca_file)
    result = subprocess.run([sys.executable, "-m", "fermoposta", "--log-format", "json",
                             "customer", "pull", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 69
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert lines and all({"time", "level", "component", "message"} <= set(x) for x in lines)
    assert any(x.get("status") == "connection" for x in lines)


async def test_debug_trace_shows_the_atrn_line(provider, certs, tmp_path, caplog):
    """`fermoposta customer -v` traces every command it sends, ATRN included."""
    import logging

    await hold(provider)
    cfg = config(tmp_path, provider, certs)
    caplog.set_level(logging.DEBUG)
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.exit_code == 0, summary.lines()
    sent = [r.getMessage() for r in caplog.records if "] > " in r.getMessage()]
    assert any(line.endswith("> ATRN example.org") for line in sent), sent
    assert any(line.endswith("> EHLO mail.example.org") for line in sent), sent


async def test_pull_uses_bdat_in_flight_and_data_for_a_big_body(provider, certs, tmp_path,
                                                                monkeypatch, caplog):
    """The drain and the customer together (RFC 3030): small messages go as
    BDAT transactions back to back, a body over the read-ahead limit with
    DATA, and every Maildir file holds its message as sent (a line-leading
    dot included: BDAT has no stuffing, DATA un-stuffs)."""
    from fermoposta.provider import drain as drain_module

    monkeypatch.setattr(drain_module, "PREFETCH_BYTES", 2048)
    caplog.set_level("DEBUG", logger="fermoposta.smtp")
    bodies = [b"Subject: small %d\r\n\r\n.a dotted line\r\nend\r\n" % i for i in range(5)]
    bodies.insert(2, b"Subject: big\r\n\r\n" + b"..twice dotted\r\n" + (b"z" * 70 + b"\r\n") * 60)
    for body in bodies:
        code, lines = await send_mail(*provider.mx, "alice@sender.test", ["bob@example.org"],
                                      body)
        assert code == 250, lines
    cfg = config(tmp_path, provider, certs)
    summary = await pull_once(cfg, cfg.pulls[0])
    assert summary.error is None, summary.lines()
    assert len(summary.received) == len(bodies)
    assert provider.store.held_message_ids(["example.org"]) == []
    stored = maildir_messages(tmp_path / "site", "example.org", "bob")
    expected = sorted(b.replace(b"\r\n", b"\n") for b in bodies)
    assert sorted(m[m.index(b"Subject: "):] for m in stored) == expected
    sent = [r.getMessage() for r in caplog.records if "> BDAT " in r.getMessage()
            or "> DATA" in r.getMessage()]
    assert sum("BDAT" in s for s in sent) == 5 and sum("DATA" in s for s in sent) == 1, sent
