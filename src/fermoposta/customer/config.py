"""The customer configuration: one typed schema, loaded from TOML, validated at load.

Contract:
- `load_customer_config(path)` reads a TOML file into frozen, typed
  dataclasses (`CustomerConfig`, `ProviderEndpoint`, `PullConfig` with its
  `Schedule` and `DeliveryConfig`, and the provider's `LogConfig`).  Every
  value is checked here, once: the dial-out, the reversed session and the
  delivery backends never see a malformed setting.
- Each key is declared once, as a dataclass field with its check and default
  (`fermoposta.config_schema.key`): on the config's own dataclasses, and on
  `PullKeys`, `WindowKeys`, `DeliveryKeys`, `MetricsKeys` for tables that
  load into several fields.  The provider's loader (`config_common.Loader`)
  walks them; docs/customer-config.md is tested against them.
- Problems raise one `ConfigError` (the provider config's exception) holding
  every problem found (`ConfigError.problems`): every key of every table and
  block first, then the checks across blocks.  Each names the file and the
  key, e.g. ``customer.toml: [provider] tls:
  expected one of "starttls", "implicit", "none", got "yes"`` or
  ``customer.toml: [[pull]] #2 [pull.delivery] path: not a key of delivery
  type "lmtp" (it belongs to "maildir")``.  Unknown keys and tables are
  errors, with a "did you mean" hint.
- Relative paths (`data_dir`, `ca_file`, `client_cert`, `client_key`,
  `password_file`, a maildir `path` template, an LMTP socket) resolve
  against the directory holding the config file, never against the working
  directory.
- Nothing security-relevant is guessed or falls back: ``tls`` is
  ``"starttls"`` unless ``"implicit"`` or ``"none"`` is written (with
  ``"none"`` the TLS keys are ignored); a client certificate needs its key;
  files named must exist and be readable, and the CA bundle and the client
  certificate with its key must load (checked at load; the password file is
  read later).
- The password is never read into the config: `ProviderEndpoint` holds the
  path of the password file, and `ProviderEndpoint.read_password()` reads
  its first line when the dial-out needs it (`ConfigError` if unreadable or
  empty).  No repr of the config can therefore show the password.
- Domains (site and per pull) are normalised like the ATRN argument
  (`fermoposta.smtp.atrn.parse_atrn_domains`: lowercase A-labels, at least
  two labels).  No domain is listed in two pull blocks, and at most one
  block sends a bare ATRN: two blocks never ask for the same domain by name.
  (A bare ATRN next to other blocks collects the account's mail they have
  not collected yet; the provider's domain leases keep the sessions apart.)
- ``[outbox]`` (`OutboxConfig`, always present; `OutboxConfig.enabled` is
  false without ``listen``) and the ``[provider] submission`` /
  ``submission_tls`` keys describe the customer's outbox: the site's SMTP
  listener for outgoing mail and where it is pushed.  A network list that
  admits every address needs a ``users_file``; ``allow_plaintext_auth``
  needs a ``users_file``; ``retry_max`` is at least ``retry``.
- This module does no I/O apart from reading the config file and checking
  that named files exist.  It creates nothing.  (The outbox ``users_file``
  is read when the listener starts.)

The docstrings of the dataclasses below describe every key;
docs/customer-config.md is the operators' reference, tested against the
declarations.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fermoposta.config_common import (
    ConfigError,
    Loader,
    LogConfig,
    Parser,
    check_boolean,
    check_hostname,
    check_string,
    duration,
    integer,
    one_of,
    optional_text,
    parse_hostport,
    show_value,
    size,
)
from fermoposta.config_schema import (
    Declared,
    declared_keys,
    declared_tables,
    defaults,
    key,
    spec,
)
from fermoposta.config_schema import table as declare_table
from fermoposta.customer.schedule import (
    JitterSpec,
    Schedule,
    Window,
    parse_days,
    parse_hours,
    parse_jitter,
)
from fermoposta.passwords import read_password_file
from fermoposta.smtp.atrn import MAX_ATRN_DOMAINS, parse_atrn_domains
from fermoposta.smtp.command import normalize_domain
from fermoposta.smtp.reply import SMTPError

__all__ = [
    "CLIENT_MECHANISMS",
    "DEFAULT_CUSTOMER_CONFIG_PATH",
    "DELIVERY_TYPES",
    "OUTBOX_PUSH_MODES",
    "TLS_MODES",
    "ConfigError",
    "CustomerConfig",
    "DeliveryConfig",
    "LogConfig",
    "OutboxConfig",
    "ProviderEndpoint",
    "PullConfig",
    "default_customer_config_path",
    "default_data_dir",
    "load_customer_config",
]

DEFAULT_CUSTOMER_CONFIG_PATH = Path("/etc/fermoposta/customer.toml")
CUSTOMER_CONFIG_ENV = "FERMOPOSTA_CUSTOMER_CONFIG"

#: SASL mechanisms the dial-out implements, strongest first (the automatic order).
CLIENT_MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-256", "EXTERNAL", "PLAIN", "CRAM-MD5", "LOGIN")
#: Mechanisms that send a password-derived value: they need ``username``.
PASSWORD_MECHANISMS: frozenset[str] = frozenset({"SCRAM-SHA-256", "PLAIN", "CRAM-MD5", "LOGIN"})
TLS_MODES: tuple[str, ...] = ("starttls", "implicit", "none")
OUTBOX_PUSH_MODES: tuple[str, ...] = ("session", "continuous")
#: The IANA submission port (RFC 6409): the default of ``[provider] submission``.
SUBMISSION_PORT = 587
DEFAULT_OUTBOX_NETWORKS = ("127.0.0.0/8", "::1/128")
DELIVERY_TYPES: tuple[str, ...] = ("maildir", "lmtp", "smtp")

DEFAULT_BACKOFF_MAX = 3600.0
#: Longest path that fits in ``sockaddr_un.sun_path`` (108 bytes on Linux, NUL included).
MAX_UNIX_SOCKET_PATH = 107
MAX_SITE_DOMAINS = 10_000


# ---------------------------------------------------------------------------
# Per-key checkers.  They raise ValueError; the loader adds file and key.
# ---------------------------------------------------------------------------


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _host(value: object) -> str:
    text = check_string(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        return check_hostname(text)
    except ValueError:
        raise ValueError(
            f"expected a host name or an IP address, got {show_value(value)}"
        ) from None


def _optional_host(value: object) -> str:
    return "" if value == "" else _host(value)


def _pin(value: object) -> str | None:
    text = check_string(value).strip()
    if not text:
        return None
    digits = text.replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise ValueError(
            "expected the SHA-256 of the certificate as 64 hex digits (colons allowed), "
            f"got {show_value(value)}"
        )
    return digits


def _username(value: object) -> str | None:
    text = check_string(value)
    if not text:
        return None
    if text != text.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError(
            "expected a user name without control characters or surrounding spaces, "
            f"got {show_value(value)}"
        )
    return text


def _client_mechanisms(value: object) -> tuple[str, ...]:
    wanted = ", ".join(CLIENT_MECHANISMS)
    if not isinstance(value, list):
        raise ValueError(f"expected a list of mechanisms from {wanted}, got {show_value(value)}")
    result: list[str] = []
    for item in value:
        if not isinstance(item, str) or item.upper() not in CLIENT_MECHANISMS:
            raise ValueError(f"unsupported mechanism {show_value(item)} (supported: {wanted})")
        if item.upper() in result:
            raise ValueError(f"mechanism {show_value(item)} is listed twice")
        result.append(item.upper())
    return tuple(result)


def _domain_list(limit: int) -> Parser:
    def parse(value: object) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
            raise ValueError(
                f'expected a list of domain names like ["example.org"], got {show_value(value)}'
            )
        if any("," in d or not d.strip() for d in value):
            raise ValueError(
                f"expected one domain name per string, none empty, got {show_value(value)}"
            )
        try:
            return parse_atrn_domains(",".join(value), max_domains=limit)
        except SMTPError as exc:
            detail = exc.cause or exc.reply.text
            raise ValueError(f"invalid domain list: {detail}") from None

    return parse


def _address(value: object) -> str:
    """``local@domain`` lowercased, the domain as an A-label."""
    expected = "expected an address like user@example.org"
    text = check_string(value).strip()
    local, sep, domain = text.rpartition("@")
    if not sep or not local or not domain or any(c.isspace() or ord(c) < 0x20 for c in text):
        raise ValueError(f"{expected}, got {show_value(value)}")
    if len(local.encode()) > 64:
        raise ValueError(f"{expected} (local part at most 64 octets), got {show_value(value)}")
    try:
        name = normalize_domain(domain)
    except ValueError:
        raise ValueError(f"{expected}, got {show_value(value)}") from None
    if name.startswith("[") or "." not in name:
        raise ValueError(f"{expected}, got {show_value(value)}")
    return f"{local.lower()}@{name}"


_PULL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _pull_name(value: object) -> str:
    text = check_string(value)
    if not _PULL_NAME_RE.fullmatch(text):
        raise ValueError(
            "expected a name of letters, digits, '.', '_', '-' (at most 64, starting with a "
            f"letter or digit), got {show_value(value)}"
        )
    return text


_PLACEHOLDERS = ("domain", "local", "address")


def _maildir_template(value: object) -> str:
    text = check_string(value)
    if not text:
        raise ValueError("must not be empty")
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"bad template {show_value(value)}: {exc}") from None
    names: set[str] = set()
    for _literal, name, format_spec, conversion in fields:
        if name is None:
            continue
        if name not in _PLACEHOLDERS or format_spec or conversion:
            raise ValueError(
                "placeholders are {domain}, {local} and {address}, "
                f"got {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + format_spec if format_spec else ''}}} in {show_value(value)}"
            )
        names.add(name)
    if not names & {"local", "address"}:
        raise ValueError(
            "the template must contain {local} or {address} so that every user has a "
            f"Maildir, got {show_value(value)}"
        )
    return text


def _submission_address(value: object) -> tuple[str, int] | None:
    if check_string(value).strip() == "":
        return None
    host, port = parse_hostport(value)
    if port == 0:
        raise ValueError(f"expected a port 1-65535, got {show_value(value)}")
    return _host(host), port


def _optional_listen(value: object) -> tuple[str, int] | None:
    if check_string(value).strip() == "":
        return None
    host, port = parse_hostport(value)
    return _host(host), port


def _networks(value: object) -> tuple[Network, ...]:
    expected = 'expected a list of networks like ["127.0.0.0/8", "192.168.1.0/24", "::1/128"]'
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise ValueError(f"{expected}, got {show_value(value)}")
    if not value:
        raise ValueError("must not be empty (no client could connect)")
    result: list[Network] = []
    for item in value:
        try:
            result.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{expected}, got {show_value(item)}") from None
    return tuple(result)


def _nonempty_string(value: object) -> str:
    text = check_string(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def _optional_address(value: object) -> str | None:
    return None if value == "" else _address(value)


def _optional_hostport(value: object) -> tuple[str, int] | None:
    return None if value == "" else parse_hostport(value)


def _alias_table(value: object) -> dict[str, str]:
    """The shape of ``aliases``; its entries are checked against the block's domains."""
    if not isinstance(value, dict):
        raise ValueError(f'expected a table of "address" = "address", got {show_value(value)}')
    return value


