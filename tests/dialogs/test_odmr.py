"""ODMR listener dialogs (RFC 2645): every §7 reply, AUTH misuse, the flip."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ssl

from conftest import PASSWORD
from fermoposta.smtp.sasl import ScramSha256Client, certificate_subject, normalize_subject
from fermoposta.store.base import Account, Domain
from support.customer import serve_reversed
from support.dialog import Dialog, send_mail

BODY = b"Subject: held\r\n\r\nfor you\r\n"


async def hold(provider, rcpts=("bob@example.org",), sender="alice@sender.test", body=BODY):
    code, lines = await send_mail(*provider.mx, sender, list(rcpts), body)
    assert code == 250, lines
    return lines[0].rsplit(" ", 1)[1]


async def authed(provider, certs, *, user="acme", password=PASSWORD) -> Dialog:
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    await d.starttls(certs.client_context())
    await d.cmd("EHLO customer.example.org", 250)
    await d.auth_plain(user, password)
    return d


async def test_ehlo_lists_auth_and_atrn_plaintext_mechs_only_under_tls(provider, certs):
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    lines = await d.cmd("EHLO customer.example.org", 250)
    caps = {line.split()[0]: line for line in lines[1:]}
    assert "ATRN" in caps and "STARTTLS" in caps
    assert "CRAM-MD5" in caps["AUTH"] and "SCRAM-SHA-256" in caps["AUTH"]
    assert "PLAIN" not in caps["AUTH"] and "LOGIN" not in caps["AUTH"]
    lines = await d.cmd("AUTH PLAIN " + base64.b64encode(b"\0acme\0x").decode(), 538)
    assert lines[0].startswith("5.7.11")
    await d.starttls(certs.client_context())
    lines = await d.cmd("EHLO customer.example.org", 250)
    caps = {line.split()[0]: line for line in lines[1:]}
    assert "STARTTLS" not in caps
    assert "PLAIN" in caps["AUTH"] and "LOGIN" in caps["AUTH"]
    assert "EXTERNAL" not in caps["AUTH"]  # no client certificate presented
    await d.close()


async def test_atrn_full_flow_over_tls(provider, certs):
    first = await hold(provider)
    second = await hold(provider, rcpts=("carol@example.org", "dave@other.test"))
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d)
    assert t.quit
    assert t.commands[0] == "EHLO mx.provider.test"
    assert [m.recipients for m in t.messages] == [["bob@example.org"], ["carol@example.org"]]
    assert t.messages[0].body.endswith(BODY)
    assert t.messages[0].sender == "alice@sender.test"
    # Delivered recipients left the queue; dave@other.test stays for its own customer.
    assert provider.store.get_message(first) is None
    rest = provider.store.get_message(second)
    assert rest is not None and [r.address for r in rest.recipients] == ["dave@other.test"]
    assert provider.store.held_message_ids(["example.org"]) == []
    await d.close()


async def test_atrn_replies(provider, certs):
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    await d.cmd("ATRN example.org", 530)
    await d.close()
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 453)  # authorized, nothing held
    await d.cmd("ATRN", 453)
    await hold(provider, rcpts=("x@other.test",))
    lines = await d.cmd("ATRN example.org,other.test", 450)  # other.test is not acme's
    assert "other.test" not in " ".join(lines)
    await d.cmd("ATRN other.test", 450)
    await d.cmd("ATRN example.org,,other.test", 501)
    await d.cmd("ATRN localhost", 501)
    await d.cmd("ATRN [10.0.0.1]", 501)
    for verb in ("MAIL FROM:<a@b.test>", "RCPT TO:<a@b.test>", "DATA", "TURN", "ETRN example.org",
                 "EXPN x", "BDAT 1 LAST"):
        await d.cmd(verb, 502)
    await d.cmd("WHATEVER", 500)
    # Nothing of other.test was sent to acme: the message is still held.
    assert provider.store.held_message_ids(["other.test"]) != []
    await d.cmd("QUIT", 221)
    await d.close()


async def test_atrn_list_leniency(provider, certs):
    await hold(provider)
    d = await authed(provider, certs)
    await d.cmd("ATRN  EXAMPLE.ORG.", 250)  # two spaces, upper case, trailing dot
    t = await serve_reversed(d)
    assert len(t.messages) == 1
    await d.close()


# Bytes pipelined after ATRN (503, still authenticated) and a greeting sent
# after the 250: tests/dialogs/test_memory_wire.py, where the segments are the
# test's own and neither case depends on how the kernel splits them.


async def test_cram_md5_auth(provider):
    await hold(provider)
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    challenge = base64.b64decode((await d.cmd("AUTH CRAM-MD5", 334))[0])
    digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
    await d.cmd(base64.b64encode(f"acme {digest}".encode()).decode(), 235)
    await d.cmd("AUTH CRAM-MD5", 503)  # already authenticated
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d)
    assert len(t.messages) == 1
    await d.close()


async def test_scram_sha_256_auth_with_server_signature(provider, certs):
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    client = ScramSha256Client("acme", PASSWORD)
    first = base64.b64encode(client.initial_response()).decode()
    server_first = base64.b64decode((await d.cmd(f"AUTH SCRAM-SHA-256 {first}", 334))[0])
    final = client.respond(server_first)
    server_final = base64.b64decode((await d.cmd(base64.b64encode(final).decode(), 334))[0])
    assert client.respond(server_final) == b""
    await d.cmd("", 235)
    client.verify_final(None)
    await d.cmd("ATRN", 453)
    await d.close()


async def test_login_and_auth_misuse(provider, certs):
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("AUTH CRAM-MD5", 503)  # before EHLO
    await d.cmd("EHLO customer.example.org", 250)
    await d.cmd("AUTH FOO", 504)
    await d.cmd("AUTH", 501)
    await d.cmd("AUTH LOGIN", 538)  # LOGIN in clear
    await d.starttls(certs.client_context())
    await d.cmd("EHLO customer.example.org", 250)
    await d.cmd("AUTH PLAIN not-base64!", 501)
    await d.cmd("AUTH PLAIN", 334)
    await d.cmd("*", 501)  # cancelled
    await d.cmd("AUTH EXTERNAL =", 504)  # no client certificate: not offered
    await d.cmd("AUTH LOGIN", 334)
    await d.cmd(base64.b64encode(b"acme").decode(), 334)
    await d.cmd(base64.b64encode(PASSWORD.encode()).decode(), 235)
    await d.cmd("ATRN", 453)
    await d.close()


async def test_three_failed_auths_close_with_421(provider, certs):
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    await d.starttls(certs.client_context())
    await d.cmd("EHLO customer.example.org", 250)
    await d.auth_plain("acme", "wrong", 535)
    await d.auth_plain("nobody", "wrong", 535)
    await d.auth_plain("acme", "wrong again", 421)
    assert await d.closed()


async def test_external_with_good_and_rogue_certificate(provider, certs):
    await hold(provider)
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    await d.starttls(certs.client_context(certs.client_cert_file))
    lines = await d.cmd("EHLO customer.example.org", 250)
    assert any(line.startswith("AUTH") and "EXTERNAL" in line for line in lines)
    await d.cmd("AUTH EXTERNAL =", 235)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d)
    assert len(t.messages) == 1
    await d.close()
    # A certificate from another CA does not verify: EXTERNAL is not offered
    # (or the handshake is refused outright).
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    try:
        await d.starttls(certs.client_context(certs.rogue_client_file))
        await d.send("EHLO customer.example.org")
        code, lines = await d.reply()
    except (ConnectionError, OSError):
        return  # handshake refused: just as good
    assert code == 250
    assert not any("EXTERNAL" in line for line in lines)
    await d.cmd("AUTH EXTERNAL =", 504)
    await d.close()


def _issue_client(certs, path, common_name):
    """A client certificate from the test CA with a chosen subject; (file, subject)."""
    leaf = certs.ca.issue_cert("customer@example.org", common_name=common_name,
                               organization_name="Example, Ltd", organization_unit_name="Mail")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(path))
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    return path, certificate_subject(der)


async def _external(provider, certs, client_file, code):
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    await d.starttls(certs.client_context(client_file))
    lines = await d.cmd("EHLO customer.example.org", 250)
    assert any(line.startswith("AUTH") and "EXTERNAL" in line for line in lines)
    await d.cmd("AUTH EXTERNAL =", code)
    return d


async def test_external_with_certificate_bound_by_subject(provider_factory, certs, tmp_path):
    provider = await provider_factory(customers=False)
    good, subject = _issue_client(certs, tmp_path / "good.pem", "customer.example.org")
    renewed, renewed_subject = _issue_client(certs, tmp_path / "renewed.pem",
                                             "customer.example.org")
    other, other_subject = _issue_client(certs, tmp_path / "other.pem", "mallory.example.org")
    assert subject == renewed_subject == "CN=customer.example.org,OU=Mail,O=Example\\, Ltd"
    assert other_subject != subject
    # Bound ONLY by subject (typed as an operator would), not by any fingerprint.
    provider.store.add_account(Account(
        name="acme", scram=None, cram_secret=None,
        cert_subjects=(normalize_subject("cn = customer.example.org, ou=Mail, o=Example\\, Ltd"),)))
    provider.store.add_domain(Domain(name="example.org", account="acme"))
    await hold(provider)

    d = await _external(provider, certs, good, 235)
    await d.cmd("ATRN example.org", 250)
    t = await serve_reversed(d)
    assert len(t.messages) == 1
    await d.close()

    # A renewed certificate (new key, new fingerprint, same subject) keeps working.
    d = await _external(provider, certs, renewed, 235)
    await d.cmd("ATRN example.org", 453)
    await d.close()

    # Same CA, another subject; the fixture's client (trustme's default subject) too.
    for client_file in (other, certs.client_cert_file):
        d = await _external(provider, certs, client_file, 535)
        await d.cmd("ATRN example.org", 530)
        await d.close()


async def test_starttls_injection_is_discarded(provider, certs):
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    # Pipelined plaintext after STARTTLS must never be executed inside TLS.
    await d.raw(b"STARTTLS\r\nAUTH PLAIN " + base64.b64encode(f"\0acme\0{PASSWORD}".encode())
                + b"\r\n")
    await d.expect(220)
    await d.writer.start_tls(certs.client_context(), server_hostname="localhost")
    # After TLS the session starts over: no EHLO yet, not authenticated.
    await d.cmd("ATRN", 530)
    await d.cmd("STARTTLS", 503)  # STARTTLS twice
    await d.close()


async def test_concurrent_atrn_for_one_domain_gets_451(provider, certs):
    await hold(provider)
    first = await authed(provider, certs)
    await first.cmd("ATRN example.org", 250)
    # While the first drain waits for the customer's greeting, a second session asks.
    second = await authed(provider, certs)
    lines = await second.cmd("ATRN example.org", 451)
    assert lines[0].startswith("4.3.0")
    t = await serve_reversed(first)
    assert len(t.messages) == 1
    await first.close()
    # The lease is released when the session ends: now there is no mail.
    await asyncio.sleep(0.1)
    await second.cmd("ATRN example.org", 453)
    await second.close()


async def test_min_atrn_interval(provider_factory, certs):
    p = await provider_factory(extra='[odmr]\nmin_atrn_interval = "1h"\n')
    d = await authed(p, certs)
    await d.cmd("ATRN", 453)
    lines = await d.cmd("ATRN", 450)
    assert "too frequent" in lines[0]
    await d.close()


async def test_an_atrn_that_drains_is_recorded_and_counts_for_the_interval(
        provider_factory, certs):
    p = await provider_factory(extra='[odmr]\nmin_atrn_interval = "1h"\n')
    await hold(p)
    before = p.store.get_account("acme")
    assert before is not None and before.last_atrn_at is None
    d = await authed(p, certs)
    statements: list[str] = []
    p.store._conn.set_trace_callback(statements.append)  # the SQLite writer
    await d.cmd("ATRN example.org", 250)
    p.store._conn.set_trace_callback(None)
    # The leases and the record in one transaction, which does not wait for
    # the disk (nothing was promised on it): NORMAL, then FULL again.
    assert statements.count("PRAGMA synchronous = NORMAL") == 1
    start = statements.index("PRAGMA synchronous = NORMAL")
    inside = [sql for sql in statements[start + 1:statements.index("PRAGMA synchronous = FULL",
                                                                    start)]
              if not sql.startswith("PRAGMA busy_timeout")]  # set back after a quick write
    assert inside[0] == "BEGIN IMMEDIATE" and inside[-1] == "COMMIT"
    assert any(sql.startswith("INSERT INTO leases") for sql in inside)
    assert any(sql.startswith("UPDATE accounts SET last_atrn_at") for sql in inside)
    t = await serve_reversed(d)
    assert len(t.messages) == 1
    await d.close()
    after = p.store.get_account("acme")
    assert after is not None and after.last_atrn_at is not None
    again = await authed(p, certs)
    lines = await again.cmd("ATRN example.org", 450)
    assert "too frequent" in lines[0]
    await again.close()


async def test_idle_timeout_421(provider_factory):
    p = await provider_factory(extra='[limits]\ncommand_timeout = "1s"\n')
    d = await Dialog.connect(*p.odmr)
    await d.expect(220)
    await d.expect(421, timeout=5)
    assert await d.closed()
