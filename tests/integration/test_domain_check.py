"""`fermoposta domain check` (issue 11, item 9) against a real DNS server
(dnsmasq on 127.0.0.1): MX verdicts, SPF results, exit codes."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import dns.resolver
import pytest

from conftest import add_customer, write_config
from dnsmasq import dnsmasq_server
from fermoposta.cli import main
from fermoposta.config import load_provider_config
from fermoposta.provider.dns_check import evaluate_spf
from fermoposta.store import open_store

HOSTNAME = "mx.provider.test"  # conftest's write_config


def _config(tmp_path: Path, resolver: tuple[str, int], extra: str = "") -> Path:
    path = write_config(tmp_path, None, extra=(
        f'[outbound]\nresolver = "{resolver[0]}:{resolver[1]}"\n'
        '[mx]\nmx_names = ["mx2.provider.test"]\n' + extra))
    assert load_provider_config(path).hostname == HOSTNAME
    return path


RECORDS = dict(
    mx=[("good.test", HOSTNAME, 10), ("second.test", "mx2.provider.test", 5),
        ("backup.test", "other.test", 5), ("backup.test", HOSTNAME, 20),
        ("elsewhere.test", "mail.elsewhere.test", 10), ("nullmx.test", ".", 0)],
    hosts={HOSTNAME: "192.0.2.25", "mx2.provider.test": "192.0.2.26",
           "other.test": "198.51.100.1", "mail.elsewhere.test": "198.51.100.2",
           "noaddress.test": "198.51.100.3"},
    txt=[("good.test", "v=spf1 ip4:192.0.2.0/24 -all"),
         ("second.test", "v=spf1 include:spf.provider.test ~all"),
         ("spf.provider.test", "v=spf1 a:mx.provider.test -all"),
         ("backup.test", "v=spf1 -all"),
         ("elsewhere.test", "v=spf1 mx ?all")],
)


@pytest.fixture
def dns_server():
    with dnsmasq_server(**RECORDS) as address:
        yield address


def _hosted(path: Path, domains: tuple[str, ...]) -> None:
    store = open_store(load_provider_config(path).data_dir)
    try:
        add_customer(store, "acme", domains)
    finally:
        store.close()


def test_verdicts_and_spf_per_domain(tmp_path: Path, dns_server, capsys) -> None:
    path = _config(tmp_path, dns_server)
    _hosted(path, ("good.test", "second.test", "backup.test"))
    assert main(["-c", str(path), "domain", "check"]) == 0  # ok, ok, warning
    out = capsys.readouterr().out
    assert "good.test: ok: MX 10 mx.provider.test" in out
    assert "second.test: ok: MX 5 mx2.provider.test" in out  # an mx_names entry
    assert "backup.test: warning: MX 5 other.test, 20 mx.provider.test" in out
    lines = out.splitlines()
    spf = {lines[i].split(":")[0]: lines[i + 1].strip() for i in range(0, len(lines), 2)}
    assert spf["good.test"] == "SPF: pass for 192.0.2.25"
    assert spf["second.test"] == "SPF: pass for 192.0.2.25"  # include: then a:
    assert spf["backup.test"] == "SPF warning: fail for 192.0.2.25"


@pytest.mark.parametrize("domain, verdict", [
    ("elsewhere.test", "FAIL: MX 10 mail.elsewhere.test: none is this provider"),
    ("nullmx.test", "FAIL: null MX (RFC 7505)"),
    ("noaddress.test", "FAIL: no MX record"),
    ("missing.test", "FAIL: the domain does not exist"),
])
def test_a_domain_whose_mail_would_not_reach_us_fails(tmp_path: Path, dns_server, capsys,
                                                      domain: str, verdict: str) -> None:
    path = _config(tmp_path, dns_server)
    _hosted(path, ("good.test", domain))
    assert main(["-c", str(path), "domain", "check"]) == 65
    out = capsys.readouterr().out
    assert f"{domain}: {verdict}" in out and "good.test: ok" in out


def test_one_domain_an_unhosted_one_and_no_dns(tmp_path: Path, dns_server, capsys) -> None:
    path = _config(tmp_path, dns_server)
    _hosted(path, ("good.test", "elsewhere.test"))
    assert main(["-c", str(path), "domain", "check", "good.test"]) == 0
    assert "elsewhere.test" not in capsys.readouterr().out
    assert main(["-c", str(path), "domain", "check", "other.example"]) == 65
    assert "not a hosted domain: other.example" in capsys.readouterr().err
    # A resolver that does not answer: unknown, exit 75 (try again), never "ok".
    from peers import free_port

    (tmp_path / "silent").mkdir()
    silent = _config(tmp_path / "silent", ("127.0.0.1", free_port()))
    _hosted(silent, ("good.test",))
    assert main(["-c", str(silent), "domain", "check"]) == 75
    assert "good.test: unknown: no answer from the DNS" in capsys.readouterr().out


def test_spf_evaluation_rules(dns_server) -> None:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server[0]]
    resolver.port = dns_server[1]
    ip = ipaddress.ip_address
    assert evaluate_spf("good.test", ip("192.0.2.200"), resolver) == "pass"
    assert evaluate_spf("good.test", ip("203.0.113.9"), resolver) == "fail"
    assert evaluate_spf("second.test", ip("192.0.2.26"), resolver) == "softfail"
    assert evaluate_spf("elsewhere.test", ip("198.51.100.2"), resolver) == "pass"  # mx
    assert evaluate_spf("elsewhere.test", ip("192.0.2.25"), resolver) == "neutral"  # ?all
    assert evaluate_spf("nullmx.test", ip("192.0.2.25"), resolver) == "none"
