"""The customer config: schema, defaults, validation messages, the example file."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from fermoposta.config import ConfigError as ProviderConfigError
from fermoposta.config import LogConfig
from fermoposta.customer.config import (
    CLIENT_MECHANISMS,
    ConfigError,
    CustomerConfig,
    DeliveryConfig,
    OutboxConfig,
    ProviderEndpoint,
    default_customer_config_path,
    load_customer_config,
)
from fermoposta.customer.schedule import JitterSpec, Schedule, Window

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cr3t-Pa55word"

HEAD = 'hostname = "mail.example.org"\ndata_dir = "var"\n'
PROVIDER = '[provider]\nhost = "127.0.0.1"\nusername = "acme"\npassword_file = "acme.pw"\n'
PULL = (
    '[[pull]]\ndomains = ["example.org"]\n'
    '[pull.delivery]\ntype = "maildir"\npath = "mail/{domain}/{local}/Maildir"\n'
)
BASE = HEAD + PROVIDER + PULL


_CA = trustme.CA()
_CLIENT = _CA.issue_cert("acme@mail.example.org")


def write_ca(path: Path) -> None:
    """A real CA certificate: the loader checks that the bundle loads."""
    _CA.cert_pem.write_to_path(str(path))


def write_client(cert: Path, key: Path | None = None) -> None:
    """A client certificate and its key (in one file when `key` is None)."""
    if key is None:
        _CLIENT.private_key_and_cert_chain_pem.write_to_path(str(cert))
        return
    _CLIENT.cert_chain_pems[0].write_to_path(str(cert))
    _CLIENT.private_key_pem.write_to_path(str(key))


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A config directory with the password file BASE names."""
    (tmp_path / "acme.pw").write_text(PASSWORD + "\nsecond line\n", encoding="utf-8")
    return tmp_path


