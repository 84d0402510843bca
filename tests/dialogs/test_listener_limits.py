"""Connection limits per listener (issue 8, defect 7): idle connections on the
public MX never lock customers out of ODMR and submission."""

from __future__ import annotations

import asyncio

from conftest import PASSWORD
from support.dialog import Dialog


async def greet(address: tuple[str, int], code: int = 220) -> Dialog:
    d = await Dialog.connect(*address)
    lines = await d.expect(code)
    if code == 421:
        assert lines[0].startswith("4.7.0")
        assert await d.closed()
    return d


async def test_full_mx_does_not_refuse_odmr_or_submission(provider_factory):
    p = await provider_factory(
        tls=False, extra="[limits]\nmax_connections = 3\n[odmr]\nallow_plaintext_auth = true\n")
    idle = [await greet(p.mx) for _ in range(3)]  # the MX is full of idle peers
    refused = await greet(p.mx, 421)
    await refused.close()
    # ... and the customers still get in, up to their own listeners' limits.
    odmr = [await greet(p.odmr) for _ in range(3)]
    await odmr[0].cmd("EHLO customer.example.org", 250)
    await odmr[0].auth_plain("acme", PASSWORD)
    submission = await greet(p.submission)
    await submission.cmd("EHLO customer.example.org", 250)
    await submission.auth_plain("acme", PASSWORD)
    extra = await greet(p.odmr, 421)  # ODMR has its own limit too
    for d in [*idle, *odmr, submission, extra]:
        await d.close()


async def test_per_address_limit_is_per_listener(provider_factory):
    p = await provider_factory(tls=False, extra="[limits]\nmax_connections_per_ip = 2\n")
    mx = [await greet(p.mx) for _ in range(2)]
    third = await greet(p.mx, 421)
    await third.close()
    odmr = [await greet(p.odmr) for _ in range(2)]
    submission = await greet(p.submission)
    for d in [*mx, *odmr, submission]:
        await d.close()


async def test_connections_table_overrides_one_listener(provider_factory):
    p = await provider_factory(tls=False, extra=(
        "[limits]\nmax_connections = 5\n"
        "[connections]\nmx = { max_connections = 1 }\n"
        "submission = { max_connections_per_ip = 1 }\n"))
    mx = await greet(p.mx)
    again = await greet(p.mx, 421)
    await again.close()
    sub = await greet(p.submission)
    sub2 = await greet(p.submission, 421)
    await sub2.close()
    odmr = [await greet(p.odmr) for _ in range(5)]
    for d in [mx, sub, *odmr]:
        await d.close()
    await asyncio.sleep(0.1)
    # a closed connection frees its listener's slot
    mx = await greet(p.mx)
    await mx.close()
