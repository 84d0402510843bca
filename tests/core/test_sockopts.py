"""TCP_QUICKACK for the client side of pipelined dialogs (net/sockopts.py,
`Connection.enable_quickack`): where it applies, where it is a no-op, that
it is re-armed after every read (plain and TLS), and what it is for: a peer
that writes two replies separately with Nagle on gets the second one out
without waiting for our delayed ACK (~40 ms on Linux)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fermoposta.net import connection as connection_module
from fermoposta.net import sockopts
from fermoposta.net.connection import open_connection, open_unix_connection

linux_only = pytest.mark.skipif(not (sys.platform.startswith("linux")
                                     and sockopts.QUICKACK_SUPPORTED),
                                reason="TCP_QUICKACK and Linux delayed ACKs")


@linux_only
def test_quickack_sets_the_option_on_a_tcp_socket() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        assert sockopts.quickack(s) is True
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1


@linux_only
def test_rearm_sets_it_again_and_never_raises() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        sockopts.rearm_quickack(s)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    closed = socket.socket()
    closed.close()
    sockopts.rearm_quickack(closed)  # a connection closed under us: nothing raised


def test_quickack_is_a_no_op_where_it_cannot_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()  # AF_UNIX
    with a, b:
        assert sockopts.quickack(a) is False
    closed = socket.socket()
    closed.close()
    assert sockopts.quickack(closed) is False  # OSError (bad descriptor) swallowed
    assert sockopts.quickack(None) is False
    with socket.socket() as s:
        monkeypatch.setattr(sockopts, "_TCP_QUICKACK", None)  # a system without it
        assert sockopts.quickack(s) is False


async def test_enable_quickack_on_a_unix_domain_connection_is_false(tmp_path: Path) -> None:
    path = tmp_path / "s"
    server = await asyncio.start_unix_server(lambda r, w: None, path=str(path))
    try:
        conn = await open_unix_connection(path, timeout=5)
        assert conn.enable_quickack() is False
        await conn.close()
    finally:
        server.close()


async def _two_replies_peer(nodelay: bool) -> tuple[asyncio.Server, int]:
    """Reads one command, then writes two reply lines with two writes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        # asyncio sets TCP_NODELAY on its sockets; a Nagle peer has it off.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
        while await reader.readline():
            writer.write(b"250 one\r\n")
            await writer.drain()
            writer.write(b"250 two\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def _second_reply_delays(quick: bool, rounds: int = 5) -> list[float]:
    server, port = await _two_replies_peer(nodelay=False)
    try:
        conn = await open_connection("127.0.0.1", port, timeout=5)
        if quick:
            assert conn.enable_quickack() is True
        delays = []
        for _ in range(rounds):
            await conn.write(b"CMD\r\n", 5)
            assert await conn.read_line(100, 5) == b"250 one\r\n"
            first = time.perf_counter()
            assert await conn.read_line(100, 5) == b"250 two\r\n"
            delays.append(time.perf_counter() - first)
        await conn.close()
        return delays
    finally:
        server.close()


@linux_only
async def test_quickack_releases_a_nagle_peers_second_reply_at_once() -> None:
    slow = sorted(await _second_reply_delays(quick=False))
    fast = sorted(await _second_reply_delays(quick=True))
    # Without it the peer's kernel waits for our delayed ACK (>= ~40 ms) on
    # most rounds; with it, one loopback round trip.  Medians, for busy hosts.
    assert slow[2] > 0.030, slow
    assert fast[2] < 0.015, fast


def _tls_contexts(certs: Any) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(certs.cert_file), str(certs.key_file))
    return server, certs.client_context()


@pytest.mark.parametrize("tls", [False, True])
async def test_rearmed_after_every_read(tls: bool, certs: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real, real_rearm = sockopts.quickack, sockopts.rearm_quickack

    def spy(sock: Any) -> bool:
        calls.append(sock)
        return real(sock) or True  # count calls on any OS

    def spy_rearm(sock: Any) -> None:
        calls.append(sock)
        real_rearm(sock)

    monkeypatch.setattr(connection_module, "quickack", spy)
    monkeypatch.setattr(connection_module, "rearm_quickack", spy_rearm)
    server_ctx, client_ctx = _tls_contexts(certs)
    lines = [b"220 hello\r\n", b"250 one\r\n", b"250 two\r\n"]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for line in lines:
            writer.write(line)
            await writer.drain()
            await asyncio.sleep(0.02)  # separate reads on the client
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0,
                                        ssl=server_ctx if tls else None)
    port = int(server.sockets[0].getsockname()[1])
    try:
        conn = await open_connection("127.0.0.1", port, timeout=5,
                                     ssl_context=client_ctx if tls else None,
                                     server_hostname="localhost")
        before = len(calls)
        assert conn.enable_quickack() is True
        assert len(calls) == before + 1
        for line in lines:
            assert await conn.read_line(100, 5) == line
        rearmed = calls[before + 1:]
        assert len(rearmed) >= len(lines), rearmed  # at least once per read
        if not tls:
            assert len(rearmed) == len(lines)  # exactly once per socket read
        assert all(s is rearmed[0] for s in rearmed)
        await conn.close()
    finally:
        server.close()