def write(directory: Path, text: str, name: str = "customer.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def load(directory: Path, text: str) -> CustomerConfig:
    return load_customer_config(write(directory, text))


def load_error(directory: Path, text: str) -> str:
    path = write(directory, text)
    with pytest.raises(ConfigError) as info:
        load_customer_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


def pull_with(delivery: str, extra: str = "") -> str:
    """HEAD + PROVIDER and one pull for example.org with `delivery` as [pull.delivery]."""
    return (
        HEAD
        + PROVIDER
        + '[[pull]]\ndomains = ["example.org"]\n'
        + extra
        + ("[pull.delivery]\n" + delivery)
    )


# -- good configs ----------------------------------------------------------


def test_minimal_config_gets_defaults(tmp: Path) -> None:
    config = load(tmp, BASE)
    assert config.path == tmp / "customer.toml"
    assert config.hostname == "mail.example.org"
    assert config.data_dir == tmp / "var"
    assert config.domains == ("example.org",)
    assert config.max_message_size == 50 * 1024 * 1024
    assert config.log == LogConfig()
    p = config.provider
    assert (p.host, p.port, p.tls) == ("127.0.0.1", 366, "starttls")
    assert p.ca_file is None and p.pin_sha256 is None
    assert p.server_name == "127.0.0.1"  # defaults to host
    assert p.client_cert is None and p.client_key is None
    assert p.username == "acme" and p.password_file == tmp / "acme.pw"
    assert p.mechanisms == ()
    assert (p.connect_timeout, p.command_timeout, p.atrn_timeout) == (30.0, 300.0, 600.0)
    (pull,) = config.pulls
    assert pull.name == "pull-1"
    assert pull.domains == ("example.org",) and not pull.bare
    assert pull.schedule == Schedule(
        every=600.0, jitter=JitterSpec(fraction=0.1), backoff_max=3600.0, windows=()
    )
    assert pull.delivery == DeliveryConfig(
        type="maildir", path=str(tmp / "mail/{domain}/{local}/Maildir"), create=False
    )
    assert pull.delivery.aliases == {} and pull.delivery.catch_all is None
    assert pull.accept_domains(config) == ("example.org",)
    assert config.pull_named("pull-1") is pull
    with pytest.raises(KeyError):
        config.pull_named("nope")


def test_full_config(tmp: Path) -> None:
    write_ca(tmp / "ca.pem")
    write_client(tmp / "client.pem", tmp / "client.key")
    text = """
hostname = "mail.example.org"
data_dir = "/srv/customer"
domains = ["Example.ORG", "example.net", "bücher.example"]
max_message_size = "10M"
[provider]
host = "[::1]"
port = 3366
tls = "IMPLICIT"
ca_file = "ca.pem"
server_name = "odmr.provider.test"
pin_sha256 = "PIN"
client_cert = "client.pem"
client_key = "client.key"
username = "acme"
password_file = "acme.pw"
mechanisms = ["external", "SCRAM-SHA-256", "cram-md5"]
connect_timeout = "5s"
command_timeout = 60
atrn_timeout = "1s"
[log]
level = "DEBUG"
format = "json"

[[pull]]
name = "office"
domains = ["example.org", "example.net"]
every = "15m"
jitter = "30s"
backoff_max = "2h"
[[pull.window]]
days = "mon-fri"
hours = "08-18"
every = "5m"
[[pull.window]]
days = "sat,sun"
every = "1h"
[pull.delivery]
type = "maildir"
path = "/var/mail/{address}"
create = true
aliases = { "Postmaster@Example.org" = "bob@example.org", "info@example.net" = "Ann@Example.NET" }
catch_all = "bob@example.org"

[[pull]]
name = "books"
domains = ["xn--bcher-kva.example"]
[pull.delivery]
type = "lmtp"
address = "/run/dovecot/lmtp"
"""
    pin = "AB:CD:EF:01:23:45:67:89:" + "ab:cd:ef:01:23:45:67:89:" * 2 + "ABCDEF0123456789"
    config = load(tmp, text.replace("PIN", pin))
    assert config.data_dir == Path("/srv/customer")
    assert config.domains == ("example.org", "example.net", "xn--bcher-kva.example")
    assert config.max_message_size == 10 * 1024 * 1024
    assert config.log == LogConfig(level="debug", format="json")
    assert config.provider == ProviderEndpoint(
        host="::1",
        port=3366,
        tls="implicit",
        ca_file=tmp / "ca.pem",
        server_name="odmr.provider.test",
        pin_sha256="abcdef0123456789" * 4,
        client_cert=tmp / "client.pem",
        client_key=tmp / "client.key",
        username="acme",
        password_file=tmp / "acme.pw",
        mechanisms=("EXTERNAL", "SCRAM-SHA-256", "CRAM-MD5"),
        connect_timeout=5.0,
        command_timeout=60.0,
        atrn_timeout=1.0,
    )
    office, books = config.pulls
    assert office.name == "office" and office.domains == ("example.org", "example.net")
    assert office.schedule == Schedule(
        every=900.0,
        jitter=JitterSpec(seconds=30.0),
        backoff_max=7200.0,
        windows=(
            Window(days=frozenset(range(5)), start_hour=8, end_hour=18, every=300.0),
            Window(days=frozenset({5, 6}), start_hour=0, end_hour=24, every=3600.0),
        ),
    )
    assert office.delivery == DeliveryConfig(
        type="maildir",
        path="/var/mail/{address}",
        create=True,
        aliases={
            "postmaster@example.org": "bob@example.org",
            "info@example.net": "ann@example.net",
        },
        catch_all="bob@example.org",
    )
    assert books.name == "books" and books.domains == ("xn--bcher-kva.example",)
    assert books.delivery == DeliveryConfig(type="lmtp", socket_path=Path("/run/dovecot/lmtp"))
    assert books.delivery.target == "lmtp:/run/dovecot/lmtp"
    assert books.accept_domains(config) == ("xn--bcher-kva.example",)


def test_bare_atrn_accepts_the_site_domains(tmp: Path) -> None:
    text = (
        HEAD.replace('var"\n', 'var"\ndomains = ["example.org", "example.net"]\n')
        + PROVIDER
        + '[[pull]]\n[pull.delivery]\ntype = "smtp"\naddress = "[::1]:2525"\n'
    )
    config = load(tmp, text)
    (pull,) = config.pulls
    assert pull.bare and pull.domains == ()
    assert pull.accept_domains(config) == ("example.org", "example.net")
    assert pull.delivery == DeliveryConfig(type="smtp", hostport=("::1", 2525))
    assert pull.delivery.target == "smtp:[::1]:2525"


def test_site_domains_default_to_the_union_of_the_pulls(tmp: Path) -> None:
    text = (
        HEAD
        + PROVIDER
        + PULL
        + '[[pull]]\ndomains = ["b.example", "c.example"]\n'
        + '[pull.delivery]\ntype = "lmtp"\naddress = "localhost:24"\n'
    )
    config = load(tmp, text)
    assert config.domains == ("example.org", "b.example", "c.example")
    assert [p.name for p in config.pulls] == ["pull-1", "pull-2"]
    assert config.pulls[1].delivery == DeliveryConfig(type="lmtp", hostport=("localhost", 24))
    assert config.pulls[1].delivery.target == "lmtp:localhost:24"


@pytest.mark.parametrize(
    ("address", "socket"),
    [("lmtp.sock", "lmtp.sock"), ("run/lmtp", "run/lmtp"), ("./odd:name", "odd:name")],
)
def test_lmtp_relative_socket_resolves_against_config_dir(
    tmp: Path, address: str, socket: str
) -> None:
    config = load(tmp, pull_with(f'type = "lmtp"\naddress = "{address}"\n'))
    assert config.pulls[0].delivery.socket_path == tmp / socket
    assert config.pulls[0].delivery.hostport is None


def test_backoff_max_default_grows_with_long_intervals(tmp: Path) -> None:
    extra = 'every = "2h"\n[[pull.window]]\nevery = "3h"\nhours = "00-06"\n'
    config = load(tmp, pull_with('type = "maildir"\npath = "m/{local}"\n', extra))
    assert config.pulls[0].schedule.backoff_max == 3 * 3600.0


def test_client_certificate_alone_is_enough(tmp: Path) -> None:
    write_client(tmp / "c.pem", tmp / "c.key")
    text = HEAD + '[provider]\nhost = "p.test"\nclient_cert = "c.pem"\nclient_key = "c.key"\n'
    config = load(tmp, text + PULL)
    assert config.provider.username is None and config.provider.password_file is None
    assert config.provider.client_cert == tmp / "c.pem"
    with pytest.raises(ConfigError, match=r"\[provider\] password_file: no password file"):
        config.provider.read_password()


def test_tls_none_when_written(tmp: Path) -> None:
    text = HEAD + PROVIDER + 'tls = "none"\nmechanisms = ["CRAM-MD5", "PLAIN"]\n' + PULL
    assert load(tmp, text).provider.tls == "none"


def test_config_is_frozen(tmp: Path) -> None:
    config = load(tmp, BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hostname = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.provider.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pulls[0].delivery.create = True  # type: ignore[misc]
    # asdict works (no exotic containers): handy for tests and debug output.
    assert dataclasses.asdict(config)["provider"]["username"] == "acme"


def test_config_error_is_the_provider_one() -> None:
    assert ConfigError is ProviderConfigError


# -- paths -----------------------------------------------------------------


def test_relative_paths_resolve_against_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    (etc / "secrets").mkdir(parents=True)
    (etc / "secrets" / "pw").write_text("pw\n")
    write_ca(tmp_path / "ca.pem")
    text = (
        'hostname = "h.example"\ndata_dir = "../var"\n'
        '[provider]\nhost = "p.test"\nca_file = "../ca.pem"\nusername = "u"\n'
        'password_file = "secrets/pw"\n' + PULL
    )
    write(etc, text)
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)  # the working directory must not matter
    config = load_customer_config(Path("../etc/customer.toml"))
    assert config.path == etc / "customer.toml"
    assert config.data_dir == tmp_path / "var"
    assert config.provider.ca_file == tmp_path / "ca.pem"
    assert config.provider.password_file == etc / "secrets" / "pw"
    assert config.provider.read_password() == "pw"
    assert config.pulls[0].delivery.path == str(etc / "mail/{domain}/{local}/Maildir")


# -- the password ----------------------------------------------------------


def test_read_password_first_line(tmp: Path) -> None:
    assert load(tmp, BASE).provider.read_password() == PASSWORD
    (tmp / "acme.pw").write_bytes(b"with-crlf\r\nx\r\n")
    assert load(tmp, BASE).provider.read_password() == "with-crlf"
    (tmp / "acme.pw").write_bytes(b"no-newline")
    assert load(tmp, BASE).provider.read_password() == "no-newline"
    (tmp / "acme.pw").write_bytes(b" spaces kept \n")
    assert load(tmp, BASE).provider.read_password() == " spaces kept "


@pytest.mark.parametrize(
    ("content", "expected"), [(b"", "is empty"), (b"\nsecond\n", "is empty"), (b"\xff\n", "UTF-8")]
)
def test_read_password_errors(tmp: Path, content: bytes, expected: str) -> None:
    config = load(tmp, BASE)
    (tmp / "acme.pw").write_bytes(content)
    with pytest.raises(ConfigError) as info:
        config.provider.read_password()
    message = str(info.value)
    assert message.startswith(f"{tmp / 'customer.toml'}: [provider] password_file: ")
    assert expected in message


def test_read_password_file_gone(tmp: Path) -> None:
    config = load(tmp, BASE)
    (tmp / "acme.pw").unlink()
    with pytest.raises(ConfigError, match=r"\[provider\] password_file: cannot read .*acme\.pw"):
        config.provider.read_password()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_read_password_unreadable(tmp: Path) -> None:
    config = load(tmp, BASE)
    (tmp / "acme.pw").chmod(0)
    with pytest.raises(ConfigError, match=r"\[provider\] password_file: cannot read"):
        config.provider.read_password()


def test_repr_does_not_contain_the_password(tmp: Path) -> None:
    config = load(tmp, BASE)
    assert config.provider.read_password() == PASSWORD
    for text in (repr(config), str(config), repr(config.provider), str(dataclasses.asdict(config))):
        assert PASSWORD not in text


# -- errors: the file ------------------------------------------------------


def test_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"^{path}: config file not found$"):
        load_customer_config(path)


