"""Local delivery into Maildirs (two-phase: tmp, fsync, rename to new, fsync).

Contract:
- `MaildirDelivery(path_template, create=, aliases=, catch_all=, hostname=)`
  maps each recipient to a Maildir with `path_template`, a `str.format`
  template over {domain}, {local} and {address} (= "{local}@{domain}"); the
  local part and domain are lowercased (a quoted local part is unquoted).  A
  template naming any other field raises ValueError at construction.
- Path safety: a local part or domain that is empty or contains "/", NUL or a
  control character, that is "." or "..", contains "..", or starts with "."
  cannot name a Maildir: 550 5.1.3 (it could escape the mail directory or
  reach a hidden one).  Alias targets and the catch-all are checked the same
  way at construction (ValueError).
- Resolution, at RCPT time (`check_recipient`) and again at delivery: the
  lowercased address is looked up in `aliases` (one level; the target is an
  address "local@domain" formatted through the same template); then the
  Maildir directory must exist unless `create` is true; otherwise
  `catch_all` (an address) is used if set, else 550 5.1.1 "user unknown".
  A filesystem error while checking (anything but "does not exist", e.g. a
  path whose parent is a regular file, or a non-directory at the Maildir
  path) is 451 4.3.0: never a bounce for a local fault.
- `deliver()` is all-or-nothing for the whole transaction
  (`max_recipients = None`); `transaction()` is a `WholeMessageTransaction`
  (base.py): `check_recipient()` at RCPT, `deliver()` after the dot.  Phase 1 writes one file per
  distinct target Maildir to `<maildir>/tmp/<unique>` (O_EXCL, mode 0600), streaming from
  `body` in 64 KiB chunks (bounded memory), prefixed with
  "Delivered-To: <envelope recipient>" (unless `delivered_to=False`), with
  CRLF line ends converted to LF (the Maildir convention; bare CRs are kept),
  then fsync()s and closes it.  Phase 2 renames every file into `new/` and
  fsync()s each `new/` directory.  Only then: 250 2.0.0, `where` =
  "maildir:<path of the file in new/>" (several joined by ", ").
- Failure: any error in phase 1 removes every tmp file of the transaction and
  answers 451 4.3.0, or 452 4.3.1 for ENOSPC/EDQUOT (the provider keeps the
  mail).  An error in phase 2 (rename or directory fsync) removes the files
  already renamed into new/ and the remaining tmp files (best effort) and
  answers 451 4.3.0; only if a mail reader took one of those files in the
  meantime can a duplicate result, never a loss.
- Group commit (`stage`, `commit_staged`, `discard_staged`; the reversed
  session uses it when the provider keeps several messages in flight):
  `stage` is phase 1 without the fsync (it only starts the file's
  writeback, `writeback.start_writeback`, a hint); `commit_staged` then, for a group of
  staged messages, fsync()s each tmp file, renames each message's files into
  `new/` and fsync()s each `new/` directory ONCE for the whole group, and
  gives one outcome per message (250 only after all that).  A message whose
  fsync or rename fails is rolled back alone (451/452); a failed directory
  fsync rolls back every message of the group.  `discard_staged` removes
  the tmp files of messages that will not be committed (the session ended
  before their reply).
- Recipients resolving to the same Maildir (aliases, catch-all) get one copy;
  its Delivered-To names the first of them.
- `create=True` creates missing Maildirs (and parents) with mode 0700 and
  fsync()s each parent directory it changed, so the new Maildir survives a
  crash with the message.  With `create=False` a missing tmp/new/cur inside an
  existing Maildir directory is created the same way (what every MDA does).
  A Maildir found complete is not checked again for each message; if its
  tmp/ or new/ has gone since, the file's creation or its rename fails and
  the Maildir is checked (and completed) again, once.
- Unique names follow the Maildir spec: "<seconds>.M<usec>P<pid>Q<n>R<random>.
  <hostname>" with "/" and ":" in the host name escaped as \\057 and \\072.
- File system work runs in a worker thread (`asyncio.to_thread`); the event
  loop never blocks on fsync.  With `create=True` a RCPT check touches no
  file (the Maildir is made at delivery) and runs on the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import secrets
import stat
import string
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fermoposta.customer.delivery.base import (
    DeliveryOutcome,
    LocalEnvelope,
    LocalRecipient,
    LocalSender,
    WholeMessageTransaction,
)
from fermoposta.customer.delivery.writeback import start_writeback
from fermoposta.smtp.reply import Reply

__all__ = ["MaildirDelivery", "Staged"]

log = logging.getLogger("fermoposta.delivery")

CHUNK = 64 * 1024
DIR_MODE = 0o700
FILE_MODE = 0o600
TEMPLATE_FIELDS = frozenset({"domain", "local", "address"})
_DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_UNQUOTE = re.compile(r"\\(.)")

BAD_ADDRESS = Reply(550, "5.1.3", "Recipient address not usable for local delivery")
USER_UNKNOWN = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
LOCAL_ERROR = Reply(451, "4.3.0", "Local delivery failed, try again later")
DISK_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")


class _Unsafe(ValueError):
    """A local part or domain that cannot safely name a directory."""


class _Unknown(Exception):
    """No Maildir for this address and no catch-all."""


def _safe_component(value: str, what: str) -> str:
    if (
        not value
        or value.startswith(".")
        or ".." in value
        or "/" in value
        or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)
    ):
        raise _Unsafe(f"{what} {value!r} cannot name a Maildir")
    return value


def _split(address: str) -> tuple[str, str]:
    """Split "local@domain" at the last "@"; unquote a quoted local part; lowercase."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        raise _Unsafe(f"address {address!r} has no domain")
    return _normalize(local, domain)


