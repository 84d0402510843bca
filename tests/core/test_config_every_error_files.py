"""The steps after the keys (files named, the checks across keys, the blocks
against each other and the site's domains, aliases) report every problem
too, not just the first of each step: `config check` lists them all."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from fermoposta.cli import EX_CONFIG, main
from fermoposta.config import ConfigError, load_provider_config
from fermoposta.customer.config import load_customer_config

HEAD = 'hostname = "mail.example.org"\ndata_dir = "var"\n'
PROVIDER = '[provider]\nhost = "127.0.0.1"\nusername = "acme"\npassword_file = "acme.pw"\n'


def maildir_pull(domains: str, extra: str = "", name: str = "") -> str:
    named = f'name = "{name}"\n' if name else ""
    return (f"[[pull]]\n{named}domains = {domains}\n[pull.delivery]\ntype = \"maildir\"\n"
            f'path = "mail/{{domain}}/{{local}}"\n{extra}')


def customer_problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "customer.toml"
    path.write_text(text)
    (tmp_path / "acme.pw").write_text("secret\n")
    with pytest.raises(ConfigError) as info:
        load_customer_config(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return [p.removeprefix(f"{path}: ") for p in info.value.problems]


# -- the customer's file ----------------------------------------------------


TWO_FILES_AND_AN_ALIAS = (
    HEAD
    + '[provider]\nhost = "127.0.0.1"\nca_file = "ca.pem"\n'
    'client_cert = "client.pem"\nclient_key = "client.key"\n'
    + maildir_pull('["example.org"]',
                   '[pull.delivery.aliases]\n"info@example.org" = "bob@example.com"\n')
)


def test_missing_files_and_a_bad_alias_are_all_reported(tmp_path: Path) -> None:
    (tmp_path / "client.key").write_text("")  # this one exists
    assert customer_problems(tmp_path, TWO_FILES_AND_AN_ALIAS) == [
        f'[provider] ca_file: file "{tmp_path / "ca.pem"}" does not exist',
        f'[provider] client_cert: file "{tmp_path / "client.pem"}" does not exist',
        '[[pull]] #1 [pull.delivery] aliases."info@example.org": bob@example.com: '
        "example.com is not a domain this block accepts (example.org)",
    ]


def test_config_check_prints_them_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "customer.toml"
    path.write_text(TWO_FILES_AND_AN_ALIAS)
    assert main(["config", "check", str(path)]) == EX_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4
    assert [line.split(": ")[2] for line in err] == [
        "[provider] ca_file", "[provider] client_cert", "[provider] client_key",
        '[[pull]] #1 [pull.delivery] aliases."info@example.org"',
    ]


def test_provider_pair_and_files_and_credentials_all_reported(tmp_path: Path) -> None:
    """A certificate without its key, a missing CA file, a password file
    without a user name: three problems of one [provider] table."""
    problems = customer_problems(
        tmp_path,
        HEAD + '[provider]\nhost = "127.0.0.1"\nca_file = "nope.pem"\n'
        'client_cert = "client.pem"\npassword_file = "acme.pw"\n'
        + maildir_pull('["example.org"]'),
    )
    assert problems == [
        "[provider] client_key: client_cert and client_key must be given together; "
        "client_key is missing",
        f'[provider] ca_file: file "{tmp_path / "nope.pem"}" does not exist',
        f'[provider] client_cert: file "{tmp_path / "client.pem"}" does not exist',
        "[provider] password_file: given without a username",
    ]


def test_missing_password_file_and_unusable_ca_both_reported(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    problems = customer_problems(
        tmp_path,
        HEAD + '[provider]\nhost = "127.0.0.1"\nca_file = "ca.pem"\nusername = "acme"\n'
        'password_file = "gone.pw"\n' + maildir_pull('["example.org"]'),
    )
    assert len(problems) == 2
    assert problems[0].startswith("[provider] ca_file: not a usable CA bundle: ")
    assert problems[1] == f'[provider] password_file: file "{tmp_path / "gone.pw"}" does not exist'


def test_bad_ca_and_a_certificate_without_its_key_both_reported(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    ca = trustme.CA()
    ca.issue_cert("client.example.org").cert_chain_pems[0].write_to_path(
        str(tmp_path / "client.pem"))
    trustme.CA().issue_cert("other").private_key_pem.write_to_path(str(tmp_path / "other.key"))
    problems = customer_problems(
        tmp_path,
        HEAD + '[provider]\nhost = "127.0.0.1"\nca_file = "ca.pem"\n'
        'client_cert = "client.pem"\nclient_key = "other.key"\n' + maildir_pull('["example.org"]'),
    )
    assert [p.split(": ")[0] for p in problems] == ["[provider] ca_file", "[provider] client_key"]
    assert "cannot use this certificate and key" in problems[1]


def test_a_missing_users_file_does_not_hide_the_outbox_s_other_problems(tmp_path: Path) -> None:
    problems = customer_problems(
        tmp_path,
        HEAD + PROVIDER + maildir_pull('["example.org"]')
        + '[outbox]\nlisten = "127.0.0.1:0"\nusers_file = "users"\nallow_plaintext_auth = true\n'
        'networks = ["0.0.0.0/0"]\nretry = "1h"\nretry_max = "1m"\n',
    )
    # The users_file is written: no "needs users_file" nor "open relay" on top.
    assert problems == [
        f'[outbox] users_file: file "{tmp_path / "users"}" does not exist',
        "[outbox] retry_max: must be at least retry (3600s), got 60s",
    ]


def test_every_clash_between_blocks_is_reported(tmp_path: Path) -> None:
    problems = customer_problems(
        tmp_path,
        HEAD + 'domains = ["example.org", "example.net"]\n' + PROVIDER
        + maildir_pull('["example.org"]', name="a")
        + maildir_pull('["example.org", "example.com"]', name="a")
        + maildir_pull('["example.net", "example.biz"]'),
    )
    assert problems == [
        '[[pull]] #2 name: "a" is already the name of [[pull]] #1',
        '[[pull]] #2 domains: example.org is already collected by [[pull]] #1 ("a"); '
        "two blocks would race for its mail",
        "[[pull]] #2 domains: example.com is not one of the site's domains (top-level domains)",
        "[[pull]] #3 domains: example.biz is not one of the site's domains (top-level domains)",
    ]


def test_two_bare_blocks_and_missing_site_domains_both_reported(tmp_path: Path) -> None:
    problems = customer_problems(
        tmp_path,
        HEAD + PROVIDER
        + maildir_pull("[]", '[pull.delivery.aliases]\n"a@example.org" = "b@example.org"\n')
        + maildir_pull("[]")
        + maildir_pull('["example.org"]', 'catch_all = "all@example.net"\n'),
    )
    # The bare blocks' deliveries are not checked against domains nobody listed.
    assert problems == [
        '[[pull]] #2 domains: [[pull]] #1 ("pull-1") already sends a bare ATRN (every domain '
        "of the account); two such blocks would race for the same mail",
        'domains: required: [[pull]] #1 ("pull-1") sends a bare ATRN, so the site\'s domains '
        "must be listed (RCPTs for other domains are refused)",
        "[[pull]] #3 [pull.delivery] catch_all: all@example.net: example.net is not a domain "
        "this block accepts (example.org)",
    ]


def test_every_bad_alias_and_the_catch_all_are_reported(tmp_path: Path) -> None:
    problems = customer_problems(
        tmp_path,
        HEAD + PROVIDER + maildir_pull(
            '["example.org"]',
            'catch_all = "all@example.com"\n[pull.delivery.aliases]\n'
            '"a@example.org" = "not an address"\n'
            '"b@example.net" = "bob@example.org"\n'
            '"c@example.org" = "carol@example.org"\n'
            '"C@Example.org" = "carol@example.org"\n'),
    )
    assert problems == [
        '[[pull]] #1 [pull.delivery] aliases."a@example.org": expected an address like '
        'user@example.org, got "not an address"',
        '[[pull]] #1 [pull.delivery] aliases."b@example.net": b@example.net: example.net is '
        "not a domain this block accepts (example.org)",
        '[[pull]] #1 [pull.delivery] aliases."C@Example.org": c@example.org is listed twice '
        "(after lowercasing)",
        "[[pull]] #1 [pull.delivery] catch_all: all@example.com: example.com is not a domain "
        "this block accepts (example.org)",
    ]


def test_the_cross_block_checks_wait_for_a_valid_top_level(tmp_path: Path) -> None:
    """With a problem at the top level its ``domains`` are unknown: the blocks
    are not checked against them, so nothing is invented (no "domains:
    required" for the bare block)."""
    problems = customer_problems(
        tmp_path,
        HEAD + 'domains = ["example.org"]\nmax_message_size = "big"\n' + PROVIDER
        + maildir_pull("[]"),
    )
    assert problems == ['max_message_size: expected a size like 50M or an integer, got "big"']


# -- the provider's file ----------------------------------------------------


def provider_problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "provider.toml"
    path.write_text('hostname = "mx.example.net"\ndata_dir = "data"\n' + text)
    with pytest.raises(ConfigError) as info:
        load_provider_config(path, warn=None)
    return [p.removeprefix(f"{path}: ") for p in info.value.problems]


def test_provider_every_missing_tls_file_is_reported(tmp_path: Path) -> None:
    assert provider_problems(
        tmp_path, '[tls]\ncert = "c.pem"\nkey = "k.pem"\nclient_ca = "ca.pem"\n'
    ) == [
        f'[tls] cert: file "{tmp_path / "c.pem"}" does not exist',
        f'[tls] key: file "{tmp_path / "k.pem"}" does not exist',
        f'[tls] client_ca: file "{tmp_path / "ca.pem"}" does not exist',
    ]


def test_provider_tls_pair_and_a_missing_file_both_reported(tmp_path: Path) -> None:
    assert provider_problems(tmp_path, '[tls]\ncert = "c.pem"\nclient_ca = "ca.pem"\n') == [
        "[tls] key: cert and key must be given together; key is missing",
        f'[tls] cert: file "{tmp_path / "c.pem"}" does not exist',
        f'[tls] client_ca: file "{tmp_path / "ca.pem"}" does not exist',
    ]


def test_provider_store_password_problems_both_reported(tmp_path: Path) -> None:
    assert provider_problems(
        tmp_path, '[store]\nurl = "sqlite:///tmp/q.db"\npassword_file = "db.pw"\n'
    ) == [
        "[store] password_file: only a PostgreSQL url takes a password",
        f'[store] password_file: file "{tmp_path / "db.pw"}" does not exist',
    ]


def test_provider_file_problems_of_two_tables_both_reported(tmp_path: Path) -> None:
    problems = provider_problems(
        tmp_path, '[tls]\ncert = "c.pem"\nkey = "k.pem"\n'
        '[outbound]\nsmarthost = "relay.example.net:587"\nsmarthost_username = "u"\n'
        'smarthost_password_file = "relay.pw"\n',
    )
    assert problems == [
        f'[tls] cert: file "{tmp_path / "c.pem"}" does not exist',
        f'[tls] key: file "{tmp_path / "k.pem"}" does not exist',
        f'[outbound] smarthost_password_file: file "{tmp_path / "relay.pw"}" does not exist',
    ]
