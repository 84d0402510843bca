"""SCRAM-SHA-256 failures name the account in the provider's log, as CRAM-MD5's
and PLAIN's do (``wrong CRAM-MD5 digest for 'acme'``), so an operator finds an
account's failed logins whatever mechanism its client uses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from dataclasses import replace

import pytest

from conftest import PASSWORD, RunningProvider, add_customer
from fermoposta.smtp.sasl import ScramSha256Client
from support.dialog import Dialog


def auth_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split(": ", 1)[1] for r in caplog.records
            if r.name.startswith("fermoposta") and " failed from [" in r.getMessage()]


async def connect(provider: RunningProvider) -> Dialog:
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    return d


async def scram(d: Dialog, user: str, password: str) -> None:
    """A SCRAM-SHA-256 exchange that the server ends with 535."""
    client = ScramSha256Client(user, password)
    first = base64.b64encode(client.initial_response()).decode()
    server_first = base64.b64decode((await d.cmd(f"AUTH SCRAM-SHA-256 {first}", 334))[0])
    await d.cmd(base64.b64encode(client.respond(server_first)).decode(), 535)


async def test_scram_wrong_password_names_the_account(provider: RunningProvider,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fermoposta")
    d = await connect(provider)
    await scram(d, "acme", "not the password")
    # The CRAM-MD5 line beside it, for comparison.
    challenge = base64.b64decode((await d.cmd("AUTH CRAM-MD5", 334))[0])
    digest = hmac.new(b"wrong", challenge, hashlib.md5).hexdigest()
    await d.cmd(base64.b64encode(f"acme {digest}".encode()).decode(), 535)
    await d.close()
    assert auth_failures(caplog) == [
        "AUTH SCRAM-SHA-256 failed from [127.0.0.1]: wrong SCRAM-SHA-256 proof for 'acme'",
        "AUTH CRAM-MD5 failed from [127.0.0.1]: wrong CRAM-MD5 digest for 'acme'",
    ]


async def test_scram_unknown_user_and_no_verifier(provider: RunningProvider,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    add_customer(provider.store, "plain", ())  # then its SCRAM verifier is taken away
    account = provider.store.get_account("plain")
    assert account is not None
    provider.store.update_account(replace(account, scram=None))
    caplog.set_level(logging.INFO, logger="fermoposta")
    d = await connect(provider)
    await scram(d, "nobody", PASSWORD)
    await scram(d, "plain", PASSWORD)
    await d.close()
    assert auth_failures(caplog) == [
        "AUTH SCRAM-SHA-256 failed from [127.0.0.1]: unknown user: 'nobody'",
        "AUTH SCRAM-SHA-256 failed from [127.0.0.1]: account has no verifier: 'plain'",
    ]


async def test_scram_bad_final_message_names_the_account(
        provider: RunningProvider, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fermoposta")
    d = await connect(provider)
    client = ScramSha256Client("acme", PASSWORD)
    first = base64.b64encode(client.initial_response()).decode()
    await d.cmd(f"AUTH SCRAM-SHA-256 {first}", 334)
    # A client-final whose nonce is not the server's.
    await d.cmd(base64.b64encode(b"c=biws,r=forged,p=AAAA").decode(), 535)
    await d.close()
    [line] = auth_failures(caplog)
    assert line.startswith(
        "AUTH SCRAM-SHA-256 failed from [127.0.0.1]: SCRAM client-final refused for 'acme': ")