def _normalize(local: str, domain: str) -> tuple[str, str]:
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = _UNQUOTE.sub(r"\1", local[1:-1])
    local, domain = local.lower(), domain.lower().rstrip(".")
    return _safe_component(local, "local part"), _safe_component(domain, "domain")


def _unique_host(hostname: str) -> str:
    return hostname.replace("/", "\\057").replace(":", "\\072")


def _fsync_dir(path: Path) -> None:
    _fsync_path(path, getattr(os, "O_DIRECTORY", 0))


def _fsync_file(path: Path) -> None:
    _fsync_path(path, getattr(os, "O_CLOEXEC", 0))


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """mkdir -p with mode 0700, fsync()ing the parent of every directory created."""
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue
        _fsync_dir(directory.parent)


@dataclass
class _Target:
    maildir: Path
    address: str  # the envelope recipient, for Delivered-To
    tmp: Path | None = None
    new: Path | None = None


@dataclass
class Staged:
    """A message written to tmp/ in each of its Maildirs, not yet committed."""

    envelope: LocalEnvelope
    targets: list[_Target]


class MaildirDelivery:
    """Deliver into Maildirs; see the module docstring."""

    name = "maildir"
    max_recipients: int | None = None

    def transaction(self, start: LocalSender) -> WholeMessageTransaction:
        return WholeMessageTransaction(self, start)

    def __init__(
        self,
        path_template: str,
        *,
        create: bool,
        aliases: Mapping[str, str],
        catch_all: str | None,
        hostname: str,
        delivered_to: bool = True,
    ) -> None:
        fields = {f for _, f, _, _ in string.Formatter().parse(path_template) if f is not None}
        unknown = fields - TEMPLATE_FIELDS
        if unknown:
            raise ValueError(
                f"Maildir path template {path_template!r}: unknown field(s) "
                f"{', '.join(sorted('{' + f + '}' for f in unknown))}; "
                "use {domain}, {local} or {address}"
            )
        if not fields & {"local", "address"}:
            raise ValueError(
                f"Maildir path template {path_template!r} names no {{local}} or {{address}}: "
                "every user would share one Maildir"
            )
        self.path_template = path_template
        self.create = create
        self.catch_all: tuple[str, str] | None = None
        self.aliases: dict[str, tuple[str, str]] = {}
        try:
            for key, target in aliases.items():
                self.aliases[key.strip().lower()] = _split(target.strip())
            if catch_all is not None:
                self.catch_all = _split(catch_all.strip())
        except _Unsafe as exc:
            raise ValueError(f"Maildir delivery: {exc}") from None
        self.hostname = hostname
        self.delivered_to = delivered_to
        self._counter = 0
        self._lock = threading.Lock()
        # Maildirs found complete (`_create_tmp`); set operations are atomic
        # under the GIL, and a stale entry only costs one failed open.
        self._prepared: set[Path] = set()

    # --- resolution ----------------------------------------------------------------------
    def maildir_for(self, local: str, domain: str) -> Path:
        """The Maildir of a (normalized, safe) local part and domain."""
        return Path(
            self.path_template.format(local=local, domain=domain, address=f"{local}@{domain}")
        )

    def _resolve(self, rcpt: LocalRecipient) -> Path:
        """The recipient's Maildir; raises _Unsafe, _Unknown or OSError (see docstring)."""
        local, domain = _normalize(rcpt.local, rcpt.domain)
        local, domain = self.aliases.get(f"{local}@{domain}", (local, domain))
        maildir = self.maildir_for(local, domain)
        if self.create or self._exists(maildir):
            return maildir
        if self.catch_all is not None:
            maildir = self.maildir_for(*self.catch_all)
            if self._exists(maildir):
                return maildir
            log.warning("catch-all Maildir %s does not exist", maildir)
        raise _Unknown(str(maildir))

    @staticmethod
    def _exists(maildir: Path) -> bool:
        """True for a directory, False if absent; OSError for anything else."""
        try:
            st = os.stat(maildir)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(maildir))
        return True

    def _check(self, rcpt: LocalRecipient) -> Reply | None:
        try:
            self._resolve(rcpt)
        except _Unsafe as exc:
            log.warning("refused <%s>: %s", rcpt.address, exc)
            return BAD_ADDRESS
        except _Unknown:
            return USER_UNKNOWN
        except OSError as exc:
            log.warning("cannot check the Maildir of <%s>: %s", rcpt.address, exc)
            return LOCAL_ERROR
        return None

    async def check_recipient(self, rcpt: LocalRecipient) -> Reply | None:
        if self.create:
            # Nothing to look up on disk (`_resolve` is string work only), so
            # no thread hop: one per message on the pull's critical path.
            return self._check(rcpt)
        return await asyncio.to_thread(self._check, rcpt)

    # --- delivery ------------------------------------------------------------------------
    def _unique(self) -> str:
        with self._lock:
            self._counter += 1
            counter = self._counter
        now = time.time()
        seconds = int(now)
        usec = int((now - seconds) * 1_000_000)
        return (
            f"{seconds}.M{usec}P{os.getpid()}Q{counter}R{secrets.token_hex(8)}."
            f"{_unique_host(self.hostname)}"
        )

    def _write_tmp(self, target: _Target, body: IO[bytes], *, sync: bool = True) -> None:
        """Phase 1 for one Maildir: tmp file written, fsync()ed (unless `sync` is
        false: `commit_staged` does it) and closed."""
        fd, name = self._create_tmp(target.maildir)
        path = target.maildir / "tmp" / name
        target.tmp = path
        with os.fdopen(fd, "wb") as out:
            if self.delivered_to and target.address.isprintable():
                out.write(f"Delivered-To: {target.address}\n".encode())
            body.seek(0)
            pending_cr = False
            while True:
                chunk = body.read(CHUNK)
                if not chunk:
                    break
                if pending_cr:
                    chunk = b"\r" + chunk
                pending_cr = chunk.endswith(b"\r")
                if pending_cr:
                    chunk = chunk[:-1]
                out.write(chunk.replace(b"\r\n", b"\n"))
            if pending_cr:
                out.write(b"\r")
            out.flush()
            if sync:
                os.fsync(out.fileno())
            else:
                # The commit's fsync then finds the data written and shares
                # journal commits with the group's other files (writeback.py).
                start_writeback(out.fileno())
        target.new = target.maildir / "new" / name

    def _prepare(self, maildir: Path) -> None:
        """The Maildir and its tmp/, new/ and cur/ exist (made durably if not)."""
        if self.create:
            _makedirs_durable(maildir)
        for sub in ("tmp", "new", "cur"):
            if not (maildir / sub).is_dir():
                _makedirs_durable(maildir / sub)

    def _rename_into_new(self, target: _Target) -> None:
        """tmp/ to new/; a new/ that has gone since the Maildir was checked
        (`_create_tmp`) is made again, once."""
        assert target.tmp is not None and target.new is not None
        try:
            os.rename(target.tmp, target.new)
        except FileNotFoundError:
            self._prepared.discard(target.maildir)
            if not target.tmp.exists():
                raise
            self._prepare(target.maildir)
            self._prepared.add(target.maildir)
            os.rename(target.tmp, target.new)

    def _create_tmp(self, maildir: Path) -> tuple[int, str]:
        """A new file in `maildir`/tmp (O_EXCL): its descriptor and name.  A
        Maildir checked once is not checked again before each file (those
        stats cost as much as the file's creation); if it has gone since,
        the creation fails, and the Maildir is checked and made again once."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        if maildir not in self._prepared:
            self._prepare(maildir)
            self._prepared.add(maildir)
        checked_again = False
        while True:
            name = self._unique()
            try:
                return os.open(maildir / "tmp" / name, flags, FILE_MODE), name
            except FileExistsError:  # pragma: no cover - needs a random collision
                continue
            except FileNotFoundError:
                self._prepared.discard(maildir)
                if checked_again:
                    raise
                self._prepare(maildir)
                self._prepared.add(maildir)
                checked_again = True

    def _targets(self, envelope: LocalEnvelope) -> list[_Target]:
        targets: dict[Path, _Target] = {}
        for rcpt in envelope.recipients:
            maildir = self._resolve(rcpt)
            if maildir not in targets:
                targets[maildir] = _Target(maildir, rcpt.address)
        return list(targets.values())

    def _deliver(self, envelope: LocalEnvelope, body: IO[bytes]) -> DeliveryOutcome:
        staged = self._stage(envelope, body, sync=True)
        if isinstance(staged, DeliveryOutcome):
            return staged
        return self._commit([staged], synced=True)[0]

    def _stage(self, envelope: LocalEnvelope, body: IO[bytes], *, sync: bool
               ) -> Staged | DeliveryOutcome:
        """Phase 1: every copy written in tmp/ (and fsync()ed if `sync`)."""
        try:
            targets = self._targets(envelope)
        except (_Unsafe, _Unknown) as exc:
            # Accepted at RCPT time, gone now (e.g. a Maildir removed meanwhile).
            log.warning("%s: recipient no longer deliverable: %s", envelope.queue_hint, exc)
            return DeliveryOutcome(LOCAL_ERROR, "maildir")
        except OSError as exc:
            log.warning("%s: cannot resolve Maildirs: %s", envelope.queue_hint, exc)
            return DeliveryOutcome(_reply_for(exc), "maildir")
        if not targets:
            return DeliveryOutcome(LOCAL_ERROR, "maildir")
        try:
            for target in targets:
                self._write_tmp(target, body, sync=sync)
        except OSError as exc:
            log.warning("%s: Maildir write failed (%s), nothing delivered",
                        envelope.queue_hint, exc)
            self._discard(targets)
            return DeliveryOutcome(_reply_for(exc), _where(targets, committed=False))
        except BaseException:
            self._discard(targets)
            raise
        return Staged(envelope, targets)

    def _commit(self, group: list[Staged], *, synced: bool) -> list[DeliveryOutcome]:
        """Phase 2 for every message of `group`: its tmp files fsync()ed
        (unless `synced`), renamed into new/, then each new/ directory
        fsync()ed once for the whole group.  A message that fails is rolled
        back alone; a failed directory fsync rolls back every message."""
        outcomes: list[DeliveryOutcome | None] = [None] * len(group)
        for i, staged in enumerate(group):
            try:
                if not synced:
                    for target in staged.targets:
                        assert target.tmp is not None
                        _fsync_file(target.tmp)
                renamed: list[_Target] = []
                try:
                    for target in staged.targets:
                        self._rename_into_new(target)
                        renamed.append(target)
                except OSError:
                    self._roll_back(staged, renamed)
                    raise
            except OSError as exc:
                log.error("%s: Maildir commit failed (%s); rolled back",
                          staged.envelope.queue_hint, exc)
                self._discard(staged.targets)
                outcomes[i] = DeliveryOutcome(_reply_for(exc),
                                              _where(staged.targets, committed=False))
        kept = [i for i, outcome in enumerate(outcomes) if outcome is None]
        try:
            for directory in dict.fromkeys(t.maildir / "new" for i in kept
                                           for t in group[i].targets):
                _fsync_dir(directory)
        except OSError as exc:
            for i in kept:
                log.error("%s: Maildir commit failed (%s); rolling back",
                          group[i].envelope.queue_hint, exc)
                self._roll_back(group[i], group[i].targets)
                outcomes[i] = DeliveryOutcome(_reply_for(exc),
                                              _where(group[i].targets, committed=False))
        done: list[DeliveryOutcome] = []
        for staged, outcome in zip(group, outcomes, strict=True):
            if outcome is None:
                count = len(staged.targets)
                text = f"Delivered to {count} mailbox{'es' if count != 1 else ''}"
                outcome = DeliveryOutcome(Reply(250, "2.0.0", text),
                                          _where(staged.targets, committed=True))
            done.append(outcome)
        return done

    @staticmethod
    def _roll_back(staged: Staged, renamed: list[_Target]) -> None:
        for target in renamed:
            assert target.new is not None
            try:
                os.unlink(target.new)
            except OSError as unlink_exc:
                log.error("%s: could not roll back %s (%s): a duplicate is possible",
                          staged.envelope.queue_hint, target.new, unlink_exc)

    @staticmethod
    def _discard(targets: list[_Target]) -> None:
        for target in targets:
            if target.tmp is not None:
                try:
                    os.unlink(target.tmp)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("could not remove %s: %s", target.tmp, exc)

    async def deliver(self, envelope: LocalEnvelope, body: IO[bytes], size: int
                      ) -> DeliveryOutcome:
        return await asyncio.to_thread(self._deliver, envelope, body)

    # --- group commit (the reversed session with several messages in flight) -------------
    async def stage(self, envelope: LocalEnvelope, body: IO[bytes]) -> Staged | DeliveryOutcome:
        """Phase 1 without fsync: the copies in tmp/, or the failure."""
        return await asyncio.to_thread(self._stage, envelope, body, sync=False)

    async def commit_staged(self, group: Sequence[Staged]) -> list[DeliveryOutcome]:
        """Phase 2 for several staged messages at once, one outcome each."""
        return await asyncio.to_thread(self._commit, list(group), synced=False)

    async def discard_staged(self, group: Sequence[Staged]) -> None:
        """Remove the tmp files of staged messages that will not be committed."""
        await asyncio.to_thread(self._discard, [t for staged in group for t in staged.targets])

    async def close(self) -> None:
        return None


def _reply_for(exc: OSError) -> Reply:
    return DISK_FULL if exc.errno in _DISK_FULL else LOCAL_ERROR


def _where(targets: list[_Target], *, committed: bool) -> str:
    """The files in new/ once committed, else the Maildirs that were tried."""
    paths = [t.new if committed and t.new is not None else t.maildir for t in targets]
    return ", ".join(f"maildir:{path}" for path in paths) or "maildir"
