"""`fermoposta domain check [DOMAIN...]`: does the DNS send each hosted domain's mail here?

Contract:
- For each domain (default: every hosted one, from the store) the MX records
  are looked up with dnspython, at `[outbound] resolver` when it is set, else
  the system's resolver.  "Here" is `hostname` or one of `[mx] mx_names`
  (compared without case and trailing dot).  One line per domain:
  - ``ok``: the most preferred MX hosts (RFC 5321 §5.1: senders try those
    first) include one of ours;
  - ``warning``: one of ours is an MX, but only behind a more preferred host
    that is not ours (mail reaches us only when that one fails);
  - ``FAIL``: no MX of the domain is ours; or it has no MX (senders would use
    its address record, RFC 5321 §5.1) unless the domain itself is ours; or
    a null MX (RFC 7505); or the domain does not exist;
  - ``unknown``: the DNS did not answer (timeout, server failure).
- SPF (RFC 7208): the domain's ``v=spf1`` TXT record is evaluated for each
  address of `hostname` (the addresses this provider sends from), with the
  mechanisms ``ip4``, ``ip6``, ``a``, ``mx``, ``include`` (at most 10 DNS
  lookups, §4.6.4), ``all`` and the ``redirect`` modifier; other mechanisms
  (``exists``, ``ptr``) make the result ``neutral`` (not evaluated).  It is
  reported on its own line (``SPF: pass for 192.0.2.1`` or a warning); it
  never changes the exit code, since a customer's outgoing mail may leave
  through another path.
- Exit: 0 when every domain is ``ok`` or ``warning``; 65 when one is
  ``FAIL``; 75 when none fails but one is ``unknown``; 65 also for a
  DOMAIN argument that is not hosted.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import dns.exception
import dns.resolver

from fermoposta.config import ProviderConfig
from fermoposta.provider.admin import EX_DATAERR, EX_OK, EX_TEMPFAIL, DataError, guarded, safe
from fermoposta.smtp.command import normalize_domain
from fermoposta.store.base import Directory

__all__ = ["check_domain", "domain_check", "evaluate_spf"]

MAX_SPF_LOOKUPS = 10  # RFC 7208 §4.6.4
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class _Unknown(Exception):
    """The DNS did not answer."""


@dataclass(frozen=True, slots=True)
class DomainResult:
    domain: str
    status: str  # "ok" | "warning" | "FAIL" | "unknown"
    detail: str
    spf: str | None = None  # the SPF line, if one was evaluated


def _resolver(config: ProviderConfig) -> dns.resolver.Resolver:
    if config.outbound.resolver is None:
        resolver = dns.resolver.Resolver()
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [config.outbound.resolver[0]]
        resolver.port = config.outbound.resolver[1]
    resolver.lifetime = 5.0
    resolver.timeout = 3.0
    return resolver


def _name(text: str) -> str:
    return text.rstrip(".").lower()


def _query(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> list[str] | None:
    """The records' texts; [] for NODATA; None for NXDOMAIN; _Unknown on no answer."""
    try:
        answer = resolver.resolve(name, rdtype, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return None
    except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.YXDOMAIN) as exc:
        raise _Unknown(f"{rdtype} {name}: {exc}") from exc
    return [rr.to_text() for rr in answer]


def _addresses(resolver: dns.resolver.Resolver, name: str) -> list[_Address]:
    found: list[_Address] = []
    for rdtype in ("A", "AAAA"):
        for text in _query(resolver, name, rdtype) or []:
            found.append(ipaddress.ip_address(text))
    return found


def check_domain(domain: str, ours: set[str], resolver: dns.resolver.Resolver) -> DomainResult:
    """The MX verdict for `domain`; see the module docstring."""
    try:
        records = _query(resolver, domain, "MX")
    except _Unknown as exc:
        return DomainResult(domain, "unknown", f"no answer from the DNS ({exc})")
    if records is None:
        return DomainResult(domain, "FAIL", "the domain does not exist in the DNS (NXDOMAIN)")
    mx: list[tuple[int, str]] = []
    for text in records:
        preference, _, host = text.partition(" ")
        mx.append((int(preference), _name(host)))
    if not mx:
        if domain in ours:
            return DomainResult(domain, "ok", "no MX; its address record is ours (implicit MX)")
        return DomainResult(domain, "FAIL", "no MX record: senders use the domain's own "
                            "address (RFC 5321 §5.1), not this provider")
    if mx == [(0, "")]:
        return DomainResult(domain, "FAIL", "null MX (RFC 7505): the domain accepts no mail")
    best = min(p for p, _ in mx)
    listed = ", ".join(f"{p} {h}" for p, h in sorted(mx))
    if any(h in ours for p, h in mx if p == best):
        return DomainResult(domain, "ok", f"MX {listed}")
    if any(h in ours for _, h in mx):
        return DomainResult(domain, "warning", f"MX {listed}: ours only behind a more "
                            "preferred host that is not ours")
    return DomainResult(domain, "FAIL", f"MX {listed}: none is this provider "
                        f"({', '.join(sorted(ours))})")


