"""fetchmail over the provider's implicit-TLS ODMR listener (`[listen] odmr_tls`).

fetchmail cannot STARTTLS in ODMR mode, so `ssl sslcertck` on the
`odmr_tls` port is its only secure path (README, docs/security.md).  After
ATRN fetchmail relays the reversed session byte for byte between the TLS
socket and its local SMTP server (here Postfix's smtp-sink) with a
select() loop: several messages, some with several recipients, must all
arrive, and the queue must be empty after.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import PASSWORD, Certs, RunningProvider, add_customer, write_config
from fermoposta.config import load_provider_config
from fermoposta.provider.server import Provider
from fermoposta.store import open_store
from peers import run_fetchmail, sink_messages, smtp_sink
from support.dialog import send_mail


@pytest.fixture
async def tls_provider(certs: Certs, tmp_path: Path) -> AsyncIterator[RunningProvider]:
    """A provider with `odmr_tls`, whose certificate also has a subject CN:
    fetchmail's `sslcertck` insists on one (trustme's default has only the
    subjectAltName), then checks it and the SAN against the poll name."""
    leaf = certs.ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    directory = tmp_path / "provider"
    directory.mkdir()
    own = dataclasses.replace(certs, cert_file=directory / "cn.pem", key_file=directory / "cn.key")
    leaf.cert_chain_pems[0].write_to_path(str(own.cert_file))
    leaf.private_key_pem.write_to_path(str(own.key_file))
    config = load_provider_config(write_config(directory, own, odmr_tls=0, submission=0))
    store = open_store(config.data_dir)
    add_customer(store)
    provider = Provider(config, store)
    addresses = await provider.start()
    try:
        yield RunningProvider(provider, store, directory / "provider.toml", addresses["mx"],
                              addresses["odmr"], addresses["odmr_tls"],
                              addresses["submission"])
    finally:
        await provider.stop(grace=1.0)
        store.close()


def body(n: int, filler_lines: int = 0) -> bytes:
    filler = "".join(f"line {i} of a long message, to span several chunks and TLS records\r\n"
                     for i in range(filler_lines))
    return (f"From: Alice <alice@sender.test>\r\nTo: bob@example.org\r\n"
            f"Subject: over TLS {n}\r\n\r\nHello {n},\r\n.leading dot line\r\n{filler}bye\r\n"
            ).encode()


def ssl_rcfile(directory: Path, port: int, sink_port: int, ca_file: Path) -> Path:
    path = directory / "fetchmailrc"
    path.write_text(
        f'poll localhost protocol ODMR service {port}\n'
        f'  user "acme" password "{PASSWORD}" fetchdomains example.org\n'
        f'  smtphost 127.0.0.1/{sink_port}\n'
        f'  ssl sslcertck sslcertfile "{ca_file}"\n'
    )
    path.chmod(0o600)
    return path


async def test_fetchmail_ssl_collects_several_messages(tls_provider: RunningProvider,
                                                       certs: Certs, tmp_path: Path) -> None:
    """Regression (issue 8, defect 3): the drain pipelined MAIL, RCPT... and
    DATA in one TLS record; fetchmail relayed MAIL only and the session hung
    until the provider's command timeout, with nothing delivered."""
    provider = tls_provider
    assert provider.odmr_tls is not None
    envelopes = [["bob@example.org"], ["bob@example.org", "carol@example.org"],
                 ["dave@example.org"], ["bob@example.org", "carol@example.org",
                                        "erin@example.org"], ["frank@example.org"]]
    for n, rcpts in enumerate(envelopes):
        # message 3 is ~140 kB: several stored chunks and TLS records
        code, _ = await send_mail(*provider.mx, "alice@sender.test", rcpts,
                                  body(n, 2000 if n == 3 else 0))
        assert code == 250
    with smtp_sink(tmp_path / "sink") as sink_port:
        try:
            rc, out = await run_fetchmail(ssl_rcfile(tmp_path, provider.odmr_tls[1], sink_port,
                                                     certs.ca_file), timeout=15)
        except TimeoutError:
            pytest.fail("fetchmail over odmr_tls hung (the reversed session stalled)")
    assert rc == 0, out
    assert "Turnaround now" in out
    messages = sink_messages(tmp_path / "sink")
    assert len(messages) == len(envelopes), out
    by_subject = {next(line for line in raw.split(b"\n") if line.startswith(b"Subject:"))
                  .strip().decode(): raw.replace(b"\r\n", b"\n") for raw in messages}
    assert sorted(by_subject) == [f"Subject: over TLS {n}" for n in range(len(envelopes))]
    for n, raw in enumerate(by_subject[f"Subject: over TLS {n}"] for n in range(5)):
        assert b"\n.leading dot line\n" in raw
        assert raw.rstrip(b"\n").endswith(b"\nbye"), raw[-200:]  # smtp-sink adds a line
        # smtp-sink writes the envelope (one X-Rcpt-Args per recipient) first
        for rcpt in envelopes[n]:
            assert f"X-Rcpt-Args: <{rcpt}>".encode() in raw
    assert by_subject["Subject: over TLS 3"].count(b"of a long message") == 2000
    assert provider.store.held_message_ids(["example.org"]) == []


