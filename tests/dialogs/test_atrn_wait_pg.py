"""Waiting ATRNs across PostgreSQL nodes (issue 12): two providers on one
schema; a message taken in by node A's MX wakes the ATRN waiting on node B
within a second, through PostgreSQL's NOTIFY (B's poll is set far too slow
to be what woke it).  A node LISTENs only while an ATRN waits on it (issue
10: a notice for every held message cost intake a sixth of its speed)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Certs, RunningProvider, add_customer, write_config
from fermoposta.config import load_provider_config
from fermoposta.provider.server import Provider
from fermoposta.provider.storage import open_provider_store
from support.customer import serve_reversed
from support.pg import fresh_schema, require_server
from test_odmr import authed, hold


@pytest.fixture
async def two_nodes(tmp_path: Path, certs: Certs) -> AsyncIterator[list[RunningProvider]]:
    require_server()
    with fresh_schema() as (_schema, url):
        nodes: list[RunningProvider] = []
        try:
            for name in ("a", "b"):
                directory = tmp_path / name
                directory.mkdir()
                path = write_config(directory, certs, submission=0, extra=(
                    f'[store]\nurl = "{url}"\nnode = "{name}"\n'
                    '[odmr]\nwait_poll_interval = "10m"\n'))
                config = load_provider_config(path)
                store = await asyncio.to_thread(open_provider_store, config)
                if name == "a":
                    add_customer(store, fingerprint=certs.client_fingerprint)
                provider = Provider(config, store)
                addresses = await provider.start()
                nodes.append(RunningProvider(provider, store, path, addresses["mx"],
                                             addresses["odmr"], None, addresses["submission"]))
            yield nodes
        finally:
            for node in nodes:
                await node.provider.stop(grace=1.0)
                node.store.close()


async def test_mail_into_node_a_wakes_the_atrn_waiting_on_node_b(two_nodes: Any, certs):
    a, b = two_nodes
    account = a.store.get_account("acme")
    assert account is not None
    a.store.update_account(dataclasses.replace(account, atrn_wait=60.0))
    # Nobody waits yet: neither node listens, and held mail notifies no one.
    early = await hold(a)
    await asyncio.sleep(0.3)
    for node in (a, b):
        assert node.provider.held_watch.listens == 0
        assert node.provider.held_watch.notices == 0
    assert await asyncio.to_thread(a.store.delete_messages, [early]) == [early]
    d = await authed(b, certs)
    await d.send("ATRN example.org")
    deadline = time.monotonic() + 5
    while b.provider.held_watch.waiting < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    deadline = time.monotonic() + 5
    while b.provider.held_watch.catch_ups < 1:  # B's LISTEN is up (opened for this wait)
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert b.provider.held_watch.listens == 1
    assert a.provider.held_watch.listens == 0  # nobody waits on A
    sent = time.monotonic()
    queue_id = await hold(a)
    await d.expect(250, timeout=5.0)
    delay = time.monotonic() - sent
    assert delay < 1.0, delay
    assert b.provider.held_watch.polls == 0  # not the poll: the notice
    assert b.provider.held_watch.notices >= 1
    t = await serve_reversed(d)
    assert [m.recipients for m in t.messages] == [["bob@example.org"]]
    assert a.store.get_message(queue_id) is None
    await d.close()