def test_invalid_toml(tmp: Path) -> None:
    assert "invalid TOML" in load_error(tmp, "hostname = \n")


def test_example_message_format(tmp: Path) -> None:
    message = load_error(tmp, BASE.replace("[provider]\n", '[provider]\ntls = "yes"\n'))
    assert message == (
        f'{tmp / "customer.toml"}: [provider] tls: expected one of "starttls", "implicit", '
        '"none", got "yes"'
    )


# -- errors: structure -----------------------------------------------------


@pytest.mark.parametrize("key", ["hostname"])  # data_dir has a default (defaults tests)
def test_required_top_level_keys(tmp: Path, key: str) -> None:
    text = "\n".join(line for line in BASE.splitlines() if not line.startswith(key))
    assert f": {key}: required key is missing" in load_error(tmp, text)


def test_provider_table_required(tmp: Path) -> None:
    assert ": [provider]: required table is missing" in load_error(tmp, HEAD + PULL)


def test_provider_host_required(tmp: Path) -> None:
    text = BASE.replace('host = "127.0.0.1"\n', "")
    assert ": [provider] host: required key is missing" in load_error(tmp, text)


def test_at_least_one_pull(tmp: Path) -> None:
    assert ": [[pull]]: at least one [[pull]] block is required" in load_error(tmp, HEAD + PROVIDER)
    assert ": [[pull]]: at least one" in load_error(tmp, HEAD + "pull = []\n" + PROVIDER)


def test_pull_must_be_an_array_of_tables(tmp: Path) -> None:
    text = HEAD + PROVIDER + PULL.replace("[[pull]]", "[pull]")
    assert ": pull: expected [[pull]] blocks (an array of tables), got a single [pull] table" in (
        load_error(tmp, text)
    )
    assert ": pull: expected [[pull]] blocks" in load_error(tmp, HEAD + "pull = 3\n" + PROVIDER)


