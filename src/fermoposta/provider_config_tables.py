"""The provider config's tables: `ProviderConfig` (the top level) and one dataclass per table.

Contract:
- `ProviderConfig` and the table dataclasses (`ListenConfig`,
  `TLSConfig`, `LimitsConfig`, `ConnectionsConfig` with its
  `ListenerLimits`, `AuthThrottleConfig`, `ODMRConfig`, `MXConfig`,
  `SubmissionConfig`, `OutboundConfig`, `HoldConfig`, `StoreConfig`,
  `MetricsConfig`, `WebConfig`; ``[log]`` is the shared
  `config_common.LogConfig`) are frozen dataclasses whose fields declare
  the keys, each once with its check and default
  (`fermoposta.config_schema.key`; the checks are in
  `fermoposta.provider_config_checks`).  docs/config.md is tested against
  these declarations (tests/core/test_config_docs.py).
- An instance holds checked values only: the loader
  (`fermoposta.provider_config_load`) builds them, with relative paths
  already resolved against the config file's directory.
- No I/O.  Field comments and the docstrings below describe every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fermoposta.config_common import LogConfig
from fermoposta.config_common import check_boolean as _boolean
from fermoposta.config_common import check_hostname as _hostname
from fermoposta.config_common import check_string as _string
from fermoposta.config_common import duration as _duration
from fermoposta.config_common import integer as _integer
from fermoposta.config_common import one_of as _one_of
from fermoposta.config_common import optional_text as _optional_text
from fermoposta.config_common import show_value as _show
from fermoposta.config_common import size as _size
from fermoposta.config_schema import declared_keys, spec
from fermoposta.config_schema import key as _key
from fermoposta.config_schema import table as _table
from fermoposta.provider_config_checks import POSTGRES_SCHEMES, SUPPORTED_MECHANISMS
from fermoposta.provider_config_checks import check_domain_list as _domain_list
from fermoposta.provider_config_checks import check_line_length as _line_length
from fermoposta.provider_config_checks import check_listen_address as _listen_address
from fermoposta.provider_config_checks import check_mechanisms as _mechanisms
from fermoposta.provider_config_checks import check_no_mail_reply as _no_mail_reply
from fermoposta.provider_config_checks import check_node_name as _node_name
from fermoposta.provider_config_checks import check_nonempty_string as _nonempty_string
from fermoposta.provider_config_checks import check_port as _port
from fermoposta.provider_config_checks import check_resolver_address as _resolver_address
from fermoposta.provider_config_checks import check_store_url as _store_url
from fermoposta.provider_config_checks import check_transport_map as _transport_map
from fermoposta.provider_config_checks import check_unset_or_positive as _unset_or_positive

__all__ = [
    "AuthThrottleConfig",
    "ConnectionsConfig",
    "HoldConfig",
    "LimitsConfig",
    "ListenConfig",
    "ListenerLimits",
    "LogConfig",
    "MXConfig",
    "MetricsConfig",
    "ODMRConfig",
    "OutboundConfig",
    "ProviderConfig",
    "StoreConfig",
    "SubmissionConfig",
    "TLSConfig",
    "WebConfig",
]


def _listener_limits(value: object) -> ListenerLimits:
    """The check of a ``[connections]`` key: a table of `ListenerLimits` keys."""
    keys = declared_keys(ListenerLimits)
    if not isinstance(value, dict):
        raise ValueError(f"expected a table with {' and/or '.join(keys)}, got {_show(value)}")
    for name in value:
        if name not in keys:
            raise ValueError(f"unknown key {_show(name)} (expected {' or '.join(keys)})")
    values: dict[str, int | None] = {}
    for name, n in value.items():
        try:
            values[name] = keys[name].parse(n)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return ListenerLimits(**values)


# ---------------------------------------------------------------------------
# The schema.  Field comments and docstrings are the documentation.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """``[listen]``: the addresses the provider listens on ("host:port", "[v6]:port").

    An empty string turns a listener off (the field is then ``None``).

    - ``mx`` (default ``"0.0.0.0:25"``): the public MX; receives mail for hosted
      domains and holds it for ODMR collection.
    - ``odmr`` (default ``"0.0.0.0:366"``): the ODMR listener (RFC 2645 §4, IANA
      port 366); clients upgrade with STARTTLS.
    - ``odmr_tls`` (default ``""``, off): an implicit-TLS ODMR listener (TLS from
      the first byte).  Needs ``[tls] cert`` and ``key``.
    - ``submission`` (default ``"0.0.0.0:587"``): authenticated submission of
      the customers' outgoing mail (RFC 6409, STARTTLS).
    - ``submissions`` (default ``""``, off): submission over implicit TLS
      (RFC 8314, usually port 465).  Needs ``[tls] cert`` and ``key``.
    - ``busy_poll_us`` (default ``100``, 0 to 1000): microseconds the event
      loop keeps asking for its peers' bytes before it sleeps, while they
      answer that fast (`net.busy_poll`); ``0`` = it sleeps at once.
    """

    mx: tuple[str, int] | None = _key(_listen_address, written="0.0.0.0:25")
    odmr: tuple[str, int] | None = _key(_listen_address, written="0.0.0.0:366")
    odmr_tls: tuple[str, int] | None = _key(_listen_address, None)
    submission: tuple[str, int] | None = _key(_listen_address, written="0.0.0.0:587")
    submissions: tuple[str, int] | None = _key(_listen_address, None)
    busy_poll_us: int = _key(_integer(0, 1000), 100)


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """``[tls]``: the server certificate, used for STARTTLS and ``odmr_tls``.

    - ``cert`` (default ``""``): PEM certificate chain file (leaf first, full chain).
    - ``key`` (default ``""``): PEM private key file.  ``cert`` and ``key`` are
      given both or neither; the files must exist.  Without them no STARTTLS
      is offered, and PLAIN/LOGIN are offered only with
      ``[odmr] allow_plaintext_auth``.
    - ``client_ca`` (default ``""``, off): PEM CA bundle used to verify client
      certificates for SASL EXTERNAL (RFC 4422 App. A).  Optional; needs
      ``cert``/``key``.  Without it EXTERNAL is never advertised.

    Relative paths resolve against the config file's directory.  Empty
    strings become ``None``.
    """

    cert: Path | None = _key(_optional_text, None)
    key: Path | None = _key(_optional_text, None)
    client_ca: Path | None = _key(_optional_text, None)

    @property
    def enabled(self) -> bool:
        """True when a certificate and key are configured (STARTTLS can be offered)."""
        return self.cert is not None and self.key is not None


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``[limits]``: bounds on every session (design guide, principle 9).

    - ``max_message_size`` (size, default ``"50M"``): largest message accepted,
      advertised as EHLO SIZE (RFC 1870).  A size is an integer number of bytes
      or a number with K, M or G (binary multiples: 1K = 1024).
    - ``max_recipients`` (int, default 100): RCPT commands accepted per
      transaction (RFC 5321 §4.5.3.1.8 asks for at least 100); more get 452.
    - ``max_errors`` (int, default 20, like Postfix's smtpd_hard_error_limit):
      error replies in one session before the server answers 421 and closes.
    - ``max_connections`` (int, default 200): concurrent connections **per
      listener** (mx, odmr, odmr_tls, submission, submissions each have their
      own count, so a flood on the public MX never locks customers out of
      ODMR or submission); ``[connections]`` can set it per listener.
    - ``max_connections_per_ip`` (int, default 20): concurrent connections from
      one client address, per listener.
    - ``command_timeout`` (duration, default ``"5m"``): idle time allowed while
      waiting for a command (RFC 5321 §4.5.3.2.7 server timeout: 5 minutes).
      A duration is an integer number of seconds or a number with s, m, h or d.
    - ``data_timeout`` (duration, default ``"3m"``): time allowed for each data
      block during DATA (RFC 5321 §4.5.3.2.5: 3 minutes).
    - ``data_deadline`` (duration, default ``"10m"``; ``0`` = none): time allowed
      for the whole DATA of one message, however the bytes trickle in (the
      per-read ``data_timeout`` alone lets a slow drip hold a connection
      forever); when it passes: ``421 4.4.2``, nothing of that message kept.
    - ``session_deadline`` (duration, default ``"1h"``; ``0`` = none): time
      allowed for a whole connection, from accept to close, on every listener
      (for ODMR: until ATRN hands the connection over; the drain that follows
      has its own timeouts and lease); then ``421 4.4.2`` and close.
    - ``tls_handshake_timeout`` (duration, default ``"1m"``): time allowed for a
      TLS handshake (STARTTLS or implicit TLS).
    - ``max_line_length`` (int, default 1000): longest DATA text line in octets,
      CRLF included (RFC 5321 §4.5.3.1.6: at least 1000).
    - ``shutdown_grace`` (duration, default ``"10s"``): on SIGTERM, how long
      sessions in progress may go on before they are cut (their leases are
      released; what was not acknowledged stays queued).
    """

    max_message_size: int = _key(_size(1), written="50M")
    max_recipients: int = _key(_integer(1), 100)
    max_errors: int = _key(_integer(1), 20)
    max_connections: int = _key(_integer(1), 200)
    max_connections_per_ip: int = _key(_integer(1), 20)
    command_timeout: float = _key(_duration(positive=True), written="5m")
    data_timeout: float = _key(_duration(positive=True), written="3m")
    data_deadline: float = _key(_duration(positive=False), written="10m")
    session_deadline: float = _key(_duration(positive=False), written="1h")
    tls_handshake_timeout: float = _key(_duration(positive=True), written="1m")
    max_line_length: int = _key(_line_length, 1000)
    shutdown_grace: float = _key(_duration(positive=False), written="10s")


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """One listener's connection limits in ``[connections]``; ``None`` = the
    ``[limits]`` value."""

    max_connections: int | None = _key(_unset_or_positive, None)
    max_connections_per_ip: int | None = _key(_unset_or_positive, None)


