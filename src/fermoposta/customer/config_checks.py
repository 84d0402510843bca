"""The customer config's value checks: one parser per kind of key, and the fixed choices.

Contract:
- Each ``check_*`` function (and the `domain_list` factory, and
  `DURATION_1S`) takes one TOML value and returns it typed and normalised
  (a host name or a bracket-free IP address, a lowercase pin, upper-case
  SASL mechanism names, A-label domains, ``local@domain`` lowercased,
  ``ipaddress`` networks ...), or raises ValueError with an ``expected ...,
  got ...`` text; the loader (`config_common.Loader`) prefixes the file and
  the key.  They are the checks named by the declarations in
  `fermoposta.customer.config_tables` and `fermoposta.customer.config_pull`.
- A check sees one value only: whatever involves another key, another
  table or a file (a client certificate needs its key, an alias must be in
  a domain its block accepts, a file must exist) is the loader's
  (`fermoposta.customer.config_load`).
- The constants (`TLS_MODES`, `CLIENT_MECHANISMS`, `DELIVERY_TYPES`, ...)
  are the choices the checks accept and the limits they enforce.
- Pure functions: no I/O, no state.
"""

from __future__ import annotations

import ipaddress
import re
import string

from fermoposta.config_common import (
    Parser,
    check_hostname,
    check_string,
    duration,
    parse_hostport,
    show_value,
)
from fermoposta.smtp.atrn import parse_atrn_domains
from fermoposta.smtp.command import normalize_domain
from fermoposta.smtp.reply import SMTPError

__all__ = [
    "CLIENT_MECHANISMS",
    "DEFAULT_BACKOFF_MAX",
    "DEFAULT_OUTBOX_NETWORKS",
    "DELIVERY_TYPES",
    "DURATION_1S",
    "MAX_SITE_DOMAINS",
    "MAX_UNIX_SOCKET_PATH",
    "OUTBOX_PUSH_MODES",
    "PASSWORD_MECHANISMS",
    "SUBMISSION_PORT",
    "TLS_MODES",
    "Network",
    "check_address",
    "check_alias_table",
    "check_client_mechanisms",
    "check_host",
    "check_maildir_template",
    "check_networks",
    "check_nonempty_string",
    "check_optional_address",
    "check_optional_host",
    "check_optional_hostport",
    "check_optional_listen",
    "check_pin",
    "check_pull_name",
    "check_submission_address",
    "check_username",
    "domain_list",
]

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

#: The default ``backoff_max`` of a ``[[pull]]`` block (1h).
DEFAULT_BACKOFF_MAX = 3600.0
#: Longest path that fits in ``sockaddr_un.sun_path`` (108 bytes on Linux, NUL included).
MAX_UNIX_SOCKET_PATH = 107
MAX_SITE_DOMAINS = 10_000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_host(value: object) -> str:
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


def check_optional_host(value: object) -> str:
    return "" if value == "" else check_host(value)


def check_pin(value: object) -> str | None:
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


def check_username(value: object) -> str | None:
    text = check_string(value)
    if not text:
        return None
    if text != text.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError(
            "expected a user name without control characters or surrounding spaces, "
            f"got {show_value(value)}"
        )
    return text


def check_client_mechanisms(value: object) -> tuple[str, ...]:
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


def domain_list(limit: int) -> Parser:
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


def check_address(value: object) -> str:
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


def check_pull_name(value: object) -> str:
    text = check_string(value)
    if not _PULL_NAME_RE.fullmatch(text):
        raise ValueError(
            "expected a name of letters, digits, '.', '_', '-' (at most 64, starting with a "
            f"letter or digit), got {show_value(value)}"
        )
    return text


_PLACEHOLDERS = ("domain", "local", "address")


def check_maildir_template(value: object) -> str:
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


def check_submission_address(value: object) -> tuple[str, int] | None:
    if check_string(value).strip() == "":
        return None
    host, port = parse_hostport(value)
    if port == 0:
        raise ValueError(f"expected a port 1-65535, got {show_value(value)}")
    return check_host(host), port


def check_optional_listen(value: object) -> tuple[str, int] | None:
    if check_string(value).strip() == "":
        return None
    host, port = parse_hostport(value)
    return check_host(host), port


def check_networks(value: object) -> tuple[Network, ...]:
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


def check_nonempty_string(value: object) -> str:
    text = check_string(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def check_optional_address(value: object) -> str | None:
    return None if value == "" else check_address(value)


def check_optional_hostport(value: object) -> tuple[str, int] | None:
    return None if value == "" else parse_hostport(value)


def check_alias_table(value: object) -> dict[str, str]:
    """The shape of ``aliases``; its entries are checked against the block's domains."""
    if not isinstance(value, dict):
        raise ValueError(f'expected a table of "address" = "address", got {show_value(value)}')
    return value


DURATION_1S = duration(positive=True, minimum=1.0)