def test_window_must_be_an_array_of_tables(tmp: Path) -> None:
    text = pull_with('type = "maildir"\npath = "m/{local}"\n', '[pull.window]\nevery = "5m"\n')
    assert ": [[pull]] #1 window: expected [[pull.window]] blocks, got a single [pull.window]" in (
        load_error(tmp, text)
    )


def test_delivery_required(tmp: Path) -> None:
    text = HEAD + PROVIDER + '[[pull]]\ndomains = ["example.org"]\n'
    assert ": [[pull]] #1 [pull.delivery]: required table is missing" in load_error(tmp, text)
    text += 'delivery = "maildir"\n'
    assert ': [[pull]] #1 delivery: expected a table [pull.delivery], got "maildir"' in (
        load_error(tmp, text)
    )


def test_delivery_type_required(tmp: Path) -> None:
    message = load_error(tmp, pull_with('path = "m/{local}"\n'))
    assert ": [[pull]] #1 [pull.delivery] type: required key is missing" in message


def test_unknown_top_level_key(tmp: Path) -> None:
    message = load_error(tmp, 'hostnme = "x"\n' + BASE)
    assert message.endswith(': hostnme: unknown key (did you mean "hostname"?)')


def test_unknown_table(tmp: Path) -> None:
    message = load_error(tmp, BASE + '[provder]\nhost = "x"\n')
    assert message.endswith(': [provder]: unknown table (did you mean "provider"?)')


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (HEAD + PROVIDER + "bogus = 1\n" + PULL, "[provider] bogus"),
        (BASE + '[log]\nlevl = "info"\n', "[log] levl"),
        (HEAD + PROVIDER + PULL.replace("[[pull]]\n", "[[pull]]\nevry = 1\n"), "[[pull]] #1 evry"),
        (BASE + "path_x = 1\n", "[[pull]] #1 [pull.delivery] path_x"),
        (
            pull_with('type = "maildir"\npath = "m/{local}"\n', '[[pull.window]]\nday = "x"\n'),
            "[[pull]] #1 [[pull.window]] #1 day",
        ),
    ],
)
def test_unknown_keys_in_each_table(tmp: Path, text: str, where: str) -> None:
    assert f": {where}: unknown key" in load_error(tmp, text)


def test_unknown_key_hint_in_delivery(tmp: Path) -> None:
    message = load_error(tmp, pull_with('type = "smtp"\nadress = "h:25"\n'))
    # Every problem is reported: the typo, and so the missing key it was meant to be.
    first, second = message.splitlines()
    assert first.endswith(
        ': [[pull]] #1 [pull.delivery] adress: unknown key (did you mean "address"?)'
    )
    assert second.endswith(
        ': [[pull]] #1 [pull.delivery] address: required key is missing for type "smtp"'
    )


def test_second_pull_is_named_in_errors(tmp: Path) -> None:
    text = BASE + '[[pull]]\ndomains = ["b.example"]\nevery = "soon"\n'
    text += '[pull.delivery]\ntype = "maildir"\npath = "m/{local}"\n'
    assert ": [[pull]] #2 every: expected a duration" in load_error(tmp, text)


# -- errors: values --------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("hostname", "3", "expected a string, got 3"),
        ("hostname", '"not a host!"', "expected a host name"),
        ("data_dir", "true", "expected a string, got true"),
        ("data_dir", '""', "must not be empty"),
        ("domains", '"example.org"', "expected a list of domain names"),
        ("domains", "[]", "must not be empty"),
        ("domains", '["localhost"]', "single-label name"),
        ("domains", '["a..b"]', "invalid domain list"),
        ("domains", '["a.org,b.org"]', "one domain name per string"),
        ("domains", '[""]', "one domain name per string"),
        ("domains", '["*.example.org"]', "wildcards"),
        ("max_message_size", '"big"', "expected a size like 50M"),
        ("max_message_size", "0", "at least 1 bytes"),
    ],
)
def test_wrong_top_level_values(tmp: Path, key: str, value: str, expected: str) -> None:
    lines = [line for line in BASE.splitlines() if not line.startswith(key)]
    message = load_error(tmp, "\n".join([f"{key} = {value}", *lines]) + "\n")
    assert f": {key}: " in message, message
    assert expected in message, message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("host", "1", "expected a string, got 1"),
        ("host", '"bad host"', "expected a host name or an IP address"),
        ("port", '"366"', 'expected an integer, got "366"'),
        ("port", "0", "expected an integer >= 1"),
        ("port", "65536", "expected an integer from 1 to 65535"),
        ("tls", '"starttls-optional"', 'expected one of "starttls", "implicit", "none"'),
        ("tls", "true", 'expected one of "starttls"'),
        ("ca_file", "1", "expected a string, got 1"),
        ("ca_file", '"nope.pem"', "does not exist"),
        ("ca_file", '"."', "is not a regular file"),
        ("server_name", '"a b"', "expected a host name or an IP address"),
        ("pin_sha256", '"abcd"', "64 hex digits"),
        ("pin_sha256", '"' + "g" * 64 + '"', "64 hex digits"),
        ("username", "42", "expected a string, got 42"),
        ("username", '" acme"', "surrounding spaces"),
        ("username", '"ac\\nme"', "control characters"),
        ("password_file", '"missing.pw"', "does not exist"),
        ("password_file", '""', 'required with username "acme"'),
        ("mechanisms", '"PLAIN"', "expected a list of mechanisms"),
        ("mechanisms", '["DIGEST-MD5"]', 'unsupported mechanism "DIGEST-MD5"'),
        ("mechanisms", '["PLAIN", "plain"]', "listed twice"),
        ("mechanisms", '["EXTERNAL"]', "EXTERNAL needs client_cert and client_key"),
        ("connect_timeout", "0", "greater than 0"),
        ("command_timeout", '"5 minutes"', "expected a duration"),
        ("atrn_timeout", '"0.5s"', "at least 1s"),
        ("atrn_timeout", "-1", "expected a duration"),
    ],
)
def test_wrong_provider_values(tmp: Path, key: str, value: str, expected: str) -> None:
    (tmp / "ca.pem").write_text("x")
    lines = [line for line in PROVIDER.splitlines() if not line.startswith(f"{key} ")]
    text = HEAD + "\n".join([*lines, f"{key} = {value}"]) + "\n" + PULL
    message = load_error(tmp, text)
    assert f": [provider] {key}: " in message, message
    assert expected in message, message


