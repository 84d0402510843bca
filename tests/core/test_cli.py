"""The command line: config check, exit codes, error messages, provider run wiring."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from fermoposta import __version__
from fermoposta.cli import EX_CONFIG, EX_USAGE, main
from fermoposta.config import ProviderConfig

GOOD = 'hostname = "mx.provider.test"\ndata_dir = "var"\n'


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    """`provider run` calls setup_logging (process-wide state): undo it afterwards."""
    loggers = [logging.getLogger(name) for name in ("fermoposta", "psycopg")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "provider.toml"
    path.write_text(GOOD)
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fermoposta {__version__}"


def test_config_check_ok(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(good), "config", "check"]) == 0
    assert capsys.readouterr().out == f"OK: {good} (provider config)\n"


def test_config_check_positional_file(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(good)]) == 0
    assert capsys.readouterr().out == f"OK: {good} (provider config)\n"


def test_config_check_bad_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "provider.toml"
    path.write_text(GOOD + '[limits]\nmax_message_size = "x"\n')
    assert main(["-c", str(path), "config", "check"]) == EX_CONFIG == 78
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"fermoposta: {path}: [limits] max_message_size: "
        'expected a size like 50M or an integer, got "x"\n'
    )


def test_config_check_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "provider.toml"
    path.write_text(GOOD + "[odmr]\nlease_tll = 3\n")
    assert main(["-c", str(path), "config", "check"]) == 78
    err = capsys.readouterr().err
    assert err.startswith(f"fermoposta: {path}: [odmr] lease_tll: unknown key")


def test_config_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    assert main(["-c", str(path), "config", "check"]) == 78
    assert capsys.readouterr().err == f"fermoposta: {path}: config file not found\n"


def test_default_config_from_env(
    good: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FERMOPOSTA_CONFIG", str(good))
    assert main(["config", "check"]) == 0
    assert capsys.readouterr().out == f"OK: {good} (provider config)\n"


def test_usage_errors_exit_64(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == EX_USAGE
    assert main([]) == EX_USAGE
    assert main(["provider"]) == EX_USAGE
    assert main(["config"]) == EX_USAGE
    assert main(["--no-such-option"]) == EX_USAGE
    capsys.readouterr()


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("provider", "config"):
        assert command in out


def fake_server(monkeypatch: pytest.MonkeyPatch, result: int) -> list[ProviderConfig]:
    calls: list[ProviderConfig] = []

    def run(config: ProviderConfig) -> int:
        calls.append(config)
        return result

    module = types.ModuleType("fermoposta.provider.server")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fermoposta.provider.server", module)
    return calls


def test_provider_run_calls_server(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_server(monkeypatch, 0)
    assert main(["-c", str(good), "provider", "run"]) == 0
    assert len(calls) == 1
    assert calls[0].path == good and calls[0].log.level == "info"


def test_provider_run_verbose_and_exit_code(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_server(monkeypatch, 75)
    assert main(["-v", "-c", str(good), "provider", "run"]) == 75
    assert calls[0].log.level == "debug"


def test_provider_run_bad_config_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = fake_server(monkeypatch, 0)
    path = tmp_path / "provider.toml"
    path.write_text("data_dir = 'x'\n")
    assert main(["-c", str(path), "provider", "run"]) == 78
    assert calls == []
    assert capsys.readouterr().err == f"fermoposta: {path}: hostname: required key is missing\n"


def test_account_commands_use_the_configured_store(
    good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("fermoposta.provider.accounts")
    password = good.parent / "password"
    password.write_text("secret\n")
    assert main(["-c", str(good), "account", "add", "acme", "--password-file", str(password),
                 "--domain", "acme.test"]) == 0
    assert (good.parent / "var" / "fermoposta.sqlite3").exists()
    assert main(["-c", str(good), "account", "list"]) == 0
    assert "acme.test" in capsys.readouterr().out


def test_account_commands_need_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fermoposta.provider.accounts")
    path = tmp_path / "absent.toml"
    assert main(["-c", str(path), "domain", "list"]) == 78
    assert capsys.readouterr().err == f"fermoposta: {path}: config file not found\n"


CUSTOMER = """hostname = "mail.example.org"
data_dir = "state"
[provider]
host = "127.0.0.1"
tls = "none"
username = "acme"
password_file = "pw"
mechanisms = ["CRAM-MD5"]
[[pull]]
domains = ["example.org"]
every = "5m"
[[pull.window]]
days = "sat,sun"
hours = "10-12"
every = "1h"
[pull.delivery]
type = "lmtp"
address = "/run/dovecot/lmtp"
"""


def test_config_check_recognizes_a_customer_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pw").write_text("secret\n")
    path = tmp_path / "customer.toml"
    path.write_text(CUSTOMER)
    assert main(["config", "check", str(path)]) == 0
    assert "(customer config)" in capsys.readouterr().out
    path.write_text(CUSTOMER.replace('every = "5m"', 'every = "soon"'))
    assert main(["config", "check", str(path)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "customer.toml: [[pull]] #1 every:" in err


@pytest.mark.parametrize("kind", ["provider", "customer"])
def test_config_show_prints_a_config_that_loads_back(
    tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    if kind == "customer":
        (tmp_path / "pw").write_text("secret\n")
        source = tmp_path / "customer.toml"
        source.write_text(CUSTOMER)
    else:
        source = good
    assert main(["config", "show", str(source)]) == 0
    shown = capsys.readouterr().out
    assert "secret" not in shown
    again = tmp_path / f"shown-{kind}.toml"
    again.write_text(shown)
    assert main(["config", "check", "--kind", kind, str(again)]) == 0
    capsys.readouterr()
    assert main(["config", "show", str(again)]) == 0
    # Showing the shown config changes nothing but the "loaded from" comment.
    second = capsys.readouterr().out.splitlines()
    assert [line for line in second if not line.startswith("# loaded")] == [
        line for line in shown.splitlines() if not line.startswith("# loaded")]


def test_config_check_customer_default_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pw").write_text("secret\n")
    path = tmp_path / "site.toml"
    path.write_text(CUSTOMER)
    monkeypatch.setenv("FERMOPOSTA_CUSTOMER_CONFIG", str(path))
    assert main(["config", "check", "--kind", "customer"]) == 0
    assert f"OK: {path} (customer config)" in capsys.readouterr().out


def test_provider_markers_are_tables_only_a_provider_config_has() -> None:
    """`_guess_kind` takes these as proof of a provider config without
    loading the customer's schema: each must be provider-only."""
    from fermoposta.cli import PROVIDER_MARKERS, _names_of_one_kind

    provider_only, _customer_only = _names_of_one_kind()
    assert provider_only >= PROVIDER_MARKERS


