"""Shared fixtures: trustme certificates, provider configs and in-process providers."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).parent))

from fermoposta.config import load_provider_config
from fermoposta.provider.accounts import make_scram_secret
from fermoposta.provider.server import Provider
from fermoposta.store import open_store
from fermoposta.store.base import Account, Domain, Store


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path  # chain+key PEM for a client signed by `ca`
    client_fingerprint: str
    rogue_client_file: Path  # signed by another CA
    rogue_fingerprint: str

    def client_context(self, with_cert: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        if with_cert is not None:
            ctx.load_cert_chain(str(with_cert))
        return ctx


def _fingerprint(cert: trustme.LeafCert) -> str:
    import hashlib

    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    return hashlib.sha256(der).hexdigest()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    base = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca_file = base / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file, key_file = base / "server.pem", base / "server.key"
    server.cert_chain_pems[0].write_to_path(str(cert_file))
    server.private_key_pem.write_to_path(str(key_file))
    client = ca.issue_cert("customer@example.org")
    client_file = base / "client.pem"
    client.private_key_and_cert_chain_pem.write_to_path(str(client_file))
    rogue = trustme.CA().issue_cert("customer@example.org")
    rogue_file = base / "rogue.pem"
    rogue.private_key_and_cert_chain_pem.write_to_path(str(rogue_file))
    return Certs(ca, ca_file, cert_file, key_file, client_file, _fingerprint(client),
                 rogue_file, _fingerprint(rogue))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: Path, certs: Certs | None, *, ports: tuple[int, int] = (0, 0),
                 odmr_tls: int | None = None, submission: int | None = None,
                 extra: str = "") -> Path:
    tls = ""
    if certs is not None:
        tls = (f'[tls]\ncert = "{certs.cert_file}"\nkey = "{certs.key_file}"\n'
               f'client_ca = "{certs.ca_file}"\n')
    listen = (f'[listen]\nmx = "127.0.0.1:{ports[0]}"\nodmr = "127.0.0.1:{ports[1]}"\n'
              f'submission = "{"" if submission is None else f"127.0.0.1:{submission}"}"\n')
    if odmr_tls is not None:
        listen += f'odmr_tls = "127.0.0.1:{odmr_tls}"\n'
    if "[outbound]" not in extra:
        # Tests never ask the system's DNS (it may be off this machine): MX
        # lookups go to a loopback port where nothing answers, so mail to
        # the Internet is deferred unless a test routes it to a local sink.
        extra += f'\n[outbound]\nresolver = "127.0.0.1:{free_port()}"\n'
    if "[auth_throttle]" not in extra:
        # Failed AUTHs are answered at once in tests; the throttle's delays
        # and lockouts have their own (tests/dialogs/test_auth_throttle.py).
        extra += "\n[auth_throttle]\nfailure_delay = 0\n"
    path = directory / "provider.toml"
    path.write_text(
        f'hostname = "mx.provider.test"\ndata_dir = "{directory / "data"}"\n'
        f"{listen}{tls}{extra}\n"
    )
    return path


PASSWORD = "correct horse battery staple"


def add_customer(store: Store, name: str = "acme", domains: tuple[str, ...] = ("example.org",),
                 password: str = PASSWORD, fingerprint: str | None = None) -> None:
    store.add_account(Account(name=name, scram=make_scram_secret(password), cram_secret=password,
                              cert_fingerprints=(fingerprint,) if fingerprint else ()))
    for domain in domains:
        store.add_domain(Domain(name=domain, account=name))


@dataclass
class RunningProvider:
    provider: Provider
    store: Store
    config_path: Path
    mx: tuple[str, int]
    odmr: tuple[str, int]
    odmr_tls: tuple[str, int] | None
    submission: tuple[str, int]

    async def sessions_ended(self, timeout: float = 10.0) -> None:
        """Wait until every session of the provider has ended (e.g. a drain
        whose customer dropped the connection has committed its outcomes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.provider.sessions:
            assert loop.time() < deadline, "provider sessions still running"
            await asyncio.sleep(0.01)


@pytest.fixture
async def provider_factory(tmp_path: Path, certs: Certs) -> AsyncIterator[Callable[..., Any]]:
    started: list[RunningProvider] = []

    async def start(*, tls: bool = True, extra: str = "", odmr_tls: bool = False,
                    customers: bool = True) -> RunningProvider:
        directory = tmp_path / f"provider{len(started)}"
        directory.mkdir()
        path = write_config(directory, certs if tls else None, extra=extra,
                            odmr_tls=0 if odmr_tls else None, submission=0)
        config = load_provider_config(path)
        store = open_store(config.data_dir)
        if customers:
            add_customer(store, fingerprint=certs.client_fingerprint)
            add_customer(store, "other", ("other.test",))
        provider = Provider(config, store)
        addresses = await provider.start()
        running = RunningProvider(provider, store, path, addresses["mx"], addresses["odmr"],
                                  addresses.get("odmr_tls"), addresses["submission"])
        started.append(running)
        return running

    yield start
    for running in started:
        await running.provider.stop(grace=1.0)
        running.store.close()


@pytest.fixture
async def provider(provider_factory: Callable[..., Any]) -> RunningProvider:
    running: RunningProvider = await provider_factory()
    return running