def test_client_cert_without_key(tmp: Path) -> None:
    (tmp / "c.pem").write_text("x")
    message = load_error(tmp, HEAD + PROVIDER + 'client_cert = "c.pem"\n' + PULL)
    assert ": [provider] client_key: client_cert and client_key must be given together" in message


def test_client_key_without_cert(tmp: Path) -> None:
    (tmp / "c.key").write_text("x")
    message = load_error(tmp, HEAD + PROVIDER + 'client_key = "c.key"\n' + PULL)
    assert ": [provider] client_cert: client_cert and client_key must be given together" in (
        message
    )


def test_client_cert_files_must_exist(tmp: Path) -> None:
    (tmp / "c.pem").write_text("x")
    text = HEAD + PROVIDER + 'client_cert = "c.pem"\nclient_key = "gone.key"\n' + PULL
    message = load_error(tmp, text)
    assert f': [provider] client_key: file "{tmp / "gone.key"}" does not exist' in message


def test_client_cert_and_key_in_one_file(tmp: Path) -> None:
    write_client(tmp / "both.pem")
    text = HEAD + '[provider]\nhost = "p.test"\nclient_cert = "both.pem"\n'
    text += 'client_key = "both.pem"\nmechanisms = ["EXTERNAL"]\n' + PULL
    provider = load(tmp, text).provider
    assert provider.client_cert == provider.client_key == tmp / "both.pem"
    assert provider.mechanisms == ("EXTERNAL",)


def test_client_key_must_match_the_certificate(tmp: Path) -> None:
    write_client(tmp / "c.pem", tmp / "c.key")
    trustme.CA().issue_cert("other").private_key_pem.write_to_path(str(tmp / "other.key"))
    text = HEAD + PROVIDER + 'client_cert = "c.pem"\nclient_key = "other.key"\n' + PULL
    assert ": [provider] client_key: cannot use this certificate and key" in load_error(tmp, text)


