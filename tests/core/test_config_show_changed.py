"""`config show --changed` (issue 11, item 12): like `postconf -n`, only the
keys the file sets, with their effective values; the output loads back."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_config
from fermoposta.cli import main
from support.customer_config import write_customer_config


def test_provider_changed_shows_only_what_the_file_sets(tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path, None, extra='[limits]\nmax_recipients = 50\n'
                        '[store]\nurl = "postgresql://fp:hunter2@db.example/fermoposta"\n')
    assert main(["config", "show", "--changed", str(path)]) == 0
    out = capsys.readouterr().out
    assert "max_recipients = 50" in out
    assert "max_message_size" not in out  # a default the file does not set
    assert "[hold]" not in out and "[submission]" not in out
    assert "failure_delay = 0.0" in out  # the test config sets [auth_throttle] failure_delay
    assert "hunter2" not in out and 'url = "postgresql://fp:***@db.example/fermoposta"' in out
    assert out.startswith(f"# loaded from {path}")
    # The full show has the defaults; --changed is a strict subset of its lines.
    assert main(["config", "show", str(path)]) == 0
    full = capsys.readouterr().out
    assert "max_message_size" in full
    assert set(out.splitlines()) <= set(full.splitlines())


def test_changed_output_loads_back_to_the_same_config(tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path, None, extra='[limits]\nmax_recipients = 7\n')
    assert main(["config", "show", "--changed", str(path)]) == 0
    again = tmp_path / "again.toml"
    again.write_text(capsys.readouterr().out)
    assert main(["config", "show", str(again)]) == 0
    first = capsys.readouterr().out
    assert main(["config", "show", str(path)]) == 0
    second = capsys.readouterr().out
    strip = [line for line in first.splitlines() if not line.startswith("# loaded")]
    assert strip == [line for line in second.splitlines() if not line.startswith("# loaded")]


@pytest.mark.parametrize("flag", [["--changed"], []])
def test_customer_changed_keeps_each_pull_block(tmp_path: Path, capsys, flag) -> None:
    path = write_customer_config(tmp_path, port=3366, password="pw", ca_file=None,
                                 pulls=[{"domains": ["example.org"], "maildir": tmp_path / "m"},
                                        {"domains": ["example.net"], "maildir": tmp_path / "n"}])
    assert main(["config", "show", *flag, "--kind", "customer", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("[[pull]]") == 2 and "example.net" in out
    if flag:
        assert "backoff_max" not in out  # a pull default the file does not set
