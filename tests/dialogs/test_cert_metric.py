"""The running provider and its certificate's dates (issue 11, item 7), and
bind errors that name the listener (item 10): the expiry metric at start and
after a reload, the daily warning on an injected clock, an expired
certificate refused by reload, a busy port."""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from test_metrics import scrape, value

from conftest import Certs, write_config
from fermoposta.config import ConfigError, load_provider_config
from fermoposta.ops import certs as certdates
from fermoposta.provider import server
from fermoposta.provider.server import ListenError, Provider
from fermoposta.store import open_store
from peers import free_port

METRIC = "fermoposta_tls_certificate_expiry_timestamp_seconds"
DAY = 86400.0


def write_cert(certs: Certs, directory: Path, not_after: datetime.datetime) -> None:
    now = datetime.datetime.now(datetime.UTC)
    not_before = min(now, not_after) - datetime.timedelta(days=1)
    leaf = certs.ca.issue_cert("localhost", "127.0.0.1", not_before=not_before,
                               not_after=not_after)
    leaf.cert_chain_pems[0].write_to_path(str(directory / "own.cert"))
    leaf.private_key_pem.write_to_path(str(directory / "own.key"))


def own_config(certs: Certs, directory: Path, not_after: datetime.datetime,
               extra: str = "", ports: tuple[int, int] = (0, 0)) -> Path:
    """A config with its own certificate files (replacing them stays local)."""
    write_cert(certs, directory, not_after)
    path = write_config(directory, None, extra=extra, ports=ports)
    path.write_text(path.read_text() + f'\n[tls]\ncert = "{directory / "own.cert"}"\n'
                    f'key = "{directory / "own.key"}"\n')
    return path


def in_days(n: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=n)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def provider_log() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("fermoposta.provider")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def cert_lines(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("TLS certificate")]