def test_encrypted_client_key_is_refused_without_prompting(tmp: Path) -> None:
    write_client(tmp / "c.pem", tmp / "plain.key")
    _CLIENT.private_key_pem.write_to_path(str(tmp / "plain.key"))
    key = serialization.load_pem_private_key((tmp / "plain.key").read_bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    (tmp / "c.key").write_bytes(encrypted)
    text = HEAD + PROVIDER + 'client_cert = "c.pem"\nclient_key = "c.key"\n' + PULL
    message = load_error(tmp, text)
    assert ": [provider] client_key: cannot use this certificate and key: the key is encrypted" in (
        message
    )


@pytest.mark.parametrize("content", ["not a certificate", ""])
def test_ca_file_must_be_a_ca_bundle(tmp: Path, content: str) -> None:
    (tmp / "ca.pem").write_text(content)
    message = load_error(tmp, HEAD + PROVIDER + 'ca_file = "ca.pem"\n' + PULL)
    assert ": [provider] ca_file: not a usable CA bundle" in message


def test_username_or_certificate_required(tmp: Path) -> None:
    text = HEAD + '[provider]\nhost = "p.test"\n' + PULL
    assert ": [provider] username: required key is missing" in load_error(tmp, text)


def test_password_file_without_username(tmp: Path) -> None:
    write_client(tmp / "c.pem", tmp / "c.key")
    text = HEAD + '[provider]\nhost = "p.test"\nclient_cert = "c.pem"\nclient_key = "c.key"\n'
    text += 'password_file = "acme.pw"\n' + PULL
    assert ": [provider] password_file: given without a username" in load_error(tmp, text)


def test_missing_password_file(tmp: Path) -> None:
    (tmp / "acme.pw").unlink()
    message = load_error(tmp, BASE)
    assert f': [provider] password_file: file "{tmp / "acme.pw"}" does not exist' in message


def test_password_mechanism_needs_username(tmp: Path) -> None:
    write_client(tmp / "c.pem", tmp / "c.key")
    text = HEAD + '[provider]\nhost = "p.test"\nclient_cert = "c.pem"\nclient_key = "c.key"\n'
    text += 'mechanisms = ["EXTERNAL", "PLAIN"]\n' + PULL
    assert ": [provider] mechanisms: PLAIN needs username" in load_error(tmp, text)


def test_tls_keys_are_ignored_without_tls(tmp: Path) -> None:
    write_ca(tmp / "ca.pem")
    text = HEAD + PROVIDER + 'tls = "none"\nca_file = "ca.pem"\nserver_name = "localhost"\n'
    text += 'mechanisms = ["PLAIN", "LOGIN"]\n' + PULL  # the dial-out refuses them in clear
    provider = load(tmp, text).provider
    assert provider.tls == "none" and provider.mechanisms == ("PLAIN", "LOGIN")


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("log", "level", '"verbose"', 'expected one of "debug", "info"'),
        ("log", "format", '"xml"', 'expected one of "text", "json", got "xml"'),
    ],
)
def test_wrong_log_values(tmp: Path, section: str, key: str, value: str, expected: str) -> None:
    message = load_error(tmp, BASE + f"[{section}]\n{key} = {value}\n")
    assert f": [{section}] {key}: {expected}" in message, message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("name", '""', "expected a name of letters"),
        ("name", '"has space"', "expected a name of letters"),
        ("name", '"../escape"', "expected a name of letters"),
        ("name", "1", "expected a string, got 1"),
        ("domains", '"example.org"', "expected a list of domain names"),
        ("domains", '["no_underscore.example"]', "'_' are not domains"),
        ("domains", '["[127.0.0.1]"]', "address literals"),
        ("domains", '["-bad.example"]', "invalid domain list"),
        ("domains", str([f"d{i}.example" for i in range(51)]).replace("'", '"'), "more than 50"),
        ("every", '"0s"', 'at least 1s or "push"'),
        ("every", '"0.5s"', "at least 1s"),
        ("every", "true", "expected a duration"),
        ("every", '"pull"', 'or "push", got "pull"'),
        ("jitter", '"110%"', 'expected a jitter like "10%"'),
        ("jitter", '"ten percent"', 'expected a jitter like "10%"'),
        ("jitter", "-1", 'expected a jitter like "10%"'),
        ("backoff_max", '"5m"', "must be at least every (600s), got 300s"),
    ],
)
def test_wrong_pull_values(tmp: Path, key: str, value: str, expected: str) -> None:
    lines = [line for line in PULL.splitlines() if not line.startswith(f"{key} ")]
    lines.insert(1, f"{key} = {value}")
    message = load_error(tmp, HEAD + PROVIDER + "\n".join(lines) + "\n")
    assert f": [[pull]] #1 {key}: " in message, message
    assert expected in message, message


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ('days = "mon-fri"\nhours = "08-18"', "every", "required key is missing"),
        ('days = "weekdays"\nevery = "5m"', "days", 'unknown day "weekdays"'),
        ('days = ""\nevery = "5m"', "days", 'expected days like "mon-fri"'),
        ('days = ["mon"]\nevery = "5m"', "days", 'expected days like "mon-fri"'),
        ('hours = "18-08"\nevery = "5m"', "hours", "split a window that crosses midnight"),
        ('hours = "08:00-18:00"\nevery = "5m"', "hours", 'expected hours "start-end"'),
        ('hours = "00-25"\nevery = "5m"', "hours", "hours go from 00 to 24"),
        ('hours = "08-08"\nevery = "5m"', "hours", "the start must be before the end"),
        ("every = 0", "every", 'at least 1s or "push"'),
    ],
)
def test_wrong_window_values(tmp: Path, line: str, key: str, expected: str) -> None:
    text = pull_with('type = "maildir"\npath = "m/{local}"\n', f"[[pull.window]]\n{line}\n")
    message = load_error(tmp, text)
    assert f": [[pull]] #1 [[pull.window]] #1 {key}: " in message, message
    assert expected in message, message


def test_backoff_max_below_a_window_interval(tmp: Path) -> None:
    extra = 'backoff_max = "1h"\n[[pull.window]]\nevery = "2h"\n'
    message = load_error(tmp, pull_with('type = "maildir"\npath = "m/{local}"\n', extra))
    assert ": [[pull]] #1 backoff_max: must be at least the longest window every (7200s)" in (
        message
    )


def test_duplicate_pull_names(tmp: Path) -> None:
    text = HEAD + PROVIDER + PULL.replace("[[pull]]\n", '[[pull]]\nname = "a"\n')
    text += '[[pull]]\nname = "a"\ndomains = ["b.example"]\n'
    text += '[pull.delivery]\ntype = "smtp"\naddress = "127.0.0.1:25"\n'
    message = load_error(tmp, text)
    assert ': [[pull]] #2 name: "a" is already the name of [[pull]] #1' in message


def test_explicit_name_clashing_with_a_default_name(tmp: Path) -> None:
    text = BASE + '[[pull]]\nname = "pull-1"\ndomains = ["b.example"]\n'
    text += '[pull.delivery]\ntype = "smtp"\naddress = "127.0.0.1:25"\n'
    assert ': [[pull]] #2 name: "pull-1" is already the name of [[pull]] #1' in load_error(
        tmp, text
    )


def test_same_domain_in_two_pulls(tmp: Path) -> None:
    text = BASE + '[[pull]]\ndomains = ["b.example", "EXAMPLE.org."]\n'
    text += '[pull.delivery]\ntype = "smtp"\naddress = "127.0.0.1:25"\n'
    message = load_error(tmp, text)
    assert ": [[pull]] #2 domains: example.org is already collected by [[pull]] #1" in message


