"""Where outbound mail goes: transport map, smarthost or MX records.

Contract:
- `Router(config.outbound, resolver)`; `await router.route(domain)` returns a
  `Route`: the hops (`Hop`: name, IP address, port) to try in order, the
  TLS policy and whether to authenticate, plus a `key` naming the
  destination (used to group deliveries and limit connections per
  destination).  It raises `RouteError` carrying our own SMTP-shaped reply:
  a 5xx means the domain can never receive mail (bounce), a 4xx that the
  lookup failed for now (defer).
- Precedence (like Postfix): a `[outbound.transport]` entry for the exact
  domain, then `[outbound] smarthost`, then DNS.  An address-literal domain
  (``[192.0.2.1]``) goes straight to that address.
- DNS (RFC 5321 §5.1, RFC 7505, via dnspython's asyncio resolver, against
  `[outbound] resolver` when set, else /etc/resolv.conf):
  * MX records by preference, hosts of equal preference in random order;
    each host's A then AAAA addresses (IPv4 first); at most `MAX_HOPS`
    addresses in all;
  * no MX records (the name exists) → the implicit MX: the domain's own
    A/AAAA addresses;
  * a null MX (a single MX "." of preference 0, RFC 7505) → 556 5.1.10;
    "." entries mixed with real ones are ignored;
  * NXDOMAIN → 550 5.1.2; MX hosts (or the implicit MX) without any
    address → 550 5.4.4 (RFC 5321 §5.1: an unusable MX is an error);
  * SERVFAIL, REFUSED, timeouts → 451 4.4.3 (a DNS problem never bounces).
  The transport and smarthost targets may be names: they are resolved the
  same way (A/AAAA only).
- ETRN domains (RFC 1985): `await router.etrn_route(domain, target,
  own_names)` is the route of a hosted ETRN domain's mail, whatever the
  transport map or smarthost say: `target` (``host[:port]`` from the
  domain's configuration, the port defaulting to `[outbound] port`), or with
  ``""`` the domain's MX hosts *better than this provider* (preference below
  that of any MX host named in `own_names`; none listed: all of them, like
  Postfix's rule for a backup MX).  Its errors are always 4xx (451 4.4.4 when
  no MX host is better than us): held mail is never bounced for a route.
- TLS policy: `TLSPolicy.ENCRYPT` (STARTTLS required) for a domain in
  `require_tls_domains` and for a smarthost with ``smarthost_tls =
  "starttls"``; `IMPLICIT` for ``"implicit"``; `NONE` for a smarthost with
  ``"none"``; otherwise `MAY` (opportunistic STARTTLS).
- No loop detection: an MX pointing back at this host is delivered to like
  any other (the tests point every destination at 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from fermoposta.config import OutboundConfig
from fermoposta.smtp.reply import Reply

__all__ = [
    "DNSNotFoundError",
    "DNSResolver",
    "DNSTemporaryError",
    "Hop",
    "MXResolver",
    "Route",
    "RouteError",
    "Router",
    "TLSPolicy",
    "split_host_port",
]

MAX_HOPS = 10  # addresses tried per delivery attempt
DNS_TIMEOUT = 10.0  # seconds for one lookup, all retries included


class TLSPolicy(enum.StrEnum):
    NONE = "none"  # never STARTTLS
    MAY = "may"  # STARTTLS when offered, no certificate check (Postfix "may")
    ENCRYPT = "encrypt"  # STARTTLS required, no certificate check (Postfix "encrypt")
    IMPLICIT = "implicit"  # TLS from the first byte (RFC 8314), no certificate check


@dataclass(frozen=True, slots=True)
class Hop:
    name: str  # host name (for logs, Remote-MTA, SNI) or the address itself
    ip: str
    port: int

    def __str__(self) -> str:  # Postfix's relay=host[ip]:port
        return f"{self.name}[{self.ip}]:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    key: str  # the destination, e.g. "mx:example.net", "smarthost:relay.example:587"
    kind: str  # "transport" | "smarthost" | "mx" | "literal"
    hops: tuple[Hop, ...]
    tls: TLSPolicy
    auth: bool = False  # AUTH at this hop (the smarthost with credentials)
    domains: frozenset[str] = field(default_factory=frozenset)


class RouteError(Exception):
    """No usable route now (4xx reply) or ever (5xx reply)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class DNSTemporaryError(Exception):
    """The DNS could not answer now (SERVFAIL, REFUSED, timeout)."""


class DNSNotFoundError(Exception):
    """NXDOMAIN: the name does not exist."""


