"""Probe a local delivery backend without delivering anything (`customer check`).

Contract:
- `probe(delivery)` returns a `Probe`: `ok`, a one-line `detail` fit to
  print, and when not ok the `problem` ("maildir" or "unavailable").  It
  never writes a message, never sends MAIL, and creates nothing on disk.
- Maildir (`probe_maildir`): the *root* is the template's fixed directory
  prefix, before the first placeholder ("/srv/mail" for
  "/srv/mail/{domain}/{local}/Maildir").  With ``create = true`` the root
  must be a directory this process can write and search, or, when it does
  not exist yet, its nearest existing ancestor must be (the first delivery
  creates it).  With ``create = false`` the root must exist as a searchable
  directory (Maildirs are looked up under it; a missing root means every
  recipient is unknown, 550 5.1.1, bounced by the provider), and a
  ``catch_all`` Maildir must exist.  Anything in the way that is not a
  directory (a regular file in the path), or a permission or file-system
  error, is a failure ("maildir").
- LMTP/SMTP (`probe_relay`): connect (unix socket or TCP), read the greeting,
  send LHLO (LMTP) or EHLO (SMTP; no HELO fallback: a next hop that refuses
  EHLO would get mail without 8BITMIME and SMTPUTF8, so 8-bit and UTF-8
  mail would bounce), then QUIT (also after a refusal).  Cannot connect, a timeout, a greeting or
  LHLO/EHLO reply other than 2xx, or the connection lost is a failure
  ("unavailable").  Each step waits at most `timeout` seconds (10 by
  default, not the delivery's minutes: a check should answer quickly).
- Peer and file-system errors never escape; programming errors do.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import string
from dataclasses import dataclass
from pathlib import Path

from fermoposta.customer.delivery.base import Delivery
from fermoposta.customer.delivery.maildir import MaildirDelivery
from fermoposta.customer.delivery.smtp import RelayingDelivery
from fermoposta.net.client import PEER_ERRORS, SMTPClient
from fermoposta.smtp.reply import Reply

__all__ = ["PROBE_TIMEOUT", "Probe", "maildir_root", "probe", "probe_maildir", "probe_relay"]

PROBE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Probe:
    ok: bool
    detail: str
    problem: str = ""  # "maildir" or "unavailable" when not ok


def _fail(problem: str, detail: str) -> Probe:
    return Probe(False, detail, problem)


async def probe(delivery: Delivery, *, timeout: float = PROBE_TIMEOUT) -> Probe:
    """Probe any backend (see the module docstring)."""
    if isinstance(delivery, MaildirDelivery):
        return await asyncio.to_thread(probe_maildir, delivery)
    if isinstance(delivery, RelayingDelivery):
        return await probe_relay(delivery, timeout=timeout)
    raise TypeError(f"no probe for delivery {type(delivery).__name__}")


# --- Maildir -----------------------------------------------------------------------------

def maildir_root(path_template: str) -> Path:
    """The fixed directory prefix of a Maildir path template (absolute at load)."""
    literal = ""
    for text, field_name, _, _ in string.Formatter().parse(path_template):
        literal += text
        if field_name is not None:
            break
    # The literal up to the first placeholder may end inside a file name
    # ("/srv/mail/user-{local}"): keep its directory part only.
    head = literal if literal.endswith("/") else os.path.dirname(literal)
    return Path(head or "/")


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _usable_dir(path: Path, *, write: bool) -> str | None:
    """None when `path` is a directory we can search (and write); else why not."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {_why(exc)}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    mode = os.X_OK | (os.W_OK if write else 0)
    if not os.access(path, mode):
        return f"{path} is not {'writable' if write else 'searchable'} by this user"
    return None


def _file_in_path(path: Path) -> Path | None:
    """The nearest ancestor of `path` that exists and is not a directory."""
    for ancestor in path.parents:
        with contextlib.suppress(OSError):
            if not stat.S_ISDIR(os.stat(ancestor).st_mode):
                return ancestor
    return None