@pytest.mark.parametrize("bare_first", [True, False])
def test_bare_atrn_next_to_other_blocks(tmp: Path, bare_first: bool) -> None:
    bare = '[[pull]]\nname = "rest"\n[pull.delivery]\ntype = "smtp"\naddress = "127.0.0.1:25"\n'
    top = HEAD + 'domains = ["example.org", "example.net"]\n' + PROVIDER
    config = load(tmp, top + (bare + PULL if bare_first else PULL + bare))
    rest = config.pull_named("rest")
    assert rest.bare and rest.accept_domains(config) == ("example.org", "example.net")
    (other,) = [p for p in config.pulls if p is not rest]
    assert other.accept_domains(config) == ("example.org",)


def test_two_bare_pulls(tmp: Path) -> None:
    bare = '[[pull]]\n[pull.delivery]\ntype = "smtp"\naddress = "127.0.0.1:25"\n'
    message = load_error(tmp, HEAD + 'domains = ["example.org"]\n' + PROVIDER + bare + bare)
    assert ': [[pull]] #2 domains: [[pull]] #1 ("pull-1") already sends a bare ATRN' in message


@pytest.mark.parametrize("pull_domains", ["", "domains = []\n"])
def test_bare_atrn_without_site_domains(tmp: Path, pull_domains: str) -> None:
    text = HEAD + PROVIDER + f"[[pull]]\n{pull_domains}"
    text += '[pull.delivery]\ntype = "lmtp"\naddress = "/run/lmtp"\n'
    message = load_error(tmp, text)
    assert ': domains: required: [[pull]] #1 ("pull-1") sends a bare ATRN' in message


def test_pull_domain_outside_the_site_domains(tmp: Path) -> None:
    text = HEAD + 'domains = ["example.net"]\n' + PROVIDER + PULL
    message = load_error(tmp, text)
    assert ": [[pull]] #1 domains: example.org is not one of the site's domains" in message


# -- errors: delivery ------------------------------------------------------


@pytest.mark.parametrize(
    ("delivery", "key", "expected"),
    [
        ('type = "mbox"', "type", 'expected one of "maildir", "lmtp", "smtp", got "mbox"'),
        ('type = "maildir"', "path", 'required key is missing for type "maildir"'),
        ('type = "maildir"\npath = ""', "path", "must not be empty"),
        ('type = "maildir"\npath = 3', "path", "expected a string, got 3"),
        ('type = "maildir"\npath = "/var/mail/{domain}"', "path", "must contain {local}"),
        ('type = "maildir"\npath = "/m/{user}"', "path", "placeholders are {domain}"),
        ('type = "maildir"\npath = "/m/{local!r}"', "path", "placeholders are"),
        ('type = "maildir"\npath = "/m/{local:>9}"', "path", "placeholders are"),
        ('type = "maildir"\npath = "/m/{local"', "path", "bad template"),
        ('type = "maildir"\npath = "/m/{local}"\ncreate = "yes"', "create", "true or false"),
        ('type = "maildir"\npath = "/m/{local}"\naliases = 1', "aliases", "expected a table"),
        (
            'type = "maildir"\npath = "/m/{local}"\naliases = {"a@example.org" = "nobody"}',
            'aliases."a@example.org"',
            "expected an address like user@example.org",
        ),
        (
            'type = "maildir"\npath = "/m/{local}"\n'
            'aliases = {"a@example.org" = "b@other.example"}',
            'aliases."a@example.org"',
            "other.example is not a domain this block accepts (example.org)",
        ),
        (
            'type = "maildir"\npath = "/m/{local}"\n'
            'aliases = {"a@other.example" = "b@example.org"}',
            'aliases."a@other.example"',
            "other.example is not a domain this block accepts",
        ),
        (
            'type = "maildir"\npath = "/m/{local}"\n'
            'aliases = {"A@example.org" = "b@example.org", "a@example.org" = "c@example.org"}',
            'aliases."a@example.org"',
            "listed twice",
        ),
        ('type = "maildir"\npath = "/m/{local}"\ncatch_all = 1', "catch_all", "expected a string"),
        ('type = "maildir"\npath = "/m/{local}"\ncatch_all = "x"', "catch_all", "an address"),
        (
            'type = "maildir"\npath = "/m/{local}"\ncatch_all = "b@other.example"',
            "catch_all",
            "not a domain this block accepts",
        ),
        ('type = "lmtp"', "address", 'required key is missing for type "lmtp"'),
        ('type = "lmtp"\naddress = ""', "address", "must not be empty"),
        ('type = "lmtp"\naddress = "[::1]"', "address", 'expected "host:port"'),
        ('type = "lmtp"\naddress = "h:0"', "address", "expected a port 1-65535"),
        ('type = "lmtp"\naddress = "/' + "s" * 120 + '"', "address", "longer than 107 bytes"),
        ('type = "smtp"\naddress = "/run/smtp.sock"', "address", 'expected "host:port"'),
        ('type = "smtp"\naddress = "localhost"', "address", 'expected "host:port"'),
        ('type = "smtp"\naddress = 25', "address", "expected a string, got 25"),
    ],
)
def test_wrong_delivery_values(tmp: Path, delivery: str, key: str, expected: str) -> None:
    message = load_error(tmp, pull_with(delivery + "\n"))
    assert f": [[pull]] #1 [pull.delivery] {key}: " in message, message
    assert expected in message, message