_DURATION_1S = duration(positive=True, minimum=1.0)


# ---------------------------------------------------------------------------
# The schema.  Docstrings are the documentation.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderEndpoint:
    """``[provider]``: where to dial, how to secure the line, how to authenticate.

    - ``host`` (str, required): the provider's ODMR server, a host name or an
      IP address (``"::1"`` or ``"[::1]"``).
    - ``port`` (int 1-65535, default 366, the IANA ODMR port).
    - ``tls`` (default ``"starttls"``): ``"starttls"``: STARTTLS is required,
      the session is aborted if the provider does not offer it;
      ``"implicit"``: TLS from the first byte; ``"none"``: no TLS at all (only
      when written; never a fallback; the TLS keys below are then ignored).
      PLAIN and LOGIN are never used without TLS.
    - ``ca_file`` (path, default ``""`` = the system trust store): PEM bundle
      of the CAs that may sign the provider's certificate (or the provider's
      self-signed certificate itself).  Loaded once at load to check it.
    - ``server_name`` (str, default: ``host``): the name verified in the
      provider's certificate (and sent as SNI).
    - ``pin_sha256`` (hex, default ``""`` = no pin): SHA-256 of the provider's
      DER certificate, 64 hex digits, colons allowed; stored as lowercase hex.
      When set, the certificate must also match it (in addition to the
      normal verification).
    - ``client_cert``, ``client_key`` (paths, default ``""``): a PEM client
      certificate and its key (may be one file), for AUTH EXTERNAL.  Both or
      neither; they must go together (checked at load).
    - ``username`` (str): the account name; required unless ``client_cert``
      is set.
    - ``password_file`` (path): a file whose first line is the password;
      required when ``username`` is set, refused otherwise.  Checked to exist
      at load; read by `read_password()` at each session.
    - ``mechanisms`` (list, default ``[]`` = automatic: the strongest both
      sides offer, SCRAM-SHA-256 > EXTERNAL (with a certificate) > PLAIN (TLS
      only) > CRAM-MD5 > LOGIN (TLS only)): SASL mechanisms in preference
      order, from those five (case-insensitive, no duplicates).  EXTERNAL
      needs ``client_cert``; the others need ``username``.
    - ``connect_timeout`` (duration > 0, default ``"30s"``): the TCP connection
      and each TLS handshake (implicit or after STARTTLS).
    - ``command_timeout`` (duration > 0, default ``"5m"``): each reply before ATRN
      (greeting, EHLO, STARTTLS, AUTH).
    - ``atrn_timeout`` (duration >= 1s, default ``"10m"``): the reply to ATRN,
      which the provider may take a while to produce (RFC 2645: at least 10
      minutes; shorter only for tests).
    - ``submission`` (``"host:port"``, default ``""`` = ``host`` and 587):
      the provider's submission service (RFC 6409), where the outbox is
      pushed; stored as ``(host, port)`` or None, read through
      `submission_host`, `submission_port` and `submission_address`.  The
      same certificate checks (``ca_file``, ``pin_sha256``) and the same
      credentials apply as for the ODMR dial-out; the name verified is
      ``server_name`` when it is set to something other than ``host``, else
      the submission host (`submission_server_name`).
    - ``submission_tls`` (default ``"starttls"``): as ``tls``, for the
      submission connection (``"implicit"`` for a port-465 service, RFC
      8314; ``"none"`` only when written).

    Empty strings in the file become ``None`` here; ``server_name`` is always
    set (``host`` when not given).
    """

    host: str = field(metadata=spec(_host))
    port: int = key(integer(1, 65535), 366)
    tls: str = key(one_of(*TLS_MODES), "starttls")
    ca_file: Path | None = key(optional_text, None)
    server_name: str = key(_optional_host, "")
    pin_sha256: str | None = key(_pin, None)
    client_cert: Path | None = key(optional_text, None)
    client_key: Path | None = key(optional_text, None)
    username: str | None = key(_username, None)
    password_file: Path | None = key(optional_text, None)
    mechanisms: tuple[str, ...] = key(_client_mechanisms, ())
    connect_timeout: float = key(duration(positive=True), written="30s")
    command_timeout: float = key(duration(positive=True), written="5m")
    atrn_timeout: float = key(_DURATION_1S, written="10m")
    submission: tuple[str, int] | None = key(_submission_address, None)
    submission_tls: str = key(one_of(*TLS_MODES), "starttls")
    config_path: Path | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.server_name:
            object.__setattr__(self, "server_name", self.host)

    @property
    def submission_host(self) -> str:
        return self.submission[0] if self.submission is not None else self.host

    @property
    def submission_port(self) -> int:
        return self.submission[1] if self.submission is not None else SUBMISSION_PORT

    @property
    def submission_server_name(self) -> str:
        """The name verified in the submission service's certificate."""
        if self.server_name != self.host:
            return self.server_name
        return self.submission_host

    @property
    def submission_address(self) -> str:
        """``host:port`` of the submission service, for messages (``[v6]:port``)."""
        host, port = self.submission_host, self.submission_port
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def read_password(self) -> str:
        """The first line of ``password_file`` without its line ending.

        Raises `ConfigError` (naming the config file and the key) when no
        password file is configured, or it cannot be read, is not UTF-8 or its
        first line is empty.  The password is never part of the message.
        """
        where = f"{self.config_path}: " if self.config_path else ""
        prefix = f"{where}[provider] password_file"
        if self.password_file is None:
            raise ConfigError(f"{prefix}: no password file is configured")
        try:
            return read_password_file(self.password_file)
        except ValueError as exc:  # the message names the file, never the password
            raise ConfigError(f"{prefix}: {exc}") from None


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """``[pull.delivery]``: where the mail of one pull block goes.  ``type`` is required.

    ``type = "maildir"``: the customer writes Maildirs itself.

    - ``path`` (str, required): the Maildir of each recipient, a template
      with ``{domain}`` (lowercase A-label), ``{local}`` (local part),
      ``{address}`` (``local@domain``); it must contain ``{local}`` or
      ``{address}``.  Relative to the config file's directory; stored
      absolute with the placeholders kept.
    - ``create`` (bool, default false): false: a recipient whose Maildir does
      not exist is unknown (550 5.1.1, the provider bounces); true: it is
      created.
    - ``aliases`` (table, default ``{}``): ``"address" = "address"``, applied
      once before the lookup; both sides lowercased, domains as A-labels;
      both must be in the domains this block accepts.
    - ``catch_all`` (address, default ``""``): receives mail for unknown local
      parts of the accepted domains; it must be in one of them.

    ``type = "lmtp"``: hand each message to an LMTP server (Dovecot ...).

    - ``address`` (str, required): a unix socket path (``"/run/dovecot/lmtp"``,
      or relative to the config file: any value with a ``/`` or without a
      ``:``) or ``"host:port"`` / ``"[ipv6]:port"``.

    ``type = "smtp"``: relay each transaction to a local MTA.

    - ``address`` (str, required): ``"host:port"`` or ``"[ipv6]:port"``.

    A key of another type (``path`` with ``lmtp``, ``address`` with
    ``maildir``, ...) is an error.  Exactly one of ``path`` (maildir),
    ``socket_path`` (lmtp over a unix socket) and ``hostport`` (lmtp over TCP,
    smtp) is set.
    """

    type: str
    path: str | None = None
    create: bool = False
    aliases: Mapping[str, str] = field(default_factory=dict)
    catch_all: str | None = None
    socket_path: Path | None = None
    hostport: tuple[str, int] | None = None

    @property
    def target(self) -> str:
        """A short description for logs: ``maildir:/var/mail/...``, ``lmtp:host:24`` ..."""
        if self.path is not None:
            return f"{self.type}:{self.path}"
        if self.socket_path is not None:
            return f"{self.type}:{self.socket_path}"
        assert self.hostport is not None
        host, port = self.hostport
        return f"{self.type}:[{host}]:{port}" if ":" in host else f"{self.type}:{host}:{port}"


