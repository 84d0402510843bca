"""The provider configuration: one typed schema, loaded from TOML, validated at load.

Contract:
- `load_provider_config(path)` reads a TOML file (`tomllib`) into frozen,
  typed dataclasses (`ProviderConfig` and one dataclass per table).  Every
  value is checked here, once, so the daemons never see a malformed setting.
- Each key is declared once, as a field of its table's dataclass with its
  check and default (`fermoposta.config_schema.key`); one loader
  (`config_common.Loader.table`) walks the declarations.  docs/config.md is
  tested against them.
- Problems raise one `ConfigError` that holds every problem found
  (`ConfigError.problems`), each naming the file and the key, e.g.
  ``provider.toml: [limits] max_message_size: expected a size like 50M or an
  integer, got "x"``: every key of every table is checked first, each
  table with every file it names (`[tls]`: each of ``cert``, ``key``,
  ``client_ca``); the checks across tables and of the files' content run
  once every key is valid.  Unknown keys and tables are
  errors, with a "did you mean" hint: a typo must never silently fall back
  to a default (design guide, principle 10).
- Relative paths (`data_dir`, `[tls] cert`, `key`, `client_ca`) resolve
  against the directory holding the config file, never against the process's
  working directory, so a config means the same thing wherever it is run from.
- Nothing security-relevant is guessed: TLS needs both a certificate and a
  key that exist; the SASL mechanism list is checked against what we
  implement; `hostname` must be given.
- This module does no I/O apart from reading the config file and checking
  that the TLS files exist and are usable.  It does not create `data_dir`.
- `[tls] cert`: an expired or not yet valid certificate is an error; one
  that expires within 21 days (`ops.certs.WARNING_DAYS`) loads, with a
  warning passed to `warn` (stderr unless the caller says otherwise).

- `default_config_path()`: ``$FERMOPOSTA_CONFIG`` if set and not empty,
  else `DEFAULT_CONFIG_PATH` (``/etc/fermoposta/provider.toml``).

This module is the provider config's one entry point: the names above are
importable from here.  The code lives in

- `fermoposta.provider_config_checks`: the per-key checks and the fixed
  choices (`SUPPORTED_MECHANISMS`, `POSTGRES_SCHEMES`);
- `fermoposta.provider_config_tables`: `ProviderConfig` and one dataclass
  per table (`ListenConfig`, `TLSConfig`, `LimitsConfig`, ...);
- `fermoposta.provider_config_load`: `load_provider_config` and the checks
  across keys, tables and files.

The docstrings of those dataclasses describe every key; docs/config.md is
the operators' reference (tests/core/test_config_docs.py checks its tables
against the declarations).
"""

from __future__ import annotations

import os
from pathlib import Path

from fermoposta.config_common import (
    ConfigError,
    LogConfig,
    parse_duration,
    parse_hostport,
    parse_size,
)
from fermoposta.provider_config_checks import SUPPORTED_MECHANISMS
from fermoposta.provider_config_load import load_provider_config
from fermoposta.provider_config_tables import (
    AuthThrottleConfig,
    ConnectionsConfig,
    HoldConfig,
    LimitsConfig,
    ListenConfig,
    ListenerLimits,
    MetricsConfig,
    MXConfig,
    ODMRConfig,
    OutboundConfig,
    ProviderConfig,
    StoreConfig,
    SubmissionConfig,
    TLSConfig,
    WebConfig,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "SUPPORTED_MECHANISMS",
    "AuthThrottleConfig",
    "ConfigError",
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
    "default_config_path",
    "load_provider_config",
    "parse_duration",
    "parse_hostport",
    "parse_size",
]

DEFAULT_CONFIG_PATH = Path("/etc/fermoposta/provider.toml")
CONFIG_ENV = "FERMOPOSTA_CONFIG"


def default_config_path() -> Path:
    """``$FERMOPOSTA_CONFIG`` if set and not empty, else ``/etc/fermoposta/provider.toml``."""
    env = os.environ.get(CONFIG_ENV, "")
    return Path(env) if env else DEFAULT_CONFIG_PATH