@pytest.mark.parametrize(
    ("delivery", "key", "owner"),
    [
        ('type = "lmtp"\naddress = "/run/lmtp"\npath = "/m/{local}"', "path", '"maildir"'),
        ('type = "lmtp"\naddress = "/run/lmtp"\ncreate = true', "create", '"maildir"'),
        ('type = "smtp"\naddress = "h:25"\naliases = {}', "aliases", '"maildir"'),
        ('type = "smtp"\naddress = "h:25"\ncatch_all = ""', "catch_all", '"maildir"'),
        ('type = "maildir"\npath = "/m/{local}"\naddress = "h:25"', "address", '"lmtp" and "smtp"'),
    ],
)
def test_keys_of_another_delivery_type(tmp: Path, delivery: str, key: str, owner: str) -> None:
    message = load_error(tmp, pull_with(delivery + "\n"))
    kind = delivery.split('"')[1]
    assert message.endswith(
        f': [[pull]] #1 [pull.delivery] {key}: not a key of delivery type "{kind}" '
        f"(it belongs to {owner})"
    ), message


def test_empty_catch_all_is_none(tmp: Path) -> None:
    config = load(tmp, pull_with('type = "maildir"\npath = "/m/{local}"\ncatch_all = ""\n'))
    assert config.pulls[0].delivery.catch_all is None


# -- misc ------------------------------------------------------------------


def test_default_customer_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERMOPOSTA_CUSTOMER_CONFIG", raising=False)
    assert default_customer_config_path() == Path("/etc/fermoposta/customer.toml")
    monkeypatch.setenv("FERMOPOSTA_CUSTOMER_CONFIG", "/tmp/c.toml")
    assert default_customer_config_path() == Path("/tmp/c.toml")
    monkeypatch.setenv("FERMOPOSTA_CUSTOMER_CONFIG", "")
    assert default_customer_config_path() == Path("/etc/fermoposta/customer.toml")


def test_client_mechanisms_in_strength_order() -> None:
    assert CLIENT_MECHANISMS == ("SCRAM-SHA-256", "EXTERNAL", "PLAIN", "CRAM-MD5", "LOGIN")


# -- the shipped example ---------------------------------------------------


def test_example_config_loads(tmp_path: Path) -> None:
    """examples/customer.toml loads once the files `make run` and the README create exist."""
    examples = tmp_path / "examples"
    examples.mkdir()
    shutil.copy(REPO / "examples" / "customer.toml", examples / "customer.toml")
    (tmp_path / "var" / "tls").mkdir(parents=True)
    write_ca(tmp_path / "var" / "tls" / "provider.pem")  # what `make run` creates
    (tmp_path / "var" / "acme.pw").write_text("secret\n")
    config = load_customer_config(examples / "customer.toml")
    var = tmp_path / "var"
    assert config.hostname == "mail.example.org"
    assert config.data_dir == var / "customer"
    assert config.domains == ("example.org",)
    assert config.provider == ProviderEndpoint(
        host="127.0.0.1",
        port=3366,
        tls="starttls",
        ca_file=var / "tls" / "provider.pem",
        server_name="localhost",
        username="acme",
        password_file=var / "acme.pw",
        submission=("127.0.0.1", 2587),
    )
    assert config.provider.submission_server_name == "localhost"
    assert config.provider.read_password() == "secret"
    assert config.outbox == OutboxConfig(listen=("127.0.0.1", 10025))
    (pull,) = config.pulls
    assert pull.domains == ("example.org",)
    assert pull.schedule == Schedule(
        every=600.0,
        jitter=JitterSpec(fraction=0.1),
        backoff_max=3600.0,
        windows=(Window(days=frozenset(range(5)), start_hour=8, end_hour=18, every=300.0),),
    )
    assert pull.delivery == DeliveryConfig(
        type="maildir", path=str(var / "mail/{domain}/{local}/Maildir"), create=True
    )


def test_example_without_var_files_names_the_missing_file(tmp_path: Path) -> None:
    examples = tmp_path / "examples"
    examples.mkdir()
    shutil.copy(REPO / "examples" / "customer.toml", examples / "customer.toml")
    with pytest.raises(ConfigError, match=r"\[provider\] ca_file: file .*provider\.pem"):
        load_customer_config(examples / "customer.toml")


def test_example_sets_every_key() -> None:
    """The example shows every key (of the maildir delivery type), each under a comment."""
    text = (REPO / "examples" / "customer.toml").read_text(encoding="utf-8")
    keys = [line.split(" =")[0] for line in text.splitlines() if " = " in line[:30]]
    keys = [key for key in keys if not key.startswith("#")]
    top = ["hostname", "data_dir", "domains", "max_message_size"]
    provider = ["host", "port", "tls", "ca_file", "server_name", "pin_sha256", "client_cert"]
    provider += ["client_key", "username", "password_file", "mechanisms", "connect_timeout"]
    provider += ["command_timeout", "atrn_timeout", "submission", "submission_tls"]
    outbox = ["listen", "networks", "users_file", "allow_plaintext_auth", "restrict_senders"]
    outbox += ["push", "retry", "retry_max", "max_message_size"]
    log = ["level", "format"]
    pull = ["name", "domains", "every", "jitter", "backoff_max", "days", "hours", "every"]
    delivery = ["type", "path", "create", "aliases", "catch_all"]
    assert sorted(keys) == sorted([*top, *provider, *log, *pull, *delivery, *outbox])
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            above = lines[index - 1]
            assert above.startswith("#") or "=" in above, f"no comment above: {line}"
