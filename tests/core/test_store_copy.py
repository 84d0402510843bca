"""`fermoposta store copy` and `store migrate` (issue 9): growing from one node.

A single node's SQLite store, with accounts, domains and mail in every state,
is copied through the command line into an empty store (PostgreSQL, and a
SQLite file), and the copy is compared through the public interface."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import write_config
from fermoposta.cli import main
from fermoposta.config import load_provider_config
from fermoposta.provider.accounts import make_scram_secret
from fermoposta.store import (
    Account,
    Domain,
    MessageOrigin,
    NewMessage,
    NewRecipient,
    RecipientState,
    SQLiteStore,
    Store,
    open_store,
)
from fermoposta.store.base import QueueFilter
from fermoposta.store.sqlite import SCHEMA_VERSION
from support import pg
from support.sqlite_schema import back_to_version_8

HELD, OUTBOUND = RecipientState.HELD, RecipientState.OUTBOUND
BIG = os.urandom(600_000)  # three chunks


def _fill(store: Store) -> dict[str, bytes]:
    store.add_account(Account("acme", make_scram_secret("pw"), "pw",
                              cert_fingerprints=("ab" * 32,), cert_subjects=("CN=acme",)))
    store.add_account(Account("empty", None, None))
    store.add_domain(Domain("example.org", "acme", max_messages=10, max_bytes=10**6,
                            valid_recipients=frozenset({"bob", "carol"}), hold_lifetime=3600.0))
    bodies = {}
    held = store.enqueue(NewMessage("alice@sender.test", (
        NewRecipient("bob@example.org", "example.org", HELD, notify="SUCCESS"),
        NewRecipient("far@remote.test", "remote.test", OUTBOUND, orcpt="rfc822;far@remote.test"),
    ), MessageOrigin.MX, smtputf8=True, envid="E1", ret="HDRS", client="mx[192.0.2.1]"),
        io.BytesIO(BIG))
    bodies[held] = BIG
    m = store.get_message(held)
    assert m is not None
    store.record_deferred([m.recipients[1].id], "451 4.7.1 later", 2e9)
    on_hold = store.enqueue(NewMessage("", (NewRecipient("carol@example.org", "example.org",
                                                          HELD),), MessageOrigin.DSN),
                            io.BytesIO(b"Subject: x\r\n\r\nhold me\r\n"))
    bodies[on_hold] = b"Subject: x\r\n\r\nhold me\r\n"
    store.hold_messages([on_hold])
    return bodies


def _snapshot(store: Store) -> tuple[object, ...]:
    entries = store.queue_page(QueueFilter(), None, 100)
    messages = []
    for e in entries:
        m = e.message
        rcpts = [(r.address, r.domain, r.state, r.attempts, r.last_reply, r.notify, r.orcpt,
                  r.next_attempt_at, r.first_failure_at, r.delay_notified,
                  e.hold_from.get(r.id)) for r in m.recipients]
        messages.append((m.id, m.sender, m.received_at, m.size, m.origin, m.smtputf8,
                         m.body_8bit, m.envid, m.ret, m.client, m.node, rcpts,
                         b"".join(store.read_body(m.id))))
    return (store.list_accounts(), store.list_domains(), messages)


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[Path, dict[str, bytes], tuple[object, ...]]]:
    config_path = write_config(tmp_path, None)
    config = load_provider_config(config_path)
    store = SQLiteStore(config.store_path, node="node-a")
    bodies = _fill(store)
    snapshot = _snapshot(store)
    store.close()
    yield config_path, bodies, snapshot


@pytest.fixture(params=["postgresql", "sqlite"])
def target_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'target' / 'copy.sqlite3'}"
        return
    with pg.fresh_schema() as (_schema, url):
        yield url


def test_copy_into_an_empty_store_keeps_everything(source, target_url, capsys) -> None:
    config_path, bodies, snapshot = source
    assert main(["-c", str(config_path), "store", "copy", "--to", target_url]) == 0
    out = capsys.readouterr().out
    assert "copied 2 account(s), 1 domain(s), 2 message(s) with 3 recipient(s)" in out
    target = open_store(".", url=target_url)
    try:
        assert _snapshot(target) == snapshot
        # The copy is a working store: the held mail is there for its domain,
        # the hold releases to the state it had, the SCRAM secret still works.
        assert target.domains_with_held_mail(["example.org"]) == {"example.org"}
        (on_hold,) = [i for i, b in bodies.items() if b != BIG]
        assert target.release_messages([on_hold]) == {on_hold: 1}
        account = target.get_account("acme")
        assert account is not None and account.scram is not None
        assert target.account_by_subject("CN=acme") == account
    finally:
        target.close()
    # A second copy into the now non-empty target is refused, and writes nothing.
    assert main(["-c", str(config_path), "store", "copy", "--to", target_url]) == 65
    assert "the target store is not empty" in capsys.readouterr().err
    target = open_store(".", url=target_url)
    try:
        assert len(target.queue_page(QueueFilter(), None, 100)) == 2
    finally:
        target.close()


def test_copy_refuses_a_url_it_cannot_open(source, capsys) -> None:
    config_path, _, _ = source
    assert main(["-c", str(config_path), "store", "copy", "--to", "mysql://x"]) == 65
    assert "expected postgresql://" in capsys.readouterr().err
    code = main(["-c", str(config_path), "store", "copy", "--to",
                 "postgresql://nobody:sekrit@127.0.0.1:1/none?connect_timeout=2"])
    err = capsys.readouterr().err
    assert code == 75 and "sekrit" not in err


def test_migrate_reports_the_versions(tmp_path: Path, capsys) -> None:
    import sqlite3

    config_path = write_config(tmp_path, None)
    config = load_provider_config(config_path)
    SQLiteStore(config.store_path).close()
    with sqlite3.connect(config.store_path) as raw:  # pretend it was written by version 5
        back_to_version_8(raw)
        raw.execute("ALTER TABLE messages DROP COLUMN node")
        raw.execute("ALTER TABLE recipients DROP COLUMN claim_holder")
        raw.execute("DROP TABLE rate_events")
        raw.execute("ALTER TABLE domains DROP COLUMN etrn")  # version 7
        raw.execute("ALTER TABLE accounts DROP COLUMN atrn_wait")  # version 8
        raw.execute("PRAGMA user_version = 5")
    raw.close()
    assert main(["-c", str(config_path), "store", "migrate"]) == 0
    assert f"migrated from version 5 to {SCHEMA_VERSION}" in capsys.readouterr().out
    assert main(["-c", str(config_path), "store", "migrate"]) == 0
    assert f"up to date (version {SCHEMA_VERSION})" in capsys.readouterr().out
