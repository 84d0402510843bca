"""A big message on the MX is stored while it arrives (net/body_stager.py,
store/sqlite_stage.py): the stored body is byte for byte what was sent, and
a message that is refused or cut off leaves nothing behind."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3

from fermoposta.store import SQLiteStore
from support.dialog import open_data

LINE = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-+=0123456789\r\n"


def _placeholders(store: SQLiteStore) -> int:
    conn = sqlite3.connect(store.path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM messages WHERE size = -1").fetchone()[0])
    finally:
        conn.close()


class _Staged(list):  # type: ignore[type-arg]
    """The stages the MX made; `stored` is what they actually stored."""

    @property
    def stored(self) -> int:
        return sum(stage.size for stage in self)


def _record_stages(store: SQLiteStore, monkeypatch) -> _Staged:
    """Record every stage the MX makes."""
    stages = _Staged()
    make = store.stage_body

    def stage_body(queue_id, body):  # type: ignore[no-untyped-def]
        stage = make(queue_id, body)
        stages.append(stage)
        return stage

    monkeypatch.setattr(store, "stage_body", stage_body)
    return stages


async def test_a_big_message_is_stored_whole_while_it_arrives(provider, monkeypatch):
    staged = _record_stages(provider.store, monkeypatch)
    content = b"Subject: big\r\n\r\n" + b"".join(
        LINE.replace(b"0123", b"%04d" % i) for i in range(60_000))  # ~4.7 MB
    d = await open_data(*provider.mx)
    for i in range(0, len(content), 65536):
        await d.raw(content[i:i + 65536])
    await d.raw(b".\r\n")
    lines = await d.expect(250)
    await d.cmd("QUIT", 221)
    await d.close()
    queue_id = lines[0].split()[-1]
    assert staged.stored >= 2 * 1024 * 1024  # most of it went in before the dot
    assert not any(stage.failed for stage in staged)
    stored = b"".join(provider.store.read_body(queue_id))
    # The stored message is our Received: header, then exactly what was sent.
    assert stored.startswith(b"Received: ")
    assert hashlib.sha256(stored[len(stored) - len(content):]).digest() == \
        hashlib.sha256(content).digest()
    message = provider.store.get_message(queue_id)
    assert message is not None and message.size == len(stored)
    assert [r.address for r in message.recipients] == ["bob@example.org"]
    assert _placeholders(provider.store) == 0


async def test_a_big_message_refused_for_its_size_leaves_nothing(provider_factory, monkeypatch):
    provider = await provider_factory(extra='[limits]\nmax_message_size = "2M"\n')
    staged = _record_stages(provider.store, monkeypatch)
    d = await open_data(*provider.mx)
    block = LINE * 1000
    for _ in range(40):  # ~3.1 MB
        await d.raw(block)
    for _ in range(250):  # until the stager has stored some of it
        if staged.stored:
            break
        await asyncio.sleep(0.02)
    await d.raw(b".\r\n")
    await d.expect(552)
    await d.cmd("QUIT", 221)
    await d.close()
    await provider.sessions_ended()
    assert staged.stored > 0, "nothing was staged: the test proves nothing"
    assert _placeholders(provider.store) == 0
    assert provider.store.held_message_ids(["example.org"]) == []


async def test_a_big_message_cut_off_mid_data_leaves_nothing(provider, monkeypatch):
    staged = _record_stages(provider.store, monkeypatch)
    d = await open_data(*provider.mx)
    block = LINE * 1000
    for _ in range(40):
        await d.raw(block)
    for _ in range(250):  # until the stager has stored some of it
        if staged.stored:
            break
        await asyncio.sleep(0.02)
    assert staged.stored > 0
    await d.close()  # the client goes away before the dot
    await provider.sessions_ended()
    assert _placeholders(provider.store) == 0
    assert provider.store.held_message_ids(["example.org"]) == []


async def test_provider_start_sweeps_what_a_killed_process_staged(provider, caplog):
    import subprocess
    import sys
    import textwrap

    from fermoposta.config import load_provider_config
    from fermoposta.provider.server import Provider

    script = textwrap.dedent(f"""
        import os
        from fermoposta.store import SQLiteStore
        store = SQLiteStore({str(provider.store.path)!r})
        store.stage_body("DEAD00000001", None).append(b"x" * 300000)
        os._exit(0)  # a provider killed with kill -9 mid-DATA
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert _placeholders(provider.store) == 1
    await provider.provider.stop(grace=1.0)
    caplog.set_level("INFO", logger="fermoposta.store")
    again = Provider(load_provider_config(provider.config_path), provider.store)
    await again.start()
    try:
        assert _placeholders(provider.store) == 0
        assert "removed 1 staged body" in caplog.text and "DEAD00000001" in caplog.text
    finally:
        await again.stop(grace=1.0)


async def test_a_failed_stage_is_not_read_again(tmp_path):
    """Once the store's stage has failed, the stager stops reading the spool
    back (each network read would re-read megabytes for nothing)."""
    import tempfile

    from fermoposta.net.body_stager import STAGE_PIECE, Stager

    class Failing:
        size = 0
        failed = False
        appends = 0

        def append(self, data: bytes) -> None:
            self.appends += 1
            self.failed = True

        def discard(self) -> None:
            pass

    stage = Failing()
    with tempfile.SpooledTemporaryFile(max_size=1024) as spool:
        spool.write(b"x" * 2048)
        spool.rollover()
        stager = Stager(spool, stage)
        for _ in range(50):
            spool.write(b"y" * STAGE_PIECE)
            stager.written(spool.tell())
            await stager.finish()
        stager.close()
    assert stage.appends == 1


async def test_no_descriptor_for_the_stager_still_stores_the_message(provider, monkeypatch,
                                                                      caplog):
    """A stager that cannot duplicate the spool's descriptor (EMFILE) stages
    nothing; the message is stored at the end as before, whole."""
    import errno

    from fermoposta.net import body_stager

    def no_dup(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(body_stager.os, "dup", no_dup)
    staged = _record_stages(provider.store, monkeypatch)
    content = b"Subject: big\r\n\r\n" + LINE * 30_000  # ~2.3 MB
    d = await open_data(*provider.mx)
    await d.raw(content + b".\r\n")
    lines = await d.expect(250)
    await d.cmd("QUIT", 221)
    await d.close()
    queue_id = lines[0].split()[-1]
    assert staged and staged.stored == 0
    assert "cannot store the body while it arrives" in caplog.text
    stored = b"".join(provider.store.read_body(queue_id))
    assert stored.endswith(content)
    assert _placeholders(provider.store) == 0
