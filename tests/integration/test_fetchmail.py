"""fetchmail (the real ODMR client shipped by Debian) against our provider.

fetchmail authenticates with CRAM-MD5 only and, after ATRN, pipes the
connection to a local SMTP server: here Postfix's smtp-sink, which writes each
message it accepts to a file we read back.
"""

from __future__ import annotations

from pathlib import Path

from conftest import PASSWORD
from peers import run_fetchmail, sink_messages, smtp_sink
from support.dialog import send_mail

BODY = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.org\r\nSubject: via fetchmail\r\n"
        b"\r\nHello Bob,\r\n.leading dot line\r\nbye\r\n")


def rcfile(directory: Path, odmr_port: int, sink_port: int, password: str = PASSWORD,
           domains: str = "example.org") -> Path:
    path = directory / "fetchmailrc"
    path.write_text(
        f'poll 127.0.0.1 protocol ODMR service {odmr_port}\n'
        f'  user "acme" password "{password}" fetchdomains {domains}\n'
        f'  smtphost 127.0.0.1/{sink_port}\n'
    )
    path.chmod(0o600)
    return path


async def test_fetchmail_collects_held_mail(provider, tmp_path):
    for rcpt in ("bob@example.org", "carol@example.org"):
        code, _ = await send_mail(*provider.mx, "alice@sender.test", [rcpt], BODY)
        assert code == 250
    with smtp_sink(tmp_path / "sink") as sink_port:
        rc, out = await run_fetchmail(rcfile(tmp_path, provider.odmr[1], sink_port))
    assert rc == 0, out
    messages = sink_messages(tmp_path / "sink")
    assert len(messages) == 2, out
    for raw in messages:
        # smtp-sink writes the envelope as headers before the message
        assert b"Subject: via fetchmail" in raw
        assert b"\n.leading dot line" in raw.replace(b"\r\n", b"\n")
        assert b"Received: from client.test ([127.0.0.1])" in raw
    assert provider.store.held_message_ids(["example.org"]) == []


async def test_fetchmail_wrong_password_fails(provider, tmp_path):
    code, _ = await send_mail(*provider.mx, "alice@sender.test", ["bob@example.org"], BODY)
    assert code == 250
    with smtp_sink(tmp_path / "sink") as sink_port:
        rc, out = await run_fetchmail(rcfile(tmp_path, provider.odmr[1], sink_port,
                                             password="wrong"))
    assert rc not in (0, 1), out  # fetchmail 6.4.37 exits 128 after a 535
    assert sink_messages(tmp_path / "sink") == []
    assert len(provider.store.held_message_ids(["example.org"])) == 1


async def test_fetchmail_no_mail_gets_453(provider, tmp_path):
    with smtp_sink(tmp_path / "sink") as sink_port:
        rc, out = await run_fetchmail(rcfile(tmp_path, provider.odmr[1], sink_port))
    # fetchmail 6.4 reports "453 You have no mail" and ends normally (status 0).
    assert rc == 0, out
    assert "ODMR< 453 4.2.0 You have no mail" in out
    assert sink_messages(tmp_path / "sink") == []


async def test_fetchmail_unauthorized_domain_gets_450(provider, tmp_path):
    code, _ = await send_mail(*provider.mx, "alice@sender.test", ["x@other.test"], BODY)
    assert code == 250
    with smtp_sink(tmp_path / "sink") as sink_port:
        rc, out = await run_fetchmail(rcfile(tmp_path, provider.odmr[1], sink_port,
                                             domains="example.org,other.test"))
    assert rc not in (0, 1), out
    assert "ATRN request refused" in out
    assert sink_messages(tmp_path / "sink") == []
    assert len(provider.store.held_message_ids(["other.test"])) == 1
