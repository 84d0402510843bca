"""The bad inputs of the shared notes §5 G items 62–63, against the ODMR listener."""

from __future__ import annotations

import base64

from conftest import PASSWORD
from support.customer import serve_reversed
from support.dialog import Dialog
from test_odmr import authed, hold


async def greeted(provider) -> Dialog:
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    return d


async def test_initial_state_bad_inputs(provider):
    d = await greeted(provider)
    await d.cmd("", 500)  # empty line
    await d.cmd("EHLO", 501)  # no argument
    await d.cmd("HELO customer.example.org", 250)
    await d.cmd("AUTH CRAM-MD5", 503)  # HELO is not enough for AUTH
    await d.cmd("ehlo customer.example.org", 250)  # verbs are case-insensitive
    await d.cmd("NoOp", 250)
    await d.cmd("A" * 513, 500)  # over the 512-octet command limit
    await d.cmd("NOOP after overlong", 250)  # the session resynchronised
    await d.cmd(b"NO\x00OP", 500)  # NUL
    await d.raw(b"NOOP\n")  # bare LF line ending
    await d.expect(250)
    await d.cmd("STARTTLS now", 501)
    for verb in ("VRFY bob", "HELP", "MAIL FROM:<a@b.test>", "ETRN example.org", "TURN"):
        await d.cmd(verb, 502)
    await d.cmd("XYZZY", 500)
    await d.cmd("QUIT", 221)
    assert await d.closed()


async def test_overlong_auth_response_and_bad_base64(provider, certs):
    d = await greeted(provider)
    await d.cmd("EHLO customer.example.org", 250)
    await d.starttls(certs.client_context())
    await d.cmd("EHLO customer.example.org", 250)
    await d.cmd("AUTH PLAIN", 334)
    await d.cmd("A" * 12289, 500)  # RFC 4954 §4: 12288 octets at most
    await d.cmd("AUTH PLAIN", 334)
    await d.cmd("!!!not base64!!!", 501)
    await d.cmd("AUTH PLAIN " + base64.b64encode(b"garbage-without-nuls").decode(), 535)
    await d.auth_plain("acme", PASSWORD)
    await d.auth_plain("acme", PASSWORD, 503)  # second AUTH after success
    await d.cmd("ATRN", 453)
    await d.close()


async def test_eight_bit_bytes_in_commands(provider):
    d = await greeted(provider)
    await d.cmd(b"\xff\xfe", 500)  # not UTF-8
    await d.cmd("EHLO customer.example.org", 250)
    await d.close()


async def test_atrn_idn_forms_are_the_same_domain(provider_factory, certs):
    p = await provider_factory(customers=False)
    from conftest import add_customer

    add_customer(p.store, "buch", ("xn--bcher-kva.de",))
    await hold(p, rcpts=("info@xn--bcher-kva.de",))
    d = await Dialog.connect(*p.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    await d.starttls(certs.client_context())
    await d.cmd("EHLO customer.example.org", 250)
    await d.auth_plain("buch", PASSWORD)
    await d.cmd("ATRN xn--bcher-kva.de,bücher.de", 250)  # one domain, two spellings
    t = await serve_reversed(d)
    assert [m.recipients for m in t.messages] == [["info@xn--bcher-kva.de"]]
    await d.close()


async def test_atrn_list_edge_cases(provider, certs):
    await hold(provider)
    d = await authed(provider, certs)
    bad = [",example.org", "example.org,", "-a.org", "a_b.org", "*.example.org",
           "x" * 64 + ".org", ".".join(["abcdefghi"] * 30) + ".org",
           ",".join(f"d{i}.org" for i in range(60)), "example.org;other.test"]
    for arg in bad:
        await d.cmd(f"ATRN {arg}", 501)
    # 1,000 domains do not even fit in a command line (RFC 5321 §4.5.3.1.4).
    await d.cmd("ATRN " + ",".join(f"d{i}.org" for i in range(1000)), 500)
    await d.cmd("ATRN\texample.org", 250)  # HTAB separator tolerated
    t = await serve_reversed(d)
    assert len(t.messages) == 1
    await d.close()


async def test_atrn_duplicates_and_spaces(provider, certs):
    await hold(provider)
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org, EXAMPLE.org,example.org.", 250)
    t = await serve_reversed(d)
    assert len(t.messages) == 1
    await d.close()


async def test_auth_lines_are_512_octets_and_long_responses_go_after_334(provider, certs):
    """RFC 4954 §4: the AUTH command is subject to SMTP's line length (512),
    and a client whose initial response would not fit sends it after the
    334 instead, where a response line may be up to 12,288 octets."""
    d = await greeted(provider)
    await d.cmd("EHLO customer.example.org", 250)
    await d.starttls(certs.client_context())
    await d.cmd("EHLO customer.example.org", 250)
    await d.cmd("NOOP " + "x" * 600, 500)
    token = base64.b64encode(b"\0acme\0" + b"p" * 1500).decode()  # 2,000 octets
    lines = await d.cmd(f"AUTH PLAIN {token}", 500)
    assert lines[0].startswith("5.5.6")
    await d.cmd("AUTH PLAIN", 334)
    await d.cmd(token, 535)  # read and judged, not refused as too long
    await d.auth_plain("acme", PASSWORD)
    await d.close()


async def test_require_tls_refuses_auth_and_atrn_in_clear(provider_factory, certs):
    p = await provider_factory(extra="[odmr]\nrequire_tls = true\n")
    d = await greeted(p)
    await d.cmd("EHLO customer.example.org", 250)
    lines = await d.cmd("AUTH CRAM-MD5", 530)
    assert "STARTTLS" in lines[0]
    await d.cmd("ATRN", 530)
    await d.starttls(certs.client_context())
    await d.cmd("EHLO customer.example.org", 250)
    await d.auth_plain("acme", PASSWORD)
    await d.cmd("ATRN", 453)
    await d.close()
