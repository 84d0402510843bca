"""`fermoposta customer check` checks each block's local delivery (issue 11,
item 8): a Maildir root it cannot write or create (73), an LMTP or SMTP target
down or refusing LHLO/EHLO (68), against real peers (Dovecot LMTP, Postfix's
smtp-sink), a port nothing listens on and a scripted server; nothing is ever
delivered; and the report's last line is never an OK after a failed part."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import PASSWORD
from dovecot import Dovecot, dovecot, dovecot_server
from fermoposta.customer.config import load_customer_config
from fermoposta.customer.delivery.probe import maildir_root
from fermoposta.customer.pull import check
from peers import free_port, sink_messages, smtp_sink
from support.customer_config import write_customer_config
from support.outbox import site_config_path

pytestmark = pytest.mark.peers
__all__ = ["dovecot", "dovecot_server"]  # fixtures


def site(tmp_path: Path, provider, certs, delivery: dict) -> object:
    return load_customer_config(write_customer_config(
        tmp_path / "site", port=provider.odmr[1], password=PASSWORD, ca_file=certs.ca_file,
        pulls=[{"name": "org", "domains": ["example.org"], "delivery": delivery}]))


def maildir(path: Path, *, create: bool = True) -> dict:
    return {"type": "maildir", "path": f"{path}/{{domain}}/{{local}}/Maildir", "create": create}


def failed(lines: list[str], code: int, kind: str) -> str:
    """The block's FAILED line, which must also be the report's last line."""
    prefix = f"delivery org: FAILED ({kind}, exit {code}): "
    [line] = [line for line in lines if line.startswith(prefix)]
    assert lines[-1] == line, lines
    assert "OK: ready to pull" not in lines
    return line[len(prefix):]


# --- Maildir ---------------------------------------------------------------------------

def test_the_maildir_root_is_the_templates_fixed_directory() -> None:
    assert maildir_root("/srv/mail/{domain}/{local}/Maildir") == Path("/srv/mail")
    assert maildir_root("/srv/mail/user-{local}") == Path("/srv/mail")
    assert maildir_root("/home/{local}/Maildir") == Path("/home")
    assert maildir_root("/{address}") == Path("/")


async def test_a_maildir_root_to_be_created_passes_and_nothing_is_created(
        provider, certs, tmp_path):
    root = tmp_path / "mail"
    code, lines = await check(site(tmp_path, provider, certs, maildir(root)))
    assert code == 0, lines
    assert (f"delivery org: Maildir root {root}: does not exist yet, can be created in "
            f"{tmp_path} (create = true)") in lines
    assert lines[-1] == "OK: ready to pull"
    assert not root.exists()  # a check creates nothing


async def test_an_existing_writable_maildir_root_passes(provider, certs, tmp_path):
    root = tmp_path / "mail"
    root.mkdir()
    code, lines = await check(site(tmp_path, provider, certs, maildir(root, create=False)))
    assert code == 0, lines
    assert (f"delivery org: Maildir root {root}: directory (create = false: each "
            "recipient's Maildir must exist)") in lines
    assert lines[-1] == "OK: ready to pull"


async def test_a_maildir_root_under_a_regular_file_fails_73(provider, certs, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file, so nothing can be created below it, not even by root\n")
    code, lines = await check(site(tmp_path, provider, certs, maildir(blocker / "mail")))
    assert code == 73, lines
    why = failed(lines, 73, "maildir")
    assert why == (f"Maildir root {blocker}/mail cannot be created: {blocker} is not a "
                   "directory"), why
    # The provider part still ran and passed: its lines are there.
    assert "AUTH SCRAM-SHA-256 as acme: OK (server signature verified)" in lines


async def test_a_maildir_root_that_is_a_file_fails_73(provider, certs, tmp_path):
    blocker = tmp_path / "mail"
    blocker.write_text("x\n")
    code, lines = await check(site(tmp_path, provider, certs, maildir(blocker, create=False)))
    assert code == 73, lines
    assert failed(lines, 73, "maildir") == f"Maildir root {blocker} is not a directory"


async def test_a_missing_maildir_root_without_create_fails_73(provider, certs, tmp_path):
    root = tmp_path / "nowhere"
    code, lines = await check(site(tmp_path, provider, certs, maildir(root, create=False)))
    assert code == 73, lines
    assert failed(lines, 73, "maildir") == (
        f"Maildir root {root} does not exist (create = false: every recipient would be "
        "refused as unknown, 550 5.1.1)")


async def test_a_read_only_maildir_root_fails_73(provider, certs, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories; the regular-file cases above "
                    "cover a root that cannot be created")
    root = tmp_path / "mail"
    root.mkdir()
    root.chmod(0o555)
    try:
        code, lines = await check(site(tmp_path, provider, certs, maildir(root)))
    finally:
        root.chmod(0o755)
    assert code == 73, lines
    assert failed(lines, 73, "maildir") == (
        f"Maildir root {root} is not writable by this user (create = true makes Maildirs "
        "in it)")


# --- LMTP (Dovecot) ------------------------------------------------------------------

async def test_dovecot_lmtp_over_the_socket_and_tcp_passes_and_gets_no_mail(
        provider, certs, tmp_path, dovecot: Dovecot):
    for address, where in ((str(dovecot.socket), f"lmtp:{dovecot.socket}"),
                           (f"127.0.0.1:{dovecot.port}", f"lmtp:127.0.0.1:{dovecot.port}")):
        code, lines = await check(site(tmp_path, provider, certs,
                                       {"type": "lmtp", "address": address}))
        assert code == 0, lines
        [line] = [line for line in lines if line.startswith("delivery org: ")]
        assert line.startswith(f"delivery org: {where}: 220 "), line
        assert line.endswith("; LHLO: 250 OK"), line
        assert lines[-1] == "OK: ready to pull"
    assert dovecot.files() == []  # nothing delivered


async def test_an_lmtp_socket_that_does_not_exist_fails_68(provider, certs, tmp_path):
    socket = tmp_path / "no-lmtp"
    code, lines = await check(site(tmp_path, provider, certs,
                                   {"type": "lmtp", "address": str(socket)}))
    assert code == 68, lines
    why = failed(lines, 68, "delivery")
    assert why.startswith(f"lmtp:{socket}: cannot connect: "), why


# --- SMTP ------------------------------------------------------------------------------

async def test_smtp_sink_passes_and_gets_no_mail(provider, certs, tmp_path):
    with smtp_sink(tmp_path / "sink") as port:
        code, lines = await check(site(tmp_path, provider, certs,
                                       {"type": "smtp", "address": f"127.0.0.1:{port}"}))
    assert code == 0, lines
    [line] = [line for line in lines if line.startswith("delivery org: ")]
    assert line.startswith(f"delivery org: smtp:127.0.0.1:{port}: 220 "), line
    assert line.endswith("; EHLO: 250 OK"), line
    assert sink_messages(tmp_path / "sink") == []


async def test_smtp_sink_refusing_ehlo_fails_68(provider, certs, tmp_path):
    with smtp_sink(tmp_path / "sink", "-f", "EHLO") as port:
        code, lines = await check(site(tmp_path, provider, certs,
                                       {"type": "smtp", "address": f"127.0.0.1:{port}"}))
    assert code == 68, lines
    why = failed(lines, 68, "delivery")
    assert why.startswith(f"smtp:127.0.0.1:{port}: EHLO refused: 5"), why


async def test_an_smtp_port_nothing_listens_on_fails_68(provider, certs, tmp_path):
    port = free_port()
    code, lines = await check(site(tmp_path, provider, certs,
                                   {"type": "smtp", "address": f"127.0.0.1:{port}"}))
    assert code == 68, lines
    why = failed(lines, 68, "delivery")
    assert why.startswith(f"smtp:127.0.0.1:{port}: cannot connect: "), why


@contextlib.asynccontextmanager
async def scripted(greeting: str, ehlo: str) -> AsyncIterator[tuple[int, list[str]]]:
    """A server that greets with `greeting`, answers EHLO with `ehlo`, HELO and
    everything else with 250, QUIT with 221, and records each command."""
    seen: list[str] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(greeting.encode() + b"\r\n")
            while line := await asyncio.wait_for(reader.readline(), 10):
                verb = line.decode().strip()
                seen.append(verb)
                answer = (ehlo if verb.upper().startswith("EHLO") else
                          "221 2.0.0 Bye" if verb.upper() == "QUIT" else "250 2.0.0 Ok")
                writer.write(answer.encode() + b"\r\n")
                await writer.drain()
                if verb.upper() == "QUIT":
                    break
        finally:
            writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()


async def test_a_server_answering_554_to_ehlo_fails_68_and_gets_quit(provider, certs, tmp_path):
    async with scripted("220 mta.example.org ESMTP", "554 5.7.1 no EHLO for you") \
            as (port, seen):
        code, lines = await check(site(tmp_path, provider, certs,
                                       {"type": "smtp", "address": f"127.0.0.1:{port}"}))
    assert code == 68, lines
    assert failed(lines, 68, "delivery") == (
        f"smtp:127.0.0.1:{port}: EHLO refused: 554 5.7.1 no EHLO for you")
    assert seen == ["EHLO mail.example.org", "QUIT"]  # no HELO, never a MAIL


async def test_a_greeting_other_than_220_fails_68(provider, certs, tmp_path):
    async with scripted("421 4.3.2 mta.example.org busy", "250 ok") as (port, seen):
        code, lines = await check(site(tmp_path, provider, certs,
                                       {"type": "smtp", "address": f"127.0.0.1:{port}"}))
    assert code == 68, lines
    assert failed(lines, 68, "delivery") == (
        f"smtp:127.0.0.1:{port}: greeting 421 4.3.2 mta.example.org busy")
    assert "EHLO mail.example.org" not in seen


# --- the report's last line ------------------------------------------------------------

async def test_several_blocks_each_checked_the_first_failure_decides(provider, certs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x\n")
    pulls = [
        {"name": "good", "domains": ["a.test"], "delivery": maildir(tmp_path / "mail")},
        {"name": "down", "domains": ["b.test"],
         "delivery": {"type": "smtp", "address": f"127.0.0.1:{free_port()}"}},
        {"name": "bad", "domains": ["c.test"], "delivery": maildir(blocker / "mail")},
    ]
    config = load_customer_config(write_customer_config(
        tmp_path / "site", port=provider.odmr[1], password=PASSWORD, ca_file=certs.ca_file,
        username="acme", pulls=pulls))
    code, lines = await check(config)
    assert code == 68, lines  # the first failed part's code
    assert any(line.startswith("delivery good: Maildir root ") for line in lines)
    down = next(line for line in lines if line.startswith("delivery down: FAILED (delivery, "
                                                          "exit 68): "))
    assert any(line.startswith("delivery bad: FAILED (maildir, exit 73): ") for line in lines)
    assert lines[-1] == down  # the first failure, repeated as the last line
    assert "OK: ready to pull" not in lines


async def test_no_ok_last_after_a_failed_delivery_with_the_outbox(provider, certs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x\n")
    path = site_config_path(tmp_path, provider, certs, net_block=False)
    good = str(tmp_path / "site" / "mail/{domain}/{local}/Maildir")
    path.write_text(path.read_text().replace(good, str(blocker / "{domain}/{local}")))
    code, lines = await check(load_customer_config(path))
    assert code == 73, lines
    # The submission service passed, and says so, but that is not the last word.
    assert "OK: ready to push the outbox" in lines
    assert "OK: ready to pull" not in lines
    assert lines[-1].startswith("delivery org: FAILED (maildir, exit 73): Maildir root "), lines


async def test_no_ok_last_when_the_odmr_service_is_down_but_submission_works(
        provider, certs, tmp_path):
    path = site_config_path(tmp_path, provider, certs, net_block=False)
    dead = free_port()
    path.write_text(path.read_text().replace(f"port = {provider.odmr[1]}\n",
                                             f"port = {dead}\n"))
    code, lines = await check(load_customer_config(path))
    assert code == 69, lines
    first = f"FAILED (connection, exit 69): cannot connect to 127.0.0.1:{dead}: "
    assert sum(line.startswith(first) for line in lines) == 2  # where it failed, and last
    assert "OK: ready to push the outbox" in lines  # the submission part passed
    assert lines[-1].startswith(first), lines  # before this fix: "OK: ready to push the outbox"
    assert "OK: ready to pull" not in lines
