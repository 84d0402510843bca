"""The lifecycle of `store.pg_domain_cache.DomainCache`, without a server:
its listener's connection is a stand-in that fails or blocks on demand.
What it caches against a real PostgreSQL is tested in test_postgres_engine.py."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from fermoposta.store import pg_domain_cache
from fermoposta.store.pg_domain_cache import DomainCache


def test_close_before_start_and_start_after_close_do_nothing() -> None:
    calls: list[int] = []

    def connect() -> Any:
        calls.append(1)
        raise OSError("no server (test)")

    cache = DomainCache(connect)
    cache.close()
    cache.start()
    time.sleep(0.1)
    assert calls == []
    assert cache.lookup("a.example") == (False, None)


def test_close_while_the_listener_connects(caplog: pytest.LogCaptureFixture) -> None:
    """close() returns although the connection attempt is still under way;
    the attempt then ends without making the cache live or logging."""
    entered = threading.Event()
    release = threading.Event()

    def connect() -> Any:
        entered.set()
        release.wait(5)
        raise OSError("refused (test)")

    cache = DomainCache(connect)
    cache.start()
    assert entered.wait(5)
    with caplog.at_level(logging.INFO, logger="fermoposta.store"):
        started = time.monotonic()
        cache.close()
        assert time.monotonic() - started < 3
        release.set()
        time.sleep(0.2)
    generation = cache.generation()
    cache.keep("a.example", None, generation)
    assert cache.lookup("a.example") == (False, None)
    assert not [r for r in caplog.records if "LISTEN" in r.getMessage()]


def test_any_listener_failure_keeps_the_cache_off_and_is_retried(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Not only psycopg's errors: a failure the listener did not expect
    disables the cache and is retried, with one warning."""
    monkeypatch.setattr(pg_domain_cache, "RETRY", 0.05)
    attempts: list[float] = []

    def connect() -> Any:
        attempts.append(time.monotonic())
        raise RuntimeError("unexpected (test)")

    cache = DomainCache(connect)
    with caplog.at_level(logging.WARNING, logger="fermoposta.store"):
        cache.start()
        deadline = time.monotonic() + 5
        while len(attempts) < 3:
            assert time.monotonic() < deadline, "the listener stopped retrying"
            time.sleep(0.02)
        cache.keep("a.example", None, cache.generation())
        assert cache.lookup("a.example") == (False, None)
        cache.close()
    warnings = [r for r in caplog.records if "cannot LISTEN" in r.getMessage()]
    assert len(warnings) == 1 and "unexpected (test)" in warnings[0].getMessage()
