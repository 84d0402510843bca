"""Rejects by listener and reason, the per-domain and per-account gauges
(off by default), and the structured fields of the JSON reject lines: the
endpoint scraped with prometheus_client's parser after real traffic."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_metrics import scrape, value

from conftest import PASSWORD, write_config
from fermoposta.config import ConfigError, load_provider_config
from fermoposta.ops import metrics
from fermoposta.ops.log import setup_logging
from fermoposta.store.base import Domain
from peers import free_port
from support.dialog import Dialog, send_mail
from test_odmr import authed

REJECTS = "fermoposta_smtp_rejects_total"
BODY = b"Subject: r\r\n\r\nx\r\n"


def metrics_extra(more: str = "") -> str:
    return (f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n{more}'
            '[limits]\nmax_message_size = "2K"\n[submission]\nrate_limit = 1\n')


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The provider's log as `--log-format json` writes it; the logger restored after."""
    loggers = [logging.getLogger(name) for name in ("fermoposta", "psycopg")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    yield stream
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def reject_lines(stream: io.StringIO) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [obj for obj in lines if "reason" in obj and "listener" in obj]


async def submission(p, certs, *, password: str = PASSWORD, code: int = 235) -> Dialog:
    d = await Dialog.connect(*p.submission)
    await d.expect(220)
    await d.cmd("EHLO mail.example.org", 250)
    await d.starttls(certs.client_context())
    await d.cmd("EHLO mail.example.org", 250)
    await d.auth_plain("acme", password, code)
    return d


async def test_rejects_by_reason_and_listener(provider_factory, certs, json_log):
    p = await provider_factory(extra=metrics_extra(), odmr_tls=True)
    p.store.update_domain(Domain(name="example.org", account="acme",
                                 valid_recipients=frozenset({"bob"})))
    p.store.update_domain(Domain(name="other.test", account="other", max_messages=0))
    address = p.provider.addresses["metrics"]
    before = await asyncio.to_thread(scrape, address)

    mx = await Dialog.connect(*p.mx)
    await mx.expect(220)
    await mx.cmd("EHLO client.test", 250)
    await mx.cmd("MAIL FROM:<a@sender.test> SIZE=999999", 552)  # message_size at MAIL
    await mx.cmd("MAIL FROM:<a@sender.test>", 250)
    await mx.cmd("RCPT TO:<eve@nowhere.test>", 550)  # relay_denied
    await mx.cmd("RCPT TO:<eve@example.org>", 550)  # unknown_user
    await mx.cmd("RCPT TO:<x@other.test>", 452)  # quota
    await mx.cmd("RCPT TO:<bob@example.org>", 250)
    await mx.cmd("DATA", 354)
    await mx.raw(b"Subject: s\r\n\r\nbare\nLF\r\n.\r\n")
    await mx.expect(550)  # smuggling
    await mx.cmd("MAIL FROM:<a@sender.test>", 250)
    await mx.cmd("RCPT TO:<bob@example.org>", 250)
    await mx.cmd("DATA", 354)
    await mx.raw(b"Subject: big\r\n\r\n" + (b"z" * 70 + b"\r\n") * 60 + b".\r\n")  # > 2K
    await mx.expect(552)  # message_size at the end of DATA
    await mx.cmd("QUIT", 221)
    await mx.close()

    d = await submission(p, certs)
    await d.cmd("MAIL FROM:<eve@elsewhere.test>", 553)  # other: not the account's sender
    await d.cmd("MAIL FROM:<bob@example.org>", 250)
    await d.cmd("RCPT TO:<friend@elsewhere.test>", 250)
    await d.cmd("DATA", 354)
    await d.raw(BODY + b".\r\n")
    await d.expect(250)
    await d.cmd("MAIL FROM:<bob@example.org>", 450)  # rate_limit (1 per window)
    await d.close()
    bad = await submission(p, certs, password="wrong", code=535)  # auth_failed, submission
    await bad.close()

    odmr = await Dialog.connect(*p.odmr)
    await odmr.expect(220)
    await odmr.cmd("EHLO x.test", 250)
    await odmr.starttls(certs.client_context())
    await odmr.cmd("EHLO x.test", 250)
    await odmr.auth_plain("acme", "wrong", 535)  # auth_failed, odmr
    await odmr.close()
    assert p.odmr_tls is not None
    implicit = await Dialog.connect(*p.odmr_tls, ssl_context=certs.client_context())
    await implicit.expect(220)
    await implicit.cmd("EHLO x.test", 250)
    await implicit.auth_plain("acme", "wrong", 535)  # auth_failed, odmr_tls
    await implicit.auth_plain("acme", "wrong", 535)
    await implicit.close()
    await asyncio.sleep(0.2)
    after = await asyncio.to_thread(scrape, address)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    expected = {
        ("mx", "message_size"): 2, ("mx", "relay_denied"): 1, ("mx", "unknown_user"): 1,
        ("mx", "quota"): 1, ("mx", "smuggling"): 1, ("submission", "other"): 1,
        ("submission", "rate_limit"): 1, ("submission", "auth_failed"): 1,
        ("odmr", "auth_failed"): 1, ("odmr_tls", "auth_failed"): 2,
    }
    seen = {}
    for (name, labels) in after:
        if name == REJECTS:
            label = dict(labels)
            assert label["reason"] in metrics.REJECT_REASONS
            d_value = delta(REJECTS, **label)
            if d_value:
                seen[(label["listener"], label["reason"])] = d_value
    assert seen == expected
    # The same 535s as fermoposta_auth_failures_total, split by listener.
    assert delta("fermoposta_auth_failures_total", mechanism="PLAIN") == 4

    # Each MX and submission reject line carries the structured fields.
    by_reason = {}
    for obj in reject_lines(json_log):
        for key in ("reason", "client", "sender", "recipient"):
            assert key in obj, obj
        by_reason.setdefault((obj["listener"], obj["reason"]), []).append(obj)
    relay = by_reason[("mx", "relay_denied")][0]
    assert relay["client"] == "client.test[127.0.0.1]"
    assert relay["sender"] == "a@sender.test" and relay["recipient"] == "eve@nowhere.test"
    assert relay["stage"] == "RCPT" and str(relay["reply"]).startswith("550 5.7.1")
    assert relay["component"] == "mx" and relay["message"].startswith("NOQUEUE: reject: RCPT")
    assert by_reason[("mx", "unknown_user")][0]["recipient"] == "eve@example.org"
    assert by_reason[("mx", "quota")][0]["recipient"] == "x@other.test"
    smuggled = by_reason[("mx", "smuggling")][0]
    assert smuggled["stage"] == "DATA" and smuggled["recipient"] == "bob@example.org"
    sizes = by_reason[("mx", "message_size")]
    assert [s["stage"] for s in sizes] == ["MAIL", "DATA"]
    assert sizes[0]["recipient"] is None and sizes[0]["size"] == 999999
    rate = by_reason[("submission", "rate_limit")][0]
    assert rate["sender"] == "bob@example.org" and rate["sasl_username"] == "acme"
    assert rate["message"].endswith("rate limit for acme")  # the documented line, unchanged
    foreign = by_reason[("submission", "other")][0]
    assert foreign["sender"] == "eve@elsewhere.test"
    assert foreign["message"].endswith("acme may not send as <eve@elsewhere.test>")


async def test_per_domain_and_account_series_off_by_default(provider_factory, certs):
    p = await provider_factory(extra=metrics_extra())
    code, _ = await send_mail(*p.mx, "a@sender.test", ["bob@example.org"], BODY)
    assert code == 250
    d = await authed(p, certs)
    await d.cmd("ATRN other.test", 450)
    await d.close()
    after = await asyncio.to_thread(scrape, p.provider.addresses["metrics"])
    names = {name for name, _ in after}
    assert "fermoposta_queue_messages" in names  # the per-state gauges are there
    assert not {n for n in names if n.startswith("fermoposta_domain_")}
    assert "fermoposta_account_last_atrn_timestamp_seconds" not in names
    for _, labels in after:
        assert "domain" not in dict(labels) and "account" not in dict(labels)


async def test_per_domain_and_account_series_with_the_switches(provider_factory, certs):
    p = await provider_factory(extra=metrics_extra("per_domain = true\nper_account = true\n"))
    address = p.provider.addresses["metrics"]
    first = await asyncio.to_thread(scrape, address)
    # Nothing held yet, no ATRN yet: no series at all.
    assert not [k for k in first if k[0].startswith("fermoposta_domain_")]
    assert not [k for k in first if k[0] == "fermoposta_account_last_atrn_timestamp_seconds"]

    for _ in range(2):
        code, _ = await send_mail(*p.mx, "a@sender.test", ["bob@example.org"], BODY)
        assert code == 250
    code, _ = await send_mail(*p.mx, "a@sender.test", ["x@other.test"], BODY + b"more\r\n")
    assert code == 250
    await asyncio.sleep(1.1)
    started = time.time()
    d = await authed(p, certs)
    await d.cmd("ATRN other.test", 450)  # refused: not recorded
    await d.cmd("QUIT", 221)
    await d.close()
    o = await Dialog.connect(*p.odmr)
    await o.expect(220)
    await o.cmd("EHLO x.test", 250)
    await o.starttls(certs.client_context())
    await o.cmd("EHLO x.test", 250)
    await o.auth_plain("other", PASSWORD)
    await o.cmd("ATRN other.test", 250)  # accepted; then dropped: the mail stays held
    await o.close()
    await asyncio.sleep(0.3)
    after = await asyncio.to_thread(scrape, address)

    held = {dict(labels)["domain"]: v for (name, labels), v in after.items()
            if name == "fermoposta_domain_held_messages"}
    assert held == {"example.org": 2, "other.test": 1}
    sizes = {dict(labels)["domain"]: v for (name, labels), v in after.items()
             if name == "fermoposta_domain_held_bytes"}
    assert sizes["other.test"] > 0 and sizes["example.org"] > sizes["other.test"]
    assert value(after, "fermoposta_domain_held_oldest_age_seconds", domain="example.org") >= 1
    last = {dict(labels)["account"]: v for (name, labels), v in after.items()
            if name == "fermoposta_account_last_atrn_timestamp_seconds"}
    assert list(last) == ["other"]  # acme's only ATRN was refused
    assert started <= last["other"] <= time.time()


def test_metrics_switches_in_the_config(tmp_path: Path) -> None:
    config = load_provider_config(write_config(tmp_path, None))
    assert config.metrics.per_domain is False and config.metrics.per_account is False
    config = load_provider_config(write_config(
        tmp_path, None, extra="[metrics]\nper_domain = true\nper_account = true\n"))
    assert config.metrics.per_domain is True and config.metrics.per_account is True
    with pytest.raises(ConfigError, match=r"per_domain.*expected true or false"):
        load_provider_config(write_config(tmp_path, None,
                                          extra='[metrics]\nper_domain = "yes"\n'))


def test_an_unknown_reason_counts_as_other() -> None:
    before = metrics.REJECTS.labels("mx", "other")._value.get()
    metrics.reject("mx", "made-up")
    assert metrics.REJECTS.labels("mx", "other")._value.get() == before + 1
    assert ("mx", "made-up") not in metrics.REJECTS._metrics
    assert metrics.listener_name("odmr", implicit_tls=True) == "odmr_tls"
    assert metrics.listener_name("submission", implicit_tls=True) == "submissions"
    assert metrics.listener_name("submission", implicit_tls=False) == "submission"
    assert metrics.listener_name("mx", implicit_tls=True) == "mx"