class MXResolver(Protocol):
    """The DNS lookups the router needs (injectable for tests)."""

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """(preference, host) pairs; [] if the name exists without MX records.
        A host "." is a null MX.  Raises DNSNotFoundError or DNSTemporaryError."""
        ...

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses; [] if none.  Raises DNSTemporaryError."""
        ...


class DNSResolver:
    """`MXResolver` on dnspython's asyncio resolver, with a small TTL cache."""

    def __init__(self, nameserver: tuple[str, int] | None = None,
                 timeout: float = DNS_TIMEOUT) -> None:
        self._nameserver = nameserver
        self._timeout = timeout
        self._cache = dns.resolver.LRUCache(2000)
        self._resolver: dns.asyncresolver.Resolver | None = None

    def _get(self) -> dns.asyncresolver.Resolver:
        """The dnspython resolver, made on first use: a broken /etc/resolv.conf
        then defers mail (DNSTemporaryError) instead of stopping the daemon."""
        if self._resolver is None:
            if self._nameserver is None:
                try:
                    resolver = dns.asyncresolver.Resolver()
                except (dns.exception.DNSException, OSError) as exc:
                    raise DNSTemporaryError(f"no usable DNS configuration: {exc}") from exc
            else:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [self._nameserver[0]]
                resolver.port = self._nameserver[1]
            resolver.lifetime = self._timeout
            resolver.timeout = min(self._timeout, 3.0)
            resolver.cache = self._cache
            self._resolver = resolver
        return self._resolver

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        try:
            return await self._get().resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            raise DNSNotFoundError(f"{name}: no such domain") from exc
        except dns.resolver.NoAnswer:
            return None
        except (dns.resolver.NoNameservers, dns.exception.Timeout,
                dns.resolver.YXDOMAIN, dns.resolver.LifetimeTimeout) as exc:
            raise DNSTemporaryError(f"{rdtype} lookup of {name} failed: {exc}") from exc
        except dns.exception.DNSException as exc:
            raise DNSTemporaryError(f"{rdtype} lookup of {name} failed: {exc}") from exc

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        answer = await self._query(domain, "MX")
        if answer is None:
            return []
        records: list[tuple[int, str]] = []
        for rdata in answer:
            exchange = rdata.exchange
            host = "." if exchange == dns.name.root else exchange.to_text(omit_final_dot=True)
            records.append((int(rdata.preference), host))
        return records

    async def addresses(self, host: str) -> list[str]:
        results = await asyncio.gather(self._query(host, "A"), self._query(host, "AAAA"),
                                       return_exceptions=True)
        found: list[str] = []
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, DNSNotFoundError):
                continue
            if isinstance(result, BaseException):
                errors.append(result)
            elif result is not None:
                found += [rdata.to_text() for rdata in result]
        if not found and errors:
            if any(not isinstance(e, DNSTemporaryError) for e in errors):
                raise errors[0]
            raise DNSTemporaryError(str(errors[0]))
        return found


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (an ETRN target);
    ValueError if malformed (empty host, bad port, a bare IPv6 address)."""
    text = text.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not _is_ip(host) or ":" not in host:
            raise ValueError(f"bad [IPv6] address in {text!r}")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad host:port {text!r}")
            port_text = rest[1:]
    else:
        host, sep, port_text_found = text.rpartition(":")
        if not sep:
            host, port_text = text, None
        elif ":" in host:
            raise ValueError(f"an IPv6 address needs brackets: {text!r}")
        else:
            port_text = port_text_found
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not _is_ip(host):
        labels = host.rstrip(".").split(".")
        if not all(label and len(label) <= 63 and label.replace("-", "").isalnum()
                   and label.isascii() and not label.startswith("-")
                   and not label.endswith("-") for label in labels) or len(host) > 253:
            raise ValueError(f"bad host name {host!r}")
        host = host.lower().rstrip(".")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r}")
    return host, int(port_text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Router:
    """Routes recipient domains; see the module docstring."""

    def __init__(self, config: OutboundConfig, resolver: MXResolver | None = None) -> None:
        self.config = config
        self.resolver: MXResolver = resolver or DNSResolver(config.resolver)
        self._require_tls = frozenset(config.require_tls_domains)

    def _policy(self, domain: str, default: TLSPolicy) -> TLSPolicy:
        if domain in self._require_tls and default in (TLSPolicy.MAY, TLSPolicy.NONE):
            return TLSPolicy.ENCRYPT
        return default

    async def route(self, domain: str) -> Route:
        domain = domain.lower()
        cfg = self.config
        if domain in cfg.transport:
            host, port = cfg.transport[domain]
            tls = self._policy(domain, TLSPolicy.MAY)
            hops = await self._static_hops(host, port)
            return Route(f"transport:{host}:{port}:{tls}", "transport", hops, tls,
                         domains=frozenset({domain}))
        if cfg.smarthost is not None:
            host, port = cfg.smarthost
            default = {"starttls": TLSPolicy.ENCRYPT, "implicit": TLSPolicy.IMPLICIT,
                       "none": TLSPolicy.NONE}[cfg.smarthost_tls]
            tls = self._policy(domain, default)
            hops = await self._static_hops(host, port)
            return Route(f"smarthost:{host}:{port}:{tls}", "smarthost", hops, tls,
                         auth=bool(cfg.smarthost_username), domains=frozenset({domain}))
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1]
            if literal.lower().startswith("ipv6:"):
                literal = literal[5:]
            if not _is_ip(literal):
                raise RouteError(Reply(550, "5.1.2", f"Bad address literal {domain}"))
            tls = self._policy(domain, TLSPolicy.MAY)
            return Route(f"literal:{literal}:{cfg.port}:{tls}", "literal",
                         (Hop(literal, literal, cfg.port),), tls, domains=frozenset({domain}))
        tls = self._policy(domain, TLSPolicy.MAY)
        hops = await self._mx_hops(domain)
        return Route(f"mx:{domain}:{tls}", "mx", hops, tls, domains=frozenset({domain}))

    async def etrn_route(self, domain: str, target: str, own_names: Collection[str] = ()
                         ) -> Route:
        """See the module docstring (ETRN domains)."""
        domain = domain.lower()
        tls = self._policy(domain, TLSPolicy.MAY)
        try:
            if target:
                host, port = split_host_port(target, self.config.port)
                hops = await self._static_hops(host, port)
                return Route(f"etrn:{host}:{port}:{tls}", "etrn", hops, tls,
                             domains=frozenset({domain}))
            hops = await self._mx_hops(domain, better_than=own_names)
        except RouteError as exc:
            if exc.reply.is_permanent:  # defer: the hold lifetime decides
                raise RouteError(Reply(451, "4.4.4", exc.reply.text)) from exc
            raise
        return Route(f"etrn-mx:{domain}:{tls}", "etrn", hops, tls, domains=frozenset({domain}))

    async def _static_hops(self, host: str, port: int) -> tuple[Hop, ...]:
        if _is_ip(host):
            return (Hop(host, host, port),)
        try:
            addresses = await self.resolver.addresses(host)
        except DNSNotFoundError:
            addresses = []
        except DNSTemporaryError as exc:
            raise RouteError(Reply(451, "4.4.3", f"Cannot resolve {host}: {exc}")) from exc
        if not addresses:
            # A configuration problem, not the recipient's: defer, never bounce.
            raise RouteError(Reply(451, "4.4.4", f"No address for relay host {host}"))
        return tuple(Hop(host, ip, port) for ip in addresses[:MAX_HOPS])

    async def _mx_hops(self, domain: str, better_than: Collection[str] = ()
                       ) -> tuple[Hop, ...]:
        try:
            records = await self.resolver.mx(domain)
        except DNSNotFoundError as exc:
            raise RouteError(Reply(550, "5.1.2", f"Host or domain name not found: {domain}"
                                   )) from exc
        except DNSTemporaryError as exc:
            raise RouteError(Reply(451, "4.4.3", f"DNS lookup failed: {exc}")) from exc
        implicit = not records
        if implicit:
            hosts: Sequence[str] = [domain]
        else:
            real = [(pref, host) for pref, host in records if host not in (".", "")]
            if not real:
                raise RouteError(Reply(556, "5.1.10",
                                       f"Domain {domain} does not accept mail (null MX)"))
            ours = {n.lower().rstrip(".") for n in better_than}
            own = [pref for pref, host in real if host.lower().rstrip(".") in ours]
            if own:
                real = [(pref, host) for pref, host in real if pref < min(own)]
                if not real:
                    raise RouteError(Reply(451, "4.4.4", f"No MX host of {domain} is better "
                                           "than this host; set its ETRN host"))
            shuffled = random.sample(real, len(real))
            hosts = [host for _, host in sorted(shuffled, key=lambda r: r[0])]
        hops: list[Hop] = []
        temporary: str | None = None
        for host in hosts:
            try:
                addresses = await self.resolver.addresses(host)
            except DNSNotFoundError:
                continue
            except DNSTemporaryError as exc:
                temporary = str(exc)
                continue
            hops += [Hop(host, ip, self.config.port) for ip in addresses]
            if len(hops) >= MAX_HOPS:
                break
        if hops:
            return tuple(hops[:MAX_HOPS])
        if temporary is not None:
            raise RouteError(Reply(451, "4.4.3", f"DNS lookup failed: {temporary}"))
        what = f"{domain} (no MX, no address)" if implicit else f"the MX hosts of {domain}"
        raise RouteError(Reply(550, "5.4.4", f"No address records for {what}"))
