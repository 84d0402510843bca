"""The customer config's loader: a TOML file in, a checked `CustomerConfig` out.

Contract:
- `load_customer_config(path)` reads the file (`config_common.Loader`) and
  walks the declarations (`fermoposta.customer.config_tables`,
  `fermoposta.customer.config_pull`): every key of every table and block
  is checked, every problem recorded, each table with the files it names
  and the checks across its keys; then, when the top level and every
  ``[[pull]]`` block loaded (whatever the problems of the other tables),
  the checks across blocks.  It raises one `ConfigError` holding every
  problem found (`ConfigError.problems`), each naming the file and the
  key, in the order: the tables in load order (top level, ``[provider]``,
  ``[log]``, the blocks, ``[outbox]``, ``[metrics]``); then the site's
  domains and the blocks against each other; then each block's delivery
  against the domains it accepts (every alias).  No step stops at its
  first problem: one that depends on another's result is skipped when
  that failed (a bare-ATRN block's delivery when the site's domains are
  missing), so nothing is reported twice or invented.
- Relative paths resolve against the directory holding the config file.
  Files named must exist and be readable; the CA bundle and the client
  certificate with its key are loaded once to check them (the password
  file is read later, by `ProviderEndpoint.read_password`).
- No I/O apart from reading the config file and checking the files it
  names.  It creates nothing.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fermoposta.config_common import Loader, LogConfig, parse_hostport, show_value
from fermoposta.config_schema import declared_keys, declared_tables, defaults
from fermoposta.customer.config_checks import (
    DELIVERY_TYPES,
    MAX_UNIX_SOCKET_PATH,
    PASSWORD_MECHANISMS,
    Network,
    check_address,
)
from fermoposta.customer.config_pull import (
    DeliveryConfig,
    DeliveryKeys,
    PullConfig,
    PullKeys,
    WindowKeys,
)
from fermoposta.customer.config_tables import (
    CustomerConfig,
    MetricsKeys,
    OutboxConfig,
    ProviderEndpoint,
    default_data_dir,
)
from fermoposta.customer.schedule import Schedule, Window

__all__ = ["load_customer_config"]


def load_customer_config(path: str | Path) -> CustomerConfig:
    """Load and validate a customer config file.  Raises `ConfigError`, with
    every problem found (`ConfigError.problems`).

    First every table and every key is checked, each table's files and
    checks across its keys with it, all problems collected; then, when the
    top level and every ``[[pull]]`` block loaded, the checks across the
    blocks (names, domains, each block's delivery against the domains it
    accepts), whatever the other tables' problems."""
    path = Path(path)
    loader = Loader(path)
    raw = loader.read()

    top = loader.table(None, CustomerConfig, raw, extra=list(declared_tables(CustomerConfig)))
    blocks_known = top is not None
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
    mark = len(loader.problems)
    with loader.collecting():
        drafts = _load_pulls(loader, raw)
    blocks_known = blocks_known and len(loader.problems) == mark
    with loader.collecting():
        table = _table(loader, raw, "outbox", required=False)
        values["outbox"] = _load_outbox(loader, table, values["max_message_size"])
    with loader.collecting():
        table = _table(loader, raw, "metrics", required=False)
        values["metrics_listen"] = loader.load("metrics", MetricsKeys, table).get("listen")
    if not blocks_known:
        loader.finish()

    # The domains each block accepts are only known once the site's are
    # (None: they are not, a problem is recorded; a bare-ATRN block's
    # delivery is then not checked against them).
    domains = _site_domains(loader, site_domains, drafts)
    pulls: list[PullConfig] = []
    for draft in drafts:
        accept = draft.domains or domains
        if accept is None:
            continue
        with loader.collecting():
            pulls.append(draft.finish(loader, accept))
    loader.finish()
    assert provider is not None and domains is not None
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
    users_file = loader.optional_file(section, "users_file", users_text)
    default = OutboxConfig()
    if values.get("allow_plaintext_auth") and not users_text:
        loader.report(
            section, "allow_plaintext_auth", "needs users_file (there is no AUTH without it)"
        )
    networks: tuple[Network, ...] = values.get("networks", default.networks)
    if not users_text:
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
    """``[provider]``: its keys, then every file and every check across its keys,
    all recorded (the checks that need a file look at what is written)."""
    section = "provider"
    mark = len(loader.problems)
    values = loader.load(section, ProviderEndpoint, table)
    cert, key = values.get("client_cert"), values.get("client_key")
    if bool(cert) != bool(key):
        missing = "client_key" if cert else "client_cert"
        loader.report(
            section,
            missing,
            f"client_cert and client_key must be given together; {missing} is missing",
        )
    for name in ("ca_file", "client_cert", "client_key"):
        values[name] = loader.optional_file(section, name, values.pop(name, None))
    _check_tls_files(loader, values["ca_file"], values["client_cert"], values["client_key"])

    username: str | None = values.get("username")
    password_text: str | None = values.pop("password_file", None)
    if username is None and not cert:
        loader.report(
            section, "username", "required key is missing (or set client_cert for AUTH EXTERNAL)"
        )
    if username is not None and not password_text:
        loader.report(
            section, "password_file", f"required with username {show_value(username)}"
        )
    if username is None and password_text:
        loader.report(section, "password_file", "given without a username")
    values["password_file"] = loader.optional_file(section, "password_file", password_text)

    mechanisms: tuple[str, ...] = values.get("mechanisms", ())
    for mechanism in mechanisms:
        if mechanism == "EXTERNAL" and not cert:
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
    """Load the PEM files once, so a bad one is a config error, not a TLS failure later.
    Each problem is recorded."""
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (ssl.SSLError, OSError, ValueError) as exc:
            loader.report("provider", "ca_file", f"not a usable CA bundle: {exc}")
    if cert is not None and key is not None:
        try:
            # Never let OpenSSL prompt on the terminal for an encrypted key's passphrase.
            ssl.create_default_context().load_cert_chain(str(cert), str(key), password=_no_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            loader.report(
                "provider", "client_key", f"cannot use this certificate and key: {exc}"
            )


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
) -> tuple[str, ...] | None:
    """The site's domains, after checking the blocks against them and each
    other.  Every problem is recorded; None when the site's domains are not
    known (required but missing, or empty)."""
    names: dict[str, int] = {}
    owner: dict[str, _PullDraft] = {}
    bare: _PullDraft | None = None
    for draft in drafts:
        if draft.name in names:
            loader.report(
                draft.section,
                "name",
                f"{show_value(draft.name)} is already the name of [[pull]] #{names[draft.name]}",
            )
        else:
            names[draft.name] = draft.number
        if draft.domains:
            for domain in draft.domains:
                if domain in owner:
                    loader.report(
                        draft.section,
                        "domains",
                        f"{domain} is already collected by [[pull]] #{owner[domain].number} "
                        f"({show_value(owner[domain].name)}); two blocks would race for its mail",
                    )
                else:
                    owner[domain] = draft
        elif bare is not None:
            loader.report(
                draft.section,
                "domains",
                f"[[pull]] #{bare.number} ({show_value(bare.name)}) already sends a bare ATRN "
                "(every domain of the account); two such blocks would race for the same mail",
            )
        else:
            bare = draft

    if written is None:
        if bare is not None:
            loader.report(
                None,
                "domains",
                f"required: [[pull]] #{bare.number} ({show_value(bare.name)}) sends a bare ATRN, "
                "so the site's domains must be listed (RCPTs for other domains are refused)",
            )
            return None
        return tuple(owner)
    if not written:
        loader.report(None, "domains", "must not be empty")
        return None
    for domain, draft in owner.items():
        if domain not in written:
            loader.report(
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
    """The delivery checked against the domains its block accepts; every
    problem is recorded, then the step stops."""
    values = {**defaults(DeliveryKeys), **written}
    kind: str = values["type"]
    if kind == "maildir":
        mark = len(loader.problems)
        aliases = _aliases(loader, section, values["aliases"], accept)
        catch_all: str | None = values["catch_all"]
        if catch_all is not None:
            _check_local(loader, section, "catch_all", catch_all, accept)
        loader.finish_since(mark)
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
    """The alias table, lowercased; each problem of each entry is recorded
    (the entries with one are left out)."""
    result: dict[str, str] = {}
    for raw_key, raw_target in value.items():
        key = f"aliases.{show_value(raw_key)}"
        ok = True
        addresses: list[str] = []
        for raw in (raw_key, raw_target):
            try:
                address = check_address(raw)
            except ValueError as exc:
                loader.report(section, key, str(exc))
                ok = False
                continue
            ok = _check_local(loader, section, key, address, accept) and ok
            addresses.append(address)
        if not ok:
            continue
        source, target = addresses
        if source in result:
            loader.report(section, key, f"{source} is listed twice (after lowercasing)")
            continue
        result[source] = target
    return result


def _check_local(
    loader: Loader, section: str, key: str, address: str, accept: tuple[str, ...]
) -> bool:
    """Whether `address` is in a domain of `accept`; the problem recorded if not."""
    domain = address.rpartition("@")[2]
    if domain not in accept:
        loader.report(
            section,
            key,
            f"{address}: {domain} is not a domain this block accepts ({', '.join(accept)})",
        )
        return False
    return True
