"""A customer whose TLS handshake fails: the provider's log says why (OpenSSL's
reason, a closed connection, a timeout), on STARTTLS and on implicit TLS,
never an empty reason."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from conftest import Certs, RunningProvider
from fermoposta.net.connection import tls_failure_reason
from support.dialog import Dialog


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("fermoposta") and "TLS handshake failed" in r.getMessage()]


async def wait_for_failure(caplog: pytest.LogCaptureFixture) -> str:
    """The one handshake failure logged (the server logs it a moment after the client gives up)."""
    for _ in range(200):
        if failures(caplog):
            break
        await asyncio.sleep(0.025)
    [line] = failures(caplog)
    return line


async def after_starttls(provider: RunningProvider) -> Dialog:
    d = await Dialog.connect(*provider.odmr)
    await d.expect(220)
    await d.cmd("EHLO customer.example.org", 250)
    await d.cmd("STARTTLS", 220)
    return d


def blocking_client(address: tuple[str, int], context: ssl.SSLContext,
                    starttls: bool) -> None:
    """Connect, (STARTTLS,) and try the handshake with the blocking ssl module,
    which sends its alert before it gives up (asyncio's client just drops the
    connection, so the server would only see it closed)."""
    with socket.create_connection(address, timeout=10) as sock:
        if starttls:
            stream = sock.makefile("rwb", buffering=0)
            for command in (None, b"EHLO customer.example.org\r\n", b"STARTTLS\r\n"):
                if command is not None:
                    stream.write(command)
                while True:  # the last line of the reply
                    line = stream.readline()
                    if line[3:4] != b"-":
                        break
        with contextlib.suppress(ssl.SSLError, OSError):
            context.wrap_socket(sock, server_hostname="localhost").close()


def old_client(certs: Certs) -> ssl.SSLContext:
    """A client that speaks TLS 1.1 at most (the provider wants 1.2 or later)."""
    ctx = certs.client_context()
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # what this client is about
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


CIPHERS = "CAMELLIA:ARIA"  # TLS 1.2 suites outside the provider's (Python's default) list


def rogue_client(certs: Certs) -> ssl.SSLContext:
    """A client whose certificate another CA signed: the ODMR listener rejects it."""
    return certs.client_context(with_cert=certs.rogue_client_file)


def cipherless_client(certs: Certs) -> ssl.SSLContext:
    """A TLS 1.2 client offering only ciphers the provider does not enable."""
    ctx = certs.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    return ctx


def untrusting_client(certs: Certs) -> ssl.SSLContext:
    """A client that does not trust the provider's CA: it answers with an alert."""
    del certs
    return ssl.create_default_context()


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        (untrusting_client, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"),
        (old_client, "[SSL: UNSUPPORTED_PROTOCOL] unsupported protocol"),
        (cipherless_client, "[SSL: NO_SHARED_CIPHER] no shared cipher"),
        (rogue_client, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed:"
         " unable to get local issuer certificate"),
    ],
)
async def test_starttls_failure_names_the_reason(
        provider: RunningProvider, certs: Certs, caplog: pytest.LogCaptureFixture,
        client: Callable[[Certs], ssl.SSLContext], reason: str) -> None:
    caplog.set_level(logging.INFO, logger="fermoposta")
    await asyncio.to_thread(blocking_client, provider.odmr, client(certs), True)
    line = await wait_for_failure(caplog)
    session_id, text = line.split(": ", 1)
    assert text == f"TLS handshake failed from customer.example.org[127.0.0.1]: {reason}"
    assert session_id.isalnum()


async def test_garbage_after_starttls(provider: RunningProvider,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fermoposta")
    d = await after_starttls(provider)
    await d.raw(b"MAIL FROM:<not-tls@example.org>\r\n" * 4)
    line = await wait_for_failure(caplog)
    assert "[SSL: " in line and line.split("[SSL: ", 1)[1].split("]")[0] in (
        "WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"), line
    await d.close()


async def test_close_during_the_handshake(provider: RunningProvider,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fermoposta")
    d = await after_starttls(provider)
    await d.raw(b"\x16\x03\x01")  # the start of a ClientHello, then nothing more
    await d.close()
    line = await wait_for_failure(caplog)
    assert line.endswith(": connection closed by the peer during the handshake"), line


async def test_handshake_timeout(provider_factory: Callable[..., Any],
                                 caplog: pytest.LogCaptureFixture) -> None:
    provider = await provider_factory(extra="[limits]\ntls_handshake_timeout = 1\n")
    caplog.set_level(logging.INFO, logger="fermoposta")
    d = await after_starttls(provider)  # and never says hello
    line = await wait_for_failure(caplog)
    # asyncio's own words for its handshake timeout, or ours if it gave none.
    assert line.endswith((": no handshake within 1s", ": SSL handshake is taking longer than"
                          " 1.0 seconds: aborting the connection")), line
    assert await d.closed()
    await d.close()


async def test_implicit_tls_failure_names_the_reason(
        provider_factory: Callable[..., Any], certs: Certs,
        caplog: pytest.LogCaptureFixture) -> None:
    provider = await provider_factory(odmr_tls=True)
    caplog.set_level(logging.INFO, logger="fermoposta")
    assert provider.odmr_tls is not None
    await asyncio.to_thread(blocking_client, provider.odmr_tls, untrusting_client(certs), False)
    line = await wait_for_failure(caplog)
    assert line == ("TLS handshake failed from [127.0.0.1]: "
                    "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    caplog.clear()
    reader, writer = await asyncio.open_connection(*provider.odmr_tls)
    writer.close()  # before a byte of the handshake
    line = await wait_for_failure(caplog)
    assert line == ("TLS handshake failed from [127.0.0.1]: "
                    "connection closed by the peer during the handshake")
    del reader


@pytest.mark.parametrize(
    ("exc", "timeout", "reason"),
    [
        (ConnectionResetError(), 60.0, "connection closed by the peer during the handshake"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:992)"), None,
         "connection closed by the peer during the handshake"),
        (TimeoutError(), 30.0, "no handshake within 30s"),
        (TimeoutError(), None, "handshake timed out"),
        (ssl.SSLError(1, "[SSL: NO_SHARED_CIPHER] no shared cipher (_ssl.c:1006)"), None,
         "[SSL: NO_SHARED_CIPHER] no shared cipher"),
        (ssl.SSLError(1), None, "SSLError"),
        (OSError(), None, "OSError"),
        (OSError(113, "No route to host"), None, "No route to host"),
    ],
)
def test_reason_is_never_empty(exc: BaseException, timeout: float | None, reason: str) -> None:
    assert tls_failure_reason(exc, timeout) == reason