@dataclass(frozen=True, slots=True)
class PullConfig:
    """``[[pull]]``: one domain set collected on its own schedule into its own target.

    - ``name`` (str, default ``"pull-1"``, ``"pull-2"``, ... by position):
      unique; letters, digits, ``.``, ``_``, ``-`` (it names lock files and
      log lines).
    - ``domains`` (list, default ``[]``): the domains requested with
      ``ATRN d1,d2`` (at most 50); ``[]`` sends a bare ``ATRN`` (every
      domain of the account) and then the top-level ``domains`` are required.
    - ``every`` (duration >= 1s, default ``"10m"``): the base interval.
    - ``jitter`` (default ``"10%"``): ``"N%"`` of each delay (0-100) or a
      duration; each wait is moved by a random amount within ± that.
    - ``backoff_max`` (duration, default ``"1h"``, raised to the longest
      ``every`` of the block when that is longer): after consecutive
      failures the wait doubles each time, up to this.  When written it must
      be at least ``every`` and every window's ``every``.
    - ``[[pull.window]]`` (any number): ``days`` (default ``"daily"``: e.g.
      ``"mon-fri"``, ``"sat,sun"``, ``"mon,wed,fri"``), ``hours`` (default
      ``"00-24"``: ``"start-end"``, whole hours, end exclusive), ``every``
      (duration >= 1s, required): the interval inside the window.  The first
      window listed that contains the time wins.
    - ``[pull.delivery]`` (required): see `DeliveryConfig`.
    """

    name: str
    domains: tuple[str, ...]
    schedule: Schedule
    delivery: DeliveryConfig

    @property
    def bare(self) -> bool:
        """True when this block sends a bare ``ATRN`` (no domain list)."""
        return not self.domains

    def accept_domains(self, config: CustomerConfig) -> tuple[str, ...]:
        """The RCPT domains its reversed session accepts: its own, or the site's for bare ATRN."""
        return self.domains or config.domains


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    """``[outbox]``: the site's outgoing mail, collected here and pushed to the provider.

    - ``listen`` (``"host:port"``, default ``""`` = no outbox listener): where
      the site's mail clients and local MTA hand over outgoing mail (SMTP
      without TLS: a LAN service; e.g. ``"127.0.0.1:10025"``).  Stored as
      ``(host, port)``, or None.
    - ``networks`` (list of networks, default ``["127.0.0.0/8", "::1/128"]``):
      the client addresses that may connect; any other client gets ``554
      5.7.1`` as its greeting and is disconnected.  Not empty.  A network that
      admits every address (``0.0.0.0/0``, ``::/0``) needs ``users_file``.
    - ``users_file`` (path, default ``""`` = no AUTH): lines ``user:password``
      (``#`` comments and blank lines ignored).  When set, every client must
      authenticate (``530 5.7.0`` at MAIL otherwise), with SCRAM-SHA-256 or
      CRAM-MD5, which never put the password on the wire; read when the
      listener starts.
    - ``allow_plaintext_auth`` (bool, default false): also offer PLAIN and
      LOGIN, which send the password in clear over this TLS-less listener:
      only on a trusted LAN.  Needs ``users_file``.
    - ``restrict_senders`` (bool, default true): the envelope sender must be
      an address in one of the site's ``domains`` (``553 5.7.1`` otherwise,
      the null sender too), as the provider's submission service demands
      anyway for the account's domains.
    - ``push`` (default ``"session"``): ``"session"``: the outbox is pushed to
      the provider's submission service before every ATRN (each pull);
      ``"continuous"``: the daemon also pushes as soon as mail arrives, and
      retries deferred mail and an unreachable provider with backoff.
    - ``retry`` (duration >= 1s, default ``"1m"``) and ``retry_max``
      (duration >= 1s, default ``"1h"`` or ``retry`` if longer, at least
      ``retry``): in continuous mode, the wait after a push that failed or
      left mail deferred, doubling after each further failure up to
      ``retry_max``.
    - ``max_message_size`` (size >= 1, default: the top-level
      ``max_message_size``): advertised as SIZE and enforced while receiving.
    """

    listen: tuple[str, int] | None = key(_optional_listen, None)
    networks: tuple[Network, ...] = key(_networks, written=list(DEFAULT_OUTBOX_NETWORKS))
    users_file: Path | None = key(optional_text, None)
    allow_plaintext_auth: bool = key(check_boolean, False)
    restrict_senders: bool = key(check_boolean, True)
    push: str = key(one_of(*OUTBOX_PUSH_MODES), "session")
    retry: float = key(_DURATION_1S, written="1m")
    #: Default: 1h, or ``retry`` when longer.
    retry_max: float = key(_DURATION_1S, written="1h", computed=True)
    #: Default: the top-level ``max_message_size``.
    max_message_size: int = key(size(1), written="50M", computed=True)

    @property
    def enabled(self) -> bool:
        """True when the outbox listener is configured (``listen`` not empty)."""
        return self.listen is not None

    @property
    def continuous(self) -> bool:
        return self.push == "continuous"

    def allows(self, peer_ip: str) -> bool:
        """Whether a client at `peer_ip` may connect (IPv4-mapped IPv6 counts as IPv4)."""
        try:
            address = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


