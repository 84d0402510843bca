"""`store.sqlite_wal`: a closed store's WAL made at its full size before the
provider opens it, and never a WAL that may hold committed frames."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fermoposta.store import SQLiteStore, sqlite_wal
from fermoposta.store.base import MessageOrigin, NewMessage, NewRecipient, RecipientState
from fermoposta.store.sqlite_checkpoint import WAL_SIZE_LIMIT
from fermoposta.store.sqlite_wal import FREE_MARGIN, presize_wal

SIZE = 1 << 20  # what the function is asked for in most tests: quick to write


def hold(store: SQLiteStore, n: int) -> None:
    for i in range(n):
        message = NewMessage(sender="a@sender.test", origin=MessageOrigin.MX, client="test",
                             recipients=(NewRecipient(f"b{i}@example.org", "example.org",
                                                      RecipientState.HELD),))
        store.enqueue(message, io.BytesIO(b"Subject: %d\r\n\r\nbody\r\n" % i))


def wal_of(database: Path) -> Path:
    return database.with_name(database.name + "-wal")


def wal_mode_database(path: Path) -> Path:
    """A closed database in WAL mode with one row (SQLite deleted its WAL)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x TEXT)")
    conn.execute("INSERT INTO t VALUES ('before')")
    conn.close()
    assert not wal_of(path).exists()
    return path


def provider_run_holds(path: Path, n: int, *, expected: int) -> None:
    """A provider's store (`presize_wal`) finds a full WAL, holds `n` more
    messages in it without growing it, and `expected` are held after."""
    store = SQLiteStore(path, presize_wal=True)
    try:
        assert wal_of(path).stat().st_size == WAL_SIZE_LIMIT
        hold(store, n)
        # Written over, not grown: the file keeps its size.
        assert wal_of(path).stat().st_size == WAL_SIZE_LIMIT
    finally:
        store.close()
    store = SQLiteStore(path)
    try:
        assert len(store.held_message_ids(["example.org"])) == expected
    finally:
        store.close()


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_provider_store_gets_a_full_wal_and_keeps_every_message(tmp_path: Path) -> None:
    path = tmp_path / "fermoposta.sqlite3"
    store = SQLiteStore(path)
    hold(store, 1)
    store.close()
    assert not wal_of(path).exists()

    provider_run_holds(path, 30, expected=31)


def test_a_store_without_the_flag_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "fermoposta.sqlite3"
    SQLiteStore(path).close()
    store = SQLiteStore(path)
    try:
        assert wal_of(path).stat().st_size < WAL_SIZE_LIMIT
    finally:
        store.close()


def test_zeros_are_an_empty_wal_to_sqlite(tmp_path: Path) -> None:
    path = wal_mode_database(tmp_path / "db.sqlite3")
    assert presize_wal(path, SIZE)
    assert wal_of(path).read_bytes() == bytes(SIZE)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO t VALUES ('after')")
    conn.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT x FROM t ORDER BY rowid").fetchall() == [("before",), ("after",)]
    conn.close()


