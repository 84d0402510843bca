"""ATRN argument parsing and formatting (RFC 2645 §5.2.1), sans-I/O.

Contract:
- `parse_atrn_domains(arg)` implements the ABNF
      atrn = "ATRN" [SP domain *("," domain)]
      domain = sub-domain 1*("." sub-domain)   ; at least two labels, LDH only
  with bounded leniency: SP/HTAB around list elements is stripped (clients send
  "a.org, b.org"), names are lowercased, ONE trailing dot is dropped and U-labels are
  converted to A-labels (IDNA 2008 / UTS 46) so "bücher.de" == "xn--bcher-kva.de".
  The result is de-duplicated in order; "" gives () (= every domain of the account).
  Anything else raises `SMTPError` 501 5.5.4: empty elements, "_", "*", address
  literals, single-label names, inner whitespace, labels > 63 or names > 253 octets,
  leading/trailing "-", invalid A-labels, more than `max_domains` distinct domains.
- `format_atrn(domains)` renders the customer's command line; it normalises the
  domains the same way and raises ValueError for one that `parse_atrn_domains` would
  reject, so what we send is always what the provider must accept.
No I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from fermoposta.smtp.command import normalize_domain
from fermoposta.smtp.reply import Reply, SMTPError

MAX_ATRN_DOMAINS = 50


def _bad(detail: str) -> SMTPError:
    return SMTPError(Reply(501, "5.5.4", f"Invalid ATRN domain list: {detail}"), detail)


def _normalize(element: str) -> str:
    """One list element to its canonical A-label form; ValueError if outside the ABNF."""
    if not element:
        raise ValueError("empty domain")
    if any(char.isspace() for char in element):
        raise ValueError("whitespace inside a domain")
    if element.startswith("[") or "*" in element or "_" in element:
        raise ValueError("address literals, wildcards and '_' are not domains")
    name = normalize_domain(element)  # lowercase, one trailing dot, IDNA, LDH, lengths
    if "." not in name:  # RFC 2645 §5.2.1: domain = sub-domain 1*("." sub-domain)
        raise ValueError("single-label name")
    return name


def parse_atrn_domains(arg: str, max_domains: int = MAX_ATRN_DOMAINS) -> tuple[str, ...]:
    """Parse the ATRN argument into normalised, de-duplicated domains."""
    if not arg.strip(" \t"):
        return ()
    seen: dict[str, None] = {}
    for raw in arg.split(","):
        element = raw.strip(" \t")
        try:
            name = _normalize(element)
        except ValueError as exc:
            raise _bad(f"{element[:80]!r}: {exc}") from None
        seen[name] = None
        if len(seen) > max_domains:
            raise _bad(f"more than {max_domains} domains")
    return tuple(seen)


def format_atrn(domains: Sequence[str]) -> bytes:
    """`b"ATRN\\r\\n"` or `b"ATRN a.org,b.org\\r\\n"` (RFC 2645 §5.2.1, no spaces)."""
    if isinstance(domains, str):
        raise TypeError("format_atrn() takes a sequence of domains, not a string")
    if not domains:
        return b"ATRN\r\n"
    names = dict.fromkeys(_normalize(domain.strip(" \t")) for domain in domains)
    return b"ATRN " + ",".join(names).encode("ascii") + b"\r\n"