class ChunkingHost:
    """fetchmail's smtphost offering CHUNKING (as Postfix's smtpd does): it
    keeps each message's envelope, its octets and the verb that carried it."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []
        self.verbs: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 smtphost ESMTP\r\n")
        rcpts: list[str] = []
        octets = b""
        try:
            while line := await reader.readline():
                verb = line[:4].upper().decode()
                self.verbs.append(verb)
                if verb == "EHLO":
                    writer.write(b"250-smtphost\r\n250-PIPELINING\r\n250-CHUNKING\r\n"
                                 b"250 8BITMIME\r\n")
                elif verb == "MAIL":
                    rcpts, octets = [], b""
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == "RCPT":
                    rcpts.append(line.decode().split("<", 1)[1].split(">", 1)[0])
                    writer.write(b"250 2.1.5 ok\r\n")
                elif verb == "BDAT":
                    _, size, *last = line.split()
                    octets += await reader.readexactly(int(size))
                    if last:
                        self.messages.append((rcpts, octets))
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                else:  # DATA included: this host wants BDAT
                    writer.write(b"502 5.5.1 not here\r\n")
                await writer.drain()
        finally:
            writer.close()


async def test_fetchmail_ssl_relays_bdat_to_a_chunking_smtphost(
        tls_provider: RunningProvider, certs: Certs, tmp_path: Path) -> None:
    """fetchmail passes on its smtphost's EHLO: offered CHUNKING, the drain
    sends BDAT transactions, several in flight, through fetchmail's
    line-by-line TLS relay, which must neither stall nor change a byte."""
    provider = tls_provider
    assert provider.odmr_tls is not None
    envelopes = [["bob@example.org"], ["bob@example.org", "carol@example.org"],
                 ["dave@example.org"], ["erin@example.org"]]
    for n, rcpts in enumerate(envelopes):
        code, _ = await send_mail(*provider.mx, "alice@sender.test", rcpts,
                                  body(n, 500 if n == 2 else 0))
        assert code == 250
    host = ChunkingHost()
    server = await asyncio.start_server(host.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        rc, out = await run_fetchmail(ssl_rcfile(tmp_path, provider.odmr_tls[1], port,
                                                 certs.ca_file), timeout=20)
    except TimeoutError:
        pytest.fail("fetchmail relaying BDAT over odmr_tls hung")
    finally:
        server.close()
        await server.wait_closed()
    assert rc == 0, out
    assert "BDAT" in host.verbs and "DATA" not in host.verbs, host.verbs
    assert [rcpts for rcpts, _ in host.messages] == envelopes
    for n, (_, octets) in enumerate(host.messages):
        assert octets.endswith(body(n, 500 if n == 2 else 0)), octets[-200:]  # after Received:
    assert provider.store.held_message_ids(["example.org"]) == []
