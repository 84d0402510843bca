"""The Prometheus endpoint, scraped and parsed with prometheus_client's parser
after real traffic."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from support.dialog import Dialog, send_mail
from test_odmr import authed


def scrape(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_after_traffic(provider_factory, certs):
    from peers import free_port

    p = await provider_factory(extra=f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n')
    address = p.provider.addresses["metrics"]
    before = await asyncio.to_thread(scrape, address)
    body = b"Subject: m\r\n\r\nx\r\n"
    code, _ = await send_mail(*p.mx, "a@sender.test", ["bob@example.org"], body)
    assert code == 250
    d = await authed(p, certs)
    await d.cmd("ATRN other.test", 450)
    await d.cmd("ATRN example.org", 250)  # then drop: the drain aborts, mail stays
    await d.close()
    bad = await Dialog.connect(*p.odmr)
    await bad.expect(220)
    await bad.cmd("EHLO x.test", 250)
    await bad.starttls(certs.client_context())
    await bad.cmd("EHLO x.test", 250)
    await bad.auth_plain("acme", "wrong", 535)
    await bad.close()
    await asyncio.sleep(0.2)
    after = await asyncio.to_thread(scrape, address)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(after, "fermoposta_build_info", version=__import__("fermoposta").__version__) == 1
    assert value(after, "fermoposta_node_info", node=p.provider.store.node, engine="sqlite") == 1
    assert len([k for k in after if k[0] == "fermoposta_node_info"]) == 1
    assert delta("fermoposta_messages_received_total", listener="mx") == 1
    assert delta("fermoposta_connections_total", listener="mx") == 1
    assert delta("fermoposta_connections_total", listener="odmr") == 2
    assert delta("fermoposta_atrn_total", result="refused") == 1
    assert delta("fermoposta_atrn_total", result="reversed") == 1
    assert delta("fermoposta_auth_failures_total", mechanism="PLAIN") == 1
    assert delta("fermoposta_session_duration_seconds_count", listener="mx") == 1
    # The queue's shape at scrape time: the message is still held.
    assert value(after, "fermoposta_queue_messages", state="held") == 1
    assert value(after, "fermoposta_queue_bytes", state="held") > 0
    assert value(after, "fermoposta_queue_oldest_age_seconds", state="held") >= 0
    assert value(after, "fermoposta_queue_messages", state="outbound") == 0
    # No label carries an address, a domain or an account.
    for (_, labels) in after:
        for _, label_value in labels:
            assert "@" not in label_value and "example.org" not in label_value