@dataclass(frozen=True, slots=True)
class ConnectionsConfig:
    """``[connections]``: connection limits per listener (issue 8).

    One key per listener (``mx``, ``odmr``, ``odmr_tls``, ``submission``,
    ``submissions``), each a table with ``max_connections`` and/or
    ``max_connections_per_ip`` (ints >= 1), e.g.
    ``mx = { max_connections = 500, max_connections_per_ip = 10 }``.  What is
    not given (or ``""``) comes from ``[limits]``.  Every listener counts its own
    connections.
    """

    mx: ListenerLimits = _key(_listener_limits, factory=ListenerLimits)
    odmr: ListenerLimits = _key(_listener_limits, factory=ListenerLimits)
    odmr_tls: ListenerLimits = _key(_listener_limits, factory=ListenerLimits)
    submission: ListenerLimits = _key(_listener_limits, factory=ListenerLimits)
    submissions: ListenerLimits = _key(_listener_limits, factory=ListenerLimits)

    def limits_for(self, listener: str, defaults: LimitsConfig) -> tuple[int, int]:
        """(max_connections, max_connections_per_ip) of a listener."""
        own: ListenerLimits = getattr(self, listener, ListenerLimits())
        return (own.max_connections if own.max_connections is not None
                else defaults.max_connections,
                own.max_connections_per_ip if own.max_connections_per_ip is not None
                else defaults.max_connections_per_ip)


