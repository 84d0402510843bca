"""Config and command-line defects a review found (issue 11): a file that is
not UTF-8, one file named two ways, an incomplete customer file, a DNS
resolver given by name, two listeners on one address, and `config show
--changed` keeping the user's own maps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import write_config
from fermoposta.cli import main

EX_USAGE, EX_CONFIG = 64, 78


def test_a_file_that_is_not_utf8_is_a_config_error_not_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'# perch\xe8\nhostname = "a.example"\ndata_dir = "d"\n')
    for argv in (["config", "check", str(path)], ["-c", str(path), "queue", "list"],
                 ["-c", str(path), "customer", "check"]):
        assert main(argv) == EX_CONFIG, argv
        assert "invalid TOML: not UTF-8" in capsys.readouterr().err


def test_one_file_named_two_ways_is_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, None)
    monkeypatch.chdir(path.parent)
    assert main(["-c", path.name, "config", "check", str(path)]) == 0
    link = tmp_path / "link.toml"
    os.symlink(path, link)
    assert main(["-c", str(link), "config", "check", "-c", str(path)]) == 0
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other", None)
    assert main(["-c", str(path), "config", "check", "-c", str(other)]) == EX_USAGE
    assert "given twice" in capsys.readouterr().err


def test_an_incomplete_customer_file_is_reported_as_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "customer.toml"
    path.write_text('hostname = "site.example"\ndomains = ["example.org"]\n')
    assert main(["-c", str(path), "customer", "check"]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "[provider]: required table is missing" in err
    assert "this is a provider config" not in err


def test_a_resolver_must_be_an_address(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, None, extra='[outbound]\nresolver = "localhost:5353"\n')
    assert main(["config", "check", str(path)]) == EX_CONFIG
    assert "[outbound] resolver: expected an IP address and port" in capsys.readouterr().err
    for n, good in enumerate(("127.0.0.1:5353", "[::1]:53")):
        (tmp_path / str(n)).mkdir()
        path = write_config(tmp_path / str(n), None,
                            extra=f'[outbound]\nresolver = "{good}"\n')
        assert main(["config", "check", str(path)]) == 0, good


def test_two_listeners_on_one_address_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, None, extra='[metrics]\nlisten = "127.0.0.1:42526"\n'
                        '[web]\nlisten = "127.0.0.1:42526"\n')
    assert main(["config", "check", str(path)]) == EX_CONFIG
    assert ("[web] listen: the same address as [metrics] listen"
            in capsys.readouterr().err)


def test_changed_keeps_aliases_and_transport_routes_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, None, extra='[outbound.transport]\n'
                        '"Bücher.example" = "10.1.2.3:25"\n')
    assert main(["config", "show", "--changed", str(path)]) == 0
    out = capsys.readouterr().out
    assert 'transport = {"xn--bcher-kva.example" = "10.1.2.3:25"}' in out
    again = tmp_path / "again.toml"
    again.write_text(out)
    assert main(["config", "show", str(again)]) == 0
    assert main(["config", "show", str(path)]) == 0
    shown_again, shown = capsys.readouterr().out.split("# loaded from")[1:]
    assert shown_again.split("\n", 1)[1] == shown.split("\n", 1)[1]