def test_a_wal_left_by_a_crash_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    # A writer killed after its commit: the row is only in the WAL's frames.
    script = (
        "import os, sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "conn.execute('PRAGMA journal_mode = WAL')\n"
        "conn.execute('PRAGMA wal_autocheckpoint = 0')\n"
        "conn.execute('CREATE TABLE t (x TEXT)')\n"
        "conn.execute(\"INSERT INTO t VALUES ('committed')\")\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=30)
    wal = wal_of(path)
    before = hashlib.sha256(wal.read_bytes()).hexdigest()
    assert wal.stat().st_size > 0

    assert not presize_wal(path, SIZE)
    assert hashlib.sha256(wal.read_bytes()).hexdigest() == before
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT x FROM t").fetchall() == [("committed",)]
    conn.close()


def test_a_store_open_elsewhere_is_left_alone(tmp_path: Path) -> None:
    path = wal_mode_database(tmp_path / "db.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("INSERT INTO t VALUES ('open')")
        size = wal_of(path).stat().st_size
        assert not presize_wal(path, SIZE)
        assert wal_of(path).stat().st_size == size
    finally:
        conn.close()


def test_only_an_existing_database_in_wal_mode(tmp_path: Path) -> None:
    assert not presize_wal(tmp_path / "missing.sqlite3", SIZE)
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    assert not presize_wal(empty, SIZE)
    rollback = tmp_path / "rollback.sqlite3"
    conn = sqlite3.connect(rollback)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    assert not presize_wal(rollback, SIZE)
    assert files_in(tmp_path) == ["empty.sqlite3", "rollback.sqlite3"]


def test_the_free_space_margin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               caplog: pytest.LogCaptureFixture) -> None:
    path = wal_mode_database(tmp_path / "db.sqlite3")
    free = [SIZE + FREE_MARGIN - 1]
    monkeypatch.setattr(sqlite_wal, "_free_bytes", lambda directory: free[0])
    with caplog.at_level(logging.INFO, logger="fermoposta.store"):
        assert not presize_wal(path, SIZE)
    assert f"too little free space in {tmp_path}" in caplog.text
    assert files_in(tmp_path) == ["db.sqlite3"]
    free[0] += 1
    assert presize_wal(path, SIZE)
    assert wal_of(path).stat().st_size == SIZE


def test_free_space_that_cannot_be_told_makes_no_wal(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = wal_mode_database(tmp_path / "db.sqlite3")

    def unknown(directory: object) -> os.statvfs_result:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(sqlite_wal.os, "statvfs", unknown)
    with caplog.at_level(logging.INFO, logger="fermoposta.store"):
        assert not presize_wal(path, SIZE)
    assert f"cannot tell the free space in {tmp_path}" in caplog.text
    assert files_in(tmp_path) == ["db.sqlite3"]


def test_a_write_error_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    path = wal_mode_database(tmp_path / "db.sqlite3")

    def full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sqlite_wal.os, "fsync", full)
    with caplog.at_level(logging.INFO, logger="fermoposta.store"):
        assert not presize_wal(path, SIZE)
    assert "store WAL not made ahead" in caplog.text and "No space left" in caplog.text
    assert files_in(tmp_path) == ["db.sqlite3"]
    # The store still opens, its WAL made by SQLite as before.
    monkeypatch.undo()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT x FROM t").fetchall() == [("before",)]
    conn.close()


def test_a_wal_made_meanwhile_by_another_process_wins(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = wal_mode_database(tmp_path / "db.sqlite3")
    write_zeros = sqlite_wal._write_zeros

    def raced(descriptor: int, size: int) -> None:
        write_zeros(descriptor, size)
        wal_of(path).write_bytes(b"another process's WAL")

    monkeypatch.setattr(sqlite_wal, "_write_zeros", raced)
    with caplog.at_level(logging.INFO, logger="fermoposta.store"):
        assert not presize_wal(path, SIZE)
    assert wal_of(path).read_bytes() == b"another process's WAL"
    assert files_in(tmp_path) == ["db.sqlite3", "db.sqlite3-wal"]
    assert "not made ahead" not in caplog.text  # the usual race, nothing to tell


def test_a_stray_temporary_file_of_a_crash_is_removed(tmp_path: Path) -> None:
    path = wal_mode_database(tmp_path / "db.sqlite3")
    stray = tmp_path / ".db.sqlite3-wal.k1ll3d"
    stray.write_bytes(bytes(4096))
    other = tmp_path / ".other-file"
    other.write_bytes(b"kept")
    assert presize_wal(path, SIZE)
    assert files_in(tmp_path) == [".other-file", "db.sqlite3", "db.sqlite3-wal"]


def test_a_brand_new_store_gets_a_full_wal_at_its_first_run(tmp_path: Path) -> None:
    # `provider run` before any admin command made the file: it is empty
    # (not in WAL mode yet) when the store opens it.
    provider_run_holds(tmp_path / "fermoposta.sqlite3", 3, expected=3)