@dataclass(frozen=True, slots=True)
class AuthThrottleConfig:
    """``[auth_throttle]``: failed AUTH across connections, ODMR and submission (issue 8).

    - ``failure_delay`` (duration, default ``"1s"``; ``0`` = none): wait this
      long before answering a failed AUTH, doubled for each earlier failure of
      the same client address or account within ``window``.
    - ``max_delay`` (duration, default ``"15s"``): the longest such wait.
    - ``max_failures_per_ip`` (int, default 10; 0 = off): failures from one
      address (IPv6: one /64) within ``window`` before it is locked out for
      ``lockout``: every AUTH from it gets ``421 4.7.0``.
    - ``max_failures_per_account`` (int, default 20; 0 = off): failures for
      one existing account, from any address, within ``window`` before it is
      locked for ``lockout``: AUTH for it from an address with recent
      failures and no earlier success as that account gets ``454 4.7.0``;
      other addresses (the customer's) still log in.
    - ``window`` (duration, default ``"15m"``): a count is forgotten this long
      after its last failure.
    - ``lockout`` (duration, default ``"15m"``).
    """

    failure_delay: float = _key(_duration(positive=False), written="1s")
    max_delay: float = _key(_duration(positive=False), written="15s")
    max_failures_per_ip: int = _key(_integer(0), 10)
    max_failures_per_account: int = _key(_integer(0), 20)
    window: float = _key(_duration(positive=True), written="15m")
    lockout: float = _key(_duration(positive=True), written="15m")


