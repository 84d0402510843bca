"""`every = "push"` with the real `fermoposta customer run` process (issue 12):
the daemon keeps one ATRN waiting at the provider, so a message is in the
Maildir within a second or so of reaching the MX, message after message; a
SIGTERM ends the waiting session at once; a provider account without
--atrn-wait is not dialled in a loop."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import time
from pathlib import Path

from conftest import PASSWORD
from support.customer_config import write_customer_config
from support.dialog import send_mail


async def wait_until(predicate, timeout=20.0, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return False


def set_wait(provider, seconds):
    account = provider.store.get_account("acme")
    provider.store.update_account(dataclasses.replace(account, atrn_wait=seconds))


async def start_daemon(provider, certs, site: Path, log: Path):
    path = write_customer_config(site, port=provider.odmr[1], password=PASSWORD,
                                 ca_file=certs.ca_file,
                                 pulls=[{"domains": ["example.org"], "every": "push"}])
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fermoposta", "customer", "run", "-c", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=log.open("wb"))


async def test_push_delivers_within_seconds_and_stops_at_once(provider, certs, tmp_path):
    set_wait(provider, 60.0)
    site, log = tmp_path / "site", tmp_path / "daemon.log"
    proc = await start_daemon(provider, certs, site, log)
    new = site / "mail" / "example.org" / "bob" / "Maildir" / "new"
    try:
        watch = provider.provider.held_watch
        assert await wait_until(lambda: watch.waiting == 1), log.read_text()
        delays = []
        for n in range(3):
            assert await wait_until(lambda: watch.waiting == 1), log.read_text()
            code, _ = await send_mail(*provider.mx, "alice@sender.test", ["bob@example.org"],
                                      f"Subject: push {n}\r\n\r\nnow\r\n".encode())
            assert code == 250
            sent = time.monotonic()
            assert await wait_until(lambda n=n: new.is_dir() and
                                    len(list(new.iterdir())) == n + 1, 10.0), log.read_text()
            delays.append(time.monotonic() - sent)
        assert max(delays) < 3.0, delays
        # The file appears before the customer's 250, and the provider
        # commits what a 250 delivered a moment after it reads it.
        assert await wait_until(
            lambda: provider.store.held_message_ids(["example.org"]) == [], 5.0)
        # The daemon logs a session's summary after the session ends, which
        # may be a moment after the last file appeared in the Maildir.
        assert await wait_until(
            lambda: log.read_text().count("1 message(s) received") == 3, 10.0), log.read_text()
        text = log.read_text()
        assert "next pull in" not in text  # push: dialled again at once every time
        assert text.count("1 message(s) received") == 3
        # A session waits again; SIGTERM ends it at once (not after 10 minutes).
        assert await wait_until(lambda: watch.waiting == 1), log.read_text()
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert time.monotonic() - stopped < 5.0
        assert "ending the ATRN that waits for mail" in log.read_text()
        assert await wait_until(lambda: watch.waiting == 0, 5.0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def dialled_once_then_waits(proc, log: Path, settle: float) -> None:
    """The daemon dialled once, heard "no mail" at once, and waits 60 s
    instead of dialling again; then it stops on SIGTERM with 0."""
    try:
        assert await wait_until(lambda: "next pull in 60s" in log.read_text()), log.read_text()
        await asyncio.sleep(settle)
        text = log.read_text()
        assert "answered ATRN at once with no mail (does the account have --atrn-wait?)" \
            in text
        assert text.count("authenticated with") == 1, text  # one dial, not a loop
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_push_to_an_account_that_does_not_wait_is_not_a_loop(provider, certs, tmp_path):
    site, log = tmp_path / "site", tmp_path / "daemon.log"
    await dialled_once_then_waits(await start_daemon(provider, certs, site, log), log, 1.0)


async def test_push_to_a_provider_answering_250_then_quit_is_not_a_loop(
        provider_factory, certs, tmp_path):
    # RFC 2645 §5.2.1: "no mail" may also be 250 followed by QUIT (our
    # [odmr] no_mail_reply = "quit"); it delivers nothing, so the daemon
    # waits as after a prompt 453 instead of dialling again at once.
    provider = await provider_factory(extra='[odmr]\nno_mail_reply = "quit"\n')
    site, log = tmp_path / "site", tmp_path / "daemon.log"
    await dialled_once_then_waits(await start_daemon(provider, certs, site, log), log, 2.0)