def test_a_queue_command_loads_neither_scram_nor_x509_nor_the_customer(tmp_path: Path) -> None:
    """Every admin command starts a Python process: a queue command on a
    config without TLS imports no SCRAM library, no X.509 parser and no
    customer config schema (they cost a third of the start-up)."""
    import subprocess

    config = tmp_path / "provider.toml"
    config.write_text(f'hostname = "mx.provider.test"\ndata_dir = "{tmp_path / "data"}"\n'
                      '[listen]\nmx = "127.0.0.1:0"\nodmr = "127.0.0.1:0"\n'
                      'submission = ""\n')
    probe = (
        "import sys\n"
        "from fermoposta.cli import main\n"
        f"code = main(['-c', {str(config)!r}, 'queue', 'stats'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('scramp', 'asn1crypto',"
        " 'cryptography')"
        " or m.startswith('fermoposta.customer.config'))\n"
        "print(code, loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip().splitlines()[-1]
    assert out == "66 []", out  # 66: no store yet; nothing heavy imported


# --- only the command named is registered (cli.build_parser(argv)) --------------------------

COMMAND_LINES = [
    ["queue", "list", "--domain", "example.org"],
    ["-c", "/etc/p.toml", "queue", "stats"],
    ["queue", "-c", "/etc/p.toml", "delete", "ABC123"],
    ["-v", "--log-format", "json", "account", "list"],
    ["--log-format=json", "domain", "list", "-c", "/x.toml"],
    ["-c/etc/p.toml", "store", "migrate"],
    ["-vc", "/etc/p.toml", "account", "list"],
    ["-vc/etc/p.toml", "domain", "list"],
    ["--config=/etc/p.toml", "web", "passwd", "alice"],
    ["customer", "pull", "-c", "/etc/c.toml"],
    ["-c", "/etc/c.toml", "customer", "check"],
    ["provider", "run", "-c", "/etc/p.toml"],
    ["config", "check", "/etc/p.toml"],
    ["demo"],
]


def _comparable(args: object) -> dict[str, object]:
    # Functions by name: `_help(parser)` makes a closure per parser built.
    return {key: getattr(value, "__qualname__", value) for key, value in vars(args).items()}


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=" ".join)
def test_a_command_line_parses_as_with_every_command_registered(argv: list[str]) -> None:
    from fermoposta.cli import build_parser

    lazy = build_parser(argv).parse_args(argv)
    assert not getattr(lazy, "stand_in", False)
    assert _comparable(lazy) == _comparable(build_parser().parse_args(argv))


@pytest.mark.parametrize("word", ["provider", "account", "domain", "queue", "store", "web",
                                  "customer", "demo", "config"])
def test_the_help_lists_every_command_whatever_the_command_named(word: str) -> None:
    from fermoposta.cli import build_parser

    assert build_parser([word]).format_help() == build_parser().format_help()


def test_a_command_taken_for_another_is_parsed_again_with_every_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import fermoposta.cli as cli

    config = tmp_path / "provider.toml"
    config.write_text(f'hostname = "mx.provider.test"\ndata_dir = "{tmp_path / "data"}"\n')
    argv = ["-c", str(config), "queue", "stats"]
    expected = main(argv)
    out = capsys.readouterr()
    monkeypatch.setattr(cli, "_command_word", lambda parser, words: "customer")
    assert main(argv) == expected == 66  # 66: no store yet
    assert capsys.readouterr() == out


def test_a_customer_command_imports_no_provider_command(tmp_path: Path) -> None:
    """`customer pull` from cron: none of the provider's admin commands is
    imported to parse its command line (nor anything of `fermoposta.provider`)."""
    import subprocess

    probe = (
        "import sys\n"
        "from fermoposta.cli import main\n"
        f"main(['-c', {str(tmp_path / 'customer.toml')!r}, 'customer', 'pull'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('fermoposta.provider.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip().splitlines()[-1]
    assert out == "[]", out
