"""Helpers for the outbox tests: a site config with an outbox, a raw submitting client."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from conftest import PASSWORD
from fermoposta.customer.config import CustomerConfig, load_customer_config
from support.customer_config import write_customer_config
from support.dialog import Dialog

BODY = b"From: bob@example.org\r\nTo: friend@elsewhere.test\r\nSubject: out\r\n\r\nhello world\r\n"


def site_config(tmp_path: Path, provider: Any, certs: Any, *, submission_port: int | None = None,
                outbox: str = "", extra_provider: str = "", listen: str = "127.0.0.1:0",
                net_block: bool = True, every: str = "10m") -> CustomerConfig:
    """A site with example.org (the account's, pulled) and example.net (a site
    domain the provider account does not own: its senders are refused)."""
    return load_customer_config(site_config_path(
        tmp_path, provider, certs, submission_port=submission_port, outbox=outbox,
        extra_provider=extra_provider, listen=listen, net_block=net_block, every=every))


def site_config_path(tmp_path: Path, provider: Any, certs: Any, *,
                     submission_port: int | None = None, outbox: str = "",
                     extra_provider: str = "", listen: str = "127.0.0.1:0",
                     net_block: bool = True, every: str = "10m") -> Path:
    site = tmp_path / "site"
    maildirs = str(site / "mail/{domain}/{local}/Maildir")
    port = provider.submission[1] if submission_port is None else submission_port
    pulls = [{"name": "org", "domains": ["example.org"], "every": every,
              "delivery": {"type": "maildir", "path": maildirs, "create": True}}]
    if net_block:
        pulls.append({"name": "net", "domains": ["example.net"], "every": every,
                      "delivery": {"type": "maildir", "path": maildirs, "create": True}})
    path = write_customer_config(
        site, port=provider.odmr[1], password=PASSWORD, ca_file=certs.ca_file, pulls=pulls,
        extra_provider=f'submission = "127.0.0.1:{port}"\n{extra_provider}',
    )
    path.write_text(path.read_text() + f'\n[outbox]\nlisten = "{listen}"\n' + outbox)
    return path


async def submit(port: int, sender: str, recipients: list[str], body: bytes = BODY,
                 *, auth: tuple[str, str] | None = None) -> tuple[int, list[str]]:
    d = await Dialog.connect("127.0.0.1", port)
    try:
        await d.expect(220)
        await d.cmd("EHLO client.example.org", 250)
        if auth is not None:
            token = base64.b64encode(f"\0{auth[0]}\0{auth[1]}".encode()).decode()
            await d.cmd(f"AUTH PLAIN {token}", 235)
        await d.cmd(f"MAIL FROM:<{sender}>", 250)
        for rcpt in recipients:
            await d.cmd(f"RCPT TO:<{rcpt}>", 250)
        await d.cmd("DATA", 354)
        await d.raw(body + b".\r\n")
        result = await d.reply()
        await d.cmd("QUIT", 221)
        return result
    finally:
        await d.close()
