"""Store contract, `live_nodes`: the nodes alive on the store and their live
processes, as the status page shows them.  Run on every engine."""

from __future__ import annotations

import time

from .contract import StoreFactory


def test_a_store_sees_its_own_node(store_factory: StoreFactory) -> None:
    store = store_factory(node="alpha")
    nodes = store.live_nodes()
    assert [n.node for n in nodes] == ["alpha"]
    assert nodes[0].processes == 1
    assert nodes[0].last_seen is not None and 0 <= nodes[0].last_seen < 60


def test_other_processes_and_nodes_come_and_go(store_factory: StoreFactory) -> None:
    first = store_factory(node="alpha")
    second = store_factory(node="alpha" if store_factory.engine == "sqlite" else "beta")
    second.live_nodes()  # SQLite: its holder file exists once it has been asked
    if store_factory.engine == "sqlite":
        # One machine: one node, two live processes (lock files).
        assert [(n.node, n.processes) for n in first.live_nodes()] == [("alpha", 2)]
    else:
        # PostgreSQL: each node by its heartbeat rows.
        assert [(n.node, n.processes) for n in first.live_nodes()] == \
            [("alpha", 1), ("beta", 1)]
        assert all(n.started_at is not None and n.started_at <= time.time() + 60
                   for n in first.live_nodes())
    second.close()
    assert [(n.node, n.processes) for n in first.live_nodes()] == [("alpha", 1)]
