"""A SQLite store's WAL made at its full size before the provider opens it.

A commit appends its pages to the WAL and fdatasyncs it.  While the WAL
grows, each fdatasync also writes the file's metadata (its new blocks and
size: the journal's commit on a journalling file system, the inode and the
block bitmap without one); once it has reached `journal_size_limit` and
starts again from its beginning, commits overwrite blocks that exist and
their fdatasync writes only data.  Measured on the benchmark machine (ext4
on a virtual disk): a 4 KiB append-and-fdatasync 220-265 µs, an overwrite
125-145 µs; one SMTP session's intake ran at about 940 msgs/s while a new
WAL grew to 64 MiB (its first 1,300 messages) and 1,250 after
(bench/README.md, seventeenth session).  SQLite deletes the WAL when its
last connection closes, so every start of the provider began that growth
again.

Contract:
- `presize_wal(database, size)` creates `<database>-wal` as `size` bytes
  of zeros, only when the database file exists, is in WAL mode (its header
  says so) and has no WAL file: no connection has it open then (SQLite
  keeps the WAL while one does, and deletes it only after the last one
  checkpointed everything), so nothing committed can be in a WAL this
  replaces.  It never overwrites a file: the zeros are written and
  fsynced under a name of their own, then linked to `<database>-wal`,
  which fails if a WAL appeared meanwhile (another process opening the
  store); then nothing is done.  Another process that opens the WAL sees
  all of it or nothing.
- A WAL of zeros is an empty WAL to SQLite: its header's magic number
  and checksums do not match, so recovery finds no frames and the first
  commit writes a new header over it.  A crash anywhere in here leaves at
  most that file, or a stray `.<database>-wal.*` temporary file, which the
  next call removes first (one another process is still writing then
  fails to link, and that process opens the store as before).
- Returns True when it made the WAL; False when it did nothing: the
  conditions above, or less than `size` + `FREE_MARGIN` bytes free on the
  file system (the WAL must not take the room the mail needs) or no way
  to tell (`statvfs` failed), or an error while writing (logged; the
  temporary file removed).  It never raises `OSError`: the store opens
  either way, the WAL then grows as before.
- Called by `SQLiteStore(presize_wal=True)`, which `provider run` asks for
  (a long-lived writer), never by the admin commands.  For a brand-new
  (empty) file the store first puts it in WAL mode with a connection it
  closes at once, so that a new store's first run gets its WAL too.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("fermoposta.store")

__all__ = ["FREE_MARGIN", "presize_wal"]

FREE_MARGIN = 1 << 30  # bytes that must stay free on the file system besides the WAL
_CHUNK = 1 << 20
# The database header's bytes 18 and 19, the file format's write and read
# versions: 2 and 2 in WAL mode (https://www.sqlite.org/fileformat2.html §1.3).
_WAL_MODE = b"\x02\x02"


def presize_wal(database: Path, size: int) -> bool:
    wal = database.with_name(database.name + "-wal")
    try:
        with open(database, "rb") as f:
            header = f.read(20)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.info("store WAL not made ahead: cannot read %s: %s", database, exc)
        return False
    if header[18:20] != _WAL_MODE or os.path.lexists(wal):
        return False
    _remove_strays(database.parent, f".{wal.name}.")
    free = _free_bytes(database.parent)
    if free is None:
        log.info("store WAL not made ahead: cannot tell the free space in %s",
                 database.parent)
        return False
    if free < size + FREE_MARGIN:
        log.info("store WAL not made ahead at %d MiB: too little free space in %s",
                 size >> 20, database.parent)
        return False
    try:
        descriptor, name = tempfile.mkstemp(prefix=f".{wal.name}.", dir=database.parent)
    except OSError as exc:
        log.info("store WAL not made ahead: %s: %s", database.parent, exc)
        return False
    temporary = Path(name)
    try:
        try:
            _write_zeros(descriptor, size)
        finally:
            os.close(descriptor)
        os.link(temporary, wal)
    except OSError as exc:
        if exc.errno != errno.EEXIST:  # EEXIST: another process opened the store
            log.info("store WAL not made ahead: %s: %s", wal, exc)
        return False
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
    _sync_directory(database.parent)
    log.info("store WAL %s made at %d MiB: commits overwrite it instead of growing it",
             wal, size >> 20)
    return True


def _remove_strays(directory: Path, prefix: str) -> None:
    """The temporary files of calls that died before they linked theirs."""
    with contextlib.suppress(OSError):
        for stray in directory.glob(glob.escape(prefix) + "*"):
            with contextlib.suppress(OSError):
                stray.unlink()


def _free_bytes(directory: Path) -> int | None:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _write_zeros(descriptor: int, size: int) -> None:
    zeros = bytes(_CHUNK)
    left = size
    while left > 0:
        left -= os.write(descriptor, zeros[: min(left, _CHUNK)])
    os.fsync(descriptor)


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
