"""A customer config without `data_dir` loads (issue 11, item 5): the default
is /var/lib/fermoposta-customer for a system install's file under /etc, else
`<name>-data` next to the file; `config show` prints the effective value."""

from __future__ import annotations

from pathlib import Path

import pytest

from fermoposta.cli import EX_CONFIG, main
from fermoposta.customer.config import ConfigError, default_data_dir, load_customer_config

#: The smallest file a site writes: its name, the provider, credentials, one block.
MINIMAL = """\
hostname = "mail.example.org"

[provider]
host = "odmr.provider.example"
username = "acme"
password_file = "acme.pw"

[[pull]]
domains = ["example.org"]
[pull.delivery]
type = "maildir"
path = "/var/mail/{domain}/{local}/Maildir"
"""


def minimal(directory: Path, name: str = "customer.toml", extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "acme.pw").write_text("secret\n")
    path = directory / name
    path.write_text(extra + MINIMAL)
    return path


def test_a_minimal_file_loads_with_its_data_dir_next_to_it(tmp_path: Path) -> None:
    config = load_customer_config(minimal(tmp_path))
    assert config.data_dir == tmp_path / "customer-data"
    assert not config.data_dir.exists()  # the loader creates nothing
    assert config.provider.host == "odmr.provider.example"
    assert [p.name for p in config.pulls] == ["pull-1"]


def test_the_default_is_named_after_the_file(tmp_path: Path) -> None:
    # Two sites' configs in one directory never share locks and spools.
    one = load_customer_config(minimal(tmp_path, "office.toml"))
    two = load_customer_config(minimal(tmp_path, "family.toml"))
    assert one.data_dir == tmp_path / "office-data"
    assert two.data_dir == tmp_path / "family-data"


def test_a_relative_config_path_gives_an_absolute_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    minimal(tmp_path / "site")
    monkeypatch.chdir(tmp_path)
    config = load_customer_config("site/customer.toml")
    assert config.data_dir == tmp_path / "site" / "customer-data"
    assert config.data_dir.is_absolute()


@pytest.mark.parametrize(("config", "expected"), [
    ("/etc/fermoposta/customer.toml", "/var/lib/fermoposta-customer"),  # the systemd units'
    ("/etc/customer.toml", "/var/lib/fermoposta-customer"),
    ("/etc/fermoposta/office.toml", "/var/lib/fermoposta-customer-office"),
    ("/etc/../etc/fermoposta/customer.toml", "/var/lib/fermoposta-customer"),
    ("/etcetera/customer.toml", "/etcetera/customer-data"),  # not under /etc
    ("/usr/local/etc/fermoposta/customer.toml", "/usr/local/etc/fermoposta/customer-data"),
    ("/home/admin/fermoposta/customer.toml", "/home/admin/fermoposta/customer-data"),
])
def test_default_data_dir(config: str, expected: str) -> None:
    assert default_data_dir(config) == Path(expected)


def test_a_written_data_dir_wins(tmp_path: Path) -> None:
    config = load_customer_config(minimal(tmp_path, extra='data_dir = "state"\n'))
    assert config.data_dir == tmp_path / "state"


def test_an_empty_data_dir_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"customer\.toml: data_dir: must not be empty"):
        load_customer_config(minimal(tmp_path, extra='data_dir = ""\n'))


def test_hostname_is_still_required(tmp_path: Path) -> None:
    path = minimal(tmp_path)
    path.write_text(path.read_text().replace('hostname = "mail.example.org"\n', ""))
    with pytest.raises(ConfigError, match="hostname: required key is missing"):
        load_customer_config(path)


def test_config_show_prints_the_effective_data_dir(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = minimal(tmp_path)
    assert main(["config", "show", str(path)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert f'data_dir = "{tmp_path / "customer-data"}"' in shown
    # What it printed loads back to the same value (written explicitly now).
    again = tmp_path / "shown.toml"
    again.write_text("\n".join(shown) + "\n")
    assert load_customer_config(again).data_dir == tmp_path / "customer-data"


def test_config_check_accepts_the_minimal_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = minimal(tmp_path)
    assert main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"OK: {path} (customer config)"
    path.write_text(path.read_text().replace("[[pull]]", "[[pul]]"))
    assert main(["config", "check", str(path)]) == EX_CONFIG  # and the check still checks
