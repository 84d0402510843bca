"""`fermoposta demo`: the whole post office on loopback, narrated, in seconds.

Contract: in a temporary directory it runs a provider (MX, ODMR, submission,
outbound delivery) and a customer site (Maildir delivery and an outbox), all
on 127.0.0.1 with ports chosen by the kernel, plus a tiny SMTP server playing
"the Internet" (reached through a transport route, so no DNS is asked).  It
then (1) sends a message to the customer's domain, held by the provider;
(2) writes an outgoing message at the site's outbox; (3) runs one customer
session: outbox pushed to the provider's submission, ATRN, the held message
delivered to the Maildir over the reversed connection; (4) waits for the
provider to deliver the outgoing message to "the Internet".  Each step is
printed.  It talks to nothing but 127.0.0.1 and removes its directory unless
`--keep`.  Exit 0 when every step worked, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import mailbox
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from fermoposta.config import load_provider_config
from fermoposta.customer.config import load_customer_config
from fermoposta.customer.outbox import OutboxServer, open_outbox
from fermoposta.customer.pull import pull_once
from fermoposta.net.client import SMTPClient
from fermoposta.net.connection import Connection, open_connection, start_server
from fermoposta.net.server_session import SessionLimits
from fermoposta.net.transaction import Transaction, TransactionSession
from fermoposta.provider.accounts import make_scram_secret
from fermoposta.provider.server import Provider
from fermoposta.smtp.reply import Reply
from fermoposta.store import open_store
from fermoposta.store.base import Account, Domain

_WORLD: list[tuple[str, list[str], bytes]] = []  # what "the Internet" received


class _Internet(TransactionSession):
    """A stand-in for the rest of the world: accepts everything, keeps it."""

    async def accept_message(self, txn: Transaction, body: IO[bytes], size: int) -> Reply:
        _WORLD.append((txn.sender.address, [r.path.address for r in txn.recipients],
                       body.read()))
        return Reply(250, "2.0.0", "OK, delivered to the world")


def say(step: str, text: str = "") -> None:
    print(f"\n== {step}" if not text else f"   {text}", flush=True)


async def _send(port: int, sender: str, rcpt: str, subject: str, text: str) -> Reply:
    conn = await open_connection("127.0.0.1", port, timeout=10)
    client = SMTPClient(conn)
    try:
        await client.read_reply(10)
        await client.ehlo("demo.client", 10)
        for line in (f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>", "DATA"):
            reply = await client.command(line, 10)
            say("", f"C: {line}   S: {reply}")
        body = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n\r\n{text}\r\n")

        async def chunks() -> AsyncIterator[bytes]:
            yield body.encode()

        await client.send_body(chunks())
        final = await client.read_reply(30)
        say("", f"C: <message>.   S: {final}")
        await client.command("QUIT", 10)
        return final
    finally:
        await conn.close(1.0)


def _certificate(directory: Path) -> tuple[Path, Path] | None:
    if shutil.which("openssl") is None:
        return None
    cert, key = directory / "provider.pem", directory / "provider.key"
    result = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)], capture_output=True, timeout=60)
    return (cert, key) if result.returncode == 0 else None


async def run_demo(directory: Path) -> int:
    async def internet(conn: Connection) -> None:
        await _Internet(conn, hostname="mx.example.net", limits=SessionLimits()).run()

    world = await start_server(internet, "127.0.0.1", 0)
    world_port = world.sockets[0].getsockname()[1]
    tls = _certificate(directory)
    password = secrets.token_urlsafe(12)
    (directory / "acme.pw").write_text(password + "\n")
    tls_table = f'[tls]\ncert = "{tls[0]}"\nkey = "{tls[1]}"\n' if tls else ""
    (directory / "provider.toml").write_text(
        f'hostname = "mx.provider.test"\ndata_dir = "{directory / "provider"}"\n'
        '[listen]\nmx = "127.0.0.1:0"\nodmr = "127.0.0.1:0"\nsubmission = "127.0.0.1:0"\n'
        f"{tls_table}[outbound]\nqueue_interval = \"1s\"\nresolver = \"127.0.0.1:9\"\n"
        f'[outbound.transport]\n"example.net" = "127.0.0.1:{world_port}"\n'
        '[log]\nlevel = "warning"\n')
    config = load_provider_config(directory / "provider.toml")
    store = open_store(config.data_dir)
    store.add_account(Account(name="acme", scram=make_scram_secret(password),
                              cram_secret=password))
    store.add_domain(Domain(name="example.org", account="acme"))
    provider = Provider(config, store)
    ok = True
    try:
        ports = await provider.start()
        say("1. The provider: an MX, the ODMR port and submission, on loopback")
        for name in ("mx", "odmr", "submission"):
            say("", f"{name:<10} 127.0.0.1:{ports[name][1]}")
        say("", "account acme owns example.org (fermoposta account add acme --domain ...)")

        say("2. Someone on the Internet writes to bob@example.org; the provider holds it")
        reply = await _send(ports["mx"][1], "alice@example.net", "bob@example.org",
                            "Hello Bob", "Your mail waits at the post office.")
        ok &= reply.code == 250

        site = directory / "site"
        tls_mode = (f'tls = "starttls"\nca_file = "{tls[0]}"\nserver_name = "localhost"\n'
                    if tls else 'tls = "none"\nmechanisms = ["CRAM-MD5"]\n')
        (directory / "customer.toml").write_text(
            f'hostname = "mail.example.org"\ndata_dir = "{site / "state"}"\n'
            f'[provider]\nhost = "127.0.0.1"\nport = {ports["odmr"][1]}\n{tls_mode}'
            f'username = "acme"\npassword_file = "{directory / "acme.pw"}"\n'
            f'submission = "127.0.0.1:{ports["submission"][1]}"\n'
            + ("" if tls else 'submission_tls = "none"\n')
            + '[outbox]\nlisten = "127.0.0.1:0"\n[log]\nlevel = "warning"\n'
            '[[pull]]\nname = "office"\ndomains = ["example.org"]\n'
            f'[pull.delivery]\ntype = "maildir"\npath = "{site}/mail/{{domain}}/{{local}}/Maildir"'
            "\ncreate = true\n")
        customer = load_customer_config(directory / "customer.toml")
        outbox_store = open_outbox(customer)
        outbox = OutboxServer(customer, outbox_store)
        address = await outbox.start()
        try:
            say("3. At the site, bob answers through the outbox (the site's smarthost)")
            reply = await _send(address[1], "bob@example.org", "alice@example.net",
                                "Re: Hello Bob", "Thanks, got it.")
            ok &= reply.code == 250

            say("4. The site dials the provider: STARTTLS, AUTH, outbox pushed, ATRN, "
                "the connection turns around" if tls else
                "4. The site dials the provider: AUTH, outbox pushed, ATRN, turnaround")
            summary = await pull_once(customer, customer.pulls[0])
            for line in summary.lines():
                say("", line)
            ok &= summary.exit_code == 0 and summary.messages == 1
            box = mailbox.Maildir(str(site / "mail/example.org/bob/Maildir"), create=False)
            subjects = [m["Subject"] for m in box]
            say("", f"bob's Maildir now holds: {subjects}")
            ok &= subjects == ["Hello Bob"]
        finally:
            await outbox.stop(1.0)
            outbox_store.close()

        say("5. The provider delivers bob's answer to the Internet")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not _WORLD:
            await asyncio.sleep(0.2)
        for sender, rcpts, _ in _WORLD:
            say("", f"the Internet received mail from <{sender}> to {', '.join(rcpts)}")
        ok &= len(_WORLD) == 1
    finally:
        await provider.stop(grace=2.0)
        store.close()
        world.close()
        await world.wait_closed()
    say("Done" if ok else "Something did not work: see above")
    return 0 if ok else 1


def main(keep: bool = False) -> int:
    directory = Path(tempfile.mkdtemp(prefix="fermoposta-demo-"))
    _WORLD.clear()
    try:
        return asyncio.run(run_demo(directory))
    finally:
        if keep:
            print(f"\nFiles kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
