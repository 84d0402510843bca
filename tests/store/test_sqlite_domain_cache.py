"""`store.sqlite_domain_cache`: the SQLite engine's MX lookups answered from a
per-process cache, emptied through the stamp file.  Two `SQLiteStore`s on one
file stand for two processes (the provider and a `fermoposta domain` command):
each has its own connections and its own cache."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from fermoposta.store import STORE_FILENAME, Account, Domain, SQLiteStore, sqlite_domain_cache
from fermoposta.store.sqlite_domain_cache import DomainCache, stamp_path


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / STORE_FILENAME


@pytest.fixture
def provider(path: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(path) as store:
        store.add_account(Account("alice", None, None))
        yield store


@pytest.fixture
def command(path: Path, provider: SQLiteStore) -> Iterator[SQLiteStore]:
    with SQLiteStore(path) as store:
        yield store


def statements(store: SQLiteStore) -> list[str]:
    seen: list[str] = []
    store._quick.set_trace_callback(seen.append)
    return seen


def test_a_cached_answer_reads_nothing(provider: SQLiteStore) -> None:
    provider.add_domain(Domain("a.example", "alice"))
    seen = statements(provider)
    first = provider.get_domain_now("a.example")
    assert first is not None and seen  # the first lookup reads the store
    seen.clear()
    assert provider.get_domain_now("a.example") == first
    assert provider.get_domain_now("a.example") is first
    assert seen == []
    assert provider.get_domain_now("nowhere.example") is None  # negative answers too
    seen.clear()
    assert provider.get_domain_now("nowhere.example") is None
    assert seen == []


def test_another_process_adds_a_domain_and_it_counts_at_once(
        provider: SQLiteStore, command: SQLiteStore) -> None:
    assert provider.get_domain_now("b.example") is None
    assert provider.get_domain_now("b.example") is None  # cached: not hosted
    command.add_domain(Domain("b.example", "alice", max_messages=5))
    found = provider.get_domain_now("b.example")
    assert found is not None and found.max_messages == 5


def test_updates_and_removals_by_another_process_count_at_once(
        provider: SQLiteStore, command: SQLiteStore) -> None:
    command.add_domain(Domain("c.example", "alice", valid_recipients=frozenset({"info"})))
    before = provider.get_domain_now("c.example")
    assert before is not None and before.valid_recipients == frozenset({"info"})
    command.update_domain(Domain("c.example", "alice", valid_recipients=frozenset({"sales"})))
    after = provider.get_domain_now("c.example")
    assert after is not None and after.valid_recipients == frozenset({"sales"})
    assert command.remove_domain("c.example")
    assert provider.get_domain_now("c.example") is None
    command.add_domain(Domain("c.example", "alice"))
    assert provider.get_domain_now("c.example") is not None
    assert command.remove_account("alice")  # its domains go with it
    assert provider.get_domain_now("c.example") is None


def test_the_writing_process_forgets_its_own_answers(provider: SQLiteStore) -> None:
    assert provider.get_domain_now("d.example") is None
    provider.add_domain(Domain("d.example", "alice"))
    assert provider.get_domain_now("d.example") is not None
    assert provider.remove_domain("d.example")
    assert provider.get_domain_now("d.example") is None


def test_a_change_without_the_stamp_counts_after_the_ttl(
        provider: SQLiteStore, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    provider.add_domain(Domain("e.example", "alice", max_messages=1))
    assert provider.get_domain_now("e.example").max_messages == 1  # type: ignore[union-attr]
    with sqlite3.connect(path) as raw:  # the sqlite3 shell: no stamp
        raw.execute("UPDATE domains SET max_messages = 2")
    assert provider.get_domain_now("e.example").max_messages == 1  # type: ignore[union-attr]
    now = sqlite_domain_cache.time.monotonic()
    monkeypatch.setattr(sqlite_domain_cache.time, "monotonic",
                        lambda: now + sqlite_domain_cache.TTL)
    assert provider.get_domain_now("e.example").max_messages == 2  # type: ignore[union-attr]


def test_without_a_stamp_nothing_is_cached(provider: SQLiteStore, path: Path) -> None:
    provider.add_domain(Domain("f.example", "alice", max_messages=1))
    stamp_path(path).unlink()
    assert provider.get_domain_now("f.example").max_messages == 1  # type: ignore[union-attr]
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE domains SET max_messages = 2")
    assert provider.get_domain_now("f.example").max_messages == 2  # type: ignore[union-attr]


def test_an_answer_read_before_a_stamp_is_not_given(tmp_path: Path) -> None:
    cache = DomainCache(tmp_path / "store")
    cache.open()
    generation = cache.generation()
    assert generation is not None
    other = DomainCache(tmp_path / "store")  # another process stamps meanwhile
    other.touched()
    cache.keep("g.example", None, generation)
    assert cache.lookup("g.example") == (False, None)
    cache.keep("g.example", None, cache.generation())
    assert cache.lookup("g.example") == (True, None)
    other.touched()
    assert cache.lookup("g.example") == (False, None)


def test_an_answer_read_while_this_process_changed_a_domain_is_not_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when the stamp cannot be written (so it does not move), this
    process's own change, made while the query ran, is not followed by the
    answer read before it."""
    cache = DomainCache(tmp_path / "store")
    cache.open()
    generation = cache.generation()

    def refuse(path: Path, flags: int) -> int:
        raise PermissionError(13, "Permission denied (test)")

    monkeypatch.setattr(cache, "_open", refuse)
    cache.touched()
    assert cache.generation()[1] == generation[1]  # the stamp did not move
    cache.keep("k.example", None, generation)
    assert cache.lookup("k.example") == (False, None)
    cache.keep("k.example", None, cache.generation())  # read after the change: kept
    assert cache.lookup("k.example") == (True, None)


