"""The customer config's tables: the file's top level, ``[provider]``, ``[outbox]``, ``[metrics]``.

Contract:
- `CustomerConfig` (the whole file), `ProviderEndpoint` (``[provider]``)
  and `OutboxConfig` (``[outbox]``) are frozen dataclasses whose fields
  declare the keys, each once with its check and default
  (`fermoposta.config_schema.key`; the checks are in
  `fermoposta.customer.config_checks`); `MetricsKeys` declares
  ``[metrics]``, which loads into `CustomerConfig.metrics_listen`.  The
  ``[[pull]]`` blocks are declared in `fermoposta.customer.config_pull`.
  docs/customer-config.md is tested against these declarations.
- An instance holds checked values only: the loader
  (`fermoposta.customer.config_load`) builds them.  The password is never
  held: `ProviderEndpoint.read_password()` reads the file when asked
  (`ConfigError` if unreadable or empty), so no repr shows it.
- `default_data_dir(path)` is the ``data_dir`` of a file that sets none.
- No I/O apart from `ProviderEndpoint.read_password()`.  The docstrings
  below describe every key.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from fermoposta.config_common import (
    ConfigError,
    LogConfig,
    check_boolean,
    check_hostname,
    duration,
    integer,
    one_of,
    optional_text,
    size,
)
from fermoposta.config_schema import key, spec
from fermoposta.config_schema import table as declare_table
from fermoposta.customer.config_checks import (
    DEFAULT_OUTBOX_NETWORKS,
    DURATION_1S,
    MAX_SITE_DOMAINS,
    OUTBOX_PUSH_MODES,
    SUBMISSION_PORT,
    TLS_MODES,
    Network,
    check_client_mechanisms,
    check_host,
    check_networks,
    check_nonempty_string,
    check_optional_host,
    check_optional_hostport,
    check_optional_listen,
    check_pin,
    check_submission_address,
    check_username,
    domain_list,
)
from fermoposta.customer.config_pull import PullConfig, PullKeys
from fermoposta.passwords import read_password_file

__all__ = [
    "CustomerConfig",
    "MetricsKeys",
    "OutboxConfig",
    "ProviderEndpoint",
    "default_data_dir",
]


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

    host: str = field(metadata=spec(check_host))
    port: int = key(integer(1, 65535), 366)
    tls: str = key(one_of(*TLS_MODES), "starttls")
    ca_file: Path | None = key(optional_text, None)
    server_name: str = key(check_optional_host, "")
    pin_sha256: str | None = key(check_pin, None)
    client_cert: Path | None = key(optional_text, None)
    client_key: Path | None = key(optional_text, None)
    username: str | None = key(check_username, None)
    password_file: Path | None = key(optional_text, None)
    mechanisms: tuple[str, ...] = key(check_client_mechanisms, ())
    connect_timeout: float = key(duration(positive=True), written="30s")
    command_timeout: float = key(duration(positive=True), written="5m")
    atrn_timeout: float = key(DURATION_1S, written="10m")
    submission: tuple[str, int] | None = key(check_submission_address, None)
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

    listen: tuple[str, int] | None = key(check_optional_listen, None)
    networks: tuple[Network, ...] = key(check_networks, written=list(DEFAULT_OUTBOX_NETWORKS))
    users_file: Path | None = key(optional_text, None)
    allow_plaintext_auth: bool = key(check_boolean, False)
    restrict_senders: bool = key(check_boolean, True)
    push: str = key(one_of(*OUTBOX_PUSH_MODES), "session")
    retry: float = key(DURATION_1S, written="1m")
    #: Default: 1h, or ``retry`` when longer.
    retry_max: float = key(DURATION_1S, written="1h", computed=True)
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


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsKeys:
    """``[metrics]`` of the customer's file (`CustomerConfig.metrics_listen`)."""

    listen: tuple[str, int] | None = key(check_optional_hostport, None)


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
    data_dir: Path = field(metadata=spec(check_nonempty_string, computed=True))
    #: Default: the union of every block's ``domains``.
    domains: tuple[str, ...] = field(
        metadata=spec(domain_list(MAX_SITE_DOMAINS), computed=True))
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
    local_retry_lifetime: float = key(DURATION_1S, written="5d")

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
