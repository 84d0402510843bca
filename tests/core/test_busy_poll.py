"""`net.busy_poll`: the selector that polls before it sleeps, its adaptive
window, the event loop built on it, and the provider's `[listen]
busy_poll_us` that sets it."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fermoposta.config import ConfigError, load_provider_config
from fermoposta.net.busy_poll import MIN_SPIN, BusyPollSelector, new_event_loop
from fermoposta.provider import server

BASE = 'hostname = "mx.provider.test"\ndata_dir = "var"\n'


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    try:
        yield ours, peer
    finally:
        ours.close()
        peer.close()


def watched(sock: socket.socket, max_spin: float) -> BusyPollSelector:
    selector = BusyPollSelector(max_spin)
    selector.register(sock, selectors.EVENT_READ)
    return selector


def send_later(peer: socket.socket, delay: float) -> threading.Thread:
    """The peer's byte `delay` seconds from now (a thread, joined by the caller)."""
    def send() -> None:
        time.sleep(delay)
        peer.send(b"x")
    thread = threading.Thread(target=send)
    thread.start()
    return thread


def ready_when_sent(selector: BusyPollSelector, ours: socket.socket, peer: socket.socket,
                    delay: float) -> None:
    """`select` returns `ours` readable: the peer's byte came `delay` seconds in."""
    thread = send_later(peer, delay)
    try:
        assert read_ready(selector, ours, None)
    finally:
        thread.join()


def read_ready(selector: BusyPollSelector, sock: socket.socket, timeout: float | None) -> bool:
    """One `select`: whether it said `sock` is readable (its byte then read)."""
    ready = selector.select(timeout)
    if not ready:
        return False
    assert [(key.fileobj, events) for key, events in ready] == [(sock, selectors.EVENT_READ)]
    assert sock.recv(16) == b"x"
    return True


def test_bytes_already_there_are_returned_at_once(pair: tuple[socket.socket, socket.socket]
                                                  ) -> None:
    ours, peer = pair
    selector = watched(ours, max_spin=1.0)
    peer.send(b"x")
    started = time.monotonic()
    assert read_ready(selector, ours, None)
    assert time.monotonic() - started < 0.5  # not the second of polling
    assert selector.window == 1.0  # no sleep, nothing learned


def test_the_timeout_bounds_the_polling(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    selector = watched(ours, max_spin=5.0)
    started = time.monotonic()
    assert not read_ready(selector, ours, 0.05)
    assert 0.05 <= time.monotonic() - started < 2.0  # the 50 ms asked for, not 5 s


def test_a_fast_peer_is_caught_by_the_polling(pair: tuple[socket.socket, socket.socket]
                                              ) -> None:
    ours, peer = pair
    selector = watched(ours, max_spin=10.0)
    selector.window = 5.0
    ready_when_sent(selector, ours, peer, 0.02)
    # Caught while polling: had it slept, the short wait would have doubled it.
    assert selector.window == 5.0


def test_long_waits_halve_the_window_down_to_zero(pair: tuple[socket.socket, socket.socket]
                                                  ) -> None:
    ours, _ = pair
    max_spin = 8 * MIN_SPIN
    selector = watched(ours, max_spin)
    windows = []
    for _ in range(5):
        assert not read_ready(selector, ours, 0.01)  # 10 ms: far longer than max_spin
        windows.append(selector.window)
    assert windows == [4 * MIN_SPIN, 2 * MIN_SPIN, MIN_SPIN, 0.0, 0.0]


def test_short_waits_double_the_window_up_to_max_spin(pair: tuple[socket.socket, socket.socket]
                                                      ) -> None:
    ours, peer = pair
    selector = watched(ours, max_spin=2.0)
    selector.window = 0.0  # an idle spell brought it to 0
    windows = []
    for _ in range(2):
        ready_when_sent(selector, ours, peer, 0.02)  # long after MIN_SPIN, before max_spin
        windows.append(selector.window)
    assert windows == [MIN_SPIN, 2 * MIN_SPIN]
    # Doubled, but never past max_spin: 0.3 s polled, the byte 0.1 s later.
    selector.window = 0.3
    selector.max_spin = 0.5
    ready_when_sent(selector, ours, peer, 0.4)
    assert selector.window == 0.5


def test_zero_max_spin_never_polls(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    selector = watched(ours, max_spin=0.0)
    assert not read_ready(selector, ours, 0.01)
    assert selector.window == 0.0


@pytest.mark.parametrize("max_spin", [0.0, 0.0001])
def test_the_event_loop_serves_on_either(max_spin: float) -> None:
    loop = new_event_loop(max_spin)
    try:
        # Private, but the only way to tell which selector the loop runs on.
        selector = loop._selector  # type: ignore[attr-defined]
        assert isinstance(selector, BusyPollSelector) == (max_spin > 0)

        async def echo_once() -> bytes:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(await reader.readline())
                await writer.drain()
                writer.close()
            listener = await asyncio.start_server(handle, "127.0.0.1", 0)
            port = listener.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"EHLO a\r\n")
            line = await reader.readline()
            writer.close()
            listener.close()
            await listener.wait_closed()
            return line

        assert loop.run_until_complete(echo_once()) == b"EHLO a\r\n"
    finally:
        loop.close()


# --- [listen] busy_poll_us ---------------------------------------------------------


def config_file(tmp_path: Path, listen: str = "") -> Path:
    path = tmp_path / "provider.toml"
    path.write_text(BASE + f"[listen]\n{listen}\n")
    return path


def test_busy_poll_us_defaults_to_100(tmp_path: Path) -> None:
    assert load_provider_config(config_file(tmp_path)).listen.busy_poll_us == 100
    config = load_provider_config(config_file(tmp_path, "busy_poll_us = 0"))
    assert config.listen.busy_poll_us == 0


@pytest.mark.parametrize(("value", "problem"), [
    ("1001", "expected an integer from 0 to 1000, got 1001"),
    ("-1", "expected an integer >= 0, got -1"),
    ('"100us"', 'expected an integer, got "100us"'),
])
def test_busy_poll_us_out_of_range_names_the_key(tmp_path: Path, value: str,
                                                 problem: str) -> None:
    path = config_file(tmp_path, f"busy_poll_us = {value}")
    with pytest.raises(ConfigError) as info:
        load_provider_config(path, warn=None)
    assert list(info.value.problems) == [f"{path}: [listen] busy_poll_us: {problem}"]


@pytest.mark.parametrize(("configured", "expected"), [(250, 0.00025), (0, 0.0)])
def test_provider_run_polls_as_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          configured: int, expected: float) -> None:
    asked: list[float] = []

    def recording_loop(max_spin: float) -> asyncio.AbstractEventLoop:
        asked.append(max_spin)
        return new_event_loop(max_spin)

    async def serve(config: object) -> int:
        return 0

    monkeypatch.setattr(server, "new_event_loop", recording_loop)
    monkeypatch.setattr(server, "_serve", serve)
    monkeypatch.setattr(server, "setup_logging", lambda *args, **kwargs: None)
    config = load_provider_config(config_file(tmp_path, f"busy_poll_us = {configured}"))
    assert server.run(config) == 0
    assert asked == [pytest.approx(expected)]
