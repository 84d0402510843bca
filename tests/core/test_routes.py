"""Outbound routing (transport map, smarthost, MX/implicit MX/null MX, DNS
errors) with a fake resolver, and the retry schedule."""

from __future__ import annotations

import pytest

from fermoposta.config import OutboundConfig
from fermoposta.provider.outbound import retry_delay
from fermoposta.provider.resolver import (
    DNSNotFoundError,
    DNSTemporaryError,
    Hop,
    RouteError,
    Router,
    TLSPolicy,
)


class FakeDNS:
    def __init__(self, mx: dict[str, list[tuple[int, str]] | Exception],
                 hosts: dict[str, list[str] | Exception]) -> None:
        self._mx = mx
        self._hosts = hosts

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        found = self._mx.get(domain, DNSNotFoundError(domain))
        if isinstance(found, Exception):
            raise found
        return found

    async def addresses(self, host: str) -> list[str]:
        found = self._hosts.get(host, [])
        if isinstance(found, Exception):
            raise found
        return found


DNS = FakeDNS(
    mx={
        "multi.test": [(20, "b.multi.test"), (10, "a.multi.test"), (30, "gone.multi.test")],
        "implicit.test": [],
        "noaddr.test": [],
        "null.test": [(0, ".")],
        "mixed.test": [(0, "."), (10, "a.multi.test")],
        "broken.test": DNSTemporaryError("SERVFAIL"),
        "flaky.test": [(10, "flaky-host.test"), (20, "a.multi.test")],
        "allflaky.test": [(10, "flaky-host.test")],
    },
    hosts={
        "a.multi.test": ["192.0.2.1", "2001:db8::1"],
        "b.multi.test": ["192.0.2.2"],
        "implicit.test": ["192.0.2.3"],
        "flaky-host.test": DNSTemporaryError("timeout"),
        "relay.example": ["192.0.2.9"],
    },
)


async def route_error(router: Router, domain: str) -> str:
    with pytest.raises(RouteError) as info:
        await router.route(domain)
    return str(info.value.reply)


async def test_mx_routes() -> None:
    router = Router(OutboundConfig(port=2525), DNS)
    route = await router.route("Multi.TEST")
    assert route.kind == "mx" and route.tls == TLSPolicy.MAY and route.key == "mx:multi.test:may"
    assert route.hops == (Hop("a.multi.test", "192.0.2.1", 2525),
                          Hop("a.multi.test", "2001:db8::1", 2525),
                          Hop("b.multi.test", "192.0.2.2", 2525))  # gone.multi.test: no address
    assert str(route.hops[0]) == "a.multi.test[192.0.2.1]:2525"
    implicit = await router.route("implicit.test")
    assert implicit.hops == (Hop("implicit.test", "192.0.2.3", 2525),)
    mixed = await router.route("mixed.test")  # "." among real MX records is ignored
    assert [h.name for h in mixed.hops] == ["a.multi.test", "a.multi.test"]
    flaky = await router.route("flaky.test")  # one host's lookup failed, another works
    assert [h.ip for h in flaky.hops] == ["192.0.2.1", "2001:db8::1"]


async def test_route_errors() -> None:
    router = Router(OutboundConfig(), DNS)
    assert (await route_error(router, "null.test")).startswith("556 5.1.10")
    assert (await route_error(router, "nx.test")).startswith("550 5.1.2")
    assert (await route_error(router, "noaddr.test")).startswith("550 5.4.4")
    assert (await route_error(router, "broken.test")).startswith("451 4.4.3")
    assert (await route_error(router, "allflaky.test")).startswith("451 4.4.3")
    assert (await route_error(router, "[not-an-ip]")).startswith("550 5.1.2")


async def test_transport_smarthost_literal_and_tls_policies() -> None:
    router = Router(OutboundConfig(
        smarthost=("relay.example", 587), smarthost_username="u",
        transport={"mapped.test": ("127.0.0.1", 2626)},
        require_tls_domains=("mapped.test", "far.test")), DNS)
    mapped = await router.route("mapped.test")
    assert (mapped.kind, mapped.hops, mapped.tls) == (
        "transport", (Hop("127.0.0.1", "127.0.0.1", 2626),), TLSPolicy.ENCRYPT)
    far = await router.route("far.test")
    assert (far.kind, far.hops, far.tls, far.auth) == (
        "smarthost", (Hop("relay.example", "192.0.2.9", 587),), TLSPolicy.ENCRYPT, True)
    other = await router.route("other.test")
    assert other.key == far.key  # one destination: shared connections and limits
    plain = Router(OutboundConfig(smarthost=("192.0.2.7", 25), smarthost_tls="none"), DNS)
    assert (await plain.route("x.test")).tls == TLSPolicy.NONE
    implicit = Router(OutboundConfig(smarthost=("192.0.2.7", 465), smarthost_tls="implicit"),
                      DNS)
    assert (await implicit.route("x.test")).tls == TLSPolicy.IMPLICIT
    literal = await Router(OutboundConfig(port=2525), DNS).route("[192.0.2.44]")
    assert literal.hops == (Hop("192.0.2.44", "192.0.2.44", 2525),)
    missing = Router(OutboundConfig(smarthost=("nowhere.example", 25)), DNS)
    # A relay host without an address is our configuration problem: defer.
    assert (await route_error(missing, "x.test")).startswith("451 4.4.4")


