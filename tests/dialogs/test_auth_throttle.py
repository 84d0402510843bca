"""Failed AUTH throttled across connections (issue 8, defect 8), over real sockets.

The attacker is 127.0.0.1; the customer connects from 127.0.0.2 (loopback
only, bound as the client's source address)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time

from prometheus_client import REGISTRY

from conftest import PASSWORD
from support.dialog import Dialog

# Small delays and low limits keep these tests fast; the logic is the default's.
THROTTLE = """
[odmr]
allow_plaintext_auth = true
[auth_throttle]
failure_delay = "0.05s"
max_delay = "0.2s"
max_failures_per_ip = 6
max_failures_per_account = 8
window = "10m"
lockout = "10m"
"""


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def connect(address: tuple[str, int], source: str = "127.0.0.1") -> Dialog:
    reader, writer = await asyncio.open_connection(*address, local_addr=(source, 0))
    d = Dialog(reader, writer)
    await d.expect(220)
    await d.cmd("EHLO client.test", 250)
    return d


async def cram_md5(d: Dialog, user: str, password: str, code: int) -> list[str]:
    lines = await d.cmd("AUTH CRAM-MD5", 334)
    challenge = base64.b64decode(lines[0])
    digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
    return await d.cmd(base64.b64encode(f"{user} {digest}".encode()).decode(), code)


async def test_guessing_across_reconnects_is_locked_out_and_the_customer_still_logs_in(
        provider_factory, caplog):
    p = await provider_factory(tls=False, extra=THROTTLE)
    locked_before = sample("fermoposta_auth_lockouts_total", kind="address")
    refused_before = sample("fermoposta_auth_throttled_total", kind="address")
    caplog.set_level(logging.INFO, logger="fermoposta")
    started = time.monotonic()
    replies: list[int] = []
    # The attacker reconnects after each max_auth_failures (3) and keeps guessing.
    for _ in range(4):
        d = await connect(p.odmr)
        for _ in range(3):
            await d.send("AUTH CRAM-MD5")
            code, lines = await d.reply()
            if code == 334:
                challenge = base64.b64decode(lines[0])
                digest = hmac.new(b"guess", challenge, hashlib.md5).hexdigest()
                await d.send(base64.b64encode(f"acme {digest}".encode()).decode())
                code, lines = await d.reply()
            replies.append(code)
            if code == 421:
                assert lines[0].startswith("4.7.0")
                break
        assert await d.closed()
        await d.close()
    # 535, 535, 421 (per connection), 535, 535, 421 (the 6th: address locked out),
    # then every AUTH from the address at once 421, before any exchange.
    assert replies == [535, 535, 421, 535, 535, 421, 421, 421]
    assert time.monotonic() - started < 5.0
    assert sample("fermoposta_auth_lockouts_total", kind="address") == locked_before + 1
    assert sample("fermoposta_auth_throttled_total", kind="address") == refused_before + 2
    assert "AUTH throttle: locking out [127.0.0.1]" in caplog.text
    assert "guess" not in caplog.text  # no secret in the log
    # ... on submission too (one throttle for both), before any credential:
    s = await connect(p.submission)
    await s.cmd("AUTH PLAIN " + base64.b64encode(f"\0acme\0{PASSWORD}".encode()).decode(), 421)
    assert await s.closed()
    await s.close()
    # The customer, from another address, logs in with the right password.
    c = await connect(p.odmr, "127.0.0.2")
    await cram_md5(c, "acme", PASSWORD, 235)
    await c.cmd("QUIT", 221)
    await c.close()
    c = await connect(p.submission, "127.0.0.2")
    await c.auth_plain("acme", PASSWORD, 235)
    await c.cmd("QUIT", 221)
    await c.close()


async def test_failed_auth_replies_are_delayed_more_and_more(provider_factory):
    extra = THROTTLE.replace('failure_delay = "0.05s"', 'failure_delay = "0.2s"')
    p = await provider_factory(tls=False, extra=extra.replace('max_delay = "0.2s"',
                                                              'max_delay = "0.8s"'))
    d = await connect(p.odmr)
    took = []
    for _ in range(2):
        started = time.monotonic()
        await d.auth_plain("acme", "wrong", 535)
        took.append(time.monotonic() - started)
    assert 0.2 <= took[0] < 0.6 and 0.4 <= took[1] < 1.0, took
    # a right password is never delayed
    started = time.monotonic()
    await d.auth_plain("acme", PASSWORD, 235)
    assert time.monotonic() - started < 0.3
    await d.close()


async def test_locked_account_refuses_guessers_but_not_the_customer(provider_factory, caplog):
    # Per address off: only the account's lockout is at work here.
    extra = THROTTLE.replace("max_failures_per_ip = 6", "max_failures_per_ip = 0")
    p = await provider_factory(tls=False, extra=extra)
    before = sample("fermoposta_auth_lockouts_total", kind="account")
    refused_before = sample("fermoposta_auth_throttled_total", kind="account")
    caplog.set_level(logging.INFO, logger="fermoposta")
    # 8 failures for acme from 127.0.0.1 lock the account (the 8th still gets 535).
    for codes in ((535, 535, 421), (535, 535, 421), (535, 535)):
        d = await connect(p.odmr)
        for code in codes:
            await d.auth_plain("acme", "wrong", code)
        await d.close()
    assert sample("fermoposta_auth_lockouts_total", kind="account") == before + 1
    assert "AUTH throttle: account acme locked" in caplog.text
    # From the guessing address even the right password gets 454 (no oracle) ...
    d = await connect(p.odmr)
    lines = await d.cmd("AUTH PLAIN " + base64.b64encode(
        f"\0acme\0{PASSWORD}".encode()).decode(), 454)
    assert lines[0].startswith("4.7.0")
    await cram_md5(d, "acme", PASSWORD, 454)
    # ... another account from the same address is not concerned ...
    await d.auth_plain("other", PASSWORD, 235)
    await d.close()
    assert sample("fermoposta_auth_throttled_total", kind="account") == refused_before + 2
    # ... and the customer's address, clean, logs in.
    c = await connect(p.odmr, "127.0.0.2")
    await c.auth_plain("acme", PASSWORD, 235)
    await c.close()


async def test_unknown_users_count_for_the_address_only(provider_factory):
    p = await provider_factory(tls=False, extra=THROTTLE)
    for _ in range(2):
        d = await connect(p.submission)
        for code in (535, 535, 421):
            await d.auth_plain("nosuchuser", "x", code)
        await d.close()
    # the 6th failure locked 127.0.0.1 out; no account entry was made
    assert p.provider.auth_throttle.sizes()[:2] == (1, 0)
    d = await connect(p.submission)
    await d.auth_plain("acme", PASSWORD, 421)
    await d.close()


async def test_reload_changes_the_settings_and_keeps_the_counts(provider_factory):
    from fermoposta.config import load_provider_config

    p = await provider_factory(tls=False, extra=THROTTLE)
    d = await connect(p.odmr)
    for code in (535, 535):
        await d.auth_plain("acme", "wrong", code)
    text = p.config_path.read_text().replace("max_failures_per_ip = 6", "max_failures_per_ip = 3")
    text += "\n[connections]\nodmr = { max_connections = 1 }\n"
    p.config_path.write_text(text)
    assert p.provider.reload(load_provider_config(p.config_path)) == []
    assert p.provider.auth_throttle.settings.max_failures_per_ip == 3
    await d.auth_plain("acme", "wrong", 421)  # the third failure now locks the address out
    assert await d.closed()
    await d.close()
    await asyncio.sleep(0.1)
    first = await connect(p.odmr, "127.0.0.2")
    second = await Dialog.connect(*p.odmr)
    await second.expect(421)  # the new per-listener limit applies to new connections
    await first.auth_plain("acme", PASSWORD, 235)
    await first.close()
    await second.close()


async def test_guesses_in_parallel_cannot_outrun_the_count(provider_factory):
    # Twelve connections from one address answer their CRAM-MD5 challenge
    # at the same moment: only as many checks run as the address has
    # failures left (6); the others get 454 unchecked, so the lockout comes
    # after 6 guesses, not 12.
    p = await provider_factory(tls=False, extra=THROTTLE)
    dialogs = await asyncio.gather(*(connect(p.odmr, "127.0.0.3") for _ in range(12)))
    challenges = []
    for d in dialogs:
        await d.send("AUTH CRAM-MD5")
        code, lines = await d.reply()
        assert code == 334  # waiting for the client holds no check slot
        challenges.append(base64.b64decode(lines[0]))
    for d, challenge in zip(dialogs, challenges, strict=True):
        digest = hmac.new(b"guess", challenge, hashlib.md5).hexdigest()
        await d.send(base64.b64encode(f"acme {digest}".encode()).decode())
    codes = [(await d.reply())[0] for d in dialogs]
    checked = [c for c in codes if c in (535, 421)]
    assert len(checked) <= 6 and codes.count(454) >= 6, codes
    assert set(codes) <= {535, 421, 454}, codes
    late = await connect(p.odmr, "127.0.0.3")
    await late.send("AUTH CRAM-MD5")
    assert (await late.reply())[0] in (421, 454)  # no more checks for this address
    for d in [*dialogs, late]:
        await d.close()


async def test_idle_auth_exchanges_do_not_keep_others_from_logging_in(provider_factory):
    # Ten connections from one address sit at the 334 of AUTH LOGIN: the
    # customer behind the same address still logs in.
    p = await provider_factory(tls=False, extra=THROTTLE)
    idle = await asyncio.gather(*(connect(p.odmr, "127.0.0.4") for _ in range(10)))
    for d in idle:
        await d.cmd("AUTH LOGIN", 334)
    customer = await connect(p.odmr, "127.0.0.4")
    await cram_md5(customer, "acme", PASSWORD, 235)
    for d in [*idle, customer]:
        await d.close()
