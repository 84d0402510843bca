"""The outbox's config keys ([outbox], [provider] submission), users file, exit codes."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest

from fermoposta.customer.config import ConfigError, OutboxConfig, load_customer_config
from fermoposta.customer.errors import (
    AlreadyRunning,
    AuthFailure,
    ConnectFailure,
    ProtocolFailure,
    TemporaryFailure,
    TLSFailure,
)
from fermoposta.customer.outbox import read_users_file
from fermoposta.customer.outbox_push import PushResult, submission_settings
from fermoposta.customer.pull import PullSummary, combined_exit_code, dial_settings

HEAD = 'hostname = "mail.example.org"\ndata_dir = "var"\n'
PROVIDER = '[provider]\nhost = "odmr.provider.example"\nusername = "acme"\npassword_file = "pw"\n'
PULL = (
    '[[pull]]\ndomains = ["example.org"]\n'
    '[pull.delivery]\ntype = "maildir"\npath = "mail/{domain}/{local}/Maildir"\n'
)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "users").write_text("ws1:pass\n")
    return tmp_path


def load(directory: Path, provider_extra: str = "", outbox: str | None = None):
    text = HEAD + PROVIDER + provider_extra + "\n" + PULL
    if outbox is not None:
        text += "[outbox]\n" + outbox
    path = directory / "customer.toml"
    path.write_text(text)
    return load_customer_config(path)


def error(directory: Path, provider_extra: str = "", outbox: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(directory, provider_extra, outbox)
    message = str(info.value)
    assert message.startswith(f"{directory / 'customer.toml'}: "), message
    return message


def test_defaults_without_an_outbox(tmp: Path) -> None:
    config = load(tmp)
    assert config.outbox == OutboxConfig()
    assert not config.outbox.enabled and config.outbox.push == "session"
    p = config.provider
    assert (p.submission_host, p.submission_port, p.submission_tls) == (
        "odmr.provider.example", 587, "starttls")
    assert p.submission is None and p.submission_address == "odmr.provider.example:587"
    assert p.submission_server_name == "odmr.provider.example"


def test_outbox_defaults(tmp: Path) -> None:
    config = load(tmp, outbox='listen = "127.0.0.1:10025"\n')
    outbox = config.outbox
    assert outbox.enabled and outbox.listen == ("127.0.0.1", 10025)
    assert outbox.networks == (ipaddress.ip_network("127.0.0.0/8"),
                               ipaddress.ip_network("::1/128"))
    assert outbox.users_file is None and not outbox.allow_plaintext_auth
    assert outbox.restrict_senders and not outbox.continuous
    assert (outbox.retry, outbox.retry_max) == (60.0, 3600.0)
    assert outbox.max_message_size == config.max_message_size


def test_outbox_full(tmp: Path) -> None:
    config = load(
        tmp,
        provider_extra='submission = "[::1]:2587"\nsubmission_tls = "IMPLICIT"\n'
                       'server_name = "mail.provider.example"\n',
        outbox='listen = "[::]:10025"\nnetworks = ["192.168.1.0/24", "10.1.2.3", "::1/128"]\n'
               'users_file = "users"\nallow_plaintext_auth = true\nrestrict_senders = false\n'
               'push = "continuous"\nretry = "30s"\nretry_max = "10m"\n'
               'max_message_size = "10M"\n',
    )
    p = config.provider
    assert (p.submission_host, p.submission_port, p.submission_tls) == ("::1", 2587, "implicit")
    assert p.submission == ("::1", 2587) and p.submission_address == "[::1]:2587"
    assert p.submission_server_name == "mail.provider.example"  # set: it wins
    outbox = config.outbox
    assert outbox.listen == ("::", 10025)
    assert [str(n) for n in outbox.networks] == ["192.168.1.0/24", "10.1.2.3/32", "::1/128"]
    assert outbox.users_file == tmp / "users" and outbox.allow_plaintext_auth
    assert not outbox.restrict_senders and outbox.continuous
    assert (outbox.retry, outbox.retry_max, outbox.max_message_size) == (30.0, 600.0, 10 << 20)


def test_submission_host_is_the_verified_name(tmp: Path) -> None:
    p = load(tmp, provider_extra='submission = "smtp.provider.example:465"\n').provider
    assert (p.submission_host, p.submission_port) == ("smtp.provider.example", 465)
    assert p.submission_server_name == "smtp.provider.example"
    assert p.server_name == "odmr.provider.example"


def test_empty_submission_is_the_default(tmp: Path) -> None:
    p = load(tmp, provider_extra='submission = ""\n').provider
    assert p.submission is None and p.submission_port == 587


def test_empty_listen_means_no_outbox(tmp: Path) -> None:
    config = load(tmp, outbox='listen = ""\npush = "continuous"\n')
    assert not config.outbox.enabled and config.outbox.continuous


def test_retry_max_grows_with_a_long_retry(tmp: Path) -> None:
    assert load(tmp, outbox='retry = "2h"\n').outbox.retry_max == 7200.0


def test_networks_allow() -> None:
    outbox = OutboxConfig(networks=(ipaddress.ip_network("192.168.1.0/24"),
                                    ipaddress.ip_network("::1/128")))
    assert outbox.allows("192.168.1.7") and outbox.allows("::1")
    assert outbox.allows("::ffff:192.168.1.7")  # IPv4-mapped, from a dual-stack listener
    assert not outbox.allows("192.168.2.7") and not outbox.allows("127.0.0.1")
    assert not outbox.allows("unknown")


@pytest.mark.parametrize(
    ("provider_extra", "outbox", "expected"),
    [
        ('submission = "smtp.example"\n', None,
         '[provider] submission: expected "host:port" or "[ipv6]:port"'),
        ('submission = "smtp.example:0"\n', None, "[provider] submission: expected a port 1-65535"),
        ('submission_tls = "yes"\n', None,
         '[provider] submission_tls: expected one of "starttls", "implicit", "none", got "yes"'),
        ("", 'listen = "10025"\n', '[outbox] listen: expected "host:port"'),
        ("", 'listn = "127.0.0.1:10025"\n', '[outbox] listn: unknown key (did you mean "listen"?)'),
        ("", "networks = []\n", "[outbox] networks: must not be empty"),
        ("", 'networks = ["127.0.0.0/33"]\n', '[outbox] networks: expected a list of networks'),
        ("", 'networks = "127.0.0.0/8"\n', '[outbox] networks: expected a list of networks'),
        ("", 'networks = ["0.0.0.0/0"]\n',
         "[outbox] networks: 0.0.0.0/0 admits every address: that would be an open relay"),
        ("", "allow_plaintext_auth = true\n",
         "[outbox] allow_plaintext_auth: needs users_file"),
        ("", 'users_file = "nope"\n', '[outbox] users_file: file "'),
        ("", 'push = "sometimes"\n',
         '[outbox] push: expected one of "session", "continuous", got "sometimes"'),
        ("", 'retry = "0s"\n', "[outbox] retry: expected a duration greater than 0"),
        ("", 'retry = "10m"\nretry_max = "1m"\n',
         "[outbox] retry_max: must be at least retry (600s), got 60s"),
        ("", "max_message_size = 0\n", "[outbox] max_message_size: expected a size of at least"),
        ("", "restrict_senders = 1\n", "[outbox] restrict_senders: expected true or false"),
    ],
)
def test_errors_name_file_and_key(tmp: Path, provider_extra: str, outbox: str | None,
                                  expected: str) -> None:
    assert expected in error(tmp, provider_extra, outbox)


def test_open_network_is_fine_with_auth(tmp: Path) -> None:
    config = load(tmp, outbox='networks = ["0.0.0.0/0", "::/0"]\nusers_file = "users"\n')
    assert config.outbox.allows("203.0.113.9")


def test_outbox_must_be_a_table(tmp: Path) -> None:
    path = tmp / "customer.toml"
    path.write_text(HEAD + 'outbox = "127.0.0.1:10025"\n' + PROVIDER + PULL)
    with pytest.raises(ConfigError, match=r"outbox: expected a table \[outbox\]"):
        load_customer_config(path)


def test_submission_dial_settings(tmp: Path) -> None:
    config = load(tmp, provider_extra='submission = "smtp.provider.example:2587"\n'
                                      'submission_tls = "none"\n')
    odmr = dial_settings(config)
    sub = submission_settings(odmr, config)
    assert odmr.require_atrn and not sub.require_atrn
    assert (sub.host, sub.port, sub.tls, sub.server_name) == (
        "smtp.provider.example", 2587, "none", "smtp.provider.example")
    assert (sub.username, sub.password) == ("acme", "secret")


# --- the users file ---------------------------------------------------------------------------

def test_users_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# LAN\n\nws1:pa:ss word\r\nbob:x\n")
    assert read_users_file(path) == {"ws1": "pa:ss word", "bob": "x"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("ws1\n", "line 1: expected user:password"),
        ("ws1:\n", "line 1: expected user:password"),
        ("# c\n:pw\n", "line 2: expected user:password"),
        ("a b:pw\n", "line 1: a user name without spaces"),
        ("a:1\na:2\n", "line 2: user 'a' is listed twice"),
    ],
)
def test_users_file_errors_never_show_passwords(tmp_path: Path, content: str,
                                                expected: str) -> None:
    path = tmp_path / "users"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        read_users_file(path)
    assert expected in str(info.value) and str(path) in str(info.value)
    assert "pw" not in str(info.value).replace(str(path), "")


# --- exit codes -------------------------------------------------------------------------------

def push(error: Exception | None = None, deferred: int = 0) -> PushResult:
    result = PushResult(session_id="S", relay="h:587", started=time.time(), deferred=deferred)
    result.error = error  # type: ignore[assignment]
    return result


@pytest.mark.parametrize(
    ("pull_code", "result", "expected"),
    [
        (0, None, 0),
        (0, push(), 0),
        (0, push(deferred=1), 75),
        (0, push(ConnectFailure("down")), 75),  # the ODMR session worked: mail safe, later
        (0, push(TemporaryFailure("451")), 75),
        (0, push(AlreadyRunning("busy")), 0),  # another push does the work
        (0, push(TLSFailure("bad cert")), 74),  # a human is needed
        (0, push(AuthFailure("535")), 77),
        (75, push(ProtocolFailure("odd")), 76),
        (75, push(ConnectFailure("down")), 75),
        (69, push(ConnectFailure("down")), 69),  # the pull failed harder
        (77, push(TLSFailure("x")), 77),
    ],
)
def test_combined_exit_code(pull_code: int, result: PushResult | None, expected: int) -> None:
    assert combined_exit_code(pull_code, result) == expected


def test_summary_lines_include_the_push() -> None:
    summary = PullSummary(name="org", domains=("example.org",), session_id="S", started=0.0)
    summary.push = push(ConnectFailure("cannot connect to h:587"))
    summary.push.left = 2
    assert summary.lines() == [
        "org: example.org: no mail",
        "outbox -> h:587: failed (connection, exit 69): cannot connect to h:587; "
        "2 message(s) kept in the outbox",
    ]
    assert summary.exit_code == 75
