"""The drain's TLS record layout in the reversed session (issue 8, defect 3).

fetchmail relays the reversed session with select() and reads one line per
wakeup through OpenSSL, so every command line of a pipelined group, and the
final dot, must reach the customer in a TLS record of its own
(`SMTPClient(line_records=True)`, net/client.py); with CHUNKING, each
command line of a BDAT transaction and the last line of its octets too.
This customer is a
blocking `ssl` socket: one `recv()` returns the data of at most one TLS
record, so each chunk it gets is one record.  In clear text the group stays
one write (tests/core/test_client_records.py).  A customer that still never
answers costs only the session: the command timeout ends it, mail stays held.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import time

from conftest import PASSWORD, Certs
from fermoposta.store.base import RecipientState
from support.dialog import send_mail

BODY = b"Subject: records\r\n\r\nline one\r\n.dotted\r\nline three\r\n"


class RecordCustomer:
    """A blocking TLS customer that keeps every record it receives after ATRN."""

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext) -> None:
        raw = socket.create_connection(address, timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.buffer = b""

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "provider closed the connection"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line + b"\n"

    def reply(self) -> bytes:
        while True:
            line = self.line()
            if line[3:4] == b" ":
                return line

    def cmd(self, text: str, code: int) -> None:
        self.sock.sendall(text.encode() + b"\r\n")
        got = self.reply()
        assert got.startswith(str(code).encode()), got

    def reverse(self, capabilities: bytes | None = None) -> None:
        """AUTH and ATRN: from here on we are the SMTP server; with
        `capabilities`, also our greeting and the EHLO reply ending with them."""
        assert self.reply().startswith(b"220")
        self.cmd("EHLO customer.example.org", 250)
        token = base64.b64encode(f"\0acme\0{PASSWORD}".encode()).decode()
        self.cmd(f"AUTH PLAIN {token}", 235)
        self.cmd("ATRN example.org", 250)
        if capabilities is not None:
            self.sock.sendall(b"220 customer.example.org ESMTP\r\n")
            assert self.line().startswith(b"EHLO ")
            self.sock.sendall(b"250-customer.example.org\r\n" + capabilities)

    def quit(self) -> None:
        assert self.line() == b"QUIT\r\n"
        self.sock.sendall(b"221 2.0.0 bye\r\n")

    def records_until(self, done: bytes) -> list[bytes]:
        """Records as received, until their concatenation ends with `done`."""
        assert self.buffer == b"", self.buffer
        records: list[bytes] = []
        while not b"".join(records).endswith(done):
            chunk = self.sock.recv(65536)
            assert chunk, f"provider closed the connection after {records!r}"
            records.append(chunk)
        return records


def session(address: tuple[str, int], context: ssl.SSLContext
            ) -> tuple[list[bytes], list[bytes]]:
    c = RecordCustomer(address, context)
    try:
        c.reverse()
        # The reversed session: we are the SMTP server now, with PIPELINING.
        c.sock.sendall(b"220 customer.example.org ESMTP\r\n")
        assert c.line().startswith(b"EHLO ")
        c.sock.sendall(b"250-customer.example.org\r\n250 PIPELINING\r\n")
        group = c.records_until(b"DATA\r\n")
        c.sock.sendall(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go\r\n")
        body = c.records_until(b"\r\n.\r\n")
        c.sock.sendall(b"250 2.0.0 ok\r\n")
        c.quit()
        return group, body
    finally:
        c.sock.close()


async def test_pipelined_commands_and_final_dot_each_in_own_tls_record(
        provider_factory, certs: Certs) -> None:
    p = await provider_factory(odmr_tls=True)
    code, _ = await send_mail(*p.mx, "alice@sender.test",
                              ["bob@example.org", "carol@example.org"], BODY)
    assert code == 250
    group, body = await asyncio.to_thread(session, p.odmr_tls, certs.client_context())
    assert [r.split(b":", 1)[0] for r in group] == [b"MAIL FROM", b"RCPT TO", b"RCPT TO",
                                                    b"DATA\r\n"], group
    assert all(r.count(b"\n") == 1 and r.endswith(b"\r\n") for r in group), group
    assert body[-1] == b".\r\n", body  # the dot alone: nothing after it hides in OpenSSL
    assert b"".join(body).endswith(b"line three\r\n.\r\n")
    for _ in range(100):  # the provider records the outcome after the 250
        if p.store.held_message_ids(["example.org"]) == []:
            break
        await asyncio.sleep(0.05)
    assert p.store.held_message_ids(["example.org"]) == []


def stalled_session(address: tuple[str, int], context: ssl.SSLContext) -> float:
    """Take the pipelined group and never answer it (what fetchmail did
    before the fix); return how long the provider waited before closing."""
    c = RecordCustomer(address, context)
    try:
        c.reverse()
        c.sock.sendall(b"220 customer.example.org ESMTP\r\n")
        assert c.line().startswith(b"EHLO ")
        c.sock.sendall(b"250-customer.example.org\r\n250 PIPELINING\r\n")
        c.records_until(b"DATA\r\n")
        started = time.monotonic()
        with contextlib.suppress(ssl.SSLError, OSError):
            while c.sock.recv(65536):
                pass
        return time.monotonic() - started
    finally:
        c.sock.close()


async def test_stalled_customer_times_out_and_mail_stays_held(provider_factory,
                                                              certs: Certs) -> None:
    p = await provider_factory(odmr_tls=True, extra='[limits]\ncommand_timeout = "1s"\n')
    code, _ = await send_mail(*p.mx, "alice@sender.test",
                              ["bob@example.org", "carol@example.org"], BODY)
    assert code == 250
    waited = await asyncio.to_thread(stalled_session, p.odmr_tls, certs.client_context())
    assert waited < 8, waited  # bounded by command_timeout, never for ever
    assert len(p.store.held_message_ids(["example.org"])) == 1
    message = p.store.get_message(p.store.held_message_ids(["example.org"])[0])
    assert message is not None
    assert {r.state for r in message.recipients} == {RecipientState.HELD}


def chunking_session(address: tuple[str, int], context: ssl.SSLContext) -> list[bytes]:
    """A customer offering CHUNKING: the records of one BDAT transaction."""
    c = RecordCustomer(address, context)
    try:
        c.reverse(b"250-PIPELINING\r\n250 CHUNKING\r\n")
        records = c.records_until(b"line three\r\n")
        c.sock.sendall(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 stored\r\n")
        c.quit()
        return records
    finally:
        c.sock.close()


async def test_bdat_commands_and_the_last_line_each_in_own_tls_record(
        provider_factory, certs: Certs) -> None:
    p = await provider_factory(odmr_tls=True)
    code, _ = await send_mail(*p.mx, "alice@sender.test", ["bob@example.org"], BODY)
    assert code == 250
    records = await asyncio.to_thread(chunking_session, p.odmr_tls, certs.client_context())
    commands = records[:3]
    assert [r.split(b" ", 1)[0] for r in commands] == [b"MAIL", b"RCPT", b"BDAT"], records
    assert all(r.count(b"\n") == 1 and r.endswith(b"\r\n") for r in commands), records
    octets = b"".join(records[3:])
    assert commands[2] == f"BDAT {len(octets)} LAST\r\n".encode()
    assert octets.endswith(BODY)  # after our Received: header, no dot-stuffing
    assert records[-1] == b"line three\r\n", records  # the last line alone
    for _ in range(100):
        if p.store.held_message_ids(["example.org"]) == []:
            break
        await asyncio.sleep(0.05)
    assert p.store.held_message_ids(["example.org"]) == []


def first_group_verbs(address: tuple[str, int], context: ssl.SSLContext) -> list[bytes]:
    """A customer offering CHUNKING: the verbs of the drain's first group."""
    c = RecordCustomer(address, context)
    try:
        c.reverse(b"250-PIPELINING\r\n250 CHUNKING\r\n")
        verbs = [c.line().split(b" ", 1)[0].rstrip(b"\r\n") for _ in range(3)]
        c.sock.sendall(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n")
        while c.line() != b".\r\n":
            pass
        c.sock.sendall(b"250 2.0.0 stored\r\n")
        c.quit()
        return verbs
    finally:
        c.sock.close()


async def test_a_last_line_too_long_for_one_record_goes_with_data(
        provider_factory, certs: Certs) -> None:
    """fetchmail reads at most 8191 bytes a wakeup: BDAT octets whose last
    line (alone in the last record) is longer would stall it for good."""
    p = await provider_factory(odmr_tls=True, extra="[limits]\nmax_line_length = 20000\n")
    code, _ = await send_mail(*p.mx, "alice@sender.test", ["bob@example.org"],
                              b"Subject: long\r\n\r\n" + b"x" * 9000 + b"\r\n")
    assert code == 250
    verbs = await asyncio.to_thread(first_group_verbs, p.odmr_tls, certs.client_context())
    assert verbs == [b"MAIL", b"RCPT", b"DATA"]
    for _ in range(100):
        if p.store.held_message_ids(["example.org"]) == []:
            break
        await asyncio.sleep(0.05)
    assert p.store.held_message_ids(["example.org"]) == []