@dataclass(frozen=True, slots=True)
class ODMRConfig:
    """``[odmr]``: the ODMR/ATRN listener (RFC 2645).

    - ``mechanisms`` (list, default ``["SCRAM-SHA-256", "PLAIN", "LOGIN",
      "CRAM-MD5", "EXTERNAL"]``): SASL mechanisms offered, in this order; each
      must be one of those five (case-insensitive, no duplicates, not empty).
      A mechanism is still only advertised when usable: PLAIN/LOGIN need TLS
      (or ``allow_plaintext_auth``), EXTERNAL needs ``[tls] client_ca``.
    - ``allow_plaintext_auth`` (bool, default false): offer PLAIN and LOGIN on a
      connection without TLS.  Leave it off outside tests.
    - ``require_tls`` (bool, default false): refuse AUTH and ATRN with
      ``530 5.7.0 Must issue a STARTTLS command first`` until TLS is up (the
      implicit-TLS listener always is).  Off by default because fetchmail
      cannot do STARTTLS on ODMR; turn it on when every customer can.
    - ``max_auth_failures`` (int, default 3): failed AUTH attempts before 421.
    - ``min_atrn_interval`` (duration, default ``"0s"``): minimum time between
      two ATRN sessions of one account; earlier ones get 450.  0 = no limit.
    - ``lease_ttl`` (duration, default ``"10m"``): lifetime of the domain lease an
      ATRN takes (renewed while it works); a crashed node's lease expires
      after this.
    - ``max_messages_per_session`` (int, default 0): messages sent in one ATRN
      session; the rest wait for the next one.  0 = unlimited.
    - ``greeting_timeout`` (duration, default ``"5m"``): after the turnaround,
      time allowed for the customer's 220 greeting (RFC 5321 §4.5.3.2.1).
    - ``final_reply_timeout`` (duration, default ``"10m"``): time allowed for
      the reply after the end of DATA (RFC 5321 §4.5.3.2.6: 10 minutes).
    - ``no_mail_reply`` (``"453"`` or ``"quit"``, default ``"453"``): what to do
      when ATRN finds no mail: answer ``453 You have no mail`` (RFC 2645 §5.2.1),
      or ``"quit"``: answer 250, turn around and QUIT at once (the MAY of §5.2.1).
    - ``max_waiting`` (int, default 1000): ATRN sessions of accounts with
      ``--atrn-wait`` that may wait for mail at once on this node; beyond it
      a fruitless ATRN gets 453 at once.  Waiting sessions count against this,
      not against ``[connections]``.  0 = no ATRN waits.
    - ``wait_poll_interval`` (duration, default ``"3s"``): while ATRNs wait,
      how often the node looks for held mail for all of them with one query
      (the wake-up for mail another process committed on a SQLite store; a
      safety net beside PostgreSQL's notices).
    """

    mechanisms: tuple[str, ...] = _key(_mechanisms, SUPPORTED_MECHANISMS)
    allow_plaintext_auth: bool = _key(_boolean, False)
    require_tls: bool = _key(_boolean, False)
    max_auth_failures: int = _key(_integer(1), 3)
    min_atrn_interval: float = _key(_duration(positive=False), written="0s")
    lease_ttl: float = _key(_duration(positive=True), written="10m")
    max_messages_per_session: int = _key(_integer(0), 0)
    greeting_timeout: float = _key(_duration(positive=True), written="5m")
    final_reply_timeout: float = _key(_duration(positive=True), written="10m")
    no_mail_reply: str = _key(_no_mail_reply, "453")
    max_waiting: int = _key(_integer(0), 1000)
    wait_poll_interval: float = _key(_duration(positive=True), written="3s")


