"""The submission rate limit is counted in the store (issue 9): every process
and node on one store shares an account's count."""

from __future__ import annotations

from pathlib import Path

import pytest

from fermoposta.provider.submission import RateLimiter
from fermoposta.store import SQLiteStore, StoreError


def test_two_processes_on_one_store_share_the_count(tmp_path: Path) -> None:
    now = [1_000_000.0]
    one, two = SQLiteStore(tmp_path / "s.sqlite3"), SQLiteStore(tmp_path / "s.sqlite3")
    a = RateLimiter(one, 3, 60.0, clock=lambda: now[0])
    b = RateLimiter(two, 3, 60.0, clock=lambda: now[0])
    for limiter in (a, b, a):
        assert limiter.allows("acme")
        limiter.record("acme")
        now[0] += 1
    assert not a.allows("acme") and not b.allows("acme")
    assert a.allows("other") and b.allows("other")  # per account
    now[0] += 57  # the first event (at +0) is 60 s old now: out of the window
    assert a.allows("acme") and b.allows("acme")
    b.record("acme")
    assert not a.allows("acme")
    one.close()
    two.close()


def test_off_when_the_limit_is_zero(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite3")
    limiter = RateLimiter(store, 0, 60.0)
    for _ in range(5):
        limiter.record("acme")
    assert limiter.allows("acme")
    assert store.count_events("submission:acme", 0.0) == 0  # nothing was written
    store.close()


def test_a_store_error_reaches_the_caller(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite3")
    limiter = RateLimiter(store, 1, 60.0)
    store.close()
    with pytest.raises(StoreError):
        limiter.allows("acme")
