"""What every part of the customer that talks to the provider or the site shares.

Contract: `dial_settings(config)` turns the `[provider]` table into the
dial-out's settings (the password read from its file; a missing file is a
`ConfigFailure`); `pull_lock(path)` is the per-block lock file (`flock`, held
while the block runs, released by the kernel however the process ends);
`make_delivery_for(config, pull)` builds a `[[pull]]` block's local delivery;
`deliver_stored(delivery, store, message_id, envelope)` hands a message kept
in one of the customer's spools to it, streaming the body through a spooled
temporary file (bounded memory); `domain_of(address)` is an address's
canonical domain, or "" when it has none or an invalid one.
Pull, outbox push and the local retry spool all import these from here, so
none of them imports another (no import cycles).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from fermoposta.config import ConfigError
from fermoposta.customer.config import CustomerConfig, PullConfig
from fermoposta.customer.delivery.base import Delivery, DeliveryOutcome, LocalEnvelope
from fermoposta.customer.delivery.factory import make_delivery
from fermoposta.customer.dialout import DialSettings
from fermoposta.customer.errors import AlreadyRunning, ConfigFailure
from fermoposta.smtp.command import normalize_domain
from fermoposta.store import CHUNK_SIZE, MessageQueue

__all__ = ["deliver_stored", "dial_settings", "domain_of", "make_delivery_for", "pull_lock"]


def dial_settings(config: CustomerConfig) -> DialSettings:
    p = config.provider
    try:
        password = p.read_password() if p.username else None
    except ConfigError as exc:
        raise ConfigFailure(str(exc)) from exc
    return DialSettings(
        host=p.host, port=p.port, tls=p.tls, hostname=config.hostname, ca_file=p.ca_file,
        server_name=p.server_name, pin_sha256=p.pin_sha256, client_cert=p.client_cert,
        client_key=p.client_key, username=p.username, password=password,
        mechanisms=p.mechanisms, connect_timeout=p.connect_timeout,
        command_timeout=p.command_timeout, atrn_timeout=p.atrn_timeout,
    )


@contextlib.asynccontextmanager
async def pull_lock(path: Path, *, wait: bool, busy: str = "another session of this block "
                    "is running") -> AsyncIterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise AlreadyRunning(f"{busy} (lock {path})") from None
                await asyncio.sleep(0.5)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing releases the flock


def make_delivery_for(config: CustomerConfig, pull: PullConfig) -> Delivery:
    """The local delivery backend of a ``[[pull]]`` block."""
    d = pull.delivery
    return make_delivery(
        d.type, hostname=config.hostname, path_template=d.path, create=d.create,
        aliases=d.aliases, catch_all=d.catch_all, socket_path=d.socket_path, hostport=d.hostport,
    )


async def deliver_stored(delivery: Delivery, store: MessageQueue, message_id: str,
                         envelope: LocalEnvelope) -> DeliveryOutcome:
    """Deliver the stored body of `message_id` with `envelope` (see the module)."""
    with tempfile.SpooledTemporaryFile(max_size=CHUNK_SIZE) as body:
        await asyncio.to_thread(copy_stored_body, store, message_id, body)
        size = body.tell()
        body.seek(0)
        return await delivery.deliver(envelope, body, size)


def copy_stored_body(store: MessageQueue, message_id: str, out: IO[bytes]) -> None:
    """Write the stored body of `message_id` to `out`, one chunk at a time."""
    for chunk in store.read_body(message_id):
        out.write(chunk)


def domain_of(address: str) -> str:
    """The canonical domain of `address`; "" without one or when it is invalid."""
    if "@" not in address:
        return ""
    try:
        return normalize_domain(address.rsplit("@", 1)[1])
    except ValueError:
        return ""
