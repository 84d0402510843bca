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
  block first, each table with every file it names and every check across
  its keys; then, once the top level and the blocks are valid, every
  problem across blocks (names, domains, aliases).  Each names the file and the
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
- Loading does no I/O apart from reading the config file and checking
  that named files exist.  It creates nothing.  (The outbox ``users_file``
  is read when the listener starts.)
- `default_customer_config_path()`: ``$FERMOPOSTA_CUSTOMER_CONFIG`` if set
  and not empty, else `DEFAULT_CUSTOMER_CONFIG_PATH`.

This module is the customer config's one entry point: the names above are
importable from here.  The code lives in

- `fermoposta.customer.config_checks`: the per-key checks and the fixed
  choices (`TLS_MODES`, `CLIENT_MECHANISMS`, `DELIVERY_TYPES`, ...);
- `fermoposta.customer.config_tables`: `CustomerConfig`, `ProviderEndpoint`,
  `OutboxConfig`, `MetricsKeys`, `default_data_dir`;
- `fermoposta.customer.config_pull`: `PullConfig`, `DeliveryConfig` and the
  keys of the ``[[pull]]`` tables (`PullKeys`, `WindowKeys`, `DeliveryKeys`);
- `fermoposta.customer.config_load`: `load_customer_config`.

The docstrings of those dataclasses describe every key;
docs/customer-config.md is the operators' reference, tested against the
declarations.
"""

from __future__ import annotations

import os
from pathlib import Path

from fermoposta.config_common import ConfigError, LogConfig
from fermoposta.customer.config_checks import (
    CLIENT_MECHANISMS,
    DELIVERY_TYPES,
    OUTBOX_PUSH_MODES,
    TLS_MODES,
)
from fermoposta.customer.config_load import load_customer_config
from fermoposta.customer.config_pull import DeliveryConfig, DeliveryKeys, PullConfig, WindowKeys
from fermoposta.customer.config_tables import (
    CustomerConfig,
    OutboxConfig,
    ProviderEndpoint,
    default_data_dir,
)

__all__ = [
    "CLIENT_MECHANISMS",
    "DEFAULT_CUSTOMER_CONFIG_PATH",
    "DELIVERY_TYPES",
    "OUTBOX_PUSH_MODES",
    "TLS_MODES",
    "ConfigError",
    "CustomerConfig",
    "DeliveryConfig",
    "DeliveryKeys",
    "LogConfig",
    "OutboxConfig",
    "ProviderEndpoint",
    "PullConfig",
    "WindowKeys",
    "default_customer_config_path",
    "default_data_dir",
    "load_customer_config",
]

DEFAULT_CUSTOMER_CONFIG_PATH = Path("/etc/fermoposta/customer.toml")
CUSTOMER_CONFIG_ENV = "FERMOPOSTA_CUSTOMER_CONFIG"


def default_customer_config_path() -> Path:
    """``$FERMOPOSTA_CUSTOMER_CONFIG`` if set and not empty, else /etc/fermoposta/customer.toml."""
    env = os.environ.get(CUSTOMER_CONFIG_ENV, "")
    return Path(env) if env else DEFAULT_CUSTOMER_CONFIG_PATH
