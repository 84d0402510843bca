"""The provider config: schema, validation messages, parsers, the example file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trustme

from fermoposta.config import (
    SUPPORTED_MECHANISMS,
    ConfigError,
    LimitsConfig,
    ListenConfig,
    ODMRConfig,
    ProviderConfig,
    default_config_path,
    load_provider_config,
    parse_duration,
    parse_hostport,
    parse_size,
)

REPO = Path(__file__).resolve().parents[2]
BASE = 'hostname = "mx.provider.test"\ndata_dir = "var"\n'



_CA = trustme.CA()
_LEAF = _CA.issue_cert("localhost")


def write_tls(cert: Path, key: Path, ca: Path | None = None) -> None:
    """A real certificate and key (the loader checks that they go together)."""
    _LEAF.cert_chain_pems[0].write_to_path(str(cert))
    _LEAF.private_key_pem.write_to_path(str(key))
    if ca is not None:
        _CA.cert_pem.write_to_path(str(ca))


def write(tmp_path: Path, text: str, name: str = "provider.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_provider_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


# -- good configs ----------------------------------------------------------


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    config = load_provider_config(path)
    assert config.path == path
    assert config.hostname == "mx.provider.test"
    assert config.data_dir == tmp_path / "var"
    assert config.store_path == tmp_path / "var" / "fermoposta.sqlite3"
    assert config.listen == ListenConfig()
    assert config.listen.mx == ("0.0.0.0", 25)
    assert config.listen.odmr == ("0.0.0.0", 366)
    assert config.listen.odmr_tls is None
    assert config.tls.cert is None and config.tls.key is None and config.tls.client_ca is None
    assert not config.tls.enabled
    assert config.limits == LimitsConfig()
    assert config.limits.max_message_size == 50 * 1024 * 1024
    assert config.limits.command_timeout == 300.0
    assert config.limits.data_timeout == 180.0
    assert config.limits.tls_handshake_timeout == 60.0
    assert config.limits.max_line_length == 1000
    assert config.odmr == ODMRConfig()
    assert config.odmr.mechanisms == SUPPORTED_MECHANISMS
    assert config.odmr.no_mail_reply == "453"
    assert config.odmr.lease_ttl == 600.0
    assert config.mx.require_valid_recipient is False
    assert config.log.level == "info" and config.log.format == "text"


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    write_tls(tmp_path / "tls" / "c.pem", tmp_path / "tls" / "k.pem", tmp_path / "tls" / "ca.pem")
    text = (
        BASE
        + """