def evaluate_spf(domain: str, address: _Address, resolver: dns.resolver.Resolver,
                 lookups: list[int] | None = None) -> str:
    """The SPF result for mail from `address` for `domain`: pass, fail,
    softfail, neutral, none or permerror (RFC 7208 §2.6); _Unknown when the
    DNS does not answer."""
    lookups = lookups if lookups is not None else [0]
    texts = [t.replace('" "', "").strip('"') for t in _query(resolver, domain, "TXT") or []]
    records = [t for t in texts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]
    if not records:
        return "none"
    if len(records) > 1:
        return "permerror"
    qualifiers = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
    redirect: str | None = None
    for term in records[0].split()[1:]:
        if term.lower().startswith("redirect="):
            redirect = term.split("=", 1)[1]
            continue
        if "=" in term:
            continue  # another modifier (exp=): no effect on the result
        result = qualifiers.get(term[0], "pass")
        mechanism = term[1:] if term[0] in qualifiers else term
        name, _, argument = mechanism.partition(":")
        name, _, cidr = name.partition("/")
        argument, _, arg_cidr = argument.partition("/")
        cidr = cidr or arg_cidr
        name = name.lower()
        if name == "all":
            return result
        if name in ("ip4", "ip6"):
            try:
                network = ipaddress.ip_network(argument + (f"/{cidr}" if cidr else ""),
                                               strict=False)
            except ValueError:
                return "permerror"
            if address.version == network.version and address in network:
                return result
            continue
        if name in ("a", "mx", "include"):
            lookups[0] += 1
            if lookups[0] > MAX_SPF_LOOKUPS:
                return "permerror"
        if name == "include":
            if evaluate_spf(argument, address, resolver, lookups) == "pass":
                return result
            continue
        if name in ("a", "mx"):
            target = argument or domain
            hosts = [target] if name == "a" else [
                _name(t.partition(" ")[2]) for t in _query(resolver, target, "MX") or []]
            for host in hosts:
                for found in _addresses(resolver, host):
                    prefix = int(cidr) if cidr and found.version == 4 else None
                    if found == address or (prefix is not None and address.version == 4
                                            and address in ipaddress.ip_network(
                                                f"{found}/{prefix}", strict=False)):
                        return result
            continue
        return "neutral"  # exists, ptr: not evaluated here
    if redirect:
        lookups[0] += 1
        if lookups[0] > MAX_SPF_LOOKUPS:
            return "permerror"
        return evaluate_spf(redirect, address, resolver, lookups)
    return "neutral"


def _spf_line(domain: str, addresses: Sequence[_Address],
              resolver: dns.resolver.Resolver) -> str:
    if not addresses:
        return "SPF: not checked (no address for this provider's hostname)"
    parts = []
    for address in addresses:
        try:
            parts.append(f"{evaluate_spf(domain, address, resolver)} for {address}")
        except _Unknown as exc:
            parts.append(f"unknown for {address} ({exc})")
    allowed = all(p.startswith("pass ") for p in parts)
    return ("SPF: " if allowed else "SPF warning: ") + ", ".join(parts)


@guarded
def domain_check(args: argparse.Namespace, store: Directory) -> int:
    config: ProviderConfig = args.provider_config
    hosted = {d.name for d in store.list_domains()}
    wanted = [normalize_domain(d) for d in args.domains] if args.domains else sorted(hosted)
    unknown = [d for d in wanted if d not in hosted]
    if unknown:
        raise DataError(f"not a hosted domain: {', '.join(unknown)}")
    ours = {_name(config.hostname), *(_name(n) for n in config.mx.mx_names)}
    resolver = _resolver(config)
    try:
        own_addresses = _addresses(resolver, _name(config.hostname))
    except _Unknown:
        own_addresses = []
    statuses = []
    for domain in wanted:
        result = check_domain(domain, ours, resolver)
        statuses.append(result.status)
        print(safe(f"{domain}: {result.status}: {result.detail}"))
        print(safe(f"  {_spf_line(domain, own_addresses, resolver)}"))
    if not wanted:
        print("no hosted domains")
    if "FAIL" in statuses:
        return EX_DATAERR
    if "unknown" in statuses:
        return EX_TEMPFAIL
    return EX_OK
