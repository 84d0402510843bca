"""Leases name the process that holds them (issue 8, defect 5): a live
process's lease is never taken, a dead one's is taken at once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fermoposta.store import open_store
from fermoposta.store.holders import Holders

HOLDER = textwrap.dedent("""
    import sys, time
    from fermoposta.store import open_store
    store = open_store(sys.argv[1])
    assert store.acquire_leases(["example.org", "example.net"], "OTHERSESSION", 600.0)
    print("leased", flush=True)
    time.sleep(60)
""")


def _start_holder(data_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(data_dir)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "leased"
    return proc


def test_a_live_holders_lease_is_busy_and_a_dead_ones_is_free_at_once(tmp_path):
    store = open_store(tmp_path)
    proc = _start_holder(tmp_path)
    try:
        assert not store.acquire_leases(["example.org"], "MINE", 600.0)
        assert not store.acquire_leases(["example.net", "example.com"], "MINE", 600.0)
        assert store.acquire_leases(["example.com"], "MINE", 600.0)  # not leased by it
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # Ten minutes left on its lease, but its process is dead: free now.
    started = time.monotonic()
    assert store.acquire_leases(["example.org", "example.net"], "MINE", 600.0)
    assert time.monotonic() - started < 5
    # Its stale lock file is gone; ours stays while we live.
    names = [p.name for p in (tmp_path / "holders").iterdir()]
    assert len(names) == 1
    # And now ours is busy for another store of this process (a live holder).
    other = type(store)(store.path)
    assert other.acquire_leases(["example.org"], "THIRD", 600.0) is False
    other.close()
    store.close()


def test_a_lease_without_a_holder_waits_for_its_expiry(tmp_path):
    now = [1000.0]
    store = open_store(tmp_path)
    store2 = type(store)(store.path, clock=lambda: now[0])
    assert store2.acquire_leases(["example.org"], "OLD", 60.0)
    # A row written before schema 5 (no holder): only expiry frees it.
    with sqlite3.connect(store.path) as raw:
        raw.execute("UPDATE leases SET holder = ''")
    raw.close()
    store3 = type(store)(store.path, clock=lambda: now[0])
    assert not store3.acquire_leases(["example.org"], "NEW", 60.0)
    now[0] += 61
    assert store3.acquire_leases(["example.org"], "NEW", 60.0)
    for s in (store, store2, store3):
        s.close()


def test_holder_names_that_are_not_file_names_count_as_alive(tmp_path):
    holders = Holders(tmp_path / "holders")
    me = holders.me()
    assert holders.is_alive(me)
    assert holders.is_alive("../../etc/passwd")
    assert holders.is_alive("")
    assert not holders.is_alive("somehost-123-deadbeef")  # no such file: dead
    holders.close()
    assert not (tmp_path / "holders" / f"{me}.lock").exists()
