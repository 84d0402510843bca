"""Why an ATRN got 450: the client hears only RFC 2645's reply, the provider's
log says which domain and why (not hosted, another account's, no domains)."""

from __future__ import annotations

import logging

import pytest

from conftest import PASSWORD, add_customer
from fermoposta.store.base import Domain
from support.dialog import Dialog


async def authed(provider, certs, *, user="acme") -> Dialog:
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    await d.starttls(certs.client_context())
    await d.cmd("EHLO customer.example.org", 250)
    await d.auth_plain(user, PASSWORD)
    return d


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("fermoposta") and "refused" in r.getMessage()]


async def test_refused_atrn_logs_the_reason(provider, certs, caplog):
    caplog.set_level(logging.INFO, logger="fermoposta")
    d = await authed(provider, certs)
    lines = await d.cmd("ATRN example.org,other.test,nowhere.test", 450)
    # The reply names no domain (RFC 2645 §5.2.1): the log does.
    assert "other.test" not in " ".join(lines) and "nowhere.test" not in " ".join(lines)
    [line] = refusals(caplog)
    assert "ATRN example.org,other.test,nowhere.test by acme refused: 450" in line
    assert line.endswith("(other.test: owned by account other; nowhere.test: not hosted)")
    assert "example.org:" not in line  # acme's own domain is not a reason

    caplog.clear()
    await d.cmd("ATRN nowhere.test", 450)
    [line] = refusals(caplog)
    assert " by acme refused: 450" in line and line.endswith("(nowhere.test: not hosted)")
    await d.cmd("QUIT", 221)
    await d.close()


async def test_account_without_domains_is_logged_as_such(provider, certs, caplog):
    add_customer(provider.store, "bare", ())
    caplog.set_level(logging.INFO, logger="fermoposta")
    d = await authed(provider, certs, user="bare")
    for command in ("ATRN", "ATRN example.org"):
        caplog.clear()
        await d.cmd(command, 450)
        [line] = refusals(caplog)
        assert " by bare refused: 450" in line
        assert line.endswith("(the account has no domains "
                             "(fermoposta domain add DOMAIN --account bare))")
    # Once it has a domain, a request for it is no longer refused.
    provider.store.add_domain(Domain(name="bare.test", account="bare"))
    caplog.clear()
    await d.cmd("ATRN bare.test", 453)
    assert [line for line in refusals(caplog) if "refused: 450" in line] == []
    await d.cmd("QUIT", 221)
    await d.close()


async def test_too_frequent_keeps_its_own_reason(provider_factory, certs, caplog):
    provider = await provider_factory(extra="[odmr]\nmin_atrn_interval = \"1h\"\n")
    caplog.set_level(logging.INFO, logger="fermoposta")
    d = await authed(provider, certs)
    await d.cmd("ATRN example.org", 453)  # recorded
    caplog.clear()
    await d.cmd("ATRN other.test", 450)  # not acme's: said as such, not "too frequent"
    [line] = refusals(caplog)
    assert line.endswith("(other.test: owned by account other)")
    caplog.clear()
    await d.cmd("ATRN example.org", 450)
    [line] = refusals(caplog)
    assert "too frequent" in line and "owned by" not in line and "not hosted" not in line
    await d.close()
