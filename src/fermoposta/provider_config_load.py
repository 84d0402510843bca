"""The provider config's loader: a TOML file in, a checked `ProviderConfig` out.

Contract:
- `load_provider_config(path)` reads the file (`config_common.Loader`,
  `tomllib`) and walks the declarations
  (`fermoposta.provider_config_tables`): every key of every table is
  checked and every problem recorded, the tables in the order they are
  written, each table with every file it names (`[tls]`: each of
  ``cert``, ``key``, ``client_ca``; ``[outbound]
  smarthost_password_file``; ``[store] password_file``; ``[web]
  operators_file``).  Then, once every key is valid, the checks across
  tables and of the files' content (`[tls]` cert and key load and match,
  the certificate's dates, ``client_ca`` is a usable CA bundle).  It
  raises one `ConfigError` holding every problem found
  (`ConfigError.problems`), each naming the file and the key.
- Relative paths (`data_dir`, the files above, a ``sqlite://`` store
  path) resolve against the directory holding the config file.
- `[tls] cert`: an expired or not yet valid certificate is an error; one
  that expires within 21 days (`ops.certs.WARNING_DAYS`) loads, with a
  warning passed to `warn` (`print_warning`: stderr, unless the caller
  says otherwise; ``None``: say nothing).
- No I/O apart from reading the config file and checking the files it
  names.  It creates nothing (not even `data_dir`).
"""

from __future__ import annotations

import os
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fermoposta.config_common import Loader as _Loader
from fermoposta.config_common import show_value as _show
from fermoposta.config_schema import declared_tables
from fermoposta.provider_config_checks import POSTGRES_SCHEMES
from fermoposta.provider_config_tables import ProviderConfig

__all__ = ["load_provider_config", "print_warning"]


def print_warning(message: str) -> None:
    """A load-time warning on stderr, in the CLI's form (``fermoposta: warning: ...``)."""
    print(f"fermoposta: warning: {message}", file=sys.stderr)


def load_provider_config(path: str | Path, *,
                         warn: Callable[[str], None] | None = print_warning) -> ProviderConfig:
    """Load and validate a provider config file.  Raises `ConfigError`, with
    every problem found (`ConfigError.problems`).

    Every key of every table is checked (all problems are collected); the
    checks that involve more than one key run once every key is valid.
    Problems that do not stop the config from working (a certificate that
    expires within `certs.WARNING_DAYS`) go to `warn` (stderr by default;
    None: say nothing, as the daemon's reload does, which logs them itself)."""
    path = Path(path)
    loader = _Loader(path)
    raw = loader.read()

    tables = declared_tables(ProviderConfig)
    top = loader.table(None, ProviderConfig, raw, extra=list(tables)) or {}
    sections: dict[str, Any] = {}
    # The tables in the order they are written, so the problems come in file order.
    for name in sorted(tables, key=lambda n: list(raw).index(n) if n in raw else len(raw)):
        cls = tables[name]
        with loader.collecting():
            table = raw.get(name, {})
            if not isinstance(table, dict):
                raise loader.error(None, name, f"expected a table [{name}], got {_show(table)}")
            values = loader.table(name, cls, table)
            if values is None:
                continue
            if name == "tls":
                values = _resolve_tls(loader, values)
            if name == "outbound" and values.get("smarthost_password_file"):
                values["smarthost_password_file"] = loader.existing_file(
                    "outbound", "smarthost_password_file", values["smarthost_password_file"])
            if name == "store":
                values = _resolve_store(loader, values)
            if name == "web":
                mark = len(loader.problems)
                values["operators_file"] = loader.optional_file(
                    "web", "operators_file", values.get("operators_file"))
                loader.finish_since(mark)
            sections[name] = cls(**values)
    loader.finish()

    config = ProviderConfig(
        path=Path(os.path.abspath(path)),
        hostname=top["hostname"],
        data_dir=loader.resolve(top["data_dir"]),
        **sections,
    )
    _cross_check(loader, config, warn)
    loader.finish()
    return config


