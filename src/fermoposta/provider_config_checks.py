"""The provider config's value checks: one parser per kind of key, and the fixed choices.

Contract:
- Each ``check_*`` function takes one TOML value and returns it typed and
  normalised (a ``(host, port)`` pair or ``None`` for ``""``, upper-case
  SASL mechanism names, A-label domains, a ``domain -> (host, port)``
  route table ...), or raises ValueError with an ``expected ...`` text;
  the loader (`config_common.Loader`) prefixes the file and the key.  They
  are the checks named by the declarations in
  `fermoposta.provider_config_tables`.
- A check sees one value only: whatever involves another key, another
  table or a file (``cert`` needs ``key``, ``retry_max`` against
  ``retry_initial``, a file must exist) is the loader's
  (`fermoposta.provider_config_load`).
- The constants are the choices the checks accept: `SUPPORTED_MECHANISMS`
  (the SASL mechanisms the ODMR listener implements) and
  `POSTGRES_SCHEMES` (the URL prefixes of a PostgreSQL ``[store] url``).
- Pure functions: no I/O, no state.
"""

from __future__ import annotations

import ipaddress

from fermoposta.config_common import check_string as _string
from fermoposta.config_common import integer as _integer
from fermoposta.config_common import one_of as _one_of
from fermoposta.config_common import parse_hostport
from fermoposta.config_common import show_value as _show

__all__ = [
    "POSTGRES_SCHEMES",
    "SUPPORTED_MECHANISMS",
    "check_domain_list",
    "check_domain_name",
    "check_line_length",
    "check_listen_address",
    "check_mechanisms",
    "check_no_mail_reply",
    "check_node_name",
    "check_nonempty_string",
    "check_port",
    "check_store_url",
    "check_transport_map",
    "check_unset_or_positive",
]

#: SASL mechanisms the ODMR listener implements (RFC 4954 AUTH; RFC 7677
#: SCRAM-SHA-256; RFC 4616 PLAIN; LOGIN (draft); RFC 2195 CRAM-MD5, which is
#: the only one fetchmail speaks in ODMR mode; RFC 4422 App. A EXTERNAL with
#: a TLS client certificate).
SUPPORTED_MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5", "EXTERNAL")


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def check_store_url(value: object) -> str:
    text = _string(value)
    if text and not text.startswith(("sqlite://", *POSTGRES_SCHEMES)):
        raise ValueError('expected "", "sqlite://PATH" or "postgresql://user@host:port/dbname"')
    if text == "sqlite://":
        raise ValueError('"sqlite://" names no file: use "sqlite:///path/to/file"')
    return text


def check_node_name(value: object) -> str:
    text = _string(value)
    if (text and not all(c.isalnum() or c in "._-" for c in text)) or len(text) > 64:
        raise ValueError("a node name is at most 64 letters, digits, dots, hyphens or underscores")
    return text


def check_listen_address(value: object) -> tuple[str, int] | None:
    if value == "":
        return None
    return parse_hostport(value)


def check_resolver_address(value: object) -> tuple[str, int] | None:
    """``"ip:port"`` or ``"[v6]:port"`` (a DNS server is asked by address:
    a name would need a resolver to find it), or ``""``."""
    address = check_listen_address(value)
    if address is not None:
        try:
            ipaddress.ip_address(address[0])
        except ValueError:
            raise ValueError(f"expected an IP address and port such as \"127.0.0.1:53\", "
                             f"got {_show(value)} (a DNS server is asked by its address)"
                             ) from None
    return address


def check_mechanisms(value: object) -> tuple[str, ...]:
    wanted = ", ".join(SUPPORTED_MECHANISMS)
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"expected a non-empty list of mechanisms from {wanted}, got {_show(value)}"
        )
    result: list[str] = []
    for item in value:
        if not isinstance(item, str) or item.upper() not in SUPPORTED_MECHANISMS:
            raise ValueError(f"unsupported mechanism {_show(item)} (supported: {wanted})")
        if item.upper() in result:
            raise ValueError(f"mechanism {_show(item)} is listed twice")
        result.append(item.upper())
    return tuple(result)


def check_no_mail_reply(value: object) -> str:
    # Accept 453 as an integer too: it is not a typo, just the number unquoted.
    if isinstance(value, int) and not isinstance(value, bool) and value == 453:
        return "453"
    return str(_one_of("453", "quit")(value))


def check_line_length(value: object) -> int:
    n = _integer(1)(value)
    if n < 1000:
        # RFC 5321 §4.5.3.1.6: a receiver must accept text lines of 1000 octets.
        raise ValueError(f"expected at least 1000 (RFC 5321 §4.5.3.1.6), got {_show(value)}")
    return int(n)


def check_port(value: object) -> int:
    n = _integer(1)(value)
    if n > 65535:
        raise ValueError(f"expected a port number 1-65535, got {_show(value)}")
    return int(n)


def check_domain_name(value: object) -> str:
    from fermoposta.smtp.command import normalize_domain

    text = _string(value)
    try:
        name = normalize_domain(text)
    except ValueError as exc:
        raise ValueError(f"not a domain name: {_show(value)} ({exc})") from None
    if "." not in name:
        raise ValueError(f"not a domain name: {_show(value)}")
    return name


def check_domain_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of domain names, got {_show(value)}")
    return tuple(check_domain_name(item) for item in value)


def check_transport_map(value: object) -> dict[str, tuple[str, int]]:
    if not isinstance(value, dict):
        raise ValueError(f'expected a table of "domain" = "host:port", got {_show(value)}')
    routes: dict[str, tuple[str, int]] = {}
    for domain, target in value.items():
        routes[check_domain_name(domain)] = parse_hostport(target)
    return routes


def check_unset_or_positive(value: object) -> int | None:
    if value == "":
        return None  # unset: the [limits] value (as `config show` prints it)
    return int(_integer(1)(value))


def check_nonempty_string(value: object) -> str:
    text = _string(value)
    if not text:
        raise ValueError("must not be empty")
    return text