def test_the_stamp_stays_small_and_keeps_changing(tmp_path: Path) -> None:
    cache = DomainCache(tmp_path / "store")
    cache.open()
    seen = {cache.generation()}
    for _ in range(sqlite_domain_cache.MAX_SIZE + 10):
        cache.touched()
        seen.add(cache.generation())
    assert len(seen) == sqlite_domain_cache.MAX_SIZE + 11  # every stamp a new state
    assert os.stat(cache.path).st_size <= sqlite_domain_cache.MAX_SIZE
    assert sorted(p.name for p in cache.path.parent.iterdir()) == [cache.path.name]


def test_a_stamp_that_cannot_be_written_is_logged_once(
        provider: SQLiteStore, path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stamp = stamp_path(path)
    stamp.unlink()
    stamp.mkdir()  # neither root nor anyone can open a directory for writing
    provider.add_domain(Domain("h.example", "alice"))
    assert provider.get_domain_now("h.example") is not None
    with caplog.at_level(logging.WARNING, logger="fermoposta.store"):
        assert provider.remove_domain("h.example")
        provider.add_domain(Domain("i.example", "alice"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(stamp) in warnings[0], warnings
    assert "within 10s" in warnings[0]
    # This process still forgot its own answers.
    assert provider.get_domain_now("h.example") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="only root creates files for another owner")
def test_root_creates_the_stamp_for_the_store_files_owner(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.touch(mode=0o600)
    os.chown(path, 12345, 12346)  # the daemon's user owns the store; root runs a command
    with SQLiteStore(path) as store:
        stamp = stamp_path(path)
        assert (stamp.stat().st_uid, stamp.stat().st_gid) == (12345, 12346)
        stamp.unlink()
        store.add_account(Account("alice", None, None))
        store.add_domain(Domain("j.example", "alice"))  # a missing stamp is made again
        assert (stamp.stat().st_uid, stamp.stat().st_gid) == (12345, 12346)


def test_a_stamp_that_cannot_be_made_is_no_warning_at_open_and_no_cache(
        path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: DomainCache, where: Path, flags: int) -> int:
        raise PermissionError(13, "Permission denied (test)")

    monkeypatch.setattr(DomainCache, "_open", refuse)
    with caplog.at_level(logging.WARNING, logger="fermoposta.store"), SQLiteStore(path) as store:
        assert not stamp_path(path).exists()
        assert [r.getMessage() for r in caplog.records] == []  # opening it: no warning
        store.add_account(Account("alice", None, None))
        store.add_domain(Domain("l.example", "alice", max_messages=1))  # a change: one
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        assert store.get_domain_now("l.example").max_messages == 1  # type: ignore[union-attr]
        with sqlite3.connect(path) as raw:
            raw.execute("UPDATE domains SET max_messages = 2")
        assert store.get_domain_now("l.example").max_messages == 2  # type: ignore[union-attr]
