"""The customer config's ``[[pull]]`` blocks: what one block loads into, and its keys.

Contract:
- `PullConfig` (one ``[[pull]]`` block: a name, its domains, its `Schedule`)
  and `DeliveryConfig` (its ``[pull.delivery]``) are what the rest of the
  customer reads; frozen, every value already checked.
- The keys of these tables are declared once, each with its check and
  default (`fermoposta.config_schema.key`), on `PullKeys` (a block),
  `WindowKeys` (a ``[[pull.window]]``, loaded into a
  `fermoposta.customer.schedule.Window`) and `DeliveryKeys` (the delivery,
  tagged by the delivery types a key belongs to): a block loads into more
  than one object, so the declaration is not the loaded dataclass.
  docs/customer-config.md is tested against these declarations.
- The checks across keys and blocks (names, domains, aliases against the
  accepted domains, an LMTP socket path's length) are the loader's
  (`fermoposta.customer.config_load`).
- The docstrings below describe every key.  No I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fermoposta.config_common import check_boolean, one_of
from fermoposta.config_schema import Declared, declared_keys, key, spec
from fermoposta.customer.config_checks import (
    DELIVERY_TYPES,
    DURATION_1S,
    check_alias_table,
    check_maildir_template,
    check_nonempty_string,
    check_optional_address,
    check_pull_name,
    domain_list,
)
from fermoposta.customer.schedule import (
    JitterSpec,
    Schedule,
    parse_days,
    parse_every,
    parse_hours,
    parse_jitter,
)
from fermoposta.smtp.atrn import MAX_ATRN_DOMAINS

__all__ = [
    "DeliveryConfig",
    "DeliveryKeys",
    "PullConfig",
    "PullKeys",
    "WindowKeys",
]


class _Site(Protocol):
    """What `PullConfig.accept_domains` needs of the `CustomerConfig`."""

    @property
    def domains(self) -> tuple[str, ...]: ...


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
    - ``every`` (duration >= 1s or ``"push"``, default ``"10m"``): the base
      interval.  ``"push"``: dial again at once after every session that
      worked (mail or 453), for a provider account with ``--atrn-wait``, whose
      ATRN waits for mail: one session is always waiting and mail arrives
      the moment the provider has it; after a failure, the backoff (10 s,
      20 s, ... up to ``backoff_max``); a 453 that comes at once (the
      account does not wait) makes the next dial wait `PUSH_IDLE_RETRY`.
    - ``jitter`` (default ``"10%"``): ``"N%"`` of each delay (0-100) or a
      duration; each wait is moved by a random amount within ± that.
    - ``backoff_max`` (duration, default ``"1h"``, raised to the longest
      ``every`` of the block when that is longer): after consecutive
      failures the wait doubles each time, up to this.  When written it must
      be at least ``every`` and every window's ``every``.
    - ``[[pull.window]]`` (any number): ``days`` (default ``"daily"``: e.g.
      ``"mon-fri"``, ``"sat,sun"``, ``"mon,wed,fri"``), ``hours`` (default
      ``"00-24"``: ``"start-end"``, whole hours, end exclusive), ``every``
      (duration >= 1s or ``"push"``, required): the interval inside the window.  The first
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

    def accept_domains(self, config: _Site) -> tuple[str, ...]:
        """The RCPT domains its reversed session accepts: its own, or the site's for bare ATRN."""
        return self.domains or config.domains


# The keys of the tables that load into more than one field (a ``[[pull]]``
# block into `PullConfig` and its `Schedule`, a window into `Window`, ...):
# declared here once, each with its check and default.


@dataclass(frozen=True, slots=True, kw_only=True)
class PullKeys:
    """The keys of one ``[[pull]]`` block (see `PullConfig`); the block's
    ``[[pull.window]]`` (`WindowKeys`) and ``[pull.delivery]`` (`DeliveryKeys`)
    are tables of their own."""

    #: Default: ``"pull-<n>"`` by position.
    name: str = field(metadata=spec(check_pull_name, computed=True))
    domains: tuple[str, ...] = key(domain_list(MAX_ATRN_DOMAINS), ())
    every: float = key(parse_every, written="10m")
    jitter: JitterSpec = key(parse_jitter, written="10%")
    #: Default: 1h, or the block's longest ``every`` when that is longer.
    backoff_max: float = key(DURATION_1S, written="1h", computed=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowKeys:
    """The keys of one ``[[pull.window]]`` (loaded into a `Window`)."""

    days: frozenset[int] = key(parse_days, written="daily")
    hours: tuple[int, int] = key(parse_hours, written="00-24")
    every: float = field(metadata=spec(parse_every))


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryKeys:
    """The keys of ``[pull.delivery]`` (loaded into a `DeliveryConfig`); the
    tags name the delivery types a key belongs to.  ``path`` (maildir) and
    ``address`` (lmtp, smtp) are required for their types."""

    type: str = field(metadata=spec(one_of(*DELIVERY_TYPES)))
    path: str | None = key(check_maildir_template, None, tags=("maildir", "required"))
    create: bool = key(check_boolean, False, tags=("maildir",))
    aliases: Mapping[str, str] = key(check_alias_table, factory=dict, tags=("maildir",))
    catch_all: str | None = key(check_optional_address, None, tags=("maildir",))
    address: str | None = key(check_nonempty_string, None, tags=("lmtp", "smtp", "required"))

    @staticmethod
    def of_type(kind: str) -> dict[str, Declared]:
        """The keys a delivery of type `kind` takes, ``type`` excluded."""
        return {name: d for name, d in declared_keys(DeliveryKeys).items()
                if kind in d.key.tags}