@dataclass(frozen=True, slots=True)
class MXConfig:
    """``[mx]``: the public MX listener.

    - ``require_valid_recipient`` (bool, default false): the per-domain lists of
      valid recipients live in the store (``fermoposta domain ...``); when
      this is true a hosted domain *must* have a list, and without one every
      RCPT for it is refused (no accept-all backup MX, no backscatter).  When
      false, a domain without a list accepts any local part.
    - ``mx_names`` (list of domains, default ``[]``): the names the hosted
      domains' MX records may use for this provider besides ``hostname``
      (e.g. ``mx1.provider.example`` behind a shared ``hostname``); used by
      ``fermoposta domain check``.
    - ``etrn_interval`` (duration, default ``"1m"``; ``"0"`` = no limit): the
      least time between two ETRNs (RFC 1985) for one domain; a sooner one
      gets ``458 4.7.0``.  Counted in the store, so shared by every node.
    """

    require_valid_recipient: bool = _key(_boolean, False)
    mx_names: tuple[str, ...] = _key(_domain_list, ())
    etrn_interval: float = _key(_duration(positive=False), written="1m")


@dataclass(frozen=True, slots=True)
class SubmissionConfig:
    """``[submission]``: the customers' outgoing mail (RFC 6409).

    - ``restrict_senders`` (bool, default true): the envelope sender must be an
      address in one of the authenticated account's domains (553 5.7.1
      otherwise); the null sender ``<>`` is refused too.
    - ``rate_limit`` (int, default 500): messages one account may submit per
      ``rate_window``; more get ``450 4.7.1``.  0 = no limit.
    - ``rate_window`` (duration, default ``"1h"``).
    """

    restrict_senders: bool = _key(_boolean, True)
    rate_limit: int = _key(_integer(0), 500)
    rate_window: float = _key(_duration(positive=True), written="1h")


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    """``[outbound]``: delivery to the Internet (submissions and DSNs).

    - ``smarthost`` (``"host:port"``, default ``""``): send everything through
      this relay instead of looking up MX records.
    - ``smarthost_username`` / ``smarthost_password_file`` (default ``""``):
      AUTH at the smarthost (PLAIN or LOGIN, only over TLS).
    - ``smarthost_tls`` (``"starttls"`` | ``"implicit"`` | ``"none"``, default
      ``"starttls"``): TLS towards the smarthost; ``"starttls"`` requires it.
    - ``port`` (int, default 25): the destination port for MX delivery (ISPs
      block 25; tests use another).
    - ``resolver`` (``"ip:port"``, default ``""``): the DNS server for MX and
      address lookups; ``""`` = the system's (``/etc/resolv.conf``).
    - ``transport`` (table, default empty): ``"domain" = "host:port"``, a static
      route per recipient domain (like Postfix's ``transport_maps``); wins
      over the smarthost and MX lookups.
    - ``require_tls_domains`` (list, default empty): destinations that must
      offer STARTTLS (else the mail is deferred); others use it when offered.
    - ``concurrency`` (int, default 20): simultaneous outbound connections.
    - ``concurrency_per_destination`` (int, default 5).
    - ``retry_initial`` (duration, default ``"5m"``), ``retry_max`` (``"1h"``):
      the retry delay after each failure doubles from the first to the
      second, with ±20% jitter.
    - ``lifetime`` (duration, default ``"5d"``): after this a deferred message
      is bounced (RFC 5321 §4.5.4.1: 4–5 days).
    - ``delay_notice`` (duration, default ``"4h"``; ``"0"`` = off): a delayed
      DSN (RFC 3464 Action: delayed) after the first failure older than this.
    - ``queue_interval`` (duration, default ``"10s"``): how often the queue
      runner looks for mail that is due.
    """

    smarthost: tuple[str, int] | None = _key(_listen_address, None)
    smarthost_username: str = _key(_string, "")
    smarthost_password_file: Path | None = _key(_optional_text, None)
    smarthost_tls: str = _key(_one_of("starttls", "implicit", "none"), "starttls")
    port: int = _key(_port, 25)
    resolver: tuple[str, int] | None = _key(_resolver_address, None)
    transport: dict[str, tuple[str, int]] = _key(_transport_map, factory=dict)
    require_tls_domains: tuple[str, ...] = _key(_domain_list, ())
    concurrency: int = _key(_integer(1), 20)
    concurrency_per_destination: int = _key(_integer(1), 5)
    retry_initial: float = _key(_duration(positive=True), written="5m")
    retry_max: float = _key(_duration(positive=True), written="1h")
    lifetime: float = _key(_duration(positive=True), written="5d")
    delay_notice: float = _key(_duration(positive=False), written="4h")
    queue_interval: float = _key(_duration(positive=True), written="10s")