async def test_metric_is_notafter_and_follows_a_reload(certs, tmp_path):
    path = own_config(certs, tmp_path, in_days(200),
                      extra=f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n')
    config = load_provider_config(path)
    store = open_store(config.data_dir)
    provider = Provider(config, store)
    await provider.start()
    try:
        expected = certdates.validity_of_file(tmp_path / "own.cert").not_after_timestamp
        samples = await asyncio.to_thread(scrape, provider.addresses["metrics"])
        assert value(samples, METRIC) == expected
        assert abs(expected - in_days(200).timestamp()) < 120
        # One series, no labels.
        assert [k for k in samples if k[0] == METRIC] == [(METRIC, ())]

        write_cert(certs, tmp_path, in_days(400))
        assert provider.reload(load_provider_config(path, warn=None)) == []
        samples = await asyncio.to_thread(scrape, provider.addresses["metrics"])
        renewed = certdates.validity_of_file(tmp_path / "own.cert").not_after_timestamp
        assert renewed != expected
        assert value(samples, METRIC) == renewed
    finally:
        await provider.stop(grace=1.0)
        store.close()
    # Stopped: the series is gone (a label-less gauge would say 0, "expired in 1970").
    assert REGISTRY.get_sample_value(METRIC) is None


async def test_no_series_without_tls(tmp_path):
    config = load_provider_config(write_config(tmp_path, None))
    store = open_store(config.data_dir)
    provider = Provider(config, store)
    await provider.start()
    try:
        assert provider.cert_validity is None
        assert REGISTRY.get_sample_value(METRIC) is None
    finally:
        await provider.stop(grace=1.0)
        store.close()


async def test_reload_refuses_an_expired_certificate(certs, tmp_path):
    path = own_config(certs, tmp_path, in_days(200))
    config = load_provider_config(path)
    store = open_store(config.data_dir)
    provider = Provider(config, store)
    await provider.start()
    try:
        before = REGISTRY.get_sample_value(METRIC)
        assert before is not None
        # The config check would refuse this file: Provider.reload, given a
        # config loaded before the file changed, refuses it too.
        write_cert(certs, tmp_path, in_days(-1))
        with pytest.raises(ConfigError, match=r"\[tls\] cert: the certificate expired on "):
            provider.reload(config)
        with pytest.raises(ConfigError, match="expired"):
            load_provider_config(path, warn=None)
        assert REGISTRY.get_sample_value(METRIC) == before
        assert provider.cert_validity is not None
        assert provider.cert_validity.not_after_timestamp == before
    finally:
        await provider.stop(grace=1.0)
        store.close()


async def test_expiring_certificate_warns_at_start_then_once_a_day(certs, tmp_path,
                                                                   provider_log):
    path = own_config(certs, tmp_path, in_days(10))
    config = load_provider_config(path, warn=None)
    store = open_store(config.data_dir)
    clock = Clock()
    provider = Provider(config, store, clock=clock)
    await provider.start()
    try:
        lines = cert_lines(provider_log)
        assert len(lines) == 1
        assert "expires on " in lines[0] and "in 10 days" in lines[0]
        assert str(tmp_path / "own.cert") in lines[0]
        assert [r.levelno for r in provider_log if r.getMessage() == lines[0]] == \
            [logging.WARNING]
        clock.now += 3600
        provider.check_certificate()
        clock.now += DAY - 3601
        provider.check_certificate()
        assert len(cert_lines(provider_log)) == 1  # not twice in a day
        clock.now += 1
        provider.check_certificate()
        lines = cert_lines(provider_log)
        assert len(lines) == 2 and "in 9 days" in lines[1]
        # Past notAfter while running: an error, daily too.
        clock.now += 10 * DAY
        provider.check_certificate()
        last = [r for r in provider_log if r.getMessage().startswith("TLS certificate")][-1]
        assert last.levelno == logging.ERROR
        assert "the certificate expired on " in last.getMessage()
    finally:
        await provider.stop(grace=1.0)
        store.close()


async def test_the_watch_task_checks_on_its_interval(certs, tmp_path, provider_log,
                                                     monkeypatch):
    monkeypatch.setattr(server, "CERT_CHECK_INTERVAL", 0.05)
    path = own_config(certs, tmp_path, in_days(5))
    config = load_provider_config(path, warn=None)
    store = open_store(config.data_dir)
    clock = Clock()
    provider = Provider(config, store, clock=clock)
    await provider.start()
    try:
        assert len(cert_lines(provider_log)) == 1
        clock.now += DAY
        for _ in range(100):
            if len(cert_lines(provider_log)) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(cert_lines(provider_log)) == 2
    finally:
        await provider.stop(grace=1.0)
        store.close()


async def test_a_certificate_with_time_left_is_not_mentioned(certs, tmp_path, provider_log):
    path = own_config(certs, tmp_path, in_days(60))
    config = load_provider_config(path)
    store = open_store(config.data_dir)
    clock = Clock()
    provider = Provider(config, store, clock=clock)
    await provider.start()
    try:
        clock.now += 38 * DAY  # 22 days left
        provider.check_certificate()
        assert cert_lines(provider_log) == []
        clock.now += 2 * DAY
        provider.check_certificate()
        assert len(cert_lines(provider_log)) == 1
    finally:
        await provider.stop(grace=1.0)
        store.close()


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


async def test_a_busy_port_names_the_listener_and_the_address(tmp_path, busy_port):
    config = load_provider_config(write_config(tmp_path, None, ports=(busy_port, free_port())))
    store = open_store(config.data_dir)
    provider = Provider(config, store)
    with pytest.raises(ListenError) as info:
        await provider.start()
    store.close()
    assert str(info.value).startswith(f"cannot listen on mx 127.0.0.1:{busy_port}: [Errno ")
    assert str(info.value) == \
        f"cannot listen on mx 127.0.0.1:{busy_port}: [Errno 98] Address already in use"
    assert info.value.listener == "mx"


async def test_a_later_listener_failing_releases_the_earlier_ones(tmp_path, busy_port):
    mx = free_port()
    config = load_provider_config(write_config(tmp_path, None, ports=(mx, busy_port)))
    store = open_store(config.data_dir)
    provider = Provider(config, store)
    with pytest.raises(ListenError, match=f"cannot listen on odmr 127.0.0.1:{busy_port}: "):
        await provider.start()
    store.close()
    with socket.socket() as s:  # the MX listener bound first was closed again
        s.bind(("127.0.0.1", mx))


async def test_a_busy_metrics_port_names_the_metrics_endpoint(tmp_path, busy_port):
    mx = free_port()
    config = load_provider_config(write_config(
        tmp_path, None, ports=(mx, 0), extra=f'[metrics]\nlisten = "127.0.0.1:{busy_port}"\n'))
    store = open_store(config.data_dir)
    provider = Provider(config, store)
    with pytest.raises(ListenError,
                       match=f"cannot listen on metrics 127.0.0.1:{busy_port}: .*in use"):
        await provider.start()
    store.close()
    assert provider.runner is not None and provider.servers
    with socket.socket() as s:  # everything started before it was stopped
        s.bind(("127.0.0.1", mx))


def test_provider_refuses_a_certificate_that_expired_after_the_check(certs, tmp_path):
    path = own_config(certs, tmp_path, in_days(30))
    config = load_provider_config(path)
    write_cert(certs, tmp_path, in_days(-1))  # replaced between the check and the start
    store = open_store(config.data_dir)
    try:
        with pytest.raises(ConfigError) as info:
            Provider(config, store)
    finally:
        store.close()
    assert str(info.value).startswith(f"{path}: [tls] cert: the certificate expired on ")
    # And one that is not valid yet, by the clock the provider is given.
    write_cert(certs, tmp_path, in_days(30))
    store = open_store(config.data_dir)
    try:
        with pytest.raises(ConfigError, match="not valid before"):
            Provider(config, store, clock=lambda: in_days(-5).timestamp())
    finally:
        store.close()