def probe_maildir(delivery: MaildirDelivery) -> Probe:
    """The Maildir root check (see the module docstring); blocking, no writes."""
    root = maildir_root(delivery.path_template)
    create = delivery.create
    try:
        st = os.stat(root)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # ENOTDIR: a regular file in the path; EACCES ...
        blocker = _file_in_path(root) if exc.errno == errno.ENOTDIR else None
        if blocker is not None:
            return _fail("maildir", f"Maildir root {root} cannot be "
                                    f"{'created' if create else 'used'}: {blocker} is not a "
                                    "directory")
        return _fail("maildir", f"Maildir root {root}: {_why(exc)}")
    if st is not None:
        problem = _usable_dir(root, write=create)
        if problem is not None:
            return _fail("maildir", f"Maildir root {problem}"
                         + (" (create = true makes Maildirs in it)" if create else ""))
        if create:
            return Probe(True, f"Maildir root {root}: writable directory (create = true)")
        return _catch_all(delivery, f"Maildir root {root}: directory (create = false: "
                                    "each recipient's Maildir must exist)")
    if not create:
        return _fail("maildir", f"Maildir root {root} does not exist (create = false: every "
                                "recipient would be refused as unknown, 550 5.1.1)")
    ancestor = root.parent
    while True:
        try:
            os.stat(ancestor)
            break
        except FileNotFoundError:
            ancestor = ancestor.parent
        except OSError as exc:
            return _fail("maildir", f"Maildir root {root} cannot be created: "
                                    f"{ancestor}: {_why(exc)}")
    problem = _usable_dir(ancestor, write=True)
    if problem is not None:
        return _fail("maildir", f"Maildir root {root} cannot be created: {problem}")
    return Probe(True, f"Maildir root {root}: does not exist yet, can be created in "
                       f"{ancestor} (create = true)")


def _catch_all(delivery: MaildirDelivery, ok_detail: str) -> Probe:
    if delivery.catch_all is None:
        return Probe(True, ok_detail)
    maildir = delivery.maildir_for(*delivery.catch_all)
    problem = _usable_dir(maildir, write=True)
    if problem is not None:
        return _fail("maildir", f"catch-all Maildir {problem} (create = false)")
    return Probe(True, f"{ok_detail}; catch-all Maildir {maildir}: writable")


# --- LMTP and SMTP -----------------------------------------------------------------------

async def probe_relay(delivery: RelayingDelivery, *, timeout: float = PROBE_TIMEOUT) -> Probe:
    """Connect, greeting, LHLO/EHLO, QUIT (see the module docstring)."""
    where = delivery.where
    hello = "LHLO" if delivery.lmtp else "EHLO"
    try:
        async with asyncio.timeout(timeout):
            conn = await delivery.connect()
    except (OSError, TimeoutError) as exc:
        reason = "timeout" if isinstance(exc, TimeoutError) else str(exc)
        return _fail("unavailable", f"{where}: cannot connect: {reason}")
    client = SMTPClient(conn, write_timeout=timeout)
    stage = "greeting"
    try:
        greeting = await client.read_reply(timeout)
        if not 200 <= greeting.code < 300:
            result = _fail("unavailable", f"{where}: greeting {_one_line(greeting)}")
        else:
            stage = hello
            reply = await client.command(f"{hello} {delivery.hostname}", timeout)
            if 200 <= reply.code < 300:
                result = Probe(True, f"{where}: {_one_line(greeting)}; {hello}: {reply.code} OK")
            else:
                result = _fail("unavailable", f"{where}: {hello} refused: {_one_line(reply)}")
        # QUIT whatever the answer (RFC 5321 §3.8): the verdict is known already.
        with contextlib.suppress(*PEER_ERRORS):
            await client.command("QUIT", timeout)
        return result
    except PEER_ERRORS as exc:
        reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return _fail("unavailable", f"{where}: {reason} during {stage}")
    finally:
        with contextlib.suppress(*PEER_ERRORS):
            await conn.close(timeout=2.0)


def _one_line(reply: Reply) -> str:
    """The reply's first line, enhanced code included (a greeting can be long)."""
    return str(Reply(reply.code, reply.enhanced, reply.lines[0]))