[listen]
mx = "127.0.0.1:2525"
odmr = "[::1]:3366"
odmr_tls = "localhost:0"
[tls]
cert = "tls/c.pem"
key = "tls/k.pem"
client_ca = "tls/ca.pem"
[limits]
max_message_size = "512K"
max_recipients = 50
max_errors = 5
max_connections = 10
max_connections_per_ip = 2
command_timeout = "30s"
data_timeout = 90
tls_handshake_timeout = "1.5s"
max_line_length = 2000
[odmr]
mechanisms = ["cram-md5", "SCRAM-SHA-256"]
allow_plaintext_auth = true
max_auth_failures = 1
min_atrn_interval = "2h"
lease_ttl = "1d"
max_messages_per_session = 7
greeting_timeout = "1m"
final_reply_timeout = "5m"
no_mail_reply = "quit"
[mx]
require_valid_recipient = true
[log]
level = "DEBUG"
format = "json"
"""
    )
    config = load_provider_config(write(tmp_path, text))
    assert config.listen.mx == ("127.0.0.1", 2525)
    assert config.listen.odmr == ("::1", 3366)
    assert config.listen.odmr_tls == ("localhost", 0)
    assert config.tls.cert == tmp_path / "tls" / "c.pem"
    assert config.tls.key == tmp_path / "tls" / "k.pem"
    assert config.tls.client_ca == tmp_path / "tls" / "ca.pem"
    assert config.tls.enabled
    assert config.limits == LimitsConfig(
        max_message_size=512 * 1024,
        max_recipients=50,
        max_errors=5,
        max_connections=10,
        max_connections_per_ip=2,
        command_timeout=30.0,
        data_timeout=90.0,
        tls_handshake_timeout=1.5,
        max_line_length=2000,
    )
    assert config.odmr == ODMRConfig(
        mechanisms=("CRAM-MD5", "SCRAM-SHA-256"),
        allow_plaintext_auth=True,
        max_auth_failures=1,
        min_atrn_interval=7200.0,
        lease_ttl=86400.0,
        max_messages_per_session=7,
        greeting_timeout=60.0,
        final_reply_timeout=300.0,
        no_mail_reply="quit",
    )
    assert config.mx.require_valid_recipient is True
    assert config.log.level == "debug" and config.log.format == "json"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_provider_config(write(tmp_path, BASE))
    with pytest.raises(AttributeError):
        config.hostname = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.limits.max_errors = 1  # type: ignore[misc]


def test_listeners_can_be_turned_off(tmp_path: Path) -> None:
    config = load_provider_config(write(tmp_path, BASE + '[listen]\nmx = ""\nodmr = ""\n'))
    assert config.listen.mx is None and config.listen.odmr is None


def test_no_mail_reply_accepts_unquoted_453(tmp_path: Path) -> None:
    config = load_provider_config(write(tmp_path, BASE + "[odmr]\nno_mail_reply = 453\n"))
    assert config.odmr.no_mail_reply == "453"


def test_dataclasses_have_defaults_for_tests() -> None:
    config = ProviderConfig(path=Path("/x.toml"), hostname="h.test", data_dir=Path("/d"))
    assert config.limits.max_recipients == 100
    assert config.store_path == Path("/d/fermoposta.sqlite3")


# -- paths -----------------------------------------------------------------


def test_relative_paths_resolve_against_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    (etc / "certs").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    write_tls(etc / "certs" / "p.pem", tmp_path / "shared" / "p.key")
    path = write(
        etc,
        'hostname = "h.test"\ndata_dir = "../var"\n'
        '[tls]\ncert = "certs/p.pem"\nkey = "../shared/p.key"\n',
    )
    monkeypatch.chdir(tmp_path / "shared")  # the working directory must not matter
    config = load_provider_config(Path("../etc/provider.toml"))
    assert config.path == path
    assert config.data_dir == tmp_path / "var"
    assert config.tls.cert == etc / "certs" / "p.pem"
    assert config.tls.key == tmp_path / "shared" / "p.key"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    data = tmp_path / "elsewhere"
    config = load_provider_config(
        write(tmp_path / "", f'hostname = "h.test"\ndata_dir = "{data}"\n')
    )
    assert config.data_dir == data


# -- errors ----------------------------------------------------------------


def test_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"^{path}: config file not found$"):
        load_provider_config(path)


def test_invalid_toml(tmp_path: Path) -> None:
    assert "invalid TOML" in load_error(tmp_path, "hostname = \n")


def test_example_message_format(tmp_path: Path) -> None:
    message = load_error(tmp_path, BASE + '[limits]\nmax_message_size = "x"\n')
    path = tmp_path / "provider.toml"
    assert message == (
        f'{path}: [limits] max_message_size: expected a size like 50M or an integer, got "x"'
    )


@pytest.mark.parametrize("key", ["hostname", "data_dir"])
def test_required_keys(tmp_path: Path, key: str) -> None:
    text = "\n".join(line for line in BASE.splitlines() if not line.startswith(key))
    assert f": {key}: required key is missing" in load_error(tmp_path, text)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, 'hostnme = "x"\n' + BASE)
    assert message.endswith(': hostnme: unknown key (did you mean "hostname"?)')


def test_unknown_table(tmp_path: Path) -> None:
    message = load_error(tmp_path, BASE + "[limit]\nmax_errors = 3\n")
    assert message.endswith(': [limit]: unknown table (did you mean "limits"?)')


@pytest.mark.parametrize("section", ["listen", "tls", "limits", "odmr", "mx", "log"])
def test_unknown_key_in_each_table(tmp_path: Path, section: str) -> None:
    message = load_error(tmp_path, BASE + f"[{section}]\nbogus_key = 1\n")
    assert f": [{section}] bogus_key: unknown key" in message


def test_typo_in_table_is_an_error(tmp_path: Path) -> None:
    message = load_error(tmp_path, BASE + "[limits]\nmax_recipient = 5\n")
    assert message.endswith(
        ': [limits] max_recipient: unknown key (did you mean "max_recipients"?)'
    )


def test_table_given_as_value(tmp_path: Path) -> None:
    assert ": limits: expected a table [limits]" in load_error(tmp_path, BASE + "limits = 3\n")


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        (None, "hostname", "3", "expected a string, got 3"),
        (None, "hostname", '"not a host!"', "expected a host name"),
        (None, "data_dir", "true", "expected a string, got true"),
        (None, "data_dir", '""', "must not be empty"),
        ("listen", "mx", '"127.0.0.1"', 'expected "host:port"'),
        ("listen", "mx", "25", 'expected "host:port"'),
        ("listen", "odmr", '"::1:366"', 'expected "host:port"'),
        ("listen", "odmr", '"h:70000"', "port 0-65535"),
        ("tls", "cert", "1", "expected a string, got 1"),
        ("limits", "max_message_size", "-1", "expected a size like 50M"),
        ("limits", "max_message_size", "0", "at least 1 bytes"),
        ("limits", "max_message_size", '"5T"', "expected a size like 50M"),
        ("limits", "max_recipients", '"100"', 'expected an integer, got "100"'),
        ("limits", "max_recipients", "0", "expected an integer >= 1, got 0"),
        ("limits", "max_errors", "true", "expected an integer, got true"),
        ("limits", "max_connections", "1.5", "expected an integer, got 1.5"),
        ("limits", "max_connections_per_ip", "[1]", "expected an integer, got [1]"),
        ("limits", "command_timeout", '"5 minutes"', "expected a duration like 10m"),
        ("limits", "data_timeout", "0", "greater than 0"),
        ("limits", "tls_handshake_timeout", "-3", "expected a duration"),
        ("limits", "max_line_length", "999", "at least 1000 (RFC 5321"),
        ("odmr", "mechanisms", '"PLAIN"', "expected a non-empty list"),
        ("odmr", "mechanisms", "[]", "expected a non-empty list"),
        ("odmr", "mechanisms", '["PLAIN", "DIGEST-MD5"]', 'unsupported mechanism "DIGEST-MD5"'),
        ("odmr", "mechanisms", '["PLAIN", "plain"]', "listed twice"),
        ("odmr", "allow_plaintext_auth", '"yes"', 'expected true or false, got "yes"'),
        ("odmr", "max_auth_failures", "0", "expected an integer >= 1"),
        ("odmr", "min_atrn_interval", '"soon"', "expected a duration"),
        ("odmr", "lease_ttl", '"0s"', "greater than 0"),
        ("odmr", "max_messages_per_session", "-1", "expected an integer >= 0"),
        ("odmr", "greeting_timeout", "false", "expected a duration"),
        ("odmr", "final_reply_timeout", '""', "expected a duration"),
        ("odmr", "no_mail_reply", '"452"', 'expected one of "453", "quit", got "452"'),
        ("odmr", "no_mail_reply", "250", 'expected one of "453", "quit", got 250'),
        ("mx", "require_valid_recipient", "1", "expected true or false, got 1"),
        ("log", "level", '"verbose"', 'expected one of "debug", "info"'),
        ("log", "format", '"xml"', 'expected one of "text", "json", got "xml"'),
    ],
)
def test_wrong_values_name_file_and_key(
    tmp_path: Path, section: str | None, key: str, value: str, expected: str
) -> None:
    if section is None:
        lines = [line for line in BASE.splitlines() if not line.startswith(key)]
        text = "\n".join([f"{key} = {value}", *lines]) + "\n"
        where = f": {key}: "
    else:
        text = BASE + f"[{section}]\n{key} = {value}\n"
        where = f": [{section}] {key}: "
    message = load_error(tmp_path, text)
    assert where in message, message
    assert expected in message, message


def test_cert_without_key(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    message = load_error(tmp_path, BASE + '[tls]\ncert = "c.pem"\n')
    assert ": [tls] key: cert and key must be given together; key is missing" in message


def test_key_without_cert(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_text("x")
    message = load_error(tmp_path, BASE + '[tls]\nkey = "k.pem"\n')
    assert ": [tls] cert: cert and key must be given together; cert is missing" in message


def test_tls_files_must_exist(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    message = load_error(tmp_path, BASE + '[tls]\ncert = "c.pem"\nkey = "missing.key"\n')
    assert f': [tls] key: file "{tmp_path / "missing.key"}" does not exist' in message


def test_tls_file_must_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_text("x")
    message = load_error(tmp_path, BASE + '[tls]\ncert = "."\nkey = "k.pem"\n')
    assert ": [tls] cert: " in message and "is not a regular file" in message


def test_client_ca_must_exist(tmp_path: Path) -> None:
    for name in ("c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    message = load_error(
        tmp_path, BASE + '[tls]\ncert = "c.pem"\nkey = "k.pem"\nclient_ca = "ca.pem"\n'
    )
    assert ": [tls] client_ca: file " in message


def test_client_ca_needs_cert(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    message = load_error(tmp_path, BASE + '[tls]\nclient_ca = "ca.pem"\n')
    assert ": [tls] client_ca: client certificates need [tls] cert and key" in message


def test_implicit_tls_listener_needs_cert(tmp_path: Path) -> None:
    message = load_error(tmp_path, BASE + '[listen]\nodmr_tls = "127.0.0.1:3465"\n')
    assert ": [listen] odmr_tls: an implicit-TLS listener needs [tls] cert and key" in message


# -- parsers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("5d", 432000.0),
        ("0s", 0.0),
        ("1.5s", 1.5),
        ("10M", 600.0),
        (" 7 ", 7.0),
        ("10", 10.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["", "x", "-1s", "1w", "5 minutes", "1e3s", "s", -1, True, None, [1], "nan"]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


def test_parse_duration_rejects_nonfinite() -> None:
    with pytest.raises(ValueError):
        parse_duration(float("inf"))
    with pytest.raises(ValueError):
        parse_duration(float("nan"))


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("50M", 50 * 1024 * 1024),
        ("512K", 512 * 1024),
        ("1G", 1024**3),
        ("512k", 512 * 1024),
        ("100", 100),
        (0, 0),
        (1000, 1000),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "x", "1.5M", "-1", "10MB", "1T", -5, True, 1.0, None])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="expected a size like 50M or an integer"):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "result"),
    [
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("0.0.0.0:25", ("0.0.0.0", 25)),
        ("[::1]:25", ("::1", 25)),
        ("[::]:366", ("::", 366)),
        ("[fe80::1%eth0]:25", ("fe80::1%eth0", 25)),
        ("localhost:0", ("localhost", 0)),
        ("mx.example.net:65535", ("mx.example.net", 65535)),
    ],
)
def test_parse_hostport(value: str, result: tuple[str, int]) -> None:
    assert parse_hostport(value) == result


@pytest.mark.parametrize(
    "value",
    [
        "",
        "127.0.0.1",
        ":25",
        "::1:25",
        "[::1]25",
        "[::1]",
        "[]:25",
        "[host]:25",
        "h:",
        "h:x",
        "h:-1",
        "h:65536",
        "h:٣",
        "bad host:25",
        25,
        None,
    ],
)
def test_parse_hostport_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_hostport(value)


def test_default_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERMOPOSTA_CONFIG", raising=False)
    assert default_config_path() == Path("/etc/fermoposta/provider.toml")
    monkeypatch.setenv("FERMOPOSTA_CONFIG", "/tmp/x.toml")
    assert default_config_path() == Path("/tmp/x.toml")
    monkeypatch.setenv("FERMOPOSTA_CONFIG", "")
    assert default_config_path() == Path("/etc/fermoposta/provider.toml")


# -- the shipped example ---------------------------------------------------


def test_example_config_loads(tmp_path: Path) -> None:
    """examples/provider.toml loads once ../var/tls exists (dummy files in a copy)."""
    examples = tmp_path / "examples"
    examples.mkdir()
    shutil.copy(REPO / "examples" / "provider.toml", examples / "provider.toml")
    (tmp_path / "var" / "tls").mkdir(parents=True)
    write_tls(tmp_path / "var" / "tls" / "provider.pem", tmp_path / "var" / "tls" / "provider.key")
    config = load_provider_config(examples / "provider.toml")
    assert config.hostname == "mx.provider.test"
    assert config.data_dir == tmp_path / "var"
    assert config.listen.mx == ("127.0.0.1", 2525)
    assert config.listen.odmr == ("127.0.0.1", 3366)
    assert config.listen.odmr_tls is None
    assert config.tls.cert == tmp_path / "var" / "tls" / "provider.pem"
    assert config.tls.key == tmp_path / "var" / "tls" / "provider.key"
    assert config.limits == LimitsConfig()


def test_mismatched_key_and_bad_ca_are_config_errors(tmp_path: Path) -> None:
    write_tls(tmp_path / "c.pem", tmp_path / "k.pem")
    trustme.CA().issue_cert("other").private_key_pem.write_to_path(str(tmp_path / "other.key"))
    message = load_error(tmp_path, BASE + '[tls]\ncert = "c.pem"\nkey = "other.key"\n')
    assert ": [tls] key: cannot use this certificate and key" in message
    (tmp_path / "ca.pem").write_text("not a certificate")
    message = load_error(
        tmp_path, BASE + '[tls]\ncert = "c.pem"\nkey = "k.pem"\nclient_ca = "ca.pem"\n'
    )
    assert ": [tls] client_ca: not a usable CA bundle" in message


def test_outbound_submission_and_hold_sections(tmp_path: Path) -> None:
    config = load_provider_config(write(tmp_path, BASE + """
