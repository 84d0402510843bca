"""One customer session: lock, dial, AUTH, ATRN, reversed session, summary.

Contract:
- `pull_once()` runs one `[[pull]]` block and returns a `PullSummary`; every
  failure is a `CustomerError` carried in the summary with its exit code (0
  for success, mail or not).
- A per-pull lock file in `data_dir` (flock) makes sure two sessions of the
  same pull never overlap (a second `pull`, or `pull` beside `run`): the
  loser waits (`wait=True`) or fails with `AlreadyRunning` (exit 73).
- Local delivery happens inside the reversed session, before each 250: when
  the session ends, every message counted in the summary is committed
  locally, and every other message is still held at the provider.
- `check()` dials, verifies TLS and authenticates without ATRN and returns
  the report lines `fermoposta customer check` prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fermoposta.config import ConfigError
from fermoposta.customer.config import CustomerConfig, PullConfig
from fermoposta.customer.delivery.factory import make_delivery
from fermoposta.customer.dialout import Dialer, DialSettings
from fermoposta.customer.errors import (
    AlreadyRunning,
    ConfigFailure,
    CustomerError,
    TemporaryFailure,
)
from fermoposta.customer.serve import ReceivedMessage, reversed_session
from fermoposta.net.server_session import new_session_id
from fermoposta.ops.log import event

log = logging.getLogger("fermoposta.customer")


@dataclass(slots=True)
class PullSummary:
    name: str
    domains: tuple[str, ...]
    session_id: str
    started: float
    finished: float = 0.0
    had_mail: bool = False
    received: list[ReceivedMessage] = field(default_factory=list)
    refused: int = 0
    deferred: int = 0
    error: CustomerError | None = None

    @property
    def exit_code(self) -> int:
        """0 when the session worked, mail or not; 75 when the session worked
        but some local delivery was deferred (that mail is still held at the
        provider), so that cron notices a local target that is down."""
        if self.error is not None:
            return self.error.exit_code
        return TemporaryFailure.exit_code if self.deferred else 0

    @property
    def messages(self) -> int:
        """Messages received: transactions of one provider message count once."""
        known = {m.provider_queue_id for m in self.received if m.provider_queue_id}
        return len(known) + sum(1 for m in self.received if not m.provider_queue_id)

    def lines(self) -> list[str]:
        what = ",".join(self.domains) or "all domains of the account"
        head = f"{self.name}: {what}: "
        if self.error is not None:
            return [head + f"failed ({self.error.kind}, exit {self.exit_code}): {self.error}"]
        if not self.had_mail:
            return [head + "no mail"]
        out = [head + f"{self.messages} message(s) received"
               + (f", {self.refused} refused" if self.refused else "")
               + (f", {self.deferred} deferred (still held at the provider)"
                  if self.deferred else "")
               + f" in {self.finished - self.started:.1f}s"]
        for msg in self.received:
            ident = msg.provider_queue_id or "-"
            out.append(f"  {ident} from <{msg.sender}> to {', '.join(msg.recipients)}"
                       f" -> {msg.where}")
        return out


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


async def pull_once(config: CustomerConfig, pull: PullConfig, *, wait: bool = False
                    ) -> PullSummary:
    summary = PullSummary(name=pull.name, domains=pull.domains, session_id=new_session_id(),
                          started=time.time())
    try:
        async with pull_lock(config.data_dir / f"pull-{pull.name}.lock", wait=wait):
            await _session(config, pull, summary)
    except CustomerError as exc:
        summary.error = exc
    summary.finished = time.time()
    event("customer", None, session=summary.session_id, pull=pull.name,
          received=summary.messages, refused=summary.refused, deferred=summary.deferred,
          status="ok" if summary.error is None else summary.error.kind,
          reason=str(summary.error) if summary.error else None)
    return summary


async def _session(config: CustomerConfig, pull: PullConfig, summary: PullSummary) -> None:
    dialer = Dialer(dial_settings(config))
    try:
        await dialer.connect()
        await dialer.authenticate()
        conn = await dialer.atrn(pull.domains)
        if conn is None:
            return
        summary.had_mail = True
        delivery = make_delivery_for(config, pull)
        session = reversed_session(
            conn, hostname=config.hostname, accept_domains=frozenset(pull.accept_domains(config)),
            delivery=delivery, session_id=summary.session_id,
            max_message_size=config.max_message_size,
        )
        try:
            await session.run()
        finally:
            await delivery.close()
        summary.received = session.received
        summary.refused = session.refused
        summary.deferred = session.deferred
        if not session.quit_seen:
            log.warning("%s: the provider closed the reversed session without QUIT",
                        summary.session_id)
    finally:
        await dialer.close()


def make_delivery_for(config: CustomerConfig, pull: PullConfig):  # type: ignore[no-untyped-def]
    d = pull.delivery
    return make_delivery(
        d.type, hostname=config.hostname, path_template=d.path, create=d.create,
        aliases=d.aliases, catch_all=d.catch_all, socket_path=d.socket_path, hostport=d.hostport,
    )


async def check(config: CustomerConfig) -> tuple[int, list[str]]:
    """Connect, TLS, AUTH, no ATRN: (exit code, report lines)."""
    lines: list[str] = []
    p = config.provider
    try:
        dialer = Dialer(dial_settings(config))
    except CustomerError as exc:
        return exc.exit_code, [f"configuration: {exc}"]
    try:
        await dialer.connect()
        r = dialer.report
        lines.append(f"connected to {p.host}:{p.port}: {r.greeting}")
        lines.append(f"TLS: {r.tls}" + (f"; certificate {r.certificate}" if r.certificate else ""))
        caps = r.capabilities
        lines.append(f"ATRN: offered; AUTH: {caps.get('AUTH', '(none)')}")
        mech = await dialer.authenticate()
        lines.append(f"AUTH {mech} as {p.username or '(certificate)'}: OK"
                     + (" (server signature verified)" if mech.startswith("SCRAM") else ""))
        await dialer.quit()
        lines.append("OK: ready to pull")
        return 0, lines
    except CustomerError as exc:
        lines.append(f"FAILED ({exc.kind}, exit {exc.exit_code}): {exc}")
        return exc.exit_code, lines
    finally:
        await dialer.close()