def test_retry_delay_doubles_up_to_the_maximum_with_jitter() -> None:
    def exact(low: float, high: float) -> float:
        return 1.0

    assert [retry_delay(n, 300, 3600, exact) for n in range(6)] == [
        300, 600, 1200, 2400, 3600, 3600]
    assert retry_delay(1000, 300, 3600, exact) == 3600
    for n in range(8):
        delay = retry_delay(n, 300, 3600)
        base = min(3600, 300 * 2**n)
        assert 0.8 * base <= delay <= 1.2 * base


# --- ETRN domains (RFC 1985) --------------------------------------------------------------

ETRN_DNS = FakeDNS(
    mx={
        # The customer is the primary MX, we are the backup.
        "cust.test": [(10, "mail.cust.test"), (20, "MX.Provider.Test."), (30, "worse.test")],
        "onlyus.test": [(10, "mx.provider.test")],
        "alias.test": [(5, "mail.cust.test"), (10, "mx1.provider.test")],
        "gone.test": DNSNotFoundError("gone.test"),
    },
    hosts={"mail.cust.test": ["192.0.2.20"], "worse.test": ["192.0.2.30"],
           "mx.provider.test": ["192.0.2.99"], "mx1.provider.test": ["192.0.2.98"],
           "relay.example": ["192.0.2.9"], "target.cust.test": ["192.0.2.21"]},
)
OURS = ("mx.provider.test", "mx1.provider.test")


async def test_etrn_route_to_the_configured_target_wins_over_transport_and_smarthost() -> None:
    config = OutboundConfig(smarthost=("relay.example", 587), port=2525,
                            transport={"cust.test": ("relay.example", 25)})
    router = Router(config, ETRN_DNS)
    route = await router.etrn_route("cust.test", "target.cust.test:2626", OURS)
    assert (route.kind, route.hops, route.tls) == (
        "etrn", (Hop("target.cust.test", "192.0.2.21", 2626),), TLSPolicy.MAY)
    route = await router.etrn_route("cust.test", "192.0.2.50", OURS)
    assert route.hops == (Hop("192.0.2.50", "192.0.2.50", 2525),)  # [outbound] port
    route = await router.etrn_route("cust.test", "[2001:db8::5]:26", OURS)
    assert route.hops == (Hop("2001:db8::5", "2001:db8::5", 26),)
    assert (await router.route("cust.test")).kind == "transport"  # others unchanged


async def test_etrn_route_by_mx_only_to_hosts_better_than_us() -> None:
    router = Router(OutboundConfig(port=25), ETRN_DNS)
    route = await router.etrn_route("cust.test", "", OURS)
    assert [h.ip for h in route.hops] == ["192.0.2.20"]  # not us, not the worse one
    route = await router.etrn_route("alias.test", "", OURS)  # our other name, from mx_names
    assert [h.ip for h in route.hops] == ["192.0.2.20"]
    with pytest.raises(RouteError) as err:
        await router.etrn_route("onlyus.test", "", OURS)
    assert (err.value.reply.code, err.value.reply.enhanced) == (451, "4.4.4")
    # DNS saying the domain does not exist defers (the hold lifetime decides), never bounces.
    with pytest.raises(RouteError) as err:
        await router.etrn_route("gone.test", "", OURS)
    assert err.value.reply.code == 451
    # A target without addresses defers too.
    with pytest.raises(RouteError) as err:
        await router.etrn_route("cust.test", "nowhere.cust.test", OURS)
    assert err.value.reply.code == 451


@pytest.mark.parametrize(("text", "expected"), [
    ("host.example", ("host.example", 25)), ("Host.Example.:2525", ("host.example", 2525)),
    ("192.0.2.1:26", ("192.0.2.1", 26)), ("[2001:db8::1]", ("2001:db8::1", 25)),
    ("[2001:db8::1]:26", ("2001:db8::1", 26)),
])
def test_split_host_port(text: str, expected: tuple[str, int]) -> None:
    from fermoposta.provider.resolver import split_host_port
    assert split_host_port(text, 25) == expected


@pytest.mark.parametrize("text", ["", ":25", "h:0", "h:65536", "h:x", "2001:db8::1", "[h]:25",
                                  "[2001:db8::1]x", "bad_host", "-h.example", "a..b"])
def test_split_host_port_refuses(text: str) -> None:
    from fermoposta.provider.resolver import split_host_port
    with pytest.raises(ValueError):
        split_host_port(text, 25)