# The keys of the tables that load into more than one field (a ``[[pull]]``
# block into `PullConfig` and its `Schedule`, a window into `Window`, ...):
# declared here once, each with its check and default.


@dataclass(frozen=True, slots=True, kw_only=True)
class PullKeys:
    """The keys of one ``[[pull]]`` block (see `PullConfig`); the block's
    ``[[pull.window]]`` (`WindowKeys`) and ``[pull.delivery]`` (`DeliveryKeys`)
    are tables of their own."""

    #: Default: ``"pull-<n>"`` by position.
    name: str = field(metadata=spec(_pull_name, computed=True))
    domains: tuple[str, ...] = key(_domain_list(MAX_ATRN_DOMAINS), ())
    every: float = key(_DURATION_1S, written="10m")
    jitter: JitterSpec = key(parse_jitter, written="10%")
    #: Default: 1h, or the block's longest ``every`` when that is longer.
    backoff_max: float = key(_DURATION_1S, written="1h", computed=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowKeys:
    """The keys of one ``[[pull.window]]`` (loaded into a `Window`)."""

    days: frozenset[int] = key(parse_days, written="daily")
    hours: tuple[int, int] = key(parse_hours, written="00-24")
    every: float = field(metadata=spec(_DURATION_1S))


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryKeys:
    """The keys of ``[pull.delivery]`` (loaded into a `DeliveryConfig`); the
    tags name the delivery types a key belongs to.  ``path`` (maildir) and
    ``address`` (lmtp, smtp) are required for their types."""

    type: str = field(metadata=spec(one_of(*DELIVERY_TYPES)))
    path: str | None = key(_maildir_template, None, tags=("maildir", "required"))
    create: bool = key(check_boolean, False, tags=("maildir",))
    aliases: Mapping[str, str] = key(_alias_table, factory=dict, tags=("maildir",))
    catch_all: str | None = key(_optional_address, None, tags=("maildir",))
    address: str | None = key(_nonempty_string, None, tags=("lmtp", "smtp", "required"))

    @staticmethod
    def of_type(kind: str) -> dict[str, Declared]:
        """The keys a delivery of type `kind` takes, ``type`` excluded."""
        return {name: d for name, d in declared_keys(DeliveryKeys).items()
                if kind in d.key.tags}


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsKeys:
    """``[metrics]`` of the customer's file (`CustomerConfig.metrics_listen`)."""

    listen: tuple[str, int] | None = key(_optional_hostport, None)


@dataclass(frozen=True, slots=True)
class CustomerConfig:
    """The whole customer config file (top level).

    - ``path``: the file this was loaded from (absolute).
    - ``hostname`` (str, required): our EHLO name towards the provider and our
      greeting and Received: name in the reversed session.
    - ``data_dir`` (path, default `default_data_dir(path)`:
      ``/var/lib/fermoposta-customer`` for /etc/.../customer.toml, else
      ``<name>-data`` next to the file): lock files and state; relative to
      the config file's directory.  Not created here.
    - ``domains`` (list): the site's domains; in the reversed session RCPTs
      for other domains get 550 5.7.1.  Default: the union of every block's
      ``domains``.  Required (non-empty) when a block sends a bare ATRN; when
      written, every block's domains must be among them.
    - ``max_message_size`` (size >= 1, default ``"50M"``): advertised as SIZE
      in the reversed session and enforced while receiving.
    - ``local_retry_lifetime`` (duration >= 1s, default ``"5d"``): how long
      a recipient the site took from the provider is retried from the local
      retry spool (`fermoposta.customer.local_retry`) before it fails with a
      notice to the sender.
    - ``[provider]`` (required): see `ProviderEndpoint`.
    - ``[log]``: see `fermoposta.config.LogConfig` (same as the provider's).
    - ``[[pull]]`` (at least one): see `PullConfig`.
    - ``[outbox]``: see `OutboxConfig`.
    - ``[metrics] listen`` (``"host:port"``, default ``""``, off): the
      Prometheus endpoint of `fermoposta customer run`.
    """

    path: Path
    hostname: str = field(metadata=spec(check_hostname))
    #: Default: `default_data_dir`.
    data_dir: Path = field(metadata=spec(_nonempty_string, computed=True))
    #: Default: the union of every block's ``domains``.
    domains: tuple[str, ...] = field(
        metadata=spec(_domain_list(MAX_SITE_DOMAINS), computed=True))
    provider: ProviderEndpoint = field(metadata={"table": ProviderEndpoint})
    pulls: tuple[PullConfig, ...] = field(metadata={"table": PullKeys, "name": "pull"})
    max_message_size: int = key(size(1), written="50M")
    log: LogConfig = declare_table(LogConfig)
    outbox: OutboxConfig = declare_table(OutboxConfig)
    # ``[metrics] listen`` ("host:port", default "", off): the daemon's
    # Prometheus endpoint (/metrics): pulls by result, messages, last success.
    metrics_listen: tuple[str, int] | None = field(default=None,
                                                   metadata={"table": MetricsKeys,
                                                             "name": "metrics"})
    local_retry_lifetime: float = key(_DURATION_1S, written="5d")

    def pull_for_domain(self, domain: str) -> PullConfig | None:
        """The block whose reversed session accepts `domain`: the block that
        names it, else the bare-ATRN block if `domain` is a site domain."""
        for pull in self.pulls:
            if domain in pull.domains:
                return pull
        for pull in self.pulls:
            if pull.bare and domain in self.domains:
                return pull
        return None

    def pull_named(self, name: str) -> PullConfig:
        """The ``[[pull]]`` block called `name`; KeyError if there is none."""
        for pull in self.pulls:
            if pull.name == name:
                return pull
        raise KeyError(name)


def default_data_dir(config_path: str | Path) -> Path:
    """The ``data_dir`` of a config file that does not set it.

    - A file under /etc (a system install): ``/var/lib/fermoposta-customer``
      for ``customer.toml``, ``/var/lib/fermoposta-customer-<name>`` for
      another ``<name>.toml``.
    - Anywhere else: ``<name>-data`` next to the file (``customer-data`` for
      ``customer.toml``).

    Why: state belongs in /var/lib on a system install (FHS; /etc may be
    read-only under systemd's ProtectSystem), and
    /var/lib/fermoposta-customer is the StateDirectory of the shipped
    systemd units, so the default file at the default path just works.  A
    file elsewhere (a home directory, a test, a demo) keeps its state next
    to it, where its admin looks, and writes nothing outside.  The name
    comes from the file's so that two configs in one directory (two sites
    on one host) never share their locks and spools (`run.lock`, the
    outbox, the local retry spool).
    """
    path = Path(os.path.abspath(config_path))
    name = path.stem
    if path.is_relative_to("/etc"):
        suffix = "" if name == "customer" else f"-{name}"
        return Path(f"/var/lib/fermoposta-customer{suffix}")
    return path.parent / f"{name}-data"


def default_customer_config_path() -> Path:
    """``$FERMOPOSTA_CUSTOMER_CONFIG`` if set and not empty, else /etc/fermoposta/customer.toml."""
    env = os.environ.get(CUSTOMER_CONFIG_ENV, "")
    return Path(env) if env else DEFAULT_CUSTOMER_CONFIG_PATH


# ---------------------------------------------------------------------------
# The loader.
# ---------------------------------------------------------------------------


def load_customer_config(path: str | Path) -> CustomerConfig:
    """Load and validate a customer config file.  Raises `ConfigError`, with
    every problem found (`ConfigError.problems`).

    First every table and every key is checked, all problems collected; then
    the checks across the blocks (names, domains, each block's delivery
    against the domains it accepts)."""
    path = Path(path)
    loader = Loader(path)
    raw = loader.read()

    top = loader.table(None, CustomerConfig, raw, extra=list(declared_tables(CustomerConfig)))
    top = top or {}
    data_dir = loader.resolve(top.pop("data_dir")) if "data_dir" in top else default_data_dir(path)
    site_domains: tuple[str, ...] | None = top.pop("domains", None)
    values: dict[str, Any] = {**defaults(CustomerConfig), **top}

    provider: ProviderEndpoint | None = None
    with loader.collecting():
        provider = _load_provider(loader, _table(loader, raw, "provider", required=True))
    with loader.collecting():
        table = _table(loader, raw, "log", required=False)
        values["log"] = LogConfig(**loader.load("log", LogConfig, table))
    drafts: list[_PullDraft] = []
    with loader.collecting():
        drafts = _load_pulls(loader, raw)
    with loader.collecting():
        table = _table(loader, raw, "outbox", required=False)
        values["outbox"] = _load_outbox(loader, table, values["max_message_size"])
    with loader.collecting():
        table = _table(loader, raw, "metrics", required=False)
        values["metrics_listen"] = loader.load("metrics", MetricsKeys, table).get("listen")
    loader.finish()
    assert provider is not None

    # The domains each block accepts are only known once the site's are.
    domains = _site_domains(loader, site_domains, drafts)
    pulls: list[PullConfig] = []
    for draft in drafts:
        with loader.collecting():
            pulls.append(draft.finish(loader, domains))
    loader.finish()
    return CustomerConfig(
        path=Path(os.path.abspath(path)),
        data_dir=data_dir,
        domains=domains,
        provider=provider,
        pulls=tuple(pulls),
        **values,
    )


def _load_outbox(loader: Loader, table: dict[str, Any], max_message_size: int) -> OutboxConfig:
    section = "outbox"
    mark = len(loader.problems)
    values = loader.load(section, OutboxConfig, table)
    values.setdefault("max_message_size", max_message_size)
    users_text: str | None = values.pop("users_file", None)
    users_file = loader.existing_file(section, "users_file", users_text) if users_text else None
    default = OutboxConfig()
    if values.get("allow_plaintext_auth") and users_file is None:
        loader.report(
            section, "allow_plaintext_auth", "needs users_file (there is no AUTH without it)"
        )
    networks: tuple[Network, ...] = values.get("networks", default.networks)
    if users_file is None:
        for network in networks:
            if network.prefixlen == 0:
                loader.report(
                    section,
                    "networks",
                    f"{network} admits every address: that would be an open relay "
                    "sending as the site's provider account; set users_file (AUTH) "
                    "or list the site's own networks",
                )
    retry: float = values.get("retry", default.retry)
    if "retry_max" in values and values["retry_max"] < retry:
        loader.report(
            section,
            "retry_max",
            f"must be at least retry ({retry:g}s), got {values['retry_max']:g}s",
        )
    loader.finish_since(mark)
    values.setdefault("retry_max", max(default.retry_max, retry))
    return OutboxConfig(users_file=users_file, **values)


def _kind(value: object, table: str) -> str:
    if isinstance(value, dict):
        return f"a single [{table}] table"
    return show_value(value)


def _table(loader: Loader, raw: Mapping[str, Any], name: str, *, required: bool) -> dict[str, Any]:
    if name not in raw:
        if required:
            raise loader.error(name, None, "required table is missing")
        return {}
    table = raw[name]
    if not isinstance(table, dict):
        raise loader.error(None, name, f"expected a table [{name}], got {show_value(table)}")
    return table


def _load_provider(loader: Loader, table: dict[str, Any]) -> ProviderEndpoint:
    section = "provider"
    mark = len(loader.problems)
    values = loader.load(section, ProviderEndpoint, table)
    cert, key = values.get("client_cert"), values.get("client_key")
    if bool(cert) != bool(key):
        missing = "client_key" if cert else "client_cert"
        raise loader.error(
            section,
            missing,
            f"client_cert and client_key must be given together; {missing} is missing",
        )
    for name in ("ca_file", "client_cert", "client_key"):
        text = values.pop(name, None)
        values[name] = loader.existing_file(section, name, text) if text else None
    _check_tls_files(loader, values["ca_file"], values["client_cert"], values["client_key"])

    username: str | None = values.get("username")
    password_text: str | None = values.pop("password_file", None)
    if username is None and values["client_cert"] is None:
        raise loader.error(
            section, "username", "required key is missing (or set client_cert for AUTH EXTERNAL)"
        )
    if username is not None and not password_text:
        raise loader.error(
            section, "password_file", f"required with username {show_value(username)}"
        )
    if username is None and password_text:
        raise loader.error(section, "password_file", "given without a username")
    values["password_file"] = (
        loader.existing_file(section, "password_file", password_text) if password_text else None
    )

    mechanisms: tuple[str, ...] = values.get("mechanisms", ())
    for mechanism in mechanisms:
        if mechanism == "EXTERNAL" and values["client_cert"] is None:
            loader.report(section, "mechanisms", "EXTERNAL needs client_cert and client_key")
        if mechanism in PASSWORD_MECHANISMS and username is None:
            loader.report(section, "mechanisms", f"{mechanism} needs username")
    loader.finish_since(mark)
    return ProviderEndpoint(config_path=Path(os.path.abspath(loader.path)), **values)


def _no_password() -> str:
    raise ValueError("the key is encrypted; fermoposta needs an unencrypted key file")


def _check_tls_files(
    loader: Loader, ca_file: Path | None, cert: Path | None, key: Path | None
) -> None:
    """Load the PEM files once, so a bad one is a config error, not a TLS failure later."""
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise loader.error("provider", "ca_file", f"not a usable CA bundle: {exc}") from None
    if cert is not None and key is not None:
        try:
            # Never let OpenSSL prompt on the terminal for an encrypted key's passphrase.
            ssl.create_default_context().load_cert_chain(str(cert), str(key), password=_no_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise loader.error(
                "provider", "client_key", f"cannot use this certificate and key: {exc}"
            ) from None


@dataclass(frozen=True, slots=True)
class _PullDraft:
    """A ``[[pull]]`` block parsed up to what needs the site's domains (the delivery)."""

    number: int
    section: str
    name: str
    domains: tuple[str, ...]
    schedule: Schedule
    delivery: dict[str, Any]

    def finish(self, loader: Loader, site_domains: tuple[str, ...]) -> PullConfig:
        accept = self.domains or site_domains
        delivery = _finish_delivery(
            loader, f"{self.section} [pull.delivery]", self.delivery, accept
        )
        return PullConfig(
            name=self.name, domains=self.domains, schedule=self.schedule, delivery=delivery
        )


def _load_pulls(loader: Loader, raw: Mapping[str, Any]) -> list[_PullDraft]:
    pull_tables = raw.get("pull")
    if pull_tables is None:
        raise loader.error(None, "[[pull]]", "at least one [[pull]] block is required")
    if not isinstance(pull_tables, list) or not all(isinstance(t, dict) for t in pull_tables):
        raise loader.error(
            None,
            "pull",
            f"expected [[pull]] blocks (an array of tables), got {_kind(pull_tables, 'pull')}",
        )
    if not pull_tables:
        raise loader.error(None, "[[pull]]", "at least one [[pull]] block is required")
    drafts: list[_PullDraft] = []
    for number, table in enumerate(pull_tables, 1):
        with loader.collecting():
            drafts.append(_load_pull(loader, number, table))
    return drafts


def _load_pull(loader: Loader, number: int, table: dict[str, Any]) -> _PullDraft:
    section = f"[[pull]] #{number}"
    mark = len(loader.problems)
    written = loader.table(section, PullKeys, table, extra=["window", "delivery"]) or {}
    values = {**defaults(PullKeys), **written}

    windows: list[Window] = []
    window_tables = table.get("window", [])
    if not isinstance(window_tables, list) or not all(isinstance(t, dict) for t in window_tables):
        loader.report(
            section,
            "window",
            f"expected [[pull.window]] blocks, got {_kind(window_tables, 'pull.window')}",
        )
    else:
        for n, window_table in enumerate(window_tables, 1):
            with loader.collecting():
                windows.append(_load_window(loader, f"{section} [[pull.window]] #{n}",
                                            window_table))

    delivery_table = table.get("delivery")
    delivery: dict[str, Any] | None = None
    if delivery_table is None:
        loader.report(f"{section} [pull.delivery]", None, "required table is missing")
    elif not isinstance(delivery_table, dict):
        loader.report(section, "delivery",
                      f"expected a table [pull.delivery], got {show_value(delivery_table)}")
    else:
        delivery = _delivery_keys(loader, f"{section} [pull.delivery]", delivery_table)
    loader.finish_since(mark)
    assert delivery is not None

    every: float = values["every"]
    longest = max([every, *(w.every for w in windows)])
    if "backoff_max" in written:
        backoff_max: float = written["backoff_max"]
        if backoff_max < every:
            raise loader.error(
                section, "backoff_max", f"must be at least every ({every:g}s), got {backoff_max:g}s"
            )
        if backoff_max < longest:
            raise loader.error(
                section,
                "backoff_max",
                f"must be at least the longest window every ({longest:g}s), got {backoff_max:g}s",
            )
    else:
        backoff_max = max(values["backoff_max"], longest)
    schedule = Schedule(every=every, jitter=values["jitter"], backoff_max=backoff_max,
                        windows=tuple(windows))
    return _PullDraft(
        number=number,
        section=section,
        name=written.get("name", f"pull-{number}"),
        domains=values["domains"],
        schedule=schedule,
        delivery=delivery,
    )


def _load_window(loader: Loader, section: str, table: dict[str, Any]) -> Window:
    values = {**defaults(WindowKeys), **loader.load(section, WindowKeys, table)}
    start, end = values["hours"]
    return Window(days=values["days"], start_hour=start, end_hour=end, every=values["every"])


def _site_domains(
    loader: Loader, written: tuple[str, ...] | None, drafts: list[_PullDraft]
) -> tuple[str, ...]:
    """The site's domains, after checking the blocks against them and each other."""
    names: dict[str, int] = {}
    owner: dict[str, _PullDraft] = {}
    bare: _PullDraft | None = None
    for draft in drafts:
        if draft.name in names:
            raise loader.error(
                draft.section,
                "name",
                f"{show_value(draft.name)} is already the name of [[pull]] #{names[draft.name]}",
            )
        names[draft.name] = draft.number
        if draft.domains:
            for domain in draft.domains:
                if domain in owner:
                    raise loader.error(
                        draft.section,
                        "domains",
                        f"{domain} is already collected by [[pull]] #{owner[domain].number} "
                        f"({show_value(owner[domain].name)}); two blocks would race for its mail",
                    )
                owner[domain] = draft
        elif bare is not None:
            raise loader.error(
                draft.section,
                "domains",
                f"[[pull]] #{bare.number} ({show_value(bare.name)}) already sends a bare ATRN "
                "(every domain of the account); two such blocks would race for the same mail",
            )
        else:
            bare = draft

    if written is None:
        if bare is not None:
            raise loader.error(
                None,
                "domains",
                f"required: [[pull]] #{bare.number} ({show_value(bare.name)}) sends a bare ATRN, "
                "so the site's domains must be listed (RCPTs for other domains are refused)",
            )
        return tuple(owner)
    if not written:
        raise loader.error(None, "domains", "must not be empty")
    for domain, draft in owner.items():
        if domain not in written:
            raise loader.error(
                draft.section,
                "domains",
                f"{domain} is not one of the site's domains (top-level domains)",
            )
    return written


def _delivery_keys(
    loader: Loader, section: str, table: dict[str, Any]
) -> dict[str, Any] | None:
    """The keys of a ``[pull.delivery]`` checked, or None (the problems recorded)."""
    mark = len(loader.problems)
    declared = declared_keys(DeliveryKeys)
    loader.check_keys(section, table, list(declared))
    if "type" not in table:
        loader.report(section, "type", "required key is missing")
        return None
    try:
        kind: str = declared["type"].parse(table["type"])
    except ValueError as exc:
        loader.report(section, "type", str(exc))
        return None
    own = DeliveryKeys.of_type(kind)
    values: dict[str, Any] = {"type": kind}
    for name, value in table.items():
        if name == "type" or name not in declared:
            continue
        if name not in own:
            owners = [t for t in DELIVERY_TYPES if t in declared[name].key.tags]
            loader.report(
                section,
                name,
                f'not a key of delivery type "{kind}" '
                f"(it belongs to {' and '.join(show_value(o) for o in owners)})",
            )
            continue
        try:
            values[name] = own[name].parse(value)
        except ValueError as exc:
            loader.report(section, name, str(exc))
    for name, declared_key in own.items():
        if "required" in declared_key.key.tags and name not in table:
            loader.report(section, name, f'required key is missing for type "{kind}"')
    return values if len(loader.problems) == mark else None


def _finish_delivery(
    loader: Loader, section: str, written: dict[str, Any], accept: tuple[str, ...]
) -> DeliveryConfig:
    values = {**defaults(DeliveryKeys), **written}
    kind: str = values["type"]
    if kind == "maildir":
        aliases = _aliases(loader, section, values["aliases"], accept)
        catch_all: str | None = values["catch_all"]
        if catch_all is not None:
            _check_local(loader, section, "catch_all", catch_all, accept)
        return DeliveryConfig(
            type=kind,
            path=str(loader.resolve(values["path"])),
            create=values["create"],
            aliases=aliases,
            catch_all=catch_all,
        )

    text: str = values["address"]
    if kind == "lmtp" and not text.startswith("[") and ("/" in text or ":" not in text):
        socket_path = loader.resolve(text)
        if len(os.fsencode(socket_path)) > MAX_UNIX_SOCKET_PATH:
            raise loader.error(
                section,
                "address",
                f'the socket path "{socket_path}" is longer than {MAX_UNIX_SOCKET_PATH} bytes, '
                "the limit of a unix socket address",
            )
        return DeliveryConfig(type=kind, socket_path=socket_path)
    host, port = loader.parse(section, "address", parse_hostport, text)
    if port == 0:
        raise loader.error(section, "address", f"expected a port 1-65535, got {show_value(text)}")
    return DeliveryConfig(type=kind, hostport=(host, port))


def _aliases(
    loader: Loader, section: str, value: Mapping[str, object], accept: tuple[str, ...]
) -> Mapping[str, str]:
    result: dict[str, str] = {}
    for raw_key, raw_target in value.items():
        key = f"aliases.{show_value(raw_key)}"
        source: str = loader.parse(section, key, _address, raw_key)
        target: str = loader.parse(section, key, _address, raw_target)
        _check_local(loader, section, key, source, accept)
        _check_local(loader, section, key, target, accept)
        if source in result:
            raise loader.error(section, key, f"{source} is listed twice (after lowercasing)")
        result[source] = target
    return result


def _check_local(
    loader: Loader, section: str, key: str, address: str, accept: tuple[str, ...]
) -> None:
    domain = address.rpartition("@")[2]
    if domain not in accept:
        raise loader.error(
            section,
            key,
            f"{address}: {domain} is not a domain this block accepts ({', '.join(accept)})",
        )
