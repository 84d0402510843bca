"""The command line's `-c FILE` anywhere, the wrong kind of config, and a
missing store (issue 11, items 1, 4, 5 and the `account add` warning of 6)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fermoposta.cli import EX_CONFIG, EX_NOINPUT, EX_USAGE, main
from fermoposta.config import ProviderConfig
from fermoposta.store import open_store

PROVIDER = 'hostname = "mx.provider.test"\ndata_dir = "var"\n'
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
[pull.delivery]
type = "lmtp"
address = "/run/dovecot/lmtp"
"""

#: One command of each group (and every read-only store command), as typed
#: after `fermoposta`: -c goes before it, after its first word or at its end.
COMMANDS = [
    ["provider", "run"],
    ["config", "check"],
    ["config", "show"],
    ["account", "list"],
    ["account", "add", "x", "--password-stdin"],
    ["domain", "list"],
    ["domain", "add", "x.test", "--account", "x"],
    ["queue", "list"],
    ["queue", "show", "ABC"],
    ["queue", "stats"],
    ["queue", "delete", "ALL"],
    ["store", "migrate"],
    ["customer", "check"],
    ["customer", "pull"],
    ["customer", "run"],
    ["customer", "outbox", "list"],
]


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    """Commands set up logging (process-wide state): undo it afterwards."""
    loggers = [logging.getLogger(name) for name in ("fermoposta", "psycopg")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture(autouse=True)
def no_default_configs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A default config in the environment would hide a -c that is not used."""
    monkeypatch.setenv("FERMOPOSTA_CONFIG", str(tmp_path / "env-provider.toml"))
    monkeypatch.setenv("FERMOPOSTA_CUSTOMER_CONFIG", str(tmp_path / "env-customer.toml"))


@pytest.fixture
def provider(tmp_path: Path) -> Path:
    path = tmp_path / "provider.toml"
    path.write_text(PROVIDER)
    return path


@pytest.fixture
def customer(tmp_path: Path) -> Path:
    (tmp_path / "pw").write_text("secret\n")
    path = tmp_path / "customer.toml"
    path.write_text(CUSTOMER)
    return path


def positions(command: list[str], path: Path) -> list[list[str]]:
    """`command` with `-c path` before it, after each of its words but the last
    (argument values included) and at its end."""
    words = [w for w in command if not w.startswith("--")][:2]
    placed = [["-c", str(path), *command], [*command, "-c", str(path)]]
    if len(words) == 2 and len(command) > 2:
        index = command.index(words[1]) + 1
        placed.append([*command[:index], "-c", str(path), *command[index:]])
    placed.append([command[0], "-c", str(path), *command[1:]])
    return placed


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_reads_the_config_given_anywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    # An absent file: each command must name it (and not the default of the environment).
    absent = tmp_path / "absent.toml"
    for argv in positions(command, absent):
        assert main(argv) == EX_CONFIG, argv
        assert capsys.readouterr().err == f"fermoposta: {absent}: config file not found\n", argv


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_config_given_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    first, second = tmp_path / "first.toml", tmp_path / "second.toml"
    argv = ["-c", str(first), *command, "-c", str(second)]
    assert main(argv) == EX_USAGE
    err = capsys.readouterr().err
    assert f"-c/--config given twice: {first} and {second}" in err
    # The same file twice is one meaning, not a conflict.
    assert main(["-c", str(first), *command, "-c", str(first)]) == EX_CONFIG
    assert capsys.readouterr().err == f"fermoposta: {first}: config file not found\n"


def test_config_twice_at_one_level_and_with_the_positional_file(
    provider: Path, customer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-c", str(provider), "-c", str(customer), "config", "check"]) == EX_USAGE
    assert f"given twice: {provider} and {customer}" in capsys.readouterr().err
    assert main(["queue", "list", "-c", str(provider), "--config", str(customer)]) == EX_USAGE
    assert f"given twice: {provider} and {customer}" in capsys.readouterr().err
    assert main(["config", "check", "-c", str(provider), str(customer)]) == EX_USAGE
    assert f"given twice: {provider} and {customer}" in capsys.readouterr().err
    # The positional FILE alone, and with the same -c, still work.
    assert main(["config", "check", str(customer)]) == 0
    assert main(["config", "check", str(customer), "-c", str(customer)]) == 0
    assert capsys.readouterr().out == f"OK: {customer} (customer config)\n" * 2


def test_config_after_the_command_works(
    provider: Path, customer: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert main(["config", "check", "-c", str(provider)]) == 0
    assert main(["config", "check", "--kind", "customer", "-c", str(customer)]) == 0
    assert capsys.readouterr().out == (f"OK: {provider} (provider config)\n"
                                       f"OK: {customer} (customer config)\n")
    assert main(["config", "show", "-c", str(provider)]) == 0
    assert f"# loaded from {provider}" in capsys.readouterr().out

    started: list[ProviderConfig] = []

    def run(config: ProviderConfig) -> int:
        started.append(config)
        return 0

    import fermoposta.provider.server as server

    monkeypatch.setattr(server, "run", run)
    assert main(["provider", "run", "-c", str(provider)]) == 0
    assert [c.path for c in started] == [provider]

    password = provider.parent / "password"
    password.write_text("pw\n")
    assert main(["account", "add", "acme", "--password-file", str(password),
                 "--domain", "acme.test", "-c", str(provider)]) == 0
    assert main(["account", "list", "-c", str(provider)]) == 0
    assert main(["domain", "list", "--config", str(provider)]) == 0
    assert main(["queue", "list", "-c", str(provider)]) == 0
    assert main(["store", "migrate", "-c", str(provider)]) == 0
    out = capsys.readouterr().out
    assert "account acme added with domains acme.test" in out
    assert "acme.test  acme" in out and "Mail queue is empty" in out


# --- the wrong kind of file ------------------------------------------------------------------


@pytest.mark.parametrize("command", [c for c in COMMANDS if c[0] not in ("config", "customer")],
                         ids=" ".join)
def test_provider_command_with_a_customer_config(
    customer: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    for argv in (["-c", str(customer), *command], [*command, "-c", str(customer)]):
        assert main(argv) == EX_CONFIG
        assert capsys.readouterr().err == (
            f"fermoposta: {customer}: this is a customer config; {command[0]} commands need "
            "the provider's (-c /etc/fermoposta/provider.toml)\n")
    assert not (customer.parent / "state").exists()  # nothing created from the wrong file


@pytest.mark.parametrize("command", [c for c in COMMANDS if c[0] == "customer"], ids=" ".join)
def test_customer_command_with_a_provider_config(
    provider: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    for argv in (["-c", str(provider), *command], [*command, "-c", str(provider)]):
        assert main(argv) == EX_CONFIG
        assert capsys.readouterr().err == (
            f"fermoposta: {provider}: this is a provider config; customer commands need the "
            "customer's (-c /etc/fermoposta/customer.toml)\n")


def test_unparsable_or_empty_file_is_not_called_a_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert main(["customer", "pull", "-c", str(empty)]) == EX_CONFIG
    broken = tmp_path / "broken.toml"
    broken.write_text("[provider\n")
    assert main(["queue", "list", "-c", str(broken)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "this is a" not in err and str(empty) in err and str(broken) in err


# --- a store that does not exist -------------------------------------------------------------


READ_ONLY = [
    ["queue", "list"],
    ["queue", "show", "ABC"],
    ["queue", "stats"],
    ["domain", "list"],
    ["account", "list"],
    ["account", "remove", "x"],
    ["queue", "delete", "ALL"],
]


@pytest.mark.parametrize("command", READ_ONLY, ids=" ".join)
def test_reading_commands_need_an_existing_store(
    provider: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    store = provider.parent / "var" / "fermoposta.sqlite3"
    assert main(["-c", str(provider), *command]) == EX_NOINPUT == 66
    assert capsys.readouterr().err == (
        f"fermoposta: no store at {store}; is data_dir right? (provider run creates it)\n")
    assert not store.exists() and not store.parent.exists()
    # Once the store exists (empty), the same command runs against it.
    open_store(store.parent).close()
    assert main(["-c", str(provider), *command]) != EX_NOINPUT


def test_writing_commands_create_the_store(
    provider: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = provider.parent / "var" / "fermoposta.sqlite3"
    password = provider.parent / "password"
    password.write_text("pw\n")
    assert main(["-c", str(provider), "account", "add", "x", "--password-file",
                 str(password)]) == 0
    assert store.exists()
    store.unlink()
    assert main(["-c", str(provider), "domain", "add", "x.test", "--account", "x"]) == 65
    assert store.exists()  # created, then the account was not found
    capsys.readouterr()


def test_the_check_does_not_apply_to_postgresql(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "provider.toml"
    # A port where nothing listens: the store is unavailable (75), not "no store".
    path.write_text(PROVIDER + '[store]\nurl = "postgresql://postgres@127.0.0.1:1/none"\n')
    assert main(["-c", str(path), "queue", "list"]) == 75
    err = capsys.readouterr().err
    assert "cannot open the PostgreSQL store" in err and "no store at" not in err


# --- an account without domains --------------------------------------------------------------


def test_account_add_without_domains_warns(
    provider: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    password = provider.parent / "password"
    password.write_text("pw\n")
    base = ["-c", str(provider), "account", "add"]
    assert main([*base, "bare", "--password-file", str(password)]) == 0
    out, err = capsys.readouterr()
    assert out == "account bare added\n"
    assert err == ("fermoposta: warning: account bare has no domains: its ATRN is refused (450) "
                   "until `fermoposta domain add DOMAIN --account bare`\n")
    assert main([*base, "full", "--password-file", str(password), "--domain", "full.test"]) == 0
    assert capsys.readouterr().err == ""

    assert main(["-c", str(provider), "account", "list"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows == {"bare": "(none!)", "full": "full.test"}
    assert "bare" in err and "full" not in err and "every ATRN refused" in err
    assert main(["-c", str(provider), "domain", "add", "bare.test", "--account", "bare"]) == 0
    assert main(["-c", str(provider), "account", "list"]) == 0
    assert "(none!)" not in capsys.readouterr().out


def test_provider_run_help_names_every_listener(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provider", "run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for listener in ("mx", "odmr", "odmr_tls", "submission", "submissions", "[metrics] listen"):
        assert f" {listener} (" in text, listener