@dataclass(frozen=True, slots=True)
class HoldConfig:
    """``[hold]``: mail held for customer domains.

    - ``lifetime`` (duration, default ``"30d"``): held mail nobody collects is
      bounced to its sender after this (an expiry DSN, status 5.4.7).
    - ``delay_notice`` (duration, default ``"0"``, off): tell the sender once
      when held mail has waited this long for an offline customer.
    - ``expiry_interval`` (duration, default ``"10m"``): how often held mail is
      checked for expiry.
    """

    lifetime: float = _key(_duration(positive=True), written="30d")
    delay_notice: float = _key(_duration(positive=False), written="0s")
    expiry_interval: float = _key(_duration(positive=True), written="10m")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``[store]``: where the queue and the accounts live.

    - ``url`` (str, default ``""``): ``""`` is SQLite in
      ``data_dir/fermoposta.sqlite3``; ``"sqlite:///path/to/file"`` (or a path
      relative to the config file after ``sqlite://``) names a SQLite file;
      ``"postgresql://user@host:5432/dbname"`` (a libpq URL) is a PostgreSQL
      database shared by every node.  Put no password in it: use
      ``password_file`` or libpq's own ways (``~/.pgpass``, ``PGPASSFILE``).
    - ``password_file`` (path, default ``""``): a file whose first line is the
      PostgreSQL password (kept private: mode 0600).  Never logged.
    - ``node`` (str, default: the host name): this node's name in logs,
      metrics and ``queue show``; give each node of a cluster its own.
    - ``pool_size`` (integer >= 1, default 10): PostgreSQL connections per node.
    - ``node_timeout`` (duration, default ``"15s"``): a node whose heartbeat is
      older than this is dead, and its domain leases and outbound claims pass
      to the others (PostgreSQL only; SQLite knows at once).
    """

    url: str = _key(_store_url, "")
    password_file: Path | None = _key(_optional_text, None)
    node: str = _key(_node_name, "", computed=True)  # "": the host name
    pool_size: int = _key(_integer(1), 10)
    node_timeout: float = _key(_duration(positive=True), written="15s")

    @property
    def engine(self) -> str:
        """"postgresql" or "sqlite"."""
        return "postgresql" if self.url.startswith(POSTGRES_SCHEMES) else "sqlite"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus scrape endpoint.

    - ``listen`` (``"host:port"``, default ``""``, off): serve ``/metrics``
      there (plain HTTP; keep it on 127.0.0.1 or a private network).
    - ``per_domain`` (bool, default false): also export the held mail of
      each hosted domain (``domain`` label: 3 series per domain with held
      mail), read from the store at each scrape.
    - ``per_account`` (bool, default false): also export each account's last
      accepted ATRN as a timestamp (``account`` label: one series per account).
    """

    listen: tuple[str, int] | None = _key(_listen_address, None)
    per_domain: bool = _key(_boolean, False)
    per_account: bool = _key(_boolean, False)


@dataclass(frozen=True, slots=True)
class WebConfig:
    """``[web]``: the status page for operators and customers (docs/web.md).

    - ``listen`` (``"host:port"``, default ``""``, off): serve the page
      there, over TLS with ``[tls] cert`` when ``[tls]`` is set.
    - ``operators_file`` (path, default ``""``): the operators, one
      ``name:hash`` a line (``fermoposta web passwd NAME`` makes a line) or
      ``name:sha256:<fingerprint>`` for a client certificate; relative to
      the config file.  Without it no operator can log in.
    - ``session_idle`` (duration > 0, default ``"30m"``): a login ends
      after this long without a request (and after 12 hours in any case).
    """

    listen: tuple[str, int] | None = _key(_listen_address, None)
    operators_file: Path | None = _key(_optional_text, None)
    session_idle: float = _key(_duration(positive=True), written="30m")


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """The whole provider config file (top level).

    - ``path``: the file this was loaded from (absolute).
    - ``hostname`` (str, required): our name in the SMTP greeting and EHLO
      reply, and in Received: headers.  A domain name (letters, digits, hyphens).
    - ``data_dir`` (path, required): directory for the queue database and
      other state; relative to the config file's directory.  Not created here.
    - ``[listen]``, ``[tls]``, ``[limits]``, ``[odmr]``, ``[mx]``, ``[log]``,
      ``[submission]``, ``[outbound]``, ``[hold]``, ``[metrics]``,
      ``[connections]``, ``[auth_throttle]``, ``[store]``, ``[web]``: see
      `ListenConfig`, `TLSConfig`, `LimitsConfig`, `ODMRConfig`, `MXConfig`,
      `LogConfig`, `SubmissionConfig`, `OutboundConfig`, `HoldConfig`,
      `MetricsConfig`, `ConnectionsConfig`, `AuthThrottleConfig`,
      `StoreConfig`, `WebConfig`.  Each table
      is optional.
    """

    path: Path
    hostname: str = field(metadata=spec(_hostname))
    data_dir: Path = field(metadata=spec(_nonempty_string))
    listen: ListenConfig = _table(ListenConfig)
    tls: TLSConfig = _table(TLSConfig)
    limits: LimitsConfig = _table(LimitsConfig)
    odmr: ODMRConfig = _table(ODMRConfig)
    mx: MXConfig = _table(MXConfig)
    log: LogConfig = _table(LogConfig)
    submission: SubmissionConfig = _table(SubmissionConfig)
    outbound: OutboundConfig = _table(OutboundConfig)
    hold: HoldConfig = _table(HoldConfig)
    metrics: MetricsConfig = _table(MetricsConfig)
    connections: ConnectionsConfig = _table(ConnectionsConfig)
    auth_throttle: AuthThrottleConfig = _table(AuthThrottleConfig)
    store: StoreConfig = _table(StoreConfig)
    web: WebConfig = _table(WebConfig)

    @property
    def store_path(self) -> Path:
        """The SQLite queue database: ``[store] url``'s file, else
        ``data_dir / "fermoposta.sqlite3"`` (meaningless for PostgreSQL)."""
        if self.store.url.startswith("sqlite://"):
            return Path(self.store.url[len("sqlite://"):])
        return self.data_dir / "fermoposta.sqlite3"

