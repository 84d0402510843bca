"""`fermoposta demo` runs to completion, as a newcomer would run it."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_to_completion() -> None:
    result = subprocess.run([sys.executable, "-m", "fermoposta", "demo"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in ("== 1. The provider", "== 2. Someone on the Internet",
                 "== 3. At the site", "== 4. The site dials the provider",
                 "== 5. The provider delivers", "== Done"):
        assert step in out, out
    assert "OK queued as" in out
    assert "bob's Maildir now holds: ['Hello Bob']" in out
    assert "the Internet received mail from <bob@example.org> to alice@example.net" in out
    assert "Files kept" not in out  # the temporary directory is removed
