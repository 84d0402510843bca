"""`config check` (and the loaders) report every problem of a file at once:
file, key, what is wrong, "did you mean" for a near miss; then exit 78."""

from __future__ import annotations

from pathlib import Path

import pytest

from fermoposta.cli import EX_CONFIG, main
from fermoposta.config import ConfigError, load_provider_config
from fermoposta.customer.config import load_customer_config

PROVIDER = """\
hostname = "mx.example.net"
data_dir = "data"

[lisen]                         # an unknown table, near miss
mx = "127.0.0.1:2525"

[limits]
max_mesage_size = "10M"         # an unknown key, near miss
max_recipients = "many"         # the wrong type

[odmr]
no_mail_reply = "silent"        # a bad value
"""


def provider_problems(path: Path) -> list[str]:
    return [
        f'{path}: [lisen]: unknown table (did you mean "listen"?)',
        f'{path}: [limits] max_mesage_size: unknown key (did you mean "max_message_size"?)',
        f'{path}: [limits] max_recipients: expected an integer, got "many"',
        f'{path}: [odmr] no_mail_reply: expected one of "453", "quit", got "silent"',
    ]


def test_provider_loader_collects_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "provider.toml"
    path.write_text(PROVIDER)
    with pytest.raises(ConfigError) as info:
        load_provider_config(path, warn=None)
    assert list(info.value.problems) == provider_problems(path)
    assert str(info.value) == "\n".join(provider_problems(path))


def test_config_check_prints_every_provider_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "provider.toml"
    path.write_text(PROVIDER)
    assert main(["config", "check", str(path)]) == EX_CONFIG == 78
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"fermoposta: {p}" for p in provider_problems(path)]


def test_provider_cross_checks_are_all_reported(tmp_path: Path) -> None:
    """Checks across keys run when every key is valid, and all are reported too."""
    path = tmp_path / "provider.toml"
    path.write_text('hostname = "mx.example.net"\ndata_dir = "data"\n'
                    '[listen]\nodmr_tls = "127.0.0.1:0"\n'
                    '[outbound]\nretry_initial = "2h"\nretry_max = "1h"\n')
    with pytest.raises(ConfigError) as info:
        load_provider_config(path, warn=None)
    assert list(info.value.problems) == [
        f"{path}: [listen] odmr_tls: an implicit-TLS listener needs [tls] cert and key",
        f"{path}: [outbound] retry_max: must not be shorter than retry_initial",
    ]


def test_one_problem_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "provider.toml"
    path.write_text('hostname = "mx.example.net"\n')
    assert main(["config", "check", str(path)]) == 78
    assert capsys.readouterr().err == f"fermoposta: {path}: data_dir: required key is missing\n"


CUSTOMER = """\
hostname = "mail.example.org"
data_dir = "var"
max_mesage_size = "10M"         # an unknown top-level key, near miss

[provider]
host = "127.0.0.1"
prot = 366                      # an unknown key, near miss
username = "acme"
password_file = "acme.pw"
connect_timeout = true          # the wrong type

[[pull]]
domains = ["example.org"]
every = "10 minutes"            # a bad value
[pull.delivery]
type = "maildir"
path = "mail/{domain}/{local}/Maildir"
creat = true                    # an unknown key, near miss

[outbox]
push = "sometimes"              # a bad value
"""


def customer_problems(path: Path) -> list[str]:
    return [
        f'{path}: max_mesage_size: unknown key (did you mean "max_message_size"?)',
        f'{path}: [provider] prot: unknown key (did you mean "port"?)',
        f"{path}: [provider] connect_timeout: expected a duration like 10m, 30s, 2h, 5d "
        "or a number of seconds, got true",
        f"{path}: [[pull]] #1 every: expected a duration like 10m, 30s, 2h, 5d "
        'or a number of seconds, or "push", got "10 minutes"',
        f'{path}: [[pull]] #1 [pull.delivery] creat: unknown key (did you mean "create"?)',
        f'{path}: [outbox] push: expected one of "session", "continuous", got "sometimes"',
    ]


def test_customer_loader_collects_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "customer.toml"
    path.write_text(CUSTOMER)
    (tmp_path / "acme.pw").write_text("secret\n")
    with pytest.raises(ConfigError) as info:
        load_customer_config(path)
    assert list(info.value.problems) == customer_problems(path)


def test_config_check_prints_every_customer_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "customer.toml"
    path.write_text(CUSTOMER)
    (tmp_path / "acme.pw").write_text("secret\n")
    assert main(["config", "check", str(path)]) == EX_CONFIG
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"fermoposta: {p}" for p in customer_problems(path)]


def test_customer_checks_across_blocks_after_the_keys(tmp_path: Path) -> None:
    """Once every key is valid the blocks are checked against each other and
    against the site's domains; every block's delivery is reported."""
    path = tmp_path / "customer.toml"
    path.write_text(
        'hostname = "mail.example.org"\ndata_dir = "var"\ndomains = ["example.org"]\n'
        '[provider]\nhost = "127.0.0.1"\nusername = "acme"\npassword_file = "acme.pw"\n'
        '[[pull]]\ndomains = ["example.org"]\n[pull.delivery]\ntype = "maildir"\n'
        'path = "m/{local}"\ncatch_all = "x@example.com"\n'
        '[[pull]]\n[pull.delivery]\ntype = "smtp"\naddress = "127.0.0.1:0"\n'
    )
    (tmp_path / "acme.pw").write_text("secret\n")
    with pytest.raises(ConfigError) as info:
        load_customer_config(path)
    assert list(info.value.problems) == [
        f"{path}: [[pull]] #1 [pull.delivery] catch_all: x@example.com: example.com is not "
        "a domain this block accepts (example.org)",
        f'{path}: [[pull]] #2 [pull.delivery] address: expected a port 1-65535, '
        'got "127.0.0.1:0"',
    ]
