"""The outbox in the daemon (continuous push with backoff) and its commands as processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator

from fermoposta.customer.daemon import Daemon
from fermoposta.customer.outbox import open_outbox, outbox_message_ids
from fermoposta.store import SQLiteStore
from peers import free_port
from support.outbox import site_config, site_config_path, submit


async def wait_until(predicate, timeout=15.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return False


@contextlib.asynccontextmanager
async def tcp_proxy(port: int, target: tuple[str, int]) -> AsyncIterator[None]:
    """Forward 127.0.0.1:`port` to `target`: the provider's submission
    service "coming back" on the address the customer dials."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def spool_ids(config) -> list[str]:
    with SQLiteStore(config.data_dir / "outbox.sqlite3") as store:
        return outbox_message_ids(store)


async def test_continuous_push_with_backoff_and_without_a_pull(provider, certs, tmp_path):
    relay_port, listen_port = free_port(), free_port()
    config = site_config(tmp_path, provider, certs, submission_port=relay_port,
                         listen=f"127.0.0.1:{listen_port}", net_block=False, every="1h",
                         outbox='push = "continuous"\nretry = "1s"\nretry_max = "2s"\n')
    daemon = Daemon(config)
    task = asyncio.create_task(daemon.run())
    try:
        assert await wait_until(lambda: daemon.runs["org"] == 1)  # the pull at start
        code, _ = await submit(listen_port, "bob@example.org", ["friend@elsewhere.test"])
        assert code == 250
        # The submission service is down: the push fails and the mail waits.
        pusher = daemon.outbox.pusher if daemon.outbox else None
        assert pusher is not None
        assert await wait_until(lambda: pusher.last is not None and pusher.last.left == 1)
        assert pusher.last is not None and pusher.last.error is not None
        assert pusher.last.error.exit_code == 69
        assert len(spool_ids(config)) == 1
        # It comes back: the retry (1 s, then 2 s) pushes the mail, no pull needed.
        async with tcp_proxy(relay_port, provider.submission):
            assert await wait_until(lambda: spool_ids(config) == [], timeout=10)
            # `last` is set when the push returns, a moment after its commit.
            assert await wait_until(lambda: pusher.last is not None and pusher.last.sent == 1)
            # New mail now goes at once.
            before = pusher.pushes
            code, _ = await submit(listen_port, "bob@example.org", ["pal@elsewhere.test"])
            assert code == 250
            assert await wait_until(lambda: pusher.pushes > before and spool_ids(config) == [],
                                    timeout=5)
        assert daemon.runs["org"] == 1  # no pull happened meanwhile
        senders = [provider.store.get_message(i) for i in _outbound_ids(provider.store)]
        assert sorted(r.address for m in senders if m for r in m.recipients) == [
            "friend@elsewhere.test", "pal@elsewhere.test"]
    finally:
        daemon.stop.set()
        assert await asyncio.wait_for(task, 30) == 0


def _outbound_ids(store) -> list[str]:
    # The provider's queue holds the pushed messages as OUTBOUND recipients.
    with SQLiteStore(store.path) as fresh:
        return outbox_message_ids(fresh)


async def test_outbox_commands_as_processes(provider, certs, tmp_path):
    listen_port = free_port()
    path = site_config_path(tmp_path, provider, certs, listen=f"127.0.0.1:{listen_port}",
                            net_block=False)
    log = tmp_path / "serve.log"
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fermoposta", "customer", "outbox", "serve", "-c", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=log.open("wb"))

    async def run(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fermoposta", "customer", "outbox", *args, "-c", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode() + err.decode()

    try:
        assert await wait_until(lambda: "outbox listening on" in log.read_text())
        code, lines = await submit(listen_port, "bob@example.org", ["friend@elsewhere.test"])
        assert code == 250
        queue_id = lines[0].rsplit(" ", 1)[1]
        assert f"{queue_id}: from=<bob@example.org>, size=" in log.read_text()
        # A second listener on the same data_dir: 73.
        assert (await run("serve"))[0] == 73
        code, out = await run("list")
        assert code == 0 and queue_id in out and "friend@elsewhere.test (to push)" in out
        code, out = await run("push")
        assert code == 0, out
        assert "1 message(s), 1 recipient(s) sent" in out
        assert (await run("list")) == (0, "outbox: empty\n")
        serve.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(serve.wait(), 30) == 0
    finally:
        if serve.returncode is None:
            serve.kill()
            await serve.wait()
    config = site_config(tmp_path, provider, certs, net_block=False)
    with open_outbox(config) as store:
        assert outbox_message_ids(store) == []
