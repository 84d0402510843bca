"""`fermoposta customer run` as a process: pulls at start, SIGUSR1 pulls now,
a second daemon exits 73, SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

from prometheus_client.parser import text_string_to_metric_families

from conftest import PASSWORD, free_port
from support.customer_config import write_customer_config
from support.dialog import send_mail


def scrape(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return False


async def test_daemon_schedule_trigger_and_stop(provider, certs, tmp_path):
    site = tmp_path / "site"
    path = write_customer_config(site, port=provider.odmr[1], password=PASSWORD,
                                 ca_file=certs.ca_file, pulls=[{"domains": ["example.org"],
                                                                "every": "1h"}])
    metrics_port = free_port()
    path.write_text(path.read_text().replace(
        "[provider]", f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n\n[provider]', 1))
    log = tmp_path / "daemon.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fermoposta", "customer", "run", "-c", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        # The first pull happens at start (no mail yet), then it sleeps an hour.
        assert await wait_until(lambda: "no mail" in log.read_text()), log.read_text()
        assert "next pull in" in log.read_text()
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fermoposta", "customer", "run", "-c", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 73, err
        code, _ = await send_mail(*provider.mx, "alice@sender.test", ["bob@example.org"],
                                  b"Subject: now\r\n\r\npull me\r\n")
        assert code == 250
        proc.send_signal(signal.SIGUSR1)
        new = site / "mail" / "example.org" / "bob" / "Maildir" / "new"
        assert await wait_until(lambda: new.is_dir() and any(new.iterdir())), log.read_text()
        assert provider.store.held_message_ids(["example.org"]) == []
        # The daemon's own metrics: two pulls of block "pull-1", one message.
        samples = await asyncio.to_thread(scrape, metrics_port)
        assert samples[("fermoposta_customer_pulls_total", (("pull", "pull-1"),
                                                             ("result", "ok")))] >= 2
        assert samples[("fermoposta_customer_messages_total", (("pull", "pull-1"),))] == 1
        assert samples[("fermoposta_customer_last_success_timestamp_seconds",
                        (("pull", "pull-1"),))] > 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert PASSWORD not in log.read_text()