[listen]
submission = "127.0.0.1:2587"
[submission]
rate_limit = 0
[outbound]
port = 2626
resolver = "127.0.0.1:5353"
require_tls_domains = ["Bank.Example"]
retry_initial = "1m"
retry_max = "2m"
delay_notice = "0"
[outbound.transport]
"example.net" = "127.0.0.1:2727"
"bücher.de" = "[::1]:25"
[hold]
lifetime = "7d"
"""))
    assert config.listen.submission == ("127.0.0.1", 2587)
    assert config.listen.submissions is None
    assert config.submission.rate_limit == 0 and config.submission.restrict_senders
    out = config.outbound
    assert out.port == 2626 and out.resolver == ("127.0.0.1", 5353)
    assert out.require_tls_domains == ("bank.example",)
    assert out.transport == {"example.net": ("127.0.0.1", 2727), "xn--bcher-kva.de": ("::1", 25)}
    assert out.delay_notice == 0 and out.retry_initial == 60 and out.lifetime == 5 * 86400
    assert config.hold.lifetime == 7 * 86400 and config.hold.delay_notice == 0


@pytest.mark.parametrize(("text", "fragment"), [
    ('[outbound]\nport = 70000\n', "[outbound] port: expected a port number"),
    ('[outbound]\nretry_initial = "2h"\n', "[outbound] retry_max: must not be shorter"),
    ('[outbound.transport]\n"localhost" = "127.0.0.1:25"\n', "[outbound] transport: not a domain"),
    ('[outbound.transport]\n"a.example" = "nowhere"\n', "[outbound] transport:"),
    ('[outbound]\nrequire_tls_domains = "a.example"\n', "expected a list of domain names"),
    ('[outbound]\nsmarthost_username = "u"\n', "smarthost_username and smarthost_password_file"),
    ('[listen]\nsubmissions = "127.0.0.1:465"\n', "[listen] submissions: an implicit-TLS"),
    ('[submission]\nrate_limit = -1\n', "[submission] rate_limit:"),
    ('[outbound]\nsmarthost = "127.0.0.1:0"\n', "[outbound] smarthost: port 0 is not"),
    ('[outbound.transport]\n"a.example" = "127.0.0.1:0"\n', "[outbound] transport: port 0"),
])
def test_outbound_errors(tmp_path: Path, text: str, fragment: str) -> None:
    assert fragment in load_error(tmp_path, BASE + text)


def test_smarthost_auth_needs_tls(tmp_path: Path) -> None:
    (tmp_path / "relay.pw").write_text("secret\n")
    message = load_error(tmp_path, BASE + '[outbound]\nsmarthost = "relay.example:587"\n'
                         'smarthost_username = "u"\nsmarthost_password_file = "relay.pw"\n'
                         'smarthost_tls = "none"\n')
    assert "[outbound] smarthost_tls: AUTH at the smarthost needs TLS" in message