def _check_certificate_dates(loader: _Loader, cert: Path,
                             warn: Callable[[str], None] | None) -> None:
    """An expired or not yet valid certificate is an error (every customer
    would fail its handshake, exit 74); one that expires soon, a warning."""
    from fermoposta.ops import certs  # an X.509 parser: only for a config with TLS

    try:
        validity = certs.validity_of_file(cert)
    except (ValueError, OSError) as exc:
        raise loader.error("tls", "cert", f"cannot read the certificate's dates: {exc}"
                           ) from exc
    now = time.time()
    problem = validity.problem(now)
    if problem is not None:
        raise loader.error("tls", "cert", problem)
    soon = validity.expiry_warning(now)
    if soon is not None and warn is not None:
        warn(str(loader.error("tls", "cert", soon)))


def _resolve_store(loader: _Loader, values: dict[str, Any]) -> dict[str, Any]:
    mark = len(loader.problems)
    url = values.get("url", "")
    if url.startswith("sqlite://"):
        values["url"] = "sqlite://" + str(loader.resolve(url[len("sqlite://"):]))
    if values.get("password_file"):
        if not url.startswith(POSTGRES_SCHEMES):
            loader.report("store", "password_file", "only a PostgreSQL url takes a password")
        values["password_file"] = loader.optional_file("store", "password_file",
                                                       values["password_file"])
    else:
        values.pop("password_file", None)
    loader.finish_since(mark)
    return values


def _resolve_tls(loader: _Loader, values: dict[str, Any]) -> dict[str, Any]:
    """The files of ``[tls]``, each checked; every problem is recorded, then the step stops."""
    mark = len(loader.problems)
    cert, key = values.get("cert", ""), values.get("key", "")
    if bool(cert) != bool(key):
        missing = "key" if cert else "cert"
        loader.report(
            "tls", missing, f"cert and key must be given together; {missing} is missing"
        )
    resolved: dict[str, Any] = {}
    for name in ("cert", "key", "client_ca"):
        resolved[name] = loader.optional_file("tls", name, values.get(name, ""))
    loader.finish_since(mark)
    return resolved


def _cross_check(loader: _Loader, config: ProviderConfig,
                 warn: Callable[[str], None] | None) -> None:
    """Checks that involve more than one key; each problem is recorded."""
    listeners = [(("listen", name), getattr(config.listen, name))
                 for name in ("mx", "odmr", "odmr_tls", "submission", "submissions")]
    listeners += [(("metrics", "listen"), config.metrics.listen),
                  (("web", "listen"), config.web.listen)]
    seen: dict[tuple[str, int], str] = {}
    for (table, key), address in listeners:
        if address is None or address[1] == 0:  # port 0: the system picks, never twice
            continue
        if address in seen:
            loader.report(table, key, f"the same address as {seen[address]}: two listeners "
                          "cannot share one; give each its own port")
        else:
            seen[address] = f"[{table}] {key}"
    for listener in ("odmr_tls", "submissions"):
        if getattr(config.listen, listener) is not None and not config.tls.enabled:
            loader.report("listen", listener, "an implicit-TLS listener needs [tls] cert and key")
    if config.outbound.retry_max < config.outbound.retry_initial:
        loader.report("outbound", "retry_max", "must not be shorter than retry_initial")
    if config.outbound.smarthost_username and config.outbound.smarthost_tls == "none":
        loader.report("outbound", "smarthost_tls",
                      'AUTH at the smarthost needs TLS: "starttls" or "implicit"')
    for key, target in [("smarthost", config.outbound.smarthost),
                        ("resolver", config.outbound.resolver),
                        *(("transport", t) for t in config.outbound.transport.values())]:
        if target is not None and target[1] == 0:
            loader.report("outbound", key, "port 0 is not a destination")
    if bool(config.outbound.smarthost_username) != (
            config.outbound.smarthost_password_file is not None):
        loader.report("outbound", "smarthost_password_file",
                      "smarthost_username and smarthost_password_file go together")
    if config.tls.client_ca is not None and not config.tls.enabled:
        loader.report("tls", "client_ca", "client certificates need [tls] cert and key")
    if config.tls.cert is not None and config.tls.key is not None:
        with loader.collecting():
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    str(config.tls.cert), str(config.tls.key)
                )
            except (ssl.SSLError, OSError) as exc:
                raise loader.error("tls", "key", f"cannot use this certificate and key: {exc}"
                                   ) from exc
            _check_certificate_dates(loader, config.tls.cert, warn)
    if config.tls.client_ca is not None:
        try:
            ssl.create_default_context(cafile=str(config.tls.client_ca))
        except (ssl.SSLError, OSError) as exc:
            loader.report("tls", "client_ca", f"not a usable CA bundle: {exc}")
