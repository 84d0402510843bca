"""Outbound claims name the process that holds them (issue 9): a live
runner's claims are never taken, a dead one's are free at once instead of
after the claim's time to live (15 minutes in the outbound engine)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fermoposta.store import MessageOrigin, NewMessage, NewRecipient, RecipientState, SQLiteStore

CLAIMER = textwrap.dedent("""
    import sys, time
    from fermoposta.store import SQLiteStore
    store = SQLiteStore(sys.argv[1])
    got = store.claim_due_outbound(time.time(), 3, "RUNNER", 900.0)
    print(sum(len(m.recipients) for m in got), flush=True)
    time.sleep(60)
""")


def _outbound(store: SQLiteStore, n: int) -> None:
    for i in range(n):
        store.enqueue(NewMessage("s@sender.example", (
            NewRecipient(f"r{i}@remote.example", "remote.example", RecipientState.OUTBOUND),),
            MessageOrigin.SUBMISSION), io.BytesIO(b"body\r\n"))


def test_a_dead_runners_claims_are_free_at_once_and_a_live_ones_never(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    store = SQLiteStore(path)
    _outbound(store, 5)
    proc = subprocess.Popen([sys.executable, "-c", CLAIMER, str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "3"
        # The runner lives: only the two recipients it did not claim are ours.
        got = store.claim_due_outbound(time.time(), 10, "MINE", 900.0)
        assert sum(len(m.recipients) for m in got) == 2
        assert store.claim_due_outbound(time.time(), 10, "MINE2", 900.0) == []
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # Fifteen minutes left on its claims, but its process is dead: free now.
    got = store.claim_due_outbound(time.time(), 10, "MINE3", 900.0)
    assert sum(len(m.recipients) for m in got) == 3
    # ... and claimed by us now, so not a second time.
    assert store.claim_due_outbound(time.time(), 10, "MINE4", 900.0) == []
    store.close()
