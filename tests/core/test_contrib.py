"""The systemd units in contrib/ are valid for systemd (systemd-analyze verify)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"


def test_units_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    fermoposta = Path(sys.executable).parent / "fermoposta"
    names = sorted(p.name for p in UNITS.iterdir() if p.suffix in (".service", ".timer"))
    assert names == ["fermoposta-customer-pull.service", "fermoposta-customer-pull.timer",
                     "fermoposta-customer.service", "fermoposta-provider.service"]
    for name in names:
        text = (UNITS / name).read_text().replace("/usr/local/bin/fermoposta", str(fermoposta))
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in names)],
        capture_output=True, text=True, timeout=60, env={"SYSTEMD_LOG_LEVEL": "warning",
                                                         "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_units_are_sandboxed() -> None:
    for name in ("fermoposta-provider.service", "fermoposta-customer.service",
                 "fermoposta-customer-pull.service"):
        text = (UNITS / name).read_text()
        for directive in ("ProtectSystem=strict", "User=fermoposta", "NoNewPrivileges=yes",
                          "PrivateTmp=yes", "UMask=0077"):
            assert directive in text, (name, directive)
    provider = (UNITS / "fermoposta-provider.service").read_text()
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in provider
